//! A private PostgreSQL cluster driven through `initdb` and `pg_ctl`: the embedded database
//! of `reachly-ingest dev` and the throwaway cluster of the test suite. It listens on
//! 127.0.0.1 only (no Unix socket, so long paths do not matter). PostgreSQL refuses to run
//! as root, so when we are root every command runs as the `postgres` user (`runuser`) in a
//! directory it owns.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, bail};

/// What to tell a user whose machine lacks the server binaries.
pub const INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH, via pg_config, or under /usr/lib/postgresql/*/bin; install them, e.g. `apt-get install postgresql` on Debian/Ubuntu";

#[derive(Debug, Clone)]
pub struct PgCluster {
    pub data_dir: PathBuf,
    pub port: u16,
    bin_dir: PathBuf,
    as_postgres_user: bool,
}

/// Whether this process runs as root.
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Finds the directory holding `initdb` and `pg_ctl`.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH")
        && let Some(d) = std::env::split_paths(&path).find(|d| has_both(d))
    {
        return Ok(d);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_both(&d) {
            return Ok(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_both(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d).context(INSTALL_HINT)
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PgCluster {
    pub fn new(data_dir: impl Into<PathBuf>, port: u16) -> anyhow::Result<PgCluster> {
        Ok(PgCluster {
            data_dir: data_dir.into(),
            port,
            bin_dir: find_bin_dir()?,
            as_postgres_user: running_as_root(),
        })
    }

    pub fn is_initialized(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
    }

    fn command(&self, program: &str) -> Command {
        let bin = self.bin_dir.join(program);
        let mut c = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        // Own process group: a Ctrl-C in the terminal reaches the service, which drains into
        // the database before it stops the cluster, instead of reaching postgres directly.
        c.process_group(0);
        c
    }

    fn run(&self, mut cmd: Command, what: &str) -> anyhow::Result<Output> {
        let out = cmd.output().with_context(|| format!("running {what}"))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(out)
    }

    /// `initdb` (trust auth for local connections, UTF-8). `fast` skips fsync (tests).
    pub fn init(&self, fast: bool) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        if self.as_postgres_user {
            let out = Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(&self.data_dir)
                .output()?;
            if !out.status.success() {
                bail!(
                    "cannot give {} to the postgres user: {}",
                    self.data_dir.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let probe = Command::new("runuser")
                .args(["-u", "postgres", "--", "test", "-w"])
                .arg(&self.data_dir)
                .status()?;
            if !probe.success() {
                bail!(
                    "the postgres user cannot write {} (a parent directory is not traversable by it); run from a directory other users can enter, or set DATABASE_URL",
                    self.data_dir.display()
                );
            }
        }
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if fast {
            cmd.arg("--no-sync");
        }
        self.run(cmd, "initdb")?;
        Ok(())
    }

    /// Starts the server and waits until it accepts connections. `settings` are extra
    /// `-c name=value` options (tests turn fsync off).
    pub fn start(&self, settings: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''",
            self.port
        );
        for (k, v) in settings {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        let log = self.data_dir.join("server.log");
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        self.run(cmd, "pg_ctl start").map(|_| ()).map_err(|e| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            e.context(format!(
                "server log: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ))
        })
    }

    /// `fast` waits for clients to be cut off and a checkpoint; `immediate` is a crash.
    pub fn stop(&self, mode: &str) -> anyhow::Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t", "60", "-m", mode, "stop"]);
        self.run(cmd, "pg_ctl stop").map(|_| ())
    }

    pub fn is_running(&self) -> bool {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).arg("status");
        cmd.output().map(|o| o.status.success()).unwrap_or(false)
    }

    /// A shell command line that stops this cluster (for watchdogs that outlive us).
    pub fn stop_command_line(&self, mode: &str) -> String {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let base = format!(
            "'{}' -D '{}' -m {mode} stop",
            pg_ctl.display(),
            self.data_dir.display()
        );
        if self.as_postgres_user {
            format!("runuser -u postgres -- {base}")
        } else {
            base
        }
    }

    /// A throwaway cluster: initdb in `dir/data` on a free port (`fast`: no fsync during
    /// initdb), `prepare(data_dir)` (to add files such as certificates), start with
    /// `settings`, and a watchdog that stops it and removes `dir` once this process is gone.
    /// The one way tests, benchmarks and the load test make a cluster of their own.
    pub fn throwaway(
        dir: &Path,
        fast: bool,
        prepare: impl FnOnce(&Path) -> anyhow::Result<()>,
        settings: &[(&str, &str)],
    ) -> anyhow::Result<PgCluster> {
        let c = PgCluster::new(dir.join("data"), free_port()?)?;
        c.init(fast)?;
        prepare(&c.data_dir)?;
        c.watch_until_exit(Some(dir))?;
        c.start(settings)?;
        Ok(c)
    }

    /// Leaves a watchdog process that stops this cluster (immediate mode) once this process
    /// is gone, whatever way it ends, and then removes `remove` if given.
    pub fn watch_until_exit(&self, remove: Option<&Path>) -> anyhow::Result<()> {
        let cleanup = remove
            .map(|d| format!("; rm -rf '{}'", d.display()))
            .unwrap_or_default();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1{cleanup}",
            pid = std::process::id(),
            stop = self.stop_command_line("immediate"),
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the cluster watchdog")?;
        Ok(())
    }

    /// libpq-style connection string for `dbname`.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname} connect_timeout=10",
            self.port
        )
    }
}
