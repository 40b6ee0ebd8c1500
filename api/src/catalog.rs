//! The service catalog's records: nodes, service instances and their health, with
//! the checks a write must pass (names, addresses, ports, tags, metadata).
//!
//! Virtual-IP allocation for services lives in [`crate::vip`] and is re-exported
//! here for convenience.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::{validate_name, NameError};
pub use crate::vip::{next_free_vip, Cidr, VipError, DEFAULT_VIP_CIDR};

/// Most metadata pairs on one node or instance.
pub const MAX_META_PAIRS: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_META_KEY_LEN: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_META_VALUE_LEN: usize = 512;
/// Metadata keys starting with this are reserved for weft itself.
pub const RESERVED_META_PREFIX: &str = "weft-";
/// Most tags on one instance.
pub const MAX_TAGS: usize = 64;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;
/// Longest instance id, in bytes.
pub const MAX_INSTANCE_ID_LEN: usize = 128;
/// Longest health-check output kept, in bytes.
pub const MAX_CHECK_OUTPUT_BYTES: usize = 4096;

/// A machine running an agent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    /// Where other agents reach this node (an IP address, no port).
    pub address: String,
    pub datacenter: String,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
    /// The node-level check: critical when the servers have not heard from
    /// the node's agent in time (Consul's `serfHealth`). Every instance on
    /// a critical node counts as critical.
    #[serde(default)]
    pub health: HealthStatus,
    #[serde(default)]
    pub health_output: String,
}

/// Health of a service instance, from its checks. Ordered from best to worst.
/// The start of a node's health output while it is in maintenance mode
/// (critical; only turning maintenance off lifts it).
pub const NODE_MAINTENANCE: &str = "node under maintenance";

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    #[default]
    Passing,
    Warning,
    Critical,
}

impl HealthStatus {
    /// The lowercase name: `passing`, `warning` or `critical`.
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthStatus::Passing => "passing",
            HealthStatus::Warning => "warning",
            HealthStatus::Critical => "critical",
        }
    }

    /// The worse of two statuses (an instance is as healthy as its worst check).
    pub fn worst(self, other: HealthStatus) -> HealthStatus {
        self.max(other)
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HealthStatus {
    type Err = CatalogError;
    fn from_str(s: &str) -> Result<Self, CatalogError> {
        match s {
            "passing" => Ok(HealthStatus::Passing),
            "warning" => Ok(HealthStatus::Warning),
            "critical" => Ok(HealthStatus::Critical),
            _ => Err(CatalogError::invalid(
                "health",
                format!("{s:?} is not one of passing, warning, critical"),
            )),
        }
    }
}

/// One running instance of a service on a node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInstance {
    /// Unique in the catalog.
    pub id: String,
    pub service: String,
    pub node: String,
    /// The workload's IP address on its node.
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    pub health: HealthStatus,
    #[serde(default)]
    pub check_output: String,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
    /// Consul's `DeregisterCriticalServiceAfter`: the servers deregister the
    /// instance once it has been critical (its own checks, or its node) for
    /// this many milliseconds; 0: never.
    #[serde(default)]
    pub deregister_critical_after_ms: u64,
}

/// Whether `ip` means something only on its own node (loopback, link-local,
/// unspecified): an instance there is reachable from its node alone, and
/// two nodes may each have one at the same address.
pub fn is_node_local(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_unicast_link_local()
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_link_local() || v4.is_unspecified())
        }
    }
}

impl ServiceInstance {
    /// Where the workload listens (`None` if its address is not an IP,
    /// which validation refuses).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.address.parse().ok()?, self.port))
    }
}

/// Why a catalog record was refused. The message starts with the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("{field}: {source}")]
    Name {
        field: String,
        #[source]
        source: NameError,
    },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl CatalogError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CatalogError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn name(field: &str, source: NameError) -> Self {
        CatalogError::Name {
            field: field.to_string(),
            source,
        }
    }

    /// The field the error is about, e.g. `port` or `meta.version`.
    pub fn field(&self) -> &str {
        match self {
            CatalogError::Name { field, .. } | CatalogError::Invalid { field, .. } => field,
        }
    }
}

/// Checks a node before it is written.
pub fn validate_node(node: &Node) -> Result<(), CatalogError> {
    validate_name(&node.name).map_err(|e| CatalogError::name("name", e))?;
    validate_address("address", &node.address)?;
    validate_name(&node.datacenter).map_err(|e| CatalogError::name("datacenter", e))?;
    validate_meta("meta", &node.meta)
}

