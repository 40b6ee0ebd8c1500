//! Live reload of `agent.toml` (SIGHUP, `weft-agent reload`): what may
//! change while the agent runs, and what did.
//!
//! Services — with their checks, upstreams and cgroups — may be added,
//! removed or changed; everything else (node name, addresses, servers,
//! credentials, eBPF settings) is fixed for the life of the process, and a
//! file that changes it is refused, naming the field: such changes take a
//! restart, which an in-place upgrade makes without dropping connections.
//! The plan is pure; `run` applies it.
use std::collections::BTreeMap;

use crate::config::{AgentConfig, ServiceConfig};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReloadError {
    #[error(
        "{0} cannot change while the agent runs (only services can): \
         start the agent anew with it (`weft-agent --config` over the running \
         one upgrades in place, keeping connections)"
    )]
    Fixed(String),
}

/// What a reload changes.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub added: Vec<ServiceConfig>,
    pub removed: Vec<ServiceConfig>,
    /// (as it was, as it is now), by service id.
    pub changed: Vec<(ServiceConfig, ServiceConfig)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// One line for the operator: `added api-2; removed web-1; changed db-1`.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "no change".into();
        }
        let ids = |what: &str, ids: Vec<&str>| {
            (!ids.is_empty()).then(|| format!("{what} {}", ids.join(", ")))
        };
        [
            ids("added", self.added.iter().map(|s| s.id.as_str()).collect()),
            ids(
                "removed",
                self.removed.iter().map(|s| s.id.as_str()).collect(),
            ),
            ids(
                "changed",
                self.changed.iter().map(|(_, s)| s.id.as_str()).collect(),
            ),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
    }
}

/// The first field other than `service` whose value differs, by name.
fn fixed_field_changed(old: &AgentConfig, new: &AgentConfig) -> Option<String> {
    // The token is never serialized (a secret): compared on its own.
    if old.token != new.token {
        return Some("token".into());
    }
    let as_map = |c: &AgentConfig| -> BTreeMap<String, serde_json::Value> {
        match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(m)) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        }
    };
    let (a, b) = (as_map(old), as_map(new));
    a.keys()
        .chain(b.keys())
        .filter(|k| k.as_str() != "services")
        .find(|k| a.get(*k) != b.get(*k))
        .cloned()
}

/// What reloading from `old` to `new` does, or why it may not.
pub fn plan(old: &AgentConfig, new: &AgentConfig) -> Result<Plan, ReloadError> {
    if let Some(field) = fixed_field_changed(old, new) {
        return Err(ReloadError::Fixed(field));
    }
    let before: BTreeMap<&str, &ServiceConfig> =
        old.services.iter().map(|s| (s.id.as_str(), s)).collect();
    let after: BTreeMap<&str, &ServiceConfig> =
        new.services.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut plan = Plan::default();
    for (id, s) in &after {
        match before.get(id) {
            None => plan.added.push((*s).clone()),
            Some(was) if was != s => plan.changed.push(((*was).clone(), (*s).clone())),
            Some(_) => {}
        }
    }
    for (id, s) in &before {
        if !after.contains_key(id) {
            plan.removed.push((*s).clone());
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
node_name = "node-a"
datacenter = "dc1"
servers = ["127.0.0.1:8502"]
advertise_addr = "10.0.0.1"
data_dir = "/var/lib/weft-agent"
ebpf = false
token = "secret-a"

[[service]]
name = "web"
port = 8000

[[service]]
name = "api"
port = 8080
"#;

    fn parse(text: &str) -> AgentConfig {
        AgentConfig::parse(text, "agent.toml").unwrap()
    }

    #[test]
    fn the_same_file_is_no_change() {
        let plan = plan(&parse(BASE), &parse(BASE)).unwrap();
        assert!(plan.is_empty());
        assert_eq!(plan.summary(), "no change");
    }

    #[test]
    fn services_added_removed_and_changed_are_told_apart() {
        let new = BASE.replace(
            "[[service]]\nname = \"web\"\nport = 8000\n",
            "[[service]]\nname = \"db\"\nport = 5432\n",
        ) + "tags = [\"v2\"]\n";
        let plan = plan(&parse(BASE), &parse(&new)).unwrap();
        assert_eq!(plan.summary(), "added db; removed web; changed api");
        assert_eq!(plan.changed[0].1.tags, vec!["v2".to_string()]);
    }

    #[test]
    fn other_fields_are_refused_by_name() {
        for (from, to, field) in [
            (
                "node_name = \"node-a\"",
                "node_name = \"node-b\"",
                "node_name",
            ),
            ("ebpf = false", "ebpf = true", "ebpf"),
            (
                "advertise_addr = \"10.0.0.1\"",
                "advertise_addr = \"10.0.0.2\"",
                "advertise_addr",
            ),
            ("token = \"secret-a\"", "token = \"secret-b\"", "token"),
        ] {
            let err = plan(&parse(BASE), &parse(&BASE.replace(from, to))).unwrap_err();
            assert_eq!(err, ReloadError::Fixed(field.into()));
            assert!(err.to_string().starts_with(field), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        let err = plan(
            &parse(BASE),
            &parse(&format!("drain_timeout = \"9s\"\n{BASE}")),
        )
        .unwrap_err();
        assert_eq!(err, ReloadError::Fixed("drain_timeout".into()));
    }
}
