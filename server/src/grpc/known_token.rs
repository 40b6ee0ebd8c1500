//! Refuses a call whose token this cluster does not know before its message
//! is read: a tower layer in front of the API services. tonic reads a whole
//! message (up to its decoding limit) before a handler runs, so without it
//! anyone could make a server buffer 4 MiB per stream with a made-up
//! token. A token created on another server a moment ago is looked up once
//! more after a read barrier, as the handlers do ([`auth::token_known`]).
//! Calls without a token go on to the services, which refuse them unless
//! they carry a node certificate ([`auth::Credentialed`]) or are the ACL
//! bootstrap.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::auth;
use crate::node::ServerNode;

#[derive(Clone)]
pub struct KnownTokenLayer(pub Arc<ServerNode>);

impl<S> Layer<S> for KnownTokenLayer {
    type Service = KnownTokenService<S>;

    fn layer(&self, inner: S) -> KnownTokenService<S> {
        KnownTokenService {
            inner,
            node: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct KnownTokenService<S> {
    inner: S,
    node: Arc<ServerNode>,
}

type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for KnownTokenService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Boxed<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone waits for readiness; the one that was polled ready
        // takes this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let node = self.node.clone();
        Box::pin(async move {
            let presented = (req.headers().get(auth::TOKEN_METADATA))
                .map(|v| v.to_str().ok().and_then(auth::bearer_secret));
            let refused = match presented {
                None => None,
                Some(None) => Some(auth::malformed_token()),
                Some(Some(secret)) if auth::token_known(&node, secret).await => None,
                Some(Some(_)) => Some(tonic::Status::unauthenticated("ACL token not found")),
            };
            match refused {
                Some(status) => Ok(status.into_http()),
                None => inner.call(req).await,
            }
        })
    }
}
