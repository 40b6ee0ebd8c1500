//! Tests of config entries: parsing files, validation with named fields, and the
//! route/split/subset choices.

use super::*;
use crate::intention::{IntentionAction, Permission};

fn defaults(name: &str, protocol: Protocol) -> ConfigEntry {
    ConfigEntry::ServiceDefaults(ServiceDefaults {
        name: name.into(),
        meta: Default::default(),
        protocol: Some(protocol),
        upstream_config: None,
        mesh_gateway: None,
        mutual_tls_mode: MutualTlsMode::Strict,
    })
}

#[test]
fn mutual_tls_mode_is_strict_unless_set_to_permissive() {
    let parse = |extra: &str| {
        parse_entry_file(
            &format!("Kind = \"service-defaults\"\nName = \"api\"\n{extra}"),
            FileFormat::Toml,
        )
    };
    let mut set = EntrySet::new();
    assert_eq!(set.mutual_tls_mode("api"), MutualTlsMode::Strict);
    for (text, want) in [
        ("", MutualTlsMode::Strict),
        ("MutualTLSMode = \"\"", MutualTlsMode::Strict),
        ("MutualTLSMode = \"strict\"", MutualTlsMode::Strict),
        ("MutualTLSMode = \"permissive\"", MutualTlsMode::Permissive),
    ] {
        set.insert(parse(text).unwrap());
        assert_eq!(set.mutual_tls_mode("api"), want, "{text}");
    }
    let e = parse("MutualTLSMode = \"open\"").unwrap_err().to_string();
    assert!(
        e.contains("line 3") && e.contains("`open`") && e.contains("`permissive`"),
        "{e}"
    );
}

#[test]
fn passive_health_check_is_parsed_and_checked_by_field() {
    let text = r#"
Kind = "service-defaults"
Name = "web"
[UpstreamConfig.Defaults.PassiveHealthCheck]
MaxFailures = 3
BaseEjectionTime = "10s"
"#;
    let entry = parse_entry_file(text, FileFormat::Toml).unwrap();
    let ConfigEntry::ServiceDefaults(d) = &entry else {
        panic!("not service-defaults: {entry:?}")
    };
    let check = d
        .upstream("anything")
        .unwrap()
        .passive_health_check
        .unwrap();
    assert_eq!(check.max_failures, 3);
    let base = check.base_ejection_time.as_ref().map(|t| t.as_str());
    assert_eq!(base, Some("10s"));
    assert!(validate_entry(&entry, &EntrySet::new()).is_ok());

    let zero = text.replace("MaxFailures = 3", "MaxFailures = 0");
    let e = validate_entry(
        &parse_entry_file(&zero, FileFormat::Toml).unwrap(),
        &EntrySet::new(),
    )
    .unwrap_err();
    assert_eq!(
        e.field(),
        "UpstreamConfig.Defaults.PassiveHealthCheck.MaxFailures"
    );
    let bad = text.replace("\"10s\"", "\"soon\"");
    let e = validate_entry(
        &parse_entry_file(&bad, FileFormat::Toml).unwrap(),
        &EntrySet::new(),
    )
    .unwrap_err();
    assert_eq!(
        e.field(),
        "UpstreamConfig.Defaults.PassiveHealthCheck.BaseEjectionTime"
    );
}

