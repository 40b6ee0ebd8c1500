//! Reading JSON, TOML or HCL documents that users write (config entries, L7
//! intention files) into typed values, with errors that carry the line and
//! column when the parser knows them. HCL is read as Consul's examples write
//! it (attributes, blocks for nested objects, lists of objects) into a JSON
//! value first, then into the type.

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

/// The file formats users may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileFormat {
    Json,
    Toml,
    Hcl,
}

impl FileFormat {
    /// Picks the format from a file name: `.json` is JSON, `.toml` is TOML.
    pub fn from_path(path: impl AsRef<Path>) -> Option<FileFormat> {
        match path
            .as_ref()
            .extension()?
            .to_str()?
            .to_ascii_lowercase()
            .as_str()
        {
            "json" => Some(FileFormat::Json),
            "toml" => Some(FileFormat::Toml),
            "hcl" => Some(FileFormat::Hcl),
            _ => None,
        }
    }

    /// Guesses the format from the text: a JSON document starts with `{`; a
    /// line that opens a block (`Name {`), an object left open (`= {`) or a
    /// list of objects (`= [` then `{`), which TOML has not, makes it HCL;
    /// anything else is TOML.
    pub fn sniff(text: &str) -> FileFormat {
        if text.trim_start().starts_with('{') {
            return FileFormat::Json;
        }
        let opens_block = |line: &str| {
            let line = line.trim();
            let Some(head) = line.strip_suffix('{') else {
                return false;
            };
            let head = head.trim_end();
            !head.is_empty()
                && !head.ends_with('=')
                && head
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ' ' || c == '"')
        };
        let mut lines = text.lines().map(str::trim).filter(|l| !l.starts_with('#'));
        let mut previous_opens_list = false;
        for line in lines.by_ref() {
            // TOML's inline tables end on their line; HCL's objects need not.
            let opens_object = line.ends_with("= {");
            if opens_block(line) || opens_object || (previous_opens_list && line.starts_with('{')) {
                return FileFormat::Hcl;
            }
            previous_opens_list = line.ends_with("= [");
        }
        FileFormat::Toml
    }
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileFormat::Json => "JSON",
            FileFormat::Toml => "TOML",
            FileFormat::Hcl => "HCL",
        })
    }
}

/// A document that did not parse or did not fit the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{format}{}: {message}", location(*.line, *.column))]
pub struct ParseError {
    pub format: FileFormat,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    pub message: String,
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l}, column {c}"),
        (Some(l), None) => format!(" at line {l}"),
        _ => String::new(),
    }
}

/// Parses `text` as `format` into a `T`.
///
/// Errors raised inside buffered values (such as a config entry, whose `Kind` tag
/// must be read first) come without a position from serde; for unknown fields and
/// variants the position is then that of the first whole-word occurrence of the
/// offending name in the text.
pub fn parse_document<T: DeserializeOwned>(
    text: &str,
    format: FileFormat,
) -> Result<T, ParseError> {
    parse_raw(text, format).map_err(|mut e| {
        if e.line.is_none() {
            if let Some(offset) = offending_name(&e.message).and_then(|n| find_word(text, n)) {
                let (l, c) = line_column(text, offset);
                e.line = Some(l);
                e.column = Some(c);
            }
        }
        e
    })
}

/// The name in "unknown field `X`" or "unknown variant `X`".
fn offending_name(message: &str) -> Option<&str> {
    let rest = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| message.find(p).map(|i| &message[i + p.len()..]))?;
    let name = &rest[..rest.find('`')?];
    (!name.is_empty()).then_some(name)
}

/// Byte offset of the first occurrence of `word` not inside a longer identifier.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    text.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// The deepest nesting of `{`, `[` and `(` an HCL document may have:
/// hcl-rs's parser takes exponential time on deeply nested broken input,
/// and Consul's deepest config entries (a route's header matches) need 6.
const MAX_HCL_NESTING: usize = 10;

