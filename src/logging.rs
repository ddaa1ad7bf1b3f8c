//! Where log lines go and how they read: stderr (under systemd each line carries its syslog priority
//! for journald), a file (reopened on SIGHUP, for logrotate), or the syslog socket (connected again
//! when the daemon restarts); as text, or one JSON object per line. env_logger does the filtering
//! (`RUST_LOG`, and the configured level through `log::set_max_level`, so a reload can change it);
//! this module writes. Credentials are never logged (usernames are, keys and passwords never).

use crate::config::{Config, LogFormat};
use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by [`reopen`]; the file sink reopens its file before the next line.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Asks the log file to be reopened before the next line (SIGHUP, after logrotate moved it).
pub fn reopen() {
    REOPEN.store(true, Ordering::Relaxed);
}

/// How a line is framed for its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `TIMESTAMP LEVEL message`.
    Plain,
    /// `<PRIORITY>message`: journald reads the priority and keeps its own timestamp.
    Journal,
    /// `<FACILITY*8+PRIORITY>turnpike[PID]: message` (RFC 3164 as local syslog daemons take it).
    Syslog {
        /// The facility number (daemon = 3).
        facility: u8,
    },
    /// One JSON object: `ts`, `level`, `target`, `msg`.
    Json,
}

/// The syslog severity of a log level.
pub fn severity(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// One line (with its newline) for `framing`.
pub fn format_line(framing: Framing, timestamp: &str, level: log::Level, target: &str, msg: &str) -> String {
    match framing {
        Framing::Plain => format!("{timestamp} {level:<5} {msg}\n"),
        Framing::Journal => format!("<{}>{msg}\n", severity(level)),
        Framing::Syslog { facility } => {
            format!(
                "<{}>turnpike[{}]: {msg}\n",
                u32::from(facility) * 8 + u32::from(severity(level)),
                std::process::id()
            )
        }
        Framing::Json => {
            let object = serde_json::json!({"ts": timestamp, "level": level.as_str(), "target": target, "msg": msg});
            format!("{object}\n")
        }
    }
}

/// Whether stderr is connected to the journal: systemd sets `JOURNAL_STREAM` to the device and inode of
/// the stream it gave the service, and a redirected stderr no longer matches them.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    match nix::sys::stat::fstat(libc::STDERR_FILENO) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// Sets up logging for `cfg`; an error names the option (the log file cannot be opened, the syslog
/// socket cannot be reached).
pub fn init(cfg: &Config) -> Result<(), String> {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Trace);
    let rust_log = std::env::var("RUST_LOG").ok();
    if let Some(spec) = &rust_log {
        builder.parse_filters(spec);
    }
    let (framing, sink): (Framing, Box<dyn Write + Send>) = if cfg.syslog {
        let sink = SyslogSink::connect(&cfg.syslog_socket)
            .map_err(|e| format!("logging.syslog: cannot reach {}: {e}", cfg.syslog_socket.display()))?;
        (Framing::Syslog { facility: cfg.syslog_facility }, Box::new(sink))
    } else if let Some(file) = &cfg.log_file {
        let sink = FileSink::open(file).map_err(|e| format!("logging.file {}: {e}", file.display()))?;
        (if cfg.log_format == LogFormat::Json { Framing::Json } else { Framing::Plain }, Box::new(sink))
    } else {
        let framing = match cfg.log_format {
            LogFormat::Json => Framing::Json,
            LogFormat::Text if stderr_is_journal() => Framing::Journal,
            LogFormat::Text => Framing::Plain,
        };
        (framing, Box::new(io::stderr()))
    };
    builder.format(move |buf, record| {
        let ts = buf.timestamp_millis().to_string();
        let line = format_line(framing, &ts, record.level(), record.target(), &record.args().to_string());
        buf.write_all(line.as_bytes())
    });
    builder.target(env_logger::Target::Pipe(sink));
    builder.try_init().map_err(|e| e.to_string())?;
    if rust_log.is_none() {
        log::set_max_level(cfg.log_level.0);
    }
    Ok(())
}

/// A log file, reopened by path when [`reopen`] was called.
struct FileSink {
    path: PathBuf,
    file: std::fs::File,
}

impl FileSink {
    fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { path: path.to_path_buf(), file })
    }
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if REOPEN.swap(false, Ordering::Relaxed) {
            // Keep writing to the old file if the new one cannot be opened: a line in the rotated file
            // is better than none.
            if let Ok(fresh) = Self::open(&self.path) {
                *self = fresh;
            }
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The syslog socket: one datagram per line. When the daemon restarts, its socket is a new one and
/// sends on the old connection fail: the sink connects again and resends the line once.
pub struct SyslogSink {
    path: PathBuf,
    sock: UnixDatagram,
}

impl SyslogSink {
    /// Connects to the daemon's socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let sock = UnixDatagram::unbound()?;
        sock.connect(path)?;
        Ok(Self { path: path.to_path_buf(), sock })
    }
}

impl Write for SyslogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = buf.strip_suffix(b"\n").unwrap_or(buf);
        if self.sock.send(line).is_err()
            && let Ok(fresh) = Self::connect(&self.path)
        {
            *self = fresh;
            // Lost if the daemon is still away: logging never stops the server.
            let _ = self.sock.send(line);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_priorities_and_json_is_one_object() {
        assert_eq!(format_line(Framing::Journal, "t", log::Level::Error, "x", "boom"), "<3>boom\n");
        assert_eq!(format_line(Framing::Journal, "t", log::Level::Info, "x", "hi"), "<6>hi\n");
        let syslog = format_line(Framing::Syslog { facility: 3 }, "t", log::Level::Warn, "x", "w");
        assert!(syslog.starts_with("<28>turnpike["), "{syslog}");
        let json =
            format_line(Framing::Json, "2026-12-02T00:00:00.000Z", log::Level::Info, "turnpike", "a \"quoted\"\nline");
        assert_eq!(json.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!((v["level"].as_str(), v["msg"].as_str()), (Some("INFO"), Some("a \"quoted\"\nline")));
    }

    #[test]
    fn syslog_connects_again_after_the_daemon_restarts() {
        let dir = std::env::temp_dir().join(format!("turnpike-syslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.sock");
        let _ = std::fs::remove_file(&path);
        let daemon = UnixDatagram::bind(&path).unwrap();
        let mut sink = SyslogSink::connect(&path).unwrap();
        sink.write_all(b"first\n").unwrap();
        let mut buf = [0u8; 64];
        let n = daemon.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"first");
        // The daemon restarts: a new socket at the same path.
        drop(daemon);
        std::fs::remove_file(&path).unwrap();
        let daemon = UnixDatagram::bind(&path).unwrap();
        sink.write_all(b"second\n").unwrap();
        let n = daemon.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"second");
        // While it is away, lines are dropped, not errors.
        drop(daemon);
        std::fs::remove_file(&path).unwrap();
        sink.write_all(b"lost\n").unwrap();
    }

    #[test]
    fn the_file_is_reopened_on_request() {
        let dir = std::env::temp_dir().join(format!("turnpike-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("turnpike.log");
        let mut sink = FileSink::open(&path).unwrap();
        sink.write_all(b"before\n").unwrap();
        std::fs::rename(&path, dir.join("turnpike.log.1")).unwrap();
        sink.write_all(b"rotated\n").unwrap();
        reopen();
        sink.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("turnpike.log.1")).unwrap(), "before\nrotated\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");
    }
}
