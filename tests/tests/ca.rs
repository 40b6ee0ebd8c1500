//! The certificate authority through a real server: what `weft ca leaf`
//! prints, the node/service check on CSRs, tampered CSRs, and a rotation
//! reaching a watcher.
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rcgen::{CertificateParams, KeyPair, SanType};
use tonic::Code;
use weft_api::proto::ca_client::CaClient;
use weft_api::proto::catalog_client::CatalogClient;
use weft_api::proto::watch_client::WatchClient;
use weft_api::proto::{
    change, watch_event, Node, RegisterNodeRequest, RegisterServiceRequest, ServiceInstance,
    SignRequest, WatchRequest,
};
use weft_tests::servers::Cluster;

fn wait_for_ca(cluster: &Cluster) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cluster.cli(&["ca", "roots"]) {
            Ok(pem) if pem.contains("BEGIN CERTIFICATE") => return Ok(pem),
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => bail!("no CA: {other:?}"),
        }
    }
}

fn csr_for(uri: Option<&str>) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    if let Some(uri) = uri {
        params.subject_alt_names = vec![SanType::URI(uri.to_string().try_into().unwrap())];
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// Changes one base64 character in the second line of the PEM body: inside
/// the signed request info (the public key), so the signature no longer fits.
fn tamper(pem: &str) -> String {
    let mut lines: Vec<String> = pem.lines().map(String::from).collect();
    let line = &mut lines[2];
    let i = 10;
    let c = line.as_bytes()[i];
    let replacement = if c == b'A' { 'B' } else { 'A' };
    line.replace_range(i..i + 1, &replacement.to_string());
    lines.join("\n") + "\n"
}

#[test]
fn operator_leaf_shows_spiffe_id_usages_and_validity() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let roots = wait_for_ca(&cluster)?;
    let out = cluster.cli(&["ca", "leaf", "web"])?;
    assert!(
        out.contains("PRIVATE KEY"),
        "the operator leaf comes with its key"
    );
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("leaf.pem"), &out)?;
    std::fs::write(dir.path().join("roots.pem"), &roots)?;
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.path().join("leaf.pem"))
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(".weft/ns/default/dc/dc1/svc/web"), "{text}");
    assert!(text.contains("URI:spiffe://"), "{text}");
    assert!(
        text.contains("Digital Signature, Key Encipherment"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.path().join("roots.pem"))
        .arg(dir.path().join("leaf.pem"))
        .output()?;
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // The server never logs private keys.
    assert!(!cluster.log(1).contains("PRIVATE KEY"));
    Ok(())
}

/// Whether an operator leaf for web signed now expires within `secs`.
fn leaf_expires_within(cluster: &Cluster, secs: u64) -> anyhow::Result<bool> {
    let out = cluster.cli(&["ca", "leaf", "web"])?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("leaf.pem"), &out)?;
    let check = Command::new("openssl")
        .args(["x509", "-noout", "-checkend", &secs.to_string(), "-in"])
        .arg(dir.path().join("leaf.pem"))
        .output()?;
    // openssl says 0 when the certificate outlives the period.
    Ok(!check.status.success())
}

/// The operator's answer to a leaked leaf: the servers restarted with a
/// shorter `--leaf-ttl`. It was read only when the CA was created, so the
/// leaves went on being signed for 72 h and nothing said so. Now the leader
/// writes it into the CA, and the next leaves have it.
#[test]
fn a_new_leaf_ttl_holds_for_the_leaves_signed_after_it() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(1, &[])?;
    wait_for_ca(&cluster)?;
    assert!(!leaf_expires_within(&cluster, 24 * 3600)?, "72 h at first");
    cluster.kill(1);
    cluster.set_extra_args(&["--leaf-ttl=1h"]);
    cluster.start_server(1)?;
    weft_tests::mesh::wait_until(Duration::from_secs(20), "a leaf of 1 h", || {
        Ok(leaf_expires_within(&cluster, 2 * 3600)
            .unwrap_or(false)
            .then_some(()))
    })
    .map_err(|e| e.context(cluster.log(1)))?;
    assert!(
        cluster.log(1).contains("--leaf-ttl from now on"),
        "the change is not logged"
    );
    Ok(())
}

