//! The control plane refuses callers without credentials: every RPC of
//! `weft.v1`, read from the proto itself (so a new RPC without a check fails
//! here), called with no token, a bogus token and a token without the right;
//! the Raft port to anyone without a server certificate; plaintext on both
//! ports. Then what tokens do grant: a `service "web"` token writes web and
//! nothing else, a node identity acts for its node only, snapshots need a
//! management token and carry no CA key.
use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use weft_api::proto::{self, Empty};
use weft_tests::servers::Cluster;

const PROTO: &str = include_str!("../../api/proto/weft/v1/weft.proto");

/// The calls a token without any right of the kind asked may still make:
/// reading the calling token itself (`weft acl token self`), asking what it
/// may do (`Authorize`), and, for a
/// token that reads some keys, listing keys (filtered to what it reads), and
/// `weft top` (filtered to the pairs whose services it reads).
/// Everything else is refused to both weak tokens of the test.
const EXEMPT: &[(&str, &str)] = &[
    ("/weft.v1.Acl/TokenSelf", "key-reader"),
    ("/weft.v1.Acl/TokenSelf", "operator-reader"),
    // Any valid token may ask what it may do itself (an empty request asks
    // nothing and gets an empty answer).
    ("/weft.v1.Acl/Authorize", "key-reader"),
    ("/weft.v1.Acl/Authorize", "operator-reader"),
    ("/weft.v1.Kv/List", "key-reader"),
    ("/weft.v1.Operator/Members", "operator-reader"),
    ("/weft.v1.Operator/Datacenters", "operator-reader"),
    // Traffic between services, filtered to the pairs whose two services
    // the token reads: none for these tokens.
    ("/weft.v1.Telemetry/Top", "key-reader"),
    ("/weft.v1.Telemetry/Top", "operator-reader"),
];

/// Every `rpc` of every `service` in the proto, as gRPC paths.
fn rpcs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut service = None;
    for line in PROTO.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.split_whitespace().next().map(String::from);
        } else if let Some(rest) = line.strip_prefix("rpc ") {
            let method = rest.split('(').next().unwrap_or_default().trim();
            let service = service.clone().expect("rpc outside a service");
            out.push((service.clone(), format!("/weft.v1.{service}/{method}")));
        }
    }
    out
}

/// Calls `path` with an empty message (every request message decodes from
/// zero bytes) and returns the status code.
async fn call<T>(channel: T, path: &str) -> Code
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return Code::Unavailable;
    }
    let codec = tonic_prost::ProstCodec::<Empty, Empty>::default();
    let path = path.parse().expect("rpc path");
    let mut req = tonic::Request::new(Empty {});
    req.set_timeout(Duration::from_secs(10));
    match grpc.unary(req, path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[test]
fn every_rpc_refuses_missing_bogus_and_insufficient_tokens() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let key_reader =
        cluster.token_with_rules("key-reader", r#"key_prefix "nothing/" { policy = "read" }"#)?;
    let operator_reader = cluster.token_with_rules("operator-reader", r#"operator = "read""#)?;
    let all = rpcs();
    // Raft and Federation have ports of their own, for servers only.
    let api: Vec<_> = all
        .iter()
        .filter(|(s, _)| s != "Raft" && s != "Federation")
        .collect();
    let federation: Vec<_> = all.iter().filter(|(s, _)| s == "Federation").collect();
    assert!(
        federation.len() >= 2,
        "the proto parse found only {federation:?}"
    );
    assert!(api.len() >= 39, "the proto parse found only {api:?}");
    let services: BTreeSet<&str> = api.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from([
            "Acl",
            "Ca",
            "Catalog",
            "Config",
            "Intentions",
            "Kv",
            "Operator",
            "Session",
            "Telemetry",
            "Watch"
        ])
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut failures = Vec::new();
        for (_, path) in &api {
            for (who, token) in [
                ("no token", None),
                (
                    "a bogus token",
                    Some("00000000-0000-4000-8000-000000000000"),
                ),
                ("key-reader", Some(key_reader.as_str())),
                ("operator-reader", Some(operator_reader.as_str())),
            ] {
                let code = call(cluster.channel_as(1, token).await?, path).await;
                let refused = matches!(code, Code::Unauthenticated | Code::PermissionDenied);
                let exempt = EXEMPT.contains(&(path.as_str(), who));
                if refused == exempt {
                    failures.push(format!("{path} with {who}: {code:?}"));
                }
            }
        }
        assert!(failures.is_empty(), "not refused:\n{}", failures.join("\n"));
        // The API port does not serve what servers of other datacenters
        // ask for, not even to the management token.
        for (_, path) in &federation {
            let code = call(cluster.channel(1).await?, path).await;
            assert_eq!(code, Code::Unimplemented, "{path} on the API port");
        }
        // The same calls with the management token get past the check: the
        // test can tell a refusal from a working RPC.
        let code = call(cluster.channel(1).await?, "/weft.v1.Kv/List").await;
        assert_eq!(code, Code::Ok);
        Ok::<_, anyhow::Error>(())
    })
}

