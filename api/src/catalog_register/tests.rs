use super::*;

fn register(json: &str) -> Result<Registration, RegisterError> {
    parse_register(json.as_bytes(), "dc1")
}

#[test]
fn an_external_node_with_a_service_and_its_checks() {
    // As py-consul's catalog.register and consul-esm send it.
    let r = register(
        r#"{"Node": "db-host", "Address": "10.9.0.5", "NodeMeta": {"rack": "r1", "external-node": "false"},
            "Service": {"Service": "postgres", "Port": 5432, "Tags": ["primary"], "Meta": {"v": "15"}},
            "Checks": [{"CheckID": "pg-alive", "Name": "alive", "Status": "passing", "ServiceID": "postgres"},
                       {"Name": "lag", "Status": "warning", "ServiceID": "postgres", "Output": "lag 3s"}],
            "TaggedAddresses": {}, "ID": "", "SkipNodeUpdate": false}"#,
    )
    .unwrap();
    assert_eq!(r.node.name, "db-host");
    assert_eq!(r.node.meta["rack"], "r1");
    assert_eq!(r.node.meta[EXTERNAL_NODE_META], "true", "always external");
    assert!(is_external(&r.node));
    let i = r.instance.unwrap();
    assert_eq!(
        (i.id.as_str(), i.service.as_str(), i.port),
        ("postgres", "postgres", 5432)
    );
    assert_eq!(i.address, "10.9.0.5", "the node's address by default");
    assert_eq!(i.health, HealthStatus::Warning, "the worst of its checks");
    assert_eq!(i.check_output, "lag 3s");
    assert_eq!(i.tags, ["primary"]);
    // Keys in any case; no checks: passing.
    let lower = register(
        r#"{"node": "h", "address": "10.9.0.6", "service": {"id": "web-1", "service": "web", "port": 80, "address": "10.9.0.7"}}"#,
    )
    .unwrap();
    let i = lower.instance.unwrap();
    assert_eq!((i.id.as_str(), i.address.as_str()), ("web-1", "10.9.0.7"));
    assert_eq!(i.health, HealthStatus::Passing);
    // A check without a status is critical, as in Consul.
    let r = register(
        r#"{"Node": "h", "Address": "10.9.0.6", "Service": {"Service": "web", "Port": 80},
            "Check": {"Name": "x", "ServiceID": "web"}}"#,
    )
    .unwrap();
    assert_eq!(r.instance.unwrap().health, HealthStatus::Critical);
}

#[test]
fn what_weft_cannot_honour_is_refused_by_name() {
    let says = |json: &str, what: &str| {
        let e = register(json).unwrap_err().to_string();
        assert!(e.contains(what), "{json}: {e}");
    };
    let base = r#""Node": "h", "Address": "10.9.0.6""#;
    says(
        &format!(r#"{{{base}, "TaggedAddresses": {{"wan": "1.2.3.4"}}}}"#),
        "TaggedAddresses: not supported by weft yet",
    );
    says(
        &format!(r#"{{{base}, "ID": "40e4a748-2192-161a-0510-9bf59fe950b5"}}"#),
        "ID (a node id): not supported",
    );
    says(
        &format!(
            r#"{{{base}, "Service": {{"Service": "p", "Port": 1, "Kind": "connect-proxy"}}}}"#
        ),
        "Service.Kind: not supported",
    );
    says(
        &format!(r#"{{{base}, "Check": {{"Name": "n", "Status": "passing"}}}}"#),
        "without a Service",
    );
    says(
        &format!(
            r#"{{{base}, "Service": {{"Service": "p", "Port": 1}}, "Check": {{"Name": "n", "Status": "passing"}}}}"#
        ),
        "node-level check",
    );
    says(
        &format!(
            r#"{{{base}, "Service": {{"Service": "p", "Port": 1}}, "Check": {{"Name": "n", "ServiceID": "q"}}}}"#
        ),
        "Check.ServiceID: \"q\" is not the Service",
    );
    says(
        &format!(
            r#"{{{base}, "Service": {{"Service": "p", "Port": 1}}, "Check": {{"ServiceID": "p", "Status": "fine"}}}}"#
        ),
        "Check.Status",
    );
    says(
        &format!(r#"{{{base}, "Check": {{"Definition": {{"HTTP": "http://x"}}}}}}"#),
        "Check.Definition: not supported",
    );
    says(
        &format!(r#"{{{base}, "Datacenter": "dc2"}}"#),
        "register through that datacenter's servers",
    );
    says(
        &format!(r#"{{{base}, "Namespace": "team"}}"#),
        "not supported by weft yet",
    );
    says(r#"{"Node": "h", "Address": "not an ip"}"#, "Node:");
    says(r#"{"Node": "bad name!", "Address": "10.0.0.1"}"#, "Node:");
    says(
        &format!(r#"{{{base}, "Service": {{"Service": "p", "Port": 70000}}}}"#),
        "Service.Port",
    );
    says(
        &format!(r#"{{{base}, "Bogus": 1}}"#),
        "Bogus: unknown field",
    );
    says(
        &format!(r#"{{{base}, "Port": 80}}"#),
        "belongs in Service or Check",
    );
    says("[1]", "want a JSON object");
}

#[test]
fn deregistration_of_a_node_or_one_instance() {
    let d = parse_deregister(br#"{"Node": "db-host"}"#, "dc1").unwrap();
    assert_eq!(
        d,
        Deregistration {
            body_token: None,
            node: "db-host".into(),
            service_id: None
        }
    );
    // As py-consul sends it: the token in the body too.
    let d = parse_deregister(br#"{"node": "h", "WriteRequest": {"Token": "s3"}}"#, "dc1").unwrap();
    assert_eq!(d.body_token.as_deref(), Some("s3"));
    let d = parse_deregister(br#"{"node": "db-host", "service_id": "postgres"}"#, "dc1").unwrap();
    assert_eq!(d.service_id.as_deref(), Some("postgres"));
    let e = parse_deregister(br#"{"Node": "h", "CheckID": "c"}"#, "dc1").unwrap_err();
    assert!(e.to_string().contains("CheckID: removing one check"), "{e}");
    assert!(parse_deregister(br#"{"Node": ""}"#, "dc1").is_err());
    assert!(parse_deregister(br#"{"Node": "h", "Datacenter": "dc9"}"#, "dc1").is_err());
}
