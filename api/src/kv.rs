//! The key/value store's entries and the rules for keys and values.
use serde::{Deserialize, Serialize};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    /// Binary in compact encodings; a list of numbers in JSON.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub create_index: u64,
    pub modify_index: u64,
    /// An opaque number the writer chose (Consul's `?flags=`).
    #[serde(default)]
    pub flags: u64,
    /// How many times a lock on this key was acquired.
    #[serde(default)]
    pub lock_index: u64,
    /// The session holding the key's lock, if any.
    #[serde(default)]
    pub session: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("key: empty")]
    Empty,
    #[error("key: {0} bytes is longer than {MAX_KEY_BYTES}")]
    TooLong(usize),
    #[error("key {0:?}: must not start with '/'")]
    LeadingSlash(String),
    #[error("key {0:?}: must not contain an empty segment (\"//\")")]
    EmptySegment(String),
    /// A URL would resolve it to another key (browsers and HTTP clients
    /// remove dot segments from paths).
    #[error("key {0:?}: must not have a \".\" or \"..\" segment")]
    DotSegment(String),
    #[error("key {key:?}: character {ch:?} at byte {at} is not printable")]
    BadChar { key: String, ch: char, at: usize },
}

/// Checks a key: 1 to 512 bytes of printable characters, no leading '/',
/// no "//".
pub fn validate_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::Empty);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::TooLong(key.len()));
    }
    if key.starts_with('/') {
        return Err(KvError::LeadingSlash(key.to_string()));
    }
    if key.contains("//") {
        return Err(KvError::EmptySegment(key.to_string()));
    }
    if key
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(KvError::DotSegment(key.to_string()));
    }
    if let Some((at, ch)) = key
        .char_indices()
        .find(|(_, c)| c.is_control() || c.is_whitespace())
    {
        return Err(KvError::BadChar {
            key: key.to_string(),
            ch,
            at,
        });
    }
    Ok(())
}

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("value: {len} bytes is larger than {MAX_VALUE_BYTES} (512 KiB)")]
pub struct ValueTooLarge {
    pub len: usize,
}

/// Checks a value's size: at most [`MAX_VALUE_BYTES`].
pub fn validate_value(value: &[u8]) -> Result<(), ValueTooLarge> {
    if value.len() > MAX_VALUE_BYTES {
        Err(ValueTooLarge { len: value.len() })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_keys_pass() {
        for key in ["a", "config/web/timeout", "x-y_z.1", "trailing/"] {
            assert_eq!(validate_key(key), Ok(()), "{key}");
        }
    }

    #[test]
    fn bad_keys_say_why() {
        assert_eq!(validate_key(""), Err(KvError::Empty));
        assert_eq!(validate_key(&"k".repeat(513)), Err(KvError::TooLong(513)));
        assert!(matches!(validate_key("/a"), Err(KvError::LeadingSlash(_))));
        assert!(matches!(
            validate_key("a//b"),
            Err(KvError::EmptySegment(_))
        ));
        for dotted in ["..", "a/../b", "a/./b", "a/..", "./a"] {
            assert!(
                matches!(validate_key(dotted), Err(KvError::DotSegment(_))),
                "{dotted}"
            );
        }
        assert!(
            validate_key("a/..b/c.d/...").is_ok(),
            "dots within a segment"
        );
        assert!(matches!(
            validate_key("a b"),
            Err(KvError::BadChar { ch: ' ', at: 1, .. })
        ));
        assert!(matches!(validate_key("a\nb"), Err(KvError::BadChar { .. })));
    }

    #[test]
    fn value_size_limit() {
        assert_eq!(validate_value(&[]), Ok(()));
        assert_eq!(validate_value(&vec![0; MAX_VALUE_BYTES]), Ok(()));
        let err = validate_value(&vec![0; MAX_VALUE_BYTES + 1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "value: 524289 bytes is larger than 524288 (512 KiB)"
        );
    }
}
