//! Intentions: which service may talk to which, and the decision for one
//! connection or request, with Consul's rules.
//!
//! - Source and destination are service names or `*`. A source may also
//!   name the caller's datacenter, `web@dc2` or `*@dc2` (weft's, not
//!   Consul's: the caller's datacenter is read from its certificate's SPIFFE
//!   id); without one it is any datacenter's. Only intentions whose pair
//!   matches count; the most specific one decides, with Consul's precedence numbers:
//!   exact→exact 9, `*`→exact 8, exact→`*` 6, `*`→`*` 5, and at equal numbers
//!   a source naming a datacenter before one that does not. Pairs are unique, so equal
//!   precedence only happens with duplicates; then deny wins.
//! - An L4 intention has an `Action`. An L7 intention has ordered `Permissions`
//!   instead (never both): the first permission whose HTTP rules match the request
//!   decides. **If no permission matches, the default action applies**, as Consul
//!   documents ("traffic that fails to match any of the provided permissions in this
//!   intention will be subject to the default intention behavior").
//! - An L7 intention cannot judge a plain L4 connection (no request): it denies, as
//!   Consul's L4 `intention check` does. Anything that cannot be checked is denied.
//! - With no matching intention the caller's default applies.
//!
//! Serialized with Consul's PascalCase field names (`Source`, `Destination`,
//! `Action`, `Permissions`, `HTTP`, ...), so an L7 file looks like Consul's.

use std::cmp::Reverse;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::file_format::{parse_document, FileFormat, ParseError};
use crate::http_match::{check_rule_paths, validate_http_match, Repeated};
pub use crate::http_match::{HeaderMatch, HttpMatch, HttpMatchError, Request};
use crate::names::{validate_name_or_wildcard, NameError, WILDCARD};

/// Longest description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 512;
/// Most permissions on one intention.
pub const MAX_PERMISSIONS: usize = 100;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntentionAction {
    Allow,
    Deny,
}

impl IntentionAction {
    pub fn is_allow(self) -> bool {
        self == IntentionAction::Allow
    }
}

impl fmt::Display for IntentionAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IntentionAction::Allow => "allow",
            IntentionAction::Deny => "deny",
        })
    }
}

impl FromStr for IntentionAction {
    type Err = IntentionError;
    fn from_str(s: &str) -> Result<Self, IntentionError> {
        match s {
            "allow" => Ok(IntentionAction::Allow),
            "deny" => Ok(IntentionAction::Deny),
            _ => Err(IntentionError::invalid(
                "Action",
                format!("{s:?} is not allow or deny"),
            )),
        }
    }
}

/// Who calls, as intentions judge it: its service and its datacenter (a
/// local caller's is the agent's own; a peer's comes from its SPIFFE id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    pub service: &'a str,
    pub datacenter: &'a str,
}

impl<'a> Caller<'a> {
    pub fn new(service: &'a str, datacenter: &'a str) -> Self {
        Caller {
            service,
            datacenter,
        }
    }
}

/// Splits an intention's source into its service (or `*`) and the
/// datacenter it names, if any: `web@dc2` is `("web", Some("dc2"))`.
pub fn split_source(source: &str) -> (&str, Option<&str>) {
    match source.split_once('@') {
        Some((service, datacenter)) => (service, Some(datacenter)),
        None => (source, None),
    }
}

/// One L7 rule: if the request matches `http`, `action` decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Permission {
    pub action: IntentionAction,
    #[serde(rename = "HTTP")]
    pub http: HttpMatch,
}

/// Who may talk to whom. Exactly one of `action` (L4) or non-empty `permissions`
/// (L7) is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Intention {
    pub source: String,
    pub destination: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<IntentionAction>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<Permission>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

/// The identity of an intention: its (source, destination) pair.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IntentionKey {
    pub source: String,
    pub destination: String,
}

impl IntentionKey {
    pub fn new(source: impl Into<String>, destination: impl Into<String>) -> Self {
        IntentionKey {
            source: source.into(),
            destination: destination.into(),
        }
    }
}

impl fmt::Display for IntentionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} => {}", self.source, self.destination)
    }
}

/// Consul's precedence of a (source, destination) pair: 9, 8, 6 or 5
/// (a source's datacenter does not change it).
pub fn precedence(source: &str, destination: &str) -> u32 {
    match (split_source(source).0 == WILDCARD, destination == WILDCARD) {
        (false, false) => 9,
        (true, false) => 8,
        (false, true) => 6,
        (true, true) => 5,
    }
}

impl Intention {
    /// An L4 intention.
    pub fn l4(
        source: impl Into<String>,
        destination: impl Into<String>,
        action: IntentionAction,
    ) -> Self {
        Intention {
            source: source.into(),
            destination: destination.into(),
            action: Some(action),
            permissions: Vec::new(),
            description: String::new(),
            create_index: 0,
            modify_index: 0,
        }
    }

    /// An L7 intention.
    pub fn l7(
        source: impl Into<String>,
        destination: impl Into<String>,
        permissions: Vec<Permission>,
    ) -> Self {
        Intention {
            action: None,
            permissions,
            ..Intention::l4(source, destination, IntentionAction::Deny)
        }
    }

    /// Its (source, destination) pair.
    pub fn key(&self) -> IntentionKey {
        IntentionKey::new(&self.source, &self.destination)
    }

    /// Whether it carries L7 permissions.
    pub fn is_l7(&self) -> bool {
        !self.permissions.is_empty()
    }

