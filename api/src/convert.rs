//! Conversions between the domain types and their `weft.v1` protobuf
//! messages. Domain → proto cannot fail; proto → domain checks enums and
//! ranges and names the field that is wrong (full validation stays with the
//! domain types' own `validate_*` functions).
use std::collections::BTreeMap;

use crate::catalog::{HealthStatus, Node, ServiceInstance};
use crate::http_match::{FullMatch, RulePath};
use crate::intention::{HeaderMatch, HttpMatch, Intention, IntentionAction, Permission};
use crate::kv::KvEntry;
use crate::proto;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConvertError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
    ConvertError {
        field: field.into(),
        reason: reason.into(),
    }
}

pub fn node_to_proto(n: &Node) -> proto::Node {
    proto::Node {
        name: n.name.clone(),
        address: n.address.clone(),
        datacenter: n.datacenter.clone(),
        meta: n.meta.clone().into_iter().collect(),
        create_index: n.create_index,
        modify_index: n.modify_index,
        health: health_to_proto(n.health) as i32,
        health_output: n.health_output.clone(),
    }
}

/// A node from the wire; an unspecified (or unknown) node health reads as
/// passing: only the servers set it, and they always do.
pub fn node_from_proto(n: proto::Node) -> Node {
    Node {
        name: n.name,
        address: n.address,
        datacenter: n.datacenter,
        meta: n.meta.into_iter().collect::<BTreeMap<_, _>>(),
        create_index: n.create_index,
        modify_index: n.modify_index,
        health: health_from_proto(n.health).unwrap_or_default(),
        health_output: n.health_output,
    }
}

pub fn health_to_proto(h: HealthStatus) -> proto::Health {
    match h {
        HealthStatus::Passing => proto::Health::Passing,
        HealthStatus::Warning => proto::Health::Warning,
        HealthStatus::Critical => proto::Health::Critical,
    }
}

pub fn health_from_proto(value: i32) -> Result<HealthStatus, ConvertError> {
    match proto::Health::try_from(value) {
        Ok(proto::Health::Passing) => Ok(HealthStatus::Passing),
        Ok(proto::Health::Warning) => Ok(HealthStatus::Warning),
        Ok(proto::Health::Critical) => Ok(HealthStatus::Critical),
        _ => Err(bad(
            "health",
            format!("{value} is not passing, warning or critical"),
        )),
    }
}

pub fn instance_to_proto(i: &ServiceInstance) -> proto::ServiceInstance {
    proto::ServiceInstance {
        id: i.id.clone(),
        service: i.service.clone(),
        node: i.node.clone(),
        address: i.address.clone(),
        port: u32::from(i.port),
        tags: i.tags.clone(),
        meta: i.meta.clone().into_iter().collect(),
        health: health_to_proto(i.health) as i32,
        check_output: i.check_output.clone(),
        create_index: i.create_index,
        modify_index: i.modify_index,
        deregister_critical_after_ms: i.deregister_critical_after_ms,
    }
}

pub fn instance_from_proto(i: proto::ServiceInstance) -> Result<ServiceInstance, ConvertError> {
    let port =
        u16::try_from(i.port).map_err(|_| bad("port", format!("{} is not a TCP port", i.port)))?;
    // A new registration may leave health unset: it starts critical until
    // its checks pass (deny when unsure).
    let health = if i.health == proto::Health::Unspecified as i32 {
        HealthStatus::Critical
    } else {
        health_from_proto(i.health)?
    };
    Ok(ServiceInstance {
        id: i.id,
        service: i.service,
        node: i.node,
        address: i.address,
        port,
        tags: i.tags,
        meta: i.meta.into_iter().collect(),
        health,
        check_output: i.check_output,
        create_index: i.create_index,
        modify_index: i.modify_index,
        deregister_critical_after_ms: i.deregister_critical_after_ms,
    })
}

fn action_from_str(field: &str, s: &str) -> Result<IntentionAction, ConvertError> {
    s.parse()
        .map_err(|_| bad(field, format!("{s:?} is not allow or deny")))
}

fn header_to_proto(h: &HeaderMatch) -> proto::HeaderMatch {
    proto::HeaderMatch {
        name: h.name.clone(),
        present: h.present,
        exact: h.exact.clone(),
        prefix: h.prefix.clone(),
        suffix: h.suffix.clone(),
        regex: h.regex.as_ref().map(|r| r.as_str().to_string()),
        invert: h.invert,
    }
}

fn header_from_proto(h: proto::HeaderMatch) -> HeaderMatch {
    HeaderMatch {
        name: h.name,
        present: h.present,
        exact: h.exact,
        prefix: h.prefix,
        suffix: h.suffix,
        regex: h.regex.map(FullMatch::from),
        invert: h.invert,
    }
}

