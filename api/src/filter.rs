//! Subset filters of `service-resolver` entries (`Filter = "Service.Meta.version == v1"`):
//! a small parser for the part of Consul's filter language that subsets need, and
//! a pure matcher against a service instance.
//!
//! Grammar (clauses joined with `and`; an empty filter matches every instance):
//!
//! ```text
//! Service.Meta.KEY == VALUE
//! Service.Meta.KEY != VALUE        (true when KEY is missing)
//! Service.Tags contains VALUE
//! Service.Tags not contains VALUE
//! ```
//!
//! VALUE is a bare word (`v1`, `us-east-1`) or a double-quoted string with `\"`
//! and `\\` escapes. Positions in errors count characters from 1.

use std::fmt;
use std::str::FromStr;

use crate::catalog::ServiceInstance;

/// One condition on an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clause {
    MetaEquals { key: String, value: String },
    MetaNotEquals { key: String, value: String },
    TagsContains(String),
    TagsNotContains(String),
}

/// A parsed filter: all clauses must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    pub clauses: Vec<Clause>,
}

/// Where and why a filter does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at position {position}: {message}")]
pub struct FilterError {
    pub position: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Quoted(String),
    Eq,
    Ne,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("{w:?}"),
            Tok::Quoted(q) => format!("\"{q}\" (quoted)"),
            Tok::Eq => "'=='".into(),
            Tok::Ne => "'!='".into(),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<(usize, Tok)>, FilterError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let fail = |position: usize, message: String| FilterError { position, message };
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        if c.is_whitespace() {
            i += 1;
        } else if c == '=' || c == '!' {
            if chars.get(i + 1) == Some(&'=') {
                out.push((pos, if c == '=' { Tok::Eq } else { Tok::Ne }));
                i += 2;
            } else {
                return Err(fail(pos, format!("expected '==' or '!=', found {c:?}")));
            }
        } else if c == '"' {
            let mut value = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(fail(pos, "unterminated quoted string".into())),
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => match chars.get(i + 1) {
                        Some(e @ ('"' | '\\')) => {
                            value.push(*e);
                            i += 2;
                        }
                        _ => {
                            return Err(fail(
                                i + 1,
                                "bad escape in quoted string (only \\\" and \\\\)".into(),
                            ))
                        }
                    },
                    Some(ch) => {
                        value.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push((pos, Tok::Quoted(value)));
        } else {
            let start = i;
            while i < chars.len()
                && !chars[i].is_whitespace()
                && !matches!(chars[i], '=' | '!' | '"')
            {
                i += 1;
            }
            out.push((pos, Tok::Word(chars[start..i].iter().collect())));
        }
    }
    Ok(out)
}

/// The names a filter's fields go by: Consul calls them `Service.Tags` and
/// `Service.Meta.KEY` in subsets and on `/v1/health/service`, and
/// `ServiceTags`, `ServiceMeta.KEY` on `/v1/catalog/service`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selectors {
    pub tags: &'static str,
    pub meta_prefix: &'static str,
}

/// `Service.Tags`, `Service.Meta.KEY`.
pub const SERVICE_SELECTORS: Selectors = Selectors {
    tags: "Service.Tags",
    meta_prefix: "Service.Meta.",
};

/// `ServiceTags`, `ServiceMeta.KEY` (`/v1/catalog/service`'s names).
pub const CATALOG_SELECTORS: Selectors = Selectors {
    tags: "ServiceTags",
    meta_prefix: "ServiceMeta.",
};

/// A subset's filter is parsed once, when its resolver is read.
impl crate::compiled::Compile for Filter {
    fn compile(source: &str) -> Result<Filter, String> {
        parse_filter(source).map_err(|e| e.to_string())
    }
}

/// Parses a subset filter.
pub fn parse_filter(text: &str) -> Result<Filter, FilterError> {
    parse_filter_as(text, SERVICE_SELECTORS)
}