/// The Raft port: no client certificate, a client certificate from the same
/// CA without the server role, or plaintext get no answer to any Raft RPC;
/// a server certificate does (the control).
#[test]
fn the_raft_port_answers_only_servers() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let raft_addr = cluster.servers[0].raft_addr.clone();
    let raft_rpcs: Vec<String> = rpcs()
        .into_iter()
        .filter(|(s, _)| s == "Raft")
        .map(|(_, p)| p)
        .collect();
    assert!(raft_rpcs.iter().any(|p| p.ends_with("/AppendEntries")));
    let ca = &cluster.tls_ca;
    let client_cert = weft_api::tls_certs::create_client_cert(ca, "dc1", 1)?;
    let server_cert = weft_api::tls_certs::create_server_cert(ca, "dc1", &[], &[], 1)?;
    let tls = |identity: Option<&weft_api::tls_certs::CertPair>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca.cert_pem))
            .domain_name("server.dc1.weft");
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        tls
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let connect = |tls: Option<ClientTlsConfig>| {
            let addr = raft_addr.clone();
            async move {
                let scheme = if tls.is_some() { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
                    .connect_timeout(Duration::from_secs(2));
                if let Some(tls) = tls {
                    endpoint = endpoint.tls_config(tls)?;
                }
                Ok::<_, anyhow::Error>(endpoint.connect_lazy())
            }
        };
        for (who, tls) in [
            ("plaintext", None),
            ("TLS without a client certificate", Some(tls(None))),
            (
                "a client certificate without the server role",
                Some(tls(Some(&client_cert))),
            ),
        ] {
            for path in &raft_rpcs {
                let code = call(connect(tls.clone()).await?, path).await;
                // Reaching the service would answer Ok or, for the empty
                // payload, InvalidArgument: only transport failures pass.
                assert!(
                    matches!(
                        code,
                        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                    ),
                    "{path} over {who}: {code:?} (it must not reach the service)"
                );
            }
        }
        let code = call(
            connect(Some(tls(Some(&server_cert)))).await?,
            "/weft.v1.Raft/Status",
        )
        .await;
        assert_eq!(
            code,
            Code::Ok,
            "a server certificate reaches the Raft service"
        );
        // The API port speaks no plaintext either.
        let plain = Endpoint::from_shared(format!("http://{}", cluster.grpc_addr(1)))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        let code = call(plain, "/weft.v1.Kv/List").await;
        assert!(
            matches!(
                code,
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
            ),
            "plaintext on the API port: {code:?}"
        );
        Ok::<_, anyhow::Error>(())
    })?;
    assert!(
        cluster.cli(&["kv", "put", "still/alive", "1"]).is_ok(),
        "the cluster serves after the attempts"
    );
    Ok(())
}

