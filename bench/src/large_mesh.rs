//! The agent in a large mesh (issue 17): the servers of the benchmark's
//! meshes are filled (by `weft-bench-populate`, from inside the mesh) with
//! 1,000 services, 10,000 instances on 1,000 nodes, 1,000 intentions and
//! 100 service-routers, none of them on the benchmark's own path; while 10
//! changes a second arrive (an instance's health, an intention's action, in
//! turn), the configurations are measured again and held to the same
//! rounds (the same loads in the same order) run on the small mesh just
//! before the fill. The agents' memory is read before the fill and once
//! their views hold it; the servers' CPU per change during the rounds is
//! reported (they run at idle priority, see `crate::priority`), and each
//! agent's over 10 s of changes with no load before the rounds.
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use weft_tests::mesh::{wait_until, Mesh, Node, Proc};
use weft_tests::servers::bin;

use crate::node::DIRECT;
use crate::report::{Figure, Section};

/// The size of the mesh, as the issue names it.
pub const SERVICES: usize = 1000;
pub const PER_SERVICE: usize = 10;
pub const NODES: usize = 1000;
pub const INTENTIONS: usize = 1000;
pub const ROUTERS: usize = 100;
pub const CHANGES_PER_SECOND: u64 = 10;

/// The fill may take this long.
const FILL_LIMIT: Duration = Duration::from_secs(15 * 60);
/// An agent's view may take this long to hold the fill.
const VIEW_LIMIT: Duration = Duration::from_secs(120);

fn populate(mesh: &Mesh, token_file: &std::path::Path) -> Vec<String> {
    vec![
        bin("weft-bench-populate").display().to_string(),
        "--server".into(),
        mesh.server_addr(),
        "--ca-file".into(),
        mesh.path("ca.pem").display().to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
    ]
}

/// The management token in a file only root reads (never on a command
/// line).
fn token_file(mesh: &Mesh) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = mesh.path("bench-populate.token");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    std::io::Write::write_all(&mut file, mesh.token.as_bytes())?;
    Ok(path)
}

/// Fills `mesh`'s server; the seconds it took.
pub fn fill(mesh: &Mesh) -> anyhow::Result<f64> {
    let token = token_file(mesh)?;
    let mut args = populate(mesh, &token);
    args.push("fill".into());
    for (flag, n) in [
        ("--nodes", NODES),
        ("--services", SERVICES),
        ("--per-service", PER_SERVICE),
        ("--intentions", INTENTIONS),
        ("--routers", ROUTERS),
    ] {
        args.extend([flag.to_string(), n.to_string()]);
    }
    let (program, rest) = args.split_first().expect("a program");
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let out = mesh.run(Node::A, program, &rest, FILL_LIMIT)?;
    if !out.success() {
        bail!("filling the mesh: {}", out.describe());
    }
    let report: Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("weft-bench-populate printed {:?}", out.stdout))?;
    report["secs"]
        .as_f64()
        .context("weft-bench-populate printed no secs")
}

/// Waits until `node`'s agent's view holds the fill: at least as many
/// instances and intentions as it made.
pub fn wait_for_view(mesh: &Mesh, node: Node) -> anyhow::Result<f64> {
    let start = Instant::now();
    wait_until(
        VIEW_LIMIT,
        &format!("{}'s view holds the large mesh", node.node_name()),
        || {
            let dump = mesh.agent_config_dump(node)?;
            let count = |k: &str| dump["view"][k].as_array().map_or(0, Vec::len);
            Ok(
                (count("instances") >= SERVICES * PER_SERVICE && count("intentions") >= INTENTIONS)
                    .then_some(()),
            )
        },
    )?;
    Ok(start.elapsed().as_secs_f64())
}

/// Changes arriving while the configurations are measured: a
/// `weft-bench-populate churn` process, bounded in time, stopped when
/// dropped.
pub struct Churn {
    proc: Proc,
    log: std::path::PathBuf,
}

