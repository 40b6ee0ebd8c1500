//! The web UI's static files, embedded in the binary (no CDN, no external
//! fonts: it works offline). They carry no secret and are served without a
//! token, as Consul serves its UI; every call the UI then makes needs one.
//! Pages are sent with a Content-Security-Policy that allows only this
//! origin's script and style (no inline script, no framing).
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};

use super::{Answer, Call, HttpError};

const INDEX: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

const CSP: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

/// `/ui/…`: `index.html` for the UI's own paths, `app.js`, `app.css`; `/`
/// and `/ui` redirect to `/ui/`.
pub fn asset(call: &Call) -> Answer {
    if call.method != Method::GET && call.method != Method::HEAD {
        return Err(HttpError::method_not_allowed());
    }
    let path = call.path.as_str();
    if path == "/" || path == "/ui" {
        return Ok(Response::builder()
            .status(StatusCode::FOUND)
            .header("location", "/ui/")
            .body(Full::new(Bytes::new()))
            .expect("a static response"));
    }
    let (body, content_type) = match path {
        "/ui/" | "/ui/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/ui/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/ui/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return Err(HttpError::not_found()),
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .header("content-security-policy", CSP)
        // Small files: revalidating each load keeps a new build's UI in step
        // with its API.
        .header("cache-control", "no-cache")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a static response"))
}
