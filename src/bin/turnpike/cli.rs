//! The command line, defined once (clap derive): parsing, `--help`, the shell completions and the man
//! page all come from these types, so they cannot disagree.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// turnpike: a TURN/STUN relay server for Matrix homeservers and WebRTC services.
///
/// Run a server with `turnpike run --config FILE` (a turnpike YAML file or coturn's turnserver.conf),
/// try one on loopback with `turnpike dev`. Signals: SIGHUP reloads the configuration file and reopens
/// the log file; SIGTERM and SIGINT stop cleanly. RUST_LOG overrides the configured log level.
#[derive(Debug, Parser)]
#[command(name = "turnpike", version, max_term_width = 100)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
#[command(arg_required_else_help = true)]
pub(crate) struct Cli {
    /// Run a server with FILE: the same as `turnpike run --config FILE` (kept for existing unit files;
    /// `-c` is coturn's spelling).
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the relay with a configuration file.
    Run(ConfigArg),
    /// Run on loopback with a development secret and print a test credential (never for production).
    Dev,
    /// Validate a configuration as a start or reload would, and print the effective settings.
    ///
    /// Exits 0 when the server would start with FILE, 1 when it would not (each error names the file,
    /// line and option), 2 on a usage error. Warnings do not fail the check.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the diagnostics as one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration, then make the running server reload it and wait for the outcome.
    ///
    /// For systemd's ExecReload: exits non-zero, without signalling the server, when FILE does not pass
    /// `turnpike check`; otherwise sends SIGHUP to PID and waits for the server to report the reload
    /// in $RUNTIME_DIRECTORY/reload-status (exit 0 applied, 1 refused or no answer in time).
    Reload {
        #[command(flatten)]
        config: ConfigArg,
        /// The server's process ID (systemd: $MAINPID).
        #[arg(long, value_name = "PID")]
        pid: i32,
        /// How long to wait for the server's answer.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        timeout: f64,
    },
    /// Print a TURN REST username and password, as a homeserver mints them from the shared secret.
    Credentials {
        /// The shared secret (auth.shared_secrets / static-auth-secret).
        #[arg(long, value_name = "SECRET")]
        secret: String,
        /// The user part of the username.
        #[arg(long, value_name = "NAME", default_value = "turnpike-test")]
        user: String,
        /// How long the credential is valid.
        #[arg(long, value_name = "SECONDS", default_value_t = 86_400)]
        ttl: u64,
        /// Also print an iceServers entry for this URI (turn:HOST:PORT?transport=udp).
        #[arg(long, value_name = "URI")]
        uri: Option<String>,
    },
    /// Print the homeserver.yaml TURN block for this server.
    SynapseConfig {
        #[command(flatten)]
        config: ConfigArg,
        /// The name clients use (default: the realm).
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
    },
    /// Allocate twice, relay through both allocations, and report each step as it completes.
    ///
    /// Exit codes: 0 every step worked; 1 a step failed (the report says which and why); 2 usage error.
    Probe(ProbeArgs),
    /// Convert or document configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// List or end allocations through the admin API (admin.listen, admin.token_file of --config).
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Revoke a user: end its allocations and refuse its Allocates and Refreshes, fleet-wide.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// The user (a REST username's user part, or a static user's name).
        #[arg(long, value_name = "NAME")]
        user: String,
        /// How long: seconds, or with a unit (90s, 30m, 1h, 7d).
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration, default_value = "1h")]
        duration: u64,
        /// Lift the revocation instead.
        #[arg(long)]
        undo: bool,
    },
    /// Stop taking new allocations on this node (clients are sent to another node); existing ones go on.
    Drain {
        #[command(flatten)]
        config: ConfigArg,
        /// Wait until the node's last allocation has ended.
        #[arg(long, conflicts_with = "undo")]
        wait: bool,
        /// Take new allocations again.
        #[arg(long)]
        undo: bool,
    },
    /// Print a shell completion script (e.g. `turnpike completions bash > /etc/bash_completion.d/turnpike`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff), generated from this command line's definitions.
    Man,
}

