//! Normalizing an HTTP request path before it is matched, the way Envoy does
//! with `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action:
//! REJECT_REQUEST`, so that a rule on `/admin/` cannot be walked around with
//! `//admin/`, `/./admin/`, `/x/../admin/` or `/%61dmin/`. The normalized path
//! is the one matched *and* forwarded: the rules and the workload see the
//! same path.
//!
//! In order:
//! 1. The path must be origin-form (start with `/`) and hold only characters
//!    a URI path may hold; a raw `\` is refused.
//! 2. Percent-escapes must be two hex digits. Escapes of `/` and `\`
//!    (`%2F`, `%5C`) are refused: their meaning differs between proxies and
//!    servers. Escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!    decoded; any other escape is kept, its hex digits upper-cased.
//! 3. Runs of `/` become one.
//! 4. A dot segment with parameters (`..;x`, `.;`, the `;` escaped or not)
//!    is refused: servers that drop a segment's parameters before resolving
//!    dot segments (Tomcat, Spring) read `/public/..;/admin` as `/admin`,
//!    while to the rules it is under `/public/`.
//!    So is a segment of parameters only (`;x`) with a `..` after it:
//!    cut to nothing and merged away, it shifts what the `..` removes.
//! 5. Dot segments are removed (RFC 3986 section 5.2.4); `..` above the root
//!    stays at the root.
use std::borrow::Cow;

/// Why a path is refused (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotOriginForm,
    #[error("the path holds {0:?}, which a URI path may not hold")]
    BadCharacter(char),
    #[error("the path holds a bad percent-escape at byte {0}")]
    BadEscape(usize),
    #[error("the path holds an encoded '/' or '\\' ({0}), which is refused")]
    EscapedSlash(String),
    #[error("the path holds a dot segment with parameters ({0:?}), which servers resolve differently; refused")]
    DotSegmentParameters(String),
    #[error("a rule path with a '..' segment would stand for a path above it")]
    DotDotInRule,
    #[error("the path holds a segment of parameters only ({0:?}) before a '..' segment, which servers resolve differently; refused")]
    ParametersOnlySegment(String),
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters RFC 3986 allows in a path besides `%` escapes: unreserved,
/// sub-delims, `:`, `@` and `/`.
fn is_path_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The normalized form of `path` (the path of a request, without its
/// query), borrowed when it is already normal.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let decoded = decode(path)?;
    let merged = merge_slashes(&decoded);
    if let Some(segment) = dot_segment_with_parameters(&merged) {
        return Err(PathError::DotSegmentParameters(segment.to_string()));
    }
    if let Some(segment) = parameters_only_before_dot_dot(&merged) {
        return Err(PathError::ParametersOnlySegment(segment.to_string()));
    }
    let normal = remove_dot_segments(&merged);
    if normal == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(normal))
    }
}

/// A rule's path (`PathExact`, `PathPrefix`) in the form requests' paths
/// are compared in: normalized as [`normalize_path`] does, but refused when
/// it holds a `..` segment. Resolving one would move the rule up the tree
/// (a prefix `/public/..` would become `/`, every path) where, as written,
/// it matched no normalized path at all.
pub fn normalize_rule_path(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let merged = merge_slashes(&decode(path)?);
    if merged.split('/').any(|segment| segment == "..") {
        return Err(PathError::DotDotInRule);
    }
    Ok(normalize_path(&merged)?.into_owned())
}

/// Step 2: checks every byte and escape; decodes unreserved escapes.
fn decode(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (hi, lo) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(h), Some(l)) => (*h, *l),
                _ => return Err(PathError::BadEscape(i)),
            };
            let (Some(h), Some(l)) = (hex(hi), hex(lo)) else {
                return Err(PathError::BadEscape(i));
            };
            let value = h * 16 + l;
            if value == b'/' || value == b'\\' {
                return Err(PathError::EscapedSlash(path[i..i + 3].to_string()));
            }
            if is_unreserved(value) {
                out.push(value as char);
            } else {
                out.push('%');
                out.push(hi.to_ascii_uppercase() as char);
                out.push(lo.to_ascii_uppercase() as char);
            }
            i += 3;
        } else if is_path_char(b) {
            out.push(b as char);
            i += 1;
        } else {
            let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
            return Err(PathError::BadCharacter(ch));
        }
    }
    Ok(out)
}

/// Step 3.
fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for ch in path.chars() {
        if ch == '/' && out.ends_with('/') {
            continue;
        }
        out.push(ch);
    }
    out
}

/// Step 4: the first segment of `path` (decoded) that is `.` or `..`
/// followed by parameters (`;`, or `;` escaped as `%3B`).
fn dot_segment_with_parameters(path: &str) -> Option<&str> {
    path.split('/').find(|segment| {
        let head = segment.split(';').next().unwrap_or_default();
        let head = head.split("%3B").next().unwrap_or_default();
        head.len() < segment.len() && matches!(head, "." | "..")
    })
}

/// Step 4, also: a segment of parameters only (`;`, `;x`) followed, later
/// in the path, by a `..`. A server that cuts each segment's parameters
/// first (Tomcat, Spring) is left with an empty segment, which it merges
/// away, and its `..` then takes the segment before: `/public/;/../admin`
/// is `/admin` to it and `/public/admin` resolved as written.
fn parameters_only_before_dot_dot(path: &str) -> Option<&str> {
    let mut segments = path.split('/');
    let found = segments.find(|s| s.starts_with(';'))?;
    segments.any(|s| s == "..").then_some(found)
}

