//! The `turnpike` binary: argument parsing, logging, signals, and the operator commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use turnpike::config::{self, Config};
use turnpike::control::notify::notify;
use turnpike::probe::{self, Credentials, ProbeOptions, TurnUri};
use turnpike::proto::integrity::rest_password;
use turnpike::server;
use turnpike::shard::clock;

const USAGE: &str = "\
turnpike — a TURN/STUN relay server

USAGE:
    turnpike --config FILE          run with FILE (turnpike YAML or coturn turnserver.conf)
    turnpike dev                    run on loopback with a development secret, print a test credential
    turnpike check --config FILE    validate FILE and print the effective settings
    turnpike credentials --secret S [--user U] [--ttl SECONDS] [--uri turn:HOST:PORT]
                                    print a TURN REST username/password, as a homeserver mints them
    turnpike synapse-config --config FILE [--host NAME]
                                    print the homeserver.yaml TURN block for this server
    turnpike probe URI (--secret S | --user U --password P) [--count N] [--timeout SECS] [--insecure] [--ca FILE]
                                    allocate twice, relay through both, report each step
    turnpike config convert FILE    print a coturn turnserver.conf as turnpike YAML
    turnpike config reference       print the option reference (config/README.md's table)
    turnpike --version

The coturn spelling `-c FILE` is accepted for `--config FILE`. RUST_LOG overrides the log level.
Signals: SIGHUP reloads the configuration file; SIGTERM/SIGINT stop cleanly.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("turnpike: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Value of `--name VALUE` or `--name=VALUE`.
fn option<'a>(args: &'a [String], names: &[&str]) -> Option<&'a str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        for n in names {
            if a == n {
                return it.next().map(String::as_str);
            }
            if let Some(v) = a.strip_prefix(&format!("{n}=")) {
                return Some(v);
            }
        }
    }
    None
}

fn load(args: &[String]) -> Result<(PathBuf, Config), String> {
    let path = option(args, &["--config", "-c"]).ok_or("--config FILE is required")?;
    let cfg = config::load(Path::new(path)).map_err(|e| e.to_string())?;
    Ok((PathBuf::from(path), cfg))
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let ok = Ok(ExitCode::SUCCESS);
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ok
        }
        Some("-V" | "--version") => {
            println!("turnpike {}", env!("CARGO_PKG_VERSION"));
            ok
        }
        Some("dev") => {
            let cfg = Config::dev().map_err(|e| e.to_string())?;
            serve(&cfg, None).map(|()| ExitCode::SUCCESS)
        }
        Some("check") => {
            let (path, cfg) = load(args)?;
            let plan = server::relay_plan(&cfg).map_err(|e| format!("{}: {e}", path.display()))?;
            print!("{cfg}");
            print_relay_plan(&plan, |line| println!("{line}"));
            println!("{}: OK", path.display());
            ok
        }
        Some("credentials") => credentials(args).map(|()| ExitCode::SUCCESS),
        Some("synapse-config") => synapse_config(args).map(|()| ExitCode::SUCCESS),
        Some("probe") => probe_command(args),
        Some("config") => match args.get(1).map(String::as_str) {
            Some("convert") => convert(args.get(2).ok_or("config convert needs a turnserver.conf path")?),
            Some("reference") => {
                print!("{}", config::options::reference_markdown());
                ok
            }
            _ => Err(format!("unknown `config` command\n\n{USAGE}")),
        },
        Some(_) => {
            let (path, cfg) = load(args).map_err(|e| format!("{e}\n\n{USAGE}"))?;
            serve(&cfg, Some(&path)).map(|()| ExitCode::SUCCESS)
        }
    }
}

fn credentials(args: &[String]) -> Result<(), String> {
    let secret = option(args, &["--secret"]).ok_or("credentials needs --secret S")?;
    let user = option(args, &["--user"]).unwrap_or("turnpike-test");
    let ttl: u64 = option(args, &["--ttl"]).unwrap_or("86400").parse().map_err(|_| "--ttl must be seconds")?;
    let username = format!("{}:{user}", clock::unix_now() + ttl);
    let password = rest_password(secret.as_bytes(), username.as_bytes());
    let password = String::from_utf8_lossy(&password);
    println!("username: {username}\npassword: {password}");
    if let Some(uri) = option(args, &["--uri"]) {
        // The shape WebRTC testers (Trickle ICE) and RTCPeerConnection take.
        println!("uri:      {uri}");
        println!("iceServers: [{{\"urls\": \"{uri}\", \"username\": \"{username}\", \"credential\": \"{password}\"}}]");
    }
    Ok(())
}

