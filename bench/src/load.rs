//! The load generators the node benchmark drives, and what it reads from
//! /proc about the proxies under load.
//!
//! - `oha` (crates.io): open-loop HTTP at a fixed rate (`-q`, with
//!   `--latency-correction` so that a stalled request delays the schedule's
//!   latencies, not the schedule), and new connections per second
//!   (`--disable-keepalive`); JSON output.
//! - `wrk` (Debian): closed loop, the highest rate sustained, with a Lua
//!   `done` hook that prints the latency percentiles as JSON.
//! - `iperf3` (Debian): bulk TCP, `-J`.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use weft_tests::mesh::Output;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
}

/// The program `name`: on the PATH, or in cargo's bin directory.
pub fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found (`cargo xtask bench` installs what is missing)"))
}

/// A bounded run's output as a successful command's stdout, or an error
/// naming `what` with its stderr.
pub fn stdout_of(what: &str, out: Output) -> anyhow::Result<String> {
    if !out.success() {
        bail!(
            "{what}: {}: {} {}",
            match out.status {
                Some(s) => s.to_string(),
                None => "killed at its time limit".into(),
            },
            out.stderr.trim(),
            out.stdout.chars().take(400).collect::<String>()
        );
    }
    Ok(out.stdout)
}

/// What one oha run measured.
#[derive(Debug)]
pub struct OhaRun {
    pub rps: f64,
    pub latency: Percentiles,
    pub success_rate: f64,
    pub total: f64,
}

pub fn oha_rate_args(url: &str, rate: u32, conns: u32, secs: u64) -> Vec<String> {
    [
        "-z",
        &format!("{secs}s"),
        "-q",
        &rate.to_string(),
        "--latency-correction",
        "-c",
        &conns.to_string(),
        "--no-tui",
        "--output-format",
        "json",
        url,
    ]
    .map(String::from)
    .to_vec()
}

pub fn oha_connections_args(url: &str, conns: u32, secs: u64) -> Vec<String> {
    [
        "-z",
        &format!("{secs}s"),
        "-c",
        &conns.to_string(),
        "--disable-keepalive",
        "--no-tui",
        "--output-format",
        "json",
        url,
    ]
    .map(String::from)
    .to_vec()
}

pub fn parse_oha(stdout: &str) -> anyhow::Result<OhaRun> {
    let v: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "oha output: {}",
            stdout.chars().take(300).collect::<String>()
        )
    })?;
    let s = &v["summary"];
    let p = &v["latencyPercentiles"];
    let us = |k: &str| p[k].as_f64().map(|x| x * 1e6).unwrap_or(f64::NAN);
    let ok: f64 = v["statusCodeDistribution"]["200"].as_f64().unwrap_or(0.0);
    let total: f64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_f64).sum())
        .unwrap_or(0.0);
    // Requests still in flight when the duration ends are cut off by oha
    // ("aborted due to deadline"): not failures.
    let errors: f64 = v["errorDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.contains("aborted due to deadline"))
                .filter_map(|(_, v)| v.as_f64())
                .sum()
        })
        .unwrap_or(0.0);
    let all = total + errors;
    Ok(OhaRun {
        rps: s["requestsPerSec"].as_f64().unwrap_or(f64::NAN),
        latency: Percentiles {
            p50: us("p50"),
            p90: us("p90"),
            p99: us("p99"),
            p999: us("p99.9"),
        },
        success_rate: if all > 0.0 { ok / all } else { 0.0 },
        total: all,
    })
}

/// The Lua hook that makes wrk print its results as one JSON line.
pub const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"#;

pub fn wrk_args(url: &str, script: &Path, conns: u32, secs: u64) -> Vec<String> {
    [
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--timeout",
        "2s",
        "-s",
        &script.display().to_string(),
        url,
    ]
    .map(String::from)
    .to_vec()
}

/// What one wrk run measured: requests per second, latency, errors.
pub fn parse_wrk(stdout: &str) -> anyhow::Result<(f64, Percentiles, f64)> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{\"requests\""))
        .with_context(|| format!("no result line in wrk's output: {stdout}"))?;
    let v: Value = serde_json::from_str(line)?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let rps = f("requests") / (f("duration_us") / 1e6);
    Ok((
        rps,
        Percentiles {
            p50: f("p50"),
            p90: f("p90"),
            p99: f("p99"),
            p999: f("p999"),
        },
        f("errors"),
    ))
}

pub fn iperf_args(host: &str, port: u16, streams: u32, secs: u64) -> Vec<String> {
    [
        "-c",
        host,
        "-p",
        &port.to_string(),
        "-P",
        &streams.to_string(),
        "-t",
        &secs.to_string(),
        "--connect-timeout",
        "3000",
        "-J",
    ]
    .map(String::from)
    .to_vec()
}

/// Received throughput in Gbit/s.
pub fn parse_iperf(stdout: &str) -> anyhow::Result<f64> {
    let v: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "iperf3 output: {}",
            stdout.chars().take(300).collect::<String>()
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3: no end.sum_received.bits_per_second")
}