fn cli_error(out: std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "expected a refusal, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_service_token_writes_its_service_and_nothing_else() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let web = cluster.token_with_rules(
        "web-writer",
        r#"service "web" {
  policy = "write"
  intentions = "write"
}
key_prefix "web/" { policy = "write" }"#,
    )?;
    let addr = cluster.addrs();
    let as_web = |args: &[&str]| cluster.cli_as(&addr, &web, args);

    // Its service and its keys.
    wait_ca(&cluster)?;
    let leaf = as_web(&["ca", "leaf", "web"]);
    assert!(
        leaf.status.success(),
        "{}",
        String::from_utf8_lossy(&leaf.stderr)
    );
    assert!(as_web(&["kv", "put", "web/x", "1"]).status.success());
    assert!(as_web(&["intention", "create", "api", "web", "--deny"])
        .status
        .success());

    // Nothing of api's.
    let e = cli_error(as_web(&["ca", "leaf", "api"]));
    assert!(
        e.contains("permission denied") && e.contains("service \"api\""),
        "{e}"
    );
    let e = cli_error(as_web(&["intention", "create", "web", "api", "--allow"]));
    assert!(e.contains("permission denied"), "{e}");
    let e = cli_error(as_web(&["intention", "create", "web", "*", "--allow"]));
    assert!(e.contains("permission denied"), "{e}");
    let e = cli_error(as_web(&["kv", "put", "api/x", "1"]));
    assert!(
        e.contains("permission denied") && e.contains("api/x"),
        "{e}"
    );
    let e = cli_error(as_web(&["ca", "rotate"]));
    assert!(e.contains("operator"), "{e}");
    let e = cli_error(as_web(&["acl", "token", "list"]));
    assert!(e.contains("acl"), "{e}");

    // Lists show only what the token may read.
    cluster.cli(&["kv", "put", "api/secret", "s"])?;
    let listed = as_web(&["--format", "json", "kv", "list", "web/"]);
    assert!(listed.status.success());
    let api_keys = as_web(&["--format", "json", "kv", "list", "api/"]);
    assert!(
        !String::from_utf8_lossy(&api_keys.stdout).contains("secret"),
        "api's keys leak: {}",
        String::from_utf8_lossy(&api_keys.stdout)
    );
    let intentions = cluster.cli_as(&addr, &web, &["--format", "json", "intention", "list"]);
    let text = String::from_utf8_lossy(&intentions.stdout);
    assert!(text.contains("\"Destination\": \"web\""), "{text}");

    // Every write names the accessor that made it; no secret is logged.
    let me: serde_json::Value =
        serde_json::from_slice(&as_web(&["--format", "json", "acl", "token", "self"]).stdout)?;
    let accessor = me["accessor_id"].as_str().context("accessor_id")?;
    let log = cluster.log(1);
    assert!(
        log.lines()
            .any(|l| l.contains(accessor) && l.contains("kv put web/x")),
        "the write of web/x names its accessor {accessor}:\n{log}"
    );
    assert!(!log.contains(&web), "a secret reached the log");
    assert!(
        !log.contains(&cluster.token),
        "the management secret reached the log"
    );
    Ok(())
}

