//! Services registered through the agent's local HTTP API
//! (`PUT /v1/agent/service/register`, Consul's shape) rather than written in
//! agent.toml. They are kept in `<data_dir>/services.json` (0600, written
//! whole and renamed into place), so that a restart or an upgrade keeps
//! them, as Consul's agent keeps its registrations.
//!
//! The running configuration is agent.toml with these services added as
//! `[[service]]` blocks after it: the file's own checks (names, ports,
//! addresses, check kinds and durations, unique ids) judge them too, and a
//! reload keeps them.
//!
//! Checks added through `PUT /v1/agent/check/register` to services of
//! agent.toml are kept apart, in `<data_dir>/checks.json` ([`ApiCheck`]),
//! and joined to their service's `[[service.check]]` list
//! ([`merge_checks`]); one whose service has left the file is dropped.
//! Checks of services registered through the API join their registration.
//!
//! Fields are Consul's (`ID`, `Name`, `Port`, `Address`, `Tags`, `Meta`,
//! `Check`, `Checks` with `CheckID`, `HTTP`, `TCP`, `GRPC`, `TTL`,
//! `Interval`, `Timeout`, `DeregisterCriticalServiceAfter`, `Name`, `Notes`,
//! `Status`); any other is
//! refused by name rather than ignored.
use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;

/// The file, in the data directory.
pub const FILE_NAME: &str = "services.json";
/// The checks on agent.toml's services, in the data directory.
pub const CHECKS_FILE_NAME: &str = "checks.json";

#[derive(Debug, thiserror::Error)]
pub enum RegisteredError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
    #[error("{0}")]
    Body(String),
}

/// The keys a registration takes, in weft's spelling.
const REGISTRATION_KEYS: weft_api::consul_keys::Schema = weft_api::consul_keys::Schema {
    known: &[&[
        "ID",
        "Name",
        "Port",
        "Address",
        "Tags",
        "Meta",
        "Check",
        "Checks",
        "CheckID",
        "HTTP",
        "TCP",
        "GRPC",
        "TTL",
        "Interval",
        "Timeout",
        "DeregisterCriticalServiceAfter",
        "Notes",
        "Status",
    ]],
    user_keyed: &["Meta"],
    tenancy: &["Namespace", "Partition"],
};

/// One service as Consul's `agent/service/register` takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct RegisteredService {
    #[serde(rename = "ID", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub name: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<RegisteredCheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<RegisteredCheck>,
}

impl RegisteredCheck {
    /// Refuses a target a check added through the local API may not probe.
    /// The agent probes from its own cgroup, which the egress policy does
    /// not hold, and reports what it found: a check could otherwise carry
    /// a workload's data out of an `egress = "deny"` node, or scan the
    /// network for it. Allowed: the service's own address, loopback and
    /// this node's address, as IP addresses or `localhost`.
    pub fn check_target(&self, service: IpAddr, config: &AgentConfig) -> Result<(), String> {
        let (field, host) = if let Some(url) = &self.http {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| format!("HTTP {url:?} is not a URL: {e}"))?;
            ("HTTP", uri.host().unwrap_or_default().to_string())
        } else if let Some(addr) = self.tcp.as_ref().or(self.grpc.as_ref()) {
            let field = if self.tcp.is_some() { "TCP" } else { "GRPC" };
            let addr = addr.split('/').next().unwrap_or_default();
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            (field, host.to_string())
        } else {
            return Ok(());
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let allowed = bare.eq_ignore_ascii_case("localhost")
            || bare.parse::<IpAddr>().is_ok_and(|ip| {
                let ip = ip.to_canonical();
                ip.is_loopback()
                    || ip == service.to_canonical()
                    || ip == config.advertise_addr.to_canonical()
            });
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "{field}: a check added through the local API probes its service's own address \
                 ({service}), loopback or this node's ({}), not {host:?}",
                config.advertise_addr
            ))
        }
    }
}

