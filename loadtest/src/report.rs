//! Step rows, the saturation rule, the projection onto a real B1ms, and the outputs: one
//! console line per step, the Markdown report and (feature `chart`) a PNG chart.
//!
//! Projection onto a B1ms (1 vCore with a 20% baseline and burst credits, disk capped at
//! 640 IOPS and 10 MiB/s), from what a step measured per committed event:
//! - WAL bandwidth: `10 MiB/s / (WAL bytes per event)`;
//! - IOPS: `640 / (I/Os per event)`, I/Os = WAL fsyncs (`pg_stat_wal.wal_sync`; each commit
//!   needs at least one, so events per commit is what makes this small) + data pages written
//!   (checkpointer, background writer, backends);
//! - CPU: `1 / (database CPU-seconds per event)` at 100% of the vCore (bursting) and 20% of
//!   that at the baseline;
//!
//! and the ceiling is the least of them (with the CPU term at burst, and at baseline).

use std::fmt::Write as _;

use serde::Serialize;

use crate::workload::Route;

/// Azure B1ms limits (Compute options in Azure Database for PostgreSQL).
pub const B1MS_IOPS: f64 = 640.0;
pub const B1MS_BYTES_PER_S: f64 = 10.0 * 1024.0 * 1024.0;
pub const B1MS_BASELINE_CPU: f64 = 0.20;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Projection {
    pub wal_limit: f64,
    pub iops_limit: f64,
    pub cpu_burst_limit: f64,
    pub cpu_baseline_limit: f64,
}

impl Projection {
    pub fn from_costs(wal_bytes: f64, ios: f64, cpu_s: f64) -> Projection {
        let per = |budget: f64, cost: f64| {
            if cost > 0.0 {
                budget / cost
            } else {
                f64::INFINITY
            }
        };
        Projection {
            wal_limit: per(B1MS_BYTES_PER_S, wal_bytes),
            iops_limit: per(B1MS_IOPS, ios),
            cpu_burst_limit: per(1.0, cpu_s),
            cpu_baseline_limit: per(B1MS_BASELINE_CPU, cpu_s),
        }
    }
    pub fn burst(&self) -> f64 {
        self.wal_limit
            .min(self.iops_limit)
            .min(self.cpu_burst_limit)
    }
    pub fn baseline(&self) -> f64 {
        self.wal_limit
            .min(self.iops_limit)
            .min(self.cpu_baseline_limit)
    }
    /// Which term binds at burst.
    pub fn binding(&self) -> &'static str {
        let b = self.burst();
        if b == self.wal_limit {
            "WAL bandwidth"
        } else if b == self.iops_limit {
            "IOPS"
        } else {
            "CPU"
        }
    }
}

