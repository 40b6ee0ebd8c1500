//! Talking to the servers: each call goes to the first address that answers;
//! when a server is down (or has no leader to offer), the next one is tried.
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use weft_api::proto::ReadOptions;

use crate::{Cli, Format};

pub struct Ctx {
    addrs: Vec<String>,
    token: Option<String>,
    pub format: Format,
    pub stale: bool,
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
            format: cli.format,
            stale: cli.stale,
        }
    }

    pub fn read_options(&self) -> Option<ReadOptions> {
        Some(ReadOptions { stale: self.stale })
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
        let mut last = String::new();
        for addr in &self.addrs {
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| anyhow!("--addr: `{addr}` is not HOST:PORT: {e}"))?
                .connect_timeout(Duration::from_secs(2));
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{addr}: {e}");
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
        _ => "error",
    };
    anyhow!("{what}: {}", status.message())
}
