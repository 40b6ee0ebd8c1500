//! HTTP request matching shared by L7 intention permissions and service-router
//! routes: path (exact, prefix or regex), methods and header rules, with Consul's
//! field names (`PathExact`, `Methods`, `Header`, ...) and Envoy's semantics.
//!
//! - Regexes (RE2-like syntax of the `regex` crate) must match the whole path or
//!   header value, as Envoy's `safe_regex` does.
//! - Header names compare case-insensitively. Routes read a header given
//!   several times as its values joined with `,` (Envoy's reading). L7
//!   intentions cannot know how the instance will read a header, so they
//!   read it every way it might ([`Repeated`], [`readings`]): a deny rule
//!   matches when any reading matches, an allow rule only when every
//!   reading does. Sending `X-User: admin` twice (or as `X_User`, which
//!   servers that map names CGI-style read as `x-user`, or padded with
//!   spaces, which HTTP/2 lets through) neither hides it from a deny on
//!   `admin` nor smuggles it past an allow on `reader`.
//! - The path and the method are read the same way by intentions
//!   ([`path_readings`], [`method_readings`]): the path as sent and without
//!   the parameters of its segments (`/admin;x/users`, which Tomcat, Jetty
//!   and Spring serve as `/admin/users`), the method as sent and as the
//!   override headers (`X-HTTP-Method-Override`, …) and `_method` name it;
//!   for a deny also the path with a final `/` added or removed, compared
//!   without regard to case (servers that route without regard to either),
//!   and `GET` for a `HEAD` (servers run a GET handler for HEAD). A deny
//!   matches if any reading does, an allow only if all do.
//! - A header rule has exactly one of `Present`, `Exact`, `Prefix`, `Suffix`,
//!   `Regex`. `Invert` negates the rule, but a missing header only ever matches a
//!   `Present` rule with `Invert` (Envoy: an absent header never matches a value
//!   rule, inverted or not).
//! - An empty method list matches every method.
//! - `QueryParam` rules (service-router routes only) match the request's
//!   query parameters by name, after percent-decoding, with exactly one of
//!   `Present`, `Exact`, `Regex`; a parameter given several times is
//!   matched on its first value, as Envoy's query matcher does.
//! - A regex is compiled once, when the rule is read ([`FullMatch`]), not
//!   per request.

use std::borrow::Cow;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::compiled::{Compile, Compiled};

/// HTTP methods accepted in `Methods`, uppercase.
pub const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// An HTTP request as far as matching needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Request {
    /// Uppercase method, e.g. `GET`.
    pub method: String,
    /// The path without the query string, e.g. `/v1/users`.
    pub path: String,
    /// Header names and values in arrival order; a name may repeat.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Query parameters, percent-decoded, in order; a name may repeat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<(String, String)>,
}

impl Request {
    /// A request with no headers.
    pub fn new(method: impl Into<String>, path: impl Into<String>) -> Self {
        Request {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            query: Vec::new(),
        }
    }

    /// Adds the parameters of a raw query string (`a=1&b=x%20y`), decoded.
    pub fn with_query(mut self, raw: &str) -> Self {
        self.query = parse_query(raw);
        self
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// All values of header `name` (case-insensitive) joined with `,`; `None` if absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let values = self.header_values(name);
        if values.is_empty() {
            None
        } else {
            Some(values.join(","))
        }
    }

    /// Every value of header `name` (case-insensitive), in arrival order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// [`header_values`](Self::header_values), `_` and `-` in names taken
    /// as the same (CGI-style servers read `X_User` as `x-user`).
    fn header_values_loosely(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| same_name_loosely(k, name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Header names `a` and `b` alike but for ASCII case and `_` for `-`.
fn same_name_loosely(a: &str, b: &str) -> bool {
    let fold = |c: u8| {
        if c == b'_' {
            b'-'
        } else {
            c.to_ascii_lowercase()
        }
    };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

/// The readings an instance may take of header `name` sent as `values`:
/// all joined with `,`, each value, each with the spaces and tabs around
/// it trimmed; with `broad` (a deny's), also each element of a
/// comma-separated value, and a `host` in lower case without its port or a
/// trailing dot. (An allow is not read by elements: a value with a comma in
/// it, a `User-Agent`, would fail it.)
pub fn readings(name: &str, values: &[&str], broad: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |r: &str| {
        if !out.iter().any(|o| o == r) {
            out.push(r.to_string());
        }
    };
    add(&values.join(","));
    let ows: &[char] = &[' ', '\t'];
    for value in values {
        add(value);
        add(value.trim_matches(ows));
        if broad {
            for element in value.split(',') {
                add(element.trim_matches(ows));
            }
        }
    }
    if broad && name.eq_ignore_ascii_case("host") {
        for value in values {
            let host = value.trim_matches(ows).to_ascii_lowercase();
            let host = match host.rsplit_once(':') {
                Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                    h.to_string()
                }
                _ => host,
            };
            add(host.trim_end_matches('.'));
        }
    }
    out
}

/// Headers and the query parameter frameworks take as the request's real
/// method (Express's `method-override`, Rails and Laravel, Symfony, …).
const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];
const METHOD_OVERRIDE_PARAM: &str = "_method";

/// `_method`, or a name PHP reads as it (it drops leading spaces and
/// reads `.` as `_`: `?.method=DELETE` and `?+_method=DELETE` are
/// Laravel's `_method`).
fn is_method_param(name: &str) -> bool {
    let name = name.trim_start_matches(' ');
    name == METHOD_OVERRIDE_PARAM || name == ".method"
}

/// The readings an instance may take of a request's (normalized) path: as
/// it is, and with each segment's parameters cut (`/admin;x=1/users` is
/// `/admin/users` to Tomcat, Jetty and Spring; `;` escaped too); with
/// `broad` (a deny's) also without a format suffix on the last segment
/// (`/admin.json`), and each with a final `/` added or removed (servers
/// that route without regard to it). A deny also compares them without
/// regard to case ([`HttpMatch::matches_read`]). The first reading is the
/// path itself.
pub fn path_readings(path: &str, broad: bool) -> Vec<Cow<'_, str>> {
    let mut out = vec![Cow::Borrowed(path)];
    let add = |out: &mut Vec<Cow<'_, str>>, reading: String| {
        if !out.iter().any(|o| *o == reading) {
            out.push(Cow::Owned(reading));
        }
    };
    // `%3B` too: a server in front (nginx) may decode it before one that
    // cuts parameters (Tomcat) reads the path.
    if path.contains(';') || path.contains("%3B") {
        let cut: Vec<&str> = (path.split('/'))
            .map(|segment| {
                let segment = segment.split(';').next().unwrap_or("");
                segment.split("%3B").next().unwrap_or("")
            })
            .collect();
        let cut = cut.join("/");
        // A segment that was only parameters leaves `//`: merged, as the
        // path was.
        let cut = match crate::path::normalize_path(&cut) {
            Ok(normal) => normal.into_owned(),
            Err(_) => cut,
        };
        add(&mut out, cut);
    }
    if broad {
        // A final `/` added or removed (servers that route without regard
        // to it), then a format suffix cut from the last segment at its
        // last and at its first dot (`/admin.json`, `/admin.x.json`: Rails
        // and older Spring route both to `/admin`), then the slash again.
        toggle_final_slash(&mut out, &add);
        for i in 0..out.len() {
            let last = out[i].rsplit('/').next().unwrap_or("");
            let head = out[i].len() - last.len();
            let cuts = [last.rfind('.'), last.find('.')];
            for dot in cuts.into_iter().flatten().filter(|&d| d > 0) {
                let without = out[i][..head + dot].to_string();
                add(&mut out, without);
            }
        }
        toggle_final_slash(&mut out, &add);
    }
    out
}

