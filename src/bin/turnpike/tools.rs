//! The operator commands: check, reload, credentials, synapse-config, probe, config, completions, man.
//! Each prints to stdout through [`say`], which stops printing quietly when the reader went away
//! (`turnpike check CONF | head -1`) instead of dying on a broken pipe.

use crate::cli::{Cli, ProbeArgs, Shell};
use clap::CommandFactory;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use turnpike::config::preflight::{self, Severity};
use turnpike::probe::{self, Credentials, ProbeOptions, TurnUri};
use turnpike::proto::integrity::rest_password;
use turnpike::server;
use turnpike::shard::clock;

/// Set once stdout's reader has gone away.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Prints `text` and a newline to stdout; after a broken pipe, nothing more is printed and the command
/// ends with its own exit code.
pub(crate) fn say(text: impl std::fmt::Display) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Prints `text` as it is (it ends with its own newline).
pub(crate) fn print(text: &str) -> Result<ExitCode, String> {
    say(text.strip_suffix('\n').unwrap_or(text));
    Ok(ExitCode::SUCCESS)
}

/// `turnpike check`: the preflight's findings, then the effective settings and the relay plan.
pub(crate) fn check(path: &Path, json: bool) -> Result<ExitCode, String> {
    let mut checked = preflight::check(path, clock::unix_now());
    let plan = checked.config.as_ref().map(server::relay_plan);
    if let Some(Err(e)) = &plan {
        let what = turnpike::config::ConfigError {
            file: path.to_path_buf(),
            line: None,
            option: "relay.ips".into(),
            message: e.clone(),
        };
        checked.findings.push(preflight::Finding { severity: Severity::Error, what });
    }
    let passed = checked.passed();
    if json {
        say(checked.to_json(path));
    } else {
        if let (true, Some(cfg), Some(Ok(plan))) = (passed, &checked.config, &plan) {
            print(&cfg.to_string())?;
            print_relay_plan(plan, say);
        }
        for f in &checked.findings {
            eprintln!("{f}");
        }
        let errors = checked.of(Severity::Error).count();
        let warnings = checked.of(Severity::Warning).count();
        if passed {
            say(format!("{}: OK ({warnings} warnings)", path.display()));
        } else {
            eprintln!("{}: {errors} errors, {warnings} warnings: the server would not start", path.display());
        }
    }
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// States the final address plan: what each relay address binds and advertises.
pub(crate) fn print_relay_plan(plan: &server::RelayPlan, mut out: impl FnMut(String)) {
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

/// `turnpike reload`: check, signal, wait for the server's own verdict (see `serve::ReloadStatus`).
pub(crate) fn reload(path: &Path, pid: i32, timeout: f64) -> Result<ExitCode, String> {
    use nix::sys::signal::{Signal, kill};
    let checked = preflight::check(path, clock::unix_now());
    if !checked.passed() {
        for e in checked.of(Severity::Error) {
            eprintln!("error: {e}");
        }
        return Err(format!("{}: not reloaded, the running configuration stays", path.display()));
    }
    let before = crate::serve::ReloadStatus::read();
    let pid = nix::unistd::Pid::from_raw(pid);
    kill(pid, Signal::SIGHUP).map_err(|e| format!("cannot signal process {pid}: {e}"))?;
    let Some(before) = before.filter(|s| s.pid == pid.as_raw()) else {
        say(format!(
            "{}: checked, SIGHUP sent to {pid} (no $RUNTIME_DIRECTORY/reload-status to wait on)",
            path.display()
        ));
        return Ok(ExitCode::SUCCESS);
    };
    let deadline = clock::now() + Duration::from_secs_f64(timeout.clamp(0.1, 300.0));
    while clock::now() < deadline {
        if let Some(now) =
            crate::serve::ReloadStatus::read().filter(|s| s.pid == before.pid && s.sequence > before.sequence)
        {
            return if now.ok {
                say(format!("reloaded: {}", now.message));
                Ok(ExitCode::SUCCESS)
            } else {
                Err(format!("reload refused, the running configuration stays: {}", now.message))
            };
        }
        #[allow(clippy::disallowed_methods)] // a command-line tool polling a file, not the event loop
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("process {pid} did not report the reload within {timeout} s"))
}

/// `turnpike credentials`.
pub(crate) fn credentials(secret: &str, user: &str, ttl: u64, uri: Option<&str>) -> Result<ExitCode, String> {
    let username = format!("{}:{user}", clock::unix_now() + ttl);
    let password = rest_password(secret.as_bytes(), username.as_bytes());
    let password = String::from_utf8_lossy(&password);
    say(format!("username: {username}\npassword: {password}"));
    if let Some(uri) = uri {
        // The shape WebRTC testers (Trickle ICE) and RTCPeerConnection take.
        say(format!("uri:      {uri}"));
        let entry = serde_json::json!({"urls": uri, "username": username, "credential": password});
        say(format!("iceServers: [{entry}]"));
    }
    Ok(ExitCode::SUCCESS)
}

/// `turnpike synapse-config`.
pub(crate) fn synapse_config(path: &Path, host: Option<&str>) -> Result<ExitCode, String> {
    let cfg = turnpike::config::load(path).map_err(|e| e.to_string())?;
    let host = host.map_or_else(|| cfg.realm.clone(), str::to_string);
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
    say(format!("# homeserver.yaml, generated by `turnpike synapse-config` from {}", path.display()));
    say(format!("turn_uris: [ {} ]", list.join(", ")));
    say(format!("turn_shared_secret: \"{secret}\""));
    say("turn_user_lifetime: 86400000\nturn_allow_guests: true");
    Ok(ExitCode::SUCCESS)
}

/// `turnpike config convert`.
pub(crate) fn convert(path: &Path) -> Result<ExitCode, String> {
    let text = turnpike::config::convert_coturn(path).map_err(|e| e.to_string())?;
    print(&text)
}

/// `turnpike probe`: each step printed as it completes.
pub(crate) fn probe(args: &ProbeArgs) -> Result<ExitCode, String> {
    let uri: TurnUri = args.uri.parse()?;
    let credentials = match (&args.secret, &args.user, &args.password) {
        (Some(s), _, _) => Credentials::Secret(s.clone()),
        (None, Some(u), Some(p)) => Credentials::User { name: u.clone(), password: p.clone() },
        _ => return Err("probe needs --secret S, or --user U --password P".into()),
    };
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(format!("--timeout {}: must be a positive number of seconds", args.timeout));
    }
    let opts = ProbeOptions {
        uri,
        credentials,
        timeout: Duration::from_secs_f64(args.timeout.clamp(0.1, 60.0)),
        count: usize::from(args.count),
        insecure: args.insecure,
        ca_file: args.ca.clone(),
    };
    let json = args.json;
    let report = probe::run_observed(&opts, &mut |step| {
        if json {
            say(serde_json::json!({"step": step.name, "ok": step.ok, "detail": step.detail}));
        } else {
            say(step);
        }
    });
    if json {
        let rtts: Vec<f64> = report.rtts.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        say(serde_json::json!({"result": report.success(), "sent": report.sent, "rtt_ms": rtts}));
    } else {
        say(report.verdict());
    }
    Ok(if report.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `turnpike completions SHELL`.
pub(crate) fn completions(shell: Shell) -> Result<ExitCode, String> {
    let mut out = Vec::new();
    clap_complete::generate(clap_complete::Shell::from(shell), &mut Cli::command(), "turnpike", &mut out);
    print(&String::from_utf8_lossy(&out))
}

/// `turnpike man`: the page of the command and a section per subcommand.
pub(crate) fn man() -> Result<ExitCode, String> {
    let mut out = Vec::new();
    let command = Cli::command();
    let page = clap_mangen::Man::new(command.clone());
    page.render_title(&mut out).map_err(|e| e.to_string())?;
    page.render_name_section(&mut out).map_err(|e| e.to_string())?;
    page.render_synopsis_section(&mut out).map_err(|e| e.to_string())?;
    page.render_description_section(&mut out).map_err(|e| e.to_string())?;
    page.render_options_section(&mut out).map_err(|e| e.to_string())?;
    // One section per subcommand, with its own options: the page documents every flag.
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = sub.get_name();
        let _ = writeln!(out, ".SH \"TURNPIKE {}\"", name.to_uppercase());
        let sub_page = clap_mangen::Man::new(sub.clone().name(format!("turnpike {name}")));
        let mut section = Vec::new();
        sub_page.render_synopsis_section(&mut section).map_err(|e| e.to_string())?;
        sub_page.render_description_section(&mut section).map_err(|e| e.to_string())?;
        sub_page.render_options_section(&mut section).map_err(|e| e.to_string())?;
        sub_page.render_subcommands_section(&mut section).map_err(|e| e.to_string())?;
        // Nested sections become sub-headings of this one.
        out.extend(String::from_utf8_lossy(&section).replace(".SH ", ".SS ").bytes());
    }
    page.render_version_section(&mut out).map_err(|e| e.to_string())?;
    print(&String::from_utf8_lossy(&out))
}
