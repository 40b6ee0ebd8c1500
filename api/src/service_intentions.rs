//! Consul's `service-intentions` config entry: every intention of one
//! destination in one document, the form Consul keeps intentions in.
//!
//! ```hcl
//! Kind = "service-intentions"
//! Name = "db"
//! Sources = [
//!   { Name = "web", Action = "allow" },
//!   { Name = "api", Permissions = [{ Action = "allow", HTTP = { PathPrefix = "/v1" } }] },
//!   { Name = "*", Action = "deny" },
//! ]
//! ```
//!
//! weft keeps intentions by (source, destination) pair, as its `intention`
//! commands and `/v1/connect/intentions` write them. An entry is a view of
//! those: writing one replaces every intention of its destination with its
//! `Sources` (in one Raft write), reading one gathers them, deleting one
//! deletes them. Keys are read as Consul reads them (any case, snake_case).
//! `Type` is `consul` or absent; `Precedence` is computed and, if given,
//! must be what it computes; `Meta`, peers, namespaces other than `default`
//! and the `Legacy*` fields are refused as not supported yet.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::consul_keys::{self, Schema};
use crate::file_format::{parse_document, FileFormat};
use crate::intention::{
    precedence, validate_intention, Intention, IntentionAction, IntentionError, Permission,
};

/// The entry's `Kind`.
pub const KIND: &str = "service-intentions";
/// Most sources in one entry.
pub const MAX_SOURCES: usize = 1000;

/// A `service-intentions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ServiceIntentions {
    pub kind: String,
    /// The destination service (or `*`).
    pub name: String,
    #[serde(default)]
    pub sources: Vec<SourceIntention>,
}

/// One source of a `service-intentions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct SourceIntention {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<IntentionAction>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<Permission>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, rename = "Type", skip_serializing_if = "Option::is_none")]
    pub source_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precedence: Option<u32>,
}

