//! Consul's `RequestHeaders` and `ResponseHeaders` of route destinations and
//! splits: headers to add (appended to those present), set (replacing them)
//! and remove, applied in Envoy's order (remove, then set, then add).
//! Values are literal: Envoy's `%VARIABLE%` substitutions are refused as not
//! supported, never sent as written. Headers that frame or route the message
//! (`Host`, `Content-Length`, `Transfer-Encoding`, hop-by-hop headers) cannot
//! be changed: rewriting them would desynchronize the parties that read the
//! message (request smuggling) or send it to another virtual host.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

/// At most this many headers in one modifier (add, set and remove together).
pub const MAX_HEADER_EDITS: usize = 64;

/// Headers no modifier may touch, in lower case.
const PROTECTED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// One set of header changes (`RequestHeaders` or `ResponseHeaders`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct HeaderModifiers {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Why a modifier was refused; the message starts with the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct HeaderEditError {
    pub field: String,
    pub reason: String,
}

fn refuse(field: String, reason: impl Into<String>) -> HeaderEditError {
    HeaderEditError {
        field,
        reason: reason.into(),
    }
}

fn check_name(field: String, name: &str) -> Result<HeaderName, HeaderEditError> {
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        refuse(
            field.clone(),
            format!("{name:?} is not a valid header name"),
        )
    })?;
    if PROTECTED.contains(&parsed.as_str()) {
        return Err(refuse(
            field,
            format!("{name:?} frames or routes the message and cannot be changed"),
        ));
    }
    Ok(parsed)
}

fn check_value(field: String, value: &str) -> Result<HeaderValue, HeaderEditError> {
    if value.contains('%') {
        return Err(refuse(
            field,
            format!(
                "{value:?}: Envoy's %VARIABLE% substitutions are not supported by weft yet \
                 (values are sent as written, so '%' is refused)"
            ),
        ));
    }
    HeaderValue::from_str(value)
        .map_err(|_| refuse(field, format!("{value:?} is not a valid header value")))
}

impl HeaderModifiers {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }

    /// Checks the modifier at write time; `field` is its path, e.g.
    /// `Routes[0].Destination.RequestHeaders`.
    pub fn validate(&self, field: &str) -> Result<(), HeaderEditError> {
        let count = self.add.len() + self.set.len() + self.remove.len();
        if count > MAX_HEADER_EDITS {
            return Err(refuse(
                field.to_string(),
                format!("too many headers ({count} > {MAX_HEADER_EDITS})"),
            ));
        }
        for (list, map) in [("Add", &self.add), ("Set", &self.set)] {
            for (name, value) in map {
                check_name(format!("{field}.{list}.{name}"), name)?;
                check_value(format!("{field}.{list}.{name}"), value)?;
            }
        }
        for (i, name) in self.remove.iter().enumerate() {
            check_name(format!("{field}.Remove[{i}]"), name)?;
        }
        Ok(())
    }

    /// Applies the changes to `headers`. Entries that do not validate are
    /// skipped (validation refuses them on write).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            if let Ok(name) = check_name(String::new(), name) {
                headers.remove(name);
            }
        }
        let valid = |(name, value): (&String, &String)| {
            Some((
                check_name(String::new(), name).ok()?,
                check_value(String::new(), value).ok()?,
            ))
        };
        for (name, value) in self.set.iter().filter_map(valid) {
            headers.insert(name, value);
        }
        for (name, value) in self.add.iter().filter_map(valid) {
            headers.append(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modifiers(add: &[(&str, &str)], set: &[(&str, &str)], remove: &[&str]) -> HeaderModifiers {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        HeaderModifiers {
            add: map(add),
            set: map(set),
            remove: remove.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn remove_then_set_then_add() {
        let mut headers = HeaderMap::new();
        headers.insert("x-version", HeaderValue::from_static("1"));
        headers.insert("x-debug", HeaderValue::from_static("on"));
        headers.insert("x-tag", HeaderValue::from_static("a"));
        modifiers(
            &[("x-tag", "b"), ("X-New", "n")],
            &[("x-version", "2"), ("x-debug", "kept")],
            &["X-Debug"],
        )
        .apply(&mut headers);
        assert_eq!(headers.get("x-version").unwrap(), "2");
        // Removed first, then set again: Envoy's order.
        assert_eq!(headers.get("x-debug").unwrap(), "kept");
        let tags: Vec<_> = headers.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"], "Add appends");
        assert_eq!(headers.get("x-new").unwrap(), "n");
    }

    #[test]
    fn framing_and_routing_headers_are_refused() {
        for name in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "connection",
            "TE",
        ] {
            let e = modifiers(&[], &[(name, "x")], &[])
                .validate("RequestHeaders")
                .unwrap_err();
            assert!(e.reason.contains("cannot be changed"), "{name}: {e}");
            let e = modifiers(&[], &[], &[name]).validate("R").unwrap_err();
            assert_eq!(e.field, "R.Remove[0]");
        }
        // Even if one got in, apply leaves it alone.
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("api"));
        modifiers(&[], &[("host", "evil")], &["host"]).apply(&mut headers);
        assert_eq!(headers.get("host").unwrap(), "api");
    }

    #[test]
    fn bad_names_values_and_envoy_variables_are_refused() {
        let e = modifiers(&[("bad name", "x")], &[], &[])
            .validate("ResponseHeaders")
            .unwrap_err();
        assert_eq!(e.field, "ResponseHeaders.Add.bad name");
        let e = modifiers(&[("x-a", "line\nbreak")], &[], &[])
            .validate("F")
            .unwrap_err();
        assert!(e.reason.contains("not a valid header value"), "{e}");
        let e = modifiers(&[], &[("x-ip", "%DOWNSTREAM_REMOTE_ADDRESS%")], &[])
            .validate("F")
            .unwrap_err();
        assert!(e.reason.contains("not supported by weft yet"), "{e}");
        let many: Vec<(String, String)> = (0..=MAX_HEADER_EDITS)
            .map(|i| (format!("x-{i}"), "v".into()))
            .collect();
        let m = HeaderModifiers {
            add: many.into_iter().collect(),
            ..Default::default()
        };
        assert!(m.validate("F").unwrap_err().reason.contains("too many"));
    }
}