/// One measured step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepRow {
    pub phase: String,
    pub offered: f64,
    pub achieved: f64,
    pub requests: u64,
    /// Requests with an unexpected status or no answer.
    pub failures: u64,
    /// Per route (pixel, click, sendgrid, mailgun): p50, p99, p99.9 in ms.
    pub latency: [[Option<f64>; 3]; 4],
    /// Events acknowledged to the clients per second.
    pub acked_per_s: f64,
    /// Events committed per second (service: `reachly_events_written_total`; naive: its
    /// acknowledged events, each committed before the answer).
    pub committed_per_s: f64,
    pub events_per_commit: Option<f64>,
    pub buffer_end: Option<f64>,
    pub spool_end: Option<f64>,
    /// Events the service wrote to its disk spool during the step (memory full or the
    /// database away: `reachly_events_spooled_total`) and events it replayed from there into
    /// the database (`reachly_events_replayed_total`).
    pub spooled: Option<f64>,
    pub replayed: Option<f64>,
    /// Connections open on the service's public listener when the step's schedule ended
    /// (each holds hyper's read and write buffers: part of RSS under overload).
    pub connections_end: Option<f64>,
    /// CPU in % of one core.
    pub server_cpu: f64,
    pub server_rss_mb: f64,
    pub server_hwm_mb: f64,
    pub generator_cpu: f64,
    pub db_cpu: f64,
    pub wal_bytes_per_event: Option<f64>,
    /// Full-page images written to the WAL per event (`pg_stat_wal.wal_fpi`): the first change
    /// to a page after a checkpoint logs the whole page (compressed, with `wal_compression`).
    pub fpi_per_event: Option<f64>,
    pub fsyncs_per_event: Option<f64>,
    pub page_writes_per_event: Option<f64>,
    pub db_cpu_us_per_event: Option<f64>,
    /// The same by kind of server process ([`crate::procstat::PG_KINDS`]).
    pub db_cpu_by_kind: Option<[f64; 7]>,
    pub commits_per_s: f64,
    /// Busy share (%) of the database's CPU and of the application's CPU, whoever used it.
    pub db_core_busy: f64,
    pub app_core_busy: f64,
    pub saturated: Option<String>,
    /// Set when something else on the machine took a large share of a core during the step.
    pub contended: Option<String>,
    pub projection: Option<Projection>,
    /// The server's memory at its highest point in the step (`None` for rows not measured
    /// as a step, such as the limit's).
    pub memory_peak: Option<MemoryPeak>,
}

/// Where a step's RSS peak was (goal 4 of issue 14: RSS under 150 MB at every step): RSS,
/// summed over the server's processes, is read from `/proc` every 250 ms through the step's
/// schedule, and every fourth read also scrapes the service's metrics, so the peak's own
/// size and moment come from the 250 ms reads and what the memory held near it from the
/// scraped read with the highest RSS. (A step's end row gives RSS at the end and the
/// process's high-water mark, which says how high but not when or with what.)
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MemoryPeak {
    /// Highest RSS of the 250 ms reads (MB) and its time into the step (s).
    pub rss_mb: f64,
    pub at_s: f64,
    /// Reads taken.
    pub reads: u32,
    /// The scraped read with the highest RSS (`None` when the server has no metrics).
    pub scraped: Option<MemorySample>,
}

/// One RSS read with the service's memory-holding gauges scraped beside it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MemorySample {
    pub rss_mb: f64,
    pub at_s: f64,
    pub buffer_events: f64,
    /// `reachly_buffer_bytes` (the buffer's estimate of its events' memory), MB.
    pub buffer_mb: Option<f64>,
    /// `reachly_http_body_bytes_held`, MB.
    pub bodies_mb: Option<f64>,
    /// Open connections on the public listener.
    pub connections: Option<f64>,
}

/// The step rows' memory peaks as a Markdown table; empty when no row has one.
pub fn memory_table(rows: &[StepRow]) -> String {
    if rows.iter().all(|r| r.memory_peak.is_none()) {
        return String::new();
    }
    let mut s = String::from(
        "\nServer memory at each step's peak: RSS read every 250 ms through the schedule, the service's metrics scraped with every fourth read; \
         the right-hand columns are the scraped read with the highest RSS (the rest is RSS less the buffer's estimate and the bodies: \
         the process's base, connections' buffers and the allocator's retained pages).\n\n\
         | step | peak RSS MB (s into the step) | scraped read: RSS MB (s) | buffered events | buffer MB (estimate) | bodies held MB | open connections | rest MB |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mb = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for row in rows {
        let Some(m) = &row.memory_peak else { continue };
        let _ = write!(s, "| {} | {:.0} ({:.1}) |", row.phase, m.rss_mb, m.at_s);
        match &m.scraped {
            Some(x) => {
                let rest = x.rss_mb - x.buffer_mb.unwrap_or(0.0) - x.bodies_mb.unwrap_or(0.0);
                let _ = writeln!(
                    s,
                    " {:.0} ({:.1}) | {} | {} | {} | {} | {:.0} |",
                    x.rss_mb,
                    x.at_s,
                    fmt_num(x.buffer_events),
                    mb(x.buffer_mb),
                    mb(x.bodies_mb),
                    x.connections.map_or("-".to_string(), fmt_num),
                    rest
                );
            }
            None => s.push_str(" - | - | - | - | - | - |\n"),
        }
    }
    s
}