fn wait_ca(cluster: &Cluster) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while cluster.cli(&["ca", "roots"]).is_err() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no CA within 15 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A node's token (its node identity) writes only its node: it registers
/// node-a and reports health of node-a's instances, and nothing of node-b;
/// it registers no service. An instance needs both `node:write` on its node
/// and `service:write` on its service (node-a's agent's token, with web's
/// identity, registers, reports and removes web on node-a). The attack: a
/// service's token alone (`service "web" write`, as a workload holds)
/// placed web's instances on any node at any address, where that node's
/// agent took the address over for its workloads (the metadata service's,
/// a database's) and tunnels reached it; and it reported or removed web's
/// instances on every node. All refused now, as is anything of api.
#[test]
fn node_and_service_tokens_write_only_their_own() -> anyhow::Result<()> {
    use proto::catalog_client::CatalogClient;
    let cluster = Cluster::start(1, &[])?;
    let node_a = cluster.token_with(&["--node-identity", "node-a:dc1"])?;
    let agent_a =
        cluster.token_with(&["--node-identity", "node-a:dc1", "--service-identity", "web"])?;
    let web = cluster.token_with_rules("web-only", r#"service "web" { policy = "write" }"#)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut admin = CatalogClient::new(cluster.channel(1).await?);
        let mut as_a = CatalogClient::new(cluster.channel_as(1, Some(&node_a)).await?);
        let mut as_web = CatalogClient::new(cluster.channel_as(1, Some(&web)).await?);
        let mut as_agent_a = CatalogClient::new(cluster.channel_as(1, Some(&agent_a)).await?);
        let node = |name: &str| proto::RegisterNodeRequest {
            node: Some(proto::Node {
                name: name.into(),
                address: "10.0.0.9".into(),
                datacenter: "dc1".into(),
                ..Default::default()
            }),
        };
        // Each service at a port of its own: an address:port is one service's.
        let port = |service: &str| match service {
            "api" => 8080,
            "db" => 8081,
            _ => 8082,
        };
        let instance = |node: &str, service: &str| proto::RegisterServiceRequest {
            instance: Some(proto::ServiceInstance {
                id: service.into(),
                service: service.into(),
                node: node.into(),
                address: "10.0.0.9".into(),
                port: port(service),
                ..Default::default()
            }),
        };
        let health = |node: &str, id: &str| proto::UpdateHealthRequest {
            node: node.into(),
            id: id.into(),
            health: proto::Health::Critical as i32,
            output: "forged".into(),
        };
        admin.register_node(node("node-b")).await?;
        admin.register_service(instance("node-b", "api")).await?;

        // The node's token: its node, its instances' health.
        as_a.register_node(node("node-a")).await?;
        admin.register_service(instance("node-a", "db")).await?;
        as_a.update_health(health("node-a", "db")).await?;
        // The agent's token: its node's instances of its services.
        as_agent_a
            .register_service(instance("node-a", "web"))
            .await?;
        as_agent_a.update_health(health("node-a", "web")).await?;
        let mut at_metadata = instance("node-b", "web");
        if let Some(i) = at_metadata.instance.as_mut() {
            i.id = "web-meta".into();
            i.address = "169.254.169.254".into();
            i.port = 80;
        }

        for (what, status) in [
            (
                "node-a registers node-b",
                as_a.register_node(node("node-b")).await.err(),
            ),
            (
                "node-a registers a service",
                as_a.register_service(instance("node-a", "web")).await.err(),
            ),
            (
                "node-a reports node-b's api",
                as_a.update_health(health("node-b", "api")).await.err(),
            ),
            (
                "node-a deregisters node-b",
                as_a.deregister_node(proto::DeregisterNodeRequest {
                    name: "node-b".into(),
                })
                .await
                .err(),
            ),
            (
                "web registers api",
                as_web
                    .register_service(instance("node-b", "api"))
                    .await
                    .err(),
            ),
            (
                "web's token places web on node-b at the metadata address",
                as_web.register_service(at_metadata).await.err(),
            ),
            (
                "web's token places web on node-a",
                as_web
                    .register_service(instance("node-a", "web"))
                    .await
                    .err(),
            ),
            (
                "web's token reports node-a's web",
                as_web.update_health(health("node-a", "web")).await.err(),
            ),
            (
                "web's token removes node-a's web",
                as_web
                    .deregister_service(proto::DeregisterServiceRequest {
                        node: "node-a".into(),
                        id: "web".into(),
                    })
                    .await
                    .err(),
            ),
            (
                "web reports node-b's api",
                as_web.update_health(health("node-b", "api")).await.err(),
            ),
            (
                "web deregisters node-b's api",
                as_web
                    .deregister_service(proto::DeregisterServiceRequest {
                        node: "node-b".into(),
                        id: "api".into(),
                    })
                    .await
                    .err(),
            ),
            (
                "web registers a node",
                as_web.register_node(node("node-c")).await.err(),
            ),
        ] {
            let status = status.with_context(|| format!("{what} was allowed"))?;
            assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        }
        let api = admin
            .get_service(proto::GetServiceRequest {
                name: "api".into(),
                read: None,
            })
            .await?
            .into_inner();
        assert_eq!(api.instances.len(), 1);
        assert_ne!(api.instances[0].check_output, "forged");
        as_agent_a
            .deregister_service(proto::DeregisterServiceRequest {
                node: "node-a".into(),
                id: "web".into(),
            })
            .await?;
        Ok::<_, anyhow::Error>(())
    })
}

#[test]
fn snapshots_need_a_management_token_and_carry_no_ca_key() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    wait_ca(&cluster)?;
    let operator = cluster.token_with_rules(
        "operator",
        r#"operator = "write"
acl = "read""#,
    )?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("state.json");
    let path = file.display().to_string();
    let e = cli_error(cluster.cli_as(&cluster.addrs(), &operator, &["snapshot", "save", &path]));
    assert!(e.contains("management"), "{e}");
    let e = cli_error(cluster.cli_as(&cluster.addrs(), "", &["snapshot", "save", &path]));
    assert!(e.contains("unauthenticated"), "{e}");
    assert!(!file.exists());

    cluster.cli(&["snapshot", "save", &path])?;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "snapshot file mode");
    let text = std::fs::read_to_string(&file)?;
    assert!(!text.contains("PRIVATE KEY"), "a CA key left the servers");
    assert!(
        !text.contains(&cluster.token),
        "a token secret is in the snapshot"
    );

    let e = cli_error(cluster.cli_as(&cluster.addrs(), &operator, &["snapshot", "restore", &path]));
    assert!(e.contains("management"), "{e}");
    // A restore keeps the cluster's CA: leaves still verify with the roots.
    let roots_before = cluster.cli(&["ca", "roots"])?;
    cluster.cli(&["snapshot", "restore", &path])?;
    assert_eq!(cluster.cli(&["ca", "roots"])?, roots_before);
    assert!(cluster.cli(&["ca", "leaf", "web"]).is_ok());
    Ok(())
}

