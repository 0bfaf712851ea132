//! Figures: distributions, number formatting, progress bars, the machine and where the CPU
//! went.

use std::process::Command;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::daemon::Daemon;

/// Percentiles (nearest rank) of a sample.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(super) struct Dist {
    pub(super) n: usize,
    pub(super) p50: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
    pub(super) max: f64,
    pub(super) mean: f64,
}

impl Dist {
    pub(super) fn of(mut v: Vec<f64>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Dist {
            n: v.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[v.len() - 1],
            mean: v.iter().sum::<f64>() / v.len() as f64,
        }
    }

    pub(super) fn text(&self, unit: &str) -> String {
        let d = if self.max < 100.0 { 1 } else { 0 };
        format!(
            "p50 {} · p90 {} · p99 {} · max {} {unit} (n = {})",
            number(self.p50, d),
            number(self.p90, d),
            number(self.p99, d),
            number(self.max, d),
            self.n
        )
    }
}

/// `1234567.8` → `1,234,568` (or with `decimals`).
pub(super) fn number(v: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, v.abs());
    let (int, frac) = text
        .split_once('.')
        .map_or((text.as_str(), ""), |(i, f)| (i, f));
    let mut grouped = String::new();
    for (k, c) in int.chars().enumerate() {
        if k > 0 && (int.len() - k) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if v < 0.0 && text.chars().any(|c| c.is_ascii_digit() && c != '0') {
        "-"
    } else {
        ""
    };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

pub(super) fn secs(d: Duration) -> String {
    number(d.as_secs_f64(), 2)
}

pub(super) fn secs_ms(ms: i64) -> String {
    number(ms as f64 / 1000.0, 2)
}

pub(super) fn progress(len: u64, msg: &str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_style(
        ProgressStyle::with_template("{msg:<24} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(msg.to_owned());
    bar
}

#[derive(Debug, Serialize)]
pub(super) struct Machine {
    pub(super) cores: usize,
    pub(super) cpu: String,
    pub(super) memory_mb: u64,
}

pub(super) fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_mb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024);
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |p| p.get()),
        cpu,
        memory_mb,
    }
}

/// CPU use over a window, from /proc (Linux; empty elsewhere), in % of one core.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(super) struct CpuUse {
    /// The daemons together.
    pub(super) daemons: f64,
    /// This process: clients and receiver.
    pub(super) bench: f64,
    /// Everything else busy: the database server, the kernel, other processes.
    pub(super) other: f64,
    pub(super) idle: f64,
    /// 100 × cores.
    pub(super) capacity: f64,
}

impl CpuUse {
    pub(super) fn text(&self) -> String {
        if self.capacity == 0.0 {
            return "not measured (no /proc)".to_owned();
        }
        format!(
            "daemon{} {:.0}% · bench (clients, receiver) {:.0}% · other (database, kernel) {:.0}% · idle {:.0}%, of {:.0}%",
            if self.daemons > 0.0 { "s" } else { "" },
            self.daemons,
            self.bench,
            self.other,
            self.idle,
            self.capacity
        )
    }
}

pub(super) struct CpuWindow {
    pub(super) at: Instant,
    pub(super) machine: Option<(u64, u64)>,
    pub(super) me: Option<u64>,
    pub(super) daemons: Vec<Option<u64>>,
}

impl CpuWindow {
    pub(super) fn start(daemons: &[Daemon]) -> CpuWindow {
        CpuWindow {
            at: Instant::now(),
            machine: machine_ticks(),
            me: process_ticks("self"),
            daemons: daemons
                .iter()
                .map(|d| process_ticks(&d.pid.to_string()))
                .collect(),
        }
    }

    pub(super) fn finish(self, daemons: &[Daemon]) -> CpuUse {
        let secs = self.at.elapsed().as_secs_f64();
        let hz = clock_ticks() * secs / 100.0; // ticks per 1% of a core over the window
        let (Some((t0, i0)), Some((t1, i1))) = (self.machine, machine_ticks()) else {
            return CpuUse::default();
        };
        if hz <= 0.0 {
            return CpuUse::default();
        }
        let total = (t1 - t0) as f64 / hz;
        let idle = (i1 - i0) as f64 / hz;
        let me = match (self.me, process_ticks("self")) {
            (Some(a), Some(b)) => (b - a) as f64 / hz,
            _ => 0.0,
        };
        let daemons: f64 = self
            .daemons
            .iter()
            .zip(daemons)
            .filter_map(|(a, d)| Some((process_ticks(&d.pid.to_string())? - (*a)?) as f64 / hz))
            .sum();
        let cores = std::thread::available_parallelism().map_or(1, |p| p.get()) as f64;
        CpuUse {
            daemons,
            bench: me,
            other: (total - idle - daemons - me).max(0.0),
            idle,
            capacity: 100.0 * cores,
        }
    }
}

/// (all ticks, idle + iowait ticks) from /proc/stat.
pub(super) fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user already)
    let total: u64 = v.iter().take(8).sum();
    Some((total, v.get(3)? + v.get(4).copied().unwrap_or(0)))
}

/// utime + stime of a process (`self` or a pid), in clock ticks.
pub(super) fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is field 3, utime 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
pub(super) fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let d = Dist::of((1..=100).map(f64::from).collect());
        assert_eq!((d.p50, d.p90, d.p99, d.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Dist::of(vec![7.0]).p99, 7.0);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(number(1234567.8, 0), "1,234,568");
        assert_eq!(number(999.0, 0), "999");
        assert_eq!(number(2.456, 2), "2.46");
        assert_eq!(number(-1500.0, 0), "-1,500");
    }
}
