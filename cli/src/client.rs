//! Talking to the servers: each call goes to the first address that answers;
//! when a server is down (or has no leader to offer), the next one is tried.
//! Every call is TLS: the server's certificate must chain to `--ca-file`
//! (`WEFT_CACERT`) and name `--tls-server-name` (`server.dc1.weft` by
//! default), whatever address was dialled. The token rides as
//! `authorization: Bearer` metadata.
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use weft_api::proto::ReadOptions;

use crate::{Cli, Format};

pub struct Ctx {
    addrs: Vec<String>,
    token: Option<String>,
    ca_file: Option<PathBuf>,
    server_name: String,
    pub format: Format,
    pub stale: bool,
    /// The id of the call under way: the same on every attempt, so that a
    /// write the servers applied before a failover is not applied again.
    request_id: std::sync::Mutex<String>,
}

/// A request with the token attached, if any.
pub fn request<T>(ctx: &Ctx, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(Duration::from_secs(30));
    if let Some(token) = &ctx.token {
        if let Ok(value) = format!("Bearer {token}").parse() {
            req.metadata_mut().insert("authorization", value);
        }
    }
    let id = ctx.request_id.lock().expect("request id lock").clone();
    if let (false, Ok(value)) = (id.is_empty(), id.parse()) {
        req.metadata_mut().insert("x-weft-request-id", value);
    }
    req
}

impl Ctx {
    pub fn new(cli: &Cli) -> Self {
        Self {
            addrs: cli
                .addr
                .iter()
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect(),
            token: cli.token.clone(),
            ca_file: cli.ca_file.clone(),
            server_name: cli.tls_server_name.clone(),
            format: cli.format,
            stale: cli.stale,
            request_id: std::sync::Mutex::new(String::new()),
        }
    }

    pub fn read_options(&self) -> Option<ReadOptions> {
        Some(ReadOptions {
            stale: self.stale,
            ..Default::default()
        })
    }

    fn tls(&self) -> anyhow::Result<ClientTlsConfig> {
        let Some(path) = &self.ca_file else {
            bail!(
                "no CA to verify the servers with: pass --ca-file or set WEFT_CACERT \
                 (weft-server --dev prints it)"
            );
        };
        let pem = std::fs::read(path).with_context(|| format!("--ca-file {}", path.display()))?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(self.server_name.clone()))
    }

    /// Runs `call` against the servers in order until one answers.
    pub async fn call<T, F, Fut>(&self, call: F) -> anyhow::Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        if self.addrs.is_empty() {
            bail!("--addr: no server address given");
        }
        let tls = self.tls()?;
        *self.request_id.lock().expect("request id lock") = uuid::Uuid::new_v4().to_string();
        let mut last = String::new();
        for addr in &self.addrs {
            let endpoint = Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| anyhow!("--addr: `{addr}` is not HOST:PORT: {e}"))?
                .tls_config(tls.clone())
                .context("TLS settings")?
                .connect_timeout(Duration::from_secs(2));
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{addr}: {}", error_chain(&e));
                    continue;
                }
            };
            match call(channel).await {
                Ok(value) => return Ok(value),
                Err(status) if status.code() == Code::Unavailable => {
                    last = format!("{addr}: {}", status.message());
                }
                Err(status) => return Err(status_error(status)),
            }
        }
        bail!("no server answered (last: {last})")
    }
}

/// A server's refusal as a one-line error.
fn status_error(status: Status) -> anyhow::Error {
    let what = match status.code() {
        Code::InvalidArgument => "invalid",
        Code::NotFound => "not found",
        Code::FailedPrecondition => "refused",
        Code::DeadlineExceeded => "timed out",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission denied",
        _ => "error",
    };
    anyhow!("{what}: {}", status.message())
}

/// An error and its sources on one line (TLS failures hide the reason in
/// a source: "invalid peer certificate: ...").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
