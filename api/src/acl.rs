//! Consul's ACL rule language and the decisions made with it. Pure: no I/O.
//!
//! # Rules
//!
//! A policy's rules are one document, in HCL or in JSON (a document whose
//! first non-blank character is `{` is JSON, anything else HCL):
//!
//! ```hcl
//! service "web"        { policy = "write" }
//! service_prefix ""    { policy = "read"  intentions = "deny" }
//! node_prefix ""       { policy = "read" }
//! key_prefix "config/" { policy = "read" }
//! key "config/secret"  { policy = "deny" }
//! operator = "read"
//! ```
//!
//! ```json
//! {"service": {"web": {"policy": "write"}},
//!  "key_prefix": {"config/": {"policy": "read"}},
//!  "operator": "read"}
//! ```
//!
//! The rule kinds are `service`, `service_prefix`, `node`, `node_prefix`,
//! `key`, `key_prefix`, `session`, `session_prefix` (sessions on the named
//! nodes) (each a block named by its label, holding `policy`,
//! and for the two service kinds also `intentions`), and the top-level
//! attributes `operator`, `acl` and `mesh`. A level is `read`, `write` or
//! `deny`. A service rule without `intentions` grants read on the service's
//! intentions when its `policy` is read or write, and deny when it is deny
//! (Consul's default): writing intentions takes an explicit
//! `intentions = "write"`.
//!
//! Both syntaxes end up as one [`serde_json::Value`] (HCL through `hcl-rs`,
//! following HCL's JSON mapping, in which repeated blocks become arrays; JSON
//! may also use Consul's array-of-blocks shape) that one decoder turns into
//! [`Rules`]. Nothing is accepted and ignored: an unknown kind or field, a
//! level other than the three, a missing `policy`, a value of the wrong type,
//! a name given twice for one kind in one document, a key given twice, all
//! are errors that name the rule (`service "web": policy "admin" is not read,
//! write or deny`). Consul's `list` level for keys is refused as not
//! supported. Rules of other Consul kinds (`agent`, `session`, `query`, ...)
//! are unknown kinds here.
//!
//! # Decisions
//!
//! An [`Authorizer`] is built from the [`Rules`] of all the policies (and
//! identities) linked to one token, once; lookups do not parse or sort
//! anything. Rules of one kind for the same name (or prefix) merge across
//! policies as in Consul: `deny` wins over `write`, which wins over `read`.
//! A name is then decided by its exact rule if there is one, else by the
//! longest prefix rule that matches it, else it is denied (the default
//! policy is deny). `write` satisfies a read; `deny` satisfies nothing.
//!
//! [`node_identity_rules`] and [`service_identity_rules`] are the templates of
//! Consul's node and service identities.
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
}

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    Deny,
    Read,
    Write,
}

impl Level {
    /// Whether this level allows `want`: write allows both, read allows
    /// read, deny allows nothing.
    pub fn grants(self, want: Access) -> bool {
        matches!(
            (self, want),
            (Level::Write, _) | (Level::Read, Access::Read)
        )
    }

    /// `"deny"`, `"read"` or `"write"`, as written in rules.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Deny => "deny",
            Level::Read => "read",
            Level::Write => "write",
        }
    }

    /// Consul's policy merger: deny wins over write, which wins over read.
    fn merge(self, other: Level) -> Level {
        match (self, other) {
            (Level::Deny, _) | (_, Level::Deny) => Level::Deny,
            (Level::Write, _) | (_, Level::Write) => Level::Write,
            (Level::Read, Level::Read) => Level::Read,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// One thing a caller may ask about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource<'a> {
    Service(&'a str),
    /// The intentions whose destination is this service.
    Intentions(&'a str),
    Node(&'a str),
    Key(&'a str),
    /// The sessions of this node.
    Session(&'a str),
    Operator,
    Acl,
    Mesh,
}

impl Resource<'_> {
    pub fn kind(&self) -> ResourceKind {
        match self {
            Resource::Service(_) => ResourceKind::Service,
            Resource::Intentions(_) => ResourceKind::Intentions,
            Resource::Node(_) => ResourceKind::Node,
            Resource::Key(_) => ResourceKind::Key,
            Resource::Session(_) => ResourceKind::Session,
            Resource::Operator => ResourceKind::Operator,
            Resource::Acl => ResourceKind::Acl,
            Resource::Mesh => ResourceKind::Mesh,
        }
    }
}

/// The kinds of [`Resource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    Service,
    Intentions,
    Node,
    Key,
    Session,
    Operator,
    Acl,
    Mesh,
}

/// Why a rules document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    /// The HCL parser's (or HCL-to-JSON conversion's) message.
    #[error("invalid HCL: {0}")]
    Hcl(String),
    /// The JSON parser's message, with its line and column.
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error(
        "unknown rule kind {0:?} (expected service, service_prefix, node, node_prefix, \
         key, key_prefix, session, session_prefix, operator, acl or mesh)"
    )]
    UnknownKind(String),
    /// A problem in one rule: `kind` is the rule kind (`"service"`, ...),
    /// `name` the block's name when there is one.
    #[error("{}: {problem}", rule_label(.kind, .name.as_deref()))]
    Rule {
        kind: &'static str,
        name: Option<String>,
        problem: Problem,
    },
}

fn rule_label(kind: &str, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{kind} {name:?}"),
        None => kind.to_string(),
    }
}

/// What is wrong with one rule (see [`AclError::Rule`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("unknown field {field:?} (expected {expected})")]
    UnknownField {
        field: String,
        expected: &'static str,
    },
    /// `field` is `policy` or `intentions`, or None for the top-level
    /// attributes.
    #[error("{}{value:?} is not read, write or deny", field_prefix(.field))]
    BadLevel {
        field: Option<&'static str>,
        value: String,
    },
    /// Consul's `list` level for keys.
    #[error("{field} {value:?} is not supported (use read)")]
    Unsupported { field: &'static str, value: String },
    #[error("policy is missing")]
    MissingPolicy,
    #[error("{}must be {expected}, not {got}", field_prefix(.field))]
    WrongType {
        field: Option<&'static str>,
        expected: &'static str,
        got: &'static str,
    },
    /// The same name twice for one kind in one document.
    #[error("defined twice in one document")]
    Duplicate,
    #[error("{0:?} is given twice")]
    DuplicateField(String),
    #[error("the name is empty (to match every name, write {prefix_kind} \"\")")]
    EmptyName { prefix_kind: &'static str },
    /// An HCL block with other than one label.
    #[error("a block takes exactly one label, the name, not {0}")]
    Labels(usize),
    /// An HCL attribute (`service = ...`) where blocks are expected.
    #[error("must be written as blocks, {kind} \"NAME\" {{ policy = ... }}, not as an attribute")]
    NotBlocks { kind: &'static str },
    /// An HCL block where a top-level attribute is expected.
    #[error("must be an attribute (= \"read\", \"write\" or \"deny\"), not a block")]
    NotAttribute,
    /// An HCL expression (variable, function call, template...) instead of
    /// a literal.
    #[error("{}must be a quoted string such as \"read\", not an expression", field_prefix(.field))]
    NotLiteral { field: Option<&'static str> },
    /// An HCL block nested in a rule block.
    #[error("unexpected block {0:?} (a rule holds only attributes)")]
    NestedBlock(String),
}

fn field_prefix(field: &Option<&'static str>) -> String {
    field.map(|f| format!("{f} ")).unwrap_or_default()
}

/// The kinds of rules in a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service,
    ServicePrefix,
    Node,
    NodePrefix,
    Key,
    KeyPrefix,
    Session,
    SessionPrefix,
    Operator,
    Acl,
    Mesh,
}

impl Kind {
    const ALL: [Kind; 11] = [
        Kind::Service,
        Kind::ServicePrefix,
        Kind::Node,
        Kind::NodePrefix,
        Kind::Key,
        Kind::KeyPrefix,
        Kind::Session,
        Kind::SessionPrefix,
        Kind::Operator,
        Kind::Acl,
        Kind::Mesh,
    ];

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::ServicePrefix => "service_prefix",
            Kind::Node => "node",
            Kind::NodePrefix => "node_prefix",
            Kind::Key => "key",
            Kind::KeyPrefix => "key_prefix",
            Kind::Session => "session",
            Kind::SessionPrefix => "session_prefix",
            Kind::Operator => "operator",
            Kind::Acl => "acl",
            Kind::Mesh => "mesh",
        }
    }

    /// Blocks named by a label (as opposed to top-level attributes).
    fn is_named(self) -> bool {
        !matches!(self, Kind::Operator | Kind::Acl | Kind::Mesh)
    }

    /// For exact kinds, the prefix kind that goes with them.
    fn prefix_kind(self) -> Option<Kind> {
        match self {
            Kind::Service => Some(Kind::ServicePrefix),
            Kind::Node => Some(Kind::NodePrefix),
            Kind::Key => Some(Kind::KeyPrefix),
            Kind::Session => Some(Kind::SessionPrefix),
            _ => None,
        }
    }

    fn has_intentions(self) -> bool {
        matches!(self, Kind::Service | Kind::ServicePrefix)
    }

    fn fields(self) -> &'static str {
        if self.has_intentions() {
            "policy or intentions"
        } else {
            "policy"
        }
    }

    fn error(self, name: Option<&str>, problem: Problem) -> AclError {
        AclError::Rule {
            kind: self.as_str(),
            name: name.map(str::to_owned),
            problem,
        }
    }
}

