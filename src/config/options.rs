//! The one table of options ([`OPTIONS`]): for each, its YAML path, its coturn spelling and how
//! coturn's file sets it, whether a reload applies it, what it means, and how its default reads. The
//! defaults themselves are the file model's ([`FileConfig::default`]). The coturn parser, the names
//! in validation messages, `check`, `config convert`, the restart-needed warning and the reference
//! in `config/README.md` are all derived from it (the reference is checked against it by a test).
//!
//! Models are compared and merged through their JSON form ([`flatten`]): a map from each option's
//! path to its value.

use super::file::FileConfig;
use serde_json::Value;
use std::collections::BTreeMap;

/// Whether a changed value takes effect on reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// Applied by `systemctl reload` (SIGHUP).
    Live,
    /// Kept at its running value until a restart (named in the reload's warning).
    Restart,
}

/// How a coturn `turnserver.conf` line sets an option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coturn {
    /// Not settable from a coturn file (YAML only).
    No,
    /// `name=value` sets it (the value's type is the option's).
    Value(&'static str),
    /// Each `name=value` line adds one item.
    Repeat(&'static str),
    /// `name` alone (or `name=1`, `name=true`) turns it on; `name=0`/`false`/`no`/`off` turns it off.
    Flag(&'static str),
    /// Set by the coturn parser's own rules for `name` (a negation, a unit, a companion option).
    Special(&'static str),
}

impl Coturn {
    /// The coturn spelling, if any.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Self::No => None,
            Self::Value(n) | Self::Repeat(n) | Self::Flag(n) | Self::Special(n) => Some(n),
        }
    }
}

/// One option.
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    /// Its YAML path, `section.key`.
    pub path: &'static str,
    /// How a coturn file sets it.
    pub coturn: Coturn,
    /// How the coturn column of the reference reads (other spellings, notes); empty: the spelling.
    pub coturn_note: &'static str,
    /// Whether a reload applies it.
    pub reload: Reload,
    /// How the default reads in the reference when the model's value does not say it (empty: the value).
    pub default_note: &'static str,
    /// What it means.
    pub doc: &'static str,
}

const fn opt(path: &'static str, coturn: Coturn, reload: Reload, doc: &'static str) -> OptionSpec {
    OptionSpec { path, coturn, coturn_note: "", reload, default_note: "", doc }
}

impl OptionSpec {
    const fn note(self, coturn_note: &'static str) -> Self {
        Self { coturn_note, ..self }
    }

    const fn default_reads(self, default_note: &'static str) -> Self {
        Self { default_note, ..self }
    }

    /// The option's name as a file of `format` spells it: its coturn spelling in a coturn file (when it
    /// has one), its YAML path otherwise.
    pub fn spelled(&self, format: super::Format) -> &'static str {
        match (format, self.coturn.name()) {
            (super::Format::Coturn, Some(name)) => name,
            _ => self.path,
        }
    }
}

use Coturn::{Flag, No, Repeat, Special, Value as Val};
use Reload::{Live, Restart};

