//! The server under test as a child process: `reachly-ingest serve` (or the naive server),
//! started through `taskset` on the application CPU with its output in a log file, probed
//! until ready, measured from `/proc`, and stopped with SIGTERM (its exit status is part of
//! the verdict: the service must drain and exit 0). [`ServiceMetrics`] is what a step reads
//! from the service's Prometheus text on the admin listener.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::driver::{self, HttpClient};
use crate::pin;

pub struct ServerProcess {
    pub name: &'static str,
    child: Child,
    pub pid: u32,
    pub public: SocketAddr,
    /// The admin listener (`/metrics`, `/readyz`); the naive server has none.
    pub admin: Option<SocketAddr>,
    pub log: PathBuf,
}

/// How to start a server.
pub struct ServerSpec<'a> {
    pub name: &'static str,
    pub program: &'a Path,
    pub args: &'a [&'a str],
    pub env: &'a [(String, String)],
    pub cpu: usize,
    pub public: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts `program args...` pinned to `cpu`, with `env` added, output to `log`.
    pub fn spawn(spec: ServerSpec<'_>) -> anyhow::Result<ServerProcess> {
        let ServerSpec {
            name,
            program,
            args,
            env,
            cpu,
            public,
            admin,
            log,
        } = spec;
        if !program.is_file() {
            bail!(
                "{} not found at {} (run loadtest/run.sh, which builds it)",
                name,
                program.display()
            );
        }
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd: Command = pin::pinned_command(cpu, program);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id();
        // If this process dies without stopping the server (a signal, a crash), stop it.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -TERM {pid} 2>/dev/null",
                me = std::process::id()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        Ok(ServerProcess {
            name,
            child,
            pid,
            public,
            admin,
            log,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.public)
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        tail_without_backtrace(&std::fs::read_to_string(&self.log).unwrap_or_default(), 15)
    }

    /// Waits until `/readyz` (admin) or `/healthz` (public, naive server) answers 200.
    pub async fn wait_ready(
        &mut self,
        client: &HttpClient,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let url = match self.admin {
            Some(a) => format!("http://{a}/readyz"),
            None => format!("{}/healthz", self.base_url()),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                bail!(
                    "{} exited during start ({st}); log {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                );
            }
            if let Ok((200, _)) = driver::get(client, &url).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {timeout:?}; log {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then wait up to `timeout` (SIGKILL after that). The exit status.
    pub async fn stop(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(st) = self.exited() {
            return Ok(st);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let st = self.child.wait()?;
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM; killed ({st})",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a step reads from the service's `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceMetrics {
    /// `reachly_events_written_total`, by type.
    pub written: BTreeMap<String, f64>,
    pub buffer_events: f64,
    pub spool_bytes: f64,
    /// `reachly_events_dropped_total`, by reason.
    pub dropped: BTreeMap<String, f64>,
    /// Batches written (`reachly_flush_batch_size_count`) and their events (`_sum`).
    pub batches: f64,
    pub batch_events: f64,
    pub db_errors: f64,
    pub duplicates: f64,
    pub dead_lettered: f64,
    pub spooled: f64,
    pub replayed: f64,
    /// `reachly_http_connections{listener="public"}`: connections open on the public listener
    /// (`None` from a build that does not export it, such as main at 9e3c73a).
    pub connections: Option<f64>,
    /// `reachly_buffer_bytes`: the buffer's own estimate of its events' memory (`None` from a
    /// build without the byte bound, such as main at 9e3c73a).
    pub buffer_bytes: Option<f64>,
    /// `reachly_http_body_bytes_held`: request bodies held in memory now (`None` from a
    /// build that does not export it).
    pub body_bytes_held: Option<f64>,
}

impl ServiceMetrics {
    pub fn written_total(&self) -> f64 {
        self.written.values().fold(0.0, |a, b| a + b)
    }
    pub fn dropped_total(&self) -> f64 {
        self.dropped.values().fold(0.0, |a, b| a + b)
    }

    /// Adds another process's metrics (a deployment of several processes reads as one).
    pub fn add(&mut self, o: &ServiceMetrics) {
        for (k, v) in &o.written {
            *self.written.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        self.buffer_events += o.buffer_events;
        self.spool_bytes += o.spool_bytes;
        self.batches += o.batches;
        self.batch_events += o.batch_events;
        self.db_errors += o.db_errors;
        self.duplicates += o.duplicates;
        self.dead_lettered += o.dead_lettered;
        self.spooled += o.spooled;
        self.replayed += o.replayed;
        let sum = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
        self.connections = sum(self.connections, o.connections);
        self.buffer_bytes = sum(self.buffer_bytes, o.buffer_bytes);
        self.body_bytes_held = sum(self.body_bytes_held, o.body_bytes_held);
    }

    /// Parses the Prometheus text exposition.
    pub fn parse(text: &str) -> ServiceMetrics {
        let mut m = ServiceMetrics::default();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let label = |key: &str| -> String {
                labels
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k.trim() == key)
                    .map(|(_, v)| v.trim_matches('"').to_string())
                    .unwrap_or_default()
            };
            match name {
                "reachly_events_written_total" => *m.written.entry(label("type")).or_default() += v,
                "reachly_events_dropped_total" => {
                    *m.dropped.entry(label("reason")).or_default() += v
                }
                "reachly_buffer_events" => m.buffer_events = v,
                "reachly_spool_bytes" => m.spool_bytes = v,
                "reachly_flush_batch_size_count" => m.batches += v,
                "reachly_flush_batch_size_sum" => m.batch_events += v,
                "reachly_db_errors_total" => m.db_errors += v,
                "reachly_events_duplicate_total" => m.duplicates += v,
                "reachly_events_dead_lettered_total" => m.dead_lettered += v,
                "reachly_events_spooled_total" => m.spooled += v,
                "reachly_events_replayed_total" => m.replayed += v,
                "reachly_http_connections" if label("listener") == "public" => {
                    m.connections = Some(m.connections.unwrap_or(0.0) + v)
                }
                "reachly_buffer_bytes" => m.buffer_bytes = Some(v),
                "reachly_http_body_bytes_held" => m.body_bytes_held = Some(v),
                _ => {}
            }
        }
        m
    }

    pub async fn scrape(client: &HttpClient, admin: SocketAddr) -> anyhow::Result<ServiceMetrics> {
        let (status, body) = driver::get(client, &format!("http://{admin}/metrics")).await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(ServiceMetrics::parse(&body))
    }
}

/// The last `n` lines of a log that are not backtrace frames: an error printed with
/// `RUST_BACKTRACE` set ends in dozens of `  12: symbol` / `at file:line` lines, and a tail
/// of those hid the error itself when a server exited during start.
fn tail_without_backtrace(log: &str, n: usize) -> String {
    let frame = |l: &str| {
        let t = l.trim_start();
        t.starts_with("at ")
            || t.split_once(": ")
                .is_some_and(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
    };
    let lines: Vec<&str> = log.lines().filter(|l| !frame(l)).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logs_tail_leaves_out_backtrace_frames() {
        let log = "starting\nError: binding 127.0.0.1:9 failed\n\nStack backtrace:\n   0: anyhow::error\n             at /src/error.rs:1:2\n  27: main\n";
        assert_eq!(
            tail_without_backtrace(log, 3),
            "Error: binding 127.0.0.1:9 failed\n\nStack backtrace:"
        );
        assert_eq!(tail_without_backtrace("a\nb", 15), "a\nb");
        assert_eq!(tail_without_backtrace("", 15), "");
    }

    #[test]
    fn parses_the_exposition() {
        let text = "# HELP x\nreachly_events_written_total{type=\"opened\"} 10\n\
                    reachly_events_written_total{type=\"clicked\"} 5\n\
                    reachly_buffer_events 42\nreachly_spool_bytes 0\n\
                    reachly_flush_batch_size_bucket{le=\"10\"} 1\n\
                    reachly_flush_batch_size_sum 15\nreachly_flush_batch_size_count 2\n\
                    reachly_events_dropped_total{reason=\"spool_full\"} 3\n\
                    reachly_http_connections{listener=\"admin\"} 1\n\
                    reachly_http_connections{listener=\"public\"} 2048\n\
                    reachly_buffer_bytes 1048576\nreachly_http_body_bytes_held 65536\n";
        let m = ServiceMetrics::parse(text);
        assert_eq!(m.connections, Some(2048.0));
        assert_eq!(m.buffer_bytes, Some(1048576.0));
        assert_eq!(m.body_bytes_held, Some(65536.0));
        let old = ServiceMetrics::parse("reachly_buffer_events 1\n");
        assert_eq!(
            (old.connections, old.buffer_bytes, old.body_bytes_held),
            (None, None, None)
        );
        let mut two = m.clone();
        two.add(&m);
        assert_eq!(two.body_bytes_held, Some(131072.0));
        assert_eq!(m.written_total(), 15.0);
        assert_eq!(m.buffer_events, 42.0);
        assert_eq!(m.batches, 2.0);
        assert_eq!(m.batch_events, 15.0);
        assert_eq!(m.dropped_total(), 3.0);
    }
}
