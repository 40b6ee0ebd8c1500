//! Pure request decoding for the local API: which [`Route`] a method and path
//! name (an agent endpoint served here, or [`Route::Forward`] to the
//! servers), the token a request carries, the query's `note`, and the JSON
//! body of `/v1/agent/check/update/:id`. No I/O: unit-tested on strings and
//! headers.

use http::{HeaderMap, Method};
use serde::Deserialize;
use weft_api::catalog::HealthStatus;

/// Longest token accepted; anything longer is no token a server made.
pub const MAX_TOKEN_BYTES: usize = 256;

/// What a request asks for. New endpoints (service registration, …) are new
/// variants here and a new arm in [`route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `PUT /v1/agent/check/{pass,warn,fail,update}/:check_id`.
    CheckUpdate { check_id: String, op: CheckOp },
    /// `PUT /v1/agent/check/register` (the check in the JSON body).
    CheckRegister,
    /// `PUT /v1/agent/check/deregister/:check_id`.
    CheckDeregister { check_id: String },
    /// `GET /v1/agent/connect/ca/leaf/:service`.
    ConnectLeaf { service: String },
    /// `PUT /v1/agent/service/register` (the service in the JSON body).
    ServiceRegister,
    /// `PUT /v1/agent/service/deregister/:service_id`.
    ServiceDeregister { service_id: String },
    /// `GET /v1/agent/self`.
    AgentSelf,
    /// `GET /v1/agent/services`.
    AgentServices,
    /// `GET /v1/agent/service/:service_id`.
    AgentService { service_id: String },
    /// `GET /v1/agent/checks`.
    AgentChecks,
    /// `GET /v1/agent/members`.
    AgentMembers,
    /// Any other `/v1/` request that is not under `/v1/agent/`: the servers'
    /// HTTPS API answers it.
    Forward,
}

/// How a TTL check is updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOp {
    Pass,
    Warn,
    Fail,
    /// Status and output from the JSON body.
    Update,
}

impl CheckOp {
    /// The status `pass`, `warn` and `fail` set; `None` for `update`.
    pub fn status(self) -> Option<HealthStatus> {
        match self {
            CheckOp::Pass => Some(HealthStatus::Passing),
            CheckOp::Warn => Some(HealthStatus::Warning),
            CheckOp::Fail => Some(HealthStatus::Critical),
            CheckOp::Update => None,
        }
    }
}

/// Why a request names no route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// An agent endpoint of Consul's that weft's agent does not serve.
    #[error("{0}: not supported by weft yet (weft's agent serves /v1/agent/self, services, service/:id, checks, members, service/register, service/deregister/:id, check/register, check/deregister/:id, check/{{pass,warn,fail,update}}/:id and connect/ca/leaf/:service)")]
    NotSupported(String),
    /// The path exists; the method is not `allow`.
    #[error("method {method} not allowed on {path} (use {allow})")]
    MethodNotAllowed {
        method: Method,
        path: String,
        allow: &'static str,
    },
    #[error("{0}")]
    BadRequest(String),
}

/// Only `GET` (and `HEAD`, which hyper answers without the body).
fn get_only(method: &Method, path: &str, route: Route) -> Result<Route, RouteError> {
    if method == Method::GET || method == Method::HEAD {
        Ok(route)
    } else {
        Err(RouteError::MethodNotAllowed {
            method: method.clone(),
            path: path.to_string(),
            allow: "GET",
        })
    }
}

/// Only `PUT`.
fn put_only(method: &Method, path: &str, route: Route) -> Result<Route, RouteError> {
    if method == Method::PUT {
        Ok(route)
    } else {
        Err(RouteError::MethodNotAllowed {
            method: method.clone(),
            path: path.to_string(),
            allow: "PUT",
        })
    }
}

/// The route of `method path` (the path without its query).
pub fn route(method: &Method, path: &str) -> Result<Route, RouteError> {
    if path == "/v1/agent" || path.starts_with("/v1/agent/") {
        return agent_route(method, path);
    }
    if !path.starts_with("/v1/") {
        return Err(RouteError::NotFound(path.to_string()));
    }
    // Dot segments would name another path on the servers than here.
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(RouteError::BadRequest(format!(
            "{path}: dot segments are not forwarded"
        )));
    }
    Ok(Route::Forward)
}

