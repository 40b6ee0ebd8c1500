//! What one change costs the agent's view at the large mesh's size, in
//! process and without root: the view holds 1,000 services (each with a
//! virtual IP), 10,000 instances on 1,000 nodes, 1,000 intentions and 100
//! routers, as `weft-bench-populate fill` writes them; then changes of
//! each kind are applied one at a time and published as the watch task
//! does (apply, publish a snapshot with its lookups built, the snapshot
//! before it dropped). Each change is timed on its own; the figures are
//! microseconds per change, min / median / max, and the 99th percentile.
//!
//! This is the work every agent does for every change the servers make,
//! on its background thread: what it costs sets how much of a core a mesh
//! changing ten times a second takes from the connections it carries.
//! Like the node benchmark's rounds, the run waits (bounded) for a quiet
//! machine and records the load at its start and end.
use std::time::Instant;

use weft_agent::shared_view::SharedView;
use weft_agent::view::View;
use weft_api::proto::{self, change::Change as P, watch_event::Event};
use weft_bench::mesh_shape::{
    http_defaults, instance, intention, node_address, node_name, router, service_name,
};

use crate::quiet;
use crate::report::{number, Figure, Section};

const NODES: usize = 1000;
const SERVICES: usize = 1000;
const PER_SERVICE: usize = 10;
const INTENTIONS: usize = 1000;
const ROUTERS: usize = 100;

/// Changes of each kind timed (`--quick`: a fifth).
const CHANGES: usize = 2000;

/// The virtual IP of service `s` (the servers assign them from
/// 240.0.0.0/4; which ones does not matter here).
fn vip(s: usize) -> String {
    format!("240.0.{}.{}", s >> 8, s & 0xff)
}

fn config_entry(json: String) -> proto::ConfigEntry {
    let v: serde_json::Value = serde_json::from_str(&json).expect("the shape's JSON");
    proto::ConfigEntry {
        kind: v["Kind"].as_str().unwrap_or_default().into(),
        name: v["Name"].as_str().unwrap_or_default().into(),
        json,
        ..Default::default()
    }
}

/// The whole large mesh, as one snapshot.
fn snapshot() -> proto::WatchEvent {
    let nodes = (0..NODES)
        .map(|i| proto::Node {
            name: node_name(i),
            address: node_address(i),
            datacenter: "dc1".into(),
            ..Default::default()
        })
        .collect();
    let instances = (0..SERVICES)
        .flat_map(|s| (0..PER_SERVICE).map(move |k| instance(s, k, PER_SERVICE, NODES, true)))
        .collect();
    let vips = (0..SERVICES)
        .map(|s| proto::ServiceVip {
            service: service_name(s),
            vip: vip(s),
        })
        .collect();
    let intentions = (0..INTENTIONS)
        .map(|i| intention(i, SERVICES, false))
        .collect();
    let config_entries = (0..(ROUTERS + 3).min(SERVICES))
        .map(|s| config_entry(http_defaults(s)))
        .chain((0..ROUTERS).map(|s| config_entry(router(s, SERVICES))))
        .collect();
    proto::WatchEvent {
        index: 1,
        event: Some(Event::Snapshot(proto::StateSnapshot {
            nodes,
            instances,
            vips,
            intentions,
            config_entries,
            ..Default::default()
        })),
    }
}