impl Churn {
    pub fn start(mesh: &Mesh, seconds: u64) -> anyhow::Result<Churn> {
        let token = token_file(mesh)?;
        let args = populate(mesh, &token);
        let mut cmd = std::process::Command::new(&args[0]);
        cmd.args(&args[1..]).args([
            "churn",
            "--per-second",
            &CHANGES_PER_SECOND.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--services",
            &SERVICES.to_string(),
            "--intentions",
            &INTENTIONS.to_string(),
        ]);
        // A client of the control plane: elsewhere in a deployment.
        crate::priority::start_idle(&mut cmd);
        let log_name = "bench-churn.log";
        let proc = mesh.spawn(Node::A, &mut cmd, log_name)?;
        Ok(Churn {
            proc,
            log: mesh.path(log_name),
        })
    }

    /// Stops the churn (SIGTERM: it reports and exits) and reads its
    /// report: the changes it made and how many ran past their tick. An
    /// error when it ended early, failed, or reported nothing.
    pub fn finish(mut self) -> anyhow::Result<(f64, f64)> {
        let early = self.proc.try_wait();
        let status = match early {
            Some(status) => status,
            None => (self.proc)
                .stop(libc::SIGTERM, Duration::from_secs(10))
                .context("the churn did not stop")?,
        };
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        if !status.success() {
            bail!("the churn failed ({status}): {}", text.trim());
        }
        if early.is_some() {
            bail!(
                "the churn ended before the measurements did: {}",
                text.trim()
            );
        }
        let report: Value = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("the churn reported nothing: {text:?}"))?;
        let n = |k: &str| {
            report[k]
                .as_f64()
                .with_context(|| format!("no {k} in {report}"))
        };
        Ok((n("changes")?, n("late")?))
    }
}

/// How far direct may move between phases before the comparison is
/// called into question (the target's own tolerance).
const DIRECT_DRIFT: f64 = 0.10;

/// Direct's own figures in each phase: no weft process carries direct, so
/// when they move by more than [`DIRECT_DRIFT`] between the reference and
/// a large-mesh phase, the machine changed under the comparison, and the
/// table above says so loudly instead of passing the change off as the
/// mesh's.
fn direct_across_phases(
    median: &dyn Fn(&str) -> Option<f64>,
    (reference, still): (&str, &str),
) -> String {
    let mut md = format!(
        "\nDirect across the phases (no weft process carries it: a move here is the machine's).\n\n\
         | figure | {reference} | large mesh | ÷ | {still} | ÷ |\n|---|---|---|---|---|---|\n"
    );
    let mut moved = Vec::new();
    for (metric, unit) in [
        ("1000 rps p50", "µs"),
        ("1000 rps p99", "µs"),
        ("new connections", "conn/s"),
    ] {
        let at = |phase: &str| median(&format!("{DIRECT} ({phase}): {metric}"));
        let base = at(reference);
        let mut row = format!(
            "| {metric} | {} |",
            base.map_or("not measured".into(), |v| format!("{v:.0} {unit}"))
        );
        for phase in ["large mesh", still] {
            let (value, ratio) = match (base, at(phase)) {
                (Some(b), Some(v)) if b > 0.0 => {
                    let r = v / b;
                    if (r - 1.0).abs() > DIRECT_DRIFT {
                        moved.push(format!("{metric} {r:.2}× in {phase}"));
                    }
                    (format!("{v:.0} {unit}"), format!("{r:.2}"))
                }
                (_, v) => (
                    v.map_or("not measured".into(), |v| format!("{v:.0} {unit}")),
                    "—".into(),
                ),
            };
            row += &format!(" {value} | {ratio} |");
        }
        md += &row;
        md += "\n";
    }
    if !moved.is_empty() {
        md += &format!(
            "\n**WARNING: direct moved by more than {:.0} % between the phases ({}): the machine changed under the comparison, and the large mesh's ratios above measure that as much as the mesh.**\n",
            DIRECT_DRIFT * 100.0,
            moved.join(", ")
        );
    }
    md
}

