//! Inbound: a tunnel from another node's agent. The peer's certificate has
//! been verified against the trust bundle by the HBONE server; here the
//! source service comes from its SPIFFE id, the destination from the local
//! instance at the tunnel's target address, and the intentions decide. A
//! refusal is a 403 on the CONNECT, logged with both identities. Where an
//! L7 intention decides, the tunnel is spliced to the L7 proxy (through an
//! in-memory pipe), which judges every HTTP request on it.
use std::sync::Arc;

use tokio::io::DuplexStream;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::counted::Counted;
use super::plan::{self, Plan};
use super::{l7, upstream, ProxyContext, CONNECT_TIMEOUT};
use crate::hbone::{ConnectRequest, Refusal, SpiffeId};
use crate::metrics::Side;
use crate::splice::SPLICE_BUFFER;

/// What a tunnel is spliced to: the instance, or the L7 proxy's pipe.
pub type Upstream = Either<TcpStream, DuplexStream>;

/// The source service of a tunnel, from its peer's SPIFFE id: only a
/// service identity of this trust domain, the default namespace and this
/// datacenter or another of the federation (`federated`) speaks for a
/// service here (a node's own identity, or one of another namespace or of
/// an unknown datacenter, does not), checked before intentions. Another
/// datacenter's service is labelled `name@dc`: so intentions that name a
/// source's datacenter judge it ([`ProxyContext::caller`]), and metrics and
/// traffic reports show where it came from.
pub fn source_service(
    peer_id: &str,
    trust_domain: &str,
    datacenter: &str,
    federated: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let id = SpiffeId::parse(peer_id).map_err(|e| e.to_string())?;
    if id.trust_domain != trust_domain {
        return Err(format!(
            "trust domain {:?} is not {trust_domain:?}",
            id.trust_domain
        ));
    }
    if id.namespace != weft_api::spiffe::DEFAULT_NAMESPACE {
        return Err(format!("namespace {:?} is not \"default\"", id.namespace));
    }
    if id.datacenter != datacenter && !federated(&id.datacenter) {
        return Err(format!(
            "datacenter {:?} is not {datacenter:?} nor one of its federation",
            id.datacenter
        ));
    }
    // Names as the CA issues them (so `@` cannot be in one).
    for part in [&id.service, &id.datacenter] {
        weft_api::names::validate_name(part).map_err(|e| format!("{part:?}: {e}"))?;
    }
    if id.datacenter == datacenter {
        Ok(id.service)
    } else {
        Ok(format!("{}@{}", id.service, id.datacenter))
    }
}

/// Whether tunnels are taken from `peer_id` at all ([`source_service`]),
/// and where it is from: checked as its handshake ends, so that a
/// certificate no tunnel would be taken from holds no connection.
pub fn peer_origin(
    peer_id: &str,
    trust_domain: &str,
    datacenter: &str,
    federated: impl Fn(&str) -> bool,
) -> Result<crate::hbone::server::PeerOrigin, String> {
    use crate::hbone::server::PeerOrigin;
    let source = source_service(peer_id, trust_domain, datacenter, federated)?;
    // Names hold no `@`: one marks another datacenter's service.
    Ok(match source.contains('@') {
        true => PeerOrigin::OtherDatacenter,
        false => PeerOrigin::ThisDatacenter,
    })
}

/// The source name a plaintext (permissive) connection is judged as: no
/// service is called so, so only intentions from `*` (and the default)
/// decide it.
pub const UNAUTHENTICATED: &str = "";

/// Decides a tunnel and, if allowed, connects it to the local instance.
pub async fn accept(
    ctx: Arc<ProxyContext>,
    req: ConnectRequest,
) -> Result<Counted<Upstream>, Refusal> {
    let source = {
        let view = ctx.view.load();
        let federated = |dc: &str| view.federation.contains_key(dc);
        source_service(&req.peer_id, &view.trust_domain, &ctx.datacenter, federated).map_err(
            |e| {
                tracing::info!(peer = %req.peer_id, "refused: {e}");
                Refusal::forbidden(format!("peer {}: {e}", req.peer_id))
            },
        )?
    };
    admit(ctx, source, &req.peer_id, req.target).await
}