fn resolver(name: &str, subsets: &[&str]) -> ServiceResolver {
    ServiceResolver {
        name: name.into(),
        meta: Default::default(),
        subsets: subsets
            .iter()
            .map(|s| {
                (
                    s.to_string(),
                    ResolverSubset {
                        filter: format!("Service.Meta.version == {s}").into(),
                        only_passing: false,
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

/// api and web speak http, db is tcp; api has subsets v1 and v2.
fn ctx() -> EntrySet {
    [
        defaults("api", Protocol::Http),
        defaults("web", Protocol::Grpc),
        defaults("db", Protocol::Tcp),
        ConfigEntry::ServiceResolver(resolver("api", &["v1", "v2"])),
        ConfigEntry::ServiceResolver(resolver("web", &[])),
    ]
    .into_iter()
    .collect()
}

fn err(entry: ConfigEntry) -> String {
    validate_entry(&entry, &ctx()).unwrap_err().to_string()
}

fn splitter(splits: Vec<Split>) -> ConfigEntry {
    ConfigEntry::ServiceSplitter(ServiceSplitter {
        name: "api".into(),
        meta: Default::default(),
        splits,
    })
}

fn split(weight: f32, subset: Option<&str>) -> Split {
    Split {
        weight,
        service: None,
        service_subset: subset.map(Into::into),
        ..Default::default()
    }
}

fn router(routes: Vec<Route>) -> ConfigEntry {
    ConfigEntry::ServiceRouter(ServiceRouter {
        name: "api".into(),
        meta: Default::default(),
        routes,
    })
}

fn route(http: Option<HttpMatch>, dest: RouteDestination) -> Route {
    Route {
        route_match: http.map(|h| RouteMatch { http: Some(h) }),
        destination: Some(dest),
    }
}

#[test]
fn parses_toml_and_json_files() {
    let toml = r#"
Kind = "service-splitter"
Name = "api"
Splits = [
  { Weight = 90, ServiceSubset = "v1" },
  { Weight = 10.0, ServiceSubset = "v2" },
]
"#;
    let e = parse_entry_file(toml, FileFormat::Toml).unwrap();
    assert_eq!(e.kind(), EntryKind::ServiceSplitter);
    assert_eq!(e.name(), "api");
    assert_eq!(validate_entry(&e, &ctx()), Ok(()));
    let json = serde_json::to_string(&e).unwrap();
    assert!(json.starts_with(r#"{"Kind":"service-splitter","Name":"api","Splits":[{"Weight":90.0,"ServiceSubset":"v1"}"#), "{json}");
    assert_eq!(parse_entry_file(&json, FileFormat::Json).unwrap(), e);

    let router_toml = r#"
Kind = "service-router"
Name = "api"

[[Routes]]
[Routes.Match.HTTP]
PathPrefix = "/admin"
Methods = ["GET", "POST"]
Header = [ { Name = "x-debug", Present = true } ]
[Routes.Destination]
ServiceSubset = "v2"
PrefixRewrite = "/"
RequestTimeout = "5s"
NumRetries = 3
RetryOnConnectFailure = true
RetryOnStatusCodes = [503]

[[Routes]]
Destination = { Service = "web" }
"#;
    let e = parse_entry_file(router_toml, FileFormat::Toml).unwrap();
    assert_eq!(validate_entry(&e, &ctx()), Ok(()));
    let ConfigEntry::ServiceRouter(r) = &e else {
        panic!()
    };
    assert_eq!(r.routes.len(), 2);
    let d = r.routes[0].destination.as_ref().unwrap();
    assert_eq!(d.num_retries, Some(3));
    assert_eq!(d.retry_on_status_codes, vec![503]);
    assert!(r.routes[1].route_match.is_none());

    let resolver_json = r#"{
  "Kind": "service-resolver",
  "Name": "api",
  "DefaultSubset": "v1",
  "Subsets": {
    "v1": { "Filter": "Service.Meta.version == v1" },
    "v2": { "Filter": "Service.Meta.version == v2", "OnlyPassing": true }
  },
  "Failover": { "*": { "Service": "api-backup" }, "v2": { "ServiceSubset": "v1" } }
}"#;
    let e = parse_entry_file(resolver_json, FileFormat::Json).unwrap();
    assert_eq!(validate_entry(&e, &ctx()), Ok(()));
    // Other datacenters: failover to them in order, or a redirect there.
    for text in [
        r#""Failover": { "*": { "Datacenters": ["dc2", "dc3"] } }"#,
        r#""Redirect": { "Datacenter": "dc2" }"#,
        r#""Redirect": { "Service": "web", "Datacenter": "dc2" }"#,
    ] {
        let json = format!(r#"{{ "Kind": "service-resolver", "Name": "web", {text} }}"#);
        let entry = parse_entry_file(&json, FileFormat::Json).unwrap();
        assert_eq!(validate_entry(&entry, &ctx()), Ok(()), "{text}");
    }
    let many: Vec<String> = (0..17).map(|i| format!("\"dc{i}\"")).collect();
    let json = format!(
        r#"{{ "Kind": "service-resolver", "Name": "web", "Failover": {{ "*": {{ "Datacenters": [{}] }} }} }}"#,
        many.join(",")
    );
    let entry = parse_entry_file(&json, FileFormat::Json).unwrap();
    let err = validate_entry(&entry, &ctx()).unwrap_err().to_string();
    assert!(err.contains("17 datacenters, at most 16"), "{err}");
    // A connect timeout is taken, within bounds.
    let timeout = |t: &str| {
        let json =
            format!(r#"{{ "Kind": "service-resolver", "Name": "web", "ConnectTimeout": "{t}" }}"#);
        let entry = parse_entry_file(&json, FileFormat::Json).unwrap();
        validate_entry(&entry, &ctx()).map(|()| entry)
    };
    let ConfigEntry::ServiceResolver(r) = timeout("250ms").unwrap() else {
        panic!()
    };
    assert_eq!(
        r.connect_timeout(),
        Some(std::time::Duration::from_millis(250))
    );
    for bad in ["0s", "6m", "soon"] {
        let e = timeout(bad).unwrap_err().to_string();
        assert!(e.starts_with("ConnectTimeout: "), "{bad}: {e}");
    }
    let e = parse_entry_file(
        "Kind = \"service-defaults\"\nName = \"db\"\n",
        FileFormat::Toml,
    )
    .unwrap();
    let ConfigEntry::ServiceDefaults(d) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(d.protocol, None, "no Protocol: proxy-defaults' or tcp");
    assert_eq!(EntrySet::from_iter([e]).protocol("db"), Protocol::Tcp);
}

/// Consul's HCL examples (tests/fixtures/consul/, each naming the docs
/// page it comes from): read as HCL by extension and by sniffing, the same
/// entries as their TOML forms, and valid; one weft lacks is refused as not
/// supported yet.
#[test]
fn consuls_hcl_examples_parse_into_the_same_entries() {
    let fixture = |name: &str| {
        let path = format!(
            "{}/../tests/fixtures/consul/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let parse = |name: &str| {
        let text = fixture(name);
        assert_eq!(FileFormat::from_path(name), Some(FileFormat::Hcl));
        let entry =
            parse_entry_file(&text, FileFormat::Hcl).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Without the extension: nested HCL is told from TOML by its shape;
        // flat HCL is TOML too, and reads the same.
        let sniffed = parse_entry_file(&text, FileFormat::sniff(&text));
        assert_eq!(sniffed.as_ref(), Ok(&entry), "{name} sniffed");
        entry
    };
    for nested in [
        "service-router.hcl",
        "service-resolver.hcl",
        "service-splitter.hcl",
    ] {
        assert_eq!(
            FileFormat::sniff(&fixture(nested)),
            FileFormat::Hcl,
            "{nested}"
        );
    }
    let router = parse("service-router.hcl");
    let ConfigEntry::ServiceRouter(r) = &router else {
        panic!("{router:?}")
    };
    assert_eq!(r.routes.len(), 2);
    let first = r.routes[0]
        .route_match
        .as_ref()
        .and_then(|m| m.http.as_ref())
        .unwrap();
    assert_eq!(
        first.path_prefix.as_ref().map(|p| p.as_str()),
        Some("/admin")
    );
    let second = r.routes[1]
        .route_match
        .as_ref()
        .and_then(|m| m.http.as_ref())
        .unwrap();
    assert_eq!(second.headers[0].name, "x-debug");
    assert_eq!(second.headers[0].exact.as_deref(), Some("1"));
    let to = r.routes[1].destination.as_ref().unwrap();
    assert_eq!(to.service_subset.as_deref(), Some("canary"));

    let resolver = parse("service-resolver.hcl");
    let toml = parse_entry_file(
        "Kind = \"service-resolver\"\nName = \"web\"\nDefaultSubset = \"v1\"\n\
         [Subsets.v1]\nFilter = \"Service.Meta.version == v1\"\n\
         [Subsets.v2]\nFilter = \"Service.Meta.version == v2\"\nOnlyPassing = true\n",
        FileFormat::Toml,
    )
    .unwrap();
    assert_eq!(resolver, toml, "the same entry as its TOML form");
    let splitter = parse("service-splitter.hcl");
    let ConfigEntry::ServiceSplitter(sp) = &splitter else {
        panic!()
    };
    assert_eq!((sp.splits[0].weight, sp.splits[1].weight), (90.0, 10.0));
    assert_eq!(
        parse("service-defaults.hcl"),
        defaults("web", Protocol::Http)
    );

    // Valid together (the router's subset is the resolver's, once it has one).
    let mut set: EntrySet = [defaults("web", Protocol::Http), splitter.clone()]
        .into_iter()
        .collect();
    set.insert(resolver.clone());
    assert_eq!(validate_entry(&splitter, &set), Ok(()));
    assert_eq!(validate_entry(&resolver, &set), Ok(()));

    let lb = parse("service-resolver-load-balancer.hcl");
    let ConfigEntry::ServiceResolver(r) = &lb else {
        panic!("{lb:?}")
    };
    let lb = r.load_balancer.as_ref().unwrap();
    assert_eq!(lb.policy, Some(crate::load_balancer::Policy::RingHash));
    assert_eq!(lb.ring_size(3), 1024);
    // Broken HCL says so; too deep is refused before parsing.
    let e =
        parse_entry_file("Kind = \"service-defaults\"\nName = \n", FileFormat::Hcl).unwrap_err();
    assert!(e.to_string().starts_with("HCL"), "{e}");
    let deep = format!("Kind = {}1{}", "[".repeat(11), "]".repeat(11));
    let e = parse_entry_file(&deep, FileFormat::Hcl).unwrap_err();
    assert!(e.to_string().contains("nested more than 10 deep"), "{e}");
}

#[test]
fn consuls_fields_and_kinds_weft_lacks_say_not_supported_yet() {
    for (text, says) in [
        (
            "Kind = \"service-defaults\"\nName = \"api\"\n[UpstreamConfig.Defaults.Expose]\nChecks = true\n",
            "Expose: Consul's field, not supported by weft yet",
        ),
        (
            "Kind = \"service-defaults\"\nName = \"api\"\nNamespace = \"team-a\"\n",
            "Namespace \"team-a\": not supported by weft yet (only \"default\")",
        ),
        (
            "kind = \"service-defaults\"\nname = \"api\"\n[upstream_config.defaults]\nexpose = {}\n",
            "Expose: Consul's field, not supported by weft yet",
        ),
        (
            "Kind = \"mesh\"\n",
            "Kind \"mesh\": Consul's kind, not supported by weft yet",
        ),
        (
            "Kind = \"proxy-defaults\"\nName = \"global\"\n[Config]\nenvoy_prometheus_bind_addr = \"0.0.0.0:9102\"\n",
            "envoy_prometheus_bind_addr: Consul's field, not supported by weft yet",
        ),
        (
            "Kind = \"proxy-defaults\"\nName = \"global\"\nMode = \"transparent\"\n",
            "Mode: Consul's field, not supported by weft yet",
        ),
    ] {
        let e = parse_entry_file(text, FileFormat::Toml)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{e}");
    }
    // A misspelt field stays "unknown".
    let e = parse_entry_file(
        "Kind = \"service-defaults\"\nName = \"a\"\nProtocl = \"http\"\n",
        FileFormat::Toml,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown field `Protocl`"), "{e}");
}

#[test]
fn consuls_spellings_and_meta_are_read_as_consul_reads_them() {
    let written = parse_entry_file(
        r#"{"kind": "service-router", "name": "api", "namespace": "default",
            "meta": {"team": "payments"},
            "routes": [{"match": {"http": {"path_prefix": "/v2", "header": [{"name": "x-canary", "exact": "1"}]}},
                        "destination": {"service_subset": "v2", "num_retries": 2, "retry_on_status_codes": [503]}}]}"#,
        FileFormat::Json,
    )
    .unwrap();
    let canonical = parse_entry_file(
        r#"{"Kind": "service-router", "Name": "api", "Meta": {"team": "payments"},
            "Routes": [{"Match": {"HTTP": {"PathPrefix": "/v2", "Header": [{"Name": "x-canary", "Exact": "1"}]}},
                        "Destination": {"ServiceSubset": "v2", "NumRetries": 2, "RetryOnStatusCodes": [503]}}]}"#,
        FileFormat::Json,
    )
    .unwrap();
    assert_eq!(written, canonical);
    assert_eq!(written.meta()["team"], "payments");
    // Meta is stored and shown, and checked like a service's.
    let json = serde_json::to_value(&written).unwrap();
    assert_eq!(json["Meta"]["team"], "payments");
    let bad_meta = parse_entry_file(
        r#"{"Kind": "service-defaults", "Name": "api", "Meta": {"": "x"}}"#,
        FileFormat::Json,
    )
    .unwrap();
    let e = validate_entry(&bad_meta, &EntrySet::new()).unwrap_err();
    assert_eq!(e.field(), "Meta", "{e}");
    // TOML and HCL too.
    let toml = parse_entry_file(
        "kind = \"service-defaults\"\nname = \"api\"\nprotocol = \"http\"\n",
        FileFormat::Toml,
    )
    .unwrap();
    let hcl = parse_entry_file(
        "kind = \"service-defaults\"\nname = \"api\"\nprotocol = \"http\"\n",
        FileFormat::Hcl,
    )
    .unwrap();
    assert_eq!(toml, hcl);
    assert_eq!(toml.name(), "api");
}

#[test]
fn file_errors_are_clear() {
    let e = parse_entry_file(
        "Kind = \"service-frobber\"\nName = \"api\"\n",
        FileFormat::Toml,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("unknown variant `service-frobber`"),
        "{e}"
    );
    let e = parse_entry_file("Name = \"api\"\n", FileFormat::Toml).unwrap_err();
    assert!(e.to_string().contains("missing field `Kind`"), "{e}");
    let e = parse_entry_file(
        "Kind = \"service-defaults\"\nName = \"api\"\nProtocl = \"http\"\n",
        FileFormat::Toml,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `Protocl`"), "{e}");
    let e = parse_entry_file(
        "Kind = \"service-defaults\"\nName = \"api\"\nProtocol = \"udp\"\n",
        FileFormat::Toml,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown variant `udp`"), "{e}");
    let e = parse_entry_file(
        "{\n \"Kind\": \"service-router\",\n \"Name\": \"api\",\n \"Routes\": [ { \"Match\": { \"HTTP\": { \"PathPrefx\": \"/\" } } } ]\n}",
        FileFormat::Json,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `PathPrefx`"), "{e}");
    let ConfigEntryError::Parse(p) = &e else {
        panic!("{e:?}")
    };
    assert_eq!((p.line, p.column), (Some(4), Some(38)), "{e}");
    let e = parse_entry_file(
        "Kind = \"service-defaults\"\nName = \"api\"\nProtocl = \"http\"\n",
        FileFormat::Toml,
    )
    .unwrap_err();
    assert!(
        e.to_string().starts_with("TOML at line 3, column 1: "),
        "{e}"
    );
    // Syntax errors point at the spot.
    let e = parse_entry_file(
        "Kind = \"service-defaults\"\nName = api\n",
        FileFormat::Toml,
    )
    .unwrap_err();
    let ConfigEntryError::Parse(p) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(p.line, Some(2), "{e}");
    let e = parse_entry_file(
        "{\"Kind\": \"service-defaults\",\n\"Name\": }",
        FileFormat::Json,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("JSON at line 2, column 9"), "{e}");
}

#[test]
fn kinds_and_protocols_as_text() {
    for k in EntryKind::ALL {
        assert_eq!(k.to_string().parse::<EntryKind>(), Ok(k));
    }
    let e = "service-intentions".parse::<EntryKind>().unwrap_err();
    assert_eq!(e.field(), "Kind");
    assert!(e
        .to_string()
        .contains("unknown kind \"service-intentions\""));
    for p in [
        Protocol::Tcp,
        Protocol::Http,
        Protocol::Http2,
        Protocol::Grpc,
    ] {
        assert_eq!(p.to_string().parse::<Protocol>(), Ok(p));
        assert_eq!(p.is_http(), p != Protocol::Tcp);
    }
    assert_eq!("HTTP".parse::<Protocol>().unwrap_err().field(), "Protocol");
    assert_eq!(Protocol::default(), Protocol::Tcp);
}

#[test]
fn names_are_checked() {
    assert!(
        err(defaults("Api", Protocol::Http)).starts_with("Name: bad character 'A' at position 1")
    );
    assert_eq!(err(defaults("", Protocol::Http)), "Name: must not be empty");
}

#[test]
fn splitter_rules() {
    let ok = splitter(vec![split(50.0, Some("v1")), split(50.0, Some("v2"))]);
    assert_eq!(validate_entry(&ok, &ctx()), Ok(()));
    // Float weights that round to 100 within 0.01.
    let thirds = splitter(vec![
        split(33.33, Some("v1")),
        split(33.33, Some("v2")),
        split(33.34, None),
    ]);
    assert_eq!(validate_entry(&thirds, &ctx()), Ok(()));
    assert_eq!(
        err(splitter(vec![
            split(50.0, Some("v1")),
            split(40.0, Some("v2"))
        ])),
        "Splits: weights add up to 90, not 100"
    );
    assert_eq!(
        err(splitter(vec![split(99.98, Some("v1"))])),
        "Splits: weights add up to 99.98, not 100"
    );
    assert_eq!(
        err(splitter(vec![
            split(120.0, Some("v1")),
            split(-20.0, Some("v2"))
        ])),
        "Splits[0].Weight: must be between 0 and 100, not 120"
    );
    assert_eq!(
        err(splitter(vec![
            split(100.0, Some("v1")),
            split(-0.5, Some("v2"))
        ])),
        "Splits[1].Weight: must be between 0 and 100, not -0.5"
    );
    assert_eq!(
        err(splitter(vec![split(f32::NAN, None)])),
        "Splits[0].Weight: must be between 0 and 100, not NaN"
    );
    assert_eq!(
        err(splitter(vec![])),
        "Splits: at least one split is required"
    );
    assert_eq!(
        err(splitter(vec![split(50.0, Some("v1")), split(50.0, Some("v3"))])),
        "Splits[1].ServiceSubset: subset \"v3\" is not defined in the service-resolver of \"api\" (defined: v1, v2)"
    );
    let mut other = split(50.0, Some("v1"));
    other.service = Some("web".into());
    assert_eq!(
        err(splitter(vec![split(50.0, Some("v1")), other])),
        "Splits[1].ServiceSubset: subset \"v1\" is not defined in the service-resolver of \"web\" (defined: none)"
    );
    let mut nores = split(50.0, Some("v1"));
    nores.service = Some("cache".into());
    let mut c = ctx();
    c.insert(defaults("cache", Protocol::Http));
    let e = validate_entry(&splitter(vec![split(50.0, None), nores]), &c).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Splits[1].ServiceSubset: service \"cache\" has no service-resolver, so it has no subset \"v1\""
    );
    let mut tcp = split(50.0, None);
    tcp.service = Some("db".into());
    let e = err(splitter(vec![split(50.0, None), tcp]));
    assert!(
        e.starts_with("Splits[1].Service: a service-splitter needs service \"db\" to speak http"),
        "{e}"
    );
    let mut bad = split(50.0, None);
    bad.service = Some("DB".into());
    assert!(err(splitter(vec![split(50.0, None), bad]))
        .starts_with("Splits[1].Service: bad character 'D'"));
    assert_eq!(
        err(splitter(vec![
            split(50.0, Some("v1")),
            split(50.0, Some("v1"))
        ])),
        "Splits[1]: service \"api\" subset \"v1\" appears in more than one split"
    );
}

#[test]
fn router_and_splitter_need_http() {
    let mut c = ctx();
    c.insert(defaults("api", Protocol::Tcp));
    let e = validate_entry(&splitter(vec![split(100.0, None)]), &c).unwrap_err();
    assert_eq!(e.field(), "Kind");
    assert!(
        e.to_string().contains(
            "needs service \"api\" to speak http, http2 or grpc, but its protocol is tcp"
        ),
        "{e}"
    );
    let e = validate_entry(&router(vec![]), &c).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Kind: a service-router needs service \"api\""),
        "{e}"
    );
    // No service-defaults at all: tcp.
    let e = validate_entry(&router(vec![]), &EntrySet::new()).unwrap_err();
    assert!(e.to_string().contains("its protocol is tcp"));
    for p in [Protocol::Http, Protocol::Http2, Protocol::Grpc] {
        c.insert(defaults("api", p));
        assert_eq!(validate_entry(&router(vec![]), &c), Ok(()));
    }
}

#[test]
fn router_rules() {
    let prefix = |p: &str| HttpMatch {
        path_prefix: Some(p.into()),
        ..Default::default()
    };
    let dest = RouteDestination::default;
    assert_eq!(
        validate_entry(&router(vec![route(None, dest())]), &ctx()),
        Ok(())
    );
    let e = err(router(vec![
        route(Some(prefix("/")), dest()),
        route(
            Some(HttpMatch {
                path_regex: Some("(".into()),
                ..Default::default()
            }),
            dest(),
        ),
    ]));
    assert!(
        e.starts_with("Routes[1].Match.HTTP.PathRegex: invalid regex: "),
        "{e}"
    );
    let e = err(router(vec![route(
        Some(HttpMatch {
            path_exact: Some("/a".into()),
            path_prefix: Some("/b".into()),
            ..Default::default()
        }),
        dest(),
    )]));
    assert!(
        e.starts_with("Routes[0].Match.HTTP: at most one of PathExact"),
        "{e}"
    );
    let e = err(router(vec![route(
        Some(HttpMatch {
            methods: vec!["get".into()],
            ..Default::default()
        }),
        dest(),
    )]));
    assert!(e.starts_with("Routes[0].Match.HTTP.Methods[0]"), "{e}");
    let e = err(router(vec![route(
        Some(HttpMatch {
            headers: vec![crate::http_match::HeaderMatch {
                name: "x".into(),
                regex: Some("[".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        dest(),
    )]));
    assert!(
        e.starts_with("Routes[0].Match.HTTP.Header[0].Regex: invalid regex"),
        "{e}"
    );
    let e = err(router(vec![route(
        Some(prefix("/")),
        RouteDestination {
            request_timeout: Some("5 seconds".into()),
            ..dest()
        },
    )]));
    assert!(
        e.starts_with("Routes[0].Destination.RequestTimeout: invalid duration \"5 seconds\""),
        "{e}"
    );
    assert_eq!(
        err(router(vec![route(Some(prefix("/")), RouteDestination { service_subset: Some("v9".into()), ..dest() })])),
        "Routes[0].Destination.ServiceSubset: subset \"v9\" is not defined in the service-resolver of \"api\" (defined: v1, v2)"
    );
    assert_eq!(
        err(router(vec![route(
            Some(HttpMatch { path_regex: Some("/x.*".into()), ..Default::default() }),
            RouteDestination { prefix_rewrite: Some("/".into()), ..dest() }
        )])),
        "Routes[0].Destination.PrefixRewrite: needs Match.HTTP.PathExact or Match.HTTP.PathPrefix on the route"
    );
    assert_eq!(
        err(router(vec![route(
            Some(prefix("/a")),
            RouteDestination {
                prefix_rewrite: Some("b".into()),
                ..dest()
            }
        )])),
        "Routes[0].Destination.PrefixRewrite: \"b\" must start with '/'"
    );
    assert_eq!(
        err(router(vec![route(
            None,
            RouteDestination {
                retry_on_status_codes: vec![503, 99],
                ..dest()
            }
        )])),
        "Routes[0].Destination.RetryOnStatusCodes[1]: 99 is not an HTTP status code (100 to 599)"
    );
    let e = err(router(vec![route(
        None,
        RouteDestination {
            service: Some("db".into()),
            ..dest()
        },
    )]));
    assert!(
        e.starts_with("Routes[0].Destination.Service: a service-router needs service \"db\""),
        "{e}"
    );
    let e = err(router(vec![route(
        None,
        RouteDestination {
            service: Some("db_".into()),
            ..dest()
        },
    )]));
    assert!(
        e.starts_with("Routes[0].Destination.Service: bad character '_' at position 3"),
        "{e}"
    );
}

#[test]
fn resolver_rules() {
    let ok = |r: ServiceResolver| validate_entry(&ConfigEntry::ServiceResolver(r), &ctx());
    let e = |r: ServiceResolver| ok(r).unwrap_err().to_string();
    assert_eq!(ok(resolver("api", &["v1"])), Ok(()));
    // Resolvers do not need http.
    assert_eq!(ok(resolver("db", &["v1"])), Ok(()));
    let mut r = resolver("api", &["v1"]);
    r.default_subset = Some("v2".into());
    assert_eq!(
        e(r),
        "DefaultSubset: subset \"v2\" is not defined in Subsets (defined: v1)"
    );
    let mut r = resolver("api", &["v1"]);
    r.subsets.get_mut("v1").unwrap().filter = "Service.Meta.version = v1".into();
    assert_eq!(
        e(r),
        "Subsets.v1.Filter: at position 22: expected '==' or '!=', found '='"
    );
    let r = resolver("api", &["V1"]);
    assert!(e(r).starts_with("Subsets.V1: bad character 'V'"));
    let mut r = resolver("api", &["v1"]);
    r.connect_timeout = Some("soon".into());
    assert!(e(r).starts_with("ConnectTimeout: invalid duration \"soon\""));
    // Failover.
    let mut r = resolver("api", &["v1", "v2"]);
    r.failover.insert(
        "v3".into(),
        ResolverFailover {
            datacenters: vec!["dc2".into()],
            ..Default::default()
        },
    );
    assert_eq!(
        e(r),
        "Failover.v3: no subset \"v3\" in Subsets (use \"*\" or one of: v1, v2)"
    );
    let mut r = resolver("api", &["v1"]);
    r.failover.insert("*".into(), ResolverFailover::default());
    assert_eq!(
        e(r),
        "Failover.*: one of Service, ServiceSubset, Datacenters or Targets is required"
    );
    let mut r = resolver("api", &["v1"]);
    r.failover.insert(
        "*".into(),
        ResolverFailover {
            datacenters: vec!["DC2".into()],
            ..Default::default()
        },
    );
    assert!(e(r).starts_with("Failover.*.Datacenters[0]: bad character 'D'"));
    let mut r = resolver("api", &["v1"]);
    r.failover.insert(
        "v1".into(),
        ResolverFailover {
            service_subset: Some("v2".into()),
            ..Default::default()
        },
    );
    // Own subsets come from the entry being written, not the stored one (which has v2).
    assert_eq!(
        e(r),
        "Failover.v1.ServiceSubset: subset \"v2\" is not defined in the service-resolver of \"api\" (defined: v1)"
    );
    let mut r = resolver("web", &[]);
    r.failover.insert(
        "*".into(),
        ResolverFailover {
            service: Some("api".into()),
            service_subset: Some("v2".into()),
            ..Default::default()
        },
    );
    assert_eq!(ok(r), Ok(()));
    // Failover targets: each checked, not with the other fields, bounded.
    let target = |service: Option<&str>, subset: Option<&str>, dc: Option<&str>| FailoverTarget {
        service: service.map(Into::into),
        service_subset: subset.map(Into::into),
        datacenter: dc.map(Into::into),
    };
    let with_targets = |targets: Vec<FailoverTarget>, datacenters: Vec<String>| {
        let mut r = resolver("web", &[]);
        r.failover.insert(
            "*".into(),
            ResolverFailover {
                targets,
                datacenters,
                ..Default::default()
            },
        );
        r
    };
    let good = vec![
        target(None, None, Some("dc2")),
        target(Some("api"), Some("v1"), None),
        target(Some("api"), None, Some("dc3")),
    ];
    assert_eq!(ok(with_targets(good.clone(), vec![])), Ok(()));
    assert_eq!(
        e(with_targets(good, vec!["dc2".into()])),
        "Failover.*.Targets: not with Service, ServiceSubset or Datacenters (list each as a target)"
    );
    assert_eq!(
        e(with_targets(vec![target(None, None, None)], vec![])),
        "Failover.*.Targets[0]: one of Service, ServiceSubset or Datacenter is required"
    );
    assert!(e(with_targets(
        vec![
            target(None, None, Some("dc2")),
            target(None, None, Some("DC3"))
        ],
        vec![]
    ))
    .starts_with("Failover.*.Targets[1].Datacenter: bad character 'D'"));
    assert!(e(with_targets(
        vec![target(Some("api"), Some("v7"), None)],
        vec![]
    ))
    .starts_with("Failover.*.Targets[0].ServiceSubset: subset \"v7\""));
    assert_eq!(
        e(with_targets(
            vec![target(None, None, Some("dc2")); 17],
            vec![]
        )),
        "Failover.*.Targets: 17 targets, at most 16"
    );
    // Redirect.
    let mut r = resolver("web", &[]);
    r.redirect = Some(ResolverRedirect {
        service: Some("api".into()),
        service_subset: Some("v1".into()),
        ..Default::default()
    });
    assert_eq!(ok(r), Ok(()));
    let mut r = resolver("web", &[]);
    r.redirect = Some(ResolverRedirect {
        service: Some("api".into()),
        service_subset: Some("v7".into()),
        ..Default::default()
    });
    assert!(e(r).starts_with("Redirect.ServiceSubset: subset \"v7\""));
    let mut r = resolver("web", &["v1"]);
    r.redirect = Some(ResolverRedirect {
        service: Some("api".into()),
        ..Default::default()
    });
    assert_eq!(
        e(r),
        "Redirect: cannot be combined with Subsets, DefaultSubset or Failover"
    );
    let mut r = resolver("web", &[]);
    r.redirect = Some(ResolverRedirect::default());
    assert_eq!(
        e(r),
        "Redirect: one of Service, ServiceSubset or Datacenter is required"
    );
    let mut r = resolver("web", &[]);
    r.redirect = Some(ResolverRedirect {
        service: Some("web".into()),
        ..Default::default()
    });
    assert_eq!(e(r), "Redirect: redirects \"web\" to itself");
    let mut r = resolver("web", &[]);
    r.redirect = Some(ResolverRedirect {
        datacenter: Some("Dc2".into()),
        ..Default::default()
    });
    assert!(e(r).starts_with("Redirect.Datacenter: bad character"));
}

#[test]
fn l7_intentions_need_http_destinations() {
    let perm = Permission {
        action: IntentionAction::Allow,
        http: HttpMatch {
            path_prefix: Some("/".into()),
            ..Default::default()
        },
    };
    let c = ctx();
    assert_eq!(
        validate_intention_protocol(&Intention::l7("web", "api", vec![perm.clone()]), &c),
        Ok(())
    );
    assert_eq!(
        validate_intention_protocol(&Intention::l4("web", "db", IntentionAction::Allow), &c),
        Ok(())
    );
    let e = validate_intention_protocol(&Intention::l7("web", "db", vec![perm.clone()]), &c)
        .unwrap_err();
    assert_eq!(e.field(), "Permissions");
    assert!(
        e.to_string().contains(
            "need destination \"db\" to speak http, http2 or grpc, but its protocol is tcp"
        ),
        "{e}"
    );
    let e = validate_intention_protocol(&Intention::l7("web", "unknown", vec![perm.clone()]), &c)
        .unwrap_err();
    assert!(e.to_string().contains("protocol is tcp"));
    let e = validate_intention_protocol(&Intention::l7("web", "*", vec![perm]), &c).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Permissions: L7 permissions need a specific destination service, not \"*\""
    );
}

#[test]
fn entry_set_context() {
    let mut c = ctx();
    assert_eq!(c.protocol("api"), Protocol::Http);
    assert_eq!(c.protocol("nobody"), Protocol::Tcp);
    assert!(c.resolver("api").is_some());
    assert!(c.resolver("db").is_none());
    let old = c.insert(defaults("api", Protocol::Http2));
    assert_eq!(old.as_deref(), Some(&defaults("api", Protocol::Http)));
    assert_eq!(c.protocol("api"), Protocol::Http2);
    assert!(c.remove(EntryKind::ServiceResolver, "api").is_some());
    assert!(c.resolver("api").is_none());
    assert_eq!(c.iter().count(), 4);
    assert_eq!(c.iter().next().unwrap().kind(), EntryKind::ServiceDefaults);
}

#[test]
fn stored_entry_round_trips() {
    let s = StoredEntry {
        entry: defaults("api", Protocol::Http),
        create_index: 5,
        modify_index: 7,
    };
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(
        json,
        r#"{"entry":{"Kind":"service-defaults","Name":"api","Protocol":"http"},"create_index":5,"modify_index":7}"#
    );
    assert_eq!(serde_json::from_str::<StoredEntry>(&json).unwrap(), s);
}

#[test]
fn route_selection() {
    let r = ServiceRouter {
        name: "api".into(),
        meta: Default::default(),
        routes: vec![
            route(
                Some(HttpMatch {
                    path_prefix: Some("/admin".into()),
                    ..Default::default()
                }),
                RouteDestination {
                    service_subset: Some("v2".into()),
                    ..Default::default()
                },
            ),
            route(
                Some(HttpMatch {
                    path_regex: Some("(".into()),
                    ..Default::default()
                }),
                RouteDestination::default(),
            ),
            route(
                Some(HttpMatch {
                    methods: vec!["POST".into()],
                    ..Default::default()
                }),
                RouteDestination {
                    service: Some("web".into()),
                    ..Default::default()
                },
            ),
        ],
    };
    assert_eq!(
        select_route(&r, &Request::new("GET", "/admin/x"))
            .unwrap()
            .0,
        0
    );
    assert_eq!(select_route(&r, &Request::new("POST", "/x")).unwrap().0, 2);
    assert!(select_route(&r, &Request::new("GET", "/x")).is_none());
    let mut catch_all = r.clone();
    catch_all.routes.push(Route::default());
    assert_eq!(
        select_route(&catch_all, &Request::new("GET", "/x"))
            .unwrap()
            .0,
        3
    );
}

#[test]
fn split_picking() {
    let s = ServiceSplitter {
        name: "api".into(),
        meta: Default::default(),
        splits: vec![
            split(90.0, Some("v1")),
            split(0.0, Some("v3")),
            split(10.0, Some("v2")),
        ],
    };
    let pick = |roll: f32| {
        pick_split(&s, roll)
            .unwrap()
            .service_subset
            .clone()
            .unwrap()
    };
    assert_eq!(pick(0.0), "v1");
    assert_eq!(pick(89.99), "v1");
    assert_eq!(pick(90.0), "v2");
    assert_eq!(pick(99.999), "v2");
    assert_eq!(pick(100.0), "v2");
    assert!(pick_split(&ServiceSplitter::default(), 1.0).is_none());
}

#[test]
fn subset_membership() {
    let inst = |version: &str, health: HealthStatus| ServiceInstance {
        id: "i".into(),
        service: "api".into(),
        node: "n".into(),
        address: "10.0.0.1".into(),
        port: 80,
        tags: vec![],
        meta: [("version".to_string(), version.to_string())].into(),
        health,
        check_output: String::new(),
        create_index: 0,
        modify_index: 0,
        ..Default::default()
    };
    let v1 = ResolverSubset {
        filter: "Service.Meta.version == v1".into(),
        only_passing: false,
    };
    assert!(v1.contains(&inst("v1", HealthStatus::Passing)));
    assert!(v1.contains(&inst("v1", HealthStatus::Warning)));
    assert!(!v1.contains(&inst("v1", HealthStatus::Critical)));
    assert!(!v1.contains(&inst("v2", HealthStatus::Passing)));
    let strict = ResolverSubset {
        only_passing: true,
        ..v1.clone()
    };
    assert!(!strict.contains(&inst("v1", HealthStatus::Warning)));
    assert!(strict.contains(&inst("v1", HealthStatus::Passing)));
    let all = ResolverSubset::default();
    assert!(all.contains(&inst("v9", HealthStatus::Passing)));
    let broken = ResolverSubset {
        filter: "nonsense".into(),
        only_passing: false,
    };
    assert!(!broken.contains(&inst("v1", HealthStatus::Passing)));
}

#[test]
fn referenced_services_are_every_other_target_once() {
    let json = r#"{"Kind":"service-resolver","Name":"api",
        "Redirect":{"Service":"db"},
        "Failover":{"*":{"Service":"cache"},"v1":{"Service":"db"},"v2":{"ServiceSubset":"v1"}}}"#;
    let entry = parse_entry_file(json, FileFormat::Json).unwrap();
    let refs: Vec<&str> = entry.referenced_services().into_iter().collect();
    assert_eq!(refs, vec!["cache", "db"]);
    let splitter = r#"{"Kind":"service-splitter","Name":"web",
        "Splits":[{"Weight":50},{"Weight":50,"Service":"web-next"}]}"#;
    let entry = parse_entry_file(splitter, FileFormat::Json).unwrap();
    assert_eq!(
        entry.referenced_services().into_iter().collect::<Vec<_>>(),
        vec!["web-next"]
    );
    assert!(defaults("web", Protocol::Http)
        .referenced_services()
        .is_empty());
}

/// `UpstreamConfig.Overrides` take over from `Defaults` for the upstream
/// they name; limits, connect timeouts and the passive health check's
/// other fields are checked as Consul checks them.
#[test]
fn upstream_overrides_limits_and_outlier_fields() {
    let text = r#"{"Kind": "service-defaults", "Name": "web",
      "UpstreamConfig": {
        "Defaults": {"ConnectTimeoutMs": 1500,
          "Limits": {"MaxConnections": 10, "MaxPendingRequests": 5, "MaxConcurrentRequests": 20},
          "PassiveHealthCheck": {"MaxFailures": 5, "Interval": "5s", "EnforcingConsecutive5xx": 50,
                                 "MaxEjectionPercent": 30}},
        "Overrides": [{"Name": "db", "Namespace": "default", "Limits": {"MaxConnections": 2}}]}}"#;
    let entry = parse_entry_file(text, FileFormat::Json).unwrap();
    validate_entry(&entry, &EntrySet::new()).unwrap();
    let ConfigEntry::ServiceDefaults(d) = &entry else {
        panic!()
    };
    let api = d.upstream("api").unwrap();
    assert_eq!(api.connect_timeout_ms, Some(1500));
    assert_eq!(api.limits.unwrap().max_pending_requests, Some(5));
    assert_eq!(
        api.passive_health_check.unwrap().max_ejection_percent,
        Some(30)
    );
    let db = d.upstream("db").unwrap();
    assert_eq!(db.limits.unwrap().max_connections, Some(2));
    // What the override leaves out comes from the defaults, as in Consul.
    assert_eq!(db.passive_health_check.unwrap().max_failures, 5);
    assert_eq!(db.connect_timeout_ms, Some(1500));

    let refused = |from: &str, to: &str| {
        let bad = text.replace(from, to);
        let entry = parse_entry_file(&bad, FileFormat::Json).unwrap();
        validate_entry(&entry, &EntrySet::new())
            .unwrap_err()
            .to_string()
    };
    assert!(refused("\"MaxConnections\": 2", "\"MaxConnections\": 0")
        .starts_with("UpstreamConfig.Overrides[0].Limits.MaxConnections: must be at least 1"));
    assert!(refused(
        "\"EnforcingConsecutive5xx\": 50",
        "\"EnforcingConsecutive5xx\": 101"
    )
    .contains("EnforcingConsecutive5xx: 101 is a percentage"));
    assert!(refused("\"Interval\": \"5s\"", "\"Interval\": \"0s\"")
        .contains("PassiveHealthCheck.Interval: \"0s\" is not above 0"));
    assert!(refused("1500", "0").starts_with("UpstreamConfig.Defaults.ConnectTimeoutMs"));
    // An ejection time that would overflow the clock is refused.
    assert!(refused(
        "\"Interval\": \"5s\"",
        "\"Interval\": \"5s\", \"BaseEjectionTime\": \"3000000000000000h\""
    )
    .contains("BaseEjectionTime"));
    assert!(refused("\"Interval\": \"5s\"", "\"Interval\": \"2h\"").contains("at most 1h"));
    assert!(refused("\"Name\": \"db\"", "\"Name\": \"d b\"")
        .starts_with("UpstreamConfig.Overrides[0].Name"));
    let twice = text.replace("\"Overrides\": [", "\"Overrides\": [{\"Name\": \"db\"}, ");
    let entry = parse_entry_file(&twice, FileFormat::Json).unwrap();
    assert!(validate_entry(&entry, &EntrySet::new())
        .unwrap_err()
        .to_string()
        .contains("overridden twice"));
    // What weft does not do yet is refused by name.
    let e = parse_entry_file(
        r#"{"Kind": "service-defaults", "Name": "web", "UpstreamConfig": {"Defaults": {"BalanceOutboundConnections": "exact_balance"}}}"#,
        FileFormat::Json,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("BalanceOutboundConnections: Consul's field, not supported by weft yet"),
        "{e}"
    );
}

/// proxy-defaults: one entry, `global`; its `Config.protocol` is the
/// protocol of every service whose service-defaults set none.
#[test]
fn proxy_defaults_give_the_protocol_of_services_without_their_own() {
    let proxy = parse_entry_file(
        r#"Kind = "proxy-defaults"
Name = "global"
Meta = { owner = "platform" }
Config {
  protocol = "http"
  connect_timeout_ms = 2500
}
"#,
        FileFormat::Hcl,
    )
    .unwrap();
    validate_entry(&proxy, &EntrySet::new()).unwrap();
    let ConfigEntry::ProxyDefaults(p) = &proxy else {
        panic!("{proxy:?}")
    };
    assert_eq!(p.config.connect_timeout_ms, Some(2500));
    let tcp_db = parse_entry_file(
        r#"{"Kind": "service-defaults", "Name": "db", "Protocol": "tcp"}"#,
        FileFormat::Json,
    )
    .unwrap();
    let set = EntrySet::from_iter([proxy.clone(), tcp_db]);
    assert_eq!(set.protocol("api"), Protocol::Http, "inherited");
    assert_eq!(set.protocol("db"), Protocol::Tcp, "its own wins");
    // A router for a service that is HTTP by the proxy-defaults alone.
    let router = parse_entry_file(
        r#"{"Kind": "service-router", "Name": "api", "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a"}}}]}"#,
        FileFormat::Json,
    )
    .unwrap();
    assert_eq!(validate_entry(&router, &set), Ok(()));
    assert!(validate_entry(&router, &EntrySet::new()).is_err());

    let bad = |text: &str| {
        let e = parse_entry_file(text, FileFormat::Json).and_then(|e| validate_entry(&e, &set));
        e.unwrap_err().to_string()
    };
    assert_eq!(
        bad(r#"{"Kind": "proxy-defaults", "Name": "mesh"}"#),
        "Name: \"mesh\": a proxy-defaults entry is named \"global\""
    );
    assert!(
        bad(r#"{"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "udp"}}"#)
            .contains("unknown variant `udp`")
    );
    assert!(bad(
        r#"{"Kind": "proxy-defaults", "Name": "global", "Config": {"connect_timeout_ms": 0}}"#
    )
    .starts_with("Config.connect_timeout_ms"));
    assert!(
        bad(r#"{"Kind": "proxy-defaults", "Name": "global", "Config": {"Protocol": "http"}}"#)
            .contains("unknown field `Protocol`"),
        "Config's keys are Envoy's, as written"
    );
    assert!(
        bad(r#"{"Kind": "proxy-defaults", "Name": "global", "MutualTLSMode": "permissive"}"#)
            .starts_with("MutualTLSMode: not supported by weft yet")
    );
}

#[test]
fn num_retries_are_bounded() {
    let router = |n: u32| {
        parse_entry_file(
            &format!(r#"{{"Kind": "service-router", "Name": "api", "Routes": [{{"Destination": {{"NumRetries": {n}}}}}]}}"#),
            FileFormat::Json,
        )
        .unwrap()
    };
    let mut set = EntrySet::new();
    set.insert(defaults("api", Protocol::Http));
    assert_eq!(validate_entry(&router(MAX_RETRIES), &set), Ok(()));
    let e = validate_entry(&router(MAX_RETRIES + 1), &set).unwrap_err();
    assert_eq!(e.field(), "Routes[0].Destination.NumRetries", "{e}");
}

#[test]
fn mesh_gateway_modes_local_and_remote_are_taken_and_none_is_refused() {
    let entry = |text: &str| parse_entry_file(text, FileFormat::Hcl).unwrap();
    let ok = entry(
        "Kind = \"service-defaults\"\nName = \"web\"\nMeshGateway {\n  Mode = \"remote\"\n}\n\
         UpstreamConfig {\n  Defaults {\n    MeshGateway {\n      Mode = \"local\"\n    }\n  }\n\
         Overrides = [{ Name = \"api\", MeshGateway = { Mode = \"remote\" } }]\n}\n",
    );
    assert_eq!(validate_entry(&ok, &ctx()), Ok(()));
    let ConfigEntry::ServiceDefaults(d) = &ok else {
        panic!("{ok:?}")
    };
    assert_eq!(
        d.mesh_gateway.as_ref().unwrap().mode,
        MeshGatewayMode::Remote
    );
    // The override wins for its upstream, the defaults for the others.
    assert_eq!(
        d.upstream("api").unwrap().mesh_gateway,
        Some(MeshGatewayMode::Remote)
    );
    assert_eq!(
        d.upstream("db").unwrap().mesh_gateway,
        Some(MeshGatewayMode::Local)
    );
    let empty =
        entry("Kind = \"proxy-defaults\"\nName = \"global\"\nMeshGateway { Mode = \"\" }\n");
    assert_eq!(validate_entry(&empty, &ctx()), Ok(()));
    for (text, field) in [
        (
            "Kind = \"proxy-defaults\"\nName = \"global\"\nMeshGateway {\n  Mode = \"none\"\n}\n",
            "MeshGateway.Mode",
        ),
        (
            "Kind = \"service-defaults\"\nName = \"web\"\nUpstreamConfig {\n  Overrides = [{ Name = \"api\", MeshGateway = { Mode = \"none\" } }]\n}\n",
            "UpstreamConfig.Overrides[0].MeshGateway.Mode",
        ),
    ] {
        let e = validate_entry(&entry(text), &ctx()).unwrap_err().to_string();
        assert!(e.starts_with(field) && e.contains("not supported"), "{e}");
    }
    assert!(parse_entry_file(
        "Kind = \"service-defaults\"\nName = \"web\"\nMeshGateway {\n  Mode = \"sideways\"\n}\n",
        FileFormat::Hcl
    )
    .is_err());
}