/// Share of a core used by something other than the measured processes above which a step
/// is marked as contended.
pub const CONTENDED_PCT: f64 = 20.0;

impl StepRow {
    /// CPU (%) of the database core and of the application core not used by the measured
    /// processes: other tenants of the machine, kernel threads, interrupts.
    pub fn unaccounted(&self) -> (f64, f64) {
        (
            (self.db_core_busy - self.db_cpu).max(0.0),
            (self.app_core_busy - self.server_cpu - self.generator_cpu).max(0.0),
        )
    }

    /// Marks the step as contended when something else took a large share of a core.
    pub fn mark_contention(&mut self) {
        let (db, app) = self.unaccounted();
        let mut parts = Vec::new();
        if db > CONTENDED_PCT {
            parts.push(format!("{db:.0}% of the database core"));
        }
        if app > CONTENDED_PCT {
            parts.push(format!("{app:.0}% of the application core"));
        }
        self.contended = (!parts.is_empty())
            .then(|| format!("contended: other processes used {}", parts.join(" and ")));
    }

    pub fn p(&self, r: Route, q: usize) -> Option<f64> {
        self.latency[r.index()][q]
    }
    /// Worst p99 of the tracking routes.
    pub fn tracking_p99(&self) -> Option<f64> {
        match (self.p(Route::Pixel, 1), self.p(Route::Click, 1)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn console(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".into(), fmt_ms);
        let mut s = format!(
            "[{}] offered {:>6.0}/s achieved {:>6.0}/s | p50/p99/p99.9 ms pixel {}/{}/{} click {}/{}/{}",
            self.phase,
            self.offered,
            self.achieved,
            ms(self.p(Route::Pixel, 0)),
            ms(self.p(Route::Pixel, 1)),
            ms(self.p(Route::Pixel, 2)),
            ms(self.p(Route::Click, 0)),
            ms(self.p(Route::Click, 1)),
            ms(self.p(Route::Click, 2)),
        );
        for r in [Route::Sendgrid, Route::Mailgun] {
            if self.p(r, 1).is_some() {
                let _ = write!(s, " {} {}/{}", r.name(), ms(self.p(r, 0)), ms(self.p(r, 1)));
            }
        }
        let _ = write!(
            s,
            " | committed {:.0} ev/s ({}/commit) buffer {} spool {} (spooled {} replayed {}) conns {} | cpu server {:.0}% db {:.0}% gen {:.0}% rss {:.0} MB | WAL {} B/ev ({} FPI/ev), {} fsync/ev, {} us db-cpu/ev",
            self.committed_per_s,
            self.events_per_commit
                .map_or("-".into(), |v| format!("{v:.0}")),
            self.buffer_end.map_or("-".into(), |v| format!("{v:.0}")),
            self.spool_end.map_or("-".into(), |v| format!("{v:.0}")),
            self.spooled.map_or("-".into(), |v| format!("{v:.0}")),
            self.replayed.map_or("-".into(), |v| format!("{v:.0}")),
            self.connections_end
                .map_or("-".into(), |v| format!("{v:.0}")),
            self.server_cpu,
            self.db_cpu,
            self.generator_cpu,
            self.server_rss_mb,
            opt(self.wal_bytes_per_event, 0),
            opt(self.fpi_per_event, 3),
            opt(self.fsyncs_per_event, 4),
            opt(self.db_cpu_us_per_event, 1),
        );
        let _ = write!(
            s,
            " | core busy: db {:.0}% app {:.0}% | pages {}/ev",
            self.db_core_busy,
            self.app_core_busy,
            opt(self.page_writes_per_event, 4)
        );
        if let Some(p) = &self.projection {
            let _ = write!(
                s,
                " | B1ms ceiling (this step's counters) {} ev/s burst, {} baseline",
                fmt_num(p.burst()),
                fmt_num(p.baseline())
            );
        }
        if let Some(c) = &self.contended {
            let _ = write!(s, " | {c}");
        }
        if let Some(why) = &self.saturated {
            let _ = write!(s, " | SATURATED: {why}");
        }
        s
    }
}

pub fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "unbounded".into();
    }
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Sets every row's projection from its own WAL, fsync and CPU costs and the phase's data
/// page writes per event (a step rarely contains a whole checkpoint cycle, so the phase's
/// average, final CHECKPOINT included, stands for the steady state).
pub fn apply_phase_pages(rows: &mut [StepRow], pages_per_event: Option<f64>) {
    for row in rows {
        let pages = pages_per_event.or(row.page_writes_per_event).unwrap_or(0.0);
        row.projection = match (
            row.wal_bytes_per_event,
            row.fsyncs_per_event,
            row.db_cpu_us_per_event,
        ) {
            (Some(w), Some(f), Some(c)) => Some(Projection::from_costs(w, f + pages, c * 1e-6)),
            _ => None,
        };
    }
}

/// The saturation rule of a step.
#[derive(Debug, Clone)]
pub struct SaturationRule {
    /// Achieved below this share of offered.
    pub min_achieved: f64,
    /// Tracking p99 above this (ms).
    pub max_p99_ms: f64,
}

impl SaturationRule {
    /// `Some(reason)` when the step saturated. `accepted_events` are the events the server
    /// acknowledged during the step (buffer growth is judged against them).
    pub fn judge(
        &self,
        row: &StepRow,
        buffer_start: Option<f64>,
        accepted_events: f64,
    ) -> Option<String> {
        let mut why = Vec::new();
        if row.achieved < self.min_achieved * row.offered {
            why.push(format!(
                "achieved {:.0}/s < {:.0}% of offered",
                row.achieved,
                self.min_achieved * 100.0
            ));
        }
        if let Some(p99) = row.tracking_p99()
            && p99 > self.max_p99_ms
        {
            why.push(format!(
                "tracking p99 {} ms > {} ms",
                fmt_ms(p99),
                self.max_p99_ms
            ));
        }
        if let (Some(end), Some(start)) = (row.buffer_end, buffer_start) {
            let grew = end - start;
            if end > 10_000.0 && grew > 0.05 * accepted_events {
                why.push(format!("buffer grew by {grew:.0} events to {end:.0}"));
            }
        }
        if row.spool_end.is_some_and(|s| s > 0.0) {
            why.push(format!(
                "spool holds {:.0} bytes",
                row.spool_end.unwrap_or(0.0)
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// Markdown table of steps.
pub fn steps_table(rows: &[StepRow], service_columns: bool) -> String {
    let mut s = String::new();
    let routes: Vec<Route> = Route::ALL
        .into_iter()
        .filter(|r| rows.iter().any(|row| row.p(*r, 1).is_some()))
        .collect();
    s.push_str("| step | offered req/s | achieved req/s |");
    for r in &routes {
        let _ = write!(s, " {} p50 / p99 / p99.9 ms |", r.name());
    }
    s.push_str(" committed ev/s |");
    if service_columns {
        s.push_str(
            " ev/commit | buffer end | spool end (B) | events spooled / replayed | open connections at end |",
        );
    }
    s.push_str(" app core busy (server + generator) | server RSS MB | DB CPU (db core busy) | WAL B/ev (full-page images/ev) | fsync/ev | pages/ev | DB CPU us/ev | B1ms ceiling ev/s (burst / baseline) | saturated (and contention) |\n|");
    let cols = 3 + routes.len() + 1 + if service_columns { 5 } else { 0 } + 9;
    for _ in 0..cols {
        s.push_str(" --- |");
    }
    s.push('\n');
    for row in rows {
        let ms = |v: Option<f64>| v.map_or("-".into(), fmt_ms);
        let _ = write!(
            s,
            "| {} | {} | {} |",
            row.phase,
            fmt_num(row.offered),
            fmt_num(row.achieved)
        );
        for r in &routes {
            let _ = write!(
                s,
                " {} / {} / {} |",
                ms(row.p(*r, 0)),
                ms(row.p(*r, 1)),
                ms(row.p(*r, 2))
            );
        }
        let _ = write!(s, " {} |", fmt_num(row.committed_per_s));
        if service_columns {
            let _ = write!(
                s,
                " {} | {} | {} | {} / {} | {} |",
                opt(row.events_per_commit, 0),
                row.buffer_end.map_or("-".into(), fmt_num),
                row.spool_end.map_or("-".into(), fmt_num),
                row.spooled.map_or("-".into(), fmt_num),
                row.replayed.map_or("-".into(), fmt_num),
                row.connections_end.map_or("-".into(), fmt_num)
            );
        }
        let _ = writeln!(
            s,
            " {:.0}% ({:.0}% + {:.0}%) | {:.0} | {:.0}% ({:.0}%) | {} ({}) | {} | {} | {} | {} | {} |",
            row.app_core_busy,
            row.server_cpu,
            row.generator_cpu,
            row.server_rss_mb,
            row.db_cpu,
            row.db_core_busy,
            opt(row.wal_bytes_per_event, 0),
            opt(row.fpi_per_event, 3),
            opt(row.fsyncs_per_event, 4),
            opt(row.page_writes_per_event, 4),
            opt(row.db_cpu_us_per_event, 1),
            row.projection.map_or("-".into(), |p| format!(
                "{} / {}",
                fmt_num(p.burst()),
                fmt_num(p.baseline())
            )),
            match (&row.saturated, &row.contended) {
                (Some(w), Some(c)) => format!("{w}; {c}"),
                (Some(w), None) => w.clone(),
                (None, Some(c)) => format!("no ({c})"),
                (None, None) => "no".into(),
            },
        );
    }
    s
}

pub fn projection_table(p: &Projection, wal: f64, ios: f64, cpu_us: f64) -> String {
    format!(
        "| term | measured cost per event | B1ms budget | events/s |\n| --- | --- | --- | --- |\n\
         | WAL bandwidth | {wal:.0} bytes of WAL | 10 MiB/s | {} |\n\
         | IOPS | {ios:.4} I/Os (WAL fsyncs + data page writes) | 640 IOPS | {} |\n\
         | CPU, bursting | {cpu_us:.1} us of database CPU | 1 vCore at 100% | {} |\n\
         | CPU, baseline | {cpu_us:.1} us of database CPU | 1 vCore at 20% | {} |\n\
         | **ceiling, bursting** | | | **{}** ({} binds) |\n\
         | **ceiling, at baseline** | | | **{}** |\n",
        fmt_num(p.wal_limit),
        fmt_num(p.iops_limit),
        fmt_num(p.cpu_burst_limit),
        fmt_num(p.cpu_baseline_limit),
        fmt_num(p.burst()),
        p.binding(),
        fmt_num(p.baseline()),
    )
}

/// A point of the chart: offered req/s, tracking p99 ms, committed events/s.
pub type ChartPoint = (f64, f64, f64);

/// Series for the chart.
#[derive(Debug, Clone, Default)]
pub struct ChartData {
    /// (label, points).
    pub series: Vec<(String, Vec<ChartPoint>)>,
    /// The limit reference, events/s.
    pub limit: Option<f64>,
}

#[cfg(feature = "chart")]
pub fn chart(data: &ChartData, path: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use plotters::prelude::*;

    const FONTS: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    let font = FONTS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .context("no DejaVu Sans font found for the chart: install fonts-dejavu-core (Debian)")?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("the DejaVu Sans font could not be loaded"))?;

    let max_x = data
        .series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(100.0f64, f64::max)
        * 1.3;
    let min_x = data
        .series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(f64::INFINITY, f64::min)
        .min(max_x / 2.0)
        * 0.7;
    let max_lat = data
        .series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.0f64, f64::max)
        * 2.0;
    let max_ev = data
        .series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.2))
        .chain(data.limit)
        .fold(100.0f64, f64::max)
        * 1.15;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ];