/// Parses a filter whose fields go by `sel`'s names.
pub fn parse_filter_as(text: &str, sel: Selectors) -> Result<Filter, FilterError> {
    let tokens = tokenize(text)?;
    let end = text.chars().count() + 1;
    let mut it = tokens.into_iter().peekable();
    let mut clauses = Vec::new();
    if it.peek().is_none() {
        return Ok(Filter { clauses });
    }
    let fail = |position: usize, message: String| FilterError { position, message };
    loop {
        let (pos, selector) = it
            .next()
            .ok_or_else(|| fail(end, "expected a clause after 'and'".into()))?;
        let clause = match selector {
            Tok::Word(w) if w == sel.tags => {
                let (p, t) = it.next().ok_or_else(|| {
                    fail(
                        end,
                        format!("expected 'contains' or 'not contains' after {}", sel.tags),
                    )
                })?;
                let negated = match t {
                    Tok::Word(ref w) if w == "contains" => false,
                    Tok::Word(ref w) if w == "not" => match it.next() {
                        Some((_, Tok::Word(w))) if w == "contains" => true,
                        Some((p, t)) => {
                            return Err(fail(
                                p,
                                format!("expected 'contains' after 'not', found {}", t.describe()),
                            ))
                        }
                        None => return Err(fail(end, "expected 'contains' after 'not'".into())),
                    },
                    other => {
                        return Err(fail(
                            p,
                            format!(
                                "expected 'contains' or 'not contains' after {}, found {}",
                                sel.tags,
                                other.describe()
                            ),
                        ))
                    }
                };
                let tag = value(&mut it, end, "a tag")?;
                if negated {
                    Clause::TagsNotContains(tag)
                } else {
                    Clause::TagsContains(tag)
                }
            }
            Tok::Word(w) if w.starts_with(sel.meta_prefix) => {
                let key = w[sel.meta_prefix.len()..].to_string();
                if key.is_empty() {
                    return Err(fail(
                        pos,
                        format!("missing metadata key after {}", sel.meta_prefix),
                    ));
                }
                let (p, op) = it
                    .next()
                    .ok_or_else(|| fail(end, format!("expected '==' or '!=' after {w}")))?;
                let v = value(&mut it, end, "a value")?;
                match op {
                    Tok::Eq => Clause::MetaEquals { key, value: v },
                    Tok::Ne => Clause::MetaNotEquals { key, value: v },
                    other => {
                        return Err(fail(
                            p,
                            format!(
                                "expected '==' or '!=' after {w}, found {}",
                                other.describe()
                            ),
                        ))
                    }
                }
            }
            other => {
                return Err(fail(
                    pos,
                    format!(
                        "expected {}KEY or {}, found {} (weft filters on these only)",
                        sel.meta_prefix,
                        sel.tags,
                        other.describe()
                    ),
                ))
            }
        };
        clauses.push(clause);
        match it.next() {
            None => break,
            Some((_, Tok::Word(w))) if w == "and" => {}
            Some((p, t)) => {
                return Err(fail(
                    p,
                    format!("expected 'and' or the end, found {}", t.describe()),
                ))
            }
        }
    }
    Ok(Filter { clauses })
}

fn value(
    it: &mut impl Iterator<Item = (usize, Tok)>,
    end: usize,
    what: &str,
) -> Result<String, FilterError> {
    match it.next() {
        Some((_, Tok::Word(w))) | Some((_, Tok::Quoted(w))) => Ok(w),
        Some((p, t)) => Err(FilterError {
            position: p,
            message: format!("expected {what}, found {}", t.describe()),
        }),
        None => Err(FilterError {
            position: end,
            message: format!("expected {what} at the end"),
        }),
    }
}

impl Filter {
    /// Whether the instance satisfies every clause.
    pub fn matches(&self, instance: &ServiceInstance) -> bool {
        self.clauses.iter().all(|c| match c {
            Clause::MetaEquals { key, value } => instance.meta.get(key) == Some(value),
            Clause::MetaNotEquals { key, value } => instance.meta.get(key) != Some(value),
            Clause::TagsContains(tag) => instance.tags.contains(tag),
            Clause::TagsNotContains(tag) => !instance.tags.contains(tag),
        })
    }
}

impl FromStr for Filter {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, FilterError> {
        parse_filter(s)
    }
}

