//! ACLs as the servers keep them: policies (named rules in Consul's rule
//! language, see `weft_api::acl`), tokens that link policies and node or
//! service identities, and the resolution of a presented secret to an
//! [`Authorizer`].
//!
//! A token's secret is never stored: the replicated state holds its SHA-256,
//! and the secret is shown once, in the answer that created it. Tokens are
//! named everywhere else (logs, lists, reads) by their accessor id. Rules
//! are parsed once, when a policy is written or the state is loaded, never
//! per request.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_api::acl::{node_identity_rules, parse_rules, service_identity_rules, Authorizer, Rules};
use weft_api::names::validate_name;

/// The id of the built-in policy that grants everything; bootstrap links it
/// to the first token.
pub const GLOBAL_MANAGEMENT_ID: &str = "00000000-0000-0000-0000-000000000001";
pub const GLOBAL_MANAGEMENT_NAME: &str = "global-management";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AclError {
    #[error("{0}")]
    Invalid(String),
    #[error("ACLs are already bootstrapped")]
    AlreadyBootstrapped,
    #[error("policy {0:?} not found")]
    PolicyNotFound(String),
    #[error("token {0:?} not found")]
    TokenNotFound(String),
    #[error("the {GLOBAL_MANAGEMENT_NAME} policy cannot be changed or deleted")]
    BuiltinPolicy,
    #[error("{0} is the primary datacenter's, replicated here: change it there")]
    Replicated(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AclPolicy {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The rules as written (HCL or JSON); parsed into `compiled` on load.
    pub rules: String,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
    /// Copied from the primary datacenter (a secondary's copy is not
    /// changed here).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replicated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node_name: String,
    pub datacenter: String,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AclToken {
    pub accessor_id: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    #[serde(default)]
    pub description: String,
    /// Ids of linked policies.
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub service_identities: Vec<String>,
    #[serde(default)]
    pub node_identities: Vec<NodeIdentity>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
    /// Copied from the primary datacenter.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replicated: bool,
}

impl std::fmt::Debug for AclToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AclToken")
            .field("accessor_id", &self.accessor_id)
            .field("policies", &self.policies)
            .field("service_identities", &self.service_identities)
            .field("node_identities", &self.node_identities)
            .finish_non_exhaustive()
    }
}

/// The stored form of [`AclState`] (what snapshots and the state carry).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct StoredAcl {
    bootstrapped: bool,
    policies: BTreeMap<String, AclPolicy>,
    tokens: BTreeMap<String, AclToken>,
}

/// Policies and tokens, with the indexes built from them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredAcl", into = "StoredAcl")]
pub struct AclState {
    pub bootstrapped: bool,
    /// By id.
    pub policies: BTreeMap<String, AclPolicy>,
    /// By accessor id.
    pub tokens: BTreeMap<String, AclToken>,
    /// Parsed rules by policy id.
    compiled: BTreeMap<String, Rules>,
    /// Accessor id by secret hash.
    by_hash: BTreeMap<String, String>,
}

impl From<StoredAcl> for AclState {
    fn from(s: StoredAcl) -> Self {
        let mut acl = AclState {
            bootstrapped: s.bootstrapped,
            policies: s.policies,
            tokens: s.tokens,
            ..Default::default()
        };
        acl.reindex();
        acl
    }
}

impl From<AclState> for StoredAcl {
    fn from(a: AclState) -> Self {
        StoredAcl {
            bootstrapped: a.bootstrapped,
            policies: a.policies,
            tokens: a.tokens,
        }
    }
}

/// A token secret on its way to the one who asked for it; shows itself in
/// no log or debug output.
pub struct Secret(String);

