//! The `turnpike` binary: argument parsing, logging, signals, and the operator commands.

use std::path::Path;
use std::process::ExitCode;
use turnpike::config::{self, Config};
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
    turnpike --version

The coturn spelling `-c FILE` is accepted for `--config FILE`. RUST_LOG overrides the log level.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
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

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("-V" | "--version") => {
            println!("turnpike {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("dev") => {
            let cfg = Config::dev().map_err(|e| e.to_string())?;
            serve(&cfg, true)
        }
        Some("check") => {
            let path = option(args, &["--config", "-c"]).ok_or("check needs --config FILE")?;
            let cfg = config::load(Path::new(path)).map_err(|e| e.to_string())?;
            let plan = server::relay_plan(&cfg).map_err(|e| format!("{path}: {e}"))?;
            print!("{cfg}");
            print_relay_plan(&plan, |line| println!("{line}"));
            println!("{path}: OK");
            Ok(())
        }
        Some("credentials") => credentials(args),
        Some(_) => {
            let path = option(args, &["--config", "-c"])
                .ok_or_else(|| format!("unknown arguments `{}`\n\n{USAGE}", args.join(" ")))?;
            let cfg = config::load(Path::new(path)).map_err(|e| e.to_string())?;
            serve(&cfg, false)
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
        println!("uri:      {uri}");
    }
    Ok(())
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

fn init_logging(level: log::LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level).format_timestamp_millis();
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    let _ = builder.try_init();
}

fn serve(cfg: &Config, dev: bool) -> Result<(), String> {
    init_logging(cfg.log_level);
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
    if dev {
        print_dev_banner(cfg, &handle.udp_addrs);
    }
    wait_for_signal()?;
    log::info!("shutting down");
    handle.shutdown();
    log::info!("stopped");
    Ok(())
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
         \nStop with Ctrl-C.\n",
        ip = addr.ip(),
        port = addr.port()
    );
}

fn wait_for_signal() -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    for sig in signals.forever() {
        if sig == SIGHUP {
            log::warn!("SIGHUP: configuration reload arrives with the operations milestone; restart to apply changes");
            continue;
        }
        return Ok(());
    }
    Ok(())
}