/// Adds each of `out`'s readings with a final `/` added or removed (but `/`).
fn toggle_final_slash<'p>(
    out: &mut Vec<Cow<'p, str>>,
    add: &impl Fn(&mut Vec<Cow<'p, str>>, String),
) {
    for i in 0..out.len() {
        let toggled = match out[i].strip_suffix('/') {
            Some("") => continue,
            Some(without) => without.to_string(),
            None => format!("{}/", out[i]),
        };
        add(out, toggled);
    }
}

/// The readings an instance may take of a request's method: as sent, and
/// as each method-override header (`_` for `-` in its name too) or
/// `_method` query parameter names it (upper case); with `broad` (a
/// deny's) also `GET` for a `HEAD`, whose handler most servers run for it.
/// The first reading is the method itself. (A `_method` in a form body is
/// not read: bodies are not judged.)
pub fn method_readings(request: &Request, broad: bool) -> Vec<Cow<'_, str>> {
    let mut out = vec![Cow::Borrowed(request.method.as_str())];
    let overrides = (request.headers.iter())
        .filter(|(name, _)| (METHOD_OVERRIDE_HEADERS.iter()).any(|h| same_name_loosely(h, name)))
        .flat_map(|(_, value)| value.split(','))
        .chain(
            (request.query.iter())
                .filter(|(name, _)| is_method_param(name))
                .map(|(_, value)| value.as_str()),
        );
    for value in overrides {
        let method = value.trim_matches([' ', '\t']).to_ascii_uppercase();
        if !method.is_empty() && !out.iter().any(|o| *o == method) {
            out.push(Cow::Owned(method));
        }
    }
    if broad && out.iter().any(|m| m == "HEAD") && !out.iter().any(|m| m == "GET") {
        out.push(Cow::Borrowed("GET"));
    }
    out
}

/// How a header rule reads a header the request gives more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeated {
    /// The values joined with `,`, as Envoy reads them (routes).
    Joined,
    /// A match when any of the header's [`readings`] (broad) matches: how
    /// a deny rule reads them, so that no reading the instance may take
    /// escapes it. Names match with `_` taken as `-`.
    AnyReading,
    /// A match only when every one of the header's [`readings`] matches:
    /// how an allow rule reads them, so that no reading the instance may
    /// take is let in unchecked. Names match with `_` taken as `-`.
    EveryReading,
}

/// The parameters of a raw query string, percent-decoded (`+` is a
/// space, as forms write it); a parameter without `=` has an empty value.
pub fn parse_query(raw: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// One query parameter rule of a route (`QueryParam`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct QueryParamMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<FullMatch>,
}

impl QueryParamMatch {
    /// Whether the parameter's first value satisfies the rule.
    pub fn matches(&self, request: &Request) -> Result<bool, HttpMatchError> {
        let Some((_, value)) = request.query.iter().find(|(name, _)| *name == self.name) else {
            return Ok(false);
        };
        Ok(if self.present {
            true
        } else if let Some(exact) = &self.exact {
            value == exact
        } else if let Some(pattern) = &self.regex {
            pattern.is_match("Regex", value)?
        } else {
            false
        })
    }
}

/// One header rule.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<FullMatch>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub invert: bool,
}

/// The HTTP part of a permission or route match. Every rule that is set must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<RulePath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<RulePath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<FullMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(rename = "Header", default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Routes only: L7 intentions refuse it, as Consul's do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_param: Vec<QueryParamMatch>,
    /// Routes only: `PathExact` and `PathPrefix` compare without regard to
    /// ASCII case (Envoy's `case_sensitive: false`; regexes are as written).
    #[serde(default, skip_serializing_if = "is_false")]
    pub case_insensitive: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Why a match rule is invalid (at write time) or could not be applied (a regex
/// that does not compile). The message starts with the field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct HttpMatchError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> HttpMatchError {
    HttpMatchError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A rule's `PathExact` or `PathPrefix`, written as the operator wrote it
/// and compared in its normalized form (see [`NormalPath`]).
pub type RulePath = Compiled<NormalPath>;

/// A rule path normalized as requests' paths are ([`crate::path`]): the
/// proxy judges and routes a request by its normalized path, so a rule
/// written `/a//b` or `/x/../admin` is about `/a/b` and `/admin`; compared
/// as written it would match no request, and a deny on it would let every
/// request through. A rule path that normalization refuses (an encoded
/// `/`, `..;`) is one no request can have: it matches nothing, as any
/// request with such a path is refused before it is judged. So does one
/// with a `..` segment: resolved, `/public/..` would become `/`, a rule on
/// every path where the text as written matched none
/// ([`crate::path::normalize_rule_path`]).
#[derive(Debug, Clone)]
pub struct NormalPath(String);

impl Compile for NormalPath {
    fn compile(source: &str) -> Result<NormalPath, String> {
        crate::path::normalize_rule_path(source)
            .map(NormalPath)
            .map_err(|e| e.to_string())
    }
}

impl Compiled<NormalPath> {
    /// The normalized path, or None when no normalized request path can
    /// be it or start with it.
    pub fn normal(&self) -> Option<&str> {
        self.get().ok().map(|p| p.0.as_str())
    }
}

/// Refuses a `PathExact` or `PathPrefix` that no normalized request path
/// can be or start with (see [`NormalPath`]): accepted, such a rule would
/// match nothing, and a deny on it would let everything through. Called
/// where rules are written (the servers' API), not by
/// [`validate_http_match`], which also runs when a Raft entry is applied or
/// a snapshot loaded: a rule stored before this check existed still loads,
/// and matches nothing.
pub fn check_rule_paths(field: &str, m: &HttpMatch) -> Result<(), HttpMatchError> {
    for (name, value) in [("PathExact", &m.path_exact), ("PathPrefix", &m.path_prefix)] {
        if let Some(path) = value {
            path.get().map_err(|reason| {
                err(
                    format!("{field}.{name}"),
                    format!("{:?}: {reason}", path.as_str()),
                )
            })?;
        }
    }
    Ok(())
}

/// A regex that must match a whole string, compiled once when the rule is
/// read (see [`crate::compiled`]).
pub type FullMatch = Compiled<WholeString>;

/// A regex anchored at both ends; and, compiled the first time a deny
/// reads a path without regard to case, the same without regard to case.
#[derive(Debug, Clone)]
pub struct WholeString {
    exact: Regex,
    /// None when the folded form does not compile (Unicode case folding
    /// can take it past the size limit): the path is then matched in
    /// lower case instead.
    folded: std::sync::OnceLock<Option<Regex>>,
}

/// The largest compiled regex weft takes (the `regex` crate's default is
/// 10 MiB): a rule near it is a mistake or an attack, not a route.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Compile for WholeString {
    fn compile(source: &str) -> Result<WholeString, String> {
        let invalid =
            |e: &dyn std::fmt::Display| format!("invalid regex: {}", one_line(&e.to_string()));
        // The pattern must stand on its own: `a)|(.*` would otherwise
        // close the anchoring group and match anything.
        regex_syntax::Parser::new()
            .parse(source)
            .map_err(|e| invalid(&e))?;
        regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(|exact| WholeString {
                exact,
                folded: std::sync::OnceLock::new(),
            })
            .map_err(|e| invalid(&e))
    }
}

