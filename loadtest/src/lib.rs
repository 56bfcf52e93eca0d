//! reachly-loadtest: the end-to-end load test of reachly-ingest.
//!
//! One command (`loadtest/run.sh full|smoke`, which builds and runs the `reachly-loadtest`
//! binary) starts a throwaway PostgreSQL shaped like an Azure Database for PostgreSQL
//! Flexible Server B1ms and pinned to one CPU, seeds a multi-tenant data set, starts the
//! release build of `reachly-ingest serve` on the other CPU together with an open-loop load
//! generator, and steps the arrival rate up until the service or the database saturates. It
//! then measures two references against the same database shape (a naive
//! one-INSERT-per-request server and a plain bulk COPY), checks that every accepted event is
//! stored exactly once, and writes a Markdown report and a chart.
//!
//! Modules, in the order a run uses them:
//! - [`pin`]: CPU pinning with `taskset`;
//! - [`procstat`]: CPU time and memory of processes from `/proc`;
//! - [`cluster`]: the B1ms-shaped PostgreSQL cluster and its statistics;
//! - [`seed`]: the tenant mix, written with COPY, and the reset between phases;
//! - [`workload`]: the request mix (pixels, clicks, signed SendGrid and Mailgun webhooks);
//! - [`driver`]: the open-loop HTTP driver and its latency histograms;
//! - [`service`]: the `reachly-ingest serve` (or naive server) process and its metrics;
//! - [`nats`]: the bus mode's 3-node NATS JetStream cluster and its stream's backlog;
//! - [`target`]: what the load is aimed at, read as one server (one process, or the bus
//!   mode's edges, writers and NATS);
//! - [`verify`]: the exactly-once check against the database;
//! - [`limit`]: the bulk-COPY reference;
//! - [`pagewrites`]: data-page writes attributed to relations (`pg_buffercache` samples);
//! - [`report`]: step rows, the B1ms projection, the Markdown report and the chart;
//! - [`run`]: the phases of a full run and of the smoke.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod driver;
pub mod limit;
pub mod nats;
pub mod pagewrites;
pub mod pin;
pub mod procstat;
pub mod report;
pub mod run;
pub mod seed;
pub mod service;
pub mod target;
pub mod verify;
pub mod workload;
