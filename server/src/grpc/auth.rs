//! Who is calling: the ACL token a request carries (gRPC metadata
//! `authorization: Bearer <secret>`), resolved against the replicated ACL
//! state into a [`Caller`] that each RPC asks before it acts.
//!
//! No token, or a token the state does not know, is UNAUTHENTICATED; a
//! known token without the right is PERMISSION_DENIED with the accessor id
//! and the missing permission named (never the secret). Default deny: a
//! token may do only what its policies and identities grant.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Status};
use weft_api::acl::{Access, Authorizer, Resource, ResourceKind};

use crate::node::ServerNode;
use crate::state::{Standing, State};

/// The metadata key that carries the token.
pub const TOKEN_METADATA: &str = "authorization";

/// An authenticated caller: the token's accessor id and what it may do.
pub struct Caller {
    pub accessor: String,
    pub authz: Authorizer,
    /// The client's id of this request (`x-weft-request-id`): a write
    /// retried with it is applied once (see `state::sessions`).
    pub request: Option<String>,
    /// What the caller was judged on; a write carries it to the state
    /// machine, which applies it only while it still holds.
    pub standing: Standing,
    /// Until when a node certificate speaks (its `notAfter`); None for a
    /// token.
    pub valid_until: Option<std::time::SystemTime>,
}

/// The metadata key that names a request for exactly-once writes.
pub const REQUEST_ID_METADATA: &str = "x-weft-request-id";

