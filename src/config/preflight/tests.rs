use super::*;
use std::path::PathBuf;

/// A temporary directory for one test's files.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("turnpike-preflight-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Checks a YAML file with `body` (a few top-level sections), now.
fn check_yaml(name: &str, body: &str) -> Preflight {
    let path = dir(name).join("turnpike.yaml");
    std::fs::write(&path, body).unwrap();
    check(&path, 1_800_000_000)
}

const REAL: &str = "9f2c4e1a7b3d5f6e8a0c2e4b6d8f0a1c";

fn errors(p: &Preflight) -> Vec<String> {
    p.of(Severity::Error).map(ToString::to_string).collect()
}

fn warnings(p: &Preflight) -> Vec<String> {
    p.of(Severity::Warning).map(ToString::to_string).collect()
}

#[test]
fn placeholder_secrets_fail_on_a_reachable_listener_only() {
    let p = check_yaml(
        "placeholder",
        "listen:\n  ips: [0.0.0.0]\nauth:\n  realm: t.example\n  shared_secrets: [\"change-me-to-the-output-of-pwgen-s-64-1\"]\n",
    );
    let e = errors(&p);
    assert!(!p.passed());
    assert!(e[0].contains("turnpike.yaml:5: option `auth.shared_secrets`: this secret is a placeholder"), "{e:?}");
    let p = check_yaml(
        "placeholder-lo",
        "listen:\n  ips: [127.0.0.1]\nauth:\n  realm: t\n  shared_secrets: [turnpike-dev-secret]\n",
    );
    assert!(p.passed(), "{:?}", errors(&p));
}

#[test]
fn short_secrets_fail() {
    let p = check_yaml("short", "auth:\n  realm: t.example\n  shared_secrets: [abc123]\n");
    assert!(errors(&p)[0].contains("a secret of 6 bytes"), "{:?}", errors(&p));
}

#[test]
fn the_example_configuration_passes_with_a_real_secret() {
    let text =
        include_str!("../../../config/turnpike.example.yaml").replace("change-me-to-the-output-of-pwgen-s-64-1", REAL);
    let p = check_yaml("example", &text);
    assert!(p.passed(), "{:?}", errors(&p));
}

#[test]
fn coturn_typos_are_errors_and_unimplemented_options_warnings() {
    let d = dir("coturn");
    let path = d.join("turnserver.conf");
    std::fs::write(&path, format!("use-auth-secret\nstatic-auth-secret={REAL}\nrealm=t.example\nmin-prot=49152\n"))
        .unwrap();
    let p = check(&path, 0);
    let e = errors(&p);
    assert!(
        e[0].contains("turnserver.conf:4: option `min-prot`: not a coturn option; did you mean `min-port`?"),
        "{e:?}"
    );
    std::fs::write(&path, format!("use-auth-secret\nstatic-auth-secret={REAL}\nrealm=t.example\nweb-admin\n")).unwrap();
    let p = check(&path, 0);
    assert!(p.passed(), "{:?}", errors(&p));
    assert!(
        warnings(&p).iter().any(|w| w.contains("`web-admin` (line 4) is a coturn option turnpike does not implement"))
    );
}

#[test]
fn syslog_needs_a_socket() {
    let p = check_yaml(
        "syslog",
        &format!(
            "auth:\n  realm: t\n  shared_secrets: [{REAL}]\nlogging:\n  syslog: true\n  syslog_socket: /nonexistent/log\n"
        ),
    );
    let e = errors(&p);
    assert!(e[0].contains(":5: option `logging.syslog`: no syslog socket at /nonexistent/log"), "{e:?}");
}

#[test]
fn an_own_address_among_allowed_peers_is_a_warning() {
    let p = check_yaml(
        "own",
        &format!(
            "listen:\n  ips: [10.0.0.1]\nauth:\n  realm: t\n  shared_secrets: [{REAL}]\npeers:\n  allowed: [10.0.0.0/24]\n"
        ),
    );
    assert!(p.passed());
    let w = warnings(&p);
    assert!(
        w.iter()
            .any(|w| w
                .contains(":7: option `peers.allowed`: 10.0.0.0-10.0.0.255 holds this host's own address 10.0.0.1")),
        "{w:?}"
    );
}