/// Every option, in the order of the reference.
pub const OPTIONS: &[OptionSpec] = &[
    opt("listen.ips", Repeat("listening-ip"), Restart, "addresses to listen on").default_reads("`[0.0.0.0]`"),
    opt("listen.port", Val("listening-port"), Restart, "UDP and TCP port"),
    opt("listen.tls_port", Val("tls-listening-port"), Restart, "TLS port (only with `tls.cert`)"),
    opt("listen.udp", Special("no-udp"), Restart, "serve STUN/TURN over UDP"),
    opt("listen.tcp", Special("no-tcp"), Restart, "serve TURN over TCP on `listen.port`"),
    opt("listen.proxy_from", Repeat("proxy-from"), Restart, "trusted proxies (address, `a-b` or CIDR): their TCP and TLS connections must start with a PROXY protocol header (v1 or v2, before the TLS ClientHello), whose client address turnpike then uses everywhere; other sources must not send one. UDP is never proxied").default_reads("none"),
    opt("relay.ips", Repeat("relay-ip"), Restart, "relay socket addresses; when set, the whole list")
        .default_reads("from listen ips"),
    opt("relay.external_ips", Repeat("external-ip"), Restart, "address advertised behind NAT, `PUBLIC` or `PUBLIC/PRIVATE`, one per family"),
    opt("relay.min_port", Val("min-port"), Restart, "lowest relay port (up to an eighth of each shard's ports, at most 1,024, stay bound as spare sockets of deleted allocations for later ones)"),
    opt("relay.max_port", Val("max-port"), Restart, "highest relay port"),
    opt("auth.realm", Val("realm"), Live, "realm sent to clients").default_reads("required"),
    opt("auth.shared_secrets", Special("static-auth-secret"), Live, "TURN REST secrets, all accepted (list old and new to rotate)")
        .note("`use-auth-secret` + `static-auth-secret` (repeatable)"),
    opt("auth.users", Repeat("user"), Live, "static users, `name:password` or `name:0xKEY`")
        .note("`user` (repeatable), `lt-cred-mech`"),
    opt("auth.rest_separator", Val("rest-api-separator"), Live, "expiry/user separator in REST usernames"),
    opt("auth.nonce_lifetime", Special("stale-nonce"), Live, "seconds before 438 (Stale Nonce)"),
    opt("allocations.default_lifetime", No, Live, "lifetime for shorter requests, seconds"),
    opt("allocations.max_lifetime", Val("max-allocate-lifetime"), Live, "longest lifetime, seconds"),
    opt("allocations.max_permissions", No, Live, "permissions per allocation (508 beyond)"),
    opt("allocations.max_channels", No, Live, "channels per allocation (508 beyond)"),
    opt("allocations.user_quota", Val("user-quota"), Live, "allocations per user (486), 0 = unlimited; reserved ports count"),
    opt("allocations.total_quota", Val("total-quota"), Live, "allocations in total (486), 0 = unlimited; reserved ports count"),
    opt("allocations.user_reservations", No, Live, "ports reserved by EVEN-PORT with the R bit that one user may hold unredeemed at once (0 = none; 486 beyond). A reserved port counts as one of the reserving user's allocations against `user_quota` and `total_quota` until it is redeemed (by the same user: it becomes that allocation's; by another: charged to that user) or lapses after 30 s"),
    opt("allocations.max_bps", Val("max-bps"), Live, "bytes/s per allocation and direction, 0 = unlimited"),
    opt("allocations.total_bps", Special("bps-capacity"), Live, "bytes/s for the server per direction, 0 = unlimited")
        .note("`bps-capacity` (as a cap)"),
    opt("abuse.unauth_rate", No, Live, "answers to unauthenticated requests (401, 438, Binding) per source address per second, for the whole server; a /24 (IPv6 /56) shares four times that. While answers are refused, an unauthenticated Refresh smaller than its 401 goes unanswered (first Allocates are always answered: browsers send them smaller than any 401). 0 = unlimited"),
    opt("abuse.unauth_burst", No, Live, "burst of those answers per source"),
    opt("abuse.unauth_connections", No, Live, "TCP/TLS connections without an allocation yet, node-wide; 0 = an eighth of the descriptor limit (16 to 4,096). A newcomer beyond it is admitted in place of the oldest such connection of the source holding the most; from half of it on, such connections are closed after 2 s idle or 5 s in all (TLS handshake included)")
        .default_reads("0 (derived)"),
    opt("abuse.unauth_connections_per_source", No, Live, "of those, per source address (IPv6: per /64); 0 = a sixteenth of `unauth_connections` (4 to 64); more are closed at once")
        .default_reads("0 (derived)"),
    opt("abuse.descriptor_reserve", No, Live, "descriptors at the top of the table kept for relay sockets: a TCP/TLS connection accepted into them is closed at once (UDP Allocates keep their sockets); 0 = a quarter of the descriptor limit")
        .default_reads("0 (derived)"),
    opt("peers.allowed", Repeat("allowed-peer-ip"), Live, "open denied-by-default ranges (address, `a-b` or CIDR). This server's own addresses (relay and listening) are reachable only at the relayed addresses of live allocations (TURN -> TURN) unless named here, then at every port")
        .note("`allowed-peer-ip` (repeatable), `allow-loopback-peers`"),
    opt("peers.denied", Repeat("denied-peer-ip"), Live, "deny more (narrowest match wins)"),
    opt("peers.no_multicast", Flag("no-multicast-peers"), Live, "refuse multicast peers"),
    opt("peers.allow_private", No, Live, "relay into private and reserved ranges on purpose (LAN deployments)"),
    opt("peers.no_tcp_relay", Flag("no-tcp-relay"), Live, "TCP relay allocations are 442"),
    opt("tls.cert", Val("cert"), Live, "PEM certificate chain; certificates are re-read on reload, turning TLS on or off needs a restart")
        .note("`cert`, `no-tls`"),
    opt("tls.pkey", Val("pkey"), Live, "PEM private key"),
    opt("runtime.threads", Special("relay-threads"), Restart, "shards (event loops), `auto` = one per core"),
    opt("runtime.pin_cores", No, Restart, "pin shard k to a core"),
    opt("runtime.core_ids", No, Restart, "cores to pin to, in shard order"),
    opt("runtime.shard_ports", No, Restart, "per-shard relay port ranges `a-b`, one per shard").default_reads("even split"),
    opt("runtime.recv_buffer", No, Restart, "SO_RCVBUF of listening and relay sockets, bytes"),
    opt("runtime.send_buffer", No, Restart, "SO_SNDBUF of listening sockets, bytes (relay sockets keep the kernel default)"),
    opt("runtime.recv_batch", No, Restart, "datagrams per socket per wake-up"),
    opt("runtime.udp_gso", No, Restart, "send runs of same-size datagrams to one destination as one UDP GSO message (falls back by itself)"),
    opt("runtime.raw_send", No, Restart, "relayed datagrams that are alone on their way from a relay socket to a peer in a wake-up (many allocations) leave together through one raw socket per shard and address family, one `sendmmsg` instead of a `sendto` each, with their relay socket's address and port as source (IPv6 needs Linux 4.5+; without it IPv6 relays send as before). Needs `CAP_NET_RAW` (root, or `AmbientCapabilities=CAP_NET_RAW` in the unit); without it turnpike says so once at start and sends as with `false`"),
    opt("runtime.raw_min_batch", No, Restart, "with `raw_send`: the fewest such lone datagrams of one address family in a wake-up that take the raw socket (1-64); fewer leave through their relay sockets. On one the raw socket saves no system call, and towards a peer on the relay's own link (not behind a gateway) the kernel builds a route for every datagram a raw socket sends, freed later in `ksoftirqd` on the shard's core. Higher values trade a few calls per wake-up for less of that route work"),
    opt("runtime.coalesce_us", No, Restart, "receive coalescing: once a shard receives at least `coalesce_min_pps` datagrams/s, it pauses after a wake-up that emptied its sockets, for the time one receive batch takes to arrive but at most `coalesce_us` (0 = off). Fewer, fuller wake-ups (less CPU per packet) for at most that much added latency; a shard below the rate never pauses"),
    opt("runtime.coalesce_min_pps", No, Restart, "datagrams per second from which a shard pauses for coalescing"),
    opt("runtime.unallocated_timeout", No, Restart, "idle seconds for TCP/TLS connections without an allocation"),
    opt("runtime.kernel_path", No, Restart, "`off`, `auto` or `on`: an XDP program relays the ChannelData of UDP clients' channels in the kernel (both directions), installed by the shards while each channel and its permission are live; everything else stays in user space. `auto` uses it where the build (cargo feature `kernel-path`), the kernel (5.9+), the capabilities (`CAP_BPF`, `CAP_NET_ADMIN`, `CAP_PERFMON`) and the interfaces allow (forwarding on for them: the program's route lookup needs it; see the README's *The kernel path*) and logs why not otherwise; `on` refuses to start without it. Channels of allocations with a bandwidth limit (`max_bps`, `total_bps`) stay in user space"),
    opt("runtime.kernel_interfaces", No, Restart, "interfaces the kernel path attaches to").default_reads("those holding a listening or relay address (every interface with an address of the family for a wildcard listener)"),
    opt("logging.level", Special("verbose"), Live, "error, warn, info, debug or trace")
        .note("`verbose` (debug), `Verbose` (trace)"),
    opt("logging.syslog", Flag("syslog"), Restart, "log to syslog"),
    opt("logging.file", Special("log-file"), Restart, "log to a file").default_reads("none (stderr)"),
    opt("logging.syslog_facility", Special("syslog-facility"), Restart, "syslog facility: daemon, user, auth, local0-local7"),
    opt("logging.syslog_socket", No, Restart, "the syslog daemon's datagram socket; turnpike connects again when the daemon restarts"),
    opt("logging.format", No, Restart, "`text`, or `json`: one JSON object per line (`ts`, `level`, `target`, `msg`) for log shippers. On stderr under journald (`JOURNAL_STREAM`) text lines carry their syslog priority (`<3>` ...)"),
    opt("metrics.listen", No, Restart, "Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9641`; HTTP/1.1, at most 256 connections (a sixteenth of the descriptor limit if less; past it the source holding the most loses one), 2 s for a request head of at most 8 KiB, 10 s per connection")
        .default_reads("off"),
    opt("admin.listen", No, Restart, "admin API (HTTP, JSON: health, sessions, revocations, drain), e.g. `127.0.0.1:9642`; every request needs the bearer token").default_reads("off"),
    opt("admin.token_file", No, Restart, "file holding the admin API's bearer token (required with `admin.listen`; e.g. `openssl rand -hex 32 > /etc/turnpike/admin.token`)").default_reads("none"),
    opt("admin.stop_grace", No, Live, "seconds SIGTERM drains the node (new allocations sent elsewhere) and waits for its allocations to end before stopping; 0 stops at once"),
    opt("cluster.redis", No, Restart, "Redis URL (`redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://` for TLS) of the fleet's shared state: fleet-wide user quotas, session list, kills, revocations, drain").default_reads("off"),
    opt("cluster.node", No, Restart, "this node's name in the fleet").default_reads("the host name"),
    opt("cluster.alternate", No, Restart, "address other nodes name in ALTERNATE-SERVER when they send clients here, `IP:PORT`").default_reads("first listening address"),
    opt("cluster.lease", No, Restart, "seconds a node's published state lives unrenewed: a node that dies leaves the fleet (and its quota counts) after this"),
    opt("cluster.on_outage", No, Live, "while Redis is unreachable: `local` (admit on this node's own counts) or `refuse` (no new allocations); running calls are never touched"),
    opt("protocol.software", Val("software-name"), Live, "SOFTWARE attribute"),
    opt("protocol.reason_phrases", No, Live, "reason phrases in ERROR-CODE"),
    opt("protocol.legacy_channel_numbers", No, Live, "accept RFC 5766 channel numbers 0x5000-0x7FFF"),
];

