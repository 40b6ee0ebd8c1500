//! A quiet machine to measure on. Other work on the machine depresses the
//! `direct` figures and inflates every ratio to them (a recorded run once
//! had direct bulk at half of what a quiet machine gives). Before each
//! round the benchmark waits, for a bounded time, until the 1-minute load
//! average is below [`QUIET_LOAD`]; it records the load at the start and
//! the end of every round, and says so loudly when a round had to start on
//! a busy machine.
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

/// The 1-minute load average under which a round starts.
pub const QUIET_LOAD: f64 = 0.5;
/// The longest a round waits for a quiet machine (`--quick`: a minute).
pub fn wait_limit(quick: bool) -> Duration {
    Duration::from_secs(if quick { 60 } else { 240 })
}
/// How often the load is read while waiting.
const POLL: Duration = Duration::from_secs(5);

/// The machine's 1-minute load average.
pub fn load_average() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    parse_load_average(&text)
}

/// The first field of `/proc/loadavg`.
fn parse_load_average(text: &str) -> anyhow::Result<f64> {
    let first = text
        .split_whitespace()
        .next()
        .context("/proc/loadavg is empty")?;
    first
        .parse()
        .with_context(|| format!("/proc/loadavg: {first:?} is not a load average"))
}

/// How loaded the machine was around one round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundLoad {
    pub round: usize,
    /// The load when the round started, and when it ended.
    pub start: f64,
    pub end: f64,
    /// How long the round waited for a quiet machine.
    pub waited: Duration,
    /// Whether the load was under [`QUIET_LOAD`] when it started.
    pub quiet: bool,
}

impl RoundLoad {
    pub fn to_json(&self) -> Value {
        json!({
            "round": self.round,
            "load_start": self.start,
            "load_end": self.end,
            "waited_secs": self.waited.as_secs_f64(),
            "quiet": self.quiet,
        })
    }
}

/// Waits until the load average is under [`QUIET_LOAD`], for at most
/// `limit`: the load then, how long it waited, and whether it was quiet.
pub fn wait_for_quiet(limit: Duration) -> anyhow::Result<(f64, Duration, bool)> {
    wait_with(limit, POLL, load_average, std::thread::sleep)
}

fn wait_with(
    limit: Duration,
    poll: Duration,
    mut read: impl FnMut() -> anyhow::Result<f64>,
    mut sleep: impl FnMut(Duration),
) -> anyhow::Result<(f64, Duration, bool)> {
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    loop {
        let load = read()?;
        if load < QUIET_LOAD {
            return Ok((load, started.elapsed().max(waited), true));
        }
        if waited >= limit {
            return Ok((load, started.elapsed().max(waited), false));
        }
        sleep(poll);
        waited += poll;
    }
}

/// The results' table of the rounds' load, and a warning for every round
/// that started busy.
pub fn section(loads: &[RoundLoad], limit: Duration) -> (String, Vec<String>) {
    let mut table = format!(
        "Each round waits (at most {} s) for the 1-minute load average to fall under {QUIET_LOAD}.\n\n\
         | round | load at start | load at end | waited s | quiet |\n|---|---|---|---|---|\n",
        limit.as_secs()
    );
    let mut warnings = Vec::new();
    for l in loads {
        table.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.0} | {} |\n",
            l.round,
            l.start,
            l.end,
            l.waited.as_secs_f64(),
            if l.quiet { "yes" } else { "**NO**" }
        ));
        if !l.quiet {
            warnings.push(format!(
                "NOT A QUIET MACHINE: round {} started at load {:.2} (over {QUIET_LOAD} after waiting {} s); its figures, and every ratio to direct in it, are suspect",
                l.round,
                l.start,
                l.waited.as_secs()
            ));
        }
    }
    (table, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_is_the_first_field() {
        let load = parse_load_average("0.42 0.58 0.61 2/431 12345\n").unwrap();
        assert!((load - 0.42).abs() < 1e-9);
        assert!(parse_load_average("").is_err());
        assert!(parse_load_average("busy 1 2").is_err());
    }

    #[test]
    fn waiting_stops_when_quiet_or_at_the_limit() {
        // Falls under the threshold on the third reading.
        let mut readings = [1.9, 0.8, 0.3].into_iter();
        let mut slept = Duration::ZERO;
        let (load, waited, quiet) = wait_with(
            Duration::from_secs(60),
            Duration::from_secs(5),
            || Ok(readings.next().unwrap()),
            |d| slept += d,
        )
        .unwrap();
        assert_eq!((load, quiet), (0.3, true));
        assert_eq!(slept, Duration::from_secs(10));
        assert!(waited >= Duration::from_secs(10));
        // Never quiet: gives up at the limit, says so.
        let mut reads = 0;
        let (load, _, quiet) = wait_with(
            Duration::from_secs(20),
            Duration::from_secs(5),
            || {
                reads += 1;
                Ok(1.5)
            },
            |_| {},
        )
        .unwrap();
        assert_eq!((load, quiet, reads), (1.5, false, 5));
    }

    #[test]
    fn a_busy_round_is_flagged() {
        let loads = [
            RoundLoad {
                round: 0,
                start: 0.2,
                end: 1.9,
                waited: Duration::ZERO,
                quiet: true,
            },
            RoundLoad {
                round: 1,
                start: 0.9,
                end: 2.1,
                waited: Duration::from_secs(240),
                quiet: false,
            },
        ];
        let (table, warnings) = section(&loads, Duration::from_secs(240));
        assert!(
            table.contains("| 1 | 0.90 | 2.10 | 240 | **NO** |"),
            "{table}"
        );
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("NOT A QUIET MACHINE: round 1"));
    }
}