fn http_to_proto(m: &HttpMatch) -> proto::HttpMatch {
    proto::HttpMatch {
        path_exact: m.path_exact.as_ref().map(|p| p.as_str().to_string()),
        path_prefix: m.path_prefix.as_ref().map(|p| p.as_str().to_string()),
        path_regex: m.path_regex.as_ref().map(|r| r.as_str().to_string()),
        methods: m.methods.clone(),
        headers: m.headers.iter().map(header_to_proto).collect(),
    }
}

fn http_from_proto(m: proto::HttpMatch) -> HttpMatch {
    HttpMatch {
        path_exact: m.path_exact.map(RulePath::from),
        path_prefix: m.path_prefix.map(RulePath::from),
        path_regex: m.path_regex.map(FullMatch::from),
        methods: m.methods,
        headers: m.headers.into_iter().map(header_from_proto).collect(),
        // Intentions take no query rules (validate_intention refuses them).
        query_param: Vec::new(),
        case_insensitive: false,
    }
}

pub fn intention_to_proto(i: &Intention) -> proto::Intention {
    proto::Intention {
        source: i.source.clone(),
        destination: i.destination.clone(),
        action: i.action.map(|a| a.to_string()).unwrap_or_default(),
        permissions: i
            .permissions
            .iter()
            .map(|p| proto::Permission {
                action: p.action.to_string(),
                http: Some(http_to_proto(&p.http)),
            })
            .collect(),
        description: i.description.clone(),
        create_index: i.create_index,
        modify_index: i.modify_index,
    }
}

pub fn intention_from_proto(i: proto::Intention) -> Result<Intention, ConvertError> {
    let action = if i.action.is_empty() {
        None
    } else {
        Some(action_from_str("action", &i.action)?)
    };
    let permissions = i
        .permissions
        .into_iter()
        .enumerate()
        .map(|(n, p)| {
            Ok(Permission {
                action: action_from_str(&format!("permissions[{n}].action"), &p.action)?,
                http: http_from_proto(p.http.unwrap_or_default()),
            })
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    Ok(Intention {
        source: i.source,
        destination: i.destination,
        action,
        permissions,
        description: i.description,
        create_index: i.create_index,
        modify_index: i.modify_index,
    })
}

pub fn kv_to_proto(e: &KvEntry) -> proto::KvEntry {
    proto::KvEntry {
        key: e.key.clone(),
        value: e.value.clone(),
        create_index: e.create_index,
        modify_index: e.modify_index,
        flags: e.flags,
        lock_index: e.lock_index,
        session: e.session.clone().unwrap_or_default(),
    }
}

pub fn kv_from_proto(e: proto::KvEntry) -> KvEntry {
    KvEntry {
        key: e.key,
        value: e.value,
        create_index: e.create_index,
        modify_index: e.modify_index,
        flags: e.flags,
        lock_index: e.lock_index,
        session: (!e.session.is_empty()).then_some(e.session),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_round_trips() {
        let i = ServiceInstance {
            id: "api-1".into(),
            service: "api".into(),
            node: "node-a".into(),
            address: "10.0.0.2".into(),
            port: 8080,
            tags: vec!["v1".into()],
            meta: [("version".to_string(), "v1".to_string())].into(),
            health: HealthStatus::Warning,
            check_output: "429".into(),
            create_index: 3,
            modify_index: 7,
            ..Default::default()
        };
        assert_eq!(instance_from_proto(instance_to_proto(&i)).unwrap(), i);
    }

    #[test]
    fn port_out_of_range_is_named() {
        let p = proto::ServiceInstance {
            port: 70000,
            ..Default::default()
        };
        assert_eq!(instance_from_proto(p).unwrap_err().field, "port");
    }

    #[test]
    fn unset_health_starts_critical() {
        let p = proto::ServiceInstance {
            port: 80,
            ..Default::default()
        };
        assert_eq!(
            instance_from_proto(p).unwrap().health,
            HealthStatus::Critical
        );
    }

    #[test]
    fn l7_intention_round_trips_and_bad_action_is_named() {
        let i = Intention {
            source: "web".into(),
            destination: "api".into(),
            action: None,
            permissions: vec![Permission {
                action: IntentionAction::Deny,
                http: HttpMatch {
                    path_prefix: Some("/admin".into()),
                    methods: vec!["POST".into()],
                    headers: vec![HeaderMatch {
                        name: "x-env".into(),
                        exact: Some("prod".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            }],
            description: "no admin".into(),
            create_index: 1,
            modify_index: 2,
        };
        let mut p = intention_to_proto(&i);
        assert_eq!(intention_from_proto(p.clone()).unwrap(), i);
        p.permissions[0].action = "maybe".into();
        assert_eq!(
            intention_from_proto(p).unwrap_err().field,
            "permissions[0].action"
        );
    }
}
