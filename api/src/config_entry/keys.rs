//! Config entry keys as Consul reads them: case-insensitively, and in
//! snake_case too (`service_subset`, `mutual_tls_mode`, `http`). A parsed
//! document's keys are rewritten to weft's PascalCase names before it is
//! decoded, except the keys of maps whose keys are the user's own (subset
//! names in `Subsets` and `Failover`, `Meta`). `Namespace` and `Partition`
//! are accepted as `"default"` (or empty), the only ones weft has, and
//! dropped; any other value is refused as not supported yet.

use serde_json::Value;

use crate::consul_keys::{fold, normalize as normalize_with, KeyError, Schema};

/// Every key weft's entries take, and Consul's keys weft refuses as not
/// supported yet (so that `load_balancer` is refused by its name too).
const KNOWN: &[&str] = &[
    "Kind",
    "Name",
    "Config",
    "CreateIndex",
    "ModifyIndex",
    "Meta",
    "Protocol",
    "UpstreamConfig",
    "Defaults",
    "PassiveHealthCheck",
    "MaxFailures",
    "BaseEjectionTime",
    "MutualTLSMode",
    "Overrides",
    "ConnectTimeoutMs",
    "Limits",
    "MaxConnections",
    "MaxPendingRequests",
    "MaxConcurrentRequests",
    "Interval",
    "EnforcingConsecutive5xx",
    "MaxEjectionPercent",
    "Routes",
    "Match",
    "Destination",
    "Service",
    "ServiceSubset",
    "PrefixRewrite",
    "RequestTimeout",
    "NumRetries",
    "RetryOnConnectFailure",
    "RetryOnStatusCodes",
    "Splits",
    "Weight",
    "DefaultSubset",
    "Subsets",
    "Filter",
    "OnlyPassing",
    "Redirect",
    "Datacenter",
    "Failover",
    "Datacenters",
    "Targets",
    "ConnectTimeout",
    "LoadBalancer",
    "Policy",
    "LeastRequestConfig",
    "ChoiceCount",
    "RingHashConfig",
    "MinimumRingSize",
    "MaximumRingSize",
    "HashPolicies",
    "Field",
    "FieldValue",
    "CookieConfig",
    "Session",
    "TTL",
    "Path",
    "SourceIP",
    "Terminal",
    "RetryOn",
    "RequestHeaders",
    "ResponseHeaders",
    "Add",
    "Set",
    "Remove",
];

/// Maps whose keys are names the user chose: kept as written.
/// (`Config` of proxy-defaults holds Envoy's keys, which are snake_case.)
const USER_KEYED: &[&str] = &["Subsets", "Failover", "Meta", "Add", "Set", "Config"];

/// Keys naming a tenancy weft has one of.
const TENANCY: &[&str] = &["Namespace", "Partition"];

const SCHEMA: Schema = Schema {
    known: &[KNOWN, crate::consul_keys::HTTP_MATCH, super::CONSUL_FIELDS],
    user_keyed: USER_KEYED,
    tenancy: TENANCY,
};

/// Rewrites `doc`'s keys to weft's spelling and drops default tenancy
/// fields. Returns whether anything changed.
pub fn normalize(doc: &mut Value) -> Result<bool, KeyError> {
    normalize_with(doc, &SCHEMA)
}

/// Drops the indexes a document read back from Consul carries
/// (`CreateIndex`, `ModifyIndex`): the servers set them, and Consul ignores
/// them on write. Call after [`normalize`]. Returns whether any was there.
pub fn drop_read_only(doc: &mut Value) -> bool {
    let Some(object) = doc.as_object_mut() else {
        return false;
    };
    let created = object.remove("CreateIndex").is_some();
    object.remove("ModifyIndex").is_some() || created
}

/// The document's `Kind`, however the key is spelled.
pub fn kind_of(doc: &Value) -> Option<&str> {
    doc.as_object()?
        .iter()
        .find(|(k, _)| fold(k) == "kind")
        .and_then(|(_, v)| v.as_str())
}

/// The document's `Name`, however it is spelled.
pub fn name_of(doc: &Value) -> Option<&str> {
    doc.as_object()?
        .iter()
        .find(|(k, _)| fold(k) == "name")
        .and_then(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn snake_and_lower_case_keys_take_weft_s_spelling() {
        let mut doc = json!({
            "kind": "service-resolver",
            "name": "api",
            "connect_timeout": "5s",
            "default_subset": "v1",
            "subsets": {"v1": {"filter": "Service.Meta.version == v1", "only_passing": true}},
            "failover": {"*": {"datacenters": ["dc2"]}},
            "meta": {"owner_team": "payments"},
        });
        assert!(normalize(&mut doc).unwrap());
        assert_eq!(
            doc,
            json!({
                "Kind": "service-resolver",
                "Name": "api",
                "ConnectTimeout": "5s",
                "DefaultSubset": "v1",
                "Subsets": {"v1": {"Filter": "Service.Meta.version == v1", "OnlyPassing": true}},
                "Failover": {"*": {"Datacenters": ["dc2"]}},
                "Meta": {"owner_team": "payments"},
            })
        );
        let mut mtls = json!({"mutual_tls_mode": "strict", "upstream_config": {"defaults": {}}});
        normalize(&mut mtls).unwrap();
        assert_eq!(
            mtls,
            json!({"MutualTLSMode": "strict", "UpstreamConfig": {"Defaults": {}}})
        );
    }

    #[test]
    fn user_keys_stay_as_written() {
        // A subset named like a field, and meta keys in any case.
        let mut doc = json!({"Subsets": {"name": {}, "Service_Subset": {}}, "Meta": {"NAME": "x"}});
        assert!(!normalize(&mut doc).unwrap());
        assert!(
            doc["Subsets"].get("name").is_some() && doc["Subsets"].get("Service_Subset").is_some()
        );
        assert_eq!(doc["Meta"]["NAME"], "x");
    }

    #[test]
    fn unknown_keys_are_left_for_the_decoder_to_refuse() {
        let mut doc = json!({"Nmae": "x", "load_balancer": {}});
        normalize(&mut doc).unwrap();
        assert!(doc.get("Nmae").is_some());
        assert!(doc.get("LoadBalancer").is_some(), "{doc}");
    }

    #[test]
    fn default_tenancy_goes_and_any_other_is_refused() {
        let mut doc = json!({"Name": "a", "Namespace": "default", "partition": "",
            "Routes": [{"Destination": {"Namespace": "default"}}]});
        assert!(normalize(&mut doc).unwrap());
        assert_eq!(doc, json!({"Name": "a", "Routes": [{"Destination": {}}]}));
        let e = normalize(&mut json!({"Namespace": "team"})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Namespace \"team\": not supported by weft yet (only \"default\")"
        );
        assert!(normalize(&mut json!({"Partition": 3})).is_err());
    }

    #[test]
    fn a_key_given_twice_in_two_spellings_is_refused() {
        let e = normalize(&mut json!({"Name": "a", "name": "b"})).unwrap_err();
        assert!(e.to_string().starts_with("Name: given twice"), "{e}");
        assert_eq!(name_of(&json!({"NAME": "x"})), Some("x"));
        assert_eq!(name_of(&json!({"Kind": "x"})), None);
    }
}