/// Step 5, on a path that starts with `/`. A final `.` or `..` leaves a
/// trailing slash (`/a/b/..` is `/a/`), as RFC 3986 does.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut ends_in_dot_segment = false;
    for segment in path[1..].split('/') {
        ends_in_dot_segment = matches!(segment, "." | "..");
        match segment {
            "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    out.push('/');
    out.push_str(&kept.join("/"));
    if ends_in_dot_segment && !out.ends_with('/') {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> String {
        normalize_path(p).unwrap().into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/admin/",
            "/a/b",
            "/a/b/",
            "/v1/users;x=1",
            "/%C3%A9t%C3%A9",
            "/a%20b",
        ] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    /// The bypasses found against an unnormalized prefix match on `/admin/`.
    #[test]
    fn bypass_corpus_normalizes_to_the_protected_path() {
        for p in [
            "//admin/",
            "/./admin/",
            "/x/../admin/",
            "/%61dmin/",
            "/%61%64%6d%69%6e/",
            "///admin//",
            "/admin/./",
            "/x/y/../../admin/",
            "/../admin/",
            "/.%2e/admin/",
            "/%2e/admin/",
            "/admin/x/..",
        ] {
            let n = norm(p);
            assert!(n.starts_with("/admin/") || n == "/admin", "{p} -> {n}");
        }
    }

    #[test]
    fn dot_segments_as_rfc_3986_says() {
        assert_eq!(norm("/a/b/c/./../../g"), "/a/g");
        assert_eq!(norm("/mid/content=5/../6"), "/mid/6");
        assert_eq!(norm("/a/b/.."), "/a/");
        assert_eq!(norm("/a/b/."), "/a/b/");
        assert_eq!(norm("/.."), "/");
        assert_eq!(norm("/."), "/");
        assert_eq!(
            norm("/a/..b/c"),
            "/a/..b/c",
            "..b is a name, not a dot segment"
        );
        assert_eq!(norm("/a/.../c"), "/a/.../c");
    }

    #[test]
    fn escapes_are_decoded_only_for_unreserved_characters() {
        assert_eq!(norm("/%7Euser"), "/~user");
        assert_eq!(norm("/a%2db"), "/a-b");
        assert_eq!(norm("/a%3fb"), "/a%3Fb", "an escaped '?' stays escaped");
        assert_eq!(norm("/a%20b"), "/a%20b");
        assert_eq!(norm("/%00"), "/%00");
    }

    #[test]
    fn encoded_slashes_bad_escapes_and_characters_are_refused() {
        for p in ["/admin%2fx", "/%2Fadmin/", "/a%5cb", "/%5C"] {
            assert!(
                matches!(normalize_path(p), Err(PathError::EscapedSlash(_))),
                "{p}"
            );
        }
        for p in ["/a%", "/a%2", "/a%zz", "/a%g1"] {
            assert!(
                matches!(normalize_path(p), Err(PathError::BadEscape(_))),
                "{p}"
            );
        }
        for p in ["/a\\b", "/a b", "/a\"b", "/é", "/a<b>", "/a\u{0}"] {
            assert!(
                matches!(normalize_path(p), Err(PathError::BadCharacter(_))),
                "{p}"
            );
        }
        assert_eq!(normalize_path("admin"), Err(PathError::NotOriginForm));
        assert_eq!(normalize_path("*"), Err(PathError::NotOriginForm));
        assert_eq!(normalize_path(""), Err(PathError::NotOriginForm));
    }

    #[test]
    fn dot_segments_with_parameters_are_refused() {
        for path in [
            "/public/..;/admin",
            "/public/..;x=1/admin",
            "/public/.;/admin",
            "/public/%2e%2e;/admin",
            "/public/..%3b/admin",
            "/public/%2E%2E%3B/admin",
            "/..;",
        ] {
            assert!(
                matches!(
                    normalize_path(path),
                    Err(PathError::DotSegmentParameters(_))
                ),
                "{path}: {:?}",
                normalize_path(path)
            );
        }
        // Parameters on other segments, and dots that are not a segment
        // of their own, stay.
        for path in ["/a;b/c", "/a/...;/b", "/a/..x;/b", "/a/b;..", "/v1;v=2/x"] {
            assert_eq!(norm(path), path);
        }
    }

    #[test]
    fn a_segment_of_parameters_only_before_a_dot_dot_is_refused() {
        // Tomcat cuts `;` and `;x` to nothing and merges them away: its
        // `..` then removes `public`, where resolved as written it removes
        // the parameters.
        for path in [
            "/public/;/../admin",
            "/public/;x=1/../admin/users",
            "/a/;/b/../../c",
        ] {
            assert!(
                matches!(
                    normalize_path(path),
                    Err(PathError::ParametersOnlySegment(_))
                ),
                "{path}: {:?}",
                normalize_path(path)
            );
        }
        // Without a `..` after it (a session id on a directory's URL), or
        // with the `..` before it, it stays.
        for path in ["/app/;jsessionid=ABC", "/a/;x/b", "/a/../;x"] {
            assert!(normalize_path(path).is_ok(), "{path}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in [
            "//a/./b/../c//",
            "/%61/%2e%2e/b",
            "/x/%7e/../y",
            "/a/b/c/./../../g/",
        ] {
            let once = norm(p);
            assert_eq!(norm(&once), once, "{p}");
        }
    }
}