/// The option at `path`.
pub fn by_path(path: &str) -> Option<&'static OptionSpec> {
    OPTIONS.iter().find(|o| o.path == path)
}

/// The option coturn spells `name`.
pub fn by_coturn_name(name: &str) -> Option<&'static OptionSpec> {
    OPTIONS.iter().find(|o| o.coturn.name() == Some(name))
}

/// Each option's value in `model`, by path (the leaves of its JSON form).
pub fn flatten(model: &FileConfig) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Ok(Value::Object(sections)) = serde_json::to_value(model) {
        for (section, keys) in sections {
            if let Value::Object(keys) = keys {
                for (key, value) in keys {
                    out.insert(format!("{section}.{key}"), value);
                }
            }
        }
    }
    out
}

/// The options whose values differ between `a` and `b`.
pub fn changed(a: &FileConfig, b: &FileConfig) -> Vec<&'static OptionSpec> {
    let (a, b) = (flatten(a), flatten(b));
    OPTIONS.iter().filter(|o| a.get(o.path) != b.get(o.path)).collect()
}

/// `new` with every restart-only option at its value in `running`: what a reload can apply.
pub fn keep_restart_only(new: &FileConfig, running: &FileConfig) -> FileConfig {
    let (Ok(mut tree), Ok(old)) = (serde_json::to_value(new), serde_json::to_value(running)) else {
        return new.clone();
    };
    for o in OPTIONS.iter().filter(|o| o.reload == Restart) {
        if let (Some(value), Some(slot)) = (value_at(&old, o.path).cloned(), value_at_mut(&mut tree, o.path)) {
            *slot = value;
        }
    }
    serde_json::from_value(tree).unwrap_or_else(|_| new.clone())
}