/// Why an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceIntentionsError {
    #[error("{0}")]
    Parse(String),
    #[error("{0}")]
    Keys(#[from] consul_keys::KeyError),
    #[error("Sources[{index}] ({source_name}): {error}")]
    Source {
        index: usize,
        source_name: String,
        error: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The keys the entry takes, in weft's spelling (and Consul's it refuses).
const KEYS: Schema = Schema {
    known: &[
        &[
            "Kind",
            "Name",
            "Sources",
            "Action",
            "Permissions",
            "Description",
            "Type",
            "Precedence",
        ],
        consul_keys::HTTP_MATCH,
        NOT_YET,
    ],
    user_keyed: &["Meta", "LegacyMeta"],
    tenancy: &["Namespace", "Partition"],
};

/// Consul's fields of this kind that weft does not take yet.
const NOT_YET: &[&str] = &[
    "Meta",
    "Peer",
    "SamenessGroup",
    "JWT",
    "LegacyID",
    "LegacyMeta",
];

/// Whether a parsed document is a `service-intentions` entry (its `Kind`,
/// however the key is spelled).
pub fn is_service_intentions(doc: &serde_json::Value) -> bool {
    doc.as_object().is_some_and(|m| {
        m.iter()
            .any(|(k, v)| consul_keys::fold(k) == "kind" && v.as_str() == Some(KIND))
    })
}

/// Reads an entry from a parsed document (see [`is_service_intentions`]).
pub fn from_document(
    mut doc: serde_json::Value,
) -> Result<ServiceIntentions, ServiceIntentionsError> {
    consul_keys::normalize(&mut doc, &KEYS)?;
    if let Some(map) = doc.as_object() {
        let mut present = map.keys().cloned().collect::<Vec<_>>();
        if let Some(sources) = map.get("Sources").and_then(|s| s.as_array()) {
            for s in sources.iter().filter_map(|s| s.as_object()) {
                present.extend(s.keys().cloned());
            }
        }
        if let Some(field) = present.iter().find(|k| NOT_YET.contains(&k.as_str())) {
            return Err(ServiceIntentionsError::Invalid(format!(
                "{field}: Consul's field, not supported by weft yet"
            )));
        }
    }
    serde_json::from_value(doc).map_err(|e| ServiceIntentionsError::Parse(e.to_string()))
}

/// Reads an entry from a file's text.
pub fn parse(text: &str, format: FileFormat) -> Result<ServiceIntentions, ServiceIntentionsError> {
    let doc: serde_json::Value =
        parse_document(text, format).map_err(|e| ServiceIntentionsError::Parse(e.to_string()))?;
    from_document(doc)
}

impl ServiceIntentions {
    /// The intentions the entry stands for, each checked as an intention
    /// written alone would be.
    pub fn to_intentions(&self) -> Result<Vec<Intention>, ServiceIntentionsError> {
        if self.kind != KIND {
            return Err(ServiceIntentionsError::Invalid(format!(
                "Kind: {:?}, not {KIND:?}",
                self.kind
            )));
        }
        if self.sources.len() > MAX_SOURCES {
            return Err(ServiceIntentionsError::Invalid(format!(
                "Sources: {} given, at most {MAX_SOURCES}",
                self.sources.len()
            )));
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(self.sources.len());
        for (index, s) in self.sources.iter().enumerate() {
            let fail = |error: String| ServiceIntentionsError::Source {
                index,
                source_name: s.name.clone(),
                error,
            };
            if !seen.insert(s.name.as_str()) {
                return Err(fail("named twice".into()));
            }
            if let Some(t) = s.source_type.as_deref().filter(|t| *t != "consul") {
                return Err(fail(format!("Type {t:?}: only \"consul\"")));
            }
            let computed = precedence(&s.name, &self.name);
            if let Some(p) = s.precedence.filter(|p| *p != computed) {
                return Err(fail(format!(
                    "Precedence {p}: it is computed, and is {computed} here"
                )));
            }
            let intention = Intention {
                source: s.name.clone(),
                destination: self.name.clone(),
                action: s.action,
                permissions: s.permissions.clone(),
                description: s.description.clone(),
                create_index: 0,
                modify_index: 0,
            };
            validate_intention(&intention).map_err(|e: IntentionError| fail(e.to_string()))?;
            out.push(intention);
        }
        Ok(out)
    }

    /// The entry that `intentions` (all of one destination) make, most
    /// precedent sources first.
    pub fn from_intentions(destination: &str, intentions: &[&Intention]) -> ServiceIntentions {
        let mut sources: Vec<SourceIntention> = intentions
            .iter()
            .map(|i| SourceIntention {
                name: i.source.clone(),
                action: i.action,
                permissions: i.permissions.clone(),
                description: i.description.clone(),
                source_type: Some("consul".into()),
                precedence: Some(precedence(&i.source, destination)),
            })
            .collect();
        sources.sort_by(|a, b| b.precedence.cmp(&a.precedence).then(a.name.cmp(&b.name)));
        ServiceIntentions {
            kind: KIND.into(),
            name: destination.into(),
            sources,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HCL: &str = r#"
Kind = "service-intentions"
Name = "db"
Sources = [
  {
    Name   = "web"
    Action = "allow"
  },
  {
    Name = "api"
    Permissions = [
      {
        Action = "allow"
        HTTP {
          PathPrefix = "/v1"
          Methods    = ["GET"]
        }
      }
    ]
  },
  {
    Name   = "*"
    Action = "deny"
  }
]
"#;

    #[test]
    fn consuls_example_becomes_one_intention_per_source() {
        let entry = parse(HCL, FileFormat::Hcl).unwrap();
        let intentions = entry.to_intentions().unwrap();
        let pairs: Vec<(&str, &str, Option<IntentionAction>, usize)> = intentions
            .iter()
            .map(|i| {
                (
                    i.source.as_str(),
                    i.destination.as_str(),
                    i.action,
                    i.permissions.len(),
                )
            })
            .collect();
        assert_eq!(
            pairs,
            [
                ("web", "db", Some(IntentionAction::Allow), 0),
                ("api", "db", None, 1),
                ("*", "db", Some(IntentionAction::Deny), 0),
            ]
        );
        // Back: most precedent first, precedence and type filled in.
        let refs: Vec<&Intention> = intentions.iter().collect();
        let back = ServiceIntentions::from_intentions("db", &refs);
        let names: Vec<(&str, Option<u32>)> = back
            .sources
            .iter()
            .map(|s| (s.name.as_str(), s.precedence))
            .collect();
        assert_eq!(names, [("api", Some(9)), ("web", Some(9)), ("*", Some(8))]);
        // And what it writes back reads the same.
        assert_eq!(back.to_intentions().unwrap().len(), 3);
    }

    #[test]
    fn keys_in_consuls_spellings_and_default_tenancy() {
        let doc = serde_json::json!({"kind": "service-intentions", "name": "db", "namespace": "default",
            "sources": [{"name": "web", "action": "allow", "type": "consul", "precedence": 9}]});
        assert!(is_service_intentions(&doc));
        let e = from_document(doc).unwrap();
        assert_eq!(e.to_intentions().unwrap()[0].source, "web");
        assert!(!is_service_intentions(
            &serde_json::json!({"Kind": "service-defaults"})
        ));
    }

    #[test]
    fn bad_and_unsupported_sources_are_named() {
        let err = |sources: serde_json::Value| -> String {
            let doc = serde_json::json!({"Kind": KIND, "Name": "db", "Sources": sources});
            match from_document(doc) {
                Err(e) => e.to_string(),
                Ok(e) => e.to_intentions().unwrap_err().to_string(),
            }
        };
        assert!(err(serde_json::json!([{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}]))
            .contains("named twice"));
        assert!(err(serde_json::json!([{"Name": "web"}])).starts_with("Sources[0] (web)"));
        assert!(
            err(serde_json::json!([{"Name": "web", "Action": "allow", "Type": "peer"}]))
                .contains("Type")
        );
        assert!(
            err(serde_json::json!([{"Name": "web", "Action": "allow", "Precedence": 5}]))
                .contains("computed")
        );
        assert!(
            err(serde_json::json!([{"Name": "web", "Action": "allow", "Peer": "other"}]))
                .contains("not supported by weft yet")
        );
        assert!(err(serde_json::json!([{"Name": "web", "Action": "maybe"}])).contains("maybe"));
        let meta =
            from_document(serde_json::json!({"Kind": KIND, "Name": "db", "Meta": {"a": "b"}}));
        assert!(meta.unwrap_err().to_string().contains("Meta"));
        let team =
            from_document(serde_json::json!({"Kind": KIND, "Name": "db", "Namespace": "team"}));
        assert!(team
            .unwrap_err()
            .to_string()
            .contains("not supported by weft yet"));
    }
}
