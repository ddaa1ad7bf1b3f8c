//! The command line as an operator meets it: help for everything, slips of the finger that start
//! nothing, `check`'s exit codes and JSON, closed pipes, logs for journald and log shippers, and a
//! reload that fails without disturbing the running server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods, missing_docs)]

mod common;

use common::{Binary, EchoPeer, SECRET, TurnClient, test_yaml};
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use turnpike::proto::Class;

const BIN: &str = env!("CARGO_BIN_EXE_turnpike");

/// A secret `turnpike check` accepts anywhere.
const REAL_SECRET: &str = "9f2c4e1a7b3d5f6e8a0c2e4b6d8f0a1c";

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("turnpike-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the binary to completion (at most 20 s: a command that starts a server by mistake fails the
/// test instead of hanging it).
fn run(args: &[&str]) -> Output {
    run_in(args, &[])
}

/// As [`run`], with extra environment variables.
fn run_in(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`turnpike {}` did not exit: it started something", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every subcommand, as `turnpike --help` lists them.
const SUBCOMMANDS: &[&str] = &[
    "run",
    "dev",
    "check",
    "reload",
    "credentials",
    "synapse-config",
    "probe",
    "config",
    "sessions",
    "revoke",
    "drain",
    "completions",
    "man",
];

#[test]
fn every_subcommand_has_help() {
    let top = run(&["--help"]);
    assert_eq!(top.status.code(), Some(0));
    let listed: Vec<String> = String::from_utf8_lossy(&top.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert_eq!(listed, SUBCOMMANDS, "a new subcommand needs its place in this test");
    let mut all: Vec<Vec<&str>> = SUBCOMMANDS.iter().map(|c| vec![*c]).collect();
    all.push(vec!["config", "convert"]);
    all.push(vec!["config", "reference"]);
    all.push(vec!["sessions", "list"]);
    all.push(vec!["sessions", "kill"]);
    for command in all {
        for help in ["--help", "-h"] {
            let mut args = command.clone();
            args.push(help);
            let out = run(&args);
            assert_eq!(out.status.code(), Some(0), "turnpike {args:?}: {}", text(&out));
            assert!(out.stdout.len() > 40 && String::from_utf8_lossy(&out.stdout).contains("Usage:"), "{args:?}");
        }
    }
    let version = run(&["--version"]);
    assert!(version.status.success() && String::from_utf8_lossy(&version.stdout).starts_with("turnpike "));
}

/// A configuration listening on a free loopback port; returns its path and the port.
fn config_on_free_port(dir: &Path) -> (PathBuf, u16) {
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = dir.join("turnpike.yaml");
    let yaml = test_yaml(1, (47800, 47809), "127.0.0.1", "").replace("port: 0", &format!("port: {port}"));
    std::fs::write(&path, yaml).unwrap();
    (path, port)
}

#[test]
fn slips_of_the_finger_are_errors_that_start_nothing() {
    let dir = temp_dir("typos");
    let (cfg, port) = config_on_free_port(&dir);
    let cfg = cfg.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["chek", "--config", cfg], "similar subcommand exists: 'check'"),
        (&["run", "--confg", cfg], "similar argument exists: '--config'"),
        (&["--confg", cfg], "similar argument exists: '--config'"),
        (&["credentials", "--secret", "s", "--tll", "60"], "similar argument exists: '--ttl'"),
        (&["credentials", "--secret", "--user", "bob"], "a value is required for '--secret"),
        (&["probe", "turn:127.0.0.1", "--secret", "s", "--cont", "3"], "similar argument exists: '--count'"),
        (&["config", "convrt", "x.conf"], "similar subcommand exists: 'convert'"),
        (&["completions", "tcsh"], "possible values: bash, zsh, fish"),
    ];
    for (args, expected) in cases {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "turnpike {args:?}: {}", text(&out));
        assert!(text(&out).contains(expected), "turnpike {args:?}: {}", text(&out));
        // Nothing was bound: the port is free right after.
        UdpSocket::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("{args:?} left the UDP port bound: {e}"));
        TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("{args:?} left the TCP port bound: {e}"));
    }
    // No arguments at all: the help, and nothing started.
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("Usage:"));
}