fn synapse_config(args: &[String]) -> Result<(), String> {
    let (path, cfg) = load(args)?;
    let host = option(args, &["--host"]).map_or_else(|| cfg.realm.clone(), str::to_string);
    let secret = cfg.secrets.first().ok_or_else(|| {
        format!(
            "{}: no shared secret configured (auth.shared_secrets / static-auth-secret): Synapse needs one",
            path.display()
        )
    })?;
    let port = |p: u16, default: u16| if p == default { String::new() } else { format!(":{p}") };
    let mut uris = Vec::new();
    if cfg.listen_udp {
        uris.push(format!("turn:{host}{}?transport=udp", port(cfg.listen_port, 3478)));
    }
    if cfg.listen_tcp {
        uris.push(format!("turn:{host}{}?transport=tcp", port(cfg.listen_port, 3478)));
    }
    if cfg.tls_cert.is_some() {
        uris.push(format!("turns:{host}{}?transport=tcp", port(cfg.tls_port, 5349)));
    }
    let list: Vec<String> = uris.iter().map(|u| format!("\"{u}\"")).collect();
    println!("# homeserver.yaml, generated by `turnpike synapse-config` from {}", path.display());
    println!("turn_uris: [ {} ]", list.join(", "));
    println!("turn_shared_secret: \"{secret}\"");
    println!("turn_user_lifetime: 86400000");
    println!("turn_allow_guests: true");
    Ok(())
}

fn convert(path: &str) -> Result<ExitCode, String> {
    let (model, warnings) = config::read_model(Path::new(path)).map_err(|e| e.to_string())?;
    println!("# turnpike configuration converted from {path} by `turnpike config convert`");
    println!("# Options at their default are commented out.");
    for w in &warnings {
        println!("# note: {w}");
    }
    print!("{}", config::options::to_commented_yaml(&model));
    Ok(ExitCode::SUCCESS)
}

fn probe_command(args: &[String]) -> Result<ExitCode, String> {
    let uri: TurnUri = args.get(1).ok_or("probe needs a URI such as turn:turn.example.org?transport=udp")?.parse()?;
    let credentials = match (option(args, &["--secret"]), option(args, &["--user"]), option(args, &["--password"])) {
        (Some(s), _, _) => Credentials::Secret(s.to_string()),
        (None, Some(u), Some(p)) => Credentials::User { name: u.to_string(), password: p.to_string() },
        _ => return Err("probe needs --secret S, or --user U --password P".into()),
    };
    let timeout: f64 = option(args, &["--timeout"]).unwrap_or("3").parse().map_err(|_| "--timeout must be seconds")?;
    let count: usize = option(args, &["--count"]).unwrap_or("10").parse().map_err(|_| "--count must be a number")?;
    let opts = ProbeOptions {
        uri,
        credentials,
        timeout: Duration::from_secs_f64(timeout.clamp(0.1, 60.0)),
        count: count.clamp(1, 1000),
        insecure: args.iter().any(|a| a == "--insecure"),
        ca_file: option(args, &["--ca"]).map(PathBuf::from),
    };
    let report = probe::run(&opts);
    print!("{report}");
    Ok(if report.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// States the final address plan: what each relay address binds and advertises.
fn print_relay_plan(plan: &server::RelayPlan, mut out: impl FnMut(String)) {
    for (name, list) in [("ipv4", &plan.v4), ("ipv6", &plan.v6)] {
        if list.is_empty() {
            out(format!("relay {name}: off"));
        }
        for r in list {
            if r.bind == r.advertised {
                out(format!("relay {name}: {}", r.bind));
            } else {
                out(format!("relay {name}: bind {} advertise {} (external-ip)", r.bind, r.advertised));
            }
        }
    }
}

/// Sends each log record as one datagram to the local syslog socket (RFC 3164 framing).
struct Syslog {
    sock: std::os::unix::net::UnixDatagram,
}

impl std::io::Write for Syslog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = buf.strip_suffix(b"\n").unwrap_or(buf);
        let _ = self.sock.send(line);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Logging: stderr (journald picks it up), `logging.file`, or syslog with a facility. env_logger is
/// built once at the most verbose level; the configured level is `log::set_max_level`, so a reload can
/// change it. Credentials are never logged (usernames are, keys and passwords never).
fn init_logging(cfg: &Config) -> Result<(), String> {
    use std::io::Write as _;
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Trace).format_timestamp_millis();
    let rust_log = std::env::var("RUST_LOG").ok();
    if let Some(spec) = &rust_log {
        builder.parse_filters(spec);
    }
    if cfg.syslog {
        let sock = std::os::unix::net::UnixDatagram::unbound().map_err(|e| e.to_string())?;
        sock.connect("/dev/log").map_err(|e| format!("logging.syslog: cannot reach /dev/log: {e}"))?;
        let facility = u32::from(cfg.syslog_facility);
        let pid = std::process::id();
        builder.format(move |buf, record| {
            let severity = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{}>turnpike[{pid}]: {}", facility * 8 + severity, record.args())
        });
        builder.target(env_logger::Target::Pipe(Box::new(Syslog { sock })));
    } else if let Some(file) = &cfg.log_file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .map_err(|e| format!("logging.file {}: {e}", file.display()))?;
        builder.target(env_logger::Target::Pipe(Box::new(f)));
    }
    builder.try_init().map_err(|e| e.to_string())?;
    if rust_log.is_none() {
        log::set_max_level(cfg.log_level.0);
    }
    Ok(())
}

