//! What operators expect of every process's `/metrics` beside its own counters: which build
//! runs (`*_build_info`), what the process costs (resident memory, open descriptors, CPU
//! seconds, from `/proc/self`), and latency histograms, written through
//! [`crate::metrics::Exposition`] like the rest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::{Exposition, Family, Kind};

/// This build's version (the workspace's) and git commit (`unknown` when the build had no
/// git checkout; set `CIM_GIT_COMMIT` at build time to name one).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = match option_env!("CIM_GIT_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// Upper bounds of the latency buckets, in seconds: 1 ms to 10 s, enough for a login (an
/// argon2 check of tens of milliseconds, queued behind others under load) and a send (a
/// Redis round trip or two).
const BOUNDS: [f64; 14] = [
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    f64::INFINITY,
];

/// A latency histogram with fixed buckets, updated with atomics from any task.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Not cumulative: `buckets[i]` counts observations in (BOUNDS[i-1], BOUNDS[i]].
    buckets: [AtomicU64; BOUNDS.len()],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let i = BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BOUNDS.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `_bucket`, `_sum` and `_count` samples of one series of `family`.
    fn render_samples(&self, family: &mut Family<'_>, labels: &[(&str, &str)]) {
        let mut cumulative = 0;
        for (bound, bucket) in BOUNDS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = if bound.is_infinite() {
                "+Inf".to_owned()
            } else {
                bound.to_string()
            };
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            family.series("_bucket", &with_le, cumulative);
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        family.series("_sum", labels, sum);
        family.series("_count", labels, cumulative);
    }
}

/// One histogram family: its name, help, and the histogram of each series (its labels).
pub fn render_histograms(
    page: &mut Exposition,
    name: &str,
    help: &str,
    series: &[(&[(&str, &str)], &Histogram)],
) {
    let mut family = page.family(name, Kind::Histogram, help);
    for (labels, histogram) in series {
        histogram.render_samples(&mut family, labels);
    }
}

/// What `/proc/self` says about this process (Linux); `None` for what it could not read.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub threads: Option<u64>,
}

/// Clock ticks per second of `/proc/self/stat`'s CPU times: 100 on every Linux this runs on
/// (USER_HZ is fixed in the kernel's ABI).
const CLOCK_TICKS: f64 = 100.0;

impl ProcessStats {
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64);
        let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| parse_cpu_ticks(&stat))
            .map(|ticks| ticks as f64 / CLOCK_TICKS);
        Self {
            resident_bytes: field("VmRSS:").map(|kib| kib * 1024),
            open_fds,
            cpu_seconds,
            threads: field("Threads:"),
        }
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, so utime (14) is the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `{prefix}_build_info` and `{prefix}_process_*`.
pub fn render_process(page: &mut Exposition, prefix: &str) {
    page.family(
        &format!("{prefix}_build_info"),
        Kind::Gauge,
        "The running build: version and git commit (value 1).",
    )
    .sample(&[("version", VERSION), ("git_commit", GIT_COMMIT)], 1);
    let stats = ProcessStats::read();
    let gauges = [
        (
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory of the whole process (cim up: all three share one process).",
            stats.resident_bytes.map(|n| n.to_string()),
        ),
        (
            "process_open_fds",
            Kind::Gauge,
            "Open file descriptors of the process (sockets included).",
            stats.open_fds.map(|n| n.to_string()),
        ),
        (
            "process_threads",
            Kind::Gauge,
            "Threads of the process.",
            stats.threads.map(|n| n.to_string()),
        ),
        (
            "process_cpu_seconds_total",
            Kind::Counter,
            "User and system CPU time the process has used, in seconds.",
            stats.cpu_seconds.map(|s| format!("{s:.2}")),
        ),
    ];
    for (name, kind, help, value) in gauges {
        let mut family = page.family(&format!("{prefix}_{name}"), kind, help);
        if let Some(value) = value {
            family.sample(&[], value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        let mut page = Exposition::new("id", "r");
        render_histograms(&mut page, "x_seconds", "help", &[(&[], &h)]);
        let out = page.finish();
        assert!(out.contains("# TYPE x_seconds histogram\n"), "{out}");
        assert!(
            out.contains("x_seconds_bucket{id=\"r\",le=\"0.001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{id=\"r\",le=\"0.05\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{id=\"r\",le=\"10\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{id=\"r\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{id=\"r\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum{id=\"r\"} 60.0305\n"), "{out}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "4242 (cim (route) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_measured() {
        let stats = ProcessStats::read();
        assert!(stats.resident_bytes.is_some_and(|n| n > 0), "{stats:?}");
        assert!(stats.open_fds.is_some_and(|n| n >= 3), "{stats:?}");
        assert!(stats.cpu_seconds.is_some(), "{stats:?}");
        let mut page = Exposition::new("id", "t");
        render_process(&mut page, "cim_test");
        let out = page.finish();
        assert!(
            out.contains("cim_test_build_info{id=\"t\",version=\""),
            "{out}"
        );
        assert!(
            out.contains("cim_test_process_open_fds{id=\"t\"} "),
            "{out}"
        );
    }
}
