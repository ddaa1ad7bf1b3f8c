//! Running a server: `turnpike run` (and the legacy `turnpike --config FILE`) and `turnpike dev`; the
//! signals (SIGHUP reloads, SIGTERM/SIGINT stop) and what systemd is told about them.

use crate::tools::{print_relay_plan, say};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use turnpike::config::Config;
use turnpike::config::preflight::{self, Severity};
use turnpike::control::notify::notify;
use turnpike::proto::integrity::rest_password;
use turnpike::server;
use turnpike::shard::clock;

/// `turnpike run --config FILE`: the file passes `turnpike check` or nothing starts.
pub(crate) fn run(path: &Path) -> Result<ExitCode, String> {
    let checked = preflight::check(path, clock::unix_now());
    let config = match checked.config {
        Some(config) if checked.findings.iter().all(|f| f.severity != Severity::Error) => config,
        _ => {
            for f in &checked.findings {
                eprintln!("{f}");
            }
            return Err(format!(
                "{}: not started (fix the errors above; `turnpike check` says the same)",
                path.display()
            ));
        }
    };
    turnpike::logging::init(&config)?;
    for f in checked.findings.iter().filter(|f| f.severity == Severity::Warning) {
        log::warn!("{}", f.what);
    }
    serve(&config, Some(path)).map(|()| ExitCode::SUCCESS)
}

/// `turnpike dev`: loopback, the development secret, a banner with commands that work as printed.
pub(crate) fn dev() -> Result<ExitCode, String> {
    let config = Config::dev().map_err(|e| e.to_string())?;
    turnpike::logging::init(&config)?;
    serve(&config, None).map(|()| ExitCode::SUCCESS)
}

fn serve(cfg: &Config, path: Option<&Path>) -> Result<(), String> {
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
    if let Some(a) = handle.admin_addr {
        log::info!("admin API on http://{a}/");
    }
    if path.is_none() {
        print_dev_banner(cfg, &handle.udp_addrs);
    }
    ReloadStatus { pid: std::process::id() as i32, sequence: 0, ok: true, message: "started".into() }.write();
    // Every socket is bound: tell systemd (Type=notify) we are ready.
    let _ = notify(&format!("READY=1\nSTATUS=relaying with {} shards", cfg.threads));
    wait_for_signals(&handle, path)?;
    let _ = notify("STOPPING=1");
    let grace = handle.config().stop_grace;
    if !grace.is_zero() {
        let left = handle.drain_for(grace);
        log::info!("drain over: {left} allocation(s) left");
    }
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

/// How this binary is invoked from the shell that started it: as typed when it was found on the
/// `PATH`, by its full path otherwise (a fresh clone runs `target/release/turnpike`).
fn invocation() -> String {
    let Some(arg0) = std::env::args().next() else {
        return "turnpike".into();
    };
    if arg0.contains('/') { std::env::current_exe().map_or(arg0, |p| p.display().to_string()) } else { arg0 }
}

fn print_dev_banner(cfg: &Config, addrs: &[std::net::SocketAddr]) {
    let Some(addr) = addrs.first() else { return };
    let secret = cfg.secrets.first().map_or("", String::as_str);
    let username = format!("{}:dev", clock::unix_now() + 86_400);
    let password = rest_password(secret.as_bytes(), username.as_bytes());
    let password = String::from_utf8_lossy(&password);
    let me = invocation();
    say(format!(
        "\nturnpike dev server: loopback only, development secret `{secret}`\n\
         \n  turn URI:  turn:{ip}:{port}?transport=udp\n  username:  {username}\n  password:  {password}\n  (static user: test / test)\n\
         \nTest it from another terminal:\n  {me} probe turn:{ip}:{port} --secret {secret}\n\
         or with coturn's client tools (apt install coturn):\n  turnutils_peer -L 127.0.0.1 -p 3480 &\n  \
         turnutils_uclient -W {secret} -u dev -e 127.0.0.1 -r 3480 -n 50 -z 5 -p {port} {ip}\n\
         \nStop with Ctrl-C.\n",
        ip = addr.ip(),
        port = addr.port()
    ));
}

/// The outcome of the latest reload, in `$RUNTIME_DIRECTORY/reload-status` (systemd's
/// `RuntimeDirectory=`), where `turnpike reload` waits for it: one line, `PID SEQUENCE ok|refused
/// MESSAGE`. Sequence 0 is the start; each SIGHUP adds one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReloadStatus {
    /// The server's process ID.
    pub pid: i32,
    /// Reloads handled by that process.
    pub sequence: u64,
    /// Whether the last one was applied.
    pub ok: bool,
    /// What it said.
    pub message: String,
}

impl ReloadStatus {
    fn path() -> Option<PathBuf> {
        let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
        // systemd lists several directories separated by colons when the unit names several.
        let first = dirs.to_str()?.split(':').next()?.to_string();
        Some(Path::new(&first).join("reload-status"))
    }

    /// The status the running server last wrote, if any.
    pub(crate) fn read() -> Option<Self> {
        let text = std::fs::read_to_string(Self::path()?).ok()?;
        let mut parts = text.trim_end().splitn(4, ' ');
        let pid = parts.next()?.parse().ok()?;
        let sequence = parts.next()?.parse().ok()?;
        let ok = parts.next()? == "ok";
        Some(Self { pid, sequence, ok, message: parts.next().unwrap_or("").to_string() })
    }

    /// Writes it (atomically: a reader never sees half a line); nothing without `$RUNTIME_DIRECTORY`.
    fn write(&self) {
        let Some(path) = Self::path() else { return };
        let tmp = path.with_extension("tmp");
        let line =
            format!("{} {} {} {}\n", self.pid, self.sequence, if self.ok { "ok" } else { "refused" }, self.message);
        if let Err(e) = std::fs::write(&tmp, line).and_then(|()| std::fs::rename(&tmp, &path)) {
            log::warn!("cannot write {}: {e}", path.display());
        }
    }
}

/// systemd's `MONOTONIC_USEC`: CLOCK_MONOTONIC in microseconds, as `sd_notify` expects with
/// `RELOADING=1`.
fn monotonic_usec() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1000
    })
}

fn wait_for_signals(handle: &server::ServerHandle, path: Option<&Path>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut sequence = 0;
    for sig in signals.forever() {
        if sig != SIGHUP {
            return Ok(());
        }
        // logrotate's postrotate sends SIGHUP (or `systemctl reload`): the log file is reopened first.
        turnpike::logging::reopen();
        let Some(path) = path else {
            log::warn!("SIGHUP: the embedded dev configuration has no file to reload");
            continue;
        };
        sequence += 1;
        let _ = notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        let (ok, message) = match handle.reload_from(path) {
            Ok(report) => {
                let message = format!(
                    "generation {} live on {} shards",
                    report.generation,
                    if report.applied_everywhere { "all" } else { "not yet all" }
                );
                log::info!("reload: {message}");
                if !report.restart_required.is_empty() {
                    log::warn!(
                        "reload: restart required for {} (running values kept)",
                        report.restart_required.join(", ")
                    );
                }
                (true, message)
            }
            Err(e) => {
                log::error!("reload refused, the running configuration stays: {e}");
                (false, e)
            }
        };
        ReloadStatus { pid: std::process::id() as i32, sequence, ok, message }.write();
        let _ = notify("READY=1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_is_not_the_wall_clock() {
        let usec = monotonic_usec();
        assert!(usec > 0);
        // The wall clock is decades past the epoch; the monotonic clock counts from boot.
        assert!(usec < clock::unix_now() * 1_000_000 / 2, "{usec}");
    }
}
