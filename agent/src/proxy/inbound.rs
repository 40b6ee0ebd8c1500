//! Inbound: a tunnel from another node's agent. The peer's certificate has
//! been verified against the trust bundle by the HBONE server; here the
//! source service comes from its SPIFFE id, the destination from the local
//! instance at the tunnel's target address, and the intentions decide. A
//! refusal is a 403 on the CONNECT, logged with both identities.
use std::sync::Arc;

use tokio::net::TcpStream;

use super::counted::Counted;
use super::{ProxyContext, CONNECT_TIMEOUT};
use crate::hbone::{ConnectRequest, Refusal, SpiffeId};

/// Decides a tunnel and, if allowed, connects it to the local instance.
pub async fn accept(
    ctx: Arc<ProxyContext>,
    req: ConnectRequest,
) -> Result<Counted<TcpStream>, Refusal> {
    let source = match SpiffeId::parse(&req.peer_id) {
        Ok(id) => id.service,
        Err(e) => return Err(Refusal::forbidden(format!("peer {}: {e}", req.peer_id))),
    };
    let (destination, decision) = {
        let view = ctx.view.read().expect("view lock");
        let Some(instance) = view.local_instance(&ctx.node_name, req.target) else {
            return Err(Refusal::new(
                404,
                format!("no local service instance at {}", req.target),
            ));
        };
        let decision = view.decide(&source, &instance.service, None);
        (instance.service.clone(), decision)
    };
    if !decision.allowed {
        ctx.metrics.denied(&source, &destination);
        tracing::info!(peer = %req.peer_id, %source, %destination, "refused: {decision}");
        return Err(Refusal::forbidden(format!(
            "{source} -> {destination} {decision}"
        )));
    }
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(req.target))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        .map_err(|e| Refusal::unavailable(format!("{destination} at {}: {e}", req.target)))?;
    let _ = upstream.set_nodelay(true);
    Ok(Counted::new(
        upstream,
        ctx.metrics.clone(),
        &source,
        &destination,
    ))
}