    /// Consul's precedence of its pair.
    pub fn precedence(&self) -> u32 {
        precedence(&self.source, &self.destination)
    }

    /// Its rank among intentions that apply: Consul's precedence, then
    /// whether its source names a datacenter.
    pub fn specificity(&self) -> (u32, bool) {
        (self.precedence(), split_source(&self.source).1.is_some())
    }

    /// Whether it applies to traffic from `caller` to `destination` (a
    /// concrete name).
    pub fn applies_to(&self, caller: Caller<'_>, destination: &str) -> bool {
        let (service, datacenter) = split_source(&self.source);
        (service == WILDCARD || service == caller.service)
            && datacenter.is_none_or(|dc| dc == caller.datacenter)
            && (self.destination == WILDCARD || self.destination == destination)
    }
}

/// The intention with exactly this (source, destination) pair, if any. `*` is
/// compared literally here: this finds the stored intention, it does not evaluate.
pub fn find_intention<'a>(
    intentions: &'a [Intention],
    source: &str,
    destination: &str,
) -> Option<&'a Intention> {
    intentions
        .iter()
        .find(|i| i.source == source && i.destination == destination)
}

/// Sorts intentions into evaluation order (as `consul intention match` lists them):
/// highest precedence first, then by source and destination name.
pub fn sort_by_precedence(intentions: &mut [Intention]) {
    intentions.sort_by_key(|i| {
        (
            Reverse(i.specificity()),
            i.source.clone(),
            i.destination.clone(),
        )
    });
}

/// What decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum DecidedBy {
    /// This intention decided: its action (L4), the permission at
    /// `permission_index` (L7), or, for an L7 intention with no request or an
    /// unusable rule, a deny with `permission_index` naming the rule if any.
    Intention {
        source: String,
        destination: String,
        permission_index: Option<usize>,
    },
    /// This L7 intention was the most specific match, but none of its permissions
    /// matched the request, so the default action applied (Consul's behaviour).
    NoPermissionMatched { source: String, destination: String },
    /// No intention matched the pair; the default action applied.
    Default,
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecidedBy::Intention {
                source,
                destination,
                permission_index: None,
            } => write!(f, "intention {source} => {destination}"),
            DecidedBy::Intention {
                source,
                destination,
                permission_index: Some(i),
            } => write!(f, "intention {source} => {destination}, permission {i}"),
            DecidedBy::NoPermissionMatched {
                source,
                destination,
            } => write!(
                f,
                "default action (no permission of intention {source} => {destination} matched)"
            ),
            DecidedBy::Default => f.write_str("default action (no intention matched)"),
        }
    }
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    pub by: DecidedBy,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        write!(f, "{verdict} by {}", self.by)
    }
}

/// Decides whether `source` may reach `destination`. `request` is the HTTP request
/// for L7 checks, or `None` for an L4 connection. See the module doc for the rules.
pub fn evaluate<'a>(
    intentions: impl IntoIterator<Item = &'a Intention>,
    caller: Caller<'_>,
    destination: &str,
    request: Option<&Request>,
    default: IntentionAction,
) -> Decision {
    let deciding = deciding(intentions, caller, destination);
    if deciding.is_empty() {
        return Decision {
            allowed: default.is_allow(),
            by: DecidedBy::Default,
        };
    }
    let mut result: Option<Decision> = None;
    for intention in deciding {
        let decision = decide_one(intention, request, default);
        match &result {
            Some(current) if !current.allowed || decision.allowed => {}
            _ => result = Some(decision),
        }
    }
    // `top` came from a matching intention, so there is a result.
    result.unwrap_or(Decision {
        allowed: false,
        by: DecidedBy::Default,
    })
}

/// How a connection is judged before any request on it has been seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionDecision {
    /// The intentions decide the whole connection.
    Decided(Decision),
    /// An L7 intention decides: each HTTP request on the connection must be
    /// judged with [`evaluate`]. A connection that carries no HTTP is denied.
    PerRequest,
}

/// Judges a connection from `source` to `destination`: [`evaluate`] without a
/// request, except that where the deciding intention is an L7 one the answer
/// is [`ConnectionDecision::PerRequest`] instead of a deny. An L4 deny at the
/// same precedence still denies the connection outright.
pub fn evaluate_connection<'a>(
    intentions: impl IntoIterator<Item = &'a Intention>,
    caller: Caller<'_>,
    destination: &str,
    default: IntentionAction,
) -> ConnectionDecision {
    let deciding = deciding(intentions, caller, destination);
    let l7 = deciding.iter().any(|i| i.is_l7());
    let l4_deny = deciding
        .iter()
        .any(|i| i.action == Some(IntentionAction::Deny));
    if l7 && !l4_deny {
        return ConnectionDecision::PerRequest;
    }
    ConnectionDecision::Decided(evaluate(deciding, caller, destination, None, default))
}

/// The intentions that decide for the pair: those that apply to it with the
/// highest precedence among them (none when nothing applies).
fn deciding<'a>(
    intentions: impl IntoIterator<Item = &'a Intention>,
    caller: Caller<'_>,
    destination: &str,
) -> Vec<&'a Intention> {
    let matching: Vec<&Intention> = intentions
        .into_iter()
        .filter(|i| i.applies_to(caller, destination))
        .collect();
    let top = matching.iter().map(|i| i.specificity()).max();
    matching
        .into_iter()
        .filter(|i| Some(i.specificity()) == top)
        .collect()
}

