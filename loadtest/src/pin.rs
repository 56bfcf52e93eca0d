//! CPU pinning with `taskset` (util-linux): the database runs on one CPU, the service (or
//! the naive server) and the load generator share the other, as on a 2-core machine where
//! the database stands in for a 1-vCore server. Pinning an existing process uses
//! `taskset -a -p`, which covers all its threads; processes it forks later inherit it.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Fails with an actionable message when `taskset` is missing.
pub fn require_taskset() -> anyhow::Result<()> {
    match Command::new("taskset").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!(
            "taskset --version failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(_) => {
            bail!("taskset not found: install util-linux (e.g. `apt-get install util-linux`)")
        }
    }
}

/// CPUs this machine has online (not only those this process may use).
pub fn online_cpus() -> usize {
    let parse = |s: &str| -> Option<usize> {
        let mut n = 0;
        for part in s.trim().split(',') {
            match part.split_once('-') {
                Some((a, b)) => n += b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1,
                None => {
                    part.parse::<usize>().ok()?;
                    n += 1;
                }
            }
        }
        Some(n)
    };
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse(&s))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Pins every thread of `pid` to `cpu`.
pub fn pin_pid(pid: u32, cpu: usize) -> anyhow::Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .context("running taskset (install util-linux)")?;
    if !out.status.success() {
        bail!(
            "taskset -a -p -c {cpu} {pid} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A command that runs `program` pinned to `cpu`.
pub fn pinned_command(cpu: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", &cpu.to_string()]).arg(program);
    c
}
