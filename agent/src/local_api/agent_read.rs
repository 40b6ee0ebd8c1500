//! The agent read endpoints (`GET /v1/agent/self`, `services`, `service/:id`,
//! `checks`, `members`): who may see what, asked of the servers through the
//! [`Judge`](super::authz::Judge), and the answers [`agent_views`] shapes.
//!
//! Every endpoint needs a token, as every weft API call does. `self` needs
//! `node:read` on this node (Consul's `agent:read`; weft has no agent rule);
//! `services` and `checks` list only the services the token has
//! `service:read` on (Consul filters them the same way); `service/:id` is
//! 404 for an unknown id and 403 without `service:read`; `members` reads the
//! servers' catalog with the caller's token.

use bytes::Bytes;
use http::{header, request::Parts, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::agent_views;
use super::authz::{JudgeError, Right};
use super::{text, token_of, LocalApiState};
use crate::config::AgentConfig;
use std::sync::Arc;

type Answer = Result<Response<Full<Bytes>>, Response<Full<Bytes>>>;

/// Largest server answer `members` reads (10,000 nodes take about 2 MB).
const MAX_MEMBERS_BYTES: usize = 32 << 20;

fn json(value: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The answer for a judge that gave no answer.
fn judge_failed(e: JudgeError) -> Response<Full<Bytes>> {
    match e {
        JudgeError::UnknownToken => text(StatusCode::FORBIDDEN, e.to_string()),
        JudgeError::Unreachable(_) => text(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        JudgeError::Failed(_) => text(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

#[allow(clippy::result_large_err)]
fn config(state: &LocalApiState) -> Result<Arc<AgentConfig>, Response<Full<Bytes>>> {
    state.current_config().ok_or_else(|| {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "agent endpoints are not served by this agent",
        )
    })
}

/// `GET /v1/agent/self`: `node:read` on this node.
pub async fn agent_self(state: &LocalApiState, parts: &Parts) -> Answer {
    let config = config(state)?;
    let token = token_of(parts, "reading the agent")?;
    let right = Right::node_read(&config.node_name);
    let allowed = state
        .rights(&token, std::slice::from_ref(&right))
        .await
        .map_err(judge_failed)?;
    if allowed != [true] {
        return Err(text(
            StatusCode::FORBIDDEN,
            format!("Permission denied: the token lacks {right}"),
        ));
    }
    Ok(json(&agent_views::agent_self(&config)))
}

/// The names of `names` the token may read (`service:read`), in one call.
async fn readable(
    state: &LocalApiState,
    token: &str,
    names: impl Iterator<Item = String>,
) -> Result<std::collections::BTreeSet<String>, Response<Full<Bytes>>> {
    let names: Vec<String> = names
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let rights: Vec<Right> = names.iter().map(|n| Right::service_read(n)).collect();
    let answers = state.rights(token, &rights).await.map_err(judge_failed)?;
    Ok(names
        .into_iter()
        .zip(answers)
        .filter(|(_, ok)| *ok)
        .map(|(n, _)| n)
        .collect())
}

/// `GET /v1/agent/services`: those the token may read, by id.
pub async fn agent_services(state: &LocalApiState, parts: &Parts) -> Answer {
    let config = config(state)?;
    let token = token_of(parts, "listing the agent's services")?;
    let names = config.services.iter().map(|s| s.name.clone());
    let visible = readable(state, &token, names).await?;
    Ok(json(&agent_views::services(&config, |s| {
        visible.contains(&s.name)
    })))
}

/// `GET /v1/agent/service/:id`.
pub async fn agent_service(state: &LocalApiState, parts: &Parts, id: &str) -> Answer {
    let config = config(state)?;
    let token = token_of(parts, "reading a service")?;
    let Some(service) = config.services.iter().find(|s| s.id == id) else {
        return Err(text(
            StatusCode::NOT_FOUND,
            format!("unknown service ID: {id}"),
        ));
    };
    let visible = readable(state, &token, std::iter::once(service.name.clone())).await?;
    if !visible.contains(&service.name) {
        return Err(text(
            StatusCode::FORBIDDEN,
            format!(
                "Permission denied: the token lacks {}",
                Right::service_read(&service.name)
            ),
        ));
    }
    Ok(json(&agent_views::service(&config, service)))
}

/// `GET /v1/agent/checks`: the checks of services the token may read.
pub async fn agent_checks(state: &LocalApiState, parts: &Parts) -> Answer {
    let config = config(state)?;
    let token = token_of(parts, "listing the agent's checks")?;
    let states = state.checks.states();
    let names = states.iter().map(|c| c.info.service_name.clone());
    let visible = readable(state, &token, names).await?;
    Ok(json(&agent_views::checks(&config, &states, |c| {
        visible.contains(&c.info.service_name)
    })))
}

/// GETs `path` from the servers with the caller's token: the decoded JSON,
/// or the server's refusal as it came.
async fn server_json<T: DeserializeOwned>(
    state: &LocalApiState,
    token: &str,
    path: &str,
) -> Result<T, Response<Full<Bytes>>> {
    let Some(forwarder) = &state.forwarder else {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this agent does not forward to the servers",
        ));
    };
    let mut req = Request::get(path);
    if let Ok(value) = header::HeaderValue::from_str(token) {
        req = req.header("x-consul-token", value);
    }
    let (parts, ()) = req
        .body(())
        .map_err(|e| text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .into_parts();
    let resp = forwarder
        .forward(&parts, Bytes::new())
        .await
        .map_err(|e| text(super::forward_status(&e), e.to_string()))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_MEMBERS_BYTES)
        .collect()
        .await
        .map_err(|e| {
            text(
                StatusCode::BAD_GATEWAY,
                format!("reading the servers' {path}: {e}"),
            )
        })?
        .to_bytes();
    if !status.is_success() {
        let why = String::from_utf8_lossy(&body);
        return Err(text(status, why.trim().trim_matches('"').to_string()));
    }
    serde_json::from_slice(&body)
        .map_err(|e| text(StatusCode::BAD_GATEWAY, format!("the servers' {path}: {e}")))
}

/// `GET /v1/agent/members`: the catalog's nodes as Consul's members.
pub async fn agent_members(state: &LocalApiState, parts: &Parts) -> Answer {
    let token = token_of(parts, "listing members")?;
    let nodes: Vec<agent_views::CatalogNode> =
        server_json(state, &token, "/v1/catalog/nodes").await?;
    let critical: Vec<agent_views::CriticalCheck> =
        server_json(state, &token, "/v1/health/state/critical").await?;
    Ok(json(&agent_views::members(&nodes, &critical)))
}