/// The large mesh next to the small one: each configuration's added
/// latency and new connections per second (medians over their rounds of
/// the same run) in the large mesh against the same loads in the same
/// order on the small mesh just before the fill (`reference`, the phase's
/// name), the small mesh's main rounds beside them, and the large mesh
/// with no change arriving (`still`, measured in each round right after
/// the same loads with changes); the agents' memory, and how long filling
/// took.
pub fn section(
    figures: &[Figure],
    configs: &[&str],
    (reference, still): (&str, &str),
    facts: &std::collections::BTreeMap<String, f64>,
) -> Section {
    let median = |name: &str| {
        figures
            .iter()
            .find(|f| f.name == name && !f.samples.is_empty())
            .map(Figure::median)
    };
    let mut md = format!(
        "The agents' views hold {SERVICES} services, {} instances on {NODES} nodes, {INTENTIONS} intentions and {ROUTERS} routers while {CHANGES_PER_SECOND} changes a second arrive. The same rounds (1000 rps, then new connections, each configuration in turn) ran on the small mesh just before the fill ({reference}): the large mesh is held to those; the main rounds' figures (five loads per configuration) are beside them, and the same loads on the large mesh with its changes stopped ({still}), in each round right after those with changes, so that time and the machine's drift fall on both alike: what the view's size costs apart from taking changes. Medians over each phase's rounds; the target: within 10 %.\n\n\
         | figure | configuration | small mesh, main rounds | {reference} | large mesh | large ÷ before the fill | within 10 % | {still} | no changes ÷ before the fill |\n|---|---|---|---|---|---|---|---|---|\n",
        SERVICES * PER_SERVICE
    );
    for cfg in configs {
        for (metric, unit, higher_is_better) in [
            ("added latency at 1000 rps p50", "µs", false),
            ("added latency at 1000 rps p99", "µs", false),
            ("new connections", "conn/s", true),
        ] {
            let main = median(&format!("{cfg}: {metric}"));
            let small = median(&format!("{cfg} ({reference}): {metric}"));
            let large = median(&format!("{cfg} (large mesh): {metric}"));
            let quiet = median(&format!("{cfg} ({still}): {metric}"));
            let quiet_ratio = match (small, quiet) {
                (Some(s), Some(q)) if s > 0.0 => format!("{:.2}", q / s),
                _ => "—".to_string(),
            };
            let (ratio, met) = match (small, large) {
                (Some(s), Some(l)) if s > 0.0 => {
                    let r = l / s;
                    let ok = if higher_is_better { r >= 0.9 } else { r <= 1.1 };
                    (format!("{r:.2}"), if ok { "yes" } else { "**no**" })
                }
                _ => ("—".to_string(), "not measured"),
            };
            let show =
                |v: Option<f64>| v.map_or("not measured".to_string(), |v| format!("{v:.0} {unit}"));
            md += &format!(
                "| {metric} | {cfg} | {} | {} | {} | {ratio} | {met} | {} | {quiet_ratio} |\n",
                show(main),
                show(small),
                show(large),
                show(quiet)
            );
        }
    }
    md += &direct_across_phases(&median, (reference, still));
    md += "\n| fact | value |\n|---|---|\n";
    for (k, v) in facts {
        let unit = if k.contains("RSS") {
            "MB"
        } else if k.starts_with("load") || k.contains(" per change") {
            ""
        } else {
            "s"
        };
        // A change costs a fraction of a millisecond.
        let digits = if k.contains(" per change") { 2 } else { 1 };
        md += &format!("| {k} | {v:.digits$} {unit} |\n");
    }
    Section::new("Large mesh (issue 17)", md)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The section of figures where direct's p50 is `p50` before the fill
    /// and `large_p50` in the large mesh (every other figure unchanged).
    fn section_with(p50: f64, large_p50: f64) -> String {
        let mut figures = Vec::new();
        for (phase, p50) in [("before", p50), ("large mesh", large_p50), ("still", p50)] {
            let f = |metric: &str, v: f64| {
                Figure::new(format!("{DIRECT} ({phase}): {metric}"), "", vec![v])
            };
            figures.push(f("1000 rps p50", p50));
            figures.push(f("1000 rps p99", 200.0));
            figures.push(f("new connections", 10_000.0));
        }
        section(&figures, &[], ("before", "still"), &Default::default()).markdown
    }

    #[test]
    fn a_machine_that_changed_between_phases_is_called_out() {
        let steady = section_with(50.0, 54.0);
        assert!(steady.contains("| 1000 rps p50 | 50 µs | 54 µs | 1.08 | 50 µs | 1.00 |"));
        assert!(!steady.contains("WARNING"), "{steady}");
        let moved = section_with(50.0, 64.0);
        assert!(
            moved.contains("WARNING") && moved.contains("1000 rps p50 1.28× in large mesh"),
            "{moved}"
        );
    }
}