/// CPU time (user + system) of `pid` so far in seconds, and its minor
/// page faults so far.
pub fn cpu_and_faults(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> anyhow::Result<(f64, f64)> {
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<f64> {
        // `rest` starts at field 3.
        let text = fields
            .get(n - 3)
            .with_context(|| format!("/proc/PID/stat has no field {n}"))?;
        Ok(text.parse::<f64>()?)
    };
    // minflt is field 10; utime and stime are fields 14 and 15, in ticks
    // (USER_HZ is 100 on every Linux architecture weft runs on).
    Ok(((field(14)? + field(15)?) / 100.0, field(10)?))
}

/// CPU time `pid`'s threads have run, in seconds, to the nanosecond (the
/// scheduler's own account, `/proc/PID/task/*/schedstat`; `/proc/PID/stat`
/// counts in 10 ms ticks, too coarse for a process that runs for a
/// fraction of a millisecond at a time). Threads that ended are not
/// counted: for processes whose threads live as long as they do.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        let text = std::fs::read_to_string(&path)?;
        let first = text.split_whitespace().next().unwrap_or_default();
        ns += first
            .parse::<u64>()
            .with_context(|| format!("{}: {text:?}", path.display()))?;
    }
    Ok(ns as f64 / 1e9)
}

/// Resets the peak resident set size of `pid` (VmHWM) to its current RSS.
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting VmHWM of {pid}"))
}

/// Peak resident set size of `pid` since the last reset, in MB (10^6 bytes).
pub fn peak_rss_mb(pid: u32) -> anyhow::Result<f64> {
    status_mb(pid, "VmHWM")
}

/// Resident set size of `pid` now, in MB.
pub fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    status_mb(pid, "VmRSS")
}

/// A `kB` field of `/proc/PID/status`, in MB.
fn status_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .parse()?;
    Ok(kb * 1024.0 / 1e6)
}

/// The pid of the `weft-agent --config CONFIG` process (not `weft-agent exec`).
pub fn agent_pid(config: &Path) -> anyhow::Result<u32> {
    let want = config.display().to_string();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.len() >= 3
            && args[0].ends_with("weft-agent")
            && args[1] == "--config"
            && args[2] == want
        {
            return Ok(pid);
        }
    }
    bail!("no weft-agent process with --config {want}")
}

/// CPU (vCPU) and peak RSS of a set of processes over one load window.
pub struct Window {
    pids: Vec<u32>,
    before: Vec<(f64, f64)>,
    start: std::time::Instant,
}

/// What one process used over a [`Window`].
pub struct Usage {
    /// CPU seconds per second of the window.
    pub vcpu: f64,
    pub peak_rss_mb: f64,
    pub minor_faults: f64,
}

impl Window {
    pub fn start(pids: &[u32]) -> anyhow::Result<Window> {
        for pid in pids {
            reset_peak_rss(*pid)?;
        }
        Ok(Window {
            pids: pids.to_vec(),
            before: pids
                .iter()
                .map(|p| cpu_and_faults(*p))
                .collect::<anyhow::Result<_>>()?,
            start: std::time::Instant::now(),
        })
    }

    /// What each process used over the window.
    pub fn finish(self) -> anyhow::Result<Vec<Usage>> {
        let secs = self
            .start
            .elapsed()
            .max(Duration::from_millis(1))
            .as_secs_f64();
        self.pids
            .iter()
            .zip(&self.before)
            .map(|(pid, (cpu0, faults0))| {
                let (cpu, faults) = cpu_and_faults(*pid)?;
                Ok(Usage {
                    vcpu: (cpu - cpu0) / secs,
                    peak_rss_mb: peak_rss_mb(*pid)?,
                    minor_faults: faults - faults0,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        // A command name with spaces and parentheses, as the kernel writes it.
        let stat = "4242 (weft (agent) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(stat).unwrap(), (3.25, 1234.0));
        assert!(parse_stat("4242 (short) S 1").is_err());
    }

    #[test]
    fn oha_json() {
        let out = r#"{"summary":{"successRate":1.0,"requestsPerSec":200.6},
            "latencyPercentiles":{"p50":0.000188,"p90":0.000327,"p99":0.00337,"p99.9":0.00343},
            "statusCodeDistribution":{"200":200},"errorDistribution":{"aborted due to deadline":1}}"#;
        let r = parse_oha(out).unwrap();
        assert_eq!(r.success_rate, 1.0);
        assert!((r.latency.p50 - 188.0).abs() < 1e-6);
        assert_eq!(r.total, 200.0);
    }

    #[test]
    fn wrk_line() {
        let out = "Running 1s test\n{\"requests\":2000,\"duration_us\":1000000,\"errors\":0,\"p50\":100,\"p90\":150,\"p99\":300,\"p999\":900}\n";
        let (rps, p, errors) = parse_wrk(out).unwrap();
        assert_eq!(rps, 2000.0);
        assert_eq!(p.p999, 900.0);
        assert_eq!(errors, 0.0);
    }

    #[test]
    fn own_cpu_and_rss() {
        let pid = std::process::id();
        let (cpu, faults) = cpu_and_faults(pid).unwrap();
        assert!(cpu >= 0.0 && faults > 0.0);
        assert!(peak_rss_mb(pid).unwrap() > 0.0);
        assert!(rss_mb(pid).unwrap() > 0.0);
    }
}
