//! Results: figures with min / median / max over repeated runs, written as a
//! Markdown table and a JSON file under bench/results/, with the date, the
//! machine, the kernel and the git commit they were measured on.
use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

/// One measured figure.
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub samples: Vec<f64>,
}

impl Figure {
    pub fn new(name: impl Into<String>, unit: &'static str, samples: Vec<f64>) -> Self {
        Self {
            name: name.into(),
            unit,
            samples,
        }
    }

    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        s
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    pub fn median(&self) -> f64 {
        let s = self.sorted();
        if s.is_empty() {
            return f64::NAN;
        }
        s[s.len() / 2]
    }
    /// The nearest-rank percentile `p` (0 < p <= 100) of the samples.
    pub fn percentile(&self, p: f64) -> f64 {
        let s = self.sorted();
        if s.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
        s[rank.clamp(1, s.len()) - 1]
    }
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{} cores, {cpu}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// A titled Markdown section placed before the table of every figure.
pub struct Section {
    pub title: String,
    pub markdown: String,
}

impl Section {
    pub fn new(title: impl Into<String>, markdown: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            markdown: markdown.into(),
        }
    }
}

/// A figure with about three significant digits (at least the units).
pub fn number(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 || a == 0.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

pub fn write(name: &str, figures: &[Figure]) -> anyhow::Result<()> {
    write_doc(name, figures, &[], serde_json::Value::Null)
}

/// [`write`] with sections before the table (also in the JSON, as
/// `sections`) and `extra` (under `extra` in the JSON).
pub fn write_doc(
    name: &str,
    figures: &[Figure],
    sections: &[Section],
    extra: serde_json::Value,
) -> anyhow::Result<()> {
    let date = command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]);
    let kernel = command_line("uname", &["-r"]);
    let commit = command_line("git", &["rev-parse", "--short", "HEAD"]);
    let machine = machine();
    let mut md =
        format!("# {name}\n\nMeasured {date} on {machine}, kernel {kernel}, commit {commit}.\n\n");
    for s in sections {
        md.push_str(&format!("## {}\n\n{}\n", s.title, s.markdown));
    }
    if !sections.is_empty() {
        md.push_str("## Every figure\n\n");
    }
    md.push_str("| figure | min | median | max | unit | runs |\n|---|---|---|---|---|---|\n");
    for f in figures {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            f.name,
            number(f.min()),
            number(f.median()),
            number(f.max()),
            f.unit,
            f.samples.len()
        ));
    }
    let json = json!({
        "benchmark": name, "date": date, "machine": machine, "kernel": kernel, "commit": commit,
        "figures": figures.iter().map(|f| json!({
            "name": f.name, "unit": f.unit, "min": f.min(), "median": f.median(), "max": f.max(),
            "samples": f.samples,
        })).collect::<Vec<_>>(),
        "sections": sections.iter().map(|s| json!({"title": s.title, "markdown": s.markdown})).collect::<Vec<_>>(),
        "extra": extra,
    });
    // bench/results of the checkout it runs in (`cargo xtask bench` runs it
    // from the workspace root); the path compiled in is the fallback.
    let here = std::env::current_dir()?.join("bench/results");
    let dir = if here.parent().is_some_and(|b| b.exists()) {
        here
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.md")), &md)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&json)?,
    )?;
    print!("{md}");
    println!("\nwritten to {}/{name}.{{md,json}}", dir.display());
    Ok(())
}