/// The attack: a token deleted on the leader still got certificates from a
/// follower that had not yet applied the deletion, since the token was
/// checked against the follower's state before its read barrier. Now it is
/// judged again once the barrier has brought the follower up to date.
#[test]
fn a_token_deleted_on_the_leader_gets_nothing_from_a_lagging_follower() -> anyhow::Result<()> {
    use weft_api::proto::IssueLeafRequest;
    let cluster = Cluster::start_linked(3, &[])?;
    let leader = cluster.wait_for_leader(Duration::from_secs(15))?;
    wait_for_ca(&cluster)?;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    cluster.cli(&[
        "acl",
        "policy",
        "create",
        "--name",
        "web-leaf",
        "--rules",
        r#"service "web" { policy = "write" }"#,
    ])?;
    let created: serde_json::Value = serde_json::from_str(&cluster.cli(&[
        "--format", "json", "acl", "token", "create", "--policy", "web-leaf",
    ])?)?;
    let secret = created["secret_id"].as_str().context("secret")?.to_string();
    let accessor = created["accessor_id"]
        .as_str()
        .context("accessor")?
        .to_string();
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(cluster.channel_as(follower, Some(&secret)))?;
    let leaf = move || {
        let mut ca = CaClient::new(client.clone());
        async move {
            ca.issue_leaf(IssueLeafRequest {
                service: "web".into(),
                datacenter: String::new(),
            })
            .await
        }
    };
    // The follower knows the token and signs for it.
    rt.block_on(leaf())?;
    cluster.isolate(follower);
    let out = cluster.cli_at(
        cluster.grpc_addr(leader),
        &["acl", "token", "delete", &accessor],
    );
    ensure!(
        out.status.success(),
        "delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Asked while cut off: its own state still has the token, and its read
    // barrier waits for the leader, which it hears again a moment later.
    let asked = rt.spawn(leaf());
    std::thread::sleep(Duration::from_secs(1));
    cluster.rejoin(follower);
    let refused = rt.block_on(asked)?.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    Ok(())
}

#[test]
fn csrs_are_signed_only_for_services_on_the_requesting_node() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    wait_for_ca(&cluster)?;
    let agent_token =
        cluster.token_with(&["--node-identity", "node-a:dc1", "--service-identity", "web"])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut catalog = CatalogClient::new(cluster.channel(1).await?);
        catalog
            .register_node(RegisterNodeRequest {
                node: Some(Node {
                    name: "node-a".into(),
                    address: "10.0.0.1".into(),
                    datacenter: "dc1".into(),
                    ..Default::default()
                }),
            })
            .await?;
        catalog
            .register_service(RegisterServiceRequest {
                instance: Some(ServiceInstance {
                    id: "web-1".into(),
                    service: "web".into(),
                    node: "node-a".into(),
                    address: "10.0.0.1".into(),
                    port: 8080,
                    ..Default::default()
                }),
            })
            .await?;
        let mut ca = CaClient::new(cluster.channel(1).await?);
        let sign = |csr: String, service: &str| SignRequest {
            csr_pem: csr,
            node: "node-a".into(),
            service: service.into(),
        };

        // node-a's own token: web's certificate and the node's, nothing else.
        let mut as_agent = CaClient::new(cluster.channel_as(1, Some(&agent_token)).await?);
        let leaf = as_agent
            .sign(sign(csr_for(None), "web"))
            .await?
            .into_inner();
        assert!(leaf.spiffe_id.ends_with("/svc/web"), "{}", leaf.spiffe_id);
        let refused = as_agent.sign(sign(csr_for(None), "api")).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("service \"api\""), "{refused:?}");
        let mut for_b = sign(csr_for(None), "");
        for_b.node = "node-b".into();
        let refused = as_agent.sign(for_b).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        let mut anonymous = CaClient::new(cluster.channel_as(1, None).await?);
        let refused = anonymous
            .sign(sign(csr_for(None), "web"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

        let leaf = ca.sign(sign(csr_for(None), "web")).await?.into_inner();
        assert!(
            leaf.spiffe_id.ends_with("/ns/default/dc/dc1/svc/web"),
            "{}",
            leaf.spiffe_id
        );
        assert!(leaf.key_pem.is_empty(), "the agent keeps its own key");

        let refused = ca.sign(sign(csr_for(None), "api")).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("not registered on node"),
            "{}",
            refused.message()
        );

        let wrong_name = csr_for(Some(&leaf.spiffe_id.replace("/svc/web", "/svc/api")));
        let refused = ca.sign(sign(wrong_name, "web")).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

        let tampered = tamper(&csr_for(None));
        let refused = ca.sign(sign(tampered, "web")).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

        let node_leaf = ca.sign(sign(csr_for(None), "")).await?.into_inner();
        assert!(
            node_leaf.spiffe_id.ends_with("/node/node-a"),
            "{}",
            node_leaf.spiffe_id
        );
        Ok::<_, anyhow::Error>(())
    })
}

#[test]
fn a_rotation_reaches_watchers_with_both_roots() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    wait_for_ca(&cluster)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut stream = rt.block_on(async {
        let mut watch = WatchClient::new(cluster.channel(1).await?);
        let mut stream = watch
            .subscribe(WatchRequest {
                from_index: 0,
                include_kv: false,
            })
            .await?
            .into_inner();
        let first = stream.message().await?.context("no snapshot")?;
        match first.event {
            Some(watch_event::Event::Snapshot(s)) => {
                assert_eq!(s.ca.context("snapshot without CA")?.roots_pem.len(), 1)
            }
            other => bail!("expected a snapshot, got {other:?}"),
        }
        Ok::<_, anyhow::Error>(stream)
    })?;
    cluster.cli(&["ca", "rotate"])?;
    rt.block_on(async {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .context("no rotation event")??
                .context("stream ended")?;
            if let Some(watch_event::Event::Changes(set)) = event.event {
                for c in set.changes {
                    if let Some(change::Change::CaBundle(b)) = c.change {
                        assert_eq!(b.roots_pem.len(), 2, "old and new root during the overlap");
                        return Ok(());
                    }
                }
            }
        }
    })
}

