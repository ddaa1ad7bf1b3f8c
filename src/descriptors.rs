//! The process's file-descriptor budget. Every allocation holds a relay socket, so a busy relay holds
//! tens of thousands of descriptors. Two things are settled once, at start-up:
//!
//! - the soft `RLIMIT_NOFILE` is raised towards the hard limit when it is below what the relay range
//!   can use (the soft default of 1,024 would cap a relay at about a thousand allocations);
//! - the kernel's descriptor table is grown to its final size up front. The table doubles as it fills,
//!   and every doubling waits for an RCU grace period (`expand_files` -> `synchronize_rcu`) inside the
//!   `socket()` call of the shard that crosses the boundary, while every other thread that opens a
//!   descriptor waits for the resize: measured here, a burst of 10,000 Allocates spent about a third of
//!   its wall time with the shard blocked in those waits. Growing the table once costs a few hundred
//!   KiB of kernel memory (8 bytes per descriptor slot) and removes the stalls.

use std::io;
use std::os::fd::AsRawFd;

/// Descriptors kept for everything that is not a relay socket: listeners, TCP/TLS connections, the
/// metrics endpoint, log files.
pub(crate) const HEADROOM: u64 = 4_096;

/// What [`prepare`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Descriptors the configuration can use (relay sockets plus [`HEADROOM`]).
    pub wanted: u64,
    /// The soft descriptor limit in force afterwards.
    pub limit: u64,
    /// Descriptor slots the table holds at least, afterwards.
    pub reserved: u64,
}

impl Budget {
    /// Whether the limit is below what the configuration can use.
    pub(crate) fn short(&self) -> bool {
        self.limit < self.wanted
    }
}

/// Relay sockets the configuration can open at most: every port of the range on every relay address,
/// or, when that is smaller, twice the total quota (an allocation may hold one socket per family) plus
/// the spares kept open between allocations (at most an eighth of the ports, see `proto::spares_at_most`).
pub(crate) fn relay_sockets_wanted(ports: u64, relay_addresses: u64, total_quota: u32) -> u64 {
    let by_ports = ports.saturating_mul(relay_addresses.max(1));
    if total_quota == 0 {
        return by_ports;
    }
    let spares = crate::proto::spares_at_most(ports);
    by_ports.min(u64::from(total_quota).saturating_mul(2).saturating_add(spares))
}

/// Raises the soft descriptor limit towards `wanted` (never above the hard limit) and grows the
/// descriptor table to the resulting limit, so opening relay sockets never waits for a resize.
pub(crate) fn prepare(wanted: u64) -> io::Result<Budget> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let mut limit = soft;
    if soft < wanted {
        let raised = wanted.min(hard);
        if raised > soft && setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() {
            limit = raised;
        }
    }
    let target = wanted.min(limit);
    let reserved = grow_table(target)?;
    Ok(Budget { wanted, limit, reserved })
}

/// Makes the descriptor table hold at least `slots` descriptors: a duplicate at the highest slot
/// forces the kernel to size the table for it; closing the duplicate keeps the size (the table never
/// shrinks). `F_DUPFD` takes the lowest free slot at or above the one asked for, so an open
/// descriptor is never replaced.
fn grow_table(slots: u64) -> io::Result<u64> {
    use nix::fcntl::{FcntlArg, fcntl};
    let Ok(highest) = i32::try_from(slots.saturating_sub(1)) else {
        return Ok(0);
    };
    if highest < 64 {
        return Ok(slots);
    }
    let anchor = std::fs::File::open("/dev/null")?;
    let duplicate = fcntl(anchor.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(highest)).map_err(io::Error::from)?;
    nix::unistd::close(duplicate).map_err(io::Error::from)?;
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_is_ports_times_addresses_capped_by_quota() {
        assert_eq!(relay_sockets_wanted(16_384, 2, 0), 32_768);
        assert_eq!(relay_sockets_wanted(16_384, 0, 0), 16_384);
        assert_eq!(relay_sockets_wanted(16_384, 2, 1_000), 2_000 + 2_048);
        assert_eq!(relay_sockets_wanted(100, 1, 1_000), 100);
    }

    /// Descriptor slots the kernel has allocated for this process (`FDSize` in /proc/self/status).
    fn table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let line = status.lines().find_map(|l| l.strip_prefix("FDSize:")).expect("FDSize");
        line.trim().parse().expect("number")
    }

    #[test]
    fn the_table_is_grown_and_the_limit_never_lowered() {
        use nix::sys::resource::{Resource, getrlimit};
        let (soft_before, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let budget = prepare(8_192).expect("prepare");
        assert!(budget.limit >= soft_before, "the limit was lowered: {budget:?}");
        assert_eq!(budget.reserved, 8_192.min(budget.limit));
        assert!(table_size() >= budget.reserved, "table {} < {budget:?}", table_size());
        // The duplicate was given back: a descriptor opened now still takes a low slot.
        let f = std::fs::File::open("/dev/null").expect("open");
        assert!(f.as_raw_fd() < 1_000);
    }
}