/// One check of a registered service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct RegisteredCheck {
    #[serde(rename = "CheckID", default, skip_serializing_if = "Option::is_none")]
    pub check_id: Option<String>,
    #[serde(rename = "HTTP", default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(rename = "TCP", default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(rename = "GRPC", default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    #[serde(rename = "TTL", default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregister_critical_service_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// The initial status of a TTL check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A check added through the local API to a service of agent.toml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct ApiCheck {
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub check: RegisteredCheck,
}

/// Everything registered through the local API that is kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registered {
    pub services: Vec<RegisteredService>,
    pub checks: Vec<ApiCheck>,
}

/// The agent.toml shape of a service block.
#[derive(Serialize)]
struct TomlService<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    name: &'a str,
    port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<&'a str>,
    tags: &'a [String],
    meta: &'a BTreeMap<String, String>,
    check: Vec<TomlCheck<'a>>,
}

#[derive(Serialize)]
struct TomlCheck<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deregister_critical_service_after: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notes: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
}

impl Registered {
    /// What is kept once the operator's file `file` has its say: a service
    /// whose id the file now defines is the file's (as Consul's agent lets
    /// its configuration replace a registration of the same id), so the
    /// API's registration of it goes, with the checks added to it; so does a
    /// registration with a check whose id the file now gives one of its own
    /// checks, and a check added to a file service under such an id. Without this the file could not be loaded at all, and
    /// the agent would not start. Returns the ids of what went.
    pub fn yielding_to(&self, file: &crate::config::AgentConfig) -> (Registered, Vec<String>) {
        let services: std::collections::HashSet<&str> =
            file.services.iter().map(|s| s.id.as_str()).collect();
        let checks: std::collections::HashSet<&str> = (file.services.iter())
            .flat_map(|s| s.checks.iter().map(|c| c.id.as_str()))
            .collect();
        let mut gone = Vec::new();
        let mut kept = Registered::default();
        for service in &self.services {
            let inline = service.check.iter().chain(&service.checks);
            let check_taken = inline
                .filter_map(|c| c.check_id.as_deref())
                .any(|id| checks.contains(id));
            if services.contains(service.id()) || check_taken {
                gone.push(service.id().to_string());
            } else {
                kept.services.push(service.clone());
            }
        }
        for check in &self.checks {
            let its_service_went = gone.contains(&check.service_id);
            let id_taken = (check.check.check_id.as_deref()).is_some_and(|id| checks.contains(id));
            if its_service_went || id_taken {
                if id_taken {
                    gone.extend(check.check.check_id.clone());
                }
            } else {
                kept.checks.push(check.clone());
            }
        }
        (kept, gone)
    }

    /// What the local API's rules of today admit of what was kept: each
    /// service's address and its checks' targets
    /// ([`RegisteredService::check_addresses`]), and each check added to a
    /// file service ([`RegisteredCheck::check_target`]), against the file
    /// `file`. Registrations kept by an agent of before those rules (or
    /// before a reload gave the agent a port one claims) would otherwise
    /// be taken over or probed on every start. Returns what is refused,
    /// each with its reason.
    pub fn admitted_by(&self, file: &AgentConfig) -> (Registered, Vec<String>) {
        let mut refused = Vec::new();
        let mut kept = Registered::default();
        for service in &self.services {
            match service.check_addresses(file) {
                Ok(()) => kept.services.push(service.clone()),
                Err(why) => refused.push(format!("service {}: {why}", service.id())),
            }
        }
        for check in &self.checks {
            // Its service: one of the file's, or one registered here.
            let address = (file.services.iter())
                .find(|s| s.id == check.service_id)
                .map(|s| Ok(s.address))
                .or_else(|| {
                    (kept.services.iter())
                        .find(|s| s.id() == check.service_id)
                        .map(|s| {
                            let text = s.address.as_deref().unwrap_or("127.0.0.1");
                            text.parse::<IpAddr>()
                                .map_err(|_| format!("Address {text:?} is not an IP address"))
                        })
                });
            let verdict = match address {
                Some(Ok(a)) => check.check.check_target(a, file),
                Some(Err(why)) => Err(why),
                // A service that is gone: a later registration of its id
                // would take the check over, never held to these rules.
                None => Err(format!("service {:?} is no longer here", check.service_id)),
            };
            match verdict {
                Ok(()) => kept.checks.push(check.clone()),
                Err(why) => refused.push(format!(
                    "check {} of {}: {why}",
                    check.check.check_id.as_deref().unwrap_or("(no id)"),
                    check.service_id
                )),
            }
        }
        (kept, refused)
    }
}

