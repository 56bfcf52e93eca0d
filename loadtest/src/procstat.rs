//! CPU time and memory of processes, read from `/proc`: `utime + stime` of
//! `/proc/<pid>/stat` (clock ticks), `VmRSS`/`VmHWM` of `/proc/<pid>/status`. The database's
//! CPU is the sum over the postmaster and its live children, plus the postmaster's
//! `cutime + cstime`, which holds the time of every backend that already exited (the
//! postmaster reaps them), so short-lived connections are counted too.

use std::path::Path;

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux unless it says otherwise).
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The fields after `comm` of `/proc/<pid>/stat` (index 0 is field 3, `state`).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(
        rest.split_whitespace()
            .skip(1) // state
            .map(|f| f.parse::<i64>().map_or(0, |v| v.max(0) as u64))
            .collect(),
    )
}

// Offsets into `stat_fields` (field number - 4).
const PPID: usize = 0;
const UTIME: usize = 10;
const STIME: usize = 11;
const CUTIME: usize = 12;
const CSTIME: usize = 13;

/// `utime + stime` of one process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(UTIME)? + f.get(STIME)?)
}

/// `(busy, total)` clock ticks of one CPU since boot, from `/proc/stat` (busy = all but
/// idle and iowait): whatever ran there, our processes, other tenants' and the kernel's.
pub fn cpu_busy(cpu: usize) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{cpu}");
    let line = s
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest fields are inside user/nice).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Median latency of `n` 8 kB writes each followed by `fdatasync`, in a file under `dir`:
/// what a WAL flush costs on this disk.
pub fn fdatasync_micros(dir: &Path, n: usize) -> Option<f64> {
    use std::io::Write as _;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).ok()?;
    let block = [0x5au8; 8192];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        f.write_all(&block).ok()?;
        f.sync_data().ok()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = std::fs::remove_file(&path);
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied()
}

/// `(VmRSS, VmHWM)` in bytes.
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU ticks of a PostgreSQL server: postmaster (own and reaped children) plus live children.
pub fn postgres_cpu_ticks(postmaster: u32) -> Option<u64> {
    let pm = stat_fields(postmaster)?;
    let mut total = pm.get(UTIME)? + pm.get(STIME)? + pm.get(CUTIME)? + pm.get(CSTIME)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat_fields(pid)
            && f.get(PPID).copied() == Some(postmaster as u64)
        {
            total += f.get(UTIME).copied().unwrap_or(0) + f.get(STIME).copied().unwrap_or(0);
        }
    }
    Some(total)
}

/// The kinds of server process [`postgres_cpu_by_kind`] tells apart, in report order.
pub const PG_KINDS: [&str; 7] = [
    "client backends",
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum (running)",
    "exited (autovacuum workers, short connections)",
    "postmaster and other",
];

/// The kind of a live server process, from the title PostgreSQL gives it
/// (`/proc/<pid>/cmdline`, e.g. `postgres: checkpointer`, `postgres: user db 127.0.0.1(5432) idle`).
fn pg_kind(pid: u32) -> &'static str {
    let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let title = String::from_utf8_lossy(&title);
    kind_of_title(&title)
}

fn kind_of_title(title: &str) -> &'static str {
    let Some(rest) = title.trim_end_matches('\0').strip_prefix("postgres: ") else {
        return PG_KINDS[6];
    };
    // PostgreSQL 15 may prefix the cluster name: `postgres: 15/main: checkpointer`.
    let rest = match rest.split_once(": ") {
        Some((cluster, r)) if !cluster.contains(' ') => r,
        _ => rest,
    };
    let aux = [
        ("checkpointer", PG_KINDS[1]),
        ("background writer", PG_KINDS[2]),
        ("walwriter", PG_KINDS[3]),
        ("autovacuum", PG_KINDS[4]),
        ("logical replication", PG_KINDS[6]),
        ("archiver", PG_KINDS[6]),
        ("stats collector", PG_KINDS[6]),
        ("walsender", PG_KINDS[6]),
        ("walreceiver", PG_KINDS[6]),
        ("startup", PG_KINDS[6]),
    ];
    aux.iter()
        .find(|(prefix, _)| rest.starts_with(prefix))
        .map_or(PG_KINDS[0], |(_, kind)| kind)
}

/// CPU ticks of a PostgreSQL server by kind of process ([`PG_KINDS`]); the kinds add up to
/// [`postgres_cpu_ticks`]. Processes that exited (autovacuum workers, short connections) are
/// known only through the postmaster's `cutime + cstime`, hence their kind of their own.
pub fn postgres_cpu_by_kind(postmaster: u32) -> Option<[u64; 7]> {
    let pm = stat_fields(postmaster)?;
    let mut by = [0u64; 7];
    by[5] = pm.get(CUTIME)? + pm.get(CSTIME)?;
    by[6] = pm.get(UTIME)? + pm.get(STIME)?;
    for pid in children(postmaster) {
        let Some(ticks) = cpu_ticks(pid) else {
            continue;
        };
        let kind = pg_kind(pid);
        let i = PG_KINDS.iter().position(|k| *k == kind).unwrap_or(6);
        by[i] += ticks;
    }
    Some(by)
}

/// The postmaster's pid from `postmaster.pid` in the data directory.
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The live children of `parent`.
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| stat_fields(*pid).and_then(|f| f.get(PPID).copied()) == Some(parent as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_processes_are_told_apart_by_their_title() {
        assert_eq!(kind_of_title("postgres: checkpointer \0"), "checkpointer");
        assert_eq!(kind_of_title("postgres: 15/main: walwriter "), "walwriter");
        assert_eq!(
            kind_of_title("postgres: background writer "),
            "background writer"
        );
        assert_eq!(
            kind_of_title("postgres: autovacuum worker loadtest"),
            "autovacuum (running)"
        );
        assert_eq!(
            kind_of_title("postgres: postgres loadtest 127.0.0.1(41234) COPY"),
            "client backends"
        );
        assert_eq!(
            kind_of_title("postgres: logical replication launcher "),
            "postmaster and other"
        );
        assert_eq!(
            kind_of_title("/usr/lib/postgresql/15/bin/postgres -D /data"),
            "postmaster and other"
        );
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        let (rss, hwm) = memory(me).expect("status");
        assert!(rss > 0 && hwm >= rss);
    }
}
