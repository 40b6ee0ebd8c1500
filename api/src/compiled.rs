//! Rules compiled once, when the entry or intention that holds them is read
//! (a regex, a subset's filter), not each time a request or an instance is
//! matched. A [`Compiled`] is written, read and compared as its source
//! text; one that does not compile keeps the reason, matches nothing, and
//! write-time validation refuses it with that reason.
use serde::{Deserialize, Serialize};

/// What a rule's source text compiles to.
pub trait Compile: Sized {
    /// The compiled rule, or why `source` is not one.
    fn compile(source: &str) -> Result<Self, String>;
}

/// A rule's source text and what it compiled to.
#[derive(Clone)]
pub struct Compiled<T> {
    source: String,
    value: Result<T, String>,
}

impl<T: Compile> Compiled<T> {
    pub fn new(source: impl Into<String>) -> Compiled<T> {
        let source = source.into();
        let value = T::compile(&source);
        Compiled { source, value }
    }
}

impl<T> Compiled<T> {
    /// The rule as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The compiled rule, or why it does not compile.
    pub fn get(&self) -> Result<&T, &str> {
        self.value.as_ref().map_err(String::as_str)
    }
}

impl<T: Compile> Default for Compiled<T> {
    fn default() -> Compiled<T> {
        Compiled::new("")
    }
}

impl<T: Compile> From<&str> for Compiled<T> {
    fn from(source: &str) -> Compiled<T> {
        Compiled::new(source)
    }
}

impl<T: Compile> From<String> for Compiled<T> {
    fn from(source: String) -> Compiled<T> {
        Compiled::new(source)
    }
}

impl<T> PartialEq for Compiled<T> {
    fn eq(&self, other: &Compiled<T>) -> bool {
        self.source == other.source
    }
}

impl<T> Eq for Compiled<T> {}

impl<T> std::fmt::Debug for Compiled<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl<T> Serialize for Compiled<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de, T: Compile> Deserialize<'de> for Compiled<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Compiled<T>, D::Error> {
        String::deserialize(d).map(Compiled::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule that counts its compilations.
    #[derive(Debug)]
    struct Even(u32);

    impl Compile for Even {
        fn compile(source: &str) -> Result<Even, String> {
            match source.parse::<u32>() {
                Ok(n) if n % 2 == 0 => Ok(Even(n)),
                _ => Err(format!("{source:?} is not an even number")),
            }
        }
    }

    #[test]
    fn compiles_once_and_keeps_the_reason() {
        let good: Compiled<Even> = serde_json::from_str("\"42\"").unwrap();
        assert_eq!(good.get().unwrap().0, 42);
        assert_eq!(serde_json::to_string(&good).unwrap(), "\"42\"");
        let bad = Compiled::<Even>::from("7");
        assert_eq!(bad.get().unwrap_err(), "\"7\" is not an even number");
        assert_eq!(bad.as_str(), "7");
        assert_eq!(bad, Compiled::from("7".to_string()));
        assert_ne!(bad, good);
    }
}