impl RegisteredService {
    /// Parses a request body, its keys read as Consul's agent reads them
    /// (any case, snake_case); an unknown field is named.
    pub fn from_json(body: &[u8]) -> Result<Self, RegisteredError> {
        let bad = |e: &dyn std::fmt::Display| RegisteredError::Body(e.to_string());
        let mut doc: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(&e))?;
        weft_api::consul_keys::normalize(&mut doc, &REGISTRATION_KEYS).map_err(|e| bad(&e))?;
        let service: RegisteredService = serde_json::from_value(doc).map_err(|e| bad(&e))?;
        service.check_ids_are_its_own()?;
        Ok(service)
    }

    /// The agent names a service's checks `service:<id>` and
    /// `service:<id>:<n>`: a registration may use those of its own id, not
    /// another service's (which would shadow that service's checks, and
    /// refuse its registration or the agent's file for the duplicate).
    fn check_ids_are_its_own(&self) -> Result<(), RegisteredError> {
        let own = self.id();
        for id in (self.check.iter().chain(&self.checks)).filter_map(|c| c.check_id.as_deref()) {
            let Some(named) = id.strip_prefix("service:") else {
                continue;
            };
            let numbered = |rest: &str| {
                rest.strip_prefix(':')
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            };
            if named != own && !named.strip_prefix(own).is_some_and(numbered) {
                return Err(RegisteredError::Body(format!(
                    "CheckID {id:?}: ids beginning with \"service:\" name the agent's checks of a service; this one is not \"service:{own}\"'s"
                )));
            }
        }
        Ok(())
    }

    /// Refuses an address a registration through the local API may not
    /// take. In transparent mode an instance's address is taken over for
    /// the mesh's workloads, so a workload that may register its own
    /// service could otherwise claim any address: the agent's own ports
    /// (workloads' tokens would go to its instances), a link-local one
    /// (the cloud metadata service), or another host's. Allowed: loopback
    /// and this node's address, at a port that is not the agent's.
    pub fn check_address(&self, config: &AgentConfig) -> Result<(), String> {
        let text = self.address.as_deref().unwrap_or("127.0.0.1");
        let ip: IpAddr = text
            .parse()
            .map_err(|_| format!("Address {text:?} is not an IP address"))?;
        let ip = ip.to_canonical();
        let node = config.advertise_addr.to_canonical();
        if !(ip.is_loopback() || ip == node) {
            return Err(format!(
                "Address {text}: the local API registers this node's instances, at loopback or {node}; \
                 register another host's service through the servers' catalog API"
            ));
        }
        if config.is_own_address(ip, self.port) {
            return Err(format!(
                "Address {text}, Port {}: that is one of the agent's own ports",
                self.port
            ));
        }
        Ok(())
    }

    /// [`check_address`](Self::check_address), and each of its checks'
    /// targets ([`RegisteredCheck::check_target`]).
    pub fn check_addresses(&self, config: &AgentConfig) -> Result<(), String> {
        self.check_address(config)?;
        let text = self.address.as_deref().unwrap_or("127.0.0.1");
        let own: IpAddr = text
            .parse()
            .map_err(|_| format!("Address {text:?} is not an IP address"))?;
        for check in self.check.iter().chain(&self.checks) {
            check.check_target(own, config)?;
        }
        Ok(())
    }

    /// Where the instance listens (its Address, 127.0.0.1 when none), if
    /// the Address is an IP address.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        let ip: IpAddr = self
            .address
            .as_deref()
            .unwrap_or("127.0.0.1")
            .parse()
            .ok()?;
        Some(std::net::SocketAddr::new(ip, self.port))
    }

    /// The service id (Consul: the name when there is no ID).
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.name)
    }

    fn toml(&self) -> TomlService<'_> {
        TomlService {
            id: self.id.as_deref(),
            name: &self.name,
            port: self.port,
            address: self.address.as_deref(),
            tags: &self.tags,
            meta: &self.meta,
            check: self
                .check
                .iter()
                .chain(&self.checks)
                .map(toml_check)
                .collect(),
        }
    }
}

