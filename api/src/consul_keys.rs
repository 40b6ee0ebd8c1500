//! JSON documents with keys spelled as Consul reads them: Consul decodes
//! with Go's `encoding/json` and mapstructure, which match keys
//! case-insensitively and take snake_case too (`service_subset`,
//! `check_id`). [`normalize`] rewrites a parsed document's keys to weft's
//! PascalCase spelling before serde decodes it with its exact names, except
//! the keys of maps that are the user's own (`Meta`, subset names).

use serde_json::{Map, Value};

/// The keys of an HTTP match (`HTTP` of routes and L7 intentions), which
/// several kinds take.
pub const HTTP_MATCH: &[&str] = &[
    "HTTP",
    "PathExact",
    "PathPrefix",
    "PathRegex",
    "Methods",
    "Header",
    "Present",
    "Exact",
    "Prefix",
    "Suffix",
    "Regex",
    "Invert",
    "QueryParam",
    "CaseInsensitive",
];

/// Which keys a document kind takes.
pub struct Schema {
    /// weft's spellings of every key the kind takes (several lists: a
    /// kind's own, and Consul's keys it refuses by name).
    pub known: &'static [&'static [&'static str]],
    /// Keys whose value is a map keyed by the user's names: those names
    /// are kept as written (their values are normalized).
    pub user_keyed: &'static [&'static str],
    /// Keys naming a tenancy (Namespace, Partition) of which weft has only
    /// `default`: dropped when `""` or `"default"`, refused otherwise.
    pub tenancy: &'static [&'static str],
}

/// Why a document's keys were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{0}: given twice (keys are read case-insensitively, as Consul reads them)")]
    Twice(String),
    #[error("{key} {value}: not supported by weft yet (only \"default\")")]
    Tenancy { key: String, value: String },
}

/// Whether `v` is a Go zero value (`null`, `false`, `0`, `""`, `[]`, `{}`):
/// what Go clients send for fields they leave unset, which Consul reads as
/// absent.
pub fn is_go_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// The folded form keys are compared in: lower case, no underscores.
pub fn fold(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// weft's spelling of `key`, if `schema` knows it.
fn canonical(key: &str, schema: &Schema) -> Option<&'static str> {
    let folded = fold(key);
    schema
        .known
        .iter()
        .flat_map(|list| list.iter())
        .chain(schema.tenancy)
        .find(|k| fold(k) == folded)
        .copied()
}

/// Rewrites `doc`'s keys to the spellings of `schema` and drops default
/// tenancy fields. Returns whether anything changed.
pub fn normalize(doc: &mut Value, schema: &Schema) -> Result<bool, KeyError> {
    let mut changed = false;
    walk(doc, schema, false, &mut changed)?;
    Ok(changed)
}

fn walk(
    value: &mut Value,
    schema: &Schema,
    user_keyed: bool,
    changed: &mut bool,
) -> Result<(), KeyError> {
    match value {
        Value::Array(items) => {
            for item in items {
                walk(item, schema, false, changed)?;
            }
            Ok(())
        }
        Value::Object(map) if user_keyed => {
            for v in map.values_mut() {
                walk(v, schema, false, changed)?;
            }
            Ok(())
        }
        Value::Object(map) => {
            let old = std::mem::take(map);
            let mut out = Map::with_capacity(old.len());
            for (key, mut v) in old {
                let name = canonical(&key, schema);
                let spelled = name.map_or(key.clone(), str::to_string);
                *changed |= spelled != key;
                if schema.tenancy.contains(&spelled.as_str()) {
                    match v.as_str() {
                        Some("" | "default") => {
                            *changed = true;
                            continue;
                        }
                        _ => {
                            return Err(KeyError::Tenancy {
                                key: spelled,
                                value: v.to_string(),
                            })
                        }
                    }
                }
                walk(
                    &mut v,
                    schema,
                    schema.user_keyed.contains(&spelled.as_str()),
                    changed,
                )?;
                if out.insert(spelled.clone(), v).is_some() {
                    return Err(KeyError::Twice(spelled));
                }
            }
            *map = out;
            Ok(())
        }
        _ => Ok(()),
    }
}
