//! Times every API call by method and gRPC status code
//! (`weft_server_rpc_seconds{method,code}`): a tower layer around the API
//! server. A unary call that fails answers with its status in the response
//! headers (trailers only), so a call without one there succeeded; a
//! stream is timed until it opens, with the code it opened with. Methods are
//! the proto's: any other path counts as `other`, so a client cannot add
//! label values.
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use crate::metrics::ServerMetrics;

const PROTO: &str = include_str!("../../../api/proto/weft/v1/weft.proto");

/// Every API method's path, from the proto (`/weft.v1.Kv/Put`, …).
fn known() -> &'static BTreeSet<String> {
    static KNOWN: OnceLock<BTreeSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut out = BTreeSet::new();
        let mut service = None;
        for line in PROTO.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().map(str::to_string);
            } else if let (Some(rest), Some(service)) = (line.strip_prefix("rpc "), &service) {
                let method = rest.split('(').next().unwrap_or_default().trim();
                out.insert(format!("/weft.v1.{service}/{method}"));
            }
        }
        out
    })
}

/// The label for a request's path.
pub fn method_label(path: &str) -> String {
    if known().contains(path) {
        path.to_string()
    } else {
        "other".to_string()
    }
}

/// The label for a gRPC status code number.
pub fn code_label(code: i32) -> String {
    format!("{:?}", tonic::Code::from_i32(code))
}

#[derive(Clone)]
pub struct RpcMetricsLayer(pub Arc<ServerMetrics>);

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<ServerMetrics>,
}

type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Boxed<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let started = Instant::now();
        let call = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let resp = call.await?;
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            metrics.rpc(method, code_label(code), started.elapsed());
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_proto_and_others_are_one_label() {
        assert_eq!(method_label("/weft.v1.Kv/Put"), "/weft.v1.Kv/Put");
        assert_eq!(
            method_label("/weft.v1.Telemetry/Top"),
            "/weft.v1.Telemetry/Top"
        );
        assert_eq!(method_label("/weft.v1.Kv/Nope"), "other");
        assert_eq!(method_label("/anything/else"), "other");
        assert!(known().len() >= 40, "{:?}", known());
        assert_eq!(code_label(0), "Ok");
        assert_eq!(code_label(7), "PermissionDenied");
    }
}
