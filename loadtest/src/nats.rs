//! The bus of the load test's bus mode: a 3-node NATS JetStream cluster of real
//! `nats-server` processes on loopback (file storage under the work directory), pinned to
//! the application CPU like everything else on the service's side, so the bus mode gets the
//! same hardware as the single process. It answers one question for the run: how many
//! messages the stream still holds (work-queue retention: the writers' backlog).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::pin;

/// The stream the service creates (its default `REACHLY_BUS_STREAM`).
pub const STREAM: &str = "REACHLY_EVENTS";

/// The `nats-server` binary, or an error saying how to install it.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    for p in [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!(
        "nats-server not found: the bus mode needs it (`apt-get install nats-server`), or pass --skip-bus"
    )
}

pub struct NatsCluster {
    children: Vec<Child>,
    ports: Vec<u16>,
    client: Option<async_nats::Client>,
}

impl NatsCluster {
    /// Starts three clustered nodes pinned to `cpu`, and waits until JetStream answers.
    pub async fn start(dir: &Path, cpu: usize) -> anyhow::Result<NatsCluster> {
        let bin = server_binary()?;
        let dir = dir.join("nats");
        std::fs::create_dir_all(&dir)?;
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| {
                Ok((
                    reachly_ingest::pgcluster::free_port()?,
                    reachly_ingest::pgcluster::free_port()?,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
            .collect();
        let mut children = Vec::new();
        for (i, (port, cport)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\n\
                     jetstream {{ store_dir: \"{store}\", max_memory_store: 64MB, max_file_store: 4GB }}\n\
                     cluster {{ name: reachly-loadtest, listen: 127.0.0.1:{cport}, routes: [{routes}] }}\n",
                    store = dir.join(&name).display(),
                    routes = routes.join(", "),
                ),
            )?;
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let child = pin::pinned_command(cpu, &bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            // If this process dies without stopping it, stop it.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {pid} 2>/dev/null",
                    me = std::process::id(),
                    pid = child.id()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            children.push(child);
        }
        let mut c = NatsCluster {
            children,
            ports: ports.iter().map(|(p, _)| *p).collect(),
            client: None,
        };
        c.wait_jetstream(Duration::from_secs(60)).await?;
        Ok(c)
    }

    /// The URLs for `REACHLY_BUS_URL`.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    /// The name of a node that exited, if one did.
    pub fn exited(&mut self) -> Option<String> {
        self.children
            .iter_mut()
            .enumerate()
            .find_map(|(i, c)| match c.try_wait() {
                Ok(Some(st)) => Some(format!("nats-server n{} ({st})", i + 1)),
                _ => None,
            })
    }

    async fn client(&mut self) -> anyhow::Result<&async_nats::Client> {
        if self.client.is_none() {
            let addrs: Vec<async_nats::ServerAddr> = self
                .ports
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}").parse())
                .collect::<Result<_, _>>()?;
            let c = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(addrs)
                .await
                .context("connecting to the NATS cluster")?;
            self.client = Some(c);
        }
        Ok(self.client.as_ref().expect("set above"))
    }

    /// A raw JetStream API request (the typed account info of async-nats does not parse
    /// Debian's 2.9.10 answers; these raw ones need only a field or two).
    async fn api(&mut self, subject: String) -> anyhow::Result<serde_json::Value> {
        let client = self.client().await?.clone();
        let m = tokio::time::timeout(
            Duration::from_secs(3),
            client.request(subject.clone(), bytes::Bytes::new()),
        )
        .await
        .with_context(|| format!("{subject}: no answer"))??;
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        if let Some(e) = v.get("error") {
            bail!("{subject}: {e}");
        }
        Ok(v)
    }

    async fn wait_jetstream(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(dead) = self.exited() {
                bail!("{dead} exited during start");
            }
            match self.api("$JS.API.INFO".into()).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("JetStream not available after {timeout:?}: {e:#}")
                }
                Err(_) => {
                    // A failed connect is retried with a new client.
                    self.client = None;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Messages the stream holds (0 before the service created it).
    pub async fn backlog(&mut self) -> anyhow::Result<u64> {
        match self.api(format!("$JS.API.STREAM.INFO.{STREAM}")).await {
            Ok(v) => Ok(v["state"]["messages"].as_u64().unwrap_or(0)),
            Err(e) if format!("{e}").contains("not found") => Ok(0),
            Err(e) => Err(e),
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
