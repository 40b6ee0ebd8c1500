//! `weft check pass|warn|fail ID [--note TEXT]`: updates a TTL check through
//! the local agent's HTTP API (`PUT /v1/agent/check/<verb>/<ID>?note=…`,
//! Consul's shape), not through the servers. The agent (`--agent-addr`,
//! `WEFT_AGENT_ADDR`, default `127.0.0.1:8500`) asks the servers whether the
//! token (`--token`, `WEFT_TOKEN`, sent as `X-Consul-Token`) may write the
//! check's service.
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::Format;

/// How long the whole exchange with the agent may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
pub enum CheckCmd {
    /// Set a TTL check passing (and restart its TTL).
    Pass(Update),
    /// Set a TTL check warning (and restart its TTL).
    Warn(Update),
    /// Set a TTL check critical (and restart its TTL).
    Fail(Update),
}

#[derive(Args)]
pub struct Update {
    /// The check's id: its `id` in agent.toml, or `service:<service id>`
    /// (`service:<service id>:<n>` when the service has several checks).
    id: String,
    /// Text shown as the check's output.
    #[arg(long)]
    note: Option<String>,
    /// The local agent's HTTP API.
    #[arg(long, env = "WEFT_AGENT_ADDR", default_value = "127.0.0.1:8500")]
    agent_addr: String,
}

/// `%XX` for every byte but the unreserved ones (and `:` in paths).
fn encode(text: &str, keep_colon: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_colon && b == b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The request target for `verb` on check `id` with an optional note.
fn target(verb: &str, id: &str, note: Option<&str>) -> String {
    let mut t = format!("/v1/agent/check/{verb}/{}", encode(id, true));
    if let Some(note) = note {
        t.push_str("?note=");
        t.push_str(&encode(note, false));
    }
    t
}

/// The agent's API is plain HTTP on loopback: the token would travel in
/// clear text to any other address (and `WEFT_TOKEN` is often an
/// operator's).
fn on_loopback(addr: &str) -> anyhow::Result<()> {
    let loopback = match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().to_canonical().is_loopback(),
        Err(_) => addr
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
    };
    if !loopback {
        anyhow::bail!(
            "--agent-addr {addr:?}: the agent's local API is plain HTTP on loopback \
             (127.0.0.1:8500); the token is not sent to another address in clear text"
        );
    }
    Ok(())
}

/// The error for a refusal by the agent.
fn refusal(status: StatusCode, body: &str, has_token: bool) -> anyhow::Error {
    let body = body.trim();
    match status {
        StatusCode::FORBIDDEN if !has_token => {
            anyhow!("permission denied: {body} (set WEFT_TOKEN or pass --token-file)")
        }
        StatusCode::FORBIDDEN => anyhow!("permission denied: {body}"),
        StatusCode::NOT_FOUND => anyhow!("not found: {body}"),
        StatusCode::SERVICE_UNAVAILABLE => anyhow!("unavailable: {body}"),
        _ => anyhow!("the agent answered {status}: {body}"),
    }
}

pub async fn run(cmd: CheckCmd, token: Option<&str>, format: Format) -> anyhow::Result<()> {
    let (verb, status, u) = match cmd {
        CheckCmd::Pass(u) => ("pass", "passing", u),
        CheckCmd::Warn(u) => ("warn", "warning", u),
        CheckCmd::Fail(u) => ("fail", "critical", u),
    };
    let addr = u.agent_addr.trim();
    if token.is_some() {
        on_loopback(addr)?;
    }
    let path = target(verb, &u.id, u.note.as_deref());
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the agent's local API at {addr} \
                 (is weft-agent running on this host? see --agent-addr, WEFT_AGENT_ADDR)"
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with the agent")?;
        tokio::spawn(conn);
        let mut req = Request::put(&path).header(http::header::HOST, addr);
        if let Some(token) = token {
            req = req.header("X-Consul-Token", token);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|_| anyhow!("the token has characters a token cannot have"))?;
        let resp = sender
            .send_request(req)
            .await
            .context("request to the agent")?;
        let code = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((code, String::from_utf8_lossy(&body).into_owned()))
    };
    let (code, body) = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("the agent at {addr} did not answer within {TIMEOUT:?}"))??;
    if !code.is_success() {
        return Err(refusal(code, &body, token.is_some()));
    }
    match format {
        Format::Json => println!(
            "{}",
            json!({ "check": u.id, "status": status, "note": u.note.unwrap_or_default() })
        ),
        Format::Table => println!("check {}: {status}", u.id),
    }
    Ok(())
}

/// Checks that `id` looks like a check id before anything is sent.
pub fn validate(cmd: &CheckCmd) -> anyhow::Result<()> {
    let (CheckCmd::Pass(u) | CheckCmd::Warn(u) | CheckCmd::Fail(u)) = cmd;
    if u.id.is_empty() || u.id.contains('/') {
        bail!("check id {:?}: not empty, without '/'", u.id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_encoded() {
        assert_eq!(
            target("pass", "service:api", None),
            "/v1/agent/check/pass/service:api"
        );
        assert_eq!(
            target("warn", "a b", Some("slow & steady/ok?")),
            "/v1/agent/check/warn/a%20b?note=slow%20%26%20steady%2Fok%3F"
        );
        assert_eq!(
            target("fail", "x", Some("é")),
            "/v1/agent/check/fail/x?note=%C3%A9"
        );
    }

    #[test]
    fn the_token_goes_to_loopback_only() {
        for addr in [
            "127.0.0.1:8500",
            "[::1]:8500",
            "localhost:8500",
            "127.0.0.2:18500",
        ] {
            assert!(on_loopback(addr).is_ok(), "{addr}");
        }
        for addr in [
            "10.0.0.5:8500",
            "agent.example:8500",
            "0.0.0.0:8500",
            "[::]:8500",
        ] {
            let e = on_loopback(addr).unwrap_err().to_string();
            assert!(e.contains("clear text"), "{addr}: {e}");
        }
    }

    #[test]
    fn refusals_are_one_line_and_hint_at_the_token() {
        let e = refusal(
            StatusCode::FORBIDDEN,
            "Permission denied: no ACL token\n",
            false,
        );
        assert_eq!(
            e.to_string(),
            "permission denied: Permission denied: no ACL token (set WEFT_TOKEN or pass --token-file)"
        );
        let e = refusal(StatusCode::NOT_FOUND, "Unknown check ID \"x\"\n", true);
        assert_eq!(e.to_string(), "not found: Unknown check ID \"x\"");
        let e = refusal(StatusCode::BAD_REQUEST, "is a tcp check", true);
        assert!(e.to_string().starts_with("the agent answered 400"), "{e}");
    }
}
