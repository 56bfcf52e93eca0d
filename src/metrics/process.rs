//! Process metrics read from `/proc/self` at render time: CPU seconds, resident and virtual
//! memory, open and maximum file descriptors, threads and start time, under the
//! `reachly_process_` prefix (SPEC.md: every name is `reachly_`-prefixed; the rest of each
//! name is the Prometheus client libraries' standard one).
//!
//! Read here rather than through the `metrics-process` crate: that crate records CPU time
//! through a `u64` counter (whole seconds, useless for `rate()` over a minute) and brings
//! procfs, rustix and a Windows crate family into the lock file; these are five small files
//! of text. CPU ticks are in USER_HZ, which Linux fixes at 100 for userspace on every
//! architecture this service is built for. Elsewhere (no `/proc`) nothing is rendered.

use std::fmt::Write as _;

/// Linux reports process CPU times in USER_HZ ticks (100 per second for userspace).
const USER_HZ: f64 = 100.0;

/// What `/proc` says about this process; `None` for whatever could not be read.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub threads: Option<f64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
}

pub(super) fn read() -> ProcessStats {
    let file = |p: &str| std::fs::read_to_string(p).ok();
    let mut s = ProcessStats::default();
    if let Some(stat) = file("/proc/self/stat") {
        let (cpu, start_ticks) = parse_stat(&stat);
        s.cpu_seconds = cpu;
        let boot = file("/proc/stat").and_then(|t| parse_btime(&t));
        s.start_time_seconds = start_ticks
            .zip(boot)
            .map(|(ticks, boot)| boot + ticks / USER_HZ);
    }
    if let Some(status) = file("/proc/self/status") {
        let kb = |key: &str| status_field(&status, key).map(|v| v * 1024.0);
        s.resident_bytes = kb("VmRSS:");
        s.virtual_bytes = kb("VmSize:");
        s.threads = status_field(&status, "Threads:");
    }
    s.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as f64);
    s.max_fds = file("/proc/self/limits").and_then(|l| parse_max_open_files(&l));
    s
}

/// CPU time (user + system) of this process so far, in seconds; `None` without `/proc`.
pub fn cpu_seconds() -> Option<f64> {
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?).0
}

/// `(utime + stime in seconds, starttime in ticks since boot)` from `/proc/self/stat`.
fn parse_stat(stat: &str) -> (Option<f64>, Option<f64>) {
    // The command name (field 2) may hold spaces and parentheses: fields restart after the
    // last ')'. There, index 0 is field 3 (state); utime is field 14, stime 15, starttime 22.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (None, None);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    let cpu = num(11).zip(num(12)).map(|(u, s)| (u + s) / USER_HZ);
    (cpu, num(19))
}

fn parse_btime(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A numeric field of `/proc/self/status` (`VmRSS:   1234 kB` gives 1234).
fn status_field(status: &str, key: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn parse_max_open_files(limits: &str) -> Option<f64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Appends the process families to a Prometheus text exposition.
pub(super) fn render(out: &mut String) {
    render_stats(&read(), out);
}

fn render_stats(s: &ProcessStats, out: &mut String) {
    let families: [(&str, &str, &str, Option<f64>); 7] = [
        (
            "reachly_process_cpu_seconds_total",
            "counter",
            "User and system CPU time of this process, in seconds.",
            s.cpu_seconds,
        ),
        (
            "reachly_process_resident_memory_bytes",
            "gauge",
            "Resident memory of this process, in bytes.",
            s.resident_bytes,
        ),
        (
            "reachly_process_virtual_memory_bytes",
            "gauge",
            "Virtual memory of this process, in bytes.",
            s.virtual_bytes,
        ),
        (
            "reachly_process_threads",
            "gauge",
            "OS threads of this process.",
            s.threads,
        ),
        (
            "reachly_process_start_time_seconds",
            "gauge",
            "Start time of this process, in seconds since the Unix epoch.",
            s.start_time_seconds,
        ),
        (
            "reachly_process_open_fds",
            "gauge",
            "Open file descriptors of this process.",
            s.open_fds,
        ),
        (
            "reachly_process_max_fds",
            "gauge",
            "Limit (soft) of open file descriptors of this process.",
            s.max_fds,
        ),
    ];
    for (name, kind, help, value) in families {
        if let Some(v) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_found_after_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 7 0 12345 1000000 500 18446744073709551615";
        let (cpu, start) = parse_stat(stat);
        assert_eq!(cpu, Some(3.0));
        assert_eq!(start, Some(12345.0));
        assert_eq!(parse_stat("garbage"), (None, None));
    }

    #[test]
    fn status_limits_and_btime_parse() {
        let status = "Name:\tx\nVmSize:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t9\n";
        assert_eq!(status_field(status, "VmRSS:"), Some(1024.0));
        assert_eq!(status_field(status, "Threads:"), Some(9.0));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024.0));
        assert_eq!(parse_btime("cpu 1 2\nbtime 1700000000\n"), Some(1.7e9));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reports_plausible_figures() {
        let s = read();
        let now = chrono::Utc::now().timestamp() as f64;
        assert!(s.resident_bytes.is_some_and(|r| r > 1e6), "{s:?}");
        assert!(s.threads.is_some_and(|t| t >= 1.0), "{s:?}");
        assert!(s.open_fds.is_some_and(|f| f >= 3.0), "{s:?}");
        assert!(
            s.start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > now - 86_400.0 * 365.0),
            "{s:?}"
        );
        let mut text = String::new();
        render_stats(&s, &mut text);
        assert!(text.contains("# TYPE reachly_process_cpu_seconds_total counter\n"));
    }
}