/// The levels a service rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServiceGrant {
    policy: Level,
    intentions: Level,
}

/// The rules of one document (one policy), as parsed by [`parse_rules`].
/// Decisions are made by an [`Authorizer`] built from one or more of them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rules {
    service: BTreeMap<String, ServiceGrant>,
    service_prefix: BTreeMap<String, ServiceGrant>,
    node: BTreeMap<String, Level>,
    node_prefix: BTreeMap<String, Level>,
    key: BTreeMap<String, Level>,
    key_prefix: BTreeMap<String, Level>,
    session: BTreeMap<String, Level>,
    session_prefix: BTreeMap<String, Level>,
    operator: Option<Level>,
    acl: Option<Level>,
    mesh: Option<Level>,
}

/// Parses a rules document: JSON if its first non-blank character is `{`,
/// HCL otherwise.
pub fn parse_rules(text: &str) -> Result<Rules, AclError> {
    let doc = if text.trim_start().starts_with('{') {
        json_to_value(text)?
    } else {
        hcl_to_value(text)?
    };
    decode(&doc)
}

// ---------------------------------------------------------------------------
// The shared decoder: a JSON-shaped value to Rules.

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn decode(doc: &Value) -> Result<Rules, AclError> {
    let Value::Object(top) = doc else {
        // Not reached: JSON is chosen for documents starting with `{`, and
        // HCL bodies map to objects.
        return Err(AclError::Json(format!(
            "rules must be an object, not {}",
            type_name(doc)
        )));
    };
    let mut rules = Rules::default();
    for (key, value) in top {
        let kind = Kind::parse(key).ok_or_else(|| AclError::UnknownKind(key.clone()))?;
        if kind.is_named() {
            decode_named(kind, value, &mut rules)?;
            continue;
        }
        let level = decode_level(kind, None, None, value)?;
        let slot = match kind {
            Kind::Operator => &mut rules.operator,
            Kind::Acl => &mut rules.acl,
            _ => &mut rules.mesh,
        };
        *slot = Some(level);
    }
    Ok(rules)
}

/// `{"NAME": BLOCK, ...}`, or Consul's `[{"NAME": BLOCK}, ...]`.
fn decode_named(kind: Kind, value: &Value, rules: &mut Rules) -> Result<(), AclError> {
    const EXPECTED: &str = "an object of named rules";
    let mut blocks: Vec<(&str, &Value)> = Vec::new();
    match value {
        Value::Object(map) => blocks.extend(map.iter().map(|(k, v)| (k.as_str(), v))),
        Value::Array(items) => {
            for item in items {
                let Value::Object(map) = item else {
                    return Err(kind.error(
                        None,
                        Problem::WrongType {
                            field: None,
                            expected: "an array of objects of named rules",
                            got: type_name(item),
                        },
                    ));
                };
                blocks.extend(map.iter().map(|(k, v)| (k.as_str(), v)));
            }
        }
        other => {
            return Err(kind.error(
                None,
                Problem::WrongType {
                    field: None,
                    expected: EXPECTED,
                    got: type_name(other),
                },
            ))
        }
    }
    let mut seen = HashSet::new();
    for (name, block) in blocks {
        if !seen.insert(name) {
            return Err(kind.error(Some(name), Problem::Duplicate));
        }
        let (policy, intentions) = decode_block(kind, name, block)?;
        let name = name.to_owned();
        let service = ServiceGrant {
            policy,
            intentions: intentions.unwrap_or(match policy {
                Level::Deny => Level::Deny,
                Level::Read | Level::Write => Level::Read,
            }),
        };
        // Names are unique here (`seen`): an insert replaces nothing.
        let _ = match kind {
            Kind::Service => rules.service.insert(name, service).is_some(),
            Kind::ServicePrefix => rules.service_prefix.insert(name, service).is_some(),
            Kind::Node => rules.node.insert(name, policy).is_some(),
            Kind::NodePrefix => rules.node_prefix.insert(name, policy).is_some(),
            Kind::Key => rules.key.insert(name, policy).is_some(),
            Kind::KeyPrefix => rules.key_prefix.insert(name, policy).is_some(),
            Kind::Session => rules.session.insert(name, policy).is_some(),
            Kind::SessionPrefix => rules.session_prefix.insert(name, policy).is_some(),
            Kind::Operator | Kind::Acl | Kind::Mesh => unreachable!("not a named kind"),
        };
    }
    Ok(())
}

/// One rule's body: `{"policy": ..., "intentions": ...}`, or an array of
/// exactly one such object (HCL's JSON mapping of a block).
fn decode_block(kind: Kind, name: &str, value: &Value) -> Result<(Level, Option<Level>), AclError> {
    let err = |problem| kind.error(Some(name), problem);
    let wrong = |got| {
        err(Problem::WrongType {
            field: None,
            expected: "a rule block like { policy = \"read\" }",
            got,
        })
    };
    let body = match value {
        Value::Object(map) => map,
        Value::Array(items) => match items.as_slice() {
            [Value::Object(map)] => map,
            [] => return Err(wrong("an empty array")),
            [other] => return Err(wrong(type_name(other))),
            [..] => return Err(err(Problem::Duplicate)),
        },
        other => return Err(wrong(type_name(other))),
    };
    if name.is_empty() {
        if let Some(prefix) = kind.prefix_kind() {
            return Err(err(Problem::EmptyName {
                prefix_kind: prefix.as_str(),
            }));
        }
    }
    let mut policy = None;
    let mut intentions = None;
    for (field, v) in body {
        match field.as_str() {
            "policy" => policy = Some(decode_level(kind, Some(name), Some("policy"), v)?),
            "intentions" if kind.has_intentions() => {
                intentions = Some(decode_level(kind, Some(name), Some("intentions"), v)?)
            }
            _ => {
                return Err(err(Problem::UnknownField {
                    field: field.clone(),
                    expected: kind.fields(),
                }))
            }
        }
    }
    let policy = policy.ok_or_else(|| err(Problem::MissingPolicy))?;
    Ok((policy, intentions))
}

fn decode_level(
    kind: Kind,
    name: Option<&str>,
    field: Option<&'static str>,
    value: &Value,
) -> Result<Level, AclError> {
    let Value::String(s) = value else {
        return Err(kind.error(
            name,
            Problem::WrongType {
                field,
                expected: "a string (read, write or deny)",
                got: type_name(value),
            },
        ));
    };
    match s.as_str() {
        "read" => Ok(Level::Read),
        "write" => Ok(Level::Write),
        "deny" => Ok(Level::Deny),
        "list" if matches!(kind, Kind::Key | Kind::KeyPrefix) => Err(kind.error(
            name,
            Problem::Unsupported {
                field: field.unwrap_or("policy"),
                value: s.clone(),
            },
        )),
        _ => Err(kind.error(
            name,
            Problem::BadLevel {
                field,
                value: s.clone(),
            },
        )),
    }
}

// ---------------------------------------------------------------------------
// HCL: parsed by hcl-rs into a Body (its parser refuses a redefined
// attribute), checked for what its JSON mapping would lose or blur (an
// attribute where blocks belong and the reverse, label counts, nested blocks,
// expressions), then mapped to a JSON value.

/// The deepest nesting of `{`, `[` and `(` rules may have (they need 2);
/// see [`crate::file_format::check_hcl_nesting`].
const MAX_HCL_NESTING: usize = 8;