/// Checks a service instance before it is written.
pub fn validate_service_instance(instance: &ServiceInstance) -> Result<(), CatalogError> {
    validate_instance_id("id", &instance.id)?;
    validate_name(&instance.service).map_err(|e| CatalogError::name("service", e))?;
    validate_name(&instance.node).map_err(|e| CatalogError::name("node", e))?;
    validate_address("address", &instance.address)?;
    if instance.port == 0 {
        return Err(CatalogError::invalid("port", "must be 1 to 65535, not 0"));
    }
    validate_tags("tags", &instance.tags)?;
    validate_meta("meta", &instance.meta)?;
    if instance.check_output.len() > MAX_CHECK_OUTPUT_BYTES {
        return Err(CatalogError::invalid(
            "check_output",
            format!(
                "too long ({} > {MAX_CHECK_OUTPUT_BYTES} bytes); truncate it with truncate_check_output",
                instance.check_output.len()
            ),
        ));
    }
    Ok(())
}

/// Cuts health-check output to [`MAX_CHECK_OUTPUT_BYTES`] at a character boundary.
pub fn truncate_check_output(output: &str) -> &str {
    if output.len() <= MAX_CHECK_OUTPUT_BYTES {
        return output;
    }
    let mut end = MAX_CHECK_OUTPUT_BYTES;
    while !output.is_char_boundary(end) {
        end -= 1;
    }
    &output[..end]
}

/// Checks an instance id: 1 to 128 ASCII letters, digits, `-`, `_`, `.` or `:`.
pub fn validate_instance_id(field: &str, id: &str) -> Result<(), CatalogError> {
    if id.is_empty() {
        return Err(CatalogError::invalid(field, "must not be empty"));
    }
    if id.len() > MAX_INSTANCE_ID_LEN {
        return Err(CatalogError::invalid(
            field,
            format!("too long ({} > {MAX_INSTANCE_ID_LEN} bytes)", id.len()),
        ));
    }
    if let Some((i, ch)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(CatalogError::invalid(
            field,
            format!(
                "bad character {ch:?} at position {} (allowed: letters, digits, '-', '_', '.', ':')",
                i + 1
            ),
        ));
    }
    Ok(())
}

/// Checks that `address` is an IPv4 or IPv6 address (no port, no host name).
pub fn validate_address(field: &str, address: &str) -> Result<(), CatalogError> {
    if address.is_empty() {
        return Err(CatalogError::invalid(field, "must not be empty"));
    }
    address.parse::<IpAddr>().map(|_| ()).map_err(|_| {
        CatalogError::invalid(
            field,
            format!("{address:?} is not an IP address (write e.g. 10.0.0.5, without a port)"),
        )
    })
}

/// Checks tags: at most 64, each 1 to 128 bytes without whitespace or control
/// characters, no duplicates. Errors name the tag as `FIELD[i]`.
pub fn validate_tags(field: &str, tags: &[String]) -> Result<(), CatalogError> {
    if tags.len() > MAX_TAGS {
        return Err(CatalogError::invalid(
            field,
            format!("too many tags ({} > {MAX_TAGS})", tags.len()),
        ));
    }
    for (i, tag) in tags.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if tag.is_empty() {
            return Err(CatalogError::invalid(f, "must not be empty"));
        }
        if tag.len() > MAX_TAG_LEN {
            return Err(CatalogError::invalid(
                f,
                format!("too long ({} > {MAX_TAG_LEN} bytes)", tag.len()),
            ));
        }
        if let Some(ch) = tag.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(CatalogError::invalid(
                f,
                format!(
                    "{tag:?} contains {ch:?}; whitespace and control characters are not allowed"
                ),
            ));
        }
        if tags[..i].contains(tag) {
            return Err(CatalogError::invalid(f, format!("duplicate tag {tag:?}")));
        }
    }
    Ok(())
}

