//! Rules compiled once (a regex, a subset's filter, a duration), not each
//! time a request or an instance is matched. A [`Compiled`] is written, read
//! and compared as its source text, and compiled on first use: by
//! write-time validation (after the writer's permissions are checked, so an
//! anonymous body full of costly regexes costs nothing) or by the first
//! match. Copies of an entry share the result, so an agent's views, one per
//! change, compile each rule once. One that does not compile keeps the
//! reason, matches nothing, and validation refuses it with that reason.
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

/// What a rule's source text compiles to.
pub trait Compile: Sized {
    /// The compiled rule, or why `source` is not one.
    fn compile(source: &str) -> Result<Self, String>;
}

/// A rule's source text and, once compiled, what it compiled to.
pub struct Compiled<T> {
    source: String,
    value: Arc<OnceLock<Result<T, String>>>,
}

impl<T> Clone for Compiled<T> {
    fn clone(&self) -> Compiled<T> {
        Compiled {
            source: self.source.clone(),
            value: self.value.clone(),
        }
    }
}

impl<T: Compile> Compiled<T> {
    pub fn new(source: impl Into<String>) -> Compiled<T> {
        Compiled {
            source: source.into(),
            value: Arc::new(OnceLock::new()),
        }
    }

    /// The compiled rule (compiled now if it is the first use), or why it
    /// does not compile.
    pub fn get(&self) -> Result<&T, &str> {
        (self.value)
            .get_or_init(|| T::compile(&self.source))
            .as_ref()
            .map_err(String::as_str)
    }
}

impl<T> Compiled<T> {
    /// The rule as written.
    pub fn as_str(&self) -> &str {
        &self.source
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

    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Compilations of [`Even`] so far.
    static COMPILED: AtomicUsize = AtomicUsize::new(0);

    /// A rule that counts its compilations.
    #[derive(Debug)]
    struct Even(u32);

    impl Compile for Even {
        fn compile(source: &str) -> Result<Even, String> {
            COMPILED.fetch_add(1, Ordering::SeqCst);
            match source.parse::<u32>() {
                Ok(n) if n % 2 == 0 => Ok(Even(n)),
                _ => Err(format!("{source:?} is not an even number")),
            }
        }
    }

    #[test]
    fn compiles_on_first_use_once_for_every_copy_and_keeps_the_reason() {
        let before = COMPILED.load(Ordering::SeqCst);
        let good: Compiled<Even> = serde_json::from_str("\"42\"").unwrap();
        let copies = [good.clone(), good.clone()];
        assert_eq!(
            COMPILED.load(Ordering::SeqCst),
            before,
            "reading compiled it"
        );
        assert_eq!(good.get().unwrap().0, 42);
        for copy in &copies {
            assert_eq!(copy.get().unwrap().0, 42);
        }
        assert_eq!(COMPILED.load(Ordering::SeqCst), before + 1);
        assert_eq!(serde_json::to_string(&good).unwrap(), "\"42\"");
        let bad = Compiled::<Even>::from("7");
        assert_eq!(bad.get().unwrap_err(), "\"7\" is not an even number");
        assert_eq!(bad.as_str(), "7");
        assert_eq!(bad, Compiled::from("7".to_string()));
        assert_ne!(bad, good);
    }
}