fn hcl_to_value(text: &str) -> Result<Value, AclError> {
    crate::file_format::check_hcl_nesting(text, MAX_HCL_NESTING).map_err(AclError::Hcl)?;
    let hcl_error = |e: hcl::Error| AclError::Hcl(e.to_string().trim().to_owned());
    let body = match hcl::parse(text) {
        Ok(body) => body,
        // Consul's rules are HCL 1, which also allows several attributes on
        // one line. When the text is not HCL 2 as it is, it is tried once
        // more with those lines split; if that fails too, the error is the
        // one about the text as written (its lines and columns).
        Err(e) => match split_attribute_lines(text).map(|t| hcl::parse(&t)) {
            Some(Ok(body)) => body,
            _ => return Err(hcl_error(e)),
        },
    };
    check_hcl_body(&body)?;
    hcl::from_body(body).map_err(hcl_error)
}

/// HCL 1 allows `service "api" { policy = "read" intentions = "write" }` and
/// several blocks on one line; HCL 2 wants a newline after the `{` of a
/// block with more than one attribute, between attributes, before its `}`
/// and after it. This puts one in place of the blank after a `{` or `}` that
/// is followed on its line by a name, and after a quoted string followed on
/// its line by a name or a `}`. None when there is no such place, or when
/// the text has what this scan does not follow (interpolations, heredocs,
/// unterminated strings or comments).
fn split_attribute_lines(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let line_end = |from: usize| {
        b[from..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(b.len(), |p| from + p)
    };
    let is_name = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_');
    let mut splits = Vec::new();
    let mut i = 0;
    while i < b.len() {
        // Where a token that may be followed by a newline ends.
        let after = match (b[i], b.get(i + 1)) {
            (b'#', _) | (b'/', Some(b'/')) => {
                i = line_end(i);
                continue;
            }
            (b'/', Some(b'*')) => {
                i += 2 + text[i + 2..].find("*/")? + 2;
                continue;
            }
            (b'<', Some(b'<')) => return None,
            (b'"', _) => {
                let mut j = i + 1;
                loop {
                    match (b.get(j)?, b.get(j + 1)) {
                        (b'\\', _) => j += 2,
                        (b'"', _) => break,
                        (b'\n', _) | (b'$' | b'%', Some(b'{')) => return None,
                        _ => j += 1,
                    }
                }
                Some((j + 1, true))
            }
            (b'{' | b'}', _) => Some((i + 1, false)),
            _ => None,
        };
        let Some((end, string)) = after else {
            i += 1;
            continue;
        };
        i = end;
        while matches!(b.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        if i > end && (is_name(b.get(i)) || (string && b.get(i) == Some(&b'}'))) {
            splits.push(end);
        }
    }
    if splits.is_empty() {
        return None;
    }
    let mut out = b.to_vec();
    for at in splits {
        out[at] = b'\n';
    }
    // Only ASCII blanks were replaced: still UTF-8.
    String::from_utf8(out).ok()
}

fn is_literal(expr: &hcl::Expression) -> bool {
    use hcl::Expression as E;
    match expr {
        E::Null | E::Bool(_) | E::Number(_) | E::String(_) => true,
        E::Array(items) => items.iter().all(is_literal),
        E::Object(map) => map.values().all(is_literal),
        E::Parenthesis(inner) => is_literal(inner),
        _ => false,
    }
}

fn check_hcl_body(body: &hcl::Body) -> Result<(), AclError> {
    // A redefined attribute is refused by the parser itself.
    for structure in body.iter() {
        match structure {
            hcl::Structure::Attribute(attr) => {
                let key = attr.key();
                let kind = Kind::parse(key).ok_or_else(|| AclError::UnknownKind(key.into()))?;
                if kind.is_named() {
                    return Err(kind.error(
                        None,
                        Problem::NotBlocks {
                            kind: kind.as_str(),
                        },
                    ));
                }
                if !is_literal(attr.expr()) {
                    return Err(kind.error(None, Problem::NotLiteral { field: None }));
                }
            }
            hcl::Structure::Block(block) => {
                let ident = block.identifier();
                let kind = Kind::parse(ident).ok_or_else(|| AclError::UnknownKind(ident.into()))?;
                if !kind.is_named() {
                    return Err(kind.error(None, Problem::NotAttribute));
                }
                let [label] = block.labels() else {
                    return Err(kind.error(None, Problem::Labels(block.labels().len())));
                };
                check_hcl_rule(kind, label.as_str(), block.body())?;
            }
        }
    }
    Ok(())
}

fn check_hcl_rule(kind: Kind, name: &str, body: &hcl::Body) -> Result<(), AclError> {
    for structure in body.iter() {
        match structure {
            hcl::Structure::Attribute(attr) => {
                let key = attr.key();
                if !is_literal(attr.expr()) {
                    let field = match key {
                        "policy" => Some("policy"),
                        "intentions" => Some("intentions"),
                        // Unknown fields are named by the decoder.
                        _ => continue,
                    };
                    return Err(kind.error(Some(name), Problem::NotLiteral { field }));
                }
            }
            hcl::Structure::Block(block) => {
                return Err(kind.error(Some(name), Problem::NestedBlock(block.identifier().into())));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// JSON: parsed into a Value by a visitor that refuses a key given twice in
// one object (serde_json's own Value would keep the last one).

/// Where in the document an object is, to name a repeated key.
#[derive(Clone, Copy)]
enum JsonAt<'a> {
    Top,
    Kind(&'a str),
    Rule(&'a str, &'a str),
    Deeper,
}

struct JsonSeed<'a> {
    at: JsonAt<'a>,
    /// The structured error behind a custom serde_json error.
    error: &'a Cell<Option<AclError>>,
}

fn json_to_value(text: &str) -> Result<Value, AclError> {
    let error = Cell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = JsonSeed {
        at: JsonAt::Top,
        error: &error,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    parsed.map_err(|e| {
        error
            .take()
            .unwrap_or_else(|| AclError::Json(e.to_string()))
    })
}

fn repeated_key(at: JsonAt<'_>, key: &str) -> Option<AclError> {
    let kind_of = |k: &str| Kind::parse(k).ok_or_else(|| AclError::UnknownKind(k.into()));
    Some(match at {
        JsonAt::Top => match kind_of(key) {
            Ok(kind) => kind.error(None, Problem::Duplicate),
            Err(e) => e,
        },
        JsonAt::Kind(k) => match kind_of(k) {
            Ok(kind) => kind.error(Some(key), Problem::Duplicate),
            Err(e) => e,
        },
        JsonAt::Rule(k, name) => match kind_of(k) {
            Ok(kind) => kind.error(Some(name), Problem::DuplicateField(key.into())),
            Err(e) => e,
        },
        JsonAt::Deeper => return None,
    })
}

impl<'de> DeserializeSeed<'de> for JsonSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        // Consul's array-of-blocks shape keeps the level it is found at.
        let at = match self.at {
            JsonAt::Kind(k) => JsonAt::Kind(k),
            JsonAt::Rule(k, n) => JsonAt::Rule(k, n),
            JsonAt::Top | JsonAt::Deeper => JsonAt::Deeper,
        };
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(JsonSeed {
            at,
            error: self.error,
        })? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let message = match repeated_key(self.at, &key) {
                    Some(e) => {
                        let message = e.to_string();
                        self.error.set(Some(e));
                        message
                    }
                    None => format!("key {key:?} is given twice"),
                };
                return Err(de::Error::custom(message));
            }
            let at = match self.at {
                JsonAt::Top => JsonAt::Kind(&key),
                JsonAt::Kind(k) => JsonAt::Rule(k, &key),
                JsonAt::Rule(..) | JsonAt::Deeper => JsonAt::Deeper,
            };
            let value = map.next_value_seed(JsonSeed {
                at,
                error: self.error,
            })?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

// ---------------------------------------------------------------------------
// Identities.

/// Consul's node identity: `node "<node>"` write, `node_prefix ""` read,
/// `service_prefix ""` read (intentions read).
pub fn node_identity_rules(node: &str) -> Rules {
    let mut rules = Rules::default();
    rules.node.insert(node.to_owned(), Level::Write);
    rules.node_prefix.insert(String::new(), Level::Read);
    rules.service_prefix.insert(
        String::new(),
        ServiceGrant {
            policy: Level::Read,
            intentions: Level::Read,
        },
    );
    rules
}

/// Consul's service identity: `service "<service>"` write (intentions read,
/// as a rule without `intentions` gets), `service_prefix ""` read,
/// `node_prefix ""` read.
pub fn service_identity_rules(service: &str) -> Rules {
    let mut rules = Rules::default();
    rules.service.insert(
        service.to_owned(),
        ServiceGrant {
            policy: Level::Write,
            intentions: Level::Read,
        },
    );
    rules.service_prefix.insert(
        String::new(),
        ServiceGrant {
            policy: Level::Read,
            intentions: Level::Read,
        },
    );
    rules.node_prefix.insert(String::new(), Level::Read);
    rules
}

// ---------------------------------------------------------------------------
// Decisions.

/// The merged rules of one named kind.
#[derive(Debug, Clone, Default)]
struct Table {
    exact: HashMap<String, Level>,
    prefix: HashMap<String, Level>,
    /// Length in bytes of the longest prefix, where lookups start.
    longest_prefix: usize,
    /// Whether some rule grants at least read.
    any_read: bool,
}

impl Table {
    fn merge_into(map: &mut HashMap<String, Level>, name: &str, level: Level) {
        map.entry(name.to_owned())
            .and_modify(|l| *l = l.merge(level))
            .or_insert(level);
    }

    fn exact(&mut self, name: &str, level: Level) {
        Table::merge_into(&mut self.exact, name, level);
    }

    fn prefix(&mut self, prefix: &str, level: Level) {
        Table::merge_into(&mut self.prefix, prefix, level);
    }

    fn finish(&mut self) {
        self.longest_prefix = self.prefix.keys().map(String::len).max().unwrap_or(0);
        self.any_read = self
            .exact
            .values()
            .chain(self.prefix.values())
            .any(|l| l.grants(Access::Read));
    }

    fn lookup(&self, name: &str) -> Option<Level> {
        if let Some(level) = self.exact.get(name) {
            return Some(*level);
        }
        if self.prefix.is_empty() {
            return None;
        }
        (0..=name.len().min(self.longest_prefix))
            .rev()
            .filter(|&end| name.is_char_boundary(end))
            .find_map(|end| self.prefix.get(&name[..end]).copied())
    }

    /// Whether `want` is allowed on every name that starts with `under`:
    /// the longest prefix rule covering `under` grants it, and so does every
    /// rule (exact or prefix) for names inside.
    fn allows_under(&self, under: &str, want: Access) -> bool {
        let covering = self
            .prefix
            .iter()
            .filter(|(p, _)| under.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, l)| *l);
        covering.is_some_and(|l| l.grants(want))
            && self
                .exact
                .iter()
                .chain(self.prefix.iter())
                .filter(|(name, _)| name.starts_with(under))
                .all(|(_, l)| l.grants(want))
    }

    fn allows_all(&self, want: Access) -> bool {
        self.prefix.get("").is_some_and(|l| l.grants(want))
            && self
                .exact
                .values()
                .chain(self.prefix.values())
                .all(|l| l.grants(want))
    }
}

/// What one token may do: the merged rules of its policies and identities,
/// compiled once. Without a matching rule, everything is denied.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    service: Table,
    intentions: Table,
    node: Table,
    key: Table,
    session: Table,
    operator: Option<Level>,
    acl: Option<Level>,
    mesh: Option<Level>,
    management: bool,
}

fn merge_global(slot: &mut Option<Level>, level: Option<Level>) {
    if let Some(level) = level {
        *slot = Some(slot.map_or(level, |l| l.merge(level)));
    }
}

impl Authorizer {
    /// Merges the rules of the policies linked to one token.
    pub fn from_rules<'a>(rules: impl IntoIterator<Item = &'a Rules>) -> Self {
        let mut a = Authorizer::default();
        for r in rules {
            for (name, g) in &r.service {
                a.service.exact(name, g.policy);
                a.intentions.exact(name, g.intentions);
            }
            for (prefix, g) in &r.service_prefix {
                a.service.prefix(prefix, g.policy);
                a.intentions.prefix(prefix, g.intentions);
            }
            for (name, level) in &r.node {
                a.node.exact(name, *level);
            }
            for (prefix, level) in &r.node_prefix {
                a.node.prefix(prefix, *level);
            }
            for (name, level) in &r.key {
                a.key.exact(name, *level);
            }
            for (prefix, level) in &r.key_prefix {
                a.key.prefix(prefix, *level);
            }
            for (name, level) in &r.session {
                a.session.exact(name, *level);
            }
            for (prefix, level) in &r.session_prefix {
                a.session.prefix(prefix, *level);
            }
            merge_global(&mut a.operator, r.operator);
            merge_global(&mut a.acl, r.acl);
            merge_global(&mut a.mesh, r.mesh);
        }
        for table in [
            &mut a.service,
            &mut a.intentions,
            &mut a.node,
            &mut a.key,
            &mut a.session,
        ] {
            table.finish();
        }
        a
    }

    /// A management token's: write on everything.
    pub fn management() -> Self {
        let mut everything = Table::default();
        everything.prefix("", Level::Write);
        everything.finish();
        Authorizer {
            service: everything.clone(),
            intentions: everything.clone(),
            node: everything.clone(),
            key: everything.clone(),
            session: everything,
            operator: Some(Level::Write),
            acl: Some(Level::Write),
            mesh: Some(Level::Write),
            management: true,
        }
    }

    /// No rules: everything denied.
    pub fn deny_all() -> Self {
        Authorizer::default()
    }

    /// Whether this is [`Authorizer::management`] (not merely rules that
    /// grant write on everything).
    pub fn is_management(&self) -> bool {
        self.management
    }

    /// The effective level on `resource`; None when no rule matches (denied).
    pub fn level(&self, resource: Resource<'_>) -> Option<Level> {
        match resource {
            Resource::Service(name) => self.service.lookup(name),
            Resource::Intentions(name) => self.intentions.lookup(name),
            Resource::Node(name) => self.node.lookup(name),
            Resource::Key(name) => self.key.lookup(name),
            Resource::Session(node) => self.session.lookup(node),
            Resource::Operator => self.operator,
            Resource::Acl => self.acl,
            Resource::Mesh => self.mesh,
        }
    }

    pub fn service(&self, name: &str) -> Option<Level> {
        self.level(Resource::Service(name))
    }

    /// The level on the intentions whose destination is service `name`.
    pub fn intentions(&self, name: &str) -> Option<Level> {
        self.level(Resource::Intentions(name))
    }

    pub fn node(&self, name: &str) -> Option<Level> {
        self.level(Resource::Node(name))
    }

    pub fn key(&self, key: &str) -> Option<Level> {
        self.level(Resource::Key(key))
    }

    pub fn operator(&self) -> Option<Level> {
        self.operator
    }

    pub fn acl(&self) -> Option<Level> {
        self.acl
    }

    pub fn mesh(&self) -> Option<Level> {
        self.mesh
    }

    /// Whether `want` is allowed on `resource`.
    pub fn allows(&self, resource: Resource<'_>, want: Access) -> bool {
        self.level(resource).is_some_and(|l| l.grants(want))
    }

    fn table(&self, kind: ResourceKind) -> Result<&Table, Option<Level>> {
        match kind {
            ResourceKind::Service => Ok(&self.service),
            ResourceKind::Intentions => Ok(&self.intentions),
            ResourceKind::Node => Ok(&self.node),
            ResourceKind::Key => Ok(&self.key),
            ResourceKind::Session => Ok(&self.session),
            ResourceKind::Operator => Err(self.operator),
            ResourceKind::Acl => Err(self.acl),
            ResourceKind::Mesh => Err(self.mesh),
        }
    }

    /// Whether some rule of `kind` grants at least read: list calls are
    /// refused outright to tokens for which this is false.
    pub fn can_read_any(&self, kind: ResourceKind) -> bool {
        match self.table(kind) {
            Ok(table) => table.any_read,
            Err(level) => level.is_some_and(|l| l.grants(Access::Read)),
        }
    }

    /// Whether `want` is allowed on every name of `kind` that starts with
    /// `under` (Consul's check for a recursive KV delete). For operator,
    /// acl and mesh: whether their level grants it.
    pub fn allows_under(&self, kind: ResourceKind, under: &str, want: Access) -> bool {
        match self.table(kind) {
            Ok(table) => table.allows_under(under, want),
            Err(level) => level.is_some_and(|l| l.grants(want)),
        }
    }

    /// Whether `want` is allowed on every name of `kind`: the prefix `""`
    /// rule grants it and so does every other rule of that kind. For
    /// operator, acl and mesh: whether their level grants it.
    pub fn allows_all(&self, kind: ResourceKind, want: Access) -> bool {
        match self.table(kind) {
            Ok(table) => table.allows_all(want),
            Err(level) => level.is_some_and(|l| l.grants(want)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Rules {
        parse_rules(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn authz(texts: &[&str]) -> Authorizer {
        let rules: Vec<Rules> = texts.iter().map(|t| parse(t)).collect();
        Authorizer::from_rules(&rules)
    }

    fn err(text: &str) -> AclError {
        match parse_rules(text) {
            Ok(r) => panic!("{text}: accepted as {r:?}"),
            Err(e) => e,
        }
    }

    /// The error's message, checked to contain every one of `parts`.
    fn err_says(text: &str, parts: &[&str]) -> AclError {
        let e = err(text);
        let message = e.to_string();
        for part in parts {
            assert!(message.contains(part), "{text}: {message:?} lacks {part:?}");
        }
        e
    }

    fn rule_err(kind: &'static str, name: Option<&str>, problem: Problem) -> AclError {
        AclError::Rule {
            kind,
            name: name.map(str::to_owned),
            problem,
        }
    }

    const HCL_DOC: &str = r#"
        # comments are fine
        service "web" { policy = "write" }
        service "api" {
          policy     = "read"
          intentions = "write"
        }
        service_prefix "" { policy = "read" }
        node "n1" { policy = "write" }
        node_prefix "" { policy = "read" }
        key "config/secret" { policy = "deny" }
        key_prefix "config/" { policy = "read" }
        operator = "read"
        acl = "deny"
        mesh = "write"
    "#;

    const JSON_DOC: &str = r#"
        {
          "service": {"web": {"policy": "write"},
                      "api": {"policy": "read", "intentions": "write"}},
          "service_prefix": {"": {"policy": "read"}},
          "node": {"n1": {"policy": "write"}},
          "node_prefix": {"": {"policy": "read"}},
          "key": {"config/secret": {"policy": "deny"}},
          "key_prefix": {"config/": {"policy": "read"}},
          "operator": "read",
          "acl": "deny",
          "mesh": "write"
        }
    "#;

    #[test]
    fn hcl_and_json_forms_are_equal() {
        let hcl = parse(HCL_DOC);
        let json = parse(JSON_DOC);
        assert_eq!(hcl, json);
        // And they are not trivially equal: they hold what was written.
        assert_ne!(hcl, Rules::default());
        let a = Authorizer::from_rules([&hcl]);
        assert_eq!(a.service("web"), Some(Level::Write));
        assert_eq!(a.intentions("web"), Some(Level::Read), "Consul's default");
        assert_eq!(a.service("api"), Some(Level::Read));
        assert_eq!(a.intentions("api"), Some(Level::Write));
        assert_eq!(a.service("other"), Some(Level::Read));
        assert_eq!(a.node("n1"), Some(Level::Write));
        assert_eq!(a.node("n2"), Some(Level::Read));
        assert_eq!(a.key("config/secret"), Some(Level::Deny));
        assert_eq!(a.key("config/x"), Some(Level::Read));
        assert_eq!(a.key("other"), None);
        assert_eq!(a.operator(), Some(Level::Read));
        assert_eq!(a.acl(), Some(Level::Deny));
        assert_eq!(a.mesh(), Some(Level::Write));
    }

    #[test]
    fn a_different_level_makes_the_rules_differ() {
        let changed = HCL_DOC.replace(r#"mesh = "write""#, r#"mesh = "read""#);
        assert_ne!(parse(&changed), parse(JSON_DOC));
    }

    #[test]
    fn empty_documents_grant_nothing() {
        for text in ["", "  \n", "{}", " \n {\n}\n", "# only a comment\n"] {
            assert_eq!(parse(text), Rules::default(), "{text:?}");
        }
        let a = Authorizer::from_rules([&parse("")]);
        assert!(!a.allows(Resource::Service("web"), Access::Read));
        assert!(!a.can_read_any(ResourceKind::Service));
    }

    #[test]
    fn one_and_several_blocks_of_a_kind_in_hcl() {
        let one = parse(r#"service "a" { policy = "read" }"#);
        assert_eq!(one, parse(r#"{"service": {"a": {"policy": "read"}}}"#));
        let two = parse(
            r#"
            service "a" { policy = "read" }
            node_prefix "" { policy = "read" }
            service "b" { policy = "write" }
            "#,
        );
        let json = parse(
            r#"{"service": {"a": {"policy": "read"}, "b": {"policy": "write"}},
                "node_prefix": {"": {"policy": "read"}}}"#,
        );
        assert_eq!(two, json);
        // Consul's array-of-blocks shape, and HCL's JSON mapping of a block
        // as an array of one body.
        let arrays = parse(
            r#"{"service": [{"a": {"policy": "read"}}, {"b": [{"policy": "write"}]}],
                "node_prefix": [{"": {"policy": "read"}}]}"#,
        );
        assert_eq!(arrays, json);
        let a = Authorizer::from_rules([&two]);
        assert_eq!(a.service("a"), Some(Level::Read));
        assert_eq!(a.service("b"), Some(Level::Write));
    }

    #[test]
    fn the_same_name_twice_in_one_kind_is_refused_in_every_shape() {
        let want = rule_err("service", Some("a"), Problem::Duplicate);
        for text in [
            r#"service "a" { policy = "read" }
               service "a" { policy = "write" }"#,
            r#"{"service": {"a": {"policy": "read"}, "a": {"policy": "write"}}}"#,
            r#"{"service": [{"a": {"policy": "read"}}, {"a": {"policy": "write"}}]}"#,
            r#"{"service": {"a": [{"policy": "read"}, {"policy": "write"}]}}"#,
        ] {
            let e = err(text);
            assert_eq!(e, want, "{text}");
            assert_eq!(
                e.to_string(),
                r#"service "a": defined twice in one document"#
            );
        }
        // The same name in different kinds is fine.
        parse(
            r#"service "a" { policy = "read" }
               service_prefix "a" { policy = "write" }"#,
        );
    }

    #[test]
    fn repeated_attributes_and_fields_are_refused() {
        // HCL's parser refuses a redefined attribute itself.
        for text in [
            "operator = \"read\"\noperator = \"write\"",
            "service \"web\" {\n  policy = \"read\"\n  policy = \"write\"\n}",
        ] {
            let e = err_says(text, &["invalid HCL", "redefined attribute"]);
            assert!(matches!(e, AclError::Hcl(_)), "{e:?}");
        }
        // On one line (HCL 1), the error is about the text as written.
        let e = err(r#"service "web" { policy = "read" policy = "write" }"#);
        assert!(matches!(e, AclError::Hcl(_)), "{e:?}");
        let top = rule_err("operator", None, Problem::Duplicate);
        assert_eq!(err(r#"{"operator": "read", "operator": "write"}"#), top);
        assert_eq!(
            err(r#"{"operator": "read", "operator": "write"}"#).to_string(),
            "operator: defined twice in one document"
        );
        let field = rule_err(
            "service",
            Some("web"),
            Problem::DuplicateField("policy".into()),
        );
        let e = err(r#"{"service": {"web": {"policy": "read", "policy": "write"}}}"#);
        assert_eq!(e, field);
        assert_eq!(e.to_string(), r#"service "web": "policy" is given twice"#);
        // A whole kind given twice in JSON.
        let e = err(r#"{"service": {"a": {"policy": "read"}}, "service": {}}"#);
        assert_eq!(e, rule_err("service", None, Problem::Duplicate));
    }

    #[test]
    fn an_exact_rule_beats_any_prefix() {
        let a = authz(&[r#"
            service "web" { policy = "read" }
            service_prefix "web" { policy = "write" }
            service_prefix "" { policy = "deny" }
            key "a/b" { policy = "deny" }
            key_prefix "a/b" { policy = "write" }
        "#]);
        assert_eq!(a.service("web"), Some(Level::Read));
        assert!(!a.allows(Resource::Service("web"), Access::Write));
        assert_eq!(a.service("web2"), Some(Level::Write));
        assert_eq!(a.service("db"), Some(Level::Deny));
        assert_eq!(a.key("a/b"), Some(Level::Deny));
        assert_eq!(a.key("a/bc"), Some(Level::Write));
        assert_eq!(a.key("a"), None);
    }

    #[test]
    fn the_longest_matching_prefix_wins() {
        let a = authz(&[r#"
            node_prefix "" { policy = "read" }
            node_prefix "db-" { policy = "deny" }
            node_prefix "db-primary" { policy = "write" }
            node_prefix "web-frontend-long" { policy = "deny" }
        "#]);
        assert_eq!(a.node("db-primary"), Some(Level::Write));
        assert_eq!(a.node("db-primary-2"), Some(Level::Write));
        assert_eq!(a.node("db-replica"), Some(Level::Deny));
        assert_eq!(a.node("db"), Some(Level::Read));
        // A prefix longer than the name does not match it.
        assert_eq!(a.node("web-frontend"), Some(Level::Read));
        assert_eq!(a.node(""), Some(Level::Read));
        // Without the "" prefix, nothing matches: denied.
        let b = authz(&[r#"node_prefix "db-" { policy = "read" }"#]);
        assert_eq!(b.node("web"), None);
        assert!(!b.allows(Resource::Node("web"), Access::Read));
        assert!(b.allows(Resource::Node("db-1"), Access::Read));
    }

    #[test]
    fn prefixes_match_on_character_boundaries() {
        let a = authz(&[r#"
            key_prefix "é" { policy = "read" }
            key_prefix "éa" { policy = "write" }
        "#]);
        assert_eq!(a.key("éab"), Some(Level::Write));
        assert_eq!(a.key("éé"), Some(Level::Read));
        assert_eq!(a.key("e"), None);
        assert_eq!(a.key("日本"), None);
    }

    #[test]
    fn session_rules_name_nodes() {
        let a = authz(&[r#"
            session_prefix "" { policy = "read" }
            session "web-1" { policy = "write" }
            session_prefix "db-" { policy = "deny" }
        "#]);
        assert!(a.allows(Resource::Session("web-1"), Access::Write));
        assert!(a.allows(Resource::Session("web-2"), Access::Read));
        assert!(!a.allows(Resource::Session("web-2"), Access::Write));
        assert!(!a.allows(Resource::Session("db-1"), Access::Read));
        // Session rules grant nothing on the node itself.
        assert!(!a.allows(Resource::Node("web-1"), Access::Read));
        assert!(Authorizer::management().allows(Resource::Session("any"), Access::Write));
        assert!(!authz(&[r#"node_prefix "" { policy = "write" }"#])
            .allows(Resource::Session("web-1"), Access::Read));
    }

    #[test]
    fn key_prefixes_on_kv_paths() {
        let a = authz(&[r#"
            key_prefix "" { policy = "read" }
            key_prefix "config/" { policy = "deny" }
            key_prefix "config/web/" { policy = "write" }
            key "config/web/secret" { policy = "deny" }
        "#]);
        assert!(a.allows(Resource::Key("config/web/x"), Access::Write));
        assert!(a.allows(Resource::Key("config/web/x/y"), Access::Write));
        assert!(!a.allows(Resource::Key("config/web/secret"), Access::Read));
        assert!(a.allows(Resource::Key("config/web/secret/more"), Access::Write));
        assert!(!a.allows(Resource::Key("config/web"), Access::Read));
        assert!(!a.allows(Resource::Key("config/webx"), Access::Read));
        assert!(!a.allows(Resource::Key("config/db/x"), Access::Read));
        assert!(a.allows(Resource::Key("configuration"), Access::Read));
        assert!(!a.allows(Resource::Key("configuration"), Access::Write));
        assert!(a.allows(Resource::Key("other/x"), Access::Read));
    }

    #[test]
    fn deny_wins_when_policies_merge() {
        let write = r#"service "web" { policy = "write" }"#;
        let deny = r#"service "web" { policy = "deny" }"#;
        let read = r#"service "web" { policy = "read" }"#;
        for texts in [[write, deny], [deny, write], [read, deny], [deny, read]] {
            assert_eq!(authz(&texts).service("web"), Some(Level::Deny), "{texts:?}");
        }
        for texts in [[write, read], [read, write]] {
            assert_eq!(
                authz(&texts).service("web"),
                Some(Level::Write),
                "{texts:?}"
            );
        }
        assert_eq!(authz(&[read, read]).service("web"), Some(Level::Read));
        // Prefix rules merge per prefix too, and top-level levels.
        let a = authz(&[
            r#"key_prefix "app/" { policy = "write" }
               operator = "write"
               mesh = "read""#,
            r#"key_prefix "app/" { policy = "deny" }
               key_prefix "" { policy = "read" }
               operator = "deny"
               mesh = "write""#,
        ]);
        assert_eq!(a.key("app/x"), Some(Level::Deny));
        assert_eq!(a.key("other"), Some(Level::Read));
        assert_eq!(a.operator(), Some(Level::Deny));
        assert_eq!(a.mesh(), Some(Level::Write));
        assert_eq!(a.acl(), None);
    }

    #[test]
    fn an_exact_rule_in_one_policy_beats_a_prefix_in_another() {
        let a = authz(&[
            r#"service_prefix "" { policy = "write" }"#,
            r#"service "web" { policy = "read" }"#,
        ]);
        assert_eq!(a.service("web"), Some(Level::Read));
        assert_eq!(a.service("api"), Some(Level::Write));
    }

    #[test]
    fn policy_and_intentions_merge_separately() {
        let a = authz(&[
            r#"service "web" { policy = "write" }"#,
            r#"service "web" { policy = "read" intentions = "deny" }"#,
        ]);
        assert_eq!(a.service("web"), Some(Level::Write));
        assert_eq!(a.intentions("web"), Some(Level::Deny));
    }

    #[test]
    fn intentions_default_to_read_and_can_be_overridden() {
        let a = authz(&[r#"
            service "web" { policy = "write" }
            service "db" { policy = "deny" }
            service "api" { policy = "read" intentions = "write" }
            service "cache" { policy = "write" intentions = "deny" }
            service_prefix "" { policy = "read" }
            service_prefix "x-" { policy = "deny" intentions = "read" }
        "#]);
        assert_eq!(a.intentions("web"), Some(Level::Read));
        assert!(!a.allows(Resource::Intentions("web"), Access::Write));
        assert_eq!(a.intentions("db"), Some(Level::Deny));
        assert_eq!(a.service("api"), Some(Level::Read));
        assert_eq!(a.intentions("api"), Some(Level::Write));
        assert!(a.allows(Resource::Intentions("api"), Access::Write));
        assert!(!a.allows(Resource::Service("api"), Access::Write));
        assert_eq!(a.service("cache"), Some(Level::Write));
        assert_eq!(a.intentions("cache"), Some(Level::Deny));
        assert_eq!(a.intentions("other"), Some(Level::Read));
        assert_eq!(a.service("x-1"), Some(Level::Deny));
        assert_eq!(a.intentions("x-1"), Some(Level::Read));
        // A defaulted level equals the same level written out.
        assert_eq!(
            parse(r#"service "web" { policy = "write" }"#),
            parse(r#"service "web" { policy = "write" intentions = "read" }"#)
        );
        assert_ne!(
            parse(r#"service "web" { policy = "write" }"#),
            parse(r#"service "web" { policy = "write" intentions = "write" }"#)
        );
        assert_eq!(
            parse(r#"service "db" { policy = "deny" }"#),
            parse(r#"service "db" { policy = "deny" intentions = "deny" }"#)
        );
    }

    #[test]
    fn management_and_deny_all() {
        let m = Authorizer::management();
        assert!(m.is_management());
        for r in [
            Resource::Service("x"),
            Resource::Intentions("*"),
            Resource::Node("n"),
            Resource::Key("a/b"),
            Resource::Key(""),
            Resource::Operator,
            Resource::Acl,
            Resource::Mesh,
        ] {
            assert!(m.allows(r, Access::Write), "{r:?}");
            assert_eq!(m.level(r), Some(Level::Write));
        }
        for kind in ALL_KINDS {
            assert!(m.allows_all(kind, Access::Write));
            assert!(m.can_read_any(kind));
        }
        let d = Authorizer::deny_all();
        assert!(!d.is_management());
        for kind in ALL_KINDS {
            assert!(!d.allows_all(kind, Access::Read));
            assert!(!d.can_read_any(kind));
        }
        assert!(!d.allows(Resource::Operator, Access::Read));
        assert_eq!(d.service("x"), None);
        // Rules granting write on everything are not a management token.
        let all = authz(&[r#"
            service_prefix "" {
              policy = "write"
              intentions = "write"
            }
            node_prefix "" { policy = "write" }
            key_prefix "" { policy = "write" }
            operator = "write"
            acl = "write"
            mesh = "write"
        "#]);
        for kind in ALL_KINDS {
            assert!(all.allows_all(kind, Access::Write), "{kind:?}");
        }
        assert!(!all.is_management());
    }

    const ALL_KINDS: [ResourceKind; 7] = [
        ResourceKind::Service,
        ResourceKind::Intentions,
        ResourceKind::Node,
        ResourceKind::Key,
        ResourceKind::Operator,
        ResourceKind::Acl,
        ResourceKind::Mesh,
    ];

    #[test]
    fn node_identity() {
        let rules = node_identity_rules("node-a");
        assert_eq!(
            rules,
            parse(
                r#"node "node-a" { policy = "write" }
                   node_prefix "" { policy = "read" }
                   service_prefix "" { policy = "read" intentions = "read" }"#
            )
        );
        let a = Authorizer::from_rules([&rules]);
        assert!(a.allows(Resource::Node("node-a"), Access::Write));
        assert!(!a.allows(Resource::Node("node-b"), Access::Write));
        assert!(a.allows(Resource::Node("node-b"), Access::Read));
        assert!(a.allows(Resource::Service("web"), Access::Read));
        assert!(!a.allows(Resource::Service("web"), Access::Write));
        assert_eq!(a.intentions("web"), Some(Level::Read));
        assert_eq!(a.key("x"), None);
        assert_eq!(a.operator(), None);
        assert!(!a.is_management());
    }

    #[test]
    fn service_identity() {
        let rules = service_identity_rules("web");
        assert_eq!(
            rules,
            parse(
                r#"service "web" { policy = "write" }
                   service_prefix "" { policy = "read" }
                   node_prefix "" { policy = "read" }"#
            )
        );
        let a = Authorizer::from_rules([&rules]);
        assert!(a.allows(Resource::Service("web"), Access::Write));
        assert!(!a.allows(Resource::Intentions("web"), Access::Write));
        assert!(a.allows(Resource::Intentions("web"), Access::Read));
        assert!(!a.allows(Resource::Service("web2"), Access::Write));
        assert!(a.allows(Resource::Service("web2"), Access::Read));
        assert!(!a.allows(Resource::Intentions("api"), Access::Write));
        assert!(a.allows(Resource::Intentions("api"), Access::Read));
        assert!(a.allows(Resource::Node("n"), Access::Read));
        assert!(!a.allows(Resource::Node("n"), Access::Write));
        assert!(!a.allows(Resource::Key("k"), Access::Read));
        // A token with both identities and a policy: all merged.
        let node = node_identity_rules("n");
        let policy = parse(r#"service "web" { policy = "deny" }"#);
        let a = Authorizer::from_rules([&rules, &node, &policy]);
        assert_eq!(a.service("web"), Some(Level::Deny));
        assert_eq!(a.node("n"), Some(Level::Write));
    }

    #[test]
    fn allows_under_needs_the_covering_prefix_and_every_rule_inside() {
        let a = authz(&[r#"key_prefix "app/" { policy = "write" }"#]);
        assert!(a.allows_under(ResourceKind::Key, "app/", Access::Write));
        assert!(a.allows_under(ResourceKind::Key, "app/x/", Access::Write));
        assert!(
            !a.allows_under(ResourceKind::Key, "ap", Access::Write),
            "app/ does not cover ap*"
        );
        assert!(!a.allows_under(ResourceKind::Key, "", Access::Write));
        let inside = authz(&[
            r#"key_prefix "app/" { policy = "write" }"#,
            r#"key "app/secret" { policy = "read" }"#,
        ]);
        assert!(!inside.allows_under(ResourceKind::Key, "app/", Access::Write));
        assert!(inside.allows_under(ResourceKind::Key, "app/", Access::Read));
        assert!(inside.allows_under(ResourceKind::Key, "app/public/", Access::Write));
        let denied = authz(&[
            r#"key_prefix "" { policy = "write" }"#,
            r#"key_prefix "app/keep/" { policy = "deny" }"#,
        ]);
        assert!(!denied.allows_under(ResourceKind::Key, "app/", Access::Write));
        assert!(denied.allows_under(ResourceKind::Key, "other/", Access::Write));
        assert!(!authz(&[]).allows_under(ResourceKind::Key, "x", Access::Read));
    }

    #[test]
    fn allows_all_needs_the_empty_prefix_and_no_lesser_rule() {
        let all_write = r#"service_prefix "" {
            policy = "write"
            intentions = "write"
        }"#;
        assert!(authz(&[all_write]).allows_all(ResourceKind::Service, Access::Write));
        assert!(authz(&[all_write]).allows_all(ResourceKind::Intentions, Access::Write));
        let no_intentions = r#"service_prefix "" { policy = "write" }"#;
        assert!(!authz(&[no_intentions]).allows_all(ResourceKind::Intentions, Access::Write));
        let one_denied = authz(&[
            all_write,
            r#"service "db" { policy = "write" intentions = "deny" }"#,
        ]);
        assert!(one_denied.allows_all(ResourceKind::Service, Access::Write));
        assert!(!one_denied.allows_all(ResourceKind::Intentions, Access::Write));
        assert!(!one_denied.allows_all(ResourceKind::Intentions, Access::Read));
        let exact_deny = authz(&[all_write, r#"service "db" { policy = "deny" }"#]);
        assert!(!exact_deny.allows_all(ResourceKind::Service, Access::Read));
        let prefix_read = authz(&[all_write, r#"service_prefix "db" { policy = "read" }"#]);
        assert!(!prefix_read.allows_all(ResourceKind::Service, Access::Write));
        assert!(prefix_read.allows_all(ResourceKind::Service, Access::Read));
        // Only read on "" is not all-write.
        let read = authz(&[r#"key_prefix "" { policy = "read" }"#]);
        assert!(read.allows_all(ResourceKind::Key, Access::Read));
        assert!(!read.allows_all(ResourceKind::Key, Access::Write));
        // Write on everything that has a rule, but no "" rule.
        let no_empty = authz(&[r#"key_prefix "a" { policy = "write" }"#]);
        assert!(!no_empty.allows_all(ResourceKind::Key, Access::Read));
        // Operator-level checks.
        let op = authz(&[r#"operator = "read""#]);
        assert!(op.allows_all(ResourceKind::Operator, Access::Read));
        assert!(!op.allows_all(ResourceKind::Operator, Access::Write));
        assert!(!op.allows_all(ResourceKind::Acl, Access::Read));
    }

    #[test]
    fn can_read_any_looks_at_every_rule_of_the_kind() {
        let only_deny = authz(&[r#"
            service_prefix "" { policy = "deny" }
            service "a" { policy = "deny" }
            operator = "deny"
        "#]);
        assert!(!only_deny.can_read_any(ResourceKind::Service));
        assert!(!only_deny.can_read_any(ResourceKind::Intentions));
        assert!(!only_deny.can_read_any(ResourceKind::Operator));
        assert!(!only_deny.can_read_any(ResourceKind::Node));
        let one_exact = authz(&[r#"
            service_prefix "" { policy = "deny" }
            service "a" { policy = "read" intentions = "deny" }
            node "n" { policy = "write" }
        "#]);
        assert!(one_exact.can_read_any(ResourceKind::Service));
        assert!(!one_exact.can_read_any(ResourceKind::Intentions));
        assert!(one_exact.can_read_any(ResourceKind::Node));
        assert!(!one_exact.can_read_any(ResourceKind::Key));
        // A read merged away by a deny in another policy reads nothing.
        let merged = authz(&[
            r#"key_prefix "a/" { policy = "read" }"#,
            r#"key_prefix "a/" { policy = "deny" }
               mesh = "read""#,
        ]);
        assert!(!merged.can_read_any(ResourceKind::Key));
        assert!(merged.can_read_any(ResourceKind::Mesh));
    }

    #[test]
    fn unknown_kinds_are_named() {
        let e = err_says(
            r#"agent "n1" { policy = "read" }"#,
            &["unknown rule kind \"agent\""],
        );
        assert_eq!(e, AclError::UnknownKind("agent".into()));
        assert_eq!(
            err(r#"{"agent": {"n1": {"policy": "read"}}}"#),
            AclError::UnknownKind("agent".into())
        );
        assert_eq!(
            err(r#"services = "read""#),
            AclError::UnknownKind("services".into())
        );
        assert_eq!(
            err(r#"{"operator": "read", "keyring": "read"}"#),
            AclError::UnknownKind("keyring".into())
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let hcl = err_says(
            r#"service "web" { polcy = "read" }"#,
            &[
                r#"service "web""#,
                r#"unknown field "polcy""#,
                "policy or intentions",
            ],
        );
        let json = err(r#"{"service": {"web": {"polcy": "read"}}}"#);
        assert_eq!(hcl, json);
        // intentions exist only on service rules.
        err_says(
            r#"node "n1" { policy = "read" intentions = "read" }"#,
            &[
                r#"node "n1""#,
                r#"unknown field "intentions" (expected policy)"#,
            ],
        );
        err_says(
            r#"{"key_prefix": {"a/": {"policy": "read", "extra": true}}}"#,
            &[r#"key_prefix "a/""#, r#"unknown field "extra""#],
        );
        err_says(
            r#"service "web" {
                 policy = "read"
                 meta { x = "y" }
               }"#,
            &[r#"service "web""#, r#"unexpected block "meta""#],
        );
    }

    #[test]
    fn bad_levels_are_named() {
        let e = err(r#"service "web" { policy = "admin" }"#);
        assert_eq!(
            e.to_string(),
            r#"service "web": policy "admin" is not read, write or deny"#
        );
        assert_eq!(e, err(r#"{"service": {"web": {"policy": "admin"}}}"#));
        err_says(
            r#"service_prefix "" { policy = "read" intentions = "all" }"#,
            &[
                r#"service_prefix """#,
                r#"intentions "all" is not read, write or deny"#,
            ],
        );
        assert_eq!(
            err(r#"operator = "Write""#).to_string(),
            r#"operator: "Write" is not read, write or deny"#
        );
        err_says(
            r#"{"mesh": ""}"#,
            &["mesh", r#""" is not read, write or deny"#],
        );
        // "list" is Consul's, on keys only; elsewhere it is just a bad level.
        err_says(
            r#"node "n" { policy = "list" }"#,
            &[r#"node "n""#, r#"policy "list" is not read, write or deny"#],
        );
    }

    #[test]
    fn list_on_keys_is_not_supported() {
        let e = err(r#"key_prefix "app/" { policy = "list" }"#);
        assert_eq!(
            e.to_string(),
            r#"key_prefix "app/": policy "list" is not supported (use read)"#
        );
        assert_eq!(e, err(r#"{"key_prefix": {"app/": {"policy": "list"}}}"#));
        err_says(
            r#"key "app/x" { policy = "list" }"#,
            &[r#"key "app/x""#, "not supported"],
        );
    }

    #[test]
    fn a_missing_policy_is_named() {
        let e = err(r#"service "web" { intentions = "read" }"#);
        assert_eq!(e.to_string(), r#"service "web": policy is missing"#);
        assert_eq!(e, err(r#"{"service": {"web": {"intentions": "read"}}}"#));
        err_says(
            r#"node_prefix "" {}"#,
            &[r#"node_prefix """#, "policy is missing"],
        );
    }

    #[test]
    fn wrong_types_are_named() {
        let e = err(r#"service "web" { policy = 1 }"#);
        assert_eq!(
            e.to_string(),
            r#"service "web": policy must be a string (read, write or deny), not a number"#
        );
        assert_eq!(e, err(r#"{"service": {"web": {"policy": 1}}}"#));
        err_says(
            r#"{"service": {"web": {"policy": ["read"]}}}"#,
            &[
                r#"service "web""#,
                "policy must be a string",
                "not an array",
            ],
        );
        err_says(
            r#"{"service": {"web": "write"}}"#,
            &[r#"service "web""#, "must be a rule block", "not a string"],
        );
        err_says(
            r#"{"service": "web"}"#,
            &["service: must be an object of named rules, not a string"],
        );
        err_says(
            r#"{"service": ["web"]}"#,
            &["service: must be an array of objects", "not a string"],
        );
        err_says(
            r#"{"service": {"web": []}}"#,
            &[r#"service "web""#, "not an empty array"],
        );
        err_says(
            r#"{"operator": {"policy": "read"}}"#,
            &["operator: must be a string", "not an object"],
        );
        err_says(r#"{"acl": null}"#, &["acl: must be a string", "not null"]);
        err_says(r#"{"mesh": true}"#, &["mesh", "not a boolean"]);
        // HCL's own shapes.
        err_says(
            r#"service = { web = { policy = "read" } }"#,
            &[r#"service: must be written as blocks, service "NAME" {"#],
        );
        err_says(
            r#"operator { policy = "read" }"#,
            &["operator: must be an attribute"],
        );
        err_says(
            r#"service { policy = "read" }"#,
            &["service: a block takes exactly one label", "not 0"],
        );
        err_says(
            r#"service "a" "b" { policy = "read" }"#,
            &["service: a block takes exactly one label", "not 2"],
        );
        err_says(
            r#"service "web" { policy = read }"#,
            &[r#"service "web": policy must be a quoted string such as "read", not an expression"#],
        );
        err_says(
            r#"operator = "${var.level}""#,
            &["operator: must be a quoted string"],
        );
    }

    #[test]
    fn hcl_1_one_line_forms_are_accepted() {
        let multi = parse(
            r#"
            service "api" {
              policy     = "read"
              intentions = "write"
            }
            service "web" {
              policy = "write"
            }
            key_prefix "" {
              policy = "read"
            }
            operator = "read"
            mesh = "deny"
            "#,
        );
        for text in [
            r#"service "api" { policy = "read" intentions = "write" }
               service "web" { policy = "write" }
               key_prefix "" { policy = "read" }
               operator = "read" mesh = "deny""#,
            "service \"api\" {\tpolicy = \"read\"\tintentions = \"write\"\t}\n\
             service \"web\" { policy = \"write\" } key_prefix \"\" { policy = \"read\" }\n\
             # a comment { policy = \"read\" x = \"y\" }\n\
             /* and { another } */ operator = \"read\"\n\
             mesh = \"deny\" // the end",
        ] {
            assert_eq!(parse(text), multi, "{text}");
        }
        // Strings are left alone, even when they look like attributes.
        let name = r#"a" b = "c } d"#;
        let a = authz(&[r#"service "a\" b = \"c } d" { policy = "read" intentions = "write" }"#]);
        assert_eq!(a.service(name), Some(Level::Read));
        assert_eq!(a.intentions(name), Some(Level::Write));
        // The split lines are decoded like any others.
        assert_eq!(
            err(r#"key_prefix "k" { policy = "read" intentions = "read" }"#),
            rule_err(
                "key_prefix",
                Some("k"),
                Problem::UnknownField {
                    field: "intentions".into(),
                    expected: "policy"
                }
            )
        );
        // Errors point into the text as written.
        let e = err("operator = \"read\"\nservice \"a\" { policy = \"read\" intentions = }");
        assert!(e.to_string().contains("line 2"), "{e}");
        // Interpolations and heredocs are not scanned: no second attempt.
        assert_eq!(split_attribute_lines(r#"a = "${x}" b = "y""#), None);
        assert_eq!(split_attribute_lines("a = <<EOF\nx\nEOF\n"), None);
        assert_eq!(split_attribute_lines("a = \"x\"\n"), None);
        assert_eq!(
            split_attribute_lines(r#"s "n" { p = "r" i = "w" }"#).as_deref(),
            Some("s \"n\" {\np = \"r\"\ni = \"w\"\n}")
        );
    }

    #[test]
    fn only_a_document_starting_with_a_brace_is_json() {
        // Anything else is HCL, whose parser refuses a bare array.
        assert!(matches!(err("  [1, 2]"), AclError::Hcl(_)));
        assert!(matches!(err("\n\t{"), AclError::Json(_)));
        assert!(matches!(err("operator = \"read\" {"), AclError::Hcl(_)));
    }

    #[test]
    fn empty_exact_names_are_refused() {
        let e = err(r#"key "" { policy = "read" }"#);
        assert_eq!(
            e.to_string(),
            r#"key "": the name is empty (to match every name, write key_prefix "")"#
        );
        assert_eq!(e, err(r#"{"key": {"": {"policy": "read"}}}"#));
        err_says(
            r#"service "" { policy = "read" }"#,
            &["service_prefix \"\""],
        );
    }

    #[test]
    fn syntax_errors_carry_the_parsers_message() {
        let e = err(r#"service "web" { policy = "read" "#);
        assert!(matches!(e, AclError::Hcl(_)), "{e:?}");
        assert!(e.to_string().starts_with("invalid HCL: "), "{e}");
        assert!(e.to_string().len() > "invalid HCL: ".len() + 10, "{e}");
        let e = err(r#"{"service": {"web": {"policy": "read"}}"#);
        assert!(matches!(e, AclError::Json(_)), "{e:?}");
        assert!(e.to_string().contains("EOF"), "{e}");
        let e = err(r#"{"operator": "read",}"#);
        assert!(e.to_string().contains("line 1 column"), "{e}");
        let e = err(r#"{"operator": "read"} trailing"#);
        assert!(matches!(e, AclError::Json(_)), "{e:?}");
        // A repeated key deeper than any rule: the JSON parser's position.
        let e = err(r#"{"service": {"web": {"policy": {"a": 1, "a": 2}}}}"#);
        assert!(matches!(e, AclError::Json(_)), "{e:?}");
        assert!(e.to_string().contains(r#"key "a" is given twice"#), "{e}");
        assert!(e.to_string().contains("column"), "{e}");
    }

    #[test]
    fn deeply_nested_rules_are_refused_before_parsing() {
        let slow = include_bytes!("../../fuzz/seeds/acl_rules/deep-nesting");
        let text = String::from_utf8_lossy(slow);
        let e = parse_rules(&text).unwrap_err().to_string();
        assert!(e.contains("nested more than 8 deep"), "{e}");
        assert!(parse_rules(r#"service "web" { policy = "read" }"#).is_ok());
    }
}