fn decide_one(
    intention: &Intention,
    request: Option<&Request>,
    default: IntentionAction,
) -> Decision {
    let by = |permission_index| DecidedBy::Intention {
        source: intention.source.clone(),
        destination: intention.destination.clone(),
        permission_index,
    };
    match (intention.action, intention.permissions.is_empty()) {
        (Some(action), true) => Decision {
            allowed: action.is_allow(),
            by: by(None),
        },
        // Invalid (both or neither): refused at write time; deny if one slips in.
        (Some(_), false) | (None, true) => Decision {
            allowed: false,
            by: by(None),
        },
        (None, false) => {
            let Some(request) = request else {
                return Decision {
                    allowed: false,
                    by: by(None),
                };
            };
            for (i, permission) in intention.permissions.iter().enumerate() {
                // A repeated header is read every way the instance might:
                // a deny matches on any reading, an allow needs all.
                let repeated = if permission.action.is_allow() {
                    Repeated::EveryReading
                } else {
                    Repeated::AnyReading
                };
                match permission.http.matches_read(request, repeated) {
                    Ok(true) => {
                        return Decision {
                            allowed: permission.action.is_allow(),
                            by: by(Some(i)),
                        }
                    }
                    Ok(false) => {}
                    // A rule that cannot be applied: deny rather than guess.
                    Err(_) => {
                        return Decision {
                            allowed: false,
                            by: by(Some(i)),
                        }
                    }
                }
            }
            Decision {
                allowed: default.is_allow(),
                by: DecidedBy::NoPermissionMatched {
                    source: intention.source.clone(),
                    destination: intention.destination.clone(),
                },
            }
        }
    }
}

/// Why an intention was refused. The message starts with the field, e.g.
/// `Source: bad character 'A' at position 1 ...` or
/// `Permissions[1].HTTP.PathRegex: invalid regex: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntentionError {
    #[error("{field}: {source}")]
    Name {
        field: &'static str,
        #[source]
        source: NameError,
    },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0}")]
    Parse(#[from] ParseError),
}

impl IntentionError {
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        IntentionError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The field the error is about (empty for a file that did not parse).
    pub fn field(&self) -> &str {
        match self {
            IntentionError::Name { field, .. } => field,
            IntentionError::Invalid { field, .. } => field,
            IntentionError::Parse(_) => "",
        }
    }
}

impl From<HttpMatchError> for IntentionError {
    fn from(e: HttpMatchError) -> Self {
        IntentionError::Invalid {
            field: e.field,
            reason: e.reason,
        }
    }
}

/// Refuses permissions whose `PathExact` or `PathPrefix` no request can
/// have ([`check_rule_paths`]). The servers' API calls it on every write,
/// after [`validate_intention`]; Raft's apply does not.
pub fn check_intention_paths(intention: &Intention) -> Result<(), IntentionError> {
    for (i, permission) in intention.permissions.iter().enumerate() {
        check_rule_paths(&format!("Permissions[{i}].HTTP"), &permission.http)?;
    }
    Ok(())
}

/// Checks an intention before it is written. Whether the destination speaks HTTP
/// (needed for permissions) is checked by
/// [`crate::config_entry::validate_intention_protocol`].
pub fn validate_intention(intention: &Intention) -> Result<(), IntentionError> {
    validate_source(&intention.source)?;
    validate_name_or_wildcard(&intention.destination).map_err(|source| IntentionError::Name {
        field: "Destination",
        source,
    })?;
    match (intention.action.is_some(), intention.permissions.is_empty()) {
        (true, true) | (false, false) => {}
        (true, false) => {
            return Err(IntentionError::invalid(
                "Action",
                "exactly one of Action or Permissions must be set (found both)",
            ))
        }
        (false, true) => {
            return Err(IntentionError::invalid(
                "Action",
                "exactly one of Action or Permissions must be set (found neither)",
            ))
        }
    }
    if intention.permissions.len() > MAX_PERMISSIONS {
        return Err(IntentionError::invalid(
            "Permissions",
            format!(
                "too many permissions ({} > {MAX_PERMISSIONS})",
                intention.permissions.len()
            ),
        ));
    }
    for (i, permission) in intention.permissions.iter().enumerate() {
        let field = format!("Permissions[{i}].HTTP");
        if permission.http.is_empty() {
            return Err(IntentionError::invalid(
                field,
                "must set at least one of PathExact, PathPrefix, PathRegex, Methods, Header",
            ));
        }
        if permission.http.case_insensitive {
            return Err(IntentionError::invalid(
                format!("{field}.CaseInsensitive"),
                "not a field of intention permissions (service-router routes take it)",
            ));
        }
        if !permission.http.query_param.is_empty() {
            // As in Consul: intentions match path, method and headers.
            return Err(IntentionError::invalid(
                format!("{field}.QueryParam"),
                "not a field of intention permissions (service-router routes match query \
                 parameters)",
            ));
        }
        validate_http_match(&field, &permission.http)?;
    }
    if intention.description.len() > MAX_DESCRIPTION_LEN {
        return Err(IntentionError::invalid(
            "Description",
            format!(
                "too long ({} > {MAX_DESCRIPTION_LEN} bytes)",
                intention.description.len()
            ),
        ));
    }
    Ok(())
}

/// Checks an intention's source: a service name or `*`, optionally
/// `@` a datacenter's name.
pub fn validate_source(source: &str) -> Result<(), IntentionError> {
    let (service, datacenter) = split_source(source);
    validate_name_or_wildcard(service).map_err(|source| IntentionError::Name {
        field: "Source",
        source,
    })?;
    if let Some(dc) = datacenter {
        crate::names::validate_name(dc).map_err(|source| IntentionError::Name {
            field: "Source datacenter",
            source,
        })?;
    }
    Ok(())
}