/// Everything under `/v1/agent/`: served here or not at all.
fn agent_route(method: &Method, path: &str) -> Result<Route, RouteError> {
    match path {
        "/v1/agent/self" => return get_only(method, path, Route::AgentSelf),
        "/v1/agent/services" => return get_only(method, path, Route::AgentServices),
        "/v1/agent/checks" => return get_only(method, path, Route::AgentChecks),
        "/v1/agent/members" => return get_only(method, path, Route::AgentMembers),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1/agent/service/") {
        return service_route(method, path, rest);
    }
    if let Some(raw) = path.strip_prefix("/v1/agent/connect/ca/leaf/") {
        let service = percent_decode(raw, false)
            .filter(|s| !s.is_empty() && !s.contains('/'))
            .ok_or_else(|| RouteError::BadRequest(format!("{raw:?}: not a service name")))?;
        return get_only(method, path, Route::ConnectLeaf { service });
    }
    let Some(rest) = path.strip_prefix("/v1/agent/check/") else {
        return Err(RouteError::NotSupported(path.to_string()));
    };
    if rest == "register" {
        return put_only(method, path, Route::CheckRegister);
    }
    let (verb, raw_id) = rest
        .split_once('/')
        .ok_or_else(|| RouteError::NotSupported(path.to_string()))?;
    let op = match verb {
        "deregister" => {
            let check_id = percent_decode(raw_id, false)
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .ok_or_else(|| RouteError::BadRequest(format!("{raw_id:?}: not a check id")))?;
            return put_only(method, path, Route::CheckDeregister { check_id });
        }
        "pass" => CheckOp::Pass,
        "warn" => CheckOp::Warn,
        "fail" => CheckOp::Fail,
        "update" => CheckOp::Update,
        _ => return Err(RouteError::NotSupported(path.to_string())),
    };
    if raw_id.is_empty() {
        return Err(RouteError::BadRequest(format!(
            "{path}: missing check id (e.g. /v1/agent/check/{verb}/service:web)"
        )));
    }
    if method != Method::PUT {
        return Err(RouteError::MethodNotAllowed {
            method: method.clone(),
            path: path.to_string(),
            allow: "PUT",
        });
    }
    let check_id = percent_decode(raw_id, false)
        .filter(|id| !id.contains('/'))
        .ok_or_else(|| RouteError::BadRequest(format!("{raw_id:?}: not a check id")))?;
    Ok(Route::CheckUpdate { check_id, op })
}