impl Secret {
    /// A new random secret.
    pub fn generate() -> Self {
        Secret(new_id())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> String {
        hash_secret(&self.0)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Hex SHA-256 of a token secret: what the state keeps instead of it.
pub fn hash_secret(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random id (accessor ids, secrets, policy ids): a UUID v4.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The built-in policy that grants everything.
pub fn global_management_policy(index: u64) -> AclPolicy {
    AclPolicy {
        id: GLOBAL_MANAGEMENT_ID.into(),
        name: GLOBAL_MANAGEMENT_NAME.into(),
        description: "Builtin Policy that grants unlimited access".into(),
        rules: r#"acl = "write"
operator = "write"
mesh = "write"
service_prefix "" {
  policy = "write"
  intentions = "write"
}
node_prefix "" { policy = "write" }
key_prefix "" { policy = "write" }
"#
        .into(),
        create_index: index,
        modify_index: index,
        replicated: false,
    }
}

/// Checks a policy's name and rules; returns the parsed rules.
pub fn validate_policy(p: &AclPolicy) -> Result<Rules, AclError> {
    validate_policy_name(&p.name)?;
    parse_rules(&p.rules).map_err(|e| AclError::Invalid(format!("policy {:?}: {e}", p.name)))
}

fn validate_policy_name(name: &str) -> Result<(), AclError> {
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err(AclError::Invalid(format!(
            "policy name {name:?}: looks like a policy id; ids and names must not be confused"
        )));
    }
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(AclError::Invalid(format!(
            "policy name {name:?}: 1 to 128 letters, digits, '-' or '_'"
        )))
    }
}

impl AclState {
    fn reindex(&mut self) {
        self.compiled = self
            .policies
            .iter()
            .filter_map(|(id, p)| match parse_rules(&p.rules) {
                Ok(rules) => Some((id.clone(), rules)),
                Err(e) => {
                    // Written policies were checked; a stored one that no
                    // longer parses grants nothing rather than everything.
                    tracing::error!(policy = %p.name, "stored ACL policy does not parse: {e}");
                    None
                }
            })
            .collect();
        self.by_hash = self
            .tokens
            .values()
            .map(|t| (t.secret_hash.clone(), t.accessor_id.clone()))
            .collect();
    }

    /// The token a secret stands for.
    pub fn token_by_secret(&self, secret: &str) -> Option<&AclToken> {
        let accessor = self.by_hash.get(&hash_secret(secret))?;
        self.tokens.get(accessor)
    }

    /// A policy by id or by name.
    pub fn policy(&self, id_or_name: &str) -> Option<&AclPolicy> {
        self.policies
            .get(id_or_name)
            .or_else(|| self.policies.values().find(|p| p.name == id_or_name))
    }

    /// A fingerprint of what `token` may do: a SHA-256 over what decides
    /// it (the token's secret hash, linked policies that exist with their
    /// rules, service and node identities). Made of content, not indexes,
    /// so that a rewrite that changes nothing (a secondary's replication)
    /// keeps it, and every server computes the same whatever version
    /// applied the entries before.
    pub fn rights_epoch(&self, token: &AclToken) -> u64 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut put = |field: &str| {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(field.as_bytes());
        };
        put(&token.secret_hash);
        for id in &token.policies {
            if let Some(p) = self.policies.get(id) {
                put(id);
                put(&p.rules);
            }
        }
        put("service identities");
        token.service_identities.iter().for_each(|s| put(s));
        put("node identities");
        for n in &token.node_identities {
            put(&n.node_name);
            put(&n.datacenter);
        }
        let digest = ctx.finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        u64::from_be_bytes(first)
    }

    /// What `token` may do in `datacenter` (node identities of other
    /// datacenters grant nothing there).
    pub fn authorizer(&self, token: &AclToken, datacenter: &str) -> Authorizer {
        if token
            .policies
            .iter()
            .any(|p| p.as_str() == GLOBAL_MANAGEMENT_ID)
        {
            return Authorizer::management();
        }
        let identities: Vec<Rules> = token
            .node_identities
            .iter()
            .filter(|n| n.datacenter == datacenter)
            .map(|n| node_identity_rules(&n.node_name))
            .chain(
                token
                    .service_identities
                    .iter()
                    .map(|s| service_identity_rules(s)),
            )
            .collect();
        let linked = token.policies.iter().filter_map(|id| self.compiled.get(id));
        Authorizer::from_rules(linked.chain(identities.iter()))
    }

    pub fn bootstrap(&mut self, token: AclToken, index: u64) -> Result<(), AclError> {
        if self.bootstrapped {
            return Err(AclError::AlreadyBootstrapped);
        }
        let policy = global_management_policy(index);
        self.policies.insert(policy.id.clone(), policy);
        self.bootstrapped = true;
        self.insert_token(token, index)?;
        Ok(())
    }

    pub fn upsert_policy(&mut self, mut p: AclPolicy, index: u64) -> Result<(), AclError> {
        if p.id == GLOBAL_MANAGEMENT_ID {
            return Err(AclError::BuiltinPolicy);
        }
        self.not_replicated_policy(&p.id)?;
        p.replicated = false;
        validate_policy(&p)?;
        if let Some(other) = self
            .policies
            .values()
            .find(|o| o.name == p.name && o.id != p.id)
        {
            return Err(AclError::Invalid(format!(
                "a policy named {:?} exists already (id {})",
                p.name, other.id
            )));
        }
        p.create_index = self.policies.get(&p.id).map_or(index, |o| o.create_index);
        p.modify_index = index;
        self.policies.insert(p.id.clone(), p);
        self.reindex();
        Ok(())
    }

    pub fn delete_policy(&mut self, id: &str) -> Result<(), AclError> {
        if id == GLOBAL_MANAGEMENT_ID {
            return Err(AclError::BuiltinPolicy);
        }
        self.not_replicated_policy(id)?;
        if self.policies.remove(id).is_none() {
            return Err(AclError::PolicyNotFound(id.into()));
        }
        for t in self.tokens.values_mut() {
            t.policies.retain(|p| p != id);
        }
        self.reindex();
        Ok(())
    }

    /// Creates or replaces a token. Its policies must exist; identities
    /// must name valid nodes, datacenters and services.
    pub fn upsert_token(&mut self, mut token: AclToken, index: u64) -> Result<(), AclError> {
        if self
            .tokens
            .get(&token.accessor_id)
            .is_some_and(|t| t.replicated)
        {
            return Err(AclError::Replicated(format!("token {}", token.accessor_id)));
        }
        token.replicated = false;
        self.insert_token(token, index)
    }

    fn not_replicated_policy(&self, id: &str) -> Result<(), AclError> {
        match self.policies.get(id) {
            Some(p) if p.replicated => Err(AclError::Replicated(format!("policy {:?}", p.name))),
            _ => Ok(()),
        }
    }

    /// The policies and tokens of this datacenter's own making (what a
    /// primary hands its secondaries), the built-in policy aside.
    pub fn own(&self) -> (Vec<AclPolicy>, Vec<AclToken>) {
        (
            self.policies
                .values()
                .filter(|p| !p.replicated && p.id != GLOBAL_MANAGEMENT_ID)
                .cloned()
                .collect(),
            self.tokens
                .values()
                .filter(|t| !t.replicated)
                .cloned()
                .collect(),
        )
    }

    /// What was copied from the primary, indexes aside, for comparing with
    /// what it has now.
    pub fn replicated(&self) -> (Vec<AclPolicy>, Vec<AclToken>) {
        (
            self.policies
                .values()
                .filter(|p| p.replicated)
                .map(|p| AclPolicy {
                    create_index: 0,
                    modify_index: 0,
                    replicated: false,
                    ..p.clone()
                })
                .collect(),
            self.tokens
                .values()
                .filter(|t| t.replicated)
                .map(|t| AclToken {
                    create_index: 0,
                    modify_index: 0,
                    replicated: false,
                    ..t.clone()
                })
                .collect(),
        )
    }

    /// What [`Self::replicated`] would answer once `policies` and `tokens`
    /// (the primary's) are replicated here: worked out (on a copy of the
    /// state's) by
    /// [`Self::replace_replicated`] itself, so that the two never differ.
    pub fn into_replicated(
        mut self,
        policies: Vec<AclPolicy>,
        tokens: Vec<AclToken>,
    ) -> (Vec<AclPolicy>, Vec<AclToken>) {
        self.replace_replicated(policies, tokens, 0);
        self.replicated()
    }

    /// A secondary's copy of the primary's policies and tokens becomes
    /// `policies` and `tokens`; its own stay. One of the primary's that
    /// would take the id, name or secret of one of this datacenter's own is
    /// left out (and named in the answer).
    pub fn replace_replicated(
        &mut self,
        policies: Vec<AclPolicy>,
        tokens: Vec<AclToken>,
        index: u64,
    ) -> Vec<String> {
        self.policies.retain(|_, p| !p.replicated);
        self.tokens.retain(|_, t| !t.replicated);
        self.reindex();
        let mut skipped = Vec::new();
        for mut p in policies {
            let clash = p.id == GLOBAL_MANAGEMENT_ID
                || self.policies.contains_key(&p.id)
                || self.policies.values().any(|o| o.name == p.name);
            if clash || validate_policy(&p).is_err() {
                skipped.push(format!("policy {:?}", p.name));
                continue;
            }
            p.replicated = true;
            p.create_index = index;
            p.modify_index = index;
            self.policies.insert(p.id.clone(), p);
        }
        for mut t in tokens {
            let clash = self.tokens.contains_key(&t.accessor_id)
                || self.tokens.values().any(|o| o.secret_hash == t.secret_hash)
                || t.secret_hash.len() != 64;
            if clash {
                skipped.push(format!("token {}", t.accessor_id));
                continue;
            }
            t.policies.retain(|p| self.policies.contains_key(p));
            t.replicated = true;
            t.create_index = index;
            t.modify_index = index;
            self.tokens.insert(t.accessor_id.clone(), t);
        }
        self.reindex();
        skipped
    }

    fn insert_token(&mut self, mut token: AclToken, index: u64) -> Result<(), AclError> {
        for p in &token.policies {
            if !self.policies.contains_key(p) {
                return Err(AclError::PolicyNotFound(p.clone()));
            }
        }
        for s in &token.service_identities {
            validate_name(s)
                .map_err(|e| AclError::Invalid(format!("service identity {s:?}: {e}")))?;
        }
        for n in &token.node_identities {
            validate_name(&n.node_name)
                .map_err(|e| AclError::Invalid(format!("node identity {:?}: {e}", n.node_name)))?;
            validate_name(&n.datacenter).map_err(|e| {
                AclError::Invalid(format!(
                    "node identity {:?}: datacenter {:?}: {e}",
                    n.node_name, n.datacenter
                ))
            })?;
        }
        if token.secret_hash.len() != 64 {
            return Err(AclError::Invalid("token: missing secret hash".into()));
        }
        if let Some(owner) = self.by_hash.get(&token.secret_hash) {
            if *owner != token.accessor_id {
                return Err(AclError::Invalid("token: secret in use".into()));
            }
        }
        // An update (it names the creation index of the token it read)
        // applies only to that token, still there with the same secret: a
        // token deleted meanwhile stays deleted.
        if token.create_index != 0 {
            let same = self.tokens.get(&token.accessor_id).is_some_and(|t| {
                t.create_index == token.create_index && t.secret_hash == token.secret_hash
            });
            if !same {
                return Err(AclError::Invalid(format!(
                    "token {}: deleted or replaced while it was being updated",
                    token.accessor_id
                )));
            }
        }
        token.create_index = self
            .tokens
            .get(&token.accessor_id)
            .map_or(index, |t| t.create_index);
        token.modify_index = index;
        self.tokens.insert(token.accessor_id.clone(), token);
        self.reindex();
        Ok(())
    }

    pub fn delete_token(&mut self, accessor: &str) -> Result<(), AclError> {
        if self.tokens.get(accessor).is_some_and(|t| t.replicated) {
            return Err(AclError::Replicated(format!("token {accessor}")));
        }
        if self.tokens.remove(accessor).is_none() {
            return Err(AclError::TokenNotFound(accessor.into()));
        }
        self.reindex();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use weft_api::acl::{Access, Resource};

    pub(crate) fn token(accessor: &str, secret: &str, policies: &[&str]) -> AclToken {
        AclToken {
            accessor_id: accessor.into(),
            secret_hash: hash_secret(secret),
            description: String::new(),
            policies: policies.iter().map(|p| p.to_string()).collect(),
            service_identities: vec![],
            node_identities: vec![],
            create_index: 0,
            modify_index: 0,
            replicated: false,
        }
    }

    #[test]
    fn bootstrap_once_and_resolve_by_secret_only() {
        let mut acl = AclState::default();
        acl.bootstrap(token("a1", "s3cret", &[GLOBAL_MANAGEMENT_ID]), 5)
            .unwrap();
        assert_eq!(
            acl.bootstrap(token("a2", "other", &[GLOBAL_MANAGEMENT_ID]), 6),
            Err(AclError::AlreadyBootstrapped)
        );
        let t = acl.token_by_secret("s3cret").expect("resolves");
        assert_eq!(t.accessor_id, "a1");
        assert!(acl.authorizer(t, "dc1").is_management());
        assert!(
            acl.token_by_secret("a1").is_none(),
            "the accessor is no secret"
        );
        assert!(acl.token_by_secret("s3cre").is_none());
        let doc = serde_json::to_string(&acl).unwrap();
        assert!(!doc.contains("s3cret"), "the secret is never stored");
    }

    #[test]
    fn an_update_racing_a_delete_does_not_bring_the_token_back() {
        let mut acl = AclState::default();
        acl.upsert_token(token("a", "s", &[]), 4).unwrap();
        // An update as the API makes it: naming the creation index it read.
        let mut update = token("a", "s", &[]);
        update.description = "renamed".into();
        update.create_index = 4;
        acl.upsert_token(update.clone(), 5).unwrap();
        assert_eq!(acl.tokens["a"].description, "renamed");
        assert_eq!(acl.tokens["a"].create_index, 4);
        // Deleted, then the same update arrives: refused, still deleted.
        acl.delete_token("a").unwrap();
        let e = acl.upsert_token(update.clone(), 7).unwrap_err();
        assert!(e.to_string().contains("deleted or replaced"), "{e}");
        assert!(acl.token_by_secret("s").is_none());
        // Re-created under the same accessor: an update of the old one is
        // refused too.
        acl.upsert_token(token("a", "s2", &[]), 8).unwrap();
        assert!(acl.upsert_token(update, 9).is_err());
        assert!(acl.token_by_secret("s2").is_some());
    }

    #[test]
    fn indexes_survive_serialization() {
        let mut acl = AclState::default();
        acl.bootstrap(token("a1", "root", &[GLOBAL_MANAGEMENT_ID]), 1)
            .unwrap();
        let p = AclPolicy {
            id: "p1".into(),
            name: "web-writer".into(),
            description: String::new(),
            rules: r#"service "web" { policy = "write" }"#.into(),
            create_index: 0,
            modify_index: 0,
            replicated: false,
        };
        acl.upsert_policy(p, 2).unwrap();
        acl.upsert_token(token("a2", "web-secret", &["p1"]), 3)
            .unwrap();
        let back: AclState = serde_json::from_str(&serde_json::to_string(&acl).unwrap()).unwrap();
        assert_eq!(back, acl);
        let t = back.token_by_secret("web-secret").unwrap();
        let authz = back.authorizer(t, "dc1");
        assert!(authz.allows(Resource::Service("web"), Access::Write));
        assert!(!authz.allows(Resource::Service("api"), Access::Read));
    }

    #[test]
    fn bad_policies_and_dangling_links_are_refused() {
        let mut acl = AclState::default();
        let bad = AclPolicy {
            id: "p".into(),
            name: "bad".into(),
            description: String::new(),
            rules: r#"service "web" { policy = "admin" }"#.into(),
            create_index: 0,
            modify_index: 0,
            replicated: false,
        };
        let e = acl.upsert_policy(bad, 1).unwrap_err();
        assert!(e.to_string().contains("admin"), "{e}");
        let e = acl.upsert_token(token("a", "s", &["nope"]), 2).unwrap_err();
        assert_eq!(e, AclError::PolicyNotFound("nope".into()));
        assert_eq!(
            acl.delete_policy(GLOBAL_MANAGEMENT_ID),
            Err(AclError::BuiltinPolicy)
        );
    }

    #[test]
    fn node_identity_writes_only_its_node() {
        let mut acl = AclState::default();
        let mut t = token("n", "node-secret", &[]);
        t.node_identities.push(NodeIdentity {
            node_name: "node-a".into(),
            datacenter: "dc1".into(),
        });
        acl.upsert_token(t, 1).unwrap();
        let token = acl.token_by_secret("node-secret").unwrap();
        let authz = acl.authorizer(token, "dc1");
        assert!(authz.allows(Resource::Node("node-a"), Access::Write));
        let elsewhere = acl.authorizer(token, "dc2");
        assert!(!elsewhere.allows(Resource::Node("node-a"), Access::Write));
        assert!(!authz.allows(Resource::Node("node-b"), Access::Write));
        assert!(!authz.allows(Resource::Service("api"), Access::Write));
    }

    #[test]
    fn a_secondary_keeps_its_own_and_copies_the_primarys_without_changing_them() {
        let policy = |id: &str, name: &str| AclPolicy {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            rules: r#"service_prefix "" { policy = "read" }"#.into(),
            create_index: 0,
            modify_index: 0,
            replicated: false,
        };
        let mut dc2 = AclState::default();
        dc2.upsert_policy(policy("p-own", "own"), 1).unwrap();
        dc2.upsert_token(token("t-own", "own-secret", &["p-own"]), 2)
            .unwrap();
        let skipped = dc2.replace_replicated(
            vec![policy("p-1", "readers"), policy("p-2", "own")],
            vec![
                token("t-1", "dc1-secret", &["p-1"]),
                token("t-2", "own-secret", &[]),
            ],
            3,
        );
        // A name or a secret of dc2's own is not taken over.
        assert_eq!(
            skipped,
            vec!["policy \"own\"".to_string(), "token t-2".to_string()]
        );
        assert!(
            dc2.token_by_secret("dc1-secret").is_some()
                && dc2.token_by_secret("own-secret").is_some()
        );
        // The copy is not changed here, dc2's own are.
        assert!(matches!(
            dc2.delete_policy("p-1"),
            Err(AclError::Replicated(_))
        ));
        assert!(matches!(
            dc2.delete_token("t-1"),
            Err(AclError::Replicated(_))
        ));
        assert!(matches!(
            dc2.upsert_policy(policy("p-1", "readers"), 4),
            Err(AclError::Replicated(_))
        ));
        dc2.delete_token("t-own").unwrap();
        // The next copy replaces the last: a token gone from the primary
        // is gone here.
        dc2.replace_replicated(vec![policy("p-1", "readers")], vec![], 5);
        assert!(dc2.token_by_secret("dc1-secret").is_none());
        assert_eq!(dc2.replicated().0.len(), 1);
        assert_eq!(dc2.own().0.len(), 1);
    }
}