/// The request id a client sent, if any: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn request_id<T>(req: &Request<T>) -> Result<Option<String>, Status> {
    let Some(value) = req.metadata().get(REQUEST_ID_METADATA) else {
        return Ok(None);
    };
    let id = value.to_str().unwrap_or_default();
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(Status::invalid_argument(format!(
            "{REQUEST_ID_METADATA}: 1 to 64 letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(Some(id.to_string()))
}

fn describe(resource: &Resource<'_>) -> String {
    match resource {
        Resource::Service(n) => format!("service {n:?}"),
        Resource::Intentions(n) => format!("intentions of service {n:?}"),
        Resource::Node(n) => format!("node {n:?}"),
        Resource::Key(k) => format!("key {k:?}"),
        Resource::Session(n) => format!("sessions of node {n:?}"),
        Resource::Operator => "operator".into(),
        Resource::Acl => "acl".into(),
        Resource::Mesh => "mesh".into(),
    }
}

fn access_name(want: Access) -> &'static str {
    match want {
        Access::Read => "read",
        Access::Write => "write",
    }
}

impl Caller {
    /// Authenticated by a node certificate, not a token.
    pub fn by_certificate(&self) -> bool {
        matches!(self.standing, Standing::NodeCertificate { .. })
    }

    pub fn can(&self, resource: Resource<'_>, want: Access) -> bool {
        self.authz.allows(resource, want)
    }

    /// PERMISSION_DENIED unless the token grants `want` on `resource`.
    pub fn require(&self, resource: Resource<'_>, want: Access) -> Result<(), Status> {
        if self.authz.allows(resource, want) {
            return Ok(());
        }
        Err(self.denied(format!("{} on {}", access_name(want), describe(&resource))))
    }

    /// Whether the token grants read on some name of `kind`.
    pub fn can_read_any(&self, kind: ResourceKind) -> bool {
        self.authz.can_read_any(kind)
    }

    /// For list calls: PERMISSION_DENIED when the token can read nothing of
    /// `kind` (otherwise the list is filtered to what it may read).
    pub fn require_any_read(&self, kind: ResourceKind) -> Result<(), Status> {
        if self.authz.can_read_any(kind) {
            return Ok(());
        }
        Err(self.denied(format!("read on any {kind:?}").to_lowercase()))
    }

    /// PERMISSION_DENIED unless `want` holds for every name of `kind`.
    pub fn require_all(&self, kind: ResourceKind, want: Access) -> Result<(), Status> {
        if self.authz.allows_all(kind, want) {
            return Ok(());
        }
        Err(self.denied(format!("{} on every {kind:?}", access_name(want)).to_lowercase()))
    }

    /// PERMISSION_DENIED unless `want` holds for every name of `kind` that
    /// starts with `under`.
    pub fn require_under(
        &self,
        kind: ResourceKind,
        under: &str,
        want: Access,
    ) -> Result<(), Status> {
        if self.authz.allows_under(kind, under, want) {
            return Ok(());
        }
        Err(self.denied(format!(
            "{} on every {} under {under:?}",
            access_name(want),
            format!("{kind:?}").to_lowercase()
        )))
    }

    /// PERMISSION_DENIED unless this is a management token.
    pub fn require_management(&self) -> Result<(), Status> {
        if self.authz.is_management() {
            return Ok(());
        }
        Err(self.denied("a management token".into()))
    }

    fn denied(&self, what: String) -> Status {
        tracing::info!(accessor = %self.accessor, "permission denied: lacks {what}");
        Status::permission_denied(format!("token {} lacks {what}", self.accessor))
    }
}

/// The secret a request carries, if any.
pub fn secret_of<T>(req: &Request<T>) -> Option<&str> {
    bearer_secret(req.metadata().get(TOKEN_METADATA)?.to_str().ok()?)
}

/// The secret of an `authorization` value `Bearer <secret>`, if it is one.
pub fn bearer_secret(value: &str) -> Option<&str> {
    let secret = value.strip_prefix("Bearer ")?.trim();
    (!secret.is_empty()).then_some(secret)
}

/// Why a call that presents an `authorization` that is not a token is
/// refused (it does not fall back to the connection's certificate).
pub fn malformed_token() -> Status {
    Status::unauthenticated("the authorization metadata is not \"Bearer <token>\"")
}

/// The caller a secret stands for in `state`, on a server of `datacenter`.
pub fn resolve_in(state: &State, datacenter: &str, secret: &str) -> Option<Caller> {
    let token = state.acl.token_by_secret(secret)?;
    Some(Caller {
        accessor: token.accessor_id.clone(),
        authz: state.acl.authorizer(token, datacenter),
        request: None,
        standing: Standing::of_token(&state.acl, token),
        valid_until: None,
    })
}

fn resolve(node: &ServerNode, secret: &str) -> Option<Caller> {
    let state = node.shared.state.read().expect("state lock");
    resolve_in(&state, &node.datacenter, secret)
}

/// The caller a request's TLS client certificate stands for: a node
/// certificate of this cluster's mesh CA (the TLS layer checked the chain)
/// whose SPIFFE id is `spiffe://<td>/ns/default/dc/<this dc>/node/<node>`
/// gets that node's identity (write on the node, read on services and
/// nodes), as the node's token would, while the node is in the catalog.
/// Any other certificate counts for nothing.
fn node_certificate<T>(node: &ServerNode, req: &Request<T>) -> Option<Caller> {
    let certs = req.peer_certs()?;
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let mut uris = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    let state = node.shared.state.read().expect("state lock");
    let trust_domain = &state.ca.as_ref()?.trust_domain;
    let prefix = format!(
        "spiffe://{trust_domain}/ns/default/dc/{}/node/",
        node.datacenter
    );
    let name = uri.strip_prefix(&prefix)?;
    weft_api::names::validate_name(name).ok()?;
    // Only while the node is in the catalog: deregistering it (with its
    // token deleted) is how an operator takes a node out, and a certificate
    // taken from it must not go on writing its node (registering it again
    // at any address, its maintenance) for the rest of its lifetime.
    // An external node (registered through the catalog API) of that name
    // is no agent's: no certificate speaks for it.
    let Some(registered) =
        (state.nodes.get(name)).filter(|n| !weft_api::catalog_register::is_external(n))
    else {
        tracing::info!(
            node = name,
            "a node certificate of a node no agent has in the catalog: refused"
        );
        return None;
    };
    let standing = Standing::of_node(registered);
    drop(state);
    // The handshake checked the validity period; a connection lives on
    // past it, and each request is judged now.
    let validity = cert.validity();
    if !validity.is_valid() {
        tracing::info!(node = name, "an expired node certificate: refused");
        return None;
    }
    let valid_until = u64::try_from(validity.not_after.timestamp())
        .ok()
        .map(|secs| std::time::UNIX_EPOCH + Duration::from_secs(secs));
    // Not another datacenter's intermediate speaking for this one's node.
    let chain: Vec<&[u8]> = certs[1..].iter().map(|c| c.as_ref()).collect();
    weft_api::spiffe::check_issuer_scope(uri, &chain).ok()?;
    Some(Caller {
        accessor: format!("node certificate of {name}"),
        authz: Authorizer::from_rules([&weft_api::acl::node_identity_rules(name)]),
        request: None,
        standing,
        valid_until,
    })
}

/// Whether an unknown token may cost a read barrier now: at most one every
/// `UNKNOWN_TOKEN_GAP` for the whole server, so that a stream of made-up
/// tokens cannot turn into a stream of read-index rounds between servers.
fn may_look_again() -> bool {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().expect("unknown-token clock");
    let now = Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < UNKNOWN_TOKEN_GAP) {
        return false;
    }
    *last = Some(now);
    true
}

const UNKNOWN_TOKEN_GAP: Duration = Duration::from_millis(200);

/// A tonic interceptor that refuses, from the headers alone, a request
/// whose token this server does not know: for services whose messages are
/// large (snapshots), so that nobody without a token makes the server read
/// and buffer one.
#[derive(Clone)]
pub struct KnownToken(pub Arc<ServerNode>);

impl tonic::service::Interceptor for KnownToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(secret) = secret_of(&req) else {
            return Err(Status::unauthenticated(
                "no ACL token: set WEFT_TOKEN or pass --token-file",
            ));
        };
        match resolve(&self.0, secret) {
            Some(_) => Ok(req),
            None => Err(Status::unauthenticated("ACL token not found")),
        }
    }
}