/// `/v1/agent/service/register`, `/v1/agent/service/deregister/:id` and
/// `GET /v1/agent/service/:id` (a service called `register` is not read).
fn service_route(method: &Method, path: &str, rest: &str) -> Result<Route, RouteError> {
    let service_id = |raw_id: &str| {
        percent_decode(raw_id, false)
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .ok_or_else(|| RouteError::BadRequest(format!("{raw_id:?}: not a service id")))
    };
    let route = match rest.split_once('/') {
        None if rest == "register" => Route::ServiceRegister,
        Some(("deregister", raw_id)) => Route::ServiceDeregister {
            service_id: service_id(raw_id)?,
        },
        None if !rest.is_empty() => {
            return get_only(
                method,
                path,
                Route::AgentService {
                    service_id: service_id(rest)?,
                },
            )
        }
        _ => return Err(RouteError::NotSupported(path.to_string())),
    };
    if method != Method::PUT {
        return Err(RouteError::MethodNotAllowed {
            method: method.clone(),
            path: path.to_string(),
            allow: "PUT",
        });
    }
    Ok(route)
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`, as in a
/// query); `None` when an escape is broken or the result is not UTF-8.
pub fn percent_decode(text: &str, plus_is_space: bool) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The first value of query parameter `name`, decoded; `Err` when it is
/// malformed.
pub fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, RouteError> {
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return percent_decode(value, true).map(Some).ok_or_else(|| {
                RouteError::BadRequest(format!("query parameter {name:?} is not valid UTF-8"))
            });
        }
    }
    Ok(None)
}

/// The token a request carries, as Consul looks for it: `X-Consul-Token`,
/// then `Authorization: Bearer`, then `?token=`. `Ok(None)`: no token at
/// all; `Err`: one that cannot be a token (not printable ASCII, too long).
/// The message never contains the token.
pub fn token(headers: &HeaderMap, query: Option<&str>) -> Result<Option<String>, RouteError> {
    let bad = || RouteError::BadRequest("malformed ACL token".into());
    let from_header = if let Some(v) = headers.get("x-consul-token") {
        Some(v.to_str().map_err(|_| bad())?.to_string())
    } else if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| bad())?;
        let secret = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .ok_or_else(|| {
                RouteError::BadRequest("Authorization: want \"Bearer <token>\"".into())
            })?;
        Some(secret.to_string())
    } else {
        None
    };
    let token = match from_header {
        Some(t) => Some(t),
        None => query_param(query, "token").map_err(|_| bad())?,
    };
    let Some(token) = token.map(|t| t.trim().to_string()) else {
        return Ok(None);
    };
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > MAX_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(token))
}

/// The body of `/v1/agent/check/update/:id`, in Consul's shape.
#[derive(Debug, Deserialize)]
struct UpdateBody {
    #[serde(rename = "Status")]
    status: String,
    #[serde(rename = "Output", default)]
    output: String,
}

/// The status and output of an update body.
pub fn update_body(body: &[u8]) -> Result<(HealthStatus, String), RouteError> {
    let parsed: UpdateBody = serde_json::from_slice(body).map_err(|e| {
        RouteError::BadRequest(format!(
            "body: want {{\"Status\": \"passing|warning|critical\", \"Output\": \"...\"}}: {e}"
        ))
    })?;
    let status = match parsed.status.as_str() {
        "passing" => HealthStatus::Passing,
        "warning" => HealthStatus::Warning,
        "critical" => HealthStatus::Critical,
        other => {
            return Err(RouteError::BadRequest(format!(
                "Status {other:?}: want \"passing\", \"warning\" or \"critical\""
            )))
        }
    };
    Ok((status, parsed.output))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn service_registration_routes() {
        assert_eq!(
            route(&Method::PUT, "/v1/agent/service/register"),
            Ok(Route::ServiceRegister)
        );
        assert_eq!(
            route(&Method::PUT, "/v1/agent/service/deregister/db%2D1"),
            Ok(Route::ServiceDeregister {
                service_id: "db-1".into()
            })
        );
        assert!(matches!(
            route(&Method::GET, "/v1/agent/service/register"),
            Err(RouteError::MethodNotAllowed { .. })
        ));
        for bad in [
            "/v1/agent/service/deregister/",
            "/v1/agent/service/deregister/a%2Fb",
        ] {
            assert!(
                matches!(route(&Method::PUT, bad), Err(RouteError::BadRequest(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            route(&Method::PUT, "/v1/agent/service/registerx"),
            Err(RouteError::MethodNotAllowed { allow: "GET", .. })
        ));
        assert!(matches!(
            route(&Method::PUT, "/v1/agent/service/maintenance/x"),
            Err(RouteError::NotSupported(_))
        ));
    }

    #[test]
    fn check_registration_and_leaf_routes() {
        assert_eq!(
            route(&Method::PUT, "/v1/agent/check/register"),
            Ok(Route::CheckRegister)
        );
        assert_eq!(
            route(&Method::PUT, "/v1/agent/check/deregister/service%3Adb"),
            Ok(Route::CheckDeregister {
                check_id: "service:db".into()
            })
        );
        assert_eq!(
            route(&Method::GET, "/v1/agent/connect/ca/leaf/web"),
            Ok(Route::ConnectLeaf {
                service: "web".into()
            })
        );
        for (method, path, allow) in [
            (Method::GET, "/v1/agent/check/register", "PUT"),
            (Method::DELETE, "/v1/agent/check/deregister/x", "PUT"),
            (Method::PUT, "/v1/agent/connect/ca/leaf/web", "GET"),
        ] {
            match route(&method, path) {
                Err(RouteError::MethodNotAllowed { allow: a, .. }) => assert_eq!(a, allow),
                other => panic!("{path}: {other:?}"),
            }
        }
        for bad in [
            "/v1/agent/check/deregister/",
            "/v1/agent/check/deregister/a%2Fb",
            "/v1/agent/connect/ca/leaf/",
            "/v1/agent/connect/ca/leaf/a%2Fb",
        ] {
            let method = if bad.contains("leaf") {
                Method::GET
            } else {
                Method::PUT
            };
            assert!(
                matches!(route(&method, bad), Err(RouteError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn agent_read_routes() {
        for (path, want) in [
            ("/v1/agent/self", Route::AgentSelf),
            ("/v1/agent/services", Route::AgentServices),
            ("/v1/agent/checks", Route::AgentChecks),
            ("/v1/agent/members", Route::AgentMembers),
            (
                "/v1/agent/service/web%2D1",
                Route::AgentService {
                    service_id: "web-1".into(),
                },
            ),
        ] {
            assert_eq!(route(&Method::GET, path), Ok(want.clone()), "{path}");
            assert_eq!(route(&Method::HEAD, path), Ok(want), "{path}");
            assert!(
                matches!(
                    route(&Method::PUT, path),
                    Err(RouteError::MethodNotAllowed { allow: "GET", .. })
                ),
                "{path}"
            );
        }
        assert!(matches!(
            route(&Method::GET, "/v1/agent/service/a%2Fb"),
            Err(RouteError::BadRequest(_))
        ));
    }

    #[test]
    fn unserved_agent_endpoints_and_forwarding() {
        for path in [
            "/v1/agent",
            "/v1/agent/",
            "/v1/agent/join/10.0.0.1",
            "/v1/agent/check/maintenance/x",
            "/v1/agent/services/x",
            "/v1/agent/connect/ca/roots",
        ] {
            let e = route(&Method::PUT, path).unwrap_err();
            assert!(matches!(e, RouteError::NotSupported(_)), "{path}: {e:?}");
            assert!(e.to_string().contains("not supported by weft yet"), "{e}");
        }
        for (method, path) in [
            (Method::GET, "/v1/catalog/services"),
            (Method::GET, "/v1/health/service/web"),
            (Method::PUT, "/v1/kv/a/b"),
            (Method::DELETE, "/v1/kv/a"),
            (Method::PUT, "/v1/session/create"),
            (Method::GET, "/v1/connect/ca/roots"),
            (Method::GET, "/v1/config/service-defaults/web"),
            (Method::GET, "/v1/acl/token/self"),
            (Method::GET, "/v1/status/leader"),
            (Method::GET, "/v1/agentx"),
        ] {
            assert_eq!(route(&method, path), Ok(Route::Forward), "{path}");
        }
        for path in ["/", "/ui/", "/metrics", "/v1", "/v2/catalog"] {
            assert!(
                matches!(route(&Method::GET, path), Err(RouteError::NotFound(_))),
                "{path}"
            );
        }
        for path in ["/v1/kv/../../metrics", "/v1/./catalog/nodes"] {
            assert!(
                matches!(route(&Method::GET, path), Err(RouteError::BadRequest(_))),
                "{path}"
            );
        }
    }

    #[test]
    fn routes() {
        for (verb, op) in [
            ("pass", CheckOp::Pass),
            ("warn", CheckOp::Warn),
            ("fail", CheckOp::Fail),
            ("update", CheckOp::Update),
        ] {
            assert_eq!(
                route(&Method::PUT, &format!("/v1/agent/check/{verb}/service:api")),
                Ok(Route::CheckUpdate {
                    check_id: "service:api".into(),
                    op
                })
            );
        }
        assert_eq!(
            route(&Method::PUT, "/v1/agent/check/pass/service%3Aapi%3A2"),
            Ok(Route::CheckUpdate {
                check_id: "service:api:2".into(),
                op: CheckOp::Pass
            })
        );
        assert!(matches!(
            route(&Method::PUT, "/"),
            Err(RouteError::NotFound(_))
        ));
        for path in [
            "/v1/agent/check",
            "/v1/agent/check/pass",
            "/v1/agent/check/ok/x",
        ] {
            assert!(
                matches!(
                    route(&Method::PUT, path),
                    Err(RouteError::NotFound(_) | RouteError::NotSupported(_))
                ),
                "{path}"
            );
        }
        assert!(matches!(
            route(&Method::PUT, "/v1/agent/check/pass/"),
            Err(RouteError::BadRequest(_))
        ));
        for bad in ["a/b", "a%2Fb", "%zz", "%c3"] {
            assert!(
                matches!(
                    route(&Method::PUT, &format!("/v1/agent/check/pass/{bad}")),
                    Err(RouteError::BadRequest(_))
                ),
                "{bad}"
            );
        }
        let e = route(&Method::GET, "/v1/agent/check/pass/x").unwrap_err();
        assert!(matches!(
            e,
            RouteError::MethodNotAllowed { allow: "PUT", .. }
        ));
        assert_eq!(
            e.to_string(),
            "method GET not allowed on /v1/agent/check/pass/x (use PUT)"
        );
        // Consul's agent answers POST with 405 too.
        assert!(matches!(
            route(&Method::POST, "/v1/agent/check/update/x"),
            Err(RouteError::MethodNotAllowed { .. })
        ));
    }

    #[test]
    fn decoding_and_query() {
        assert_eq!(percent_decode("a%20b+c", true).unwrap(), "a b c");
        assert_eq!(percent_decode("a%20b+c", false).unwrap(), "a b+c");
        assert_eq!(percent_decode("%C3%A9", false).unwrap(), "é");
        assert_eq!(percent_decode("%4", false), None);
        assert_eq!(
            query_param(Some("x=1&note=all+good%21"), "note").unwrap(),
            Some("all good!".into())
        );
        assert_eq!(query_param(Some("note"), "note").unwrap(), Some("".into()));
        assert_eq!(query_param(None, "note").unwrap(), None);
        assert_eq!(query_param(Some("notes=x"), "note").unwrap(), None);
        assert!(query_param(Some("note=%ff"), "note").is_err());
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn tokens_in_consuls_order() {
        let none = HeaderMap::new();
        assert_eq!(token(&none, None).unwrap(), None);
        assert_eq!(token(&none, Some("note=x")).unwrap(), None);
        assert_eq!(token(&none, Some("token=")).unwrap(), None);
        assert_eq!(
            token(&none, Some("note=x&token=q-1")).unwrap(),
            Some("q-1".into())
        );
        let bearer = headers(&[("authorization", "Bearer b-1")]);
        assert_eq!(
            token(&bearer, Some("token=q-1")).unwrap(),
            Some("b-1".into())
        );
        let both = headers(&[("authorization", "Bearer b-1"), ("x-consul-token", "x-1")]);
        assert_eq!(token(&both, Some("token=q-1")).unwrap(), Some("x-1".into()));
        let basic = headers(&[("authorization", "Basic dXNlcg==")]);
        assert!(token(&basic, None).is_err());
        let long = "t".repeat(MAX_TOKEN_BYTES + 1);
        let e = token(&headers(&[("x-consul-token", &long)]), None).unwrap_err();
        assert!(!e.to_string().contains(&long));
        assert!(token(&none, Some("token=a%20b")).is_err());
    }

    #[test]
    fn update_bodies() {
        assert_eq!(
            update_body(br#"{"Status":"warning","Output":"slow"}"#).unwrap(),
            (HealthStatus::Warning, "slow".into())
        );
        assert_eq!(
            update_body(br#"{"Status":"passing"}"#).unwrap(),
            (HealthStatus::Passing, String::new())
        );
        for bad in [
            &br#"{"Status":"ok"}"#[..],
            br#"{"Output":"x"}"#,
            b"not json",
            b"",
        ] {
            assert!(
                matches!(update_body(bad), Err(RouteError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }
}
