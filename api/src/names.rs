//! Names of services, nodes and datacenters: the DNS-label rules they share, the
//! `*` wildcard that intentions allow, and newtypes that can only hold a valid name.
//!
//! A name is 1 to 63 characters of lowercase ASCII letters, digits and `-`, starts
//! with a letter or digit and does not end with `-` (so it fits in a DNS label such
//! as `api.service.weft`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest name allowed, in characters (one DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// The wildcard that an intention's source or destination may use for "any service".
pub const WILDCARD: &str = "*";

/// What is wrong with a name. Positions count characters from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("too long ({len} > {MAX_NAME_LEN} characters)")]
    TooLong { len: usize },
    #[error(
        "bad character {ch:?} at position {position} \
         (allowed: lowercase letters a-z, digits 0-9 and '-')"
    )]
    BadCharacter { ch: char, position: usize },
    #[error("must start with a lowercase letter or digit, not '-'")]
    LeadingHyphen,
    #[error("must not end with '-'")]
    TrailingHyphen,
}

/// Checks a service, node or datacenter name.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return Err(NameError::TooLong { len });
    }
    for (i, ch) in name.chars().enumerate() {
        if !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-') {
            return Err(NameError::BadCharacter {
                ch,
                position: i + 1,
            });
        }
    }
    if name.starts_with('-') {
        return Err(NameError::LeadingHyphen);
    }
    if name.ends_with('-') {
        return Err(NameError::TrailingHyphen);
    }
    Ok(())
}

/// Checks an intention source or destination: a valid name or exactly `*`.
pub fn validate_name_or_wildcard(name: &str) -> Result<(), NameError> {
    if name == WILDCARD {
        Ok(())
    } else {
        validate_name(name)
    }
}

macro_rules! name_newtype {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        ///
        /// Serializes as a plain string; deserializing checks the name.
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Checks `name` and wraps it.
            pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
                let name = name.into();
                validate_name(&name)?;
                Ok(Self(name))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(name: String) -> Result<Self, NameError> {
                Self::new(name)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(name: &str) -> Result<Self, NameError> {
                Self::new(name)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_newtype!(
    /// A valid service name.
    ServiceName
);
name_newtype!(
    /// A valid node name.
    NodeName
);
name_newtype!(
    /// A valid datacenter name.
    DatacenterName
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in ["a", "api", "web-1", "0", "9lives", "a-b-c", &"x".repeat(63)] {
            assert_eq!(validate_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(
            validate_name("").unwrap_err().to_string(),
            "must not be empty"
        );
    }

    #[test]
    fn rejects_too_long() {
        let err = validate_name(&"a".repeat(64)).unwrap_err();
        assert_eq!(err, NameError::TooLong { len: 64 });
        assert_eq!(err.to_string(), "too long (64 > 63 characters)");
    }

    #[test]
    fn rejects_bad_characters_with_position() {
        let err = validate_name("Api").unwrap_err();
        assert_eq!(
            err,
            NameError::BadCharacter {
                ch: 'A',
                position: 1
            }
        );
        assert!(err
            .to_string()
            .starts_with("bad character 'A' at position 1"));
        assert_eq!(
            validate_name("my_svc"),
            Err(NameError::BadCharacter {
                ch: '_',
                position: 3
            })
        );
        assert_eq!(
            validate_name("a.b"),
            Err(NameError::BadCharacter {
                ch: '.',
                position: 2
            })
        );
        assert_eq!(
            validate_name("héllo"),
            Err(NameError::BadCharacter {
                ch: 'é',
                position: 2
            })
        );
        assert_eq!(
            validate_name("a b"),
            Err(NameError::BadCharacter {
                ch: ' ',
                position: 2
            })
        );
        assert_eq!(
            validate_name("*"),
            Err(NameError::BadCharacter {
                ch: '*',
                position: 1
            })
        );
    }

    #[test]
    fn rejects_hyphen_at_ends() {
        assert_eq!(validate_name("-api"), Err(NameError::LeadingHyphen));
        assert_eq!(validate_name("api-"), Err(NameError::TrailingHyphen));
        assert_eq!(validate_name("-"), Err(NameError::LeadingHyphen));
    }

    #[test]
    fn wildcard_only_where_allowed() {
        assert_eq!(validate_name_or_wildcard("*"), Ok(()));
        assert_eq!(validate_name_or_wildcard("api"), Ok(()));
        assert_eq!(
            validate_name_or_wildcard("**"),
            Err(NameError::BadCharacter {
                ch: '*',
                position: 1
            })
        );
        assert_eq!(
            validate_name_or_wildcard("api*"),
            Err(NameError::BadCharacter {
                ch: '*',
                position: 4
            })
        );
        assert_eq!(validate_name_or_wildcard(""), Err(NameError::Empty));
    }

    #[test]
    fn newtypes_serialize_as_plain_strings() {
        let name = ServiceName::new("api").unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"api\"");
        let back: ServiceName = serde_json::from_str("\"api\"").unwrap();
        assert_eq!(back, name);
        assert_eq!(back.as_str(), "api");
        assert_eq!(back.to_string(), "api");
        let err = serde_json::from_str::<NodeName>("\"Node\"").unwrap_err();
        assert!(err.to_string().contains("bad character 'N'"), "{err}");
        assert!("dc1".parse::<DatacenterName>().is_ok());
        assert_eq!("".parse::<DatacenterName>(), Err(NameError::Empty));
    }
}