    let root = BitMapBackend::new(path, (1100, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(450);
    let err =
        |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the chart: {e:?}");

    let mut c = ChartBuilder::on(&top)
        .caption(
            "Tracking p99 latency vs offered rate (log scale)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((min_x..max_x).log_scale(), (0.05f64..max_lat).log_scale())
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("offered requests/s")
        .y_desc("p99 ms (pixel and click)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .draw()
        .map_err(err)?;
    for (i, (label, pts)) in data.series.iter().enumerate() {
        let col = colors[i % colors.len()];
        c.draw_series(LineSeries::new(
            pts.iter().map(|p| (p.0, p.1.max(0.05))),
            col.stroke_width(2),
        ))
        .map_err(err)?
        .label(label.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
        c.draw_series(
            pts.iter()
                .map(|p| Circle::new((p.0, p.1.max(0.05)), 4, col.filled())),
        )
        .map_err(err)?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;

    let mut c = ChartBuilder::on(&bottom)
        .caption("Committed events/s vs offered rate", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((min_x..max_x).log_scale(), 0f64..max_ev)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("offered requests/s")
        .y_desc("events committed/s")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (label, pts)) in data.series.iter().enumerate() {
        let col = colors[i % colors.len()];
        c.draw_series(LineSeries::new(
            pts.iter().map(|p| (p.0, p.2)),
            col.stroke_width(2),
        ))
        .map_err(err)?
        .label(label.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
        c.draw_series(pts.iter().map(|p| Circle::new((p.0, p.2), 4, col.filled())))
            .map_err(err)?;
    }
    if let Some(l) = data.limit {
        let col = RGBColor(90, 90, 90);
        c.draw_series(LineSeries::new(
            vec![(min_x, l), (max_x, l)],
            col.stroke_width(2),
        ))
        .map_err(err)?
        .label(format!("limit (bulk COPY): {} ev/s", fmt_num(l)))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(not(feature = "chart"))]
pub fn chart(_data: &ChartData, _path: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!("built without the `chart` feature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projection_takes_the_least_term() {
        // 1000 B/ev -> 10485 ev/s; 0.01 I/O per event -> 64000; 50 us -> 20000 / 4000.
        let p = Projection::from_costs(1000.0, 0.01, 50e-6);
        assert!((p.wal_limit - 10485.76).abs() < 0.01);
        assert_eq!(p.burst(), p.wal_limit);
        assert!((p.baseline() - 4000.0).abs() < 1e-6);
        assert_eq!(p.binding(), "WAL bandwidth");
        assert_eq!(fmt_num(1234567.0), "1,234,567");
    }

    #[test]
    fn saturation_is_judged_on_rate_latency_and_backlog() {
        let rule = SaturationRule {
            min_achieved: 0.95,
            max_p99_ms: 100.0,
        };
        let mut row = StepRow {
            offered: 1000.0,
            achieved: 999.0,
            buffer_end: Some(0.0),
            spool_end: Some(0.0),
            ..Default::default()
        };
        row.latency[0][1] = Some(2.0);
        assert!(rule.judge(&row, Some(0.0), 20_000.0).is_none());
        row.achieved = 900.0;
        assert!(rule.judge(&row, Some(0.0), 20_000.0).is_some());
        row.achieved = 999.0;
        row.buffer_end = Some(50_000.0);
        assert!(rule.judge(&row, Some(0.0), 20_000.0).is_some());
    }
    #[test]
    fn the_steps_table_shows_what_each_step_spooled_and_replayed() {
        let row = StepRow {
            phase: "service 1000/s".into(),
            offered: 1000.0,
            achieved: 1000.0,
            spooled: Some(2730.0),
            replayed: Some(1500.0),
            connections_end: Some(2048.0),
            ..Default::default()
        };
        let table = steps_table(std::slice::from_ref(&row), true);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("events spooled / replayed"), "{table}");
        assert!(lines[2].contains("| 2,730 / 1,500 | 2,048 |"), "{table}");
        // Header, separator and row have the same number of cells.
        let cells = |l: &str| l.matches('|').count();
        assert_eq!(cells(lines[0]), cells(lines[1]), "{table}");
        assert_eq!(cells(lines[0]), cells(lines[2]), "{table}");
        assert!(
            row.console()
                .contains("(spooled 2730 replayed 1500) conns 2048")
        );
        // Without the service's metrics (the naive server) the table has no such column.
        assert!(!steps_table(&[row], false).contains("spooled"));
    }

    #[test]
    fn the_memory_table_has_a_row_per_measured_step_and_says_what_is_unknown() {
        assert_eq!(memory_table(&[StepRow::default()]), "");
        let scraped = MemorySample {
            rss_mb: 140.0,
            at_s: 12.0,
            buffer_events: 30000.0,
            buffer_mb: Some(20.0),
            bodies_mb: Some(15.4),
            connections: Some(2047.0),
        };
        let row = |phase: &str, scraped: Option<MemorySample>| StepRow {
            phase: phase.into(),
            memory_peak: Some(MemoryPeak {
                rss_mb: 151.4,
                at_s: 12.3,
                reads: 80,
                scraped,
            }),
            ..Default::default()
        };
        let old = MemorySample {
            buffer_mb: None,
            bodies_mb: None,
            connections: None,
            ..scraped.clone()
        };
        let t = memory_table(&[
            row("service 16000/s", Some(scraped)),
            StepRow::default(),
            row("naive 500/s", None),
            row("main 16000/s", Some(old)),
        ]);
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(
            lines.len(),
            5,
            "header, separator and three measured steps:\n{t}"
        );
        let cells = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cells(l) == cells(lines[0])), "{t}");
        assert_eq!(
            lines[2],
            "| service 16000/s | 151 (12.3) | 140 (12.0) | 30,000 | 20.0 | 15.4 | 2,047 | 105 |"
        );
        assert!(
            lines[3].starts_with("| naive 500/s | 151 (12.3) | - |"),
            "{t}"
        );
        // A build without the gauges: unknown, and the rest is the whole RSS.
        assert!(lines[4].ends_with("| - | - | - | 140 |"), "{t}");
    }
}

#[cfg(all(test, feature = "chart"))]
mod chart_tests {
    use super::*;

    #[test]
    fn the_chart_renders_when_the_font_is_there() {
        let data = ChartData {
            series: vec![
                ("a".into(), vec![(500.0, 1.0, 700.0), (1000.0, 2.0, 1400.0)]),
                ("b".into(), vec![(250.0, 5.0, 240.0), (500.0, 900.0, 450.0)]),
            ],
            limit: Some(5000.0),
        };
        let path = std::env::temp_dir().join(format!("reachly-chart-{}.png", std::process::id()));
        match chart(&data, &path) {
            Ok(()) => {
                let bytes = std::fs::read(&path).unwrap();
                assert!(bytes.starts_with(b"\x89PNG"));
                let _ = std::fs::remove_file(&path);
            }
            // No DejaVu font on this machine: the error says what to install.
            Err(e) => assert!(format!("{e:#}").contains("fonts-dejavu-core"), "{e:#}"),
        }
    }
}