#[test]
fn bootstrap_works_once_and_secrets_are_shown_once() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let e = cli_error(cluster.cli_as(&cluster.addrs(), "", &["acl", "bootstrap"]));
    assert!(e.contains("no longer allowed"), "{e}");
    let v: serde_json::Value =
        serde_json::from_str(&cluster.cli(&["--format", "json", "acl", "token", "list"])?)?;
    let tokens = v.as_array().context("a list")?;
    assert!(!tokens.is_empty());
    for t in tokens {
        assert!(
            t.get("secret_id").is_none(),
            "a listed token shows its secret: {t}"
        );
    }
    let me: serde_json::Value =
        serde_json::from_str(&cluster.cli(&["--format", "json", "acl", "token", "self"])?)?;
    assert!(me.get("secret_id").is_none());
    assert!(
        me["policies"].to_string().contains("global-management"),
        "{me}"
    );
    Ok(())
}

/// Found by attacking the first version: a config entry in serde's sequence
/// form (`["service-defaults","db","http"]`) has no `Name` key, so a check
/// on the document's `Name` alone saw "" and let a `service_prefix ""`
/// writer past its own `service "db" deny`. The parsed entry's name is
/// checked too, and a document that is not an object is refused.
#[test]
fn config_entries_are_authorized_on_the_entry_they_become() -> anyhow::Result<()> {
    use proto::config_client::ConfigClient;
    let cluster = Cluster::start(1, &[])?;
    let token = cluster.token_with_rules(
        "all-but-db",
        r#"service_prefix "" { policy = "write" }
service "db" { policy = "deny" }"#,
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut config = ConfigClient::new(cluster.channel_as(1, Some(&token)).await?);
        let sequence = r#"["service-defaults","db","http"]"#;
        let status = config
            .write(proto::WriteConfigRequest {
                json: sequence.into(),
            })
            .await
            .err()
            .context("the sequence form was written")?;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("is an object"), "{status:?}");
        for json in [
            r#"{"Kind":"service-defaults","Name":"db","Protocol":"http"}"#,
            r#"{"kind":"service-defaults","name":"db","protocol":"http"}"#,
            // Sending web's traffic to db needs read on db.
            r#"{"Kind":"service-resolver","Name":"web","Redirect":{"Service":"db"}}"#,
        ] {
            let status = config
                .write(proto::WriteConfigRequest { json: json.into() })
                .await
                .err()
                .with_context(|| format!("{json} was written"))?;
            assert_eq!(status.code(), Code::PermissionDenied, "{json}: {status:?}");
        }
        config
            .write(proto::WriteConfigRequest {
                json: r#"{"Kind":"service-defaults","Name":"web","Protocol":"http"}"#.into(),
            })
            .await?;
        Ok::<_, anyhow::Error>(())
    })
}

/// Policy ids are the servers' to give, and a name cannot pose as an id;
/// node identities hold in their own datacenter only.
#[test]
fn policy_ids_and_node_datacenters_cannot_be_chosen() -> anyhow::Result<()> {
    use proto::acl_client::AclClient;
    use proto::catalog_client::CatalogClient;
    let cluster = Cluster::start(1, &[])?;
    let elsewhere = cluster.token_with(&["--node-identity", "n1:dc9"])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut acl = AclClient::new(cluster.channel(1).await?);
        let rules = r#"key_prefix "" { policy = "read" }"#.to_string();
        let chosen_id = proto::AclPolicy {
            id: "global-management".into(),
            name: "innocent".into(),
            rules: rules.clone(),
            ..Default::default()
        };
        let status = acl.policy_upsert(chosen_id).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let id_as_name = proto::AclPolicy {
            name: "00000000-0000-0000-0000-000000000001".into(),
            rules,
            ..Default::default()
        };
        let status = acl.policy_upsert(id_as_name).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("looks like a policy id"),
            "{status:?}"
        );

        let node = |dc: &str| proto::RegisterNodeRequest {
            node: Some(proto::Node {
                name: "n1".into(),
                address: "10.0.0.1".into(),
                datacenter: dc.into(),
                ..Default::default()
            }),
        };
        let mut as_dc9 = CatalogClient::new(cluster.channel_as(1, Some(&elsewhere)).await?);
        let status = as_dc9.register_node(node("dc1")).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let mut admin = CatalogClient::new(cluster.channel(1).await?);
        let status = admin.register_node(node("dc7")).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        Ok::<_, anyhow::Error>(())
    })
}