fn serve(cfg: &Config, path: Option<&Path>) -> Result<(), String> {
    init_logging(cfg)?;
    for w in &cfg.warnings {
        log::warn!("{}: {w}", cfg.source.display());
    }
    let handle = server::start(cfg).map_err(|e| format!("{}: {e}", cfg.source.display()))?;
    print_relay_plan(&handle.relay, |line| log::info!("{line}"));
    for (what, list) in [("udp", &handle.addrs.udp), ("tcp", &handle.addrs.tcp), ("tls", &handle.addrs.tls)] {
        for a in list {
            log::info!("listening on {a}/{what} with {} shards (realm {})", cfg.threads, cfg.realm);
        }
    }
    if let Some(m) = handle.metrics_addr {
        log::info!("metrics on http://{m}/metrics");
    }
    if path.is_none() {
        print_dev_banner(cfg, &handle.udp_addrs);
    }
    // Every socket is bound: tell systemd (Type=notify) we are ready.
    let _ = notify(&format!("READY=1\nSTATUS=relaying with {} shards", cfg.threads));
    wait_for_signals(&handle, path)?;
    let _ = notify("STOPPING=1");
    log::info!("shutting down: closing allocations");
    shutdown_within(handle, Duration::from_secs(10));
    log::info!("stopped");
    Ok(())
}

/// Stops the server, but never takes longer than `limit`.
fn shutdown_within(handle: server::ServerHandle, limit: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        handle.shutdown();
        let _ = tx.send(());
    });
    if rx.recv_timeout(limit).is_err() {
        log::error!("shards did not stop within {limit:?}; exiting anyway");
    }
}

fn print_dev_banner(cfg: &Config, addrs: &[std::net::SocketAddr]) {
    let Some(addr) = addrs.first() else { return };
    let secret = cfg.secrets.first().map_or("", String::as_str);
    let username = format!("{}:dev", clock::unix_now() + 86_400);
    let password = rest_password(secret.as_bytes(), username.as_bytes());
    let password = String::from_utf8_lossy(&password);
    println!(
        "\nturnpike dev server: loopback only, development secret `{secret}`\n\
         \n  turn URI:  turn:{ip}:{port}?transport=udp\n  username:  {username}\n  password:  {password}\n  (static user: test / test)\n\
         \nTry it with coturn's client tools (apt install coturn):\n  turnutils_peer -L 127.0.0.1 -p 3480 &\n  \
         turnutils_uclient -W {secret} -u dev -e 127.0.0.1 -r 3480 -n 50 -z 5 -p {port} {ip}\n\
         or with turnpike itself:\n  turnpike probe turn:{ip}:{port} --secret {secret}\n\
         \nStop with Ctrl-C.\n",
        ip = addr.ip(),
        port = addr.port()
    );
}

fn wait_for_signals(handle: &server::ServerHandle, path: Option<&Path>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    for sig in signals.forever() {
        if sig != SIGHUP {
            return Ok(());
        }
        let Some(path) = path else {
            log::warn!("SIGHUP: the embedded dev configuration has no file to reload");
            continue;
        };
        let usec = std::time::SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_micros());
        let _ = notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
        match handle.reload_from(path) {
            Ok(report) => {
                log::info!(
                    "reload: generation {} live on {} shards",
                    report.generation,
                    if report.applied_everywhere { "all" } else { "not yet all" }
                );
                if !report.restart_required.is_empty() {
                    log::warn!(
                        "reload: restart required for {} (running values kept)",
                        report.restart_required.join(", ")
                    );
                }
            }
            Err(e) => log::error!("reload refused, the running configuration stays: {e}"),
        }
        let _ = notify("READY=1");
    }
    Ok(())
}