/// The value at `section.key` of a model's JSON form.
pub fn value_at<'v>(tree: &'v Value, path: &str) -> Option<&'v Value> {
    let (section, key) = path.split_once('.')?;
    tree.get(section)?.get(key)
}

/// The value at `section.key` of a model's JSON form, to change.
pub fn value_at_mut<'v>(tree: &'v mut Value, path: &str) -> Option<&'v mut Value> {
    let (section, key) = path.split_once('.')?;
    tree.get_mut(section)?.get_mut(key)
}

/// How a value reads in the reference, a check or a converted file.
pub fn show(value: &Value) -> String {
    match value {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("[{}]", items.iter().map(show).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// The reference table of `config/README.md`, derived from [`OPTIONS`] and the model's defaults.
pub fn reference_markdown() -> String {
    let defaults = flatten(&FileConfig::default());
    let mut out =
        String::from("| YAML key | default | on reload | coturn spelling | meaning |\n|---|---|---|---|---|\n");
    for o in OPTIONS {
        let default = if o.default_note.is_empty() {
            defaults.get(o.path).map(show).unwrap_or_default()
        } else {
            o.default_note.to_string()
        };
        let coturn = match (o.coturn_note, o.coturn) {
            ("", No) => "—".into(),
            ("", Repeat(name)) => format!("`{name}` (repeatable)"),
            ("", c) => c.name().map(|n| format!("`{n}`")).unwrap_or_default(),
            (note, _) => note.to_string(),
        };
        let reload = if o.reload == Live { "yes" } else { "restart" };
        out.push_str(&format!("| `{}` | {default} | {reload} | {coturn} | {} |\n", o.path, o.doc));
    }
    out
}

/// Options whose turnpike default behaves differently from coturn's, with how: `config convert`
/// writes them even when the coturn file does not set them, so that the converted file says so.
pub const DIFFERS_FROM_COTURN: &[(&str, &str)] = &[
    (
        "peers.allow_private",
        "coturn relays to private and reserved addresses unless denied-peer-ip lines say otherwise; turnpike refuses them unless allowed",
    ),
    ("peers.no_multicast", "coturn relays to multicast peers unless no-multicast-peers is set; turnpike refuses them"),
    (
        "peers.no_tcp_relay",
        "coturn offers TCP relaying (RFC 6062) unless no-tcp-relay is set; turnpike does not offer it",
    ),
    ("abuse.unauth_rate", "coturn answers unauthenticated requests without a limit; turnpike limits them per source"),
];

/// `model` (read from a coturn file) as commented YAML: the options it sets (`set`: their paths) and
/// those of [`DIFFERS_FROM_COTURN`], each under its section with what it means, its coturn spelling and
/// whether a reload applies it (`turnpike config convert`).
pub fn to_converted_yaml(model: &FileConfig, set: &std::collections::HashSet<String>) -> String {
    let values = flatten(model);
    let defaults = flatten(&FileConfig::default());
    let mut out = String::new();
    let mut section = "";
    for o in OPTIONS {
        let differs = DIFFERS_FROM_COTURN.iter().find(|(p, _)| *p == o.path).map(|(_, why)| *why);
        if !set.contains(o.path) && values.get(o.path) == defaults.get(o.path) && differs.is_none() {
            continue;
        }
        let (s, key) = o.path.split_once('.').unwrap_or(("", o.path));
        if s != section {
            section = s;
            out.push_str(&format!("\n{s}:\n"));
        }
        let coturn = o.coturn.name().map(|n| format!(" (coturn `{n}`)")).unwrap_or_default();
        let reload = if o.reload == Restart { " [restart]" } else { " [reload]" };
        out.push_str(&format!("  # {}{coturn}.{reload}\n", o.doc));
        if let (Some(why), false) = (differs, set.contains(o.path)) {
            out.push_str(&format!("  # turnpike's default, written out because it differs: {why}.\n"));
        }
        // A JSON value is a YAML flow value: strings quoted, lists in brackets.
        let value = values.get(o.path).map(|v| v.to_string()).unwrap_or_default();
        out.push_str(&format!("  {key}: {value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table names every key of the file model, and nothing else.
    #[test]
    fn the_table_and_the_model_have_the_same_options() {
        let model: Vec<String> = flatten(&FileConfig::default()).into_keys().collect();
        let table: Vec<String> = {
            let mut v: Vec<String> = OPTIONS.iter().map(|o| o.path.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(model, table);
        let mut coturn: Vec<&str> = OPTIONS.iter().filter_map(|o| o.coturn.name()).collect();
        coturn.sort_unstable();
        let n = coturn.len();
        coturn.dedup();
        assert_eq!(coturn.len(), n, "a coturn spelling names one option");
    }

    /// config/README.md carries the reference as the table says it.
    #[test]
    fn the_documented_reference_is_the_table() {
        let readme = include_str!("../../config/README.md");
        let generated = reference_markdown();
        assert!(
            readme.contains(&generated),
            "config/README.md's option table is not the one the table makes; replace it with the output of \
             `turnpike config reference`:\n{generated}"
        );
    }

    /// What `config convert` writes reads back as the same model, and names every option.
    #[test]
    fn a_converted_file_reads_back_the_same_and_says_only_what_differs() {
        let text = "realm=turn.example.org\nuse-auth-secret\nstatic-auth-secret=s3cret\nmin-port=50000\n\
                    listening-ip=10.0.0.1\nallowed-peer-ip=10.0.0.2\nuser-quota=12\nsyslog\nno-tcp\n";
        let parsed = super::super::coturn::parse(text).unwrap();
        let set = parsed.lines.keys().cloned().collect();
        let yaml = to_converted_yaml(&parsed.config, &set);
        let back = super::super::file::parse_yaml(&yaml).unwrap();
        assert_eq!(flatten(&back), flatten(&parsed.config), "{yaml}");
        // Only what the file sets, and the defaults that differ from coturn's, each said so.
        assert!(yaml.contains("  min_port: 50000\n") && !yaml.contains("max_port"), "{yaml}");
        assert!(yaml.contains("  tcp: false\n") && yaml.contains("  user_quota: 12\n"), "{yaml}");
        let written = yaml.lines().filter(|l| !l.trim_start().starts_with('#') && l.starts_with("  ")).count();
        assert_eq!(written, 8 + DIFFERS_FROM_COTURN.len(), "{yaml}");
        assert!(
            yaml.contains("# turnpike's default, written out because it differs: coturn relays to multicast"),
            "{yaml}"
        );
        // And the example file names every option too.
        let example = include_str!("../../config/turnpike.example.yaml");
        for o in OPTIONS {
            let key = o.path.split_once('.').unwrap().1;
            assert!(
                example.lines().any(|l| l.trim_start().starts_with(&format!("{key}:"))),
                "example lacks {}",
                o.path
            );
        }
    }

    #[test]
    fn restart_only_options_keep_their_running_values() {
        let running = FileConfig::default();
        let mut new = FileConfig::default();
        new.relay.min_port = 50_000;
        new.auth.realm = "changed".into();
        let names: Vec<&str> = changed(&running, &new).iter().map(|o| o.path).collect();
        assert_eq!(names, ["relay.min_port", "auth.realm"]);
        let merged = keep_restart_only(&new, &running);
        assert_eq!((merged.relay.min_port, merged.auth.realm.as_str()), (49152, "changed"));
    }
}
