//! `turn:` and `turns:` URIs (RFC 7065), as homeservers hand them to clients.

/// The transport a TURN URI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriTransport {
    /// `turn:...?transport=udp` (the default).
    Udp,
    /// `turn:...?transport=tcp`.
    Tcp,
    /// `turns:...` (TLS over TCP).
    Tls,
}

/// A parsed `turn:`/`turns:` URI (RFC 7065).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnUri {
    /// Host name or address.
    pub host: String,
    /// Port (3478, or 5349 for `turns:`).
    pub port: u16,
    /// Transport.
    pub transport: UriTransport,
}

impl std::str::FromStr for TurnUri {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (secure, rest) = if let Some(r) = s.strip_prefix("turns:") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("turn:") {
            (false, r)
        } else {
            return Err(format!("`{s}`: a TURN URI starts with turn: or turns:"));
        };
        let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| format!("`{s}`: unclosed [ in the host"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("`{s}`: no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("`{s}`: `{p}` is not a port"))?,
            None if secure => 5349,
            None => 3478,
        };
        let transport = match (secure, query.strip_prefix("transport=")) {
            (true, None | Some("tcp")) => UriTransport::Tls,
            (false, None | Some("udp")) => UriTransport::Udp,
            (false, Some("tcp")) => UriTransport::Tcp,
            (_, Some(t)) => return Err(format!("`{s}`: transport `{t}` is not offered (udp, tcp; turns: is TLS)")),
        };
        Ok(Self { host, port, transport })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_turn_uris() {
        let u: TurnUri = "turn:turn.example.org?transport=tcp".parse().unwrap();
        assert_eq!(u, TurnUri { host: "turn.example.org".into(), port: 3478, transport: UriTransport::Tcp });
        let u: TurnUri = "turns:[::1]:443".parse().unwrap();
        assert_eq!(u, TurnUri { host: "::1".into(), port: 443, transport: UriTransport::Tls });
        let u: TurnUri = "turn:127.0.0.1:3479".parse().unwrap();
        assert_eq!(u.transport, UriTransport::Udp);
        assert!("stun:x".parse::<TurnUri>().is_err());
        assert!("turn:x?transport=sctp".parse::<TurnUri>().is_err());
    }
}