/// A tonic interceptor that refuses, from the headers alone, a request
/// that carries no credential: neither a well-formed token nor a node
/// certificate of this cluster. Nobody without one makes the server read
/// and buffer a message (up to its decoding limit) only to be refused
/// after it. A token this server does not know yet passes: the handler
/// looks it up once more after a read barrier ([`caller`]).
#[derive(Clone)]
pub struct Credentialed(pub Arc<ServerNode>);

impl tonic::service::Interceptor for Credentialed {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        credentialed(&req, || node_certificate(&self.0, &req).is_some())?;
        Ok(req)
    }
}

/// Whether `req` presents a well-formed token, or else a node certificate
/// (`node_certificate`, asked only then).
fn credentialed<T>(
    req: &Request<T>,
    node_certificate: impl FnOnce() -> bool,
) -> Result<(), Status> {
    if token_presented(req)?.is_some() || node_certificate() {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "no ACL token: set WEFT_TOKEN or pass --token-file",
        ))
    }
}

/// The token a request presents: none when it has no `authorization`
/// metadata; refused when it has one that is not `Bearer <token>` (it does
/// not fall back to the connection's certificate).
fn token_presented<T>(req: &Request<T>) -> Result<Option<&str>, Status> {
    if req.metadata().get(TOKEN_METADATA).is_none() {
        return Ok(None);
    }
    secret_of(req).map(Some).ok_or_else(malformed_token)
}

/// The caller again, from this server's state as it is now: called after a
/// read barrier brought the state up to the leader's, it sees a token
/// deleted, or its policies narrowed, a moment before on the leader, which
/// the first check (from what this server had applied, a follower lagging)
/// did not. `secret` is the request's token (None: authenticated by its
/// certificate, kept as it was).
pub fn again(node: &ServerNode, secret: Option<&str>, caller: Caller) -> Result<Caller, Status> {
    let Some(secret) = secret else {
        return Ok(caller);
    };
    let mut now = resolve(node, secret)
        .ok_or_else(|| Status::unauthenticated("ACL token not found (deleted meanwhile)"))?;
    now.request = caller.request;
    Ok(now)
}

/// Authenticates a request. A token this server does not know yet may have
/// been created through another server a moment ago: it is looked up once
/// more after a linearizable read barrier before it is refused (one such
/// barrier at a time per `UNKNOWN_TOKEN_GAP`).
pub async fn caller<T>(node: &ServerNode, req: &Request<T>) -> Result<Caller, Status> {
    let request = request_id(req)?;
    let mut caller = authenticate(node, req).await?;
    caller.request = request;
    Ok(caller)
}

async fn authenticate<T>(node: &ServerNode, req: &Request<T>) -> Result<Caller, Status> {
    let Some(secret) = token_presented(req)? else {
        // No token: an agent's node certificate speaks for its node.
        if let Some(caller) = node_certificate(node, req) {
            return Ok(caller);
        }
        return Err(Status::unauthenticated(
            "no ACL token: set WEFT_TOKEN or pass --token-file",
        ));
    };
    resolve_or_look_again(node, secret)
        .await
        .ok_or_else(|| Status::unauthenticated("ACL token not found"))
}

/// The caller `secret` stands for: looked up, and once more after a read
/// barrier (one such barrier at a time per `UNKNOWN_TOKEN_GAP`) when this
/// server does not know it yet.
async fn resolve_or_look_again(node: &ServerNode, secret: &str) -> Option<Caller> {
    if let Some(caller) = resolve(node, secret) {
        return Some(caller);
    }
    if may_look_again() && node.read_barrier(false).await.is_ok() {
        return resolve(node, secret);
    }
    None
}

/// Whether this cluster knows `secret` (see [`resolve_or_look_again`]).
pub async fn token_known(node: &ServerNode, secret: &str) -> bool {
    resolve_or_look_again(node, secret).await.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_authorization(value: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(v) = value {
            req.metadata_mut()
                .insert(TOKEN_METADATA, v.parse().unwrap());
        }
        req
    }

    /// Without a token or a node certificate a request is refused from its
    /// headers, before its message is read; a malformed token is refused
    /// rather than read as no token (which would let the connection's
    /// certificate speak instead); a token the server may not know yet
    /// passes on to the handler's lookup.
    #[test]
    fn a_request_without_a_credential_is_refused_from_its_headers() {
        let code = |r: Result<(), Status>| r.err().map(|s| s.code());
        let unauthenticated = Some(tonic::Code::Unauthenticated);
        assert_eq!(
            code(credentialed(&with_authorization(None), || false)),
            unauthenticated
        );
        assert_eq!(code(credentialed(&with_authorization(None), || true)), None);
        for malformed in ["abc", "Basic abc", "Bearer ", "bearer abc"] {
            let req = with_authorization(Some(malformed));
            assert_eq!(
                code(credentialed(&req, || true)),
                unauthenticated,
                "{malformed:?}"
            );
        }
        let req = with_authorization(Some("Bearer made-up"));
        assert_eq!(code(credentialed(&req, || false)), None);
    }
}