#[test]
fn check_exit_codes_and_json() {
    let dir = temp_dir("check");
    let good = dir.join("good.yaml");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/turnpike.example.yaml")).unwrap();
    std::fs::write(&good, example.replace("change-me-to-the-output-of-pwgen-s-64-1", REAL_SECRET)).unwrap();
    let out = run(&["check", "--config", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("good.yaml: OK"));

    let bad = dir.join("bad.yaml");
    // The line of the option holding the placeholder secret in the example.
    let line = example.lines().position(|l| l.trim_start().starts_with("shared_secrets:")).unwrap() + 1;
    std::fs::write(&bad, &example).unwrap();
    let out = run(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains(&format!("bad.yaml:{line}: option `auth.shared_secrets`: this secret is a placeholder")),
        "{}",
        text(&out)
    );
    let out = run(&["check", "--json", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["ok"], false);
    assert_eq!(
        (v["errors"][0]["line"].as_u64(), v["errors"][0]["option"].as_str()),
        (Some(line as u64), Some("auth.shared_secrets"))
    );

    // A server refuses to start with what check refuses, with the same message.
    let out = run(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("this secret is a placeholder") && text(&out).contains("not started"),
        "{}",
        text(&out)
    );
    let out = run(&["check", "--config", dir.join("missing.yaml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("missing.yaml: cannot read"), "{}", text(&out));
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let dir = temp_dir("pipe");
    let (cfg, _) = config_on_free_port(&dir);
    for args in [vec!["check", "--config", cfg.to_str().unwrap()], vec!["config", "reference"], vec!["man"]] {
        let mut child = Command::new(BIN).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        // The reader is gone (as `| head -1` leaves it).
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!first.is_empty());
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{args:?}: {err}");
    }
}

#[test]
fn completions_and_man_page_come_from_the_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && script.contains("synapse-config") && script.contains("--config"), "{shell}");
    }
    let out = run(&["man"]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && page.starts_with(".ie") || page.contains(".TH turnpike"), "{page}");
    for flag in ["synapse\\-config", "\\-\\-insecure", "\\-\\-ttl", "\\-\\-json"] {
        assert!(page.contains(flag), "man page lacks {flag}");
    }
}

/// The device and inode of `file`, as systemd puts them in `JOURNAL_STREAM`.
fn dev_ino(file: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

/// Runs the server on `yaml` with stderr to a file and `env`, until it logged `needle`; returns the log.
fn log_of_a_run(name: &str, yaml: &str, env: impl Fn(&Path) -> Vec<(String, String)>, needle: &str) -> String {
    let dir = temp_dir(name);
    let cfg = dir.join("turnpike.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let err = dir.join("stderr");
    let file = std::fs::File::create(&err).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .envs(env(&err))
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = std::fs::read_to_string(&err).unwrap_or_default();
        if log.contains(needle) || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    log
}

#[test]
fn under_journald_each_line_carries_its_priority() {
    let yaml = test_yaml(1, (47810, 47819), "127.0.0.1", "peers:\n  allowed: [10.0.0.0/8]\n");
    let log = log_of_a_run("journal", &yaml, |err| vec![("JOURNAL_STREAM".into(), dev_ino(err))], "listening on");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("<6>listening on 127.0.0.1:")), "{log}");
    assert!(lines.iter().any(|l| l.starts_with("<4>") && l.contains("peers.allowed")), "{log}");
    assert!(lines.iter().all(|l| l.starts_with('<')), "{log}");
    // The variable of another stream (stderr redirected elsewhere) is not the journal.
    let log = log_of_a_run("not-journal", &yaml, |_| vec![("JOURNAL_STREAM".into(), "1:2".into())], "listening on");
    assert!(log.lines().all(|l| !l.starts_with('<')), "{log}");
}

/// Starts `turnpike run` on `yaml` (written into `dir`), its own output discarded: it logs to a file.
fn run_logging_to_file(dir: &Path, yaml: &str) -> std::process::Child {
    let cfg = dir.join("turnpike.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    Command::new(BIN)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits (at most 20 s) until the file at `path` contains `needle`; returns its text.
fn wait_in(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < deadline, "no `{needle}` in {}: {text}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn json_logs_parse_line_by_line_and_the_deletion_line_has_duration_and_counts() {
    let dir = temp_dir("json");
    let log_path = dir.join("turnpike.log");
    let yaml = test_yaml(
        1,
        (47820, 47829),
        "127.0.0.1",
        &format!("logging:\n  format: json\n  file: {}\n", log_path.display()),
    );
    let mut child = run_logging_to_file(&dir, &yaml);
    let log = wait_in(&log_path, "listening on");
    let addr: std::net::SocketAddr =
        log.split("listening on ").nth(1).and_then(|rest| rest.split('/').next()).unwrap().parse().unwrap();
    let peer = EchoPeer::start();
    let mut client = TurnClient::rest(addr, "json-user");
    client.allocate();
    assert!(client.create_permission(peer.addr).class() == Class::Success);
    assert!(client.channel_bind(0x4000, peer.addr).class() == Class::Success);
    for i in 0..5u8 {
        client.send_channel(0x4000, &[i; 100]);
        assert!(client.recv_data().is_some());
    }
    assert!(client.refresh(0).class() == Class::Success);
    let log = wait_in(&log_path, "allocation deleted");
    let _ = child.kill();
    let _ = child.wait();
    let mut deleted = None;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["ts", "level", "target", "msg"] {
            assert!(v[key].is_string(), "{key} in {line}");
        }
        if v["msg"].as_str().unwrap().starts_with("allocation deleted") {
            deleted = Some(v["msg"].as_str().unwrap().to_string());
        }
    }
    let deleted = deleted.unwrap();
    assert!(deleted.starts_with("allocation deleted (refreshed to 0): user="), "{deleted}");
    assert!(
        deleted.contains(" duration=") && deleted.contains("s client_to_peer=5pkt/500B peer_to_client=5pkt/500B"),
        "{deleted}"
    );
}

#[test]
fn a_refused_reload_fails_and_the_old_configuration_keeps_relaying() {
    let dir = temp_dir("reload");
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    let yaml = test_yaml(2, (47830, 47839), "127.0.0.1", "");
    let server = Binary::start_with_env("cli-reload", &yaml, &[("RUNTIME_DIRECTORY", runtime.as_os_str())]);
    let pid = server.child.id().to_string();
    let cfg = server.config.to_str().unwrap().to_string();
    // systemd gives ExecReload the same $RUNTIME_DIRECTORY as the service.
    let reload = |cfg: &str| run_in(&["reload", "--config", cfg, "--pid", &pid], &[("RUNTIME_DIRECTORY", &runtime)]);

    // A call in progress: a channel to an echo peer.
    let peer = EchoPeer::start();
    let mut client = TurnClient::rest(server.addr, "reload-user");
    client.allocate();
    assert!(client.create_permission(peer.addr).class() == Class::Success);
    assert!(client.channel_bind(0x4001, peer.addr).class() == Class::Success);

    // A valid change is applied and reported.
    std::fs::write(&cfg, yaml.replace("users: [\"alice:wonderland\"]", "users: [\"bob:builder\"]")).unwrap();
    let out = reload(&cfg);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("reloaded: generation"), "{}", text(&out));

    // An invalid file: the command fails, nothing is signalled, and relaying goes on without a loss.
    std::fs::write(&cfg, "auth:\n  realm: x\n  shared_secrets: [\n").unwrap();
    let relayed_during = std::thread::scope(|s| {
        let reload = s.spawn(|| reload(&cfg));
        let mut got = 0;
        for i in 0..200u32 {
            client.send_channel(0x4001, &i.to_be_bytes());
            if client.recv_data().is_some_and(|(_, _, data)| data == i.to_be_bytes()) {
                got += 1;
            }
        }
        let out = reload.join().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("turnpike.yaml:3") && text(&out).contains("the running configuration stays"),
            "{}",
            text(&out)
        );
        got
    });
    assert_eq!(relayed_during, 200, "datagrams lost while a reload was refused");

    // A file validation accepts but the gate refuses (an expired certificate, here a placeholder
    // secret on a reachable address) is refused by the server too when signalled directly.
    std::fs::write(
        &cfg,
        yaml.replace("ips: [127.0.0.1]\n  port: 0", "ips: [0.0.0.0]\n  port: 0").replace(SECRET, "north"),
    )
    .unwrap();
    let out = reload(&cfg);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    server.signal("HUP");
    assert!(server.wait_log("reload refused", Duration::from_secs(10)).is_some());
    let status = std::fs::read_to_string(runtime.join("reload-status")).unwrap();
    assert!(status.starts_with(&format!("{pid} 2 refused ")), "{status}");
    // Still the old configuration: the old secret authenticates a new allocation.
    let mut again = TurnClient::rest(server.addr, "after-refusal");
    again.allocate();
    client.send_channel(0x4001, b"still");
    assert_eq!(client.recv_data().map(|(_, _, d)| d), Some(b"still".to_vec()));
}

