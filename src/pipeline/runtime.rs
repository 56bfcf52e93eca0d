//! The pipeline's own tokio runtime, for the work no request waits on at the moment it runs:
//! the batch writers (or, with a bus, the publisher and the consumers), the spool replayer,
//! and the parsing of large webhook bodies ([`crate::pipeline::Ingest::spawn_blocking`]).
//!
//! Why a runtime of its own: on the request path's runtime a writer encoding a batch of
//! thousands of rows holds a worker thread for milliseconds, and tokio cannot preempt a
//! task; every pixel and click queued on that worker waits (with one CPU, as in a 1-vCPU
//! container or the load test, there is only one worker). On threads of their own the
//! kernel preempts that work when a request arrives, and at a lower CPU priority
//! (`REACHLY_BACKGROUND_NICE`, added to the process's nice value per thread) it also yields
//! the CPU to the request path when both want it. Throughput is not given up: the writers
//! need a small share of a core (a few % of the service's CPU at the load test's sustained
//! rate), far below what a nice value of 5 still guarantees them (a third of a contended
//! core against a request thread), and an idle CPU runs them at full speed.
//!
//! The threads: `min(REACHLY_WRITERS, CPUs)` workers named `reachly-bg`, and tokio's
//! blocking pool of this runtime (the writers' spool file I/O, the large parses), all niced.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::runtime::{Handle, Runtime};

/// The pipeline's runtime; shut down without waiting when dropped (its tasks are joined
/// before, by [`crate::pipeline::Pipeline::shutdown`]).
pub struct BackgroundRuntime {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl BackgroundRuntime {
    /// `workers` worker threads (at least one), each of them and each blocking thread
    /// `nice` steps below the process's priority (0: the same priority, own threads still).
    pub fn new(workers: usize, nice: i32) -> io::Result<BackgroundRuntime> {
        let warned = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("reachly-bg")
            .on_thread_start(move || {
                if let Err(e) = lower_this_threads_priority(nice)
                    && !warned.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(
                        error = %e,
                        nice,
                        "could not lower the background threads' CPU priority; they run at the request path's"
                    );
                }
            })
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(BackgroundRuntime {
            runtime: Some(runtime),
            handle,
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        // `Runtime`'s own drop blocks, which panics inside another runtime's task.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Adds `nice` to the calling thread's nice value (Linux: a thread's own; at most 19).
/// Lowering one's own priority needs no privilege.
pub fn lower_this_threads_priority(nice: i32) -> io::Result<()> {
    if nice <= 0 {
        return Ok(());
    }
    let tid = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(tid))?;
    rustix::process::setpriority_process(Some(tid), (now + nice).min(19))?;
    Ok(())
}

/// The calling thread's nice value.
pub fn this_threads_nice() -> io::Result<i32> {
    Ok(rustix::process::getpriority_process(Some(
        rustix::thread::gettid(),
    ))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtimes_workers_and_blocking_threads_run_at_the_lowered_priority() {
        let base = this_threads_nice().unwrap();
        let bg = BackgroundRuntime::new(1, 5).unwrap();
        let expected = (base + 5).min(19);
        let worker = bg
            .handle()
            .block_on(async { tokio::spawn(async { this_threads_nice().unwrap() }).await })
            .unwrap();
        let blocking = bg
            .handle()
            .block_on(bg.handle().spawn_blocking(|| {
                (
                    this_threads_nice().unwrap(),
                    std::thread::current().name().map(str::to_owned),
                )
            }))
            .unwrap();
        assert_eq!(worker, expected);
        assert_eq!(blocking, (expected, Some("reachly-bg".to_owned())));
        // The caller's own priority is untouched.
        assert_eq!(this_threads_nice().unwrap(), base);
    }

    #[test]
    fn nice_zero_leaves_the_priority_alone() {
        let base = this_threads_nice().unwrap();
        let bg = BackgroundRuntime::new(2, 0).unwrap();
        let n = bg
            .handle()
            .block_on(bg.handle().spawn_blocking(|| this_threads_nice().unwrap()))
            .unwrap();
        assert_eq!(n, base);
    }
}