/// `turnpike sessions ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum SessionsCommand {
    /// List allocations: id, node, user, client, relayed addresses, age, packets and bytes.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this user's.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Every node's, not only this node's (with a cluster).
        #[arg(long)]
        fleet: bool,
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End allocations now: one by id, or every one of a user (fleet-wide with a cluster).
    Kill {
        #[command(flatten)]
        config: ConfigArg,
        /// Every allocation of this user.
        #[arg(long, value_name = "NAME", required_unless_present = "id", conflicts_with = "id")]
        user: Option<String>,
        /// The allocation with this id (as `sessions list` shows it).
        #[arg(long, value_name = "ID")]
        id: Option<String>,
    },
}

/// Seconds from `90`, `90s`, `30m`, `1h` or `7d`.
fn parse_duration(text: &str) -> Result<u64, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("`{text}`: a number with an optional unit s, m, h or d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit is s, m, h or d")),
    };
    n.checked_mul(scale).filter(|&s| s > 0).ok_or_else(|| format!("`{text}`: out of range"))
}

/// `--config FILE`, required.
#[derive(Debug, Args)]
pub(crate) struct ConfigArg {
    /// The configuration: turnpike YAML or coturn's turnserver.conf (detected).
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: PathBuf,
}

/// `turnpike probe`'s arguments.
#[derive(Debug, Args)]
pub(crate) struct ProbeArgs {
    /// The server, as a TURN URI: turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT].
    #[arg(value_name = "URI")]
    pub uri: String,
    /// A TURN REST shared secret (a username is minted as a homeserver would).
    #[arg(long, value_name = "SECRET", conflicts_with_all = ["user", "password"], required_unless_present = "user")]
    pub secret: Option<String>,
    /// A static user's name (with --password).
    #[arg(long, value_name = "NAME", requires = "password")]
    pub user: Option<String>,
    /// A static user's password.
    #[arg(long, value_name = "PASSWORD", requires = "user")]
    pub password: Option<String>,
    /// Datagrams to relay.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub count: u16,
    /// Per-request timeout.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    pub timeout: f64,
    /// Do not verify the server's TLS certificate (self-signed test servers).
    #[arg(long)]
    pub insecure: bool,
    /// Also trust the CA certificates in this PEM file (besides the system's store).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Print each step as one JSON object per line, and a final summary object.
    #[arg(long)]
    pub json: bool,
}

/// `turnpike config ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Print a coturn turnserver.conf as turnpike YAML: what the file sets, with comments.
    Convert {
        /// The coturn file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the option reference (config/README.md's table).
    Reference,
}

/// Shells completions are generated for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Shell {
    /// bash.
    Bash,
    /// zsh.
    Zsh,
    /// fish.
    Fish,
}

impl From<Shell> for clap_complete::Shell {
    fn from(shell: Shell) -> Self {
        match shell {
            Shell::Bash => Self::Bash,
            Shell::Zsh => Self::Zsh,
            Shell::Fish => Self::Fish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_flag_is_never_taken_as_a_value() {
        let e = Cli::try_parse_from(["turnpike", "credentials", "--secret", "--user", "bob"]).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        let e = Cli::try_parse_from(["turnpike", "credentials", "--secret", "s", "--tll", "60"]).unwrap_err();
        assert!(e.to_string().contains("--ttl"), "{e}");
    }

    #[test]
    fn durations_read_with_units() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert!(parse_duration("1w").is_err() && parse_duration("h").is_err() && parse_duration("0").is_err());
    }

    #[test]
    fn the_legacy_form_runs_a_server() {
        let cli = Cli::try_parse_from(["turnpike", "-c", "/etc/turnserver.conf"]).unwrap();
        assert!(cli.command.is_none() && cli.config.is_some());
        assert!(Cli::try_parse_from(["turnpike", "chek", "--config", "x"]).is_err());
    }
}