#[test]
fn sighup_reopens_the_log_file() {
    let dir = temp_dir("logrotate");
    let log_path = dir.join("turnpike.log");
    let yaml = test_yaml(1, (47840, 47849), "127.0.0.1", &format!("logging:\n  file: {}\n", log_path.display()));
    let mut child = run_logging_to_file(&dir, &yaml);
    wait_in(&log_path, "listening on");
    // logrotate moves the file, then its postrotate sends SIGHUP.
    std::fs::rename(&log_path, dir.join("turnpike.log.1")).unwrap();
    assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
    wait_in(&log_path, "reload: generation");
    let _ = child.kill();
    let _ = child.wait();
    assert!(!std::fs::read_to_string(dir.join("turnpike.log.1")).unwrap().contains("reload: generation"));
}

#[test]
fn config_convert_writes_what_the_coturn_file_sets_and_refuses_yaml() {
    let dir = temp_dir("convert");
    let conf = dir.join("turnserver.conf");
    std::fs::write(
        &conf,
        format!(
            "use-auth-secret\nstatic-auth-secret={REAL_SECRET}\nrealm=turn.example.org\nmin-port=50000\n\
             prometheus\nprometheus-port=9100\nweb-admin\nlt-cred-mech\n"
        ),
    )
    .unwrap();
    let out = run(&["config", "convert", conf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(yaml.contains("  listen: \"0.0.0.0:9100\"\n"), "the Prometheus options are kept: {yaml}");
    assert!(yaml.contains("  min_port: 50000\n") && !yaml.contains("max_port"), "only what the file sets: {yaml}");
    assert!(
        yaml.contains(
            "#   `web-admin` (line 7) is a coturn option turnpike does not implement: turnpike has no web admin"
        ),
        "{yaml}"
    );
    assert!(yaml.contains("#   `lt-cred-mech` has no effect: long-term credentials are always on"), "{yaml}");
    let options = yaml.lines().filter(|l| l.starts_with("  ") && !l.trim_start().starts_with('#')).count();
    assert!(options < 12, "about as many options as the file sets, not every default: {yaml}");
    // What it writes is a configuration turnpike reads back.
    let converted = dir.join("converted.yaml");
    std::fs::write(&converted, &yaml).unwrap();
    let out = run(&["check", "--config", converted.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // A YAML file (or anything else) is not converted.
    let out = run(&["config", "convert", converted.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("reads as turnpike YAML, not a coturn turnserver.conf"), "{}", text(&out));
    assert!(out.stdout.is_empty());
}