/// The `n`th change of `kind`: each kind cycles through the mesh as the
/// churn does, so no two consecutive changes touch the same thing.
fn change(kind: Kind, n: usize) -> P {
    let s = n % SERVICES;
    // Every pass through what a kind changes flips back.
    let flipped = |period: usize| (n / period).is_multiple_of(2);
    match kind {
        Kind::Health => P::InstanceUpsert(instance(s, 0, PER_SERVICE, NODES, !flipped(SERVICES))),
        Kind::Intention => {
            P::IntentionUpsert(intention(n % INTENTIONS, SERVICES, flipped(INTENTIONS)))
        }
        Kind::Move => {
            let mut i = instance(s, 0, PER_SERVICE, NODES, true);
            if flipped(SERVICES) {
                i.port += 10_000;
            }
            P::InstanceUpsert(i)
        }
        Kind::Router => {
            // The same router, its prefix route's timeout changed.
            let json = router(n % ROUTERS, SERVICES)
                .replace("\"2s\"", if flipped(ROUTERS) { "\"3s\"" } else { "\"2s\"" });
            P::ConfigUpsert(config_entry(json))
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Health,
    Intention,
    Move,
    Router,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Health, Kind::Intention, Kind::Move, Kind::Router];

    fn describe(self) -> &'static str {
        match self {
            Kind::Health => "an instance's health flips",
            Kind::Intention => "an intention's action flips",
            Kind::Move => "an instance moves to another port",
            Kind::Router => "a service-router changes",
        }
    }
}

pub struct Run {
    pub figures: Vec<Figure>,
    pub sections: Vec<Section>,
    /// The machine's load around the run, for the JSON results.
    pub extra: serde_json::Value,
}

pub fn run(quick: bool) -> anyhow::Result<Run> {
    let changes = if quick { CHANGES / 5 } else { CHANGES };
    let quiet_wait = quiet::wait_limit(quick);
    let (start_load, waited, is_quiet) = quiet::wait_for_quiet(quiet_wait)?;
    let shared = SharedView::default();
    let mut working = View::default();
    let started = Instant::now();
    working.apply(snapshot())?;
    shared.publish(&mut working);
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let view = shared.load();
    anyhow::ensure!(
        view.instances.len() == SERVICES * PER_SERVICE
            && view.intentions.len() == INTENTIONS
            && view.entries.iter().count() == ROUTERS + (ROUTERS + 3).min(SERVICES),
        "the snapshot did not load: {} instances, {} intentions",
        view.instances.len(),
        view.intentions.len()
    );
    drop(view);

    let mut figures = vec![Figure::new(
        "the large snapshot applied and published",
        "ms",
        vec![load_ms],
    )];
    let mut md = format!(
        "The view holds {SERVICES} services with a virtual IP each, {} instances on {NODES} nodes, {INTENTIONS} intentions and {ROUTERS} routers; {changes} changes of each kind, each applied and published on its own (as the watch task does when changes come one at a time), timed one by one.\n\n\
         | change | median µs | p99 µs | max µs |\n|---|---|---|---|\n",
        SERVICES * PER_SERVICE
    );
    let mut index = 1;
    for kind in Kind::ALL {
        let mut samples = Vec::with_capacity(changes);
        for n in 0..changes {
            index += 1;
            let event = proto::WatchEvent {
                index,
                event: Some(Event::Changes(proto::ChangeSet {
                    changes: vec![proto::Change {
                        change: Some(change(kind, n)),
                    }],
                })),
            };
            let t = Instant::now();
            working.apply(event)?;
            shared.publish(&mut working);
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let f = Figure::new(
            format!("one change applied and published: {}", kind.describe()),
            "µs",
            samples,
        );
        md += &format!(
            "| {} | {} | {} | {} |\n",
            kind.describe(),
            number(f.median()),
            number(f.percentile(99.0)),
            number(f.max())
        );
        figures.push(f);
    }
    let load = quiet::RoundLoad {
        round: 0,
        start: start_load,
        end: quiet::load_average()?,
        waited,
        quiet: is_quiet,
    };
    let (mut load_md, warnings) = quiet::section(std::slice::from_ref(&load), quiet_wait);
    for w in &warnings {
        eprintln!("WARNING view: {w}");
        load_md += &format!("\n**{w}**\n");
    }
    Ok(Run {
        figures,
        sections: vec![
            Section::new("One change to the large view", md),
            Section::new("Machine load", load_md),
        ],
        extra: serde_json::json!({ "round_load": [load.to_json()] }),
    })
}
