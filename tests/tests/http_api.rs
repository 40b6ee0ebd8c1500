//! The server's HTTP API (docs/http-api.md) against a real server over TLS
//! with curl: every endpoint that needs a token refuses none, a made-up one
//! and one without the right; what a token may do it does in Consul's JSON
//! shapes (KV, intentions, config entries, catalog and health, the UI's
//! views); bad input is refused with what is wrong; the UI's files come
//! with a Content-Security-Policy and no secret.
use anyhow::Context;
use serde_json::Value;
use weft_api::proto;
use weft_tests::servers::Cluster;

/// Every endpoint that needs a token, with a method it answers.
const GUARDED: &[(&str, &str)] = &[
    ("GET", "/metrics"),
    ("GET", "/v1/acl/token/self"),
    ("GET", "/v1/acl/tokens"),
    ("PUT", "/v1/acl/token"),
    ("GET", "/v1/acl/policies"),
    ("PUT", "/v1/acl/policy"),
    ("GET", "/v1/catalog/services"),
    ("GET", "/v1/catalog/nodes"),
    ("GET", "/v1/health/service/api"),
    ("GET", "/v1/catalog/service/api"),
    ("GET", "/v1/catalog/node/n1"),
    ("GET", "/v1/health/checks/api"),
    ("GET", "/v1/health/node/n1"),
    ("GET", "/v1/connect/ca/roots"),
    ("GET", "/v1/connect/intentions"),
    (
        "GET",
        "/v1/connect/intentions/exact?source=web&destination=api",
    ),
    (
        "PUT",
        "/v1/connect/intentions/exact?source=web&destination=api",
    ),
    (
        "DELETE",
        "/v1/connect/intentions/exact?source=web&destination=api",
    ),
    (
        "GET",
        "/v1/connect/intentions/check?source=web&destination=api",
    ),
    ("GET", "/v1/config/service-defaults"),
    ("GET", "/v1/config/service-defaults/api"),
    ("PUT", "/v1/config"),
    ("DELETE", "/v1/config/service-defaults/api"),
    ("GET", "/v1/kv/app/a"),
    ("PUT", "/v1/session/create"),
    ("GET", "/v1/session/list"),
    ("GET", "/v1/snapshot"),
    ("PUT", "/v1/snapshot"),
    ("GET", "/v1/session/node/n1"),
    ("GET", "/v1/kv/app/?recurse"),
    ("PUT", "/v1/kv/app/a"),
    ("DELETE", "/v1/kv/app/a"),
    ("GET", "/v1/internal/ui/services"),
    ("GET", "/v1/internal/ui/nodes"),
    ("GET", "/v1/internal/ui/datacenters"),
    ("GET", "/v1/internal/ui/topology"),
    ("GET", "/v1/internal/ui/service-topology/api"),
    ("GET", "/v1/internal/ui/traffic/api"),
];