/// Decides a connection from `source` (`peer` names it in logs) to the
/// local instance at `target` and, if allowed, connects to the instance
/// with the agent's mark. `source` is [`UNAUTHENTICATED`] for plaintext.
pub async fn admit(
    ctx: Arc<ProxyContext>,
    source: String,
    peer: &str,
    target: std::net::SocketAddr,
) -> Result<Counted<Upstream>, Refusal> {
    // Metrics and logs name an unauthenticated source so.
    let label = ProxyContext::source_label(&source);
    // One snapshot of the view decides the tunnel.
    let (destination, plan) = {
        let view = ctx.view.load();
        let Some(instance) = view.local_instance(&ctx.node_name, target) else {
            return Err(Refusal::new(
                404,
                format!("no local service instance at {target}"),
            ));
        };
        // Looked at after the instance, so that a peer learns nothing of
        // the agent's ports by probing (404 wherever no instance is).
        if crate::config::is_among(&ctx.own.load(), target.ip(), target.port()) {
            tracing::warn!(%peer, source = label, %target, service = %instance.service, "refused: an instance in the catalog at one of the agent's own ports");
            return Err(Refusal::forbidden(format!(
                "{target} is one of this agent's own ports"
            )));
        }
        let plan = plan::connection(&view, ctx.caller(&source), &instance.service);
        (instance.service.clone(), plan)
    };
    // The instance speaks for itself, HTTP or not, unless an L7 intention
    // must judge each request.
    // Some(protocol) when requests are judged one by one.
    let per_request = match plan {
        Plan::Deny(reason) => {
            ctx.metrics.denied(Side::Inbound, label, &destination);
            tracing::info!(%peer, source = label, %destination, "refused: {reason}");
            return Err(Refusal::forbidden(format!(
                "{label} -> {destination}: {reason}"
            )));
        }
        Plan::Requests { judge, protocol } => judge.then_some(protocol),
        Plan::Bytes => None,
    };
    let instance = upstream::connect_local(target, CONNECT_TIMEOUT)
        .await
        .map_err(|e| Refusal::unavailable(format!("{destination} at {target}: {e}")))?;
    let upstream = if let Some(protocol) = per_request {
        let (tunnel_end, proxy_end) = tokio::io::duplex(SPLICE_BUFFER);
        let (src, dst) = (source.clone(), destination.clone());
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = l7::serve_instance(ctx, proxy_end, instance, protocol, src, dst).await {
                tracing::debug!("L7 connection ended: {e}");
            }
        });
        Either::Right(tunnel_end)
    } else {
        Either::Left(instance)
    };
    Ok(Counted::new(
        upstream,
        ctx.metrics.clone(),
        label,
        &destination,
    ))
}

#[cfg(test)]
mod tests {
    use super::source_service;

    const TD: &str = "c0ffee.weft";

    #[test]
    fn only_a_service_of_this_trust_domain_namespace_and_datacenter_counts() {
        let ok = "spiffe://c0ffee.weft/ns/default/dc/dc1/svc/web";
        let alone = |_: &str| false;
        assert_eq!(source_service(ok, TD, "dc1", alone).unwrap(), "web");
        // Another datacenter of the federation speaks for its services,
        // labelled with it (intentions may name it).
        let remote = "spiffe://c0ffee.weft/ns/default/dc/dc2/svc/web";
        assert_eq!(
            source_service(remote, TD, "dc1", |dc| dc == "dc2").unwrap(),
            "web@dc2"
        );
        for (id, why) in [
            (
                "spiffe://other.weft/ns/default/dc/dc1/svc/web",
                "trust domain",
            ),
            ("spiffe://c0ffee.weft/ns/prod/dc/dc1/svc/web", "namespace"),
            (
                "spiffe://c0ffee.weft/ns/default/dc/dc2/svc/web",
                "datacenter",
            ),
            ("spiffe://c0ffee.weft/ns/default/dc/dc1/node/node-a", "svc"),
            ("spiffe://c0ffee.weft/ns/default/dc/dc1/svc/", "empty"),
        ] {
            let e = source_service(id, TD, "dc1", |dc| dc == "dc3").unwrap_err();
            assert!(e.contains(why), "{id}: {e}");
        }
        // A name no CA of the federation issues (`@` would pass for
        // another datacenter's label).
        for (id, why) in [
            (
                "spiffe://c0ffee.weft/ns/default/dc/dc3/svc/web@dc1",
                "bad character '@'",
            ),
            (
                "spiffe://c0ffee.weft/ns/default/dc/DC3/svc/web",
                "bad character 'D'",
            ),
        ] {
            let e = source_service(id, TD, "dc1", |dc| dc == "dc3" || dc == "DC3").unwrap_err();
            assert!(e.contains(why), "{id}: {e}");
        }
    }
}
