//! Permissive mode (`MutualTLSMode = "permissive"` in a service's
//! service-defaults): plaintext connections from other hosts to a local
//! instance's port are steered by the eBPF sk_lookup program to this
//! listener instead of the workload. The accepted socket's local address is
//! the one the client dialled; the connection is judged with an
//! unauthenticated source (only intentions from `*`, and the default, can
//! allow it), counted, and carried to the instance with the agent's mark.
//! Anyone who reaches the port can connect, so each connection takes a
//! place at accept ([`MAX_CONNECTIONS`], [`MAX_PER_SOURCE`]).
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::Instrument;
use weft_api::config_entry::MutualTlsMode;

use super::outbound::reset;
use super::{inbound, ProxyContext};
use crate::accept::AcceptErrors;
use crate::admission::Places;
use crate::splice::splice;

/// The local instance a plaintext connection to `dialled` is for: the one
/// registered at that address, or else the one on this node at that port
/// (a workload bound to every address, registered at another) — and only
/// if its service is in permissive mode: the steering map is keyed by port,
/// and a strict service must never take plaintext.
pub fn instance_for(ctx: &ProxyContext, dialled: SocketAddr) -> Option<SocketAddr> {
    let view = ctx.view.load();
    let instance = view.local_instance(&ctx.node_name, dialled).or_else(|| {
        let mut on_port = view
            .instances
            .values()
            .filter(|i| i.node == ctx.node_name && i.port == dialled.port());
        // More than one local instance on that port: not ours to guess.
        let first = on_port.next()?;
        on_port.next().is_none().then_some(first)
    })?;
    if view.mutual_tls_mode(&instance.service) != MutualTlsMode::Permissive {
        return None;
    }
    instance.socket_addr()
}

/// Plaintext connections the listener carries at once (each costs the
/// agent two descriptors); more are closed at accept.
pub const MAX_CONNECTIONS: usize = 8_192;
/// Plaintext connections one source address may hold.
pub const MAX_PER_SOURCE: usize = 256;

/// Serves the permissive listener until the task is dropped.
pub async fn serve(ctx: Arc<ProxyContext>, listener: TcpListener) {
    let mut errors = AcceptErrors::new("permissive");
    let places = Places::new(MAX_CONNECTIONS);
    loop {
        let (stream, peer) = errors.accept(&listener).await;
        let place = match places.admit(peer.ip(), MAX_PER_SOURCE) {
            Ok(place) => place,
            Err(refused) => {
                tracing::debug!(%peer, "permissive: no place for the connection ({refused}), closing it");
                ctx.metrics.inbound_refused("permissive", refused.reason());
                continue;
            }
        };
        let ctx = ctx.clone();
        let Ok(dialled) = stream.local_addr() else {
            reset(stream);
            continue;
        };
        let span = tracing::info_span!("permissive", %peer, %dialled);
        let conn = async move {
            let _place = place;
            let _tracked = ctx.drain.track();
            let mut stream = stream;
            let _ = stream.set_nodelay(true);
            let Some(target) = instance_for(&ctx, dialled) else {
                tracing::info!("no local instance of a permissive service there; reset");
                return reset(stream);
            };
            let peer_label = format!("plaintext {peer}");
            let admitted = inbound::admit(
                ctx.clone(),
                inbound::UNAUTHENTICATED.to_string(),
                &peer_label,
                target,
            )
            .await;
            match admitted {
                Ok(mut upstream) => {
                    if let Err(e) = splice(&mut stream, &mut upstream).await {
                        tracing::debug!("permissive connection ended: {e}");
                    }
                }
                Err(refusal) => {
                    tracing::info!("permissive connection refused: {}", refusal.reason);
                    reset(stream);
                }
            }
        };
        tokio::spawn(conn.instrument(span));
    }
}
