//! The machine as the generator sees it: clocks, the server's CPU time and memory, steal time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch: the clock of the payloads' send times, which the kernel's
/// receive timestamps share.
pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Clock ticks per second of `/proc` (USER_HZ, 100 on Linux).
fn clock_ticks_per_sec() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as u64,
        _ => 100,
    }
}

/// Steal time of each CPU so far, in milliseconds (`/proc/stat`, in clock ticks of 10 ms): time the
/// hypervisor ran something else while this machine's CPU wanted to run.
pub(crate) fn steal_ms() -> Vec<u64> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let hz = clock_ticks_per_sec();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| l.split_whitespace().nth(8).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1000 / hz)
        .collect()
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> f64 {
    unix_nanos() as f64 * 1e-9
}

/// CPU seconds (user + system) and RSS (KiB) of a process.
pub(crate) fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some((process_cpu_seconds(pid).unwrap_or(ticks / clock_ticks_per_sec() as f64), rss))
}

/// The process's CPU time (all threads, user + system) to the nanosecond, from its CPU-time clock
/// (`clock_getcpuclockid`); `/proc/PID/stat` counts only 10-ms ticks, too coarse for short runs.
pub(crate) fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    let now = nix::time::clock_getcpuclockid(pid).ok()?.now().ok()?;
    Some(now.tv_sec() as f64 + now.tv_nsec() as f64 * 1e-9)
}

/// Sleeps until `unix_secs` (seconds since the Unix epoch) and returns how many milliseconds late the
/// caller already was (0 when it was early enough to wait).
pub(crate) fn wait_until_unix(unix_secs: f64) -> f64 {
    let now = unix_now();
    if unix_secs > now {
        std::thread::sleep(Duration::from_secs_f64(unix_secs - now));
        0.0
    } else {
        (now - unix_secs) * 1000.0
    }
}
