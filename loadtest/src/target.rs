//! What a phase's load is aimed at, seen as one server: a single process (`reachly-ingest
//! serve`, or the naive server), or the bus deployment (edges that take the traffic, writers
//! that consume the stream and write, and the NATS cluster between them). Probes read it as
//! one: CPU and memory summed over its processes, metrics summed over their admin listeners,
//! and, for the bus, the stream's backlog, so that a step's row means the same in both modes.

use std::process::ExitStatus;
use std::time::Duration;

use crate::driver::HttpClient;
use crate::nats::NatsCluster;
use crate::service::{ServerProcess, ServiceMetrics};

pub struct Target {
    pub name: &'static str,
    /// The processes the load generator sends to (round robin).
    front: Vec<ServerProcess>,
    /// Processes that take no traffic (the bus's writers).
    back: Vec<ServerProcess>,
    pub nats: Option<NatsCluster>,
}

impl Target {
    pub fn single(p: ServerProcess) -> Target {
        Target {
            name: p.name,
            front: vec![p],
            back: vec![],
            nats: None,
        }
    }

    pub fn bus(
        edges: Vec<ServerProcess>,
        writers: Vec<ServerProcess>,
        nats: NatsCluster,
    ) -> Target {
        Target {
            name: "bus",
            front: edges,
            back: writers,
            nats: Some(nats),
        }
    }

    pub fn is_bus(&self) -> bool {
        self.nats.is_some()
    }

    /// Base URLs of the processes that take traffic.
    pub fn bases(&self) -> Vec<String> {
        self.front.iter().map(|p| p.base_url()).collect()
    }

    fn procs(&self) -> impl Iterator<Item = &ServerProcess> {
        self.front.iter().chain(self.back.iter())
    }

    /// Every process on the service's side (NATS nodes included).
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.procs().map(|p| p.pid).collect();
        if let Some(n) = &self.nats {
            v.extend(n.pids());
        }
        v
    }

    /// Whether it has metrics (the naive server has none).
    pub fn has_metrics(&self) -> bool {
        self.procs().any(|p| p.admin.is_some())
    }

    /// Every process's metrics, summed; None if one could not be read.
    pub async fn metrics(&self, client: &HttpClient) -> Option<ServiceMetrics> {
        let mut sum = ServiceMetrics::default();
        let mut any = false;
        for p in self.procs() {
            if let Some(a) = p.admin {
                sum.add(&ServiceMetrics::scrape(client, a).await.ok()?);
                any = true;
            }
        }
        any.then_some(sum)
    }

    /// Messages the stream still holds (bus only).
    pub async fn backlog(&mut self) -> Option<u64> {
        match &mut self.nats {
            Some(n) => n.backlog().await.ok(),
            None => None,
        }
    }

    /// A description of the first process that exited, with where its log is.
    pub fn exited(&mut self) -> Option<String> {
        for p in self.front.iter_mut().chain(self.back.iter_mut()) {
            if let Some(st) = p.exited() {
                return Some(format!("{} exited ({st}); log {}", p.name, p.log.display()));
            }
        }
        self.nats.as_mut().and_then(|n| n.exited())
    }

    /// SIGTERM to every process (the front first: edges drain into the stream before the
    /// writers stop), each given `timeout`. Every exit status, by process name.
    pub async fn stop(self, timeout: Duration) -> anyhow::Result<Vec<(String, ExitStatus)>> {
        let mut out = Vec::new();
        for p in self.front.into_iter().chain(self.back) {
            let name = p.name.to_string();
            out.push((name, p.stop(timeout).await?));
        }
        drop(self.nats);
        Ok(out)
    }
}