/// An agent authenticates with its node's token, then with the node
/// certificate it got with it: presented as the TLS client certificate
/// without any token, the certificate is the node's identity (its node,
/// read on services), nothing more: it gets no certificate, not even its
/// own renewal; a service certificate counts for nothing; and once the
/// node is deregistered, nothing at all.
#[test]
fn a_node_certificate_authenticates_its_node_and_nothing_more() -> anyhow::Result<()> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use weft_api::proto::kv_client::KvClient;
    use weft_api::proto::{KvGetRequest, ReadOptions};
    let cluster = Cluster::start(1, &[])?;
    wait_for_ca(&cluster)?;
    let token = cluster.token_with(&["--node-identity", "node-a:dc1"])?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let node = |name: &str| RegisterNodeRequest {
            node: Some(Node {
                name: name.into(),
                address: "10.0.0.1".into(),
                datacenter: "dc1".into(),
                ..Default::default()
            }),
        };
        let mut with_token = CatalogClient::new(cluster.channel_as(1, Some(&token)).await?);
        with_token.register_node(node("node-a")).await?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let leaf = CaClient::new(cluster.channel_as(1, Some(&token)).await?)
            .sign(SignRequest {
                csr_pem: csr,
                node: "node-a".into(),
                service: String::new(),
            })
            .await?
            .into_inner();
        let connect = |cert: String, key: String| {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&cluster.tls_ca.cert_pem))
                .domain_name("server.dc1.weft")
                .identity(Identity::from_pem(cert, key));
            let addr = cluster.grpc_addr(1).to_string();
            async move {
                Ok::<_, anyhow::Error>(
                    Endpoint::from_shared(format!("https://{addr}"))?
                        .tls_config(tls)?
                        .connect()
                        .await?,
                )
            }
        };
        let chain = format!("{}{}", leaf.cert_pem, leaf.chain_pem);
        let as_node = connect(chain, key.serialize_pem()).await?;
        let mut catalog = CatalogClient::new(as_node.clone());
        catalog.register_node(node("node-a")).await?;
        catalog.list_services(ReadOptions::default()).await?;
        let refused = catalog.register_node(node("node-b")).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        // Nor does it renew itself: a stolen node certificate would
        // otherwise outlive the token an operator deleted.
        let renewal = SignRequest {
            csr_pem: CertificateParams::default()
                .serialize_request(&key)?
                .pem()?,
            node: "node-a".into(),
            service: String::new(),
        };
        let refused = CaClient::new(as_node.clone())
            .sign(renewal)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        // A watch the certificate holds lives only as long as its node.
        let mut watch = WatchClient::new(as_node.clone())
            .subscribe(WatchRequest {
                from_index: 0,
                include_kv: false,
            })
            .await?
            .into_inner();
        let refused = KvClient::new(as_node)
            .get(KvGetRequest {
                key: "secret".into(),
                read: None,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

        // The operator takes node-a out (deregisters it): the certificate,
        // taken from it, no longer speaks for it (it registered node-a
        // again, at any address, for the rest of its lifetime).
        CatalogClient::new(cluster.channel(1).await?)
            .deregister_node(weft_api::proto::DeregisterNodeRequest {
                name: "node-a".into(),
            })
            .await?;
        let refused = catalog.register_node(node("node-a")).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        // Its watch ended (it went on with the whole catalog, intentions
        // and config entries until some unrelated ACL change).
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match watch.message().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .context("the certificate's watch outlived its node")?;
        let ended = ended.expect_err("the watch ended without an error");
        assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
        assert!(ended.message().contains("left the catalog"), "{ended:?}");
        // Nor for an external node of that name (no agent's).
        let reply = cluster.http(
            1,
            "PUT",
            "/v1/catalog/register",
            Some(&cluster.token),
            Some(br#"{"Node": "node-a", "Address": "10.0.0.1"}"#),
        )?;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let refused = catalog.register_node(node("node-a")).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        // Its token registers it again, and the certificate speaks for it.
        with_token.register_node(node("node-a")).await?;
        catalog.register_node(node("node-a")).await?;

        // A service certificate (an operator leaf) is no node's identity.
        let out = cluster.cli(&["--format", "json", "ca", "leaf", "web"])?;
        let web: serde_json::Value = serde_json::from_str(&out)?;
        let web_cert = format!(
            "{}{}",
            web["cert_pem"].as_str().context("cert_pem")?,
            web["chain_pem"].as_str().unwrap_or_default()
        );
        let web_key = web["key_pem"].as_str().context("key_pem")?.to_string();
        let mut as_web = CatalogClient::new(connect(web_cert, web_key).await?);
        let refused = as_web.register_node(node("node-a")).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        Ok::<_, anyhow::Error>(())
    })
}