impl Compiled<WholeString> {
    /// The compiled regex, or why it does not compile (under `field`).
    pub fn compiled(&self, field: &str) -> Result<&Regex, HttpMatchError> {
        self.get()
            .map(|w| &w.exact)
            .map_err(|reason| err(field, reason))
    }

    /// Whether the whole of `text` matches.
    pub fn is_match(&self, field: &str, text: &str) -> Result<bool, HttpMatchError> {
        Ok(self.compiled(field)?.is_match(text))
    }

    /// Whether the whole of `text` matches without regard to case.
    pub fn is_match_ignoring_case(&self, field: &str, text: &str) -> Result<bool, HttpMatchError> {
        let whole = self.get().map_err(|reason| err(field, reason))?;
        let folded = whole.folded.get_or_init(|| {
            regex::RegexBuilder::new(whole.exact.as_str())
                .case_insensitive(true)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .ok()
        });
        Ok(match folded {
            Some(regex) => regex.is_match(text),
            None => whole.exact.is_match(&text.to_ascii_lowercase()),
        })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl HttpMatch {
    /// True when no rule is set (matches every request).
    pub fn is_empty(&self) -> bool {
        self.path_exact.is_none()
            && self.path_prefix.is_none()
            && self.path_regex.is_none()
            && self.methods.is_empty()
            && self.headers.is_empty()
            && self.query_param.is_empty()
            && !self.case_insensitive
    }

    /// Whether `request` satisfies every rule. Errors only for a regex that does
    /// not compile (which [`validate_http_match`] refuses at write time).
    pub fn matches(&self, request: &Request) -> Result<bool, HttpMatchError> {
        self.matches_read(request, Repeated::Joined)
    }

    /// [`matches`](Self::matches), with repeated headers read as `repeated`
    /// says (how L7 intentions judge; see the module doc).
    pub fn matches_read(
        &self,
        request: &Request,
        repeated: Repeated,
    ) -> Result<bool, HttpMatchError> {
        let has_path_rule =
            self.path_exact.is_some() || self.path_prefix.is_some() || self.path_regex.is_some();
        // A deny reads the path without regard to case too (servers that
        // route so): `/ADMIN/x` is under a deny of `/Admin/`.
        let broad = repeated == Repeated::AnyReading;
        if has_path_rule {
            let paths_hold = match repeated {
                // A route reads the path once, as it is.
                Repeated::Joined => self.path_matches(&request.path, false)?,
                _ => holds(repeated, &path_readings(&request.path, broad), |path| {
                    self.path_matches(path, broad)
                })?,
            };
            if !paths_hold {
                return Ok(false);
            }
        }
        if !self.methods.is_empty() {
            let listed = |method: &str| self.methods.iter().any(|m| m == method);
            let methods_hold = match repeated {
                Repeated::Joined => listed(&request.method),
                _ => holds(repeated, &method_readings(request, broad), |m| {
                    Ok(listed(m))
                })?,
            };
            if !methods_hold {
                return Ok(false);
            }
        }
        for (i, header) in self.headers.iter().enumerate() {
            if !header
                .matches_read(request, repeated)
                .map_err(|e| err(format!("Header[{i}].{}", e.field), e.reason))?
            {
                return Ok(false);
            }
        }
        for (i, param) in self.query_param.iter().enumerate() {
            if !param
                .matches(request)
                .map_err(|e| err(format!("QueryParam[{i}].{}", e.field), e.reason))?
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether one reading of the path satisfies `PathExact`, `PathPrefix`
    /// and `PathRegex` (those set); with `fold`, also without regard to
    /// ASCII case (a regex: as written or through its case-insensitive copy).
    fn path_matches(&self, path: &str, fold: bool) -> Result<bool, HttpMatchError> {
        // A route's `CaseInsensitive` is about its exact and prefix paths.
        let fold_paths = fold || self.case_insensitive;
        if let Some(exact) = &self.path_exact {
            let Some(exact) = exact.normal() else {
                return Ok(false);
            };
            let same = if fold_paths {
                path.eq_ignore_ascii_case(exact)
            } else {
                path == exact
            };
            if !same {
                return Ok(false);
            }
        }
        if let Some(prefix) = &self.path_prefix {
            let Some(prefix) = prefix.normal() else {
                return Ok(false);
            };
            let starts = match path.get(..prefix.len()) {
                Some(head) if fold_paths => head.eq_ignore_ascii_case(prefix),
                Some(head) => head == prefix,
                None => false,
            };
            if !starts {
                return Ok(false);
            }
        }
        if let Some(pattern) = &self.path_regex {
            // Folded as well as exact: under `(?i)` a negated class such
            // as `[^A-Z]` excludes the lower case too.
            let hit = pattern.is_match("PathRegex", path)?
                || (fold && pattern.is_match_ignoring_case("PathRegex", path)?);
            if !hit {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Whether `test` holds for the readings as `repeated` asks: for any of
/// them (a deny's), or for all (an allow's).
fn holds(
    repeated: Repeated,
    readings: &[Cow<'_, str>],
    test: impl Fn(&str) -> Result<bool, HttpMatchError>,
) -> Result<bool, HttpMatchError> {
    if repeated == Repeated::AnyReading {
        for reading in readings {
            if test(reading)? {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    for reading in readings {
        if !test(reading)? {
            return Ok(false);
        }
    }
    Ok(true)
}

impl HeaderMatch {
    /// Whether `request` satisfies this header rule, several values of the
    /// header joined (see the module doc).
    pub fn matches(&self, request: &Request) -> Result<bool, HttpMatchError> {
        self.matches_read(request, Repeated::Joined)
    }

    /// Whether `request` satisfies this header rule, a repeated header read
    /// as `repeated` says.
    pub fn matches_read(
        &self,
        request: &Request,
        repeated: Repeated,
    ) -> Result<bool, HttpMatchError> {
        let values = match repeated {
            Repeated::Joined => request.header_values(&self.name),
            _ => request.header_values_loosely(&self.name),
        };
        if values.is_empty() {
            return Ok(self.present && self.invert);
        }
        match repeated {
            Repeated::Joined => self.reads(&values.join(",")),
            Repeated::AnyReading => {
                for reading in readings(&self.name, &values, true) {
                    if self.reads(&reading)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Repeated::EveryReading => {
                // An inverted allow ("not admin") must hold for each list
                // element too: `reader, admin` is admin to a server that
                // takes the last element.
                for reading in readings(&self.name, &values, self.invert) {
                    if !self.reads(&reading)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }

    /// Whether the rule, `Invert` applied, holds for one reading of the
    /// header.
    fn reads(&self, value: &str) -> Result<bool, HttpMatchError> {
        let hit = if self.present {
            true
        } else if let Some(exact) = &self.exact {
            value == exact
        } else if let Some(prefix) = &self.prefix {
            value.starts_with(prefix.as_str())
        } else if let Some(suffix) = &self.suffix {
            value.ends_with(suffix.as_str())
        } else if let Some(pattern) = &self.regex {
            pattern.is_match("Regex", value)?
        } else {
            // No rule: refused at write time; never a match.
            return Ok(false);
        };
        Ok(hit != self.invert)
    }
}

/// Checks a match at write time. `field` is the path of the match itself (e.g.
/// `Permissions[0].HTTP`); errors name the sub-field, e.g.
/// `Permissions[0].HTTP.PathRegex: invalid regex: ...`.
pub fn validate_http_match(field: &str, m: &HttpMatch) -> Result<(), HttpMatchError> {
    let paths = [
        ("PathExact", m.path_exact.is_some()),
        ("PathPrefix", m.path_prefix.is_some()),
        ("PathRegex", m.path_regex.is_some()),
    ];
    let set: Vec<&str> = paths
        .iter()
        .filter(|(_, set)| *set)
        .map(|(n, _)| *n)
        .collect();
    if set.len() > 1 {
        return Err(err(
            field,
            format!(
                "at most one of PathExact, PathPrefix, PathRegex may be set (found {})",
                set.join(", ")
            ),
        ));
    }
    for (name, value) in [("PathExact", &m.path_exact), ("PathPrefix", &m.path_prefix)] {
        if let Some(path) = value {
            if !path.as_str().starts_with('/') {
                return Err(err(
                    format!("{field}.{name}"),
                    format!("{path:?} must start with '/'"),
                ));
            }
        }
    }
    if let Some(pattern) = &m.path_regex {
        pattern.compiled(&format!("{field}.PathRegex"))?;
    }
    for (i, method) in m.methods.iter().enumerate() {
        let f = format!("{field}.Methods[{i}]");
        if !HTTP_METHODS.contains(&method.as_str()) {
            return Err(err(
                f,
                format!(
                    "{method:?} is not an HTTP method (use one of {})",
                    HTTP_METHODS.join(", ")
                ),
            ));
        }
        if m.methods[..i].contains(method) {
            return Err(err(f, format!("duplicate method {method:?}")));
        }
    }
    for (i, header) in m.headers.iter().enumerate() {
        validate_header_match(&format!("{field}.Header[{i}]"), header)?;
    }
    for (i, param) in m.query_param.iter().enumerate() {
        validate_query_param(&format!("{field}.QueryParam[{i}]"), param)?;
    }
    Ok(())
}

/// Checks one query parameter rule: a name and exactly one of Present
/// (true), Exact, Regex.
fn validate_query_param(field: &str, q: &QueryParamMatch) -> Result<(), HttpMatchError> {
    if q.name.is_empty() {
        return Err(err(format!("{field}.Name"), "must not be empty"));
    }
    one_kind(
        field,
        &[
            ("Present", q.present),
            ("Exact", q.exact.is_some()),
            ("Regex", q.regex.is_some()),
        ],
        q.regex.as_ref(),
    )
}

/// Checks one header rule: a valid name and exactly one of Present (true), Exact,
/// Prefix, Suffix, Regex.
pub fn validate_header_match(field: &str, h: &HeaderMatch) -> Result<(), HttpMatchError> {
    if h.name.is_empty() {
        return Err(err(format!("{field}.Name"), "must not be empty"));
    }
    if let Some(ch) = h.name.chars().find(|c| !is_token_char(*c)) {
        return Err(err(
            format!("{field}.Name"),
            format!(
                "{:?} is not a valid header name (bad character {ch:?})",
                h.name
            ),
        ));
    }
    one_kind(
        field,
        &[
            ("Present", h.present),
            ("Exact", h.exact.is_some()),
            ("Prefix", h.prefix.is_some()),
            ("Suffix", h.suffix.is_some()),
            ("Regex", h.regex.is_some()),
        ],
        h.regex.as_ref(),
    )
}

/// Checks that exactly one of a rule's `kinds` is set, and that its
/// `regex`, if that is the one, compiles.
fn one_kind(
    field: &str,
    kinds: &[(&str, bool)],
    regex: Option<&FullMatch>,
) -> Result<(), HttpMatchError> {
    let names: Vec<&str> = kinds
        .iter()
        .filter(|(_, set)| *set)
        .map(|(n, _)| *n)
        .collect();
    let all: Vec<&str> = kinds.iter().map(|(n, _)| *n).collect();
    let listed = match all.split_last() {
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    match names.len() {
        0 => Err(err(field, format!("one of {listed} is required"))),
        1 => {
            if let Some(pattern) = regex {
                pattern.compiled(&format!("{field}.Regex"))?;
            }
            Ok(())
        }
        _ => Err(err(
            field,
            format!(
                "only one of {listed} may be set (found {})",
                names.join(", ")
            ),
        )),
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str) -> HeaderMatch {
        HeaderMatch {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn request_header_lookup() {
        let r = Request::new("GET", "/")
            .with_header("X-A", "1")
            .with_header("x-a", "2")
            .with_header("B", "3");
        assert_eq!(r.header("x-A"), Some("1,2".into()));
        assert_eq!(r.header("b"), Some("3".into()));
        assert_eq!(r.header("c"), None);
    }

    #[test]
    fn paths() {
        let r = Request::new("GET", "/api/v1/users");
        let m = |f: fn(&mut HttpMatch)| {
            let mut h = HttpMatch::default();
            f(&mut h);
            h.matches(&r).unwrap()
        };
        assert!(m(|_| {}));
        assert!(m(|h| h.path_exact = Some("/api/v1/users".into())));
        assert!(!m(|h| h.path_exact = Some("/api/v1".into())));
        assert!(m(|h| h.path_prefix = Some("/api/".into())));
        assert!(!m(|h| h.path_prefix = Some("/admin".into())));
        assert!(m(|h| h.path_regex = Some("/api/v[0-9]+/.*".into())));
        // The regex must match the whole path.
        assert!(!m(|h| h.path_regex = Some("/api".into())));
        assert!(!m(|h| h.path_regex = Some("users".into())));
    }

    /// Requests are judged by their normalized paths, so rule paths are
    /// compared in their normalized form: written as-is, a deny on `/a//b`
    /// or `/x/../admin` would match no request and let every one through.
    #[test]
    fn rule_paths_are_compared_normalized() {
        let m = |path: &str, f: &dyn Fn(&mut HttpMatch)| {
            let mut h = HttpMatch::default();
            f(&mut h);
            h.matches(&Request::new("GET", path)).unwrap()
        };
        for (rule, request) in [
            ("/a//b", "/a/b"),
            ("/files/%7euser", "/files/~user"),
            ("/%61dmin", "/admin"),
            ("/api/./v1", "/api/v1"),
        ] {
            assert!(
                m(request, &|h| h.path_exact = Some(rule.into())),
                "PathExact {rule} against {request}"
            );
            assert!(
                m(&format!("{request}/more"), &|h| h.path_prefix =
                    Some(rule.into())),
                "PathPrefix {rule} against {request}/more"
            );
            // Still written as the operator wrote it.
            let h = HttpMatch {
                path_prefix: Some(rule.into()),
                ..Default::default()
            };
            assert_eq!(
                serde_json::to_value(&h).unwrap()["PathPrefix"],
                serde_json::json!(rule)
            );
        }
        // No normalized path has an encoded slash or `..;`: such a rule
        // matches nothing (requests with them are refused before). Nor does
        // a rule with `..`: resolved, it would stand for paths above it.
        for rule in [
            "/a%2Fb",
            "/public/..;/admin",
            "/public/..",
            "/public/%2e%2e/",
            "/x/../admin",
        ] {
            for request in [
                "/a/b",
                "/a%2Fb",
                "/admin",
                "/public/..;/admin",
                "/",
                "/public/x",
            ] {
                assert!(!m(request, &|h| h.path_exact = Some(rule.into())), "{rule}");
                assert!(
                    !m(request, &|h| h.path_prefix = Some(rule.into())),
                    "{rule}"
                );
            }
        }
        // A case-insensitive route compares normalized forms too.
        assert!(m("/API/v1", &|h| {
            h.path_prefix = Some("/api//".into());
            h.case_insensitive = true;
        }));
    }

    #[test]
    fn a_write_of_a_rule_path_no_request_can_have_is_refused() {
        let check = |f: &dyn Fn(&mut HttpMatch)| {
            let mut h = HttpMatch::default();
            f(&mut h);
            check_rule_paths("Permissions[0].HTTP", &h)
        };
        for rule in ["/a//b", "/%61dmin", "/api/./v1", "/"] {
            assert_eq!(
                check(&|h| h.path_exact = Some(rule.into())),
                Ok(()),
                "{rule}"
            );
            assert_eq!(
                check(&|h| h.path_prefix = Some(rule.into())),
                Ok(()),
                "{rule}"
            );
        }
        for (rule, says) in [
            ("/public/..", "'..' segment"),
            ("/x/../admin", "'..' segment"),
            ("/public/%2e%2e/", "'..' segment"),
            ("/a%2Fb", "encoded '/'"),
            ("/public/..;/admin", "dot segment with parameters"),
            ("/a b", "may not hold"),
        ] {
            let e = check(&|h| h.path_prefix = Some(rule.into())).unwrap_err();
            assert_eq!(e.field, "Permissions[0].HTTP.PathPrefix");
            assert!(
                e.reason.contains(says) && e.reason.contains(rule),
                "{rule}: {e}"
            );
            let e = check(&|h| h.path_exact = Some(rule.into())).unwrap_err();
            assert_eq!(e.field, "Permissions[0].HTTP.PathExact", "{rule}");
        }
        // Regexes are not paths: validate_http_match compiles them.
        assert_eq!(check(&|h| h.path_regex = Some("/x/..".into())), Ok(()));
    }

    #[test]
    fn methods() {
        let mut h = HttpMatch {
            methods: vec!["GET".into(), "HEAD".into()],
            ..Default::default()
        };
        assert!(h.matches(&Request::new("GET", "/")).unwrap());
        assert!(h.matches(&Request::new("HEAD", "/")).unwrap());
        assert!(!h.matches(&Request::new("POST", "/")).unwrap());
        assert!(!h.matches(&Request::new("get", "/")).unwrap());
        h.path_prefix = Some("/x".into());
        assert!(!h.matches(&Request::new("GET", "/")).unwrap());
        assert!(h.matches(&Request::new("GET", "/xy")).unwrap());
    }

    #[test]
    fn a_repeated_header_is_read_as_the_rule_needs() {
        use Repeated::*;
        let r = Request::new("GET", "/")
            .with_header("X-A", "1")
            .with_header("x-a", "2");
        let rule = |exact: &str, invert| HeaderMatch {
            exact: Some(exact.into()),
            invert,
            ..header("x-a")
        };
        let read = |h: HeaderMatch, how| h.matches_read(&r, how).unwrap();
        // Joined (routes, Envoy): only `1,2` matches.
        assert!(read(rule("1,2", false), Joined));
        assert!(!read(rule("1", false), Joined));
        // Any reading: the joined value or either one.
        for value in ["1,2", "1", "2"] {
            assert!(read(rule(value, false), AnyReading), "{value}");
        }
        assert!(!read(rule("3", false), AnyReading));
        // Every reading: no single value is both `1` and `2`.
        for value in ["1,2", "1", "2"] {
            assert!(!read(rule(value, false), EveryReading), "{value}");
        }
        assert!(read(
            HeaderMatch {
                present: true,
                ..header("x-a")
            },
            EveryReading
        ));
        // Inverted: `not 1` holds on the reading `2` and the joined one.
        assert!(read(rule("1", true), AnyReading));
        assert!(!read(rule("1", true), EveryReading));
        assert!(read(rule("3", true), EveryReading));
        // One value reads the same every way; an absent header as before.
        let one = Request::new("GET", "/").with_header("x-a", "1");
        for how in [Joined, AnyReading, EveryReading] {
            assert!(rule("1", false).matches_read(&one, how).unwrap());
            assert!(!rule("1", false)
                .matches_read(&Request::new("GET", "/"), how)
                .unwrap());
        }
    }

    #[test]
    fn a_header_is_read_the_ways_servers_read_it() {
        use Repeated::*;
        let rule = |name: &str, exact: &str| HeaderMatch {
            exact: Some(exact.into()),
            ..header(name)
        };
        let req = |headers: &[(&str, &str)]| {
            let mut r = Request::new("GET", "/");
            for (n, v) in headers {
                r = r.with_header(*n, *v);
            }
            r
        };
        let hit = |h: &HeaderMatch, r: &Request, how| h.matches_read(r, how).unwrap();
        let admin = rule("x-user", "admin");
        // CGI-style names: X_User is x-user to a deny and to an allow.
        let underscored = req(&[("X_User", "admin")]);
        assert!(hit(&admin, &underscored, AnyReading));
        assert!(hit(&admin, &underscored, EveryReading));
        assert!(!hit(&admin, &underscored, Joined));
        let both = req(&[("x-user", "admin"), ("x_user", "guest")]);
        assert!(!hit(&admin, &both, EveryReading));
        // Padding HTTP/2 lets through: read trimmed too.
        let padded = req(&[("x-user", " admin\t")]);
        assert!(hit(&admin, &padded, AnyReading));
        assert!(!hit(&admin, &padded, EveryReading));
        // One line holding a list: a deny reads each element, an allow
        // does not (a User-Agent has commas).
        let list = req(&[("x-user", "guest, admin")]);
        assert!(hit(&admin, &list, AnyReading));
        let agent = req(&[("user-agent", "Mozilla/5.0 (KHTML, like Gecko)")]);
        let mozilla = HeaderMatch {
            prefix: Some("Mozilla/".into()),
            ..header("user-agent")
        };
        assert!(hit(&mozilla, &agent, EveryReading));
        // A host in another case, with a port or a trailing dot, to a deny.
        let internal = rule("host", "admin.internal");
        for host in ["ADMIN.internal", "admin.internal.", "admin.internal:8080"] {
            assert!(
                hit(&internal, &req(&[("Host", host)]), AnyReading),
                "{host}"
            );
        }
        assert!(!hit(
            &internal,
            &req(&[("Host", "admin.internal.evil")]),
            AnyReading
        ));
    }

    #[test]
    fn a_path_is_read_the_ways_servers_read_it() {
        use Repeated::*;
        let rule = |f: fn(&mut HttpMatch)| {
            let mut h = HttpMatch::default();
            f(&mut h);
            h
        };
        let hit = |h: &HttpMatch, path: &str, how| {
            h.matches_read(&Request::new("GET", path), how).unwrap()
        };
        let admin_prefix = rule(|h| h.path_prefix = Some("/admin/".into()));
        let admin_exact = rule(|h| h.path_exact = Some("/admin".into()));
        let admin_regex = rule(|h| h.path_regex = Some("/admin(/.*)?".into()));
        // Segment parameters (Tomcat, Jetty, Spring cut them), another case
        // (Express, ASP.NET), a final slash added or removed: a deny holds.
        for path in [
            "/admin;x=1/users",
            "/admin;/users",
            "/ADMIN/users",
            "/Admin;jsessionid=1/users",
            "/admin",
        ] {
            assert!(hit(&admin_prefix, path, AnyReading), "prefix {path}");
            assert!(!hit(&admin_prefix, path, Joined), "route {path}");
        }
        for path in ["/admin/", "/admin;", "/ADMIN", "/admin;x/"] {
            assert!(hit(&admin_exact, path, AnyReading), "exact {path}");
        }
        for path in ["/admin;x/users", "/AdMiN"] {
            assert!(hit(&admin_regex, path, AnyReading), "regex {path}");
        }
        // A deny written with capitals holds in any case too, a regex's
        // as well.
        let capital = rule(|h| h.path_prefix = Some("/Admin/".into()));
        for path in ["/ADMIN/x", "/admin/x", "/Admin;x/y"] {
            assert!(hit(&capital, path, AnyReading), "{path}");
        }
        let capital_regex = rule(|h| h.path_regex = Some("/Admin/.*".into()));
        assert!(hit(&capital_regex, "/admin/x", AnyReading));
        assert!(!hit(&capital_regex, "/admin/x", EveryReading));
        // `;` escaped (a server in front may decode it), and a format
        // suffix (Rails, older Spring), to a deny.
        assert!(hit(&admin_prefix, "/admin%3Bx/users", AnyReading));
        assert!(hit(&admin_exact, "/admin.json", AnyReading));
        assert!(!hit(&admin_exact, "/admin.json", EveryReading));
        assert!(!hit(&admin_exact, "/administrators.json", AnyReading));
        for path in ["/admin.x.json", "/admin.json/", "/ADMIN.JSON"] {
            assert!(hit(&admin_exact, path, AnyReading), "{path}");
        }
        // A negated class keeps its meaning: folding is added, not swapped.
        let no_capitals = rule(|h| h.path_regex = Some("/files/[^A-Z]+".into()));
        assert!(hit(&no_capitals, "/files/abc", AnyReading));
        // Not more than that: other paths stay out of the deny.
        for path in ["/administrators", "/public/admin", "/", "/;admin"] {
            assert!(!hit(&admin_prefix, path, AnyReading), "{path}");
        }
        // An allow holds only if the path both as sent and without
        // parameters is allowed; case and the final slash are as written.
        let public = rule(|h| h.path_prefix = Some("/public/".into()));
        assert!(hit(&public, "/public/a;v=1/b", EveryReading));
        assert!(!hit(&public, "/public;x/../admin", EveryReading));
        assert!(!hit(&public, "/x;/public/", EveryReading));
        assert!(!hit(&public, "/PUBLIC/a", EveryReading));
        let login = rule(|h| h.path_exact = Some("/login".into()));
        assert!(hit(&login, "/login", EveryReading));
        assert!(!hit(&login, "/login;jsessionid=1", EveryReading));
        assert!(!hit(&login, "/login/", EveryReading));
        let upper = rule(|h| h.path_exact = Some("/Api/V1".into()));
        assert!(hit(&upper, "/Api/V1", EveryReading));
        assert_eq!(path_readings("/", true), ["/"]);
        assert_eq!(path_readings("/a", false), ["/a"]);
        assert_eq!(path_readings("/;x/a", false), ["/;x/a", "/a"]);
    }

    #[test]
    fn a_method_is_read_the_ways_servers_read_it() {
        use Repeated::*;
        let delete = HttpMatch {
            methods: vec!["DELETE".into()],
            ..Default::default()
        };
        let get = HttpMatch {
            methods: vec!["GET".into()],
            ..Default::default()
        };
        let hit = |h: &HttpMatch, r: &Request, how| h.matches_read(r, how).unwrap();
        // An override header or `_method` names the method frameworks act on.
        for r in [
            Request::new("POST", "/").with_header("X-HTTP-Method-Override", "DELETE"),
            Request::new("POST", "/").with_header("x-http-method", " delete"),
            Request::new("POST", "/").with_header("X-Method-Override", "PUT, DELETE"),
            Request::new("POST", "/").with_header("X_HTTP_Method_Override", "DELETE"),
            Request::new("POST", "/").with_query("_method=delete"),
            // PHP reads `.method` and ` _method` as `_method`.
            Request::new("POST", "/").with_query(".method=DELETE"),
            Request::new("POST", "/").with_query("+_method=DELETE"),
            Request::new("POST", "/").with_query("%20%20.method=DELETE"),
        ] {
            assert!(hit(&delete, &r, AnyReading), "{r:?}");
            assert!(!hit(&delete, &r, Joined), "{r:?}");
        }
        let overridden = Request::new("GET", "/").with_header("X-HTTP-Method-Override", "DELETE");
        assert!(
            !hit(&get, &overridden, EveryReading),
            "an allow of GET is not one of DELETE"
        );
        assert!(hit(&get, &Request::new("GET", "/"), EveryReading));
        // A deny of GET holds for HEAD; an allow of GET does not let HEAD in.
        let head = Request::new("HEAD", "/");
        assert!(hit(&get, &head, AnyReading));
        assert!(!hit(&get, &head, EveryReading));
        assert!(!hit(&delete, &head, AnyReading));
    }

    #[test]
    fn an_inverted_allow_holds_for_every_element_of_a_list() {
        use Repeated::*;
        let not_admin = HeaderMatch {
            exact: Some("admin".into()),
            invert: true,
            ..header("x-role")
        };
        let listed = Request::new("GET", "/").with_header("x-role", "reader, admin");
        assert!(!not_admin.matches_read(&listed, EveryReading).unwrap());
        let reader = Request::new("GET", "/").with_header("x-role", "reader, writer");
        assert!(not_admin.matches_read(&reader, EveryReading).unwrap());
    }

    #[test]
    fn header_rules() {
        let r = Request::new("GET", "/")
            .with_header("X-Env", "prod-eu")
            .with_header("Authorization", "Bearer abc");
        let check = |h: HeaderMatch| h.matches(&r).unwrap();
        assert!(check(HeaderMatch {
            present: true,
            ..header("x-env")
        }));
        assert!(!check(HeaderMatch {
            present: true,
            ..header("x-missing")
        }));
        assert!(check(HeaderMatch {
            exact: Some("prod-eu".into()),
            ..header("X-Env")
        }));
        assert!(!check(HeaderMatch {
            exact: Some("prod".into()),
            ..header("X-Env")
        }));
        assert!(check(HeaderMatch {
            prefix: Some("prod".into()),
            ..header("X-Env")
        }));
        assert!(check(HeaderMatch {
            suffix: Some("-eu".into()),
            ..header("X-Env")
        }));
        assert!(!check(HeaderMatch {
            suffix: Some("-us".into()),
            ..header("X-Env")
        }));
        assert!(check(HeaderMatch {
            regex: Some("prod-(eu|us)".into()),
            ..header("X-Env")
        }));
        assert!(!check(HeaderMatch {
            regex: Some("prod".into()),
            ..header("X-Env")
        }));
        // Invert.
        assert!(!check(HeaderMatch {
            exact: Some("prod-eu".into()),
            invert: true,
            ..header("X-Env")
        }));
        assert!(check(HeaderMatch {
            exact: Some("dev".into()),
            invert: true,
            ..header("X-Env")
        }));
        assert!(!check(HeaderMatch {
            present: true,
            invert: true,
            ..header("X-Env")
        }));
        // A missing header only matches an inverted Present rule.
        assert!(check(HeaderMatch {
            present: true,
            invert: true,
            ..header("X-None")
        }));
        assert!(!check(HeaderMatch {
            exact: Some("a".into()),
            invert: true,
            ..header("X-None")
        }));
        assert!(!check(HeaderMatch {
            regex: Some(".*".into()),
            ..header("X-None")
        }));
        assert!(!check(HeaderMatch {
            regex: Some(".*".into()),
            invert: true,
            ..header("X-None")
        }));
        // A rule with nothing set never matches.
        assert!(!check(header("X-Env")));
    }

    #[test]
    fn all_rules_must_match() {
        let h = HttpMatch {
            path_prefix: Some("/a".into()),
            methods: vec!["POST".into()],
            headers: vec![
                HeaderMatch {
                    present: true,
                    ..header("x-1")
                },
                HeaderMatch {
                    exact: Some("y".into()),
                    ..header("x-2")
                },
            ],
            ..Default::default()
        };
        let ok = Request::new("POST", "/a/b")
            .with_header("x-1", "")
            .with_header("x-2", "y");
        assert!(h.matches(&ok).unwrap());
        let bad = Request::new("POST", "/a/b")
            .with_header("x-1", "")
            .with_header("x-2", "n");
        assert!(!h.matches(&bad).unwrap());
    }

    #[test]
    fn bad_regex_at_match_time_is_an_error() {
        let h = HttpMatch {
            path_regex: Some("(".into()),
            ..Default::default()
        };
        assert_eq!(
            h.matches(&Request::new("GET", "/")).unwrap_err().field,
            "PathRegex"
        );
        let h = HttpMatch {
            headers: vec![HeaderMatch {
                regex: Some("[".into()),
                ..header("a")
            }],
            ..Default::default()
        };
        let e = h
            .matches(&Request::new("GET", "/").with_header("a", "b"))
            .unwrap_err();
        assert_eq!(e.field, "Header[0].Regex");
    }

    #[test]
    fn validation_names_fields() {
        let v = |h: HttpMatch| validate_http_match("HTTP", &h).map_err(|e| e.to_string());
        assert_eq!(v(HttpMatch::default()), Ok(()));
        let e = v(HttpMatch {
            path_exact: Some("/a".into()),
            path_prefix: Some("/b".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e, "HTTP: at most one of PathExact, PathPrefix, PathRegex may be set (found PathExact, PathPrefix)");
        assert_eq!(
            v(HttpMatch {
                path_prefix: Some("api".into()),
                ..Default::default()
            })
            .unwrap_err(),
            "HTTP.PathPrefix: \"api\" must start with '/'"
        );
        assert_eq!(
            v(HttpMatch {
                path_exact: Some("".into()),
                ..Default::default()
            })
            .unwrap_err(),
            "HTTP.PathExact: \"\" must start with '/'"
        );
        let e = v(HttpMatch {
            path_regex: Some("(".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.starts_with("HTTP.PathRegex: invalid regex: "), "{e}");
        assert!(!e.contains('\n'));
        // A pattern that would close the anchoring group and match
        // anything is refused, and never matches.
        let escape = HttpMatch {
            path_regex: Some("a)|(.*".into()),
            ..Default::default()
        };
        let e = v(escape.clone()).unwrap_err();
        assert!(e.starts_with("HTTP.PathRegex: invalid regex: "), "{e}");
        assert!(escape.matches(&Request::new("GET", "/anything")).is_err());
        // One too large to compile is refused by name, not compiled to 10 MiB.
        let e = v(HttpMatch {
            path_regex: Some("\\w{1,500}\\w{1,500}\\w{1,500}".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.starts_with("HTTP.PathRegex: invalid regex: "), "{e}");
        let e = v(HttpMatch {
            methods: vec!["get".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.starts_with("HTTP.Methods[0]: \"get\" is not an HTTP method"),
            "{e}"
        );
        let e = v(HttpMatch {
            methods: vec!["GET".into(), "GET".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e, "HTTP.Methods[1]: duplicate method \"GET\"");
        let hv = |h: HeaderMatch| {
            v(HttpMatch {
                headers: vec![
                    HeaderMatch {
                        present: true,
                        ..header("ok")
                    },
                    h,
                ],
                ..Default::default()
            })
        };
        assert_eq!(
            hv(HeaderMatch {
                exact: Some("x".into()),
                ..header("")
            })
            .unwrap_err(),
            "HTTP.Header[1].Name: must not be empty"
        );
        assert!(hv(HeaderMatch {
            exact: Some("x".into()),
            ..header("a b")
        })
        .unwrap_err()
        .starts_with("HTTP.Header[1].Name: \"a b\" is not a valid header name"));
        assert_eq!(
            hv(header("x")).unwrap_err(),
            "HTTP.Header[1]: one of Present, Exact, Prefix, Suffix or Regex is required"
        );
        assert_eq!(
            hv(HeaderMatch { present: true, exact: Some("x".into()), ..header("x") }).unwrap_err(),
            "HTTP.Header[1]: only one of Present, Exact, Prefix, Suffix or Regex may be set (found Present, Exact)"
        );
        assert!(hv(HeaderMatch {
            regex: Some("*".into()),
            ..header("x")
        })
        .unwrap_err()
        .starts_with("HTTP.Header[1].Regex: invalid regex"));
        assert_eq!(
            hv(HeaderMatch {
                suffix: Some("x".into()),
                invert: true,
                ..header("x")
            }),
            Ok(())
        );
    }

    #[test]
    fn serde_uses_consul_field_names() {
        let h: HttpMatch = serde_json::from_str(
            r#"{"PathPrefix":"/a","Methods":["GET"],"Header":[{"Name":"x","Exact":"1","Invert":true}]}"#,
        )
        .unwrap();
        assert_eq!(h.path_prefix.as_ref().map(|p| p.as_str()), Some("/a"));
        assert!(h.headers[0].invert);
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(
            json,
            r#"{"PathPrefix":"/a","Methods":["GET"],"Header":[{"Name":"x","Exact":"1","Invert":true}]}"#
        );
        let e = serde_json::from_str::<HttpMatch>(r#"{"Path":"/a"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `Path`"), "{e}");
    }

    #[test]
    fn query_params_match_decoded_values_by_name() {
        let m: HttpMatch = serde_json::from_str(
            r#"{"QueryParam":[{"Name":"x-debug","Exact":"on now"},{"Name":"v","Regex":"[0-9]+"},
                {"Name":"trace","Present":true}]}"#,
        )
        .unwrap();
        validate_http_match("Routes[0].Match.HTTP", &m).unwrap();
        let r = |q: &str| Request::new("GET", "/").with_query(q);
        assert!(m.matches(&r("x-debug=on%20now&v=12&trace")).unwrap());
        assert!(
            !m.matches(&r("trace=&v=x&v=7&x-debug=on+now")).unwrap(),
            "the first value counts"
        );
        assert!(
            !m.matches(&r("x-debug=on%20now&v=12")).unwrap(),
            "trace absent"
        );
        assert!(
            !m.matches(&r("x-debug=on%20now&v=12a&trace")).unwrap(),
            "whole value"
        );
        assert!(
            !m.matches(&r("X-DEBUG=on%20now&v=1&trace")).unwrap(),
            "names are exact"
        );
    }

    #[test]
    fn query_param_rules_need_one_kind_and_a_name() {
        let bad = |json: &str| {
            let m: HttpMatch = serde_json::from_str(json).unwrap();
            validate_http_match("HTTP", &m).unwrap_err().to_string()
        };
        assert_eq!(
            bad(r#"{"QueryParam":[{"Name":"a"}]}"#),
            "HTTP.QueryParam[0]: one of Present, Exact or Regex is required"
        );
        assert!(
            bad(r#"{"QueryParam":[{"Name":"a","Exact":"1","Present":true}]}"#)
                .contains("only one of")
        );
        assert_eq!(
            bad(r#"{"QueryParam":[{"Name":"","Present":true}]}"#),
            "HTTP.QueryParam[0].Name: must not be empty"
        );
        assert!(bad(r#"{"QueryParam":[{"Name":"a","Regex":"("}]}"#)
            .starts_with("HTTP.QueryParam[0].Regex: invalid regex"));
    }
}