/// Writes a certificate for `names` valid from `from` to `until` (years) and its key; returns their paths.
fn certificate(d: &Path, names: &[&str], from: i32, until: i32) -> (PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (d.join(format!("{}-{from}.pem", names[0])), d.join(format!("{}-{from}.key", names[0])));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn tls_yaml(cert: &Path, key: &Path) -> String {
    format!(
        "auth:\n  realm: turn.example.org\n  shared_secrets: [{REAL}]\ntls:\n  cert: {}\n  pkey: {}\n",
        cert.display(),
        key.display()
    )
}

#[test]
fn certificates_must_be_current_and_match_their_key() {
    let d = dir("tls");
    let (cert, key) = certificate(&d, &["turn.example.org"], 2020, 2040);
    let p = check_yaml("tls-good", &tls_yaml(&cert, &key));
    assert!(p.passed() && warnings(&p).iter().all(|w| !w.contains("tls.cert")), "{:?} {:?}", errors(&p), warnings(&p));

    let (old, old_key) = certificate(&d, &["turn.example.org"], 2020, 2021);
    let e = errors(&check_yaml("tls-expired", &tls_yaml(&old, &old_key)));
    assert!(e[0].contains(":5: option `tls.cert`") && e[0].contains("expired on"), "{e:?}");

    let (_, other_key) = certificate(&d, &["other.example.org"], 2020, 2040);
    let e = errors(&check_yaml("tls-mismatch", &tls_yaml(&cert, &other_key)));
    assert!(e.iter().any(|e| e.contains("tls") && e.contains("not")), "{e:?}");

    let e = errors(&check_yaml("tls-missing", &tls_yaml(&d.join("missing.pem"), &key)));
    assert!(e[0].contains("missing.pem") && e[0].contains("tls.cert"), "{e:?}");
}

#[test]
fn a_certificate_for_another_name_is_a_warning() {
    let d = dir("tls-name");
    let (cert, key) = certificate(&d, &["*.other.org"], 2020, 2040);
    let p = check_yaml("tls-name", &tls_yaml(&cert, &key));
    assert!(p.passed());
    let w = warnings(&p);
    assert!(w.iter().any(|w| w.contains("names *.other.org but not the realm `turn.example.org`")), "{w:?}");
}

#[test]
fn wildcards_cover_one_label() {
    let names = CertNames { dns: vec!["*.example.org".into()], ips: vec![] };
    assert!(names.covers("turn.example.org") && names.covers("TURN.example.org."));
    assert!(!names.covers("example.org") && !names.covers("a.turn.example.org"));
}

#[test]
fn json_lists_errors_and_warnings() {
    let p = check_yaml("json", "auth:\n  realm: t.example\n  shared_secrets: [abc]\n");
    let v = p.to_json(Path::new("x.yaml"));
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"][0]["option"], "auth.shared_secrets");
    assert_eq!(v["errors"][0]["line"], 3);
}

#[test]
fn the_admin_token_file_must_hold_a_token() {
    let d = dir("admin");
    let token = d.join("admin.token");
    std::fs::write(&token, "short\n").unwrap();
    let yaml = format!(
        "auth:\n  realm: t\n  shared_secrets: [{REAL}]\nadmin:\n  listen: 127.0.0.1:9642\n  token_file: {}\n",
        token.display()
    );
    let e = errors(&check_yaml("admin-short", &yaml));
    assert!(e[0].contains(":6: option `admin.token_file`") && e[0].contains("at least 16 characters"), "{e:?}");
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    assert!(check_yaml("admin-ok", &yaml).passed());
    std::fs::remove_file(&token).unwrap();
    assert!(errors(&check_yaml("admin-missing", &yaml))[0].contains("admin.token_file"));
}

/// `runtime.kernel_path` without the kernel path built in: `on` fails (it could never start), `auto`
/// warns; with it built in neither is a finding here (the server itself says what the host lacks).
#[test]
fn the_kernel_path_needs_a_build_with_it() {
    let body = |mode: &str| {
        format!("auth:\n  realm: t.example\n  shared_secrets: [{REAL}]\nruntime:\n  kernel_path: {mode}\n")
    };
    let on = check_yaml("kernel-on", &body("on"));
    let auto = check_yaml("kernel-auto", &body("auto"));
    let off = check_yaml("kernel-off", &body("off"));
    assert!(off.passed() && warnings(&off).iter().all(|w| !w.contains("kernel_path")));
    if cfg!(all(feature = "kernel-path", target_os = "linux")) {
        assert!(on.passed(), "{:?}", errors(&on));
        assert!(warnings(&auto).iter().all(|w| !w.contains("kernel_path")), "{:?}", warnings(&auto));
    } else {
        assert!(
            errors(&on)[0].contains("turnpike.yaml:5: option `runtime.kernel_path`: `on`, but"),
            "{:?}",
            errors(&on)
        );
        assert!(warnings(&auto).iter().any(|w| w.contains("turnpike.yaml:5") && w.contains("relays in user space")));
    }
}