/// A body each write would accept from a token with the right.
fn body_for(path: &str) -> Option<&'static [u8]> {
    if path.starts_with("/v1/connect/intentions/exact") {
        Some(br#"{"Action":"deny"}"#)
    } else if path == "/v1/config" {
        Some(br#"{"Kind":"service-defaults","Name":"api","Protocol":"http"}"#)
    } else if path == "/v1/acl/token" {
        Some(br#"{"Description":"x"}"#)
    } else if path == "/v1/acl/policy" {
        Some(br#"{"Name":"x","Rules":"key_prefix \"\" { policy = \"write\" }"}"#)
    } else if path == "/v1/session/create" {
        Some(br#"{"Node":"n1"}"#)
    } else if path.starts_with("/v1/kv/") {
        Some(b"value")
    } else {
        None
    }
}

#[test]
fn every_endpoint_refuses_missing_bogus_and_weak_tokens() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    // Reads keys under nothing/ only.
    let weak = cluster.token_with_rules("weak", r#"key_prefix "nothing/" { policy = "read" }"#)?;
    let mut failures = Vec::new();
    for (method, path) in GUARDED {
        for (who, token) in [
            ("no token", None),
            (
                "a bogus token",
                Some("00000000-0000-4000-8000-000000000000"),
            ),
            ("a weak token", Some(weak.as_str())),
        ] {
            // The weak token is a valid token: reading itself is its right.
            if who == "a weak token" && *path == "/v1/acl/token/self" {
                continue;
            }
            let reply = cluster.http(1, method, path, token, body_for(path))?;
            // A key list is filtered to what the token reads, as in Consul:
            // for this token, nothing, so no such keys.
            let expected = if who == "a weak token" && path.ends_with("?recurse") {
                404
            } else {
                403
            };
            if reply.status != expected {
                failures.push(format!(
                    "{method} {path} with {who}: {} {}",
                    reply.status, reply.body
                ));
            }
        }
    }
    assert!(failures.is_empty(), "not refused:\n{}", failures.join("\n"));
    // Nothing was written by those attempts.
    let m = Some(cluster.token.as_str());
    assert_eq!(cluster.http(1, "GET", "/v1/kv/app/a", m, None)?.status, 404);
    let intentions = cluster.http(1, "GET", "/v1/connect/intentions", m, None)?;
    assert_eq!(intentions.json()?, serde_json::json!([]));

    // What needs no token: Consul's status endpoints and the UI's files.
    let leader = cluster.http(1, "GET", "/v1/status/leader", None, None)?;
    assert_eq!(leader.status, 200);
    assert_eq!(
        leader.json()?,
        Value::String(cluster.servers[0].raft_addr.clone())
    );
    let page = cluster.http(1, "GET", "/ui/", None, None)?;
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").context("a CSP")?;
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert!(page.body.contains("/ui/app.js"), "{}", page.body);
    let js = cluster.http(1, "GET", "/ui/app.js", None, None)?;
    assert_eq!(js.status, 200);
    assert!(js
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/javascript")));
    assert_eq!(js.header("x-content-type-options"), Some("nosniff"));
    let root = cluster.http(1, "GET", "/", None, None)?;
    assert_eq!((root.status, root.header("location")), (302, Some("/ui/")));
    assert_eq!(
        cluster
            .http(1, "GET", "/ui/../etc/passwd", None, None)?
            .status,
        404
    );
    assert_eq!(cluster.http(1, "GET", "/v1/nothing", m, None)?.status, 404);
    // A cross-origin page gets no CORS allowance.
    assert!(intentions.header("access-control-allow-origin").is_none());
    Ok(())
}

#[test]
fn kv_intentions_and_config_entries_in_consuls_shapes() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let m = Some(cluster.token.as_str());
    let http =
        |method: &str, path: &str, body: Option<&[u8]>| cluster.http(1, method, path, m, body);

    // The token itself, without its secret.
    let me = http("GET", "/v1/acl/token/self", None)?;
    assert_eq!(me.status, 200, "{}", me.body);
    let me = me.json()?;
    assert!(
        me["AccessorID"].as_str().is_some_and(|a| !a.is_empty()),
        "{me}"
    );
    assert!(me.get("SecretID").is_none(), "{me}");
    assert!(
        !me.to_string().contains(&cluster.token),
        "the secret is in {me}"
    );

    // ACL: a policy and a token made over HTTP; the secret shows once, and
    // the token works.
    let policy = http(
        "PUT",
        "/v1/acl/policy",
        Some(br#"{"Name":"kv-app","Rules":"key_prefix \"app/\" { policy = \"write\" }"}"#),
    )?;
    assert_eq!(policy.status, 200, "{}", policy.body);
    let made = http(
        "PUT",
        "/v1/acl/token",
        Some(br#"{"Description":"app","Policies":[{"Name":"kv-app"}]}"#),
    )?;
    assert_eq!(made.status, 200, "{}", made.body);
    let made = made.json()?;
    let (accessor, secret) = (
        made["AccessorID"]
            .as_str()
            .context("AccessorID")?
            .to_string(),
        made["SecretID"]
            .as_str()
            .context("SecretID once")?
            .to_string(),
    );
    let read = http("GET", &format!("/v1/acl/token/{accessor}"), None)?.json()?;
    assert_eq!(read["Policies"][0]["Name"], "kv-app", "{read}");
    assert!(
        read.get("SecretID").is_none() && !read.to_string().contains(&secret),
        "{read}"
    );
    let listed = http("GET", "/v1/acl/tokens", None)?;
    assert!(!listed.body.contains(&secret), "a secret in the token list");
    let as_app = cluster.http(1, "PUT", "/v1/kv/app/by-app", Some(&secret), Some(b"x"))?;
    assert_eq!(as_app.status, 200, "{}", as_app.body);
    let outside = cluster.http(1, "PUT", "/v1/kv/other", Some(&secret), Some(b"x"))?;
    assert_eq!(outside.status, 403, "{}", outside.body);
    for (body, names) in [
        (
            &br#"{"SecretID":"00000000-0000-4000-8000-000000000001"}"#[..],
            "SecretID",
        ),
        (br#"{"ExpirationTTL":"1h"}"#, "ExpirationTTL"),
        (br#"{"Policies":[{"Name":"no-such"}]}"#, "no-such"),
    ] {
        let bad = http("PUT", "/v1/acl/token", Some(body))?;
        assert_eq!(
            bad.status,
            400,
            "{}: {}",
            String::from_utf8_lossy(body),
            bad.body
        );
        assert!(bad.body.contains(names), "{names}: {}", bad.body);
    }
    assert_eq!(
        http("DELETE", &format!("/v1/acl/token/{accessor}"), None)?.json()?,
        true
    );
    let gone = cluster.http(1, "GET", "/v1/kv/app/by-app", Some(&secret), None)?;
    assert_eq!(gone.status, 403, "a deleted token: {}", gone.body);
    assert_eq!(
        cluster
            .http(1, "PUT", "/v1/acl/bootstrap", None, None)?
            .status,
        403,
        "bootstrap is once"
    );
    assert_eq!(http("DELETE", "/v1/kv/app/by-app", None)?.json()?, true);

    // KV: put, get (base64), raw, check-and-set, keys, delete.
    assert_eq!(http("PUT", "/v1/kv/app/a", Some(b"hello"))?.json()?, true);
    assert_eq!(http("PUT", "/v1/kv/app/sub/b", Some(b"x"))?.json()?, true);
    let got = http("GET", "/v1/kv/app/a", None)?;
    let entry = &got.json()?[0];
    assert_eq!(entry["Key"], "app/a");
    assert_eq!(entry["Value"], "aGVsbG8=", "base64 of hello");
    let index = entry["ModifyIndex"].as_u64().context("ModifyIndex")?;
    assert!(got.header("x-consul-index").is_some());
    assert_eq!(http("GET", "/v1/kv/app/a?raw", None)?.body, "hello");
    // cas=0 means only if absent: refused with false, and nothing changed.
    assert_eq!(
        http("PUT", "/v1/kv/app/a?cas=0", Some(b"no"))?.json()?,
        false
    );
    assert_eq!(
        http("PUT", &format!("/v1/kv/app/a?cas={index}"), Some(b"yes"))?.json()?,
        true
    );
    assert_eq!(http("GET", "/v1/kv/app/a?raw", None)?.body, "yes");
    assert_eq!(
        http("GET", "/v1/kv/app/?keys&separator=/", None)?.json()?,
        serde_json::json!(["app/a", "app/sub/"])
    );
    assert_eq!(
        http("GET", "/v1/kv/app/?recurse", None)?
            .json()?
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(http("DELETE", "/v1/kv/app/a", None)?.json()?, true);
    assert_eq!(http("GET", "/v1/kv/app/a", None)?.status, 404);
    // What weft does not do yet is refused, not ignored.
    let unknown = http("PUT", "/v1/kv/app/c?fancy=1", Some(b"v"))?;
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    assert!(unknown.body.contains("fancy"), "{}", unknown.body);
    assert_eq!(
        http("GET", "/v1/kv/app/c", None)?.status,
        404,
        "a refused put wrote nothing"
    );
    // A recursive delete: the tree, nothing beside it, and only for a
    // token that may write every key in it.
    for key in ["tree/1", "tree/sub/2", "tree/secret", "treehouse"] {
        assert_eq!(
            http("PUT", &format!("/v1/kv/{key}"), Some(b"v"))?.json()?,
            true
        );
    }
    let partial = cluster.token_with_rules(
        "tree-but-secret",
        r#"key_prefix "tree/" { policy = "write" }
key "tree/secret" { policy = "read" }"#,
    )?;
    let refused = cluster.http(1, "DELETE", "/v1/kv/tree/?recurse", Some(&partial), None)?;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(
        http("GET", "/v1/kv/tree/1", None)?.status,
        200,
        "nothing deleted"
    );
    let cas = http("DELETE", "/v1/kv/tree/?recurse&cas=3", None)?;
    assert_eq!(cas.status, 400, "{}", cas.body);
    assert_eq!(http("DELETE", "/v1/kv/tree/?recurse", None)?.json()?, true);
    assert_eq!(http("GET", "/v1/kv/tree/?recurse", None)?.status, 404);
    assert_eq!(
        http("GET", "/v1/kv/treehouse", None)?.status,
        200,
        "beside the tree"
    );
    assert_eq!(http("DELETE", "/v1/kv/treehouse", None)?.json()?, true);
    let big = vec![b'x'; 3 << 20];
    assert_eq!(http("PUT", "/v1/kv/app/big", Some(&big))?.status, 413);
    let cas = http("PUT", "/v1/kv/app/c?cas=x", Some(b"v"))?;
    assert_eq!(cas.status, 400);
    assert!(cas.body.contains("cas"), "{}", cas.body);
    // Ambiguous queries are refused, not read one way or the other.
    for (path, names) in [
        ("/v1/kv/app/c?cas=5&cas=0", "more than once"),
        ("/v1/kv/app/?recurse=maybe", "recurse"),
        ("/v1/kv/app/?recurse&keys", "recurse with keys"),
        ("/v1/kv/app/?keys&raw", "raw"),
        ("/v1/kv/app/?separator=/", "separator"),
    ] {
        let method = if path.contains("cas") { "PUT" } else { "GET" };
        let reply = http(method, path, Some(&b"v"[..]).filter(|_| method == "PUT"))?;
        assert_eq!(reply.status, 400, "{path}: {}", reply.body);
        assert!(reply.body.contains(names), "{path}: {}", reply.body);
    }
    // A flag reads as Go's ParseBool reads it: `recurse=false` is one key.
    assert_eq!(http("GET", "/v1/kv/app/?recurse=false", None)?.status, 404);
    // A key a URL would resolve to another one is refused.
    let dotted = http("PUT", "/v1/kv/app/%2e%2e%2Fsecret", Some(b"v"))?;
    assert_eq!(dotted.status, 400, "{}", dotted.body);
    assert!(dotted.body.contains("segment"), "{}", dotted.body);

    // Intentions: write, list, explain, L7 permissions (api speaks HTTP),
    // delete.
    let http_api = br#"{"Kind":"service-defaults","Name":"api","Protocol":"http"}"#;
    assert_eq!(http("PUT", "/v1/config", Some(http_api))?.json()?, true);
    let put = http(
        "PUT",
        "/v1/connect/intentions/exact?source=web&destination=api",
        Some(br#"{"Action":"deny","Description":"not yet"}"#),
    )?;
    assert_eq!((put.status, put.json()?), (200, Value::Bool(true)));
    let list = http("GET", "/v1/connect/intentions", None)?.json()?;
    assert_eq!(list[0]["SourceName"], "web", "{list}");
    assert_eq!(list[0]["DestinationName"], "api", "{list}");
    assert_eq!(list[0]["Action"], "deny", "{list}");
    assert_eq!(list[0]["Description"], "not yet", "{list}");
    let check = http(
        "GET",
        "/v1/connect/intentions/check?source=web&destination=api",
        None,
    )?
    .json()?;
    assert_eq!(check["Allowed"], false, "{check}");
    assert_eq!(check["Reason"], "denied by intention web => api", "{check}");
    assert_eq!(check["DecidedBy"]["SourceName"], "web", "{check}");
    let l7 = br#"{"Permissions":[{"Action":"allow","HTTP":{"PathPrefix":"/public","Methods":["GET"]}}]}"#;
    assert_eq!(
        http(
            "PUT",
            "/v1/connect/intentions/exact?source=web&destination=api",
            Some(l7)
        )?
        .json()?,
        true
    );
    let check = |q: &str| -> anyhow::Result<Value> {
        http(
            "GET",
            &format!("/v1/connect/intentions/check?source=web&destination=api{q}"),
            None,
        )?
        .json()
    };
    let allowed = check("&method=GET&path=/public/x")?;
    assert_eq!(allowed["Allowed"], true, "{allowed}");
    assert_eq!(allowed["PermissionIndex"], 0, "{allowed}");
    assert_eq!(check("&method=POST&path=/public/x")?["Allowed"], false);
    for (body, names) in [
        (&br#"{"Action":"maybe"}"#[..], "Action"),
        (br#"{"Action":"allow","Meta":{"a":"b"}}"#, "Meta"),
        (br#"{"SourceName":"db","Action":"allow"}"#, "SourceName"),
        (
            br#"{"Permissions":[{"Action":"allow","HTTP":{"PathRegex":"("}}]}"#,
            "PathRegex",
        ),
        // Paths no request can have: a deny on them would deny nothing.
        (
            br#"{"Permissions":[{"Action":"deny","HTTP":{"PathPrefix":"/admin/.."}}]}"#,
            "Permissions[0].HTTP.PathPrefix",
        ),
        (
            br#"{"Permissions":[{"Action":"deny","HTTP":{"PathExact":"/a%2Fb"}}]}"#,
            "Permissions[0].HTTP.PathExact",
        ),
    ] {
        let bad = http(
            "PUT",
            "/v1/connect/intentions/exact?source=web&destination=api",
            Some(body),
        )?;
        assert_eq!(
            bad.status,
            400,
            "{}: {}",
            String::from_utf8_lossy(body),
            bad.body
        );
        assert!(bad.body.contains(names), "{names}: {}", bad.body);
    }
    let no_method = http(
        "GET",
        "/v1/connect/intentions/check?source=web&destination=api&path=/x",
        None,
    )?;
    assert_eq!(no_method.status, 400, "{}", no_method.body);
    assert!(no_method.body.contains("method"), "{}", no_method.body);
    let missing = http("GET", "/v1/connect/intentions/exact?source=web", None)?;
    assert_eq!(missing.status, 400);
    assert!(missing.body.contains("destination"), "{}", missing.body);
    assert_eq!(
        http(
            "DELETE",
            "/v1/connect/intentions/exact?source=web&destination=api",
            None
        )?
        .json()?,
        true
    );
    assert_eq!(
        http(
            "GET",
            "/v1/connect/intentions/exact?source=web&destination=api",
            None
        )?
        .status,
        404
    );
    assert_eq!(http("POST", "/v1/connect/intentions", None)?.status, 405);

    // The CA's roots: certificates, never a key.
    let roots = http("GET", "/v1/connect/ca/roots", None)?;
    assert_eq!(roots.status, 200, "{}", roots.body);
    let roots = roots.json()?;
    assert!(
        roots["TrustDomain"].as_str().is_some_and(|t| !t.is_empty()),
        "{roots}"
    );
    let first = &roots["Roots"][0];
    assert_eq!(first["Active"], true, "{roots}");
    assert!(
        first["RootCert"]
            .as_str()
            .is_some_and(|c| c.contains("BEGIN CERTIFICATE")),
        "{roots}"
    );
    assert!(!roots.to_string().contains("PRIVATE KEY"), "{roots}");

    // Config entries.
    let entry = br#"{"Kind":"service-defaults","Name":"api","Protocol":"http"}"#;
    assert_eq!(http("PUT", "/v1/config", Some(entry))?.json()?, true);
    let got = http("GET", "/v1/config/service-defaults/api", None)?.json()?;
    assert_eq!(
        (got["Kind"].as_str(), got["Protocol"].as_str()),
        (Some("service-defaults"), Some("http")),
        "{got}"
    );
    assert!(got["ModifyIndex"].as_u64().is_some_and(|i| i > 0), "{got}");
    let all = http("GET", "/v1/config/service-defaults", None)?.json()?;
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    let bad = http(
        "PUT",
        "/v1/config",
        Some(br#"{"Kind":"service-defaults","Name":"api","Protocol":"carrier-pigeon"}"#),
    )?;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("carrier-pigeon"), "{}", bad.body);
    assert_eq!(http("GET", "/v1/config/no-such-kind", None)?.status, 400);
    assert_eq!(
        http("DELETE", "/v1/config/service-defaults/api", None)?.json()?,
        true
    );
    assert_eq!(
        http("GET", "/v1/config/service-defaults/api", None)?.status,
        404
    );
    Ok(())
}

/// Catalog and health in Consul's shapes, and the UI's summaries: an
/// instance counts at its worst check, its node's included.
#[test]
fn catalog_health_and_the_uis_summaries() -> anyhow::Result<()> {
    use proto::catalog_client::CatalogClient;
    // No agent heartbeats here: nodes stay as registered for the test.
    let cluster = Cluster::start(1, &["--node-timeout=5m"])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut admin = CatalogClient::new(cluster.channel(1).await?);
        for node in ["n1", "n2"] {
            admin
                .register_node(proto::RegisterNodeRequest {
                    node: Some(proto::Node {
                        name: node.into(),
                        address: format!("10.0.0.{}", &node[1..]),
                        datacenter: "dc1".into(),
                        ..Default::default()
                    }),
                })
                .await?;
        }
        for (id, node, port) in [
            ("api-1", "n1", 8080),
            ("api-2", "n2", 8080),
            ("db-1", "n1", 5432),
        ] {
            admin
                .register_service(proto::RegisterServiceRequest {
                    instance: Some(proto::ServiceInstance {
                        id: id.into(),
                        service: id.split('-').next().unwrap_or_default().into(),
                        node: node.into(),
                        address: format!("10.0.0.{}", &node[1..]),
                        port,
                        tags: vec!["v1".into()],
                        meta: [("zone".to_string(), format!("z{}", &node[1..]))].into(),
                        health: proto::Health::Passing as i32,
                        ..Default::default()
                    }),
                })
                .await?;
        }
        admin
            .update_health(proto::UpdateHealthRequest {
                node: "n2".into(),
                id: "api-2".into(),
                health: proto::Health::Critical as i32,
                output: "HTTP GET /healthz: 503".into(),
            })
            .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    let m = Some(cluster.token.as_str());
    let http = |path: &str| -> anyhow::Result<Value> {
        let reply = cluster.http(1, "GET", path, m, None)?;
        anyhow::ensure!(
            reply.status == 200,
            "{path}: {} {}",
            reply.status,
            reply.body
        );
        reply.json()
    };
    assert_eq!(
        http("/v1/catalog/services")?,
        serde_json::json!({"api": ["v1"], "db": ["v1"]})
    );
    let nodes = http("/v1/catalog/nodes")?;
    assert_eq!(nodes[0]["Node"], "n1", "{nodes}");
    let health = http("/v1/health/service/api")?;
    assert_eq!(health.as_array().map(Vec::len), Some(2), "{health}");
    let api2 = health
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["Service"]["ID"] == "api-2")
        .context("api-2")?;
    assert_eq!(api2["Node"]["Node"], "n2");
    let checks = api2["Checks"].as_array().context("Checks")?;
    assert_eq!(checks[0]["CheckID"], "serfHealth");
    assert_eq!(checks[1]["CheckID"], "service:api-2");
    assert_eq!(checks[1]["Status"], "critical");
    assert_eq!(checks[1]["Output"], "HTTP GET /healthz: 503");
    let passing = http("/v1/health/service/api?passing")?;
    assert_eq!(passing.as_array().map(Vec::len), Some(1), "{passing}");
    assert_eq!(passing[0]["Service"]["ID"], "api-1");

    // ?filter, in Consul's names for each endpoint.
    let zone2 = http("/v1/health/service/api?filter=Service.Meta.zone%20%3D%3D%20z2")?;
    assert_eq!(zone2.as_array().map(Vec::len), Some(1), "{zone2}");
    assert_eq!(zone2[0]["Service"]["ID"], "api-2");
    let zone1 = http("/v1/catalog/service/api?filter=ServiceMeta.zone%20%3D%3D%20z1%20and%20ServiceTags%20contains%20v1")?;
    assert_eq!(zone1.as_array().map(Vec::len), Some(1), "{zone1}");
    assert_eq!(zone1[0]["ServiceID"], "api-1");
    let bad = cluster.http(
        1,
        "GET",
        "/v1/health/service/api?filter=Node.Meta.rack%20%3D%3D%20r1",
        m,
        None,
    )?;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.body.contains("weft filters on these only"),
        "{}",
        bad.body
    );

    let listed = http("/v1/catalog/service/api")?;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(
        (
            &listed[0]["ServiceID"],
            &listed[0]["Node"],
            &listed[0]["Address"],
            &listed[0]["ServicePort"]
        ),
        (
            &Value::from("api-1"),
            &Value::from("n1"),
            &Value::from("10.0.0.1"),
            &Value::from(8080)
        ),
        "{listed}"
    );
    let n1 = http("/v1/catalog/node/n1")?;
    assert_eq!(n1["Node"]["Address"], "10.0.0.1", "{n1}");
    let ids: Vec<_> = n1["Services"]
        .as_object()
        .context("Services")?
        .keys()
        .cloned()
        .collect();
    assert_eq!(ids, ["api-1", "db-1"], "{n1}");
    assert_eq!(
        http("/v1/catalog/node/n9")?,
        Value::Null,
        "an unknown node is null, as in Consul"
    );
    let checks = http("/v1/health/checks/api")?;
    assert_eq!(checks.as_array().map(Vec::len), Some(2), "{checks}");
    let on_n2 = http("/v1/health/node/n2")?;
    let on_n2: Vec<_> = on_n2
        .as_array()
        .context("checks")?
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(on_n2, ["serfHealth", "service:api-2"]);
    let critical = http("/v1/health/state/critical")?;
    assert_eq!(critical.as_array().map(Vec::len), Some(1), "{critical}");
    assert_eq!(critical[0]["ServiceID"], "api-2", "{critical}");
    assert_eq!(
        http("/v1/health/state/any")?.as_array().map(Vec::len),
        Some(5),
        "2 nodes, 3 instances"
    );
    let bad = cluster.http(1, "GET", "/v1/health/state/sad", m, None)?;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let services = http("/v1/internal/ui/services")?;
    let api = &services[0];
    assert_eq!(api["Name"], "api", "{services}");
    assert_eq!(
        (
            &api["InstanceCount"],
            &api["ChecksPassing"],
            &api["ChecksCritical"]
        ),
        (&Value::from(2), &Value::from(1), &Value::from(1)),
        "{services}"
    );
    let ui_nodes = http("/v1/internal/ui/nodes")?;
    assert_eq!(
        ui_nodes[0]["Services"],
        serde_json::json!(["api", "db"]),
        "{ui_nodes}"
    );

    // A token reading db only sees db, in every view.
    let db = cluster.token_with_rules(
        "db-reader",
        r#"service "db" { policy = "read" } node_prefix "" { policy = "read" }"#,
    )?;
    let as_db = |path: &str| cluster.http(1, "GET", path, Some(&db), None);
    assert_eq!(
        as_db("/v1/catalog/services")?.json()?,
        serde_json::json!({"db": ["v1"]})
    );
    let rows = as_db("/v1/internal/ui/services")?.json()?;
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    // The Datacenters page: this one alone, with what the token reads.
    let dcs = as_db("/v1/internal/ui/datacenters")?.json()?;
    assert_eq!(dcs.as_array().map(Vec::len), Some(1), "{dcs}");
    assert_eq!(
        (&dcs[0]["Local"], &dcs[0]["Primary"]),
        (&Value::from(true), &Value::from(true)),
        "{dcs}"
    );
    let names: Vec<&str> = dcs[0]["Services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["Name"].as_str())
        .collect();
    assert_eq!(names, ["db"], "{dcs}");
    assert_eq!(as_db("/v1/health/service/api")?.status, 403);
    let topo = as_db("/v1/internal/ui/topology")?.json()?;
    assert_eq!(topo["Services"].as_array().map(Vec::len), Some(1), "{topo}");
    // An intention naming db, and a token that reads services but not
    // their intentions: the neighbours view shows no intention of db.
    let put = cluster.http(
        1,
        "PUT",
        "/v1/connect/intentions/exact?source=api&destination=db",
        m,
        Some(br#"{"Action":"deny"}"#),
    )?;
    assert_eq!(put.status, 200, "{}", put.body);
    let neighbours = cluster
        .http(1, "GET", "/v1/internal/ui/service-topology/db", m, None)?
        .json()?;
    assert_eq!(
        neighbours["Downstreams"][0]["Source"], "api",
        "{neighbours}"
    );
    assert_eq!(
        neighbours["Downstreams"][0]["Allowed"], false,
        "{neighbours}"
    );
    let blind = cluster.token_with_rules(
        "blind",
        r#"service_prefix "" { policy = "read" intentions = "deny" } node_prefix "" { policy = "read" }"#,
    )?;
    let seen = cluster
        .http(
            1,
            "GET",
            "/v1/internal/ui/service-topology/db",
            Some(&blind),
            None,
        )?
        .json()?;
    assert_eq!(seen["Downstreams"], serde_json::json!([]), "{seen}");
    assert_eq!(
        cluster
            .http(1, "GET", "/v1/connect/intentions", Some(&blind), None)?
            .status,
        403
    );
    let bad = cluster.http(1, "GET", "/v1/health/service/no%20such", m, None)?;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let bad = cluster.http(1, "GET", "/v1/internal/ui/topology?window=0", m, None)?;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let unknown = cluster.http(1, "GET", "/v1/catalog/services?filter=x", m, None)?;
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    assert!(unknown.body.contains("filter"), "{}", unknown.body);
    Ok(())
}

/// The body-pinning attack: a write whose body never comes, from someone
/// without a token. The server answers 403 from the headers at once
/// instead of waiting for (and holding) the body.
#[test]
fn a_body_is_not_awaited_from_a_caller_without_a_token() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let cluster = Cluster::start(1, &[])?;
    let port = cluster.servers[0]
        .http_addr
        .rsplit(':')
        .next()
        .context("port")?;
    let mut client = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["-servername", "server.dc1.weft", "-CAfile"])
        .arg(&cluster.ca_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = client.stdin.take().context("stdin")?;
    // 2 MiB announced, none sent; stdin stays open so the body never ends.
    stdin.write_all(
        b"PUT /v1/kv/pinned HTTP/1.1\r\nHost: weft\r\nContent-Length: 2000000\r\n\r\n",
    )?;
    stdin.flush()?;
    let stdout = client.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let status = rx.recv_timeout(std::time::Duration::from_secs(5));
    let _ = client.kill();
    let _ = client.wait();
    drop(stdin);
    let status = status.context("no answer within 5 s: the server waited for the body")?;
    assert!(status.starts_with("HTTP/1.1 403"), "{status:?}");
    Ok(())
}

/// Consul's blocking queries: `?index=` with the last `X-Consul-Index`
/// waits for a write (or the `?wait=`); `?stale`, `?consistent` and `?dc`
/// (this cluster's only) are understood; what cannot be is refused.
#[test]
fn blocking_queries_wait_for_a_write() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let cluster = std::sync::Arc::new(Cluster::start(1, &[])?);
    let m = cluster.token.clone();
    let put = cluster.http(1, "PUT", "/v1/kv/app/a", Some(&m), Some(b"one"))?;
    assert_eq!(put.status, 200, "{}", put.body);
    let got = cluster.http(1, "GET", "/v1/kv/app/a", Some(&m), None)?;
    let index: u64 = got.header("x-consul-index").context("index")?.parse()?;

    // Nothing written: it answers when the wait is over, with the same
    // index. (A write of the cluster's own in between wakes it early with a
    // later index, which is right too: then it is asked again.)
    let mut index = index;
    let mut waited_out = None;
    for _ in 0..20 {
        let started = Instant::now();
        let same = cluster.http(
            1,
            "GET",
            &format!("/v1/kv/app/a?index={index}&wait=1s"),
            Some(&m),
            None,
        )?;
        let waited = started.elapsed();
        assert_eq!(same.status, 200, "{}", same.body);
        let now: u64 = same.header("x-consul-index").context("index")?.parse()?;
        if now == index {
            waited_out = Some(waited);
            break;
        }
        assert!(now > index, "the index went back: {now} after {index}");
        index = now;
    }
    let waited = waited_out.context("every wait was cut short by a write")?;
    assert!(
        waited >= Duration::from_millis(950),
        "answered after {waited:?} with the same index, before the wait"
    );

    // A write wakes it with the new value, long before its wait.
    let blocked = {
        let (cluster, m) = (cluster.clone(), m.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let reply = cluster.http(
                1,
                "GET",
                &format!("/v1/kv/app/a?index={index}&wait=60s"),
                Some(&m),
                None,
            );
            (reply, started.elapsed())
        })
    };
    let put = cluster.http(1, "PUT", "/v1/kv/app/a", Some(&m), Some(b"two"))?;
    assert_eq!(put.status, 200, "{}", put.body);
    let (reply, took) = blocked
        .join()
        .map_err(|_| anyhow::anyhow!("blocked thread"))?;
    let reply = reply?;
    assert!(took < Duration::from_secs(30), "woke after {took:?}");
    assert_eq!(
        reply.json()?[0]["Value"],
        "dHdv",
        "base64 of two: {}",
        reply.body
    );
    let later: u64 = reply.header("x-consul-index").context("index")?.parse()?;
    assert!(later > index, "{later} after {index}");

    for ok in [
        "/v1/kv/app/a?stale",
        "/v1/kv/app/a?consistent",
        "/v1/kv/app/a?dc=dc1",
        "/v1/kv/app/a?index=0",
        "/v1/kv/app/a?index=",
        "/v1/kv/app/a?index=1&wait=11m",
    ] {
        let reply = cluster.http(1, "GET", ok, Some(&m), None)?;
        assert_eq!(reply.status, 200, "{ok}: {}", reply.body);
    }
    for (bad, names) in [
        ("/v1/kv/app/a?dc=dc2", "dc2"),
        ("/v1/kv/app/a?index=1&wait=soon", "wait"),
        ("/v1/kv/app/a?index=x", "index"),
        ("/v1/kv/app/a?stale&consistent", "stale and consistent"),
        ("/v1/kv/app/a?stale=no", "stale"),
    ] {
        let reply = cluster.http(1, "GET", bad, Some(&m), None)?;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
        assert!(reply.body.contains(names), "{bad}: {}", reply.body);
    }
    // A read that finds nothing carries the index too, so that a client
    // waiting for a key to appear blocks instead of spinning.
    let missing = cluster.http(1, "GET", "/v1/kv/not/yet", Some(&m), None)?;
    assert_eq!(missing.status, 404);
    let at: u64 = missing
        .header("x-consul-index")
        .context("a 404's index")?
        .parse()?;
    assert!(at >= later, "{at} before {later}");

    // No token, no waiting: refused at once.
    let started = Instant::now();
    let anonymous = cluster.http(
        1,
        "GET",
        &format!("/v1/kv/app/a?index={later}&wait=60s"),
        None,
        None,
    )?;
    assert_eq!(anonymous.status, 403);
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

#[test]
fn sessions_and_locks_in_consuls_shapes() -> anyhow::Result<()> {
    use proto::catalog_client::CatalogClient;
    use std::time::{Duration, Instant};
    // No agent heartbeats here: nodes stay as registered for the test.
    let cluster = Cluster::start(1, &["--node-timeout=5m"])?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut admin = rt.block_on(async {
        Ok::<_, anyhow::Error>(CatalogClient::new(cluster.channel(1).await?))
    })?;
    for node in ["n1", "n2"] {
        rt.block_on(admin.register_node(proto::RegisterNodeRequest {
            node: Some(proto::Node {
                name: node.into(),
                address: format!("10.0.0.{}", &node[1..]),
                datacenter: "dc1".into(),
                ..Default::default()
            }),
        }))?;
    }
    let m = Some(cluster.token.as_str());
    let call = |method: &str, path: &str, body: Option<&[u8]>| -> anyhow::Result<(u16, Value)> {
        let reply = cluster.http(1, method, path, m, body)?;
        let json = if reply.body.is_empty() {
            Value::Null
        } else {
            reply.json().unwrap_or(Value::String(reply.body.clone()))
        };
        Ok((reply.status, json))
    };
    let create = |body: &str| -> anyhow::Result<String> {
        let (status, reply) = call("PUT", "/v1/session/create", Some(body.as_bytes()))?;
        anyhow::ensure!(status == 200, "create {body}: {status} {reply}");
        Ok(reply["ID"].as_str().context("an ID")?.to_string())
    };

    // A TTL session, left to expire while the rest runs.
    let ttl = create(r#"{"Name":"ttl","Node":"n2","TTL":"10s","LockDelay":"0s"}"#)?;
    let ttl_created = Instant::now();
    assert_eq!(
        call(
            "PUT",
            &format!("/v1/kv/locks/ttl?acquire={ttl}"),
            Some(b"t")
        )?
        .1,
        true
    );

    // Keys as py-consul sends them (lower-case); a short lock delay.
    let a = create(r#"{"name":"a","node":"n1","lockdelay":"1s"}"#)?;
    let b = create(r#"{"Name":"b","Node":"n1","Behavior":"delete","Checks":[]}"#)?;
    let (status, info) = call("GET", &format!("/v1/session/info/{a}"), None)?;
    assert_eq!(status, 200);
    assert_eq!(info[0]["Name"], "a");
    assert_eq!(info[0]["Node"], "n1");
    assert_eq!(info[0]["LockDelay"], 1_000_000_000u64);
    assert_eq!(info[0]["Behavior"], "release");
    assert_eq!(info[0]["Checks"], serde_json::json!(["serfHealth"]));

    // One holder at a time; the holder re-acquires; others cannot release.
    let kv = |key: &str| -> anyhow::Result<Value> {
        Ok(call("GET", &format!("/v1/kv/{key}"), None)?.1[0].clone())
    };
    assert_eq!(
        call(
            "PUT",
            &format!("/v1/kv/locks/leader?acquire={a}"),
            Some(b"a")
        )?
        .1,
        true
    );
    assert_eq!(
        call(
            "PUT",
            &format!("/v1/kv/locks/leader?acquire={b}"),
            Some(b"b")
        )?
        .1,
        false
    );
    assert_eq!(
        call("PUT", &format!("/v1/kv/locks/leader?release={b}"), None)?.1,
        false
    );
    assert_eq!(
        call(
            "PUT",
            &format!("/v1/kv/locks/leader?acquire={a}"),
            Some(b"a2")
        )?
        .1,
        true
    );
    let held = kv("locks/leader")?;
    assert_eq!(
        (
            held["Session"].as_str(),
            held["LockIndex"].as_u64(),
            held["Value"].as_str()
        ),
        (Some(a.as_str()), Some(1), Some("YTI="))
    );
    // An unknown session, or a malformed one, takes nothing.
    let (status, reply) = call(
        "PUT",
        "/v1/kv/locks/x?acquire=00000000-0000-4000-8000-000000000000",
        None,
    )?;
    assert!(
        status == 409 && reply.to_string().contains("not found"),
        "{status} {reply}"
    );
    assert_eq!(call("PUT", "/v1/kv/locks/x?acquire=", None)?.0, 400);
    assert_eq!(call("GET", "/v1/kv/locks/x", None)?.0, 404);

    // Destroying a releases its lock, and for its 1 s lock delay no one
    // takes the key; then b does.
    assert_eq!(
        call("PUT", &format!("/v1/kv/locks/eph?acquire={b}"), Some(b"e"))?.1,
        true
    );
    assert_eq!(
        call("PUT", &format!("/v1/session/destroy/{a}"), None)?.1,
        true
    );
    let destroyed = Instant::now();
    assert_eq!(kv("locks/leader")?["Session"], "");
    assert_eq!(
        call("GET", &format!("/v1/session/info/{a}"), None)?.1,
        serde_json::json!([])
    );
    assert_eq!(call("PUT", &format!("/v1/session/renew/{a}"), None)?.0, 404);
    let mut refused_in_delay = 0;
    loop {
        let got = call(
            "PUT",
            &format!("/v1/kv/locks/leader?acquire={b}"),
            Some(b"b"),
        )?
        .1;
        if got == true {
            break;
        }
        refused_in_delay += 1;
        anyhow::ensure!(
            destroyed.elapsed() < Duration::from_secs(10),
            "never acquired after the lock delay"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        refused_in_delay > 0,
        "acquired at once, inside the lock delay"
    );
    assert!(
        destroyed.elapsed() >= Duration::from_millis(900),
        "acquired after {:?}",
        destroyed.elapsed()
    );
    assert_eq!(kv("locks/leader")?["LockIndex"], 2);
    // b's behavior is delete: destroying it deletes its keys.
    assert_eq!(
        call("PUT", &format!("/v1/session/destroy/{b}"), None)?.1,
        true
    );
    assert_eq!(call("GET", "/v1/kv/locks/eph", None)?.0, 404);
    assert_eq!(call("GET", "/v1/kv/locks/leader", None)?.0, 404);

    // A node turning critical takes its checked sessions.
    let c = create(r#"{"Name":"c","Node":"n1"}"#)?;
    assert_eq!(
        call("PUT", &format!("/v1/kv/locks/c?acquire={c}"), Some(b"c"))?.1,
        true
    );
    rt.block_on(admin.set_node_maintenance(proto::NodeMaintenanceRequest {
        node: "n1".into(),
        enable: true,
        reason: "test".into(),
    }))?;
    assert_eq!(
        call("GET", &format!("/v1/session/info/{c}"), None)?.1,
        serde_json::json!([])
    );
    assert_eq!(kv("locks/c")?["Session"], "");
    let (status, reply) = call("PUT", "/v1/session/create", Some(br#"{"Node":"n1"}"#))?;
    assert!(
        status == 409 && reply.to_string().contains("critical"),
        "{status} {reply}"
    );

    // Flags are kept.
    assert_eq!(call("PUT", "/v1/kv/flagged?flags=42", Some(b"f"))?.1, true);
    assert_eq!(kv("flagged")?["Flags"], 42);

    // Bad requests say what is wrong.
    for (body, says) in [
        (r#"{"Name":"x"}"#, "Node"),
        (r#"{"Node":"n2","TTL":"5s"}"#, "TTL"),
        (r#"{"Node":"n2","Behavior":"keep"}"#, "Behavior"),
        (
            r#"{"Node":"n2","ServiceChecks":[{"ID":"x"}]}"#,
            "not supported by weft yet",
        ),
        (r#"{"Node":"n2","Nmae":"x"}"#, "Nmae"),
        (r#"{"Node":"nowhere"}"#, "not registered"),
    ] {
        let (status, reply) = call("PUT", "/v1/session/create", Some(body.as_bytes()))?;
        assert!(
            (status == 400 || status == 409) && reply.to_string().contains(says),
            "{body}: {status} {reply}"
        );
    }
    assert_eq!(call("PUT", "/v1/session/destroy/not-a-uuid", None)?.0, 400);
    assert_eq!(call("GET", "/v1/session/create", None)?.0, 405);

    // Who may: session rules on the node.
    let weak = cluster.token_with_rules("kv-only", r#"key_prefix "" { policy = "write" }"#)?;
    let n2_only = cluster.token_with_rules(
        "n2",
        r#"session "n2" { policy = "write" } key_prefix "" { policy = "write" }"#,
    )?;
    let reply = cluster.http(
        1,
        "PUT",
        "/v1/session/create",
        Some(&weak),
        Some(br#"{"Node":"n2"}"#),
    )?;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let reply = cluster.http(
        1,
        "PUT",
        "/v1/session/create",
        Some(&n2_only),
        Some(br#"{"Node":"n1","Checks":[]}"#),
    )?;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let reply = cluster.http(
        1,
        "PUT",
        "/v1/session/create",
        Some(&n2_only),
        Some(br#"{"Node":"n2"}"#),
    )?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let list = cluster
        .http(1, "GET", "/v1/session/list", Some(&n2_only), None)?
        .json()?;
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().all(|s| s["Node"] == "n2") && l.len() == 2),
        "{list}"
    );
    assert_eq!(
        cluster
            .http(1, "GET", "/v1/session/node/n1", Some(&n2_only), None)?
            .status,
        403
    );
    let reply = cluster.http(
        1,
        "PUT",
        &format!("/v1/session/destroy/{ttl}"),
        Some(&weak),
        None,
    )?;
    assert_eq!(reply.status, 403, "{}", reply.body);

    // The TTL session, never renewed, is invalidated between one and two
    // TTLs (plus the reaper's second) after its creation, and its lock goes.
    loop {
        let (_, info) = call("GET", &format!("/v1/session/info/{ttl}"), None)?;
        if info == serde_json::json!([]) {
            break;
        }
        anyhow::ensure!(
            ttl_created.elapsed() < Duration::from_secs(30),
            "the TTL session lives on: {info}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let lived = ttl_created.elapsed();
    assert!(
        lived >= Duration::from_secs(10),
        "expired after {lived:?}, before its TTL"
    );
    assert_eq!(kv("locks/ttl")?["Session"], "");
    Ok(())
}

#[test]
fn snapshots_over_http_for_a_management_token_only() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let m = Some(cluster.token.as_str());
    let put = cluster.http(1, "PUT", "/v1/kv/app/kept", m, Some(b"before"))?;
    assert_eq!(put.status, 200, "{}", put.body);
    let saved = cluster.http(1, "GET", "/v1/snapshot", m, None)?;
    assert_eq!(saved.status, 200, "{}", saved.body);
    assert!(saved.header("x-consul-index").is_some());
    assert_eq!(
        saved.header("content-type"),
        Some("application/octet-stream")
    );
    assert!(
        !saved.body.contains("BEGIN PRIVATE KEY"),
        "a CA key in the snapshot"
    );
    // Changed after the snapshot, then restored to it.
    cluster.http(1, "PUT", "/v1/kv/app/kept", m, Some(b"after"))?;
    cluster.http(1, "PUT", "/v1/kv/app/new", m, Some(b"x"))?;
    let restored = cluster.http(1, "PUT", "/v1/snapshot", m, Some(saved.body.as_bytes()))?;
    assert_eq!(restored.status, 200, "{}", restored.body);
    let kept = cluster.http(1, "GET", "/v1/kv/app/kept?raw", m, None)?;
    assert_eq!(kept.body, "before");
    assert_eq!(
        cluster.http(1, "GET", "/v1/kv/app/new", m, None)?.status,
        404
    );
    // Not a snapshot: refused whole, nothing changed.
    let bad = cluster.http(1, "PUT", "/v1/snapshot", m, Some(b"{\"nodes\": 3}"))?;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("snapshot"), "{}", bad.body);
    assert_eq!(
        cluster.http(1, "GET", "/v1/kv/app/kept?raw", m, None)?.body,
        "before"
    );
    // Anyone else, even with every other right, is refused (the server
    // checks the token before it reads the body).
    let everything = cluster.token_with_rules(
        "almost-all",
        r#"key_prefix "" { policy = "write" } operator = "write" acl = "write""#,
    )?;
    let big = vec![b'{'; 4 << 20];
    let refused = cluster.http(1, "PUT", "/v1/snapshot", Some(&everything), Some(&big))?;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(
        cluster
            .http(1, "GET", "/v1/snapshot", Some(&everything), None)?
            .status,
        403
    );
    assert_eq!(
        cluster.http(1, "POST", "/v1/snapshot", m, None)?.status,
        405
    );
    Ok(())
}

#[test]
fn service_intentions_entries_are_the_intentions_of_their_destination() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let m = Some(cluster.token.as_str());
    let call = |method: &str, path: &str, body: Option<&str>| -> anyhow::Result<(u16, Value)> {
        let reply = cluster.http(1, method, path, m, body.map(str::as_bytes))?;
        let json = reply.json().unwrap_or(Value::String(reply.body.clone()));
        Ok((reply.status, json))
    };
    let pairs = || -> anyhow::Result<Vec<(String, String, String)>> {
        let (_, list) = call("GET", "/v1/connect/intentions", None)?;
        let mut out: Vec<(String, String, String)> = list
            .as_array()
            .context("a list")?
            .iter()
            .map(|i| {
                let s = |k: &str| i[k].as_str().unwrap_or_default().to_string();
                (s("SourceName"), s("DestinationName"), s("Action"))
            })
            .collect();
        out.sort();
        Ok(out)
    };
    let t = |s: &str, d: &str, a: &str| (s.to_string(), d.to_string(), a.to_string());
    // Consul's example, keys as some write them.
    let entry = r#"{"kind": "service-intentions", "name": "db", "sources": [
        {"name": "web", "action": "allow", "description": "the front end"},
        {"name": "*", "action": "deny"}]}"#;
    assert_eq!(
        call("PUT", "/v1/config", Some(entry))?,
        (200, Value::Bool(true))
    );
    assert_eq!(pairs()?, [t("*", "db", "deny"), t("web", "db", "allow")]);
    let (_, allowed) = call(
        "GET",
        "/v1/connect/intentions/check?source=web&destination=db",
        None,
    )?;
    assert_eq!(allowed["Allowed"], true);
    let (_, denied) = call(
        "GET",
        "/v1/connect/intentions/check?source=api&destination=db",
        None,
    )?;
    assert_eq!(denied["Allowed"], false);
    // An intention written alone joins the entry.
    let (status, _) = call(
        "PUT",
        "/v1/connect/intentions/exact?source=batch&destination=db",
        Some(r#"{"Action":"allow"}"#),
    )?;
    assert_eq!(status, 200);
    let (status, read) = call("GET", "/v1/config/service-intentions/db", None)?;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["Kind"], "service-intentions");
    let sources: Vec<(&str, u64)> = read["Sources"]
        .as_array()
        .context("sources")?
        .iter()
        .map(|s| {
            (
                s["Name"].as_str().unwrap_or_default(),
                s["Precedence"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(sources, [("batch", 9), ("web", 9), ("*", 8)], "{read}");
    assert_eq!(read["Sources"][1]["Description"], "the front end");
    assert!(read["ModifyIndex"].as_u64() >= read["CreateIndex"].as_u64());
    let (_, listed) = call("GET", "/v1/config/service-intentions", None)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    // Writing it again replaces every intention of db, in one step.
    let replaced = r#"{"Kind": "service-intentions", "Name": "db", "Sources": [{"Name": "api", "Action": "allow"}]}"#;
    assert_eq!(call("PUT", "/v1/config", Some(replaced))?.0, 200);
    assert_eq!(pairs()?, [t("api", "db", "allow")]);
    // Bad sources are refused whole, naming what is wrong.
    for (body, says) in [
        (
            r#"{"Kind":"service-intentions","Name":"db","Sources":[{"Name":"x","Action":"allow","Peer":"p"}]}"#,
            "not supported by weft yet",
        ),
        (
            r#"{"Kind":"service-intentions","Name":"db","Sources":[{"Name":"x"}]}"#,
            "Sources[0] (x)",
        ),
        (
            r#"{"Kind":"service-intentions","Name":"db","Sources":[{"Name":"x","Action":"allow"},{"Name":"x","Action":"deny"}]}"#,
            "named twice",
        ),
        (
            r#"{"Kind":"service-intentions","Name":"db","Sources":[{"Name":"x","Permissions":[{"Action":"deny","HTTP":{"PathPrefix":"/admin/.."}}]}]}"#,
            "Permissions[0].HTTP.PathPrefix",
        ),
    ] {
        let (status, reply) = call("PUT", "/v1/config", Some(body))?;
        assert!(
            status == 400 && reply.to_string().contains(says),
            "{body}: {status} {reply}"
        );
    }
    assert_eq!(pairs()?, [t("api", "db", "allow")]);
    // Who may: intentions write on the destination, not service write.
    let service_only =
        cluster.token_with_rules("db-service", r#"service "db" { policy = "write" }"#)?;
    let reply = cluster.http(
        1,
        "PUT",
        "/v1/config",
        Some(&service_only),
        Some(entry.as_bytes()),
    )?;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let reply = cluster.http(
        1,
        "DELETE",
        "/v1/config/service-intentions/db",
        Some(&service_only),
        None,
    )?;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_eq!(pairs()?, [t("api", "db", "allow")]);
    // Deleting it deletes them; a second delete finds nothing.
    assert_eq!(
        call("DELETE", "/v1/config/service-intentions/db", None)?.0,
        200
    );
    assert_eq!(pairs()?, []);
    assert_eq!(
        call("DELETE", "/v1/config/service-intentions/db", None)?.0,
        404
    );
    assert_eq!(
        call("GET", "/v1/config/service-intentions/db", None)?.0,
        404
    );
    Ok(())
}

/// proxy-defaults, as Consul guards it: writing it takes `mesh` write (a
/// service's write right is not enough, nor is any right on a service named
/// `global`); reading takes read on the mesh or on any service, so every
/// agent sees it; a token that can read nothing of either is refused. Its
/// `protocol` makes a service without its own HTTP, which the servers then
/// check routers against.
#[test]
fn proxy_defaults_need_mesh_rights_and_give_services_their_protocol() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let m = cluster.token.as_str();
    let put = |token: &str, body: &str| {
        cluster.http(1, "PUT", "/v1/config", Some(token), Some(body.as_bytes()))
    };
    let get = |token: &str| {
        cluster.http(
            1,
            "GET",
            "/v1/config/proxy-defaults/global",
            Some(token),
            None,
        )
    };
    let proxy = r#"{"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}}"#;
    let router = r#"{"Kind": "service-router", "Name": "api",
        "Routes": [{"Match": {"HTTP": {"PathPrefix": "/v2"}}}]}"#;
    // No proxy-defaults yet: api is tcp, so a router is refused.
    let refused = put(m, router)?;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(refused.body.contains("to speak http"), "{}", refused.body);

    let services =
        cluster.token_with_rules("all-services", r#"service_prefix "" { policy = "write" }"#)?;
    let global =
        cluster.token_with_rules("global-svc", r#"service "global" { policy = "write" }"#)?;
    for token in [&services, &global] {
        let reply = put(token, proxy)?;
        assert_eq!(reply.status, 403, "{}", reply.body);
    }
    let mesh = cluster.token_with_rules("mesh-admin", r#"mesh = "write""#)?;
    let reply = put(&mesh, proxy)?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // The service-writer reads it (as an agent does), the KV-only token not.
    let read = get(&services)?;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.json()?["Config"]["protocol"], "http");
    let kv = cluster.token_with_rules("kv-only-pd", r#"key_prefix "" { policy = "read" }"#)?;
    assert_eq!(get(&kv)?.status, 403);
    let listed = cluster.http(1, "GET", "/v1/config/proxy-defaults", Some(&services), None)?;
    assert_eq!(
        listed.json()?.as_array().map(Vec::len),
        Some(1),
        "{}",
        listed.body
    );

    // Now api speaks HTTP by the mesh's default: its router is taken.
    let taken = put(m, router)?;
    assert_eq!(taken.status, 200, "{}", taken.body);
    // A route on a path no request can have is refused when written.
    let upward = r#"{"Kind": "service-router", "Name": "api",
        "Routes": [{"Match": {"HTTP": {"PathPrefix": "/v2/.."}}}]}"#;
    let refused = put(m, upward)?;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains("Routes[0].Match.HTTP.PathPrefix"),
        "{}",
        refused.body
    );
    // Deleting it takes mesh write too.
    let del = |token: &str| {
        cluster.http(
            1,
            "DELETE",
            "/v1/config/proxy-defaults/global",
            Some(token),
            None,
        )
    };
    assert_eq!(del(&services)?.status, 403);
    assert_eq!(del(&mesh)?.status, 200);
    assert_eq!(get(m)?.status, 404);
    Ok(())
}

/// `/v1/catalog/register` and `/deregister` for an external node: Consul's
/// rights (node write, and service write for its service), the node marked
/// external and never judged by heartbeats (a node an agent would run, kept
/// as a control, goes critical when silent; the external one does not),
/// and an agent-run node neither registered over nor removed.
#[test]
fn external_nodes_through_the_catalog_api() -> anyhow::Result<()> {
    use proto::catalog_client::CatalogClient;
    use std::time::Duration;
    use weft_tests::mesh::wait_until;
    let cluster = Cluster::start(1, &["--node-timeout=1s"])?;
    let m = cluster.token.as_str();
    let put = |token: &str, path: &str, body: &str| {
        cluster.http(1, "PUT", path, Some(token), Some(body.as_bytes()))
    };
    let body = r#"{"Node": "db-host", "Address": "10.9.0.5", "NodeMeta": {"rack": "r1"},
        "Service": {"ID": "pg-1", "Service": "postgres", "Port": 5432},
        "Checks": [{"Name": "alive", "ServiceID": "pg-1", "Status": "passing"},
                   {"Name": "lag", "ServiceID": "pg-1", "Status": "warning", "Output": "lag 2s"}]}"#;
    let node_only =
        cluster.token_with_rules("db-host-node", r#"node "db-host" { policy = "write" }"#)?;
    let reply = put(&node_only, "/v1/catalog/register", body)?;
    assert_eq!(reply.status, 403, "node write alone: {}", reply.body);
    let both = cluster.token_with_rules(
        "db-host-pg",
        r#"node "db-host" { policy = "write" }
service "postgres" { policy = "write" }"#,
    )?;
    let reply = put(&both, "/v1/catalog/register", body)?;
    assert_eq!(reply.status, 200, "{}", reply.body);

    // An agent's node, as an agent registers it (no external marker).
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut admin = CatalogClient::new(cluster.channel(1).await?);
        admin
            .register_node(proto::RegisterNodeRequest {
                node: Some(proto::Node {
                    name: "agent-node".into(),
                    address: "10.9.0.6".into(),
                    datacenter: "dc1".into(),
                    ..Default::default()
                }),
            })
            .await?;
        anyhow::Ok(())
    })?;
    let nodes = |m: &str| -> anyhow::Result<serde_json::Value> {
        cluster
            .http(1, "GET", "/v1/catalog/nodes", Some(m), None)?
            .json()
    };
    let health_of = |v: &serde_json::Value, name: &str| {
        v.as_array()
            .into_iter()
            .flatten()
            .find(|n| n["Node"] == name)
            .map(|n| n["Meta"].clone())
    };
    // The control goes critical for its silence; then the external node,
    // as silent, must still pass.
    wait_until(
        Duration::from_secs(15),
        "the silent agent node critical",
        || {
            let reply = cluster.http(1, "GET", "/v1/health/node/agent-node", Some(m), None)?;
            Ok(reply.body.contains("critical").then_some(()))
        },
    )?;
    let ext = cluster.http(1, "GET", "/v1/health/node/db-host", Some(m), None)?;
    assert!(!ext.body.contains("critical"), "{}", ext.body);
    let meta = health_of(&nodes(m)?, "db-host").expect("db-host listed");
    assert_eq!(meta["external-node"], "true");
    assert_eq!(meta["rack"], "r1");
    // Its instance, with the worst of its checks.
    let pg = cluster
        .http(1, "GET", "/v1/health/service/postgres", Some(m), None)?
        .json()?;
    assert_eq!(pg[0]["Service"]["ID"], "pg-1", "{pg}");
    let statuses: Vec<&str> = pg[0]["Checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["Status"].as_str())
        .collect();
    assert!(statuses.contains(&"warning"), "{pg}");

    // Another service's writer cannot take pg-1 over by its id.
    let other = cluster.token_with_rules(
        "db-host-other",
        r#"node "db-host" { policy = "write" }
service "other" { policy = "write" }"#,
    )?;
    let steal = r#"{"Node": "db-host", "Address": "10.9.0.5",
        "Service": {"ID": "pg-1", "Service": "other", "Port": 6000}}"#;
    let reply = put(&other, "/v1/catalog/register", steal)?;
    assert_eq!(reply.status, 403, "{}", reply.body);
    // Nor may an agent's registration carry the external mark.
    let marked = rt.block_on(async {
        let mut admin = CatalogClient::new(cluster.channel(1).await?);
        let mut meta = std::collections::HashMap::new();
        meta.insert("external-node".to_string(), "true".to_string());
        anyhow::Ok(
            admin
                .register_node(proto::RegisterNodeRequest {
                    node: Some(proto::Node {
                        name: "agent-node".into(),
                        address: "10.9.0.6".into(),
                        datacenter: "dc1".into(),
                        meta,
                        ..Default::default()
                    }),
                })
                .await,
        )
    })?;
    let status = marked.expect_err("an agent's node marked external");
    assert!(status.message().contains("external-node"), "{status:?}");

    // The agent's node is its agent's.
    let takeover = r#"{"Node": "agent-node", "Address": "10.6.6.6"}"#;
    let reply = put(m, "/v1/catalog/register", takeover)?;
    assert_eq!(reply.status, 409, "{}", reply.body);
    let reply = put(m, "/v1/catalog/deregister", r#"{"Node": "agent-node"}"#)?;
    assert_eq!(reply.status, 409, "{}", reply.body);
    // Refused by name, not ignored.
    let reply = put(
        m,
        "/v1/catalog/register",
        r#"{"Node": "x", "Address": "10.9.0.7", "TaggedAddresses": {"wan": "1.2.3.4"}}"#,
    )?;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("TaggedAddresses: not supported by weft yet"),
        "{}",
        reply.body
    );

    // Deregistering: one instance, then the node; node write is needed.
    let reply = put(
        &node_only,
        "/v1/catalog/deregister",
        r#"{"Node": "db-host", "ServiceID": "pg-1"}"#,
    )?;
    assert_eq!(
        reply.status, 403,
        "service write is needed too: {}",
        reply.body
    );
    let reply = put(
        &both,
        "/v1/catalog/deregister",
        r#"{"Node": "db-host", "ServiceID": "pg-1"}"#,
    )?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = put(
        &node_only,
        "/v1/catalog/deregister",
        r#"{"Node": "db-host"}"#,
    )?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(health_of(&nodes(m)?, "db-host").is_none());
    Ok(())
}