/// The document `weft intention create SRC DST --file L7.toml` reads: a list of
/// permissions, e.g. in TOML
///
/// ```toml
/// [[Permissions]]
/// Action = "allow"
/// HTTP = { PathPrefix = "/api", Methods = ["GET"] }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PermissionsFile {
    pub permissions: Vec<Permission>,
}

/// Parses an L7 permissions file (see [`PermissionsFile`]).
pub fn parse_permissions_file(
    text: &str,
    format: FileFormat,
) -> Result<Vec<Permission>, IntentionError> {
    Ok(parse_document::<PermissionsFile>(text, format)?.permissions)
}

#[cfg(test)]
mod tests {
    /// A caller in dc1.
    fn at(service: &str) -> Caller<'_> {
        Caller::new(service, "dc1")
    }
    use super::*;
    use IntentionAction::{Allow, Deny};

    fn perm(action: IntentionAction, http: HttpMatch) -> Permission {
        Permission { action, http }
    }

    fn prefix(p: &str) -> HttpMatch {
        HttpMatch {
            path_prefix: Some(p.into()),
            ..Default::default()
        }
    }

    fn by(source: &str, destination: &str, permission_index: Option<usize>) -> DecidedBy {
        DecidedBy::Intention {
            source: source.into(),
            destination: destination.into(),
            permission_index,
        }
    }

    /// The four kinds of pair for traffic web → db, in precedence order.
    const KINDS: [(&str, &str, u32); 4] = [
        ("web", "db", 9),
        ("*", "db", 8),
        ("web", "*", 6),
        ("*", "*", 5),
    ];

    #[test]
    fn precedence_numbers() {
        for (s, d, p) in KINDS {
            assert_eq!(precedence(s, d), p);
            assert_eq!(Intention::l4(s, d, Allow).precedence(), p);
        }
    }

    #[test]
    fn full_l4_precedence_matrix() {
        // Every subset of the four kinds, every action per kind, both defaults:
        // the most specific present kind decides, else the default.
        for mask in 0u32..16 {
            for actions in 0u32..16 {
                for default in [Allow, Deny] {
                    let mut intentions = Vec::new();
                    for (k, (s, d, _)) in KINDS.iter().enumerate() {
                        if mask & (1 << k) != 0 {
                            let a = if actions & (1 << k) != 0 { Allow } else { Deny };
                            intentions.push(Intention::l4(*s, *d, a));
                        }
                    }
                    // Order in the slice must not matter.
                    for reversed in [false, true] {
                        let mut list = intentions.clone();
                        if reversed {
                            list.reverse();
                        }
                        let got = evaluate(&list, at("web"), "db", None, default);
                        let want = match (0..4).find(|k| mask & (1 << k) != 0) {
                            Some(k) => Decision {
                                allowed: actions & (1 << k) != 0,
                                by: by(KINDS[k].0, KINDS[k].1, None),
                            },
                            None => Decision {
                                allowed: default.is_allow(),
                                by: DecidedBy::Default,
                            },
                        };
                        assert_eq!(
                            got, want,
                            "mask {mask:04b} actions {actions:04b} default {default}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pairwise_kinds_higher_wins_both_ways() {
        for (i, hi) in KINDS.iter().enumerate() {
            for lo in &KINDS[i + 1..] {
                for (ha, la) in [(Allow, Deny), (Deny, Allow)] {
                    let list = vec![Intention::l4(lo.0, lo.1, la), Intention::l4(hi.0, hi.1, ha)];
                    for default in [Allow, Deny] {
                        let d = evaluate(&list, at("web"), "db", None, default);
                        assert_eq!(d.allowed, ha.is_allow(), "{hi:?} {ha} over {lo:?} {la}");
                        assert_eq!(d.by, by(hi.0, hi.1, None));
                    }
                }
            }
        }
    }

    #[test]
    fn only_matching_pairs_count() {
        let list = vec![
            Intention::l4("other", "db", Allow),
            Intention::l4("web", "other", Allow),
            Intention::l4("*", "other", Allow),
            Intention::l4("other", "*", Allow),
        ];
        let d = evaluate(&list, at("web"), "db", None, Deny);
        assert_eq!(
            d,
            Decision {
                allowed: false,
                by: DecidedBy::Default
            }
        );
        let d = evaluate(&list, at("web"), "db", None, Allow);
        assert_eq!(
            d,
            Decision {
                allowed: true,
                by: DecidedBy::Default
            }
        );
        // The wildcard ones still apply to their own pairs.
        assert!(evaluate(&list, at("x"), "other", None, Deny).allowed);
        assert!(evaluate(&list, at("other"), "x", None, Deny).allowed);
        assert!(evaluate(&[], at("web"), "db", None, Allow).allowed);
        assert!(!evaluate(&[], at("web"), "db", None, Deny).allowed);
    }

    #[test]
    fn duplicates_at_equal_precedence_deny_wins() {
        for order in [[Allow, Deny], [Deny, Allow]] {
            let list = vec![
                Intention::l4("web", "db", order[0]),
                Intention::l4("web", "db", order[1]),
            ];
            let d = evaluate(&list, at("web"), "db", None, Allow);
            assert!(!d.allowed);
        }
        let list = vec![
            Intention::l4("web", "db", Allow),
            Intention::l4("web", "db", Allow),
        ];
        assert!(evaluate(&list, at("web"), "db", None, Deny).allowed);
    }

    #[test]
    fn connection_with_an_l7_intention_is_judged_per_request() {
        for default in [Allow, Deny] {
            assert_eq!(
                evaluate_connection(&l7_list(), at("web"), "db", default),
                ConnectionDecision::PerRequest
            );
        }
        // A more specific L4 intention decides the connection on its own.
        let mut list = l7_list();
        list.push(Intention::l7("*", "db", vec![perm(Allow, prefix("/"))]));
        list[0] = Intention::l4("web", "db", Allow);
        assert_eq!(
            evaluate_connection(&list, at("web"), "db", Deny),
            ConnectionDecision::Decided(Decision {
                allowed: true,
                by: by("web", "db", None)
            })
        );
        // The L7 intention below it decides for other sources.
        assert_eq!(
            evaluate_connection(&list, at("api"), "db", Deny),
            ConnectionDecision::PerRequest
        );
    }

    #[test]
    fn connection_without_l7_intentions_is_evaluate_without_a_request() {
        for mask in 0u32..16 {
            for default in [Allow, Deny] {
                let list: Vec<Intention> = KINDS
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| mask & (1 << k) != 0)
                    .map(|(k, (s, d, _))| {
                        Intention::l4(*s, *d, if k % 2 == 0 { Deny } else { Allow })
                    })
                    .collect();
                assert_eq!(
                    evaluate_connection(&list, at("web"), "db", default),
                    ConnectionDecision::Decided(evaluate(&list, at("web"), "db", None, default))
                );
            }
        }
    }

    #[test]
    fn an_l4_deny_at_the_same_precedence_denies_the_connection() {
        let list = vec![
            Intention::l7("web", "db", vec![perm(Allow, prefix("/"))]),
            Intention::l4("web", "db", Deny),
        ];
        match evaluate_connection(&list, at("web"), "db", Allow) {
            ConnectionDecision::Decided(d) => assert!(!d.allowed),
            other => panic!("expected a deny, got {other:?}"),
        }
    }

    #[test]
    fn a_source_naming_a_datacenter_applies_to_that_datacenter_s_callers_only() {
        let from_dc2 = Caller::new("web", "dc2");
        // `*@dc2 -> db` deny: web of dc2 refused, web of dc1 allowed by default.
        let list = vec![Intention::l4("*@dc2", "db", Deny)];
        assert!(!evaluate(&list, from_dc2, "db", None, Allow).allowed);
        assert!(evaluate(&list, at("web"), "db", None, Allow).allowed);
        // An exact source name still outranks a wildcard, whatever its datacenter.
        let list = vec![
            Intention::l4("*@dc2", "db", Deny),
            Intention::l4("web", "db", Allow),
        ];
        assert!(evaluate(&list, from_dc2, "db", None, Deny).allowed);
        // At equal precedence the one naming the datacenter decides, both ways.
        let list = vec![
            Intention::l4("web", "db", Allow),
            Intention::l4("web@dc2", "db", Deny),
        ];
        let d = evaluate(&list, from_dc2, "db", None, Allow);
        assert!(!d.allowed);
        assert_eq!(d.to_string(), "denied by intention web@dc2 => db");
        assert!(evaluate(&list, at("web"), "db", None, Deny).allowed);
        let list = vec![
            Intention::l4("web", "db", Deny),
            Intention::l4("web@dc1", "db", Allow),
        ];
        assert!(evaluate(&list, at("web"), "db", None, Deny).allowed);
        assert!(!evaluate(&list, from_dc2, "db", None, Allow).allowed);
        // A caller whose datacenter is unknown ("" for plaintext) matches no
        // datacenter's intention.
        let list = vec![Intention::l4("*@dc1", "db", Allow)];
        assert!(!evaluate(&list, Caller::new("", ""), "db", None, Deny).allowed);
        // Sorted as evaluated: the datacenter's first among equals.
        let mut list = vec![
            Intention::l4("web", "db", Allow),
            Intention::l4("web@dc2", "db", Deny),
            Intention::l4("*@dc2", "db", Deny),
        ];
        sort_by_precedence(&mut list);
        let order: Vec<&str> = list.iter().map(|i| i.source.as_str()).collect();
        assert_eq!(order, ["web@dc2", "web", "*@dc2"]);
        assert_eq!(list[2].precedence(), 8);
    }

    #[test]
    fn a_source_s_datacenter_is_checked_as_a_name() {
        let with = |source: &str| validate_intention(&Intention::l4(source, "db", Deny));
        assert_eq!(with("web@dc2"), Ok(()));
        assert_eq!(with("*@dc2"), Ok(()));
        let e = with("web@DC2").unwrap_err().to_string();
        assert!(e.starts_with("Source datacenter: bad character 'D'"), "{e}");
        assert!(with("web@").is_err());
        assert!(
            with("web@*").is_err(),
            "any datacenter is written without @"
        );
        assert!(with("web@dc2@dc3").is_err());
        assert!(with("@dc2").is_err());
    }

    fn l7_list() -> Vec<Intention> {
        vec![Intention::l7(
            "web",
            "db",
            vec![perm(Deny, prefix("/admin")), perm(Allow, prefix("/"))],
        )]
    }

    #[test]
    fn l7_first_matching_permission_decides() {
        let list = l7_list();
        let d = evaluate(
            &list,
            at("web"),
            "db",
            Some(&Request::new("GET", "/admin/x")),
            Allow,
        );
        assert_eq!(
            d,
            Decision {
                allowed: false,
                by: by("web", "db", Some(0))
            }
        );
        let d = evaluate(
            &list,
            at("web"),
            "db",
            Some(&Request::new("GET", "/users")),
            Deny,
        );
        assert_eq!(
            d,
            Decision {
                allowed: true,
                by: by("web", "db", Some(1))
            }
        );
        // Reversed order: the catch-all allow now shadows the deny.
        let mut rev = list.clone();
        rev[0].permissions.reverse();
        let d = evaluate(
            &rev,
            at("web"),
            "db",
            Some(&Request::new("GET", "/admin/x")),
            Deny,
        );
        assert_eq!(
            d,
            Decision {
                allowed: true,
                by: by("web", "db", Some(0))
            }
        );
    }

    #[test]
    fn l7_no_permission_matches_falls_to_default() {
        let list = vec![Intention::l7(
            "web",
            "db",
            vec![perm(Allow, prefix("/api"))],
        )];
        for default in [Allow, Deny] {
            let d = evaluate(
                &list,
                at("web"),
                "db",
                Some(&Request::new("GET", "/other")),
                default,
            );
            assert_eq!(
                d,
                Decision {
                    allowed: default.is_allow(),
                    by: DecidedBy::NoPermissionMatched {
                        source: "web".into(),
                        destination: "db".into()
                    }
                }
            );
        }
        // It does not fall through to a less specific intention.
        let mut list = list;
        list.push(Intention::l4("*", "db", Allow));
        let d = evaluate(
            &list,
            at("web"),
            "db",
            Some(&Request::new("GET", "/other")),
            Deny,
        );
        assert!(!d.allowed);
    }

    #[test]
    fn l7_without_request_denies() {
        for default in [Allow, Deny] {
            let d = evaluate(&l7_list(), at("web"), "db", None, default);
            assert_eq!(
                d,
                Decision {
                    allowed: false,
                    by: by("web", "db", None)
                }
            );
        }
        // ... even when a lower-precedence L4 intention would allow.
        let mut list = l7_list();
        list.push(Intention::l4("*", "*", Allow));
        assert!(!evaluate(&list, at("web"), "db", None, Allow).allowed);
    }

    #[test]
    fn l7_and_l4_mixed_precedence() {
        // A more specific L4 deny beats a wildcard L7 allow, and vice versa.
        let list = vec![
            Intention::l7("*", "db", vec![perm(Allow, prefix("/"))]),
            Intention::l4("web", "db", Deny),
        ];
        let req = Request::new("GET", "/");
        assert!(!evaluate(&list, at("web"), "db", Some(&req), Allow).allowed);
        assert!(evaluate(&list, at("api"), "db", Some(&req), Deny).allowed);
        let list = vec![
            Intention::l7("web", "db", vec![perm(Allow, prefix("/ok"))]),
            Intention::l4("*", "*", Deny),
        ];
        assert!(
            evaluate(
                &list,
                at("web"),
                "db",
                Some(&Request::new("GET", "/ok")),
                Deny
            )
            .allowed
        );
        assert!(
            !evaluate(
                &list,
                at("web"),
                "db",
                Some(&Request::new("GET", "/no")),
                Deny
            )
            .allowed
        );
        assert!(
            evaluate(
                &list,
                at("web"),
                "db",
                Some(&Request::new("GET", "/no")),
                Allow
            )
            .allowed
        );
        // An L4 intention ignores the request.
        let list = vec![Intention::l4("web", "db", Allow)];
        assert!(
            evaluate(
                &list,
                at("web"),
                "db",
                Some(&Request::new("DELETE", "/x")),
                Deny
            )
            .allowed
        );
    }

    #[test]
    fn l7_duplicate_pairs_deny_wins() {
        let list = vec![
            Intention::l7("web", "db", vec![perm(Allow, prefix("/"))]),
            Intention::l4("web", "db", Deny),
        ];
        assert!(
            !evaluate(
                &list,
                at("web"),
                "db",
                Some(&Request::new("GET", "/")),
                Allow
            )
            .allowed
        );
    }

    #[test]
    fn l7_methods_headers_paths() {
        let list = vec![Intention::l7(
            "web",
            "db",
            vec![
                perm(
                    Deny,
                    HttpMatch {
                        headers: vec![HeaderMatch {
                            name: "x-debug".into(),
                            present: true,
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                ),
                perm(
                    Allow,
                    HttpMatch {
                        path_exact: Some("/health".into()),
                        ..Default::default()
                    },
                ),
                perm(
                    Allow,
                    HttpMatch {
                        path_regex: Some("/users/[0-9]+".into()),
                        methods: vec!["GET".into(), "PUT".into()],
                        ..Default::default()
                    },
                ),
                perm(
                    Allow,
                    HttpMatch {
                        path_prefix: Some("/admin".into()),
                        headers: vec![HeaderMatch {
                            name: "x-role".into(),
                            exact: Some("guest".into()),
                            invert: true,
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                ),
            ],
        )];
        let check = |r: Request| {
            let d = evaluate(&list, at("web"), "db", Some(&r), Deny);
            (
                d.allowed,
                match d.by {
                    DecidedBy::Intention {
                        permission_index, ..
                    } => permission_index,
                    _ => None,
                },
            )
        };
        assert_eq!(
            check(Request::new("GET", "/health").with_header("X-Debug", "1")),
            (false, Some(0))
        );
        assert_eq!(check(Request::new("POST", "/health")), (true, Some(1)));
        assert_eq!(check(Request::new("GET", "/health/x")), (false, None));
        assert_eq!(check(Request::new("GET", "/users/42")), (true, Some(2)));
        assert_eq!(check(Request::new("PUT", "/users/42")), (true, Some(2)));
        assert_eq!(check(Request::new("DELETE", "/users/42")), (false, None));
        assert_eq!(check(Request::new("GET", "/users/abc")), (false, None));
        assert_eq!(
            check(Request::new("GET", "/admin/x").with_header("X-Role", "ops")),
            (true, Some(3))
        );
        assert_eq!(
            check(Request::new("GET", "/admin/x").with_header("X-Role", "guest")),
            (false, None)
        );
        // Envoy: a missing header does not match an inverted value rule.
        assert_eq!(check(Request::new("GET", "/admin/x")), (false, None));
    }

    /// The attack: a header sent twice was read joined (`admin,admin`), so
    /// a deny on `admin` missed it while the instance, reading the first
    /// value, saw `admin`; and an allow on `reader` missed nothing of
    /// `reader` + `admin` read the other way round.
    #[test]
    fn a_repeated_header_neither_escapes_a_deny_nor_slips_past_an_allow() {
        let header = |name: &str, exact: &str, invert: bool| HeaderMatch {
            name: name.into(),
            exact: Some(exact.into()),
            invert,
            ..Default::default()
        };
        let on = |headers| HttpMatch {
            headers,
            ..Default::default()
        };
        let list = vec![Intention::l7(
            "web",
            "db",
            vec![
                perm(Deny, on(vec![header("x-user", "admin", false)])),
                perm(Allow, on(vec![header("x-role", "reader", false)])),
                perm(Allow, on(vec![header("x-env", "prod", true)])),
            ],
        )];
        let allowed = |headers: &[(&str, &str)]| {
            let mut r = Request::new("GET", "/");
            for (name, value) in headers {
                r = r.with_header(*name, *value);
            }
            let d = evaluate(&list, at("web"), "db", Some(&r), Deny);
            (d.allowed, d.by)
        };
        let by = |i| DecidedBy::Intention {
            source: "web".into(),
            destination: "db".into(),
            permission_index: Some(i),
        };
        let fell_through = DecidedBy::NoPermissionMatched {
            source: "web".into(),
            destination: "db".into(),
        };
        // One value: as before.
        assert_eq!(allowed(&[("x-user", "admin")]), (false, by(0)));
        assert_eq!(allowed(&[("x-role", "reader")]), (true, by(1)));
        // The deny sees `admin` whichever value the instance reads.
        for values in [["admin", "admin"], ["admin", "guest"], ["guest", "admin"]] {
            let sent = [
                ("x-user", values[0]),
                ("X-User", values[1]),
                ("x-role", "reader"),
            ];
            assert_eq!(allowed(&sent), (false, by(0)), "{values:?}");
        }
        // The allow needs `reader` however the instance reads them.
        assert_eq!(
            allowed(&[("x-role", "reader"), ("x-role", "admin")]),
            (false, fell_through.clone())
        );
        assert_eq!(
            allowed(&[("x-role", "admin"), ("x-role", "reader")]),
            (false, fell_through.clone())
        );
        // Inverted: `x-env` not `prod` on every reading.
        assert_eq!(allowed(&[("x-env", "dev")]), (true, by(2)));
        assert_eq!(
            allowed(&[("x-env", "dev"), ("x-env", "prod")]),
            (false, fell_through)
        );
    }

    #[test]
    fn unusable_rule_denies() {
        let list = vec![Intention::l7(
            "web",
            "db",
            vec![perm(
                Deny,
                HttpMatch {
                    path_regex: Some("(".into()),
                    ..Default::default()
                },
            )],
        )];
        let d = evaluate(
            &list,
            at("web"),
            "db",
            Some(&Request::new("GET", "/")),
            Allow,
        );
        assert_eq!(
            d,
            Decision {
                allowed: false,
                by: by("web", "db", Some(0))
            }
        );
        // Invalid shapes that slipped past validation deny too.
        let mut both = Intention::l4("web", "db", Allow);
        both.permissions = vec![perm(Allow, prefix("/"))];
        assert!(
            !evaluate(
                &[both],
                at("web"),
                "db",
                Some(&Request::new("GET", "/")),
                Allow
            )
            .allowed
        );
        let mut neither = Intention::l4("web", "db", Allow);
        neither.action = None;
        assert!(!evaluate(&[neither], at("web"), "db", None, Allow).allowed);
    }

    #[test]
    fn decision_text() {
        let d = evaluate(
            &l7_list(),
            at("web"),
            "db",
            Some(&Request::new("GET", "/admin")),
            Allow,
        );
        assert_eq!(d.to_string(), "denied by intention web => db, permission 0");
        assert_eq!(
            evaluate(&[], at("a"), "b", None, Allow).to_string(),
            "allowed by default action (no intention matched)"
        );
        assert_eq!(
            evaluate(&[Intention::l4("*", "b", Deny)], at("a"), "b", None, Allow).to_string(),
            "denied by intention * => b"
        );
        let json = serde_json::to_string(&DecidedBy::Default).unwrap();
        assert_eq!(json, r#"{"by":"default"}"#);
    }

    #[test]
    fn find_and_sort() {
        let mut list = vec![
            Intention::l4("*", "*", Deny),
            Intention::l4("web", "*", Allow),
            Intention::l4("*", "db", Allow),
            Intention::l4("web", "db", Allow),
            Intention::l4("api", "db", Allow),
        ];
        assert_eq!(
            find_intention(&list, "*", "db").unwrap().key(),
            IntentionKey::new("*", "db")
        );
        assert!(find_intention(&list, "x", "db").is_none());
        sort_by_precedence(&mut list);
        let keys: Vec<String> = list.iter().map(|i| i.key().to_string()).collect();
        assert_eq!(
            keys,
            ["api => db", "web => db", "* => db", "web => *", "* => *"]
        );
    }

    fn verr(i: &Intention) -> String {
        validate_intention(i).unwrap_err().to_string()
    }

    #[test]
    fn validation_names_fields() {
        assert_eq!(
            validate_intention(&Intention::l4("web", "*", Allow)),
            Ok(())
        );
        assert_eq!(validate_intention(&l7_list()[0]), Ok(()));
        assert!(verr(&Intention::l4("Web", "db", Allow))
            .starts_with("Source: bad character 'W' at position 1"));
        assert_eq!(
            verr(&Intention::l4("web", "", Allow)),
            "Destination: must not be empty"
        );
        assert_eq!(
            validate_intention(&Intention::l4("web", "db-", Allow))
                .unwrap_err()
                .field(),
            "Destination"
        );
        let mut both = Intention::l4("web", "db", Allow);
        both.permissions = vec![perm(Allow, prefix("/"))];
        assert_eq!(
            verr(&both),
            "Action: exactly one of Action or Permissions must be set (found both)"
        );
        let neither = Intention::l7("web", "db", vec![]);
        assert_eq!(
            verr(&neither),
            "Action: exactly one of Action or Permissions must be set (found neither)"
        );
        let bad = Intention::l7(
            "web",
            "db",
            vec![
                perm(Allow, prefix("/")),
                perm(
                    Allow,
                    HttpMatch {
                        path_regex: Some("[".into()),
                        ..Default::default()
                    },
                ),
            ],
        );
        assert!(
            verr(&bad).starts_with("Permissions[1].HTTP.PathRegex: invalid regex: "),
            "{}",
            verr(&bad)
        );
        let empty = Intention::l7("web", "db", vec![perm(Allow, HttpMatch::default())]);
        assert!(verr(&empty).starts_with("Permissions[0].HTTP: must set at least one of"));
        let hdr = Intention::l7(
            "web",
            "db",
            vec![perm(
                Allow,
                HttpMatch {
                    headers: vec![HeaderMatch {
                        name: "x".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )],
        );
        assert_eq!(
            verr(&hdr),
            "Permissions[0].HTTP.Header[0]: one of Present, Exact, Prefix, Suffix or Regex is required"
        );
        let meth = Intention::l7(
            "web",
            "db",
            vec![perm(
                Allow,
                HttpMatch {
                    methods: vec!["FETCH".into()],
                    ..Default::default()
                },
            )],
        );
        assert!(verr(&meth)
            .starts_with("Permissions[0].HTTP.Methods[0]: \"FETCH\" is not an HTTP method"));
        let query = Intention::l7(
            "web",
            "db",
            vec![perm(
                Allow,
                HttpMatch {
                    query_param: vec![crate::http_match::QueryParamMatch {
                        name: "admin".into(),
                        present: true,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )],
        );
        assert!(verr(&query).starts_with("Permissions[0].HTTP.QueryParam: not a field"));
        let mut long = Intention::l4("web", "db", Allow);
        long.description = "x".repeat(513);
        assert_eq!(verr(&long), "Description: too long (513 > 512 bytes)");
        let many = Intention::l7("web", "db", vec![perm(Allow, prefix("/")); 101]);
        assert_eq!(verr(&many), "Permissions: too many permissions (101 > 100)");
    }

    #[test]
    fn serde_shape_and_files() {
        let i = l7_list().remove(0);
        let json = serde_json::to_string(&i).unwrap();
        assert!(json.starts_with(r#"{"Source":"web","Destination":"db","Permissions":[{"Action":"deny","HTTP":{"PathPrefix":"/admin"}}"#), "{json}");
        assert_eq!(serde_json::from_str::<Intention>(&json).unwrap(), i);
        let l4: Intention =
            serde_json::from_str(r#"{"Source":"*","Destination":"db","Action":"deny"}"#).unwrap();
        assert_eq!(l4, Intention::l4("*", "db", Deny));
        assert!(serde_json::from_str::<Intention>(
            r#"{"Source":"a","Destination":"b","Action":"maybe"}"#
        )
        .is_err());
        let toml = r#"
[[Permissions]]
Action = "deny"
HTTP = { PathPrefix = "/admin" }

[[Permissions]]
Action = "allow"
[Permissions.HTTP]
Methods = ["GET"]
Header = [ { Name = "x-env", Exact = "prod" } ]
"#;
        let perms = parse_permissions_file(toml, FileFormat::Toml).unwrap();
        assert_eq!(perms.len(), 2);
        assert_eq!(perms[1].http.headers[0].exact.as_deref(), Some("prod"));
        let e = parse_permissions_file(
            "[[Permissions]]\nAction = \"allow\"\nHTTP = { Path = \"/\" }\n",
            FileFormat::Toml,
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        assert_eq!("allow".parse::<IntentionAction>(), Ok(Allow));
        assert_eq!(
            "Deny".parse::<IntentionAction>().unwrap_err().field(),
            "Action"
        );
    }
}