fn quote(v: &str) -> String {
    let bare = !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '=' | '!' | '"' | '\\'))
        && v != "and"
        && v != "not"
        && v != "contains";
    if bare {
        v.to_string()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.clauses.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            match c {
                Clause::MetaEquals { key, value } => {
                    write!(f, "Service.Meta.{key} == {}", quote(value))?
                }
                Clause::MetaNotEquals { key, value } => {
                    write!(f, "Service.Meta.{key} != {}", quote(value))?
                }
                Clause::TagsContains(t) => write!(f, "Service.Tags contains {}", quote(t))?,
                Clause::TagsNotContains(t) => write!(f, "Service.Tags not contains {}", quote(t))?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::HealthStatus;

    fn inst(tags: &[&str], meta: &[(&str, &str)]) -> ServiceInstance {
        ServiceInstance {
            id: "i".into(),
            service: "api".into(),
            node: "n".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: tags.iter().map(|s| s.to_string()).collect(),
            meta: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            health: HealthStatus::Passing,
            check_output: String::new(),
            create_index: 0,
            modify_index: 0,
            ..Default::default()
        }
    }

    #[test]
    fn parses_clauses() {
        let f =
            parse_filter("Service.Meta.version == v1 and Service.Tags contains canary").unwrap();
        assert_eq!(
            f.clauses,
            vec![
                Clause::MetaEquals {
                    key: "version".into(),
                    value: "v1".into()
                },
                Clause::TagsContains("canary".into()),
            ]
        );
        let f = parse_filter("Service.Meta.zone!=\"us east\" and Service.Tags not contains old")
            .unwrap();
        assert_eq!(
            f.clauses,
            vec![
                Clause::MetaNotEquals {
                    key: "zone".into(),
                    value: "us east".into()
                },
                Clause::TagsNotContains("old".into()),
            ]
        );
        assert_eq!(parse_filter("").unwrap(), Filter::default());
        assert_eq!(parse_filter("   ").unwrap(), Filter::default());
        let f = parse_filter(r#"Service.Meta.k == "a\"b\\c""#).unwrap();
        assert_eq!(
            f.clauses[0],
            Clause::MetaEquals {
                key: "k".into(),
                value: "a\"b\\c".into()
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "Service.Meta.version == v1",
            "Service.Meta.version != v1 and Service.Tags contains a and Service.Tags not contains b",
            "Service.Meta.k == \"two words\"",
            "Service.Meta.k == \"\"",
            "Service.Tags contains \"and\"",
        ] {
            let f = parse_filter(text).unwrap();
            assert_eq!(f.to_string(), text);
            assert_eq!(f.to_string().parse::<Filter>().unwrap(), f);
        }
    }

    #[test]
    fn errors_have_positions() {
        let e = |t: &str| parse_filter(t).unwrap_err();
        let catalog = parse_filter_as(
            "ServiceMeta.zone == z1 and ServiceTags not contains old",
            CATALOG_SELECTORS,
        )
        .unwrap();
        assert_eq!(
            catalog,
            parse_filter("Service.Meta.zone == z1 and Service.Tags not contains old").unwrap(),
            "the catalog's names for the same clauses"
        );
        let wrong = parse_filter_as("Service.Tags contains x", CATALOG_SELECTORS).unwrap_err();
        assert!(
            wrong
                .message
                .contains("expected ServiceMeta.KEY or ServiceTags"),
            "{wrong}"
        );
        assert_eq!(e("Service.Name == api").position, 1);
        assert!(e("Service.Name == api")
            .message
            .contains("expected Service.Meta.KEY or Service.Tags"));
        assert_eq!(e("Service.Meta.v = 1").position, 16);
        assert_eq!(
            e("Service.Meta.v == ").message,
            "expected a value at the end"
        );
        assert_eq!(e("Service.Meta.v contains x").position, 16);
        assert_eq!(
            e("Service.Meta. == x").message,
            "missing metadata key after Service.Meta."
        );
        assert_eq!(e("Service.Tags == x").position, 14);
        assert_eq!(e("Service.Tags not x").position, 18);
        assert_eq!(
            e("Service.Tags contains a or Service.Tags contains b").position,
            25
        );
        assert_eq!(
            e("Service.Tags contains a and").message,
            "expected a clause after 'and'"
        );
        assert_eq!(
            e("Service.Meta.v == \"x").message,
            "unterminated quoted string"
        );
        assert_eq!(e("Service.Meta.v == \"\\n\"").position, 20);
        assert_eq!(
            e("Service.Meta.v == ==").message,
            "expected a value, found '=='"
        );
        assert_eq!(
            e("x").to_string(),
            "at position 1: expected Service.Meta.KEY or Service.Tags, found \"x\" \
             (weft filters on these only)"
        );
    }

    #[test]
    fn matches_instances() {
        let i = inst(&["canary", "v1"], &[("version", "v1"), ("zone", "a")]);
        let m = |t: &str| parse_filter(t).unwrap().matches(&i);
        assert!(m(""));
        assert!(m("Service.Meta.version == v1"));
        assert!(!m("Service.Meta.version == v2"));
        assert!(m("Service.Meta.version != v2"));
        assert!(!m("Service.Meta.version != v1"));
        assert!(!m("Service.Meta.missing == v1"));
        assert!(m("Service.Meta.missing != v1"));
        assert!(m("Service.Tags contains canary"));
        assert!(!m("Service.Tags contains stable"));
        assert!(m("Service.Tags not contains stable"));
        assert!(m(
            "Service.Meta.version == v1 and Service.Meta.zone == a and Service.Tags contains v1"
        ));
        assert!(!m("Service.Meta.version == v1 and Service.Meta.zone == b"));
    }
}