/// Refuses HCL text nested deeper than `max` (brackets, braces and
/// parentheses, also inside quoted strings) before hcl-rs parses it: its
/// parser takes exponential time on deeply nested broken input (a 405-byte
/// text 27 deep took over 10 s in fuzzing).
pub fn check_hcl_nesting(text: &str, max: usize) -> Result<(), String> {
    let mut depth = 0usize;
    for c in text.bytes() {
        match c {
            b'{' | b'[' | b'(' => {
                depth += 1;
                if depth > max {
                    return Err(format!("nested more than {max} deep"));
                }
            }
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn parse_hcl<T: DeserializeOwned>(text: &str) -> Result<T, ParseError> {
    let error = |message: String| ParseError {
        format: FileFormat::Hcl,
        line: None,
        column: None,
        message,
    };
    check_hcl_nesting(text, MAX_HCL_NESTING).map_err(error)?;
    let text = hcl1_blocks_as_objects(text);
    let value: serde_json::Value = hcl::from_str(&text).map_err(|e| {
        // hcl-rs's message carries its own position; keep it as it says it.
        error(e.to_string().trim().to_string())
    })?;
    serde_json::from_value(value).map_err(|e| error(e.to_string()))
}

/// Consul reads HCL 1, whose examples write nested objects as blocks even
/// inside a list's objects (`Routes = [ { Match { HTTP { … } } } ]`), which
/// HCL 2 allows only at the top. A line that opens a block without labels,
/// `Name {`, becomes `Name = {`: the same object, in HCL 2's syntax. (Line
/// numbers stay as written.)
fn hcl1_blocks_as_objects(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let ending = &line[body.len()..];
        let trimmed = body.trim_end();
        let opens = trimmed.strip_suffix('{').map(str::trim_end).filter(|head| {
            let name = head.trim_start();
            !name.is_empty()
                && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        match opens {
            Some(head) => {
                out.push_str(head);
                out.push_str(" = {");
                out.push_str(ending);
            }
            None => out.push_str(line),
        }
    }
    out
}

fn parse_raw<T: DeserializeOwned>(text: &str, format: FileFormat) -> Result<T, ParseError> {
    match format {
        FileFormat::Hcl => parse_hcl(text),
        FileFormat::Json => serde_json::from_str(text).map_err(|e| {
            let known = e.line() > 0;
            // serde_json's Display appends " at line L column C"; keep the message only.
            let full = e.to_string();
            let message = match full.rfind(" at line ") {
                Some(i) if known => full[..i].to_string(),
                _ => full,
            };
            ParseError {
                format,
                line: known.then(|| e.line()),
                column: known.then(|| e.column()),
                message,
            }
        }),
        FileFormat::Toml => toml::from_str(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_column(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            ParseError {
                format,
                line,
                column,
                message: e.message().trim().to_string(),
            }
        }),
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(rename = "Name")]
        name: String,
        #[serde(rename = "Port", default)]
        port: u16,
    }

    #[test]
    fn formats_from_paths() {
        assert_eq!(FileFormat::from_path("a/b.json"), Some(FileFormat::Json));
        assert_eq!(FileFormat::from_path("b.TOML"), Some(FileFormat::Toml));
        assert_eq!(FileFormat::from_path("b.yaml"), None);
        assert_eq!(FileFormat::from_path("b"), None);
        assert_eq!(FileFormat::sniff("  {\"a\":1}"), FileFormat::Json);
        assert_eq!(FileFormat::sniff("[[Routes]]\n"), FileFormat::Toml);
        assert_eq!(FileFormat::sniff("[x]\n"), FileFormat::Toml);
        assert_eq!(FileFormat::sniff("Kind = \"x\""), FileFormat::Toml);
    }

    #[test]
    fn parses_both() {
        let j: Doc = parse_document(r#"{"Name":"a","Port":1}"#, FileFormat::Json).unwrap();
        let t: Doc = parse_document("Name = \"a\"\nPort = 1\n", FileFormat::Toml).unwrap();
        assert_eq!(j, t);
    }

    #[test]
    fn json_errors_have_positions() {
        let e = parse_document::<Doc>("{\n  \"Name\": \"a\",\n  \"Prt\": 1\n}", FileFormat::Json)
            .unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("unknown field `Prt`"), "{e}");
        assert!(e.to_string().starts_with("JSON at line 3, column"), "{e}");
        let e = parse_document::<Doc>("{", FileFormat::Json).unwrap_err();
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn toml_errors_have_positions() {
        let e =
            parse_document::<Doc>("Name = \"a\"\nPort = \"x\"\n", FileFormat::Toml).unwrap_err();
        assert_eq!((e.line, e.column), (Some(2), Some(8)), "{e}");
        assert!(
            e.to_string().starts_with("TOML at line 2, column 8: "),
            "{e}"
        );
        let e = parse_document::<Doc>("Name = \"a\"\nColour = 1\n", FileFormat::Toml).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("Colour"), "{e}");
        let e = parse_document::<Doc>("Name = \n", FileFormat::Toml).unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn finds_offending_names() {
        assert_eq!(
            offending_name("unknown field `Prt`, expected `Name`"),
            Some("Prt")
        );
        assert_eq!(
            offending_name("unknown variant `udp`, expected"),
            Some("udp")
        );
        assert_eq!(offending_name("missing field `Kind`"), None);
        assert_eq!(find_word("Portal = 1\nPort = 2", "Port"), Some(11));
        assert_eq!(find_word("\"Port\": 1", "Port"), Some(1));
        assert_eq!(find_word("Ports", "Port"), None);
    }

    #[test]
    fn line_column_counts_chars() {
        assert_eq!(line_column("ab\ncé d", 7), (2, 4));
        assert_eq!(line_column("", 0), (1, 1));
    }
}