/// Checks metadata: at most 64 pairs; keys 1 to 128 bytes of ASCII letters, digits,
/// `_` and `-`, not starting with `weft-`; values at most 512 bytes without control
/// characters. Errors name the pair as `FIELD.KEY`.
pub fn validate_meta(field: &str, meta: &BTreeMap<String, String>) -> Result<(), CatalogError> {
    if meta.len() > MAX_META_PAIRS {
        return Err(CatalogError::invalid(
            field,
            format!("too many pairs ({} > {MAX_META_PAIRS})", meta.len()),
        ));
    }
    for (key, value) in meta {
        let f = format!("{field}.{key}");
        if key.is_empty() {
            return Err(CatalogError::invalid(field, "keys must not be empty"));
        }
        if key.len() > MAX_META_KEY_LEN {
            return Err(CatalogError::invalid(
                f,
                format!("key too long ({} > {MAX_META_KEY_LEN} bytes)", key.len()),
            ));
        }
        if let Some(ch) = key
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(CatalogError::invalid(
                f,
                format!("bad character {ch:?} in key (allowed: letters, digits, '_', '-')"),
            ));
        }
        if key.starts_with(RESERVED_META_PREFIX) {
            return Err(CatalogError::invalid(
                f,
                format!("keys starting with {RESERVED_META_PREFIX:?} are reserved"),
            ));
        }
        if value.len() > MAX_META_VALUE_LEN {
            return Err(CatalogError::invalid(
                f,
                format!(
                    "value too long ({} > {MAX_META_VALUE_LEN} bytes)",
                    value.len()
                ),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(CatalogError::invalid(
                f,
                "value contains control characters",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            name: "node-a".into(),
            address: "10.77.0.2".into(),
            datacenter: "dc1".into(),
            meta: BTreeMap::new(),
            create_index: 0,
            modify_index: 0,
            ..Default::default()
        }
    }

    fn instance() -> ServiceInstance {
        ServiceInstance {
            id: "api-node-a-8080".into(),
            service: "api".into(),
            node: "node-a".into(),
            address: "127.0.0.1".into(),
            port: 8080,
            tags: vec!["v1".into()],
            meta: [("version".to_string(), "v1".to_string())].into(),
            health: HealthStatus::Passing,
            check_output: String::new(),
            create_index: 3,
            modify_index: 4,
            ..Default::default()
        }
    }

    fn err_field(r: Result<(), CatalogError>) -> (String, String) {
        let e = r.unwrap_err();
        (e.field().to_string(), e.to_string())
    }

    #[test]
    fn valid_records_pass() {
        assert_eq!(validate_node(&node()), Ok(()));
        assert_eq!(validate_service_instance(&instance()), Ok(()));
        let mut v6 = instance();
        v6.address = "::1".into();
        assert_eq!(validate_service_instance(&v6), Ok(()));
    }

    #[test]
    fn node_errors_name_the_field() {
        let mut n = node();
        n.name = "Node".into();
        let (f, msg) = err_field(validate_node(&n));
        assert_eq!(f, "name");
        assert!(
            msg.starts_with("name: bad character 'N' at position 1"),
            "{msg}"
        );
        let mut n = node();
        n.address = "node-a.local".into();
        let (f, msg) = err_field(validate_node(&n));
        assert_eq!(f, "address");
        assert!(msg.contains("is not an IP address"), "{msg}");
        let mut n = node();
        n.datacenter = String::new();
        assert_eq!(
            err_field(validate_node(&n)).1,
            "datacenter: must not be empty"
        );
    }

    #[test]
    fn instance_errors_name_the_field() {
        let mut i = instance();
        i.port = 0;
        assert_eq!(
            err_field(validate_service_instance(&i)).1,
            "port: must be 1 to 65535, not 0"
        );
        let mut i = instance();
        i.address = "127.0.0.1:8080".into();
        assert_eq!(err_field(validate_service_instance(&i)).0, "address");
        let mut i = instance();
        i.address = String::new();
        assert_eq!(
            err_field(validate_service_instance(&i)).1,
            "address: must not be empty"
        );
        let mut i = instance();
        i.id = "api/1".into();
        let (f, msg) = err_field(validate_service_instance(&i));
        assert_eq!(f, "id");
        assert!(msg.contains("bad character '/' at position 4"), "{msg}");
        let mut i = instance();
        i.id = String::new();
        assert_eq!(
            err_field(validate_service_instance(&i)).1,
            "id: must not be empty"
        );
        let mut i = instance();
        i.id = "a".repeat(129);
        assert!(err_field(validate_service_instance(&i))
            .1
            .contains("too long (129 > 128"));
        let mut i = instance();
        i.service = "api-".into();
        assert_eq!(
            err_field(validate_service_instance(&i)).1,
            "service: must not end with '-'"
        );
        let mut i = instance();
        i.node = "-n".into();
        assert_eq!(err_field(validate_service_instance(&i)).0, "node");
        let mut i = instance();
        i.check_output = "x".repeat(MAX_CHECK_OUTPUT_BYTES + 1);
        assert_eq!(err_field(validate_service_instance(&i)).0, "check_output");
    }

    #[test]
    fn tags_rules() {
        let t = |v: &[&str]| {
            validate_tags("tags", &v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(t(&["v1", "canary", "Zone=A"]), Ok(()));
        assert_eq!(err_field(t(&["v1", ""])).1, "tags[1]: must not be empty");
        assert_eq!(err_field(t(&["a b"])).0, "tags[0]");
        assert_eq!(
            err_field(t(&["a", "b", "a"])).1,
            "tags[2]: duplicate tag \"a\""
        );
        let long = "x".repeat(129);
        assert!(err_field(t(&[&long]))
            .1
            .contains("too long (129 > 128 bytes)"));
        let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
        assert_eq!(
            err_field(validate_tags("tags", &many)).1,
            "tags: too many tags (65 > 64)"
        );
    }

    #[test]
    fn meta_rules() {
        let m = |k: &str, v: &str| validate_meta("meta", &[(k.to_string(), v.to_string())].into());
        assert_eq!(m("version", "v1.2 beta"), Ok(()));
        assert_eq!(m("Some_Key-1", ""), Ok(()));
        assert_eq!(err_field(m("", "x")).1, "meta: keys must not be empty");
        let (f, msg) = err_field(m("ver.sion", "x"));
        assert_eq!(f, "meta.ver.sion");
        assert!(msg.contains("bad character '.' in key"), "{msg}");
        assert!(err_field(m("weft-internal", "x")).1.contains("reserved"));
        assert!(err_field(m(&"k".repeat(129), "x"))
            .1
            .contains("key too long (129 > 128 bytes)"));
        assert_eq!(
            err_field(m("k", &"v".repeat(513))).1,
            "meta.k: value too long (513 > 512 bytes)"
        );
        assert_eq!(
            err_field(m("k", "a\nb")).1,
            "meta.k: value contains control characters"
        );
        let many: BTreeMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(
            err_field(validate_meta("meta", &many)).1,
            "meta: too many pairs (65 > 64)"
        );
        let mut n = node();
        n.meta.insert("bad key".into(), "x".into());
        assert_eq!(err_field(validate_node(&n)).0, "meta.bad key");
    }

    #[test]
    fn health_status_text() {
        assert_eq!(HealthStatus::Passing.to_string(), "passing");
        assert_eq!(HealthStatus::Warning.to_string(), "warning");
        assert_eq!(HealthStatus::Critical.to_string(), "critical");
        assert_eq!(
            serde_json::to_string(&HealthStatus::Warning).unwrap(),
            "\"warning\""
        );
        assert_eq!(
            serde_json::from_str::<HealthStatus>("\"critical\"").unwrap(),
            HealthStatus::Critical
        );
        assert!(serde_json::from_str::<HealthStatus>("\"Passing\"").is_err());
        assert_eq!("passing".parse::<HealthStatus>(), Ok(HealthStatus::Passing));
        assert_eq!("ok".parse::<HealthStatus>().unwrap_err().field(), "health");
        assert_eq!(
            HealthStatus::Passing.worst(HealthStatus::Warning),
            HealthStatus::Warning
        );
        assert_eq!(
            HealthStatus::Critical.worst(HealthStatus::Passing),
            HealthStatus::Critical
        );
    }

    #[test]
    fn serde_round_trip_and_unknown_fields() {
        let i = instance();
        let json = serde_json::to_string(&i).unwrap();
        assert!(json.contains("\"health\":\"passing\""), "{json}");
        assert_eq!(serde_json::from_str::<ServiceInstance>(&json).unwrap(), i);
        let n = node();
        let back: Node = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
        assert_eq!(back, n);
        let err = serde_json::from_str::<Node>(
            r#"{"name":"a","address":"10.0.0.1","datacenter":"dc1","colour":"red"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn truncates_at_char_boundary() {
        assert_eq!(truncate_check_output("ok"), "ok");
        let s = format!("{}é", "x".repeat(MAX_CHECK_OUTPUT_BYTES - 1));
        let t = truncate_check_output(&s);
        assert_eq!(t.len(), MAX_CHECK_OUTPUT_BYTES - 1);
    }
}