fn toml_check(c: &RegisteredCheck) -> TomlCheck<'_> {
    TomlCheck {
        id: c.check_id.as_deref(),
        http: c.http.as_deref(),
        tcp: c.tcp.as_deref(),
        grpc: c.grpc.as_deref(),
        ttl: c.ttl.as_deref(),
        interval: c.interval.as_deref(),
        timeout: c.timeout.as_deref(),
        deregister_critical_service_after: c.deregister_critical_service_after.as_deref(),
        name: c.name.as_deref(),
        notes: c.notes.as_deref(),
        status: c.status.as_deref(),
    }
}

/// `services` as `[[service]]` blocks, to follow agent.toml's text.
pub fn as_toml(services: &[RegisteredService]) -> String {
    #[derive(Serialize)]
    struct Blocks<'a> {
        service: Vec<TomlService<'a>>,
    }
    if services.is_empty() {
        return String::new();
    }
    let blocks = Blocks {
        service: services.iter().map(RegisteredService::toml).collect(),
    };
    // Plain data of strings, numbers and tables: serializing cannot fail.
    format!(
        "\n# Registered through the local API ({FILE_NAME}).\n{}",
        toml::to_string(&blocks).unwrap_or_default()
    )
}

/// `text` (agent.toml with the registered services after it, which
/// `config` is) with each of `checks` added to its service's
/// `[[service.check]]` list. The service's checks without an id get the id
/// they run under (Consul's default ids count the checks). Checks of
/// services `config` does not have are left out.
pub fn merge_checks(
    text: &str,
    config: &crate::config::AgentConfig,
    checks: &[ApiCheck],
) -> Result<String, RegisteredError> {
    let bad = |e: &dyn std::fmt::Display| RegisteredError::Body(e.to_string());
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| bad(&e))?;
    let Some(toml::Value::Array(services)) = doc.get_mut("service") else {
        return Ok(text.to_string());
    };
    for table in services.iter_mut().filter_map(toml::Value::as_table_mut) {
        let id = table
            .get("id")
            .or_else(|| table.get("name"))
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let added: Vec<&ApiCheck> = checks.iter().filter(|c| c.service_id == id).collect();
        let Some(running) = config.services.iter().find(|s| s.id == id) else {
            continue;
        };
        if added.is_empty() {
            continue;
        }
        let list = table
            .entry("check")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        let toml::Value::Array(list) = list else {
            return Err(bad(&format!("service {id:?}: check is not a list")));
        };
        for (check, now) in list.iter_mut().zip(&running.checks) {
            if let Some(t) = check.as_table_mut() {
                t.entry("id")
                    .or_insert_with(|| toml::Value::String(now.id.clone()));
            }
        }
        for c in added {
            list.push(toml::Value::try_from(toml_check(&c.check)).map_err(|e| bad(&e))?);
        }
    }
    toml::to_string(&doc).map_err(|e| bad(&e))
}

/// Where the registrations of the agent with `data_dir` are kept.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// The registrations kept in `data_dir` (none when there is no file).
pub fn load(data_dir: &Path) -> Result<Vec<RegisteredService>, RegisteredError> {
    load_json(&path(data_dir))
}

/// The services and checks kept in `data_dir`.
pub fn load_all(data_dir: &Path) -> Result<Registered, RegisteredError> {
    Ok(Registered {
        services: load(data_dir)?,
        checks: load_json(&data_dir.join(CHECKS_FILE_NAME))?,
    })
}

fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, RegisteredError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RegisteredError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| RegisteredError::Bad {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Keeps `services` in `data_dir`: written to a 0600 temporary file, synced,
/// renamed over the old one.
pub fn save(data_dir: &Path, services: &[RegisteredService]) -> Result<(), RegisteredError> {
    save_json(data_dir, FILE_NAME, services)
}

/// Keeps `checks` in `data_dir` as [`save`] keeps services.
pub fn save_checks(data_dir: &Path, checks: &[ApiCheck]) -> Result<(), RegisteredError> {
    save_json(data_dir, CHECKS_FILE_NAME, checks)
}

fn save_json<T: Serialize>(
    data_dir: &Path,
    name: &str,
    items: &[T],
) -> Result<(), RegisteredError> {
    let path = data_dir.join(name);
    let tmp = data_dir.join(format!(".{name}.tmp"));
    let io = |source| RegisteredError::Io {
        path: path.clone(),
        source,
    };
    let body =
        serde_json::to_vec_pretty(items).map_err(|e| RegisteredError::Body(e.to_string()))?;
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(&body).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;

    #[test]
    fn a_registration_takes_no_other_services_check_ids() {
        for id in [
            "service:web-1",
            "service:web-1:1",
            "service:db-1x",
            "service:db-1:x",
        ] {
            let body = format!(
                r#"{{"ID":"db-1","Name":"db","Port":1,"Checks":[{{"CheckID":"{id}","TTL":"10s"}}]}}"#
            );
            let e = RegisteredService::from_json(body.as_bytes()).unwrap_err();
            assert!(
                e.to_string().contains("is not \"service:db-1\"'s"),
                "{id}: {e}"
            );
        }
        for id in ["service:db-1", "service:db-1:2", "beat"] {
            let body = format!(
                r#"{{"ID":"db-1","Name":"db","Port":1,"Check":{{"CheckID":"{id}","TTL":"10s"}}}}"#
            );
            assert!(
                RegisteredService::from_json(body.as_bytes()).is_ok(),
                "{id}"
            );
        }
    }

    const BASE: &str = r#"
node_name = "node-a"
datacenter = "dc1"
servers = ["127.0.0.1:8502"]
advertise_addr = "10.0.0.1"
data_dir = "/var/lib/weft-agent"
ebpf = false

[[service]]
name = "web"
port = 8000
  [[service.upstream]]
  name = "api"
  local_port = 9191
"#;

    fn db() -> RegisteredService {
        RegisteredService::from_json(
            br#"{"ID":"db-1","Name":"db","Port":5432,"Tags":["primary"],
                 "Meta":{"version":"15"},"Check":{"TTL":"10s"},
                 "Checks":[{"CheckID":"db-tcp","TCP":"127.0.0.1:5432","Interval":"5s"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn kept_registrations_are_held_to_todays_rules_at_start() {
        let file = AgentConfig::parse(BASE, "agent.toml").unwrap();
        let service = |json: &str| RegisteredService::from_json(json.as_bytes()).unwrap();
        let check = |json: &str| ApiCheck {
            service_id: "web".into(),
            check: serde_json::from_str(json).unwrap(),
        };
        let kept = Registered {
            services: vec![
                db(),
                // web's upstream port, the metadata service, and a check
                // probing another host.
                service(r#"{"ID":"thief","Name":"thief","Port":9191}"#),
                service(r#"{"ID":"meta","Name":"meta","Address":"169.254.169.254","Port":80}"#),
                service(
                    r#"{"ID":"scan","Name":"scan","Port":7000,
                        "Check":{"TCP":"10.9.9.9:22","Interval":"5s"}}"#,
                ),
            ],
            checks: vec![
                check(r#"{"CheckID":"ok","HTTP":"http://127.0.0.1:8000/health","Interval":"5s"}"#),
                check(r#"{"CheckID":"out","HTTP":"http://10.9.9.9/","Interval":"5s"}"#),
                ApiCheck {
                    service_id: "db-1".into(),
                    check: serde_json::from_str(
                        r#"{"CheckID":"db-ok","TCP":"127.0.0.1:5432","Interval":"5s"}"#,
                    )
                    .unwrap(),
                },
                ApiCheck {
                    service_id: "gone".into(),
                    check: serde_json::from_str(r#"{"CheckID":"orphan","TTL":"10s"}"#).unwrap(),
                },
            ],
        };
        let (admitted, refused) = kept.admitted_by(&file);
        let ids: Vec<&str> = admitted.services.iter().map(|s| s.id()).collect();
        assert_eq!(ids, ["db-1"]);
        assert_eq!(
            admitted.checks,
            vec![kept.checks[0].clone(), kept.checks[2].clone()]
        );
        assert_eq!(refused.len(), 5, "{refused:?}");
        for (said, why) in refused.iter().zip([
            "service thief: ",
            "service meta: Address 169.254.169.254",
            "service scan: ",
            "check out of web: ",
            "check orphan of gone: service \"gone\" is no longer here",
        ]) {
            assert!(said.starts_with(why), "{said}");
        }
        assert!(refused[0].contains("agent's own ports"), "{}", refused[0]);
    }

    #[test]
    fn a_registration_becomes_a_service_of_the_running_configuration() {
        let text = format!("{BASE}{}", as_toml(&[db()]));
        let config = AgentConfig::parse(&text, "agent.toml").unwrap();
        let s = &config.services[1];
        assert_eq!(
            (s.id.as_str(), s.name.as_str(), s.port),
            ("db-1", "db", 5432)
        );
        assert_eq!(s.tags, vec!["primary".to_string()]);
        assert_eq!(s.meta["version"], "15");
        assert_eq!(s.checks.len(), 2);
        assert_eq!(s.checks[1].id, "db-tcp");
        // web's upstream stays web's.
        assert_eq!(config.services[0].upstreams.len(), 1);
        assert!(config.services[1].upstreams.is_empty());
    }

    #[test]
    fn the_file_takes_the_ids_it_defines_from_the_apis_registrations() {
        let added = |service: &str, json: &[u8]| ApiCheck {
            service_id: service.into(),
            check: serde_json::from_slice(json).unwrap(),
        };
        let cache = RegisteredService::from_json(br#"{"ID":"cache-1","Name":"cache","Port":6379}"#)
            .unwrap();
        let queue = RegisteredService::from_json(
            br#"{"ID":"queue-1","Name":"queue","Port":5672,"Check":{"CheckID":"web-port","TTL":"5s"}}"#,
        )
        .unwrap();
        let registered = Registered {
            services: vec![db(), cache, queue],
            checks: vec![
                added("db-1", br#"{"CheckID":"db-extra","TTL":"5s"}"#),
                added(
                    "web",
                    br#"{"CheckID":"web-port","TCP":"127.0.0.1:8000","Interval":"5s"}"#,
                ),
                added("web", br#"{"CheckID":"web-ttl","TTL":"5s"}"#),
            ],
        };
        // Nothing in common: everything stays.
        let file = AgentConfig::parse(BASE, "agent.toml").unwrap();
        assert_eq!(
            registered.yielding_to(&file),
            (registered.clone(), Vec::new())
        );
        // The operator writes db-1 into the file, with a check named as one
        // added to web: the file's are kept, the API's go.
        let text = format!(
            "{BASE}[[service]]\nid = \"db-1\"\nname = \"db\"\nport = 6432\n  [[service.check]]\n  id = \"web-port\"\n  ttl = \"30s\"\n"
        );
        let file = AgentConfig::parse(&text, "agent.toml").unwrap();
        let (kept, gone) = registered.yielding_to(&file);
        assert_eq!(gone, ["db-1", "queue-1", "web-port"]);
        let services: Vec<&str> = kept.services.iter().map(|s| s.id()).collect();
        assert_eq!(services, ["cache-1"]);
        let checks: Vec<Option<&str>> = (kept.checks.iter())
            .map(|c| c.check.check_id.as_deref())
            .collect();
        assert_eq!(checks, [Some("web-ttl")]);
        // What is kept loads with the file (the whole registration did not).
        assert!(AgentConfig::parse(
            &format!("{text}{}", as_toml(&registered.services)),
            "agent.toml"
        )
        .is_err());
        let merged = merge_checks(
            &format!("{text}{}", as_toml(&kept.services)),
            &file,
            &kept.checks,
        );
        assert!(merged.is_ok(), "{merged:?}");
    }

    #[test]
    fn keys_in_any_case_as_consuls_agent_reads_them() {
        // What py-consul sends.
        let lower = RegisteredService::from_json(
            br#"{"name":"db","id":"db-1","port":5432,"meta":{"Team_Name":"x"},"checks":[{"ttl":"30s","check_id":"db-ttl"}]}"#,
        )
        .unwrap();
        let pascal = RegisteredService::from_json(
            br#"{"Name":"db","ID":"db-1","Port":5432,"Meta":{"Team_Name":"x"},"Checks":[{"TTL":"30s","CheckID":"db-ttl"}]}"#,
        )
        .unwrap();
        assert_eq!(lower, pascal);
        assert!(RegisteredService::from_json(br#"{"Name":"db","name":"db","Port":1}"#).is_err());
        assert!(
            RegisteredService::from_json(br#"{"Name":"db","Port":1,"Namespace":"ns"}"#)
                .unwrap_err()
                .to_string()
                .contains("not supported by weft yet")
        );
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_by_name() {
        let e =
            RegisteredService::from_json(br#"{"Name":"db","Port":1,"Connect":{}}"#).unwrap_err();
        assert!(e.to_string().contains("Connect"), "{e}");
        let e = RegisteredService::from_json(
            br#"{"Name":"db","Port":1,"Check":{"Shell":"/bin/sh","TTL":"1s"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("Shell"), "{e}");
        let bad = RegisteredService::from_json(br#"{"Name":"Not a name","Port":1}"#).unwrap();
        let e =
            AgentConfig::parse(&format!("{BASE}{}", as_toml(&[bad])), "agent.toml").unwrap_err();
        assert!(e.to_string().contains("name"), "{e}");
        // An id the file uses already.
        let clash = RegisteredService::from_json(br#"{"Name":"web","Port":8001}"#).unwrap();
        let e =
            AgentConfig::parse(&format!("{BASE}{}", as_toml(&[clash])), "agent.toml").unwrap_err();
        assert!(e.to_string().contains("already used"), "{e}");
    }

    #[test]
    fn checks_added_to_file_services_join_their_list_with_ids_pinned() {
        let text = format!("{BASE}  [[service.check]]\n  ttl = \"30s\"\n");
        let config = AgentConfig::parse(&text, "agent.toml").unwrap();
        assert_eq!(config.services[0].checks[0].id, "service:web");
        let added = |service: &str, json: &[u8]| ApiCheck {
            service_id: service.into(),
            check: serde_json::from_slice(json).unwrap(),
        };
        let checks = [
            added(
                "web",
                br#"{"CheckID":"web-tcp","TCP":"127.0.0.1:8000","Name":"port"}"#,
            ),
            added("gone", br#"{"CheckID":"x","TTL":"5s"}"#),
        ];
        let merged = merge_checks(&text, &config, &checks).unwrap();
        let config = AgentConfig::parse(&merged, "agent.toml").unwrap();
        let ids: Vec<&str> = config.services[0]
            .checks
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        // The file's check keeps its id though the service has two now.
        assert_eq!(ids, ["service:web", "web-tcp"]);
        assert_eq!(config.services[0].checks[1].name.as_deref(), Some("port"));
        assert_eq!(config.services[0].upstreams.len(), 1);
        assert_eq!(config.services.len(), 1);
    }

    #[test]
    fn kept_checks_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_all(dir.path()).unwrap(), Registered::default());
        let check = ApiCheck {
            service_id: "web".into(),
            check: serde_json::from_slice(br#"{"CheckID":"c","TTL":"5s","Status":"passing"}"#)
                .unwrap(),
        };
        save_checks(dir.path(), std::slice::from_ref(&check)).unwrap();
        save(dir.path(), &[db()]).unwrap();
        let all = load_all(dir.path()).unwrap();
        assert_eq!((all.services, all.checks), (vec![db()], vec![check]));
    }

    #[test]
    fn registrations_are_kept_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        save(dir.path(), &[db()]).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![db()]);
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        save(dir.path(), &[]).unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
    }
}
