//! Limits that keep a cluster alive: how many KV keys, how many KV bytes in
//! all, how large one config entry, how many routes one router, how many
//! intentions. Each is a server setting (`--max-kv-keys`, `--max-kv-bytes`,
//! `--max-config-entry-bytes`, `--max-routes-per-router`,
//! `--max-intentions`, or the settings file); a write past one is refused with RESOURCE_EXHAUSTED naming the
//! limit and its setting. One value is at most 512 KiB whatever the
//! settings (`weft_api::kv::MAX_VALUE_BYTES`).
//!
//! The checks run where a write is received, against the state as the
//! server has it, before it is proposed: the state machine itself stays
//! free of settings (every server must apply the same log the same way,
//! whatever its flags). Writes racing each other may overshoot a limit by
//! their own size.
use weft_api::config_entry::ConfigEntry;

use crate::state::State;

pub const DEFAULT_MAX_KV_KEYS: usize = 100_000;
pub const DEFAULT_MAX_KV_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_MAX_CONFIG_ENTRY_BYTES: usize = 2 * 1024 * 1024;
pub const DEFAULT_MAX_ROUTES_PER_ROUTER: usize = 1_000;
pub const DEFAULT_MAX_INTENTIONS: usize = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub kv_keys: usize,
    pub kv_bytes: u64,
    pub config_entry_bytes: usize,
    pub routes_per_router: usize,
    pub intentions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            kv_keys: DEFAULT_MAX_KV_KEYS,
            kv_bytes: DEFAULT_MAX_KV_BYTES,
            config_entry_bytes: DEFAULT_MAX_CONFIG_ENTRY_BYTES,
            routes_per_router: DEFAULT_MAX_ROUTES_PER_ROUTER,
            intentions: DEFAULT_MAX_INTENTIONS,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("the KV store holds {limit} keys, its limit (--max-kv-keys): delete keys or raise it")]
    KvKeys { limit: usize },
    #[error(
        "the KV store would hold {would} bytes, over its limit of {limit} \
         (--max-kv-bytes): delete keys or raise it"
    )]
    KvBytes { would: u64, limit: u64 },
    #[error(
        "the config entry is {size} bytes, over the limit of {limit} \
         (--max-config-entry-bytes)"
    )]
    ConfigEntryBytes { size: usize, limit: usize },
    #[error("the router has {routes} routes, over the limit of {limit} (--max-routes-per-router)")]
    Routes { routes: usize, limit: usize },
    #[error(
        "the cluster would hold {would} intentions, over its limit of {limit} \
         (--max-intentions): delete some or raise it"
    )]
    Intentions { would: usize, limit: usize },
}

impl From<LimitError> for tonic::Status {
    fn from(e: LimitError) -> Self {
        tonic::Status::resource_exhausted(e.to_string())
    }
}

impl Limits {
    /// Whether writing `value_len` bytes at `key` stays within the limits.
    pub fn check_kv_put(
        &self,
        state: &State,
        key: &str,
        value_len: usize,
    ) -> Result<(), LimitError> {
        let old = state.kv.get(key).map(|e| e.value.len() as u64);
        if old.is_none() && state.kv.len() >= self.kv_keys {
            return Err(LimitError::KvKeys {
                limit: self.kv_keys,
            });
        }
        let total = state.kv_total.get(&state.kv);
        let would = total - old.unwrap_or(0) + value_len as u64;
        if would > self.kv_bytes && value_len as u64 > old.unwrap_or(0) {
            return Err(LimitError::KvBytes {
                would,
                limit: self.kv_bytes,
            });
        }
        Ok(())
    }

    /// Whether the intentions of `destination` may become `count` (one
    /// upserted: the old count plus one if the pair is new; an entry of
    /// service-intentions: its sources). Fewer than before always may.
    pub fn check_intentions(
        &self,
        state: &State,
        destination: &str,
        count: usize,
    ) -> Result<(), LimitError> {
        let (mut all, mut of_destination) = (0, 0);
        for i in state.all_intentions() {
            all += 1;
            of_destination += usize::from(i.destination == destination);
        }
        let would = all - of_destination + count;
        if would > self.intentions && count > of_destination {
            return Err(LimitError::Intentions {
                would,
                limit: self.intentions,
            });
        }
        Ok(())
    }

    /// Whether upserting the intention `source => destination` fits.
    pub fn check_intention_upsert(
        &self,
        state: &State,
        source: &str,
        destination: &str,
    ) -> Result<(), LimitError> {
        let exists = state
            .intentions
            .get(source)
            .is_some_and(|m| m.contains_key(destination));
        if exists {
            return Ok(());
        }
        let of_destination = state
            .all_intentions()
            .filter(|i| i.destination == destination)
            .count();
        self.check_intentions(state, destination, of_destination + 1)
    }

    /// Whether a config entry of `document_len` bytes fits (checked before
    /// it is parsed).
    pub fn check_entry_size(&self, document_len: usize) -> Result<(), LimitError> {
        if document_len > self.config_entry_bytes {
            return Err(LimitError::ConfigEntryBytes {
                size: document_len,
                limit: self.config_entry_bytes,
            });
        }
        Ok(())
    }

    /// Whether a parsed entry's contents fit.
    pub fn check_entry(&self, entry: &ConfigEntry) -> Result<(), LimitError> {
        if let ConfigEntry::ServiceRouter(router) = entry {
            if router.routes.len() > self.routes_per_router {
                return Err(LimitError::Routes {
                    routes: router.routes.len(),
                    limit: self.routes_per_router,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::kv::KvEntry;

    fn state_with(keys: &[(&str, usize)]) -> State {
        let mut s = State::default();
        for (k, len) in keys {
            s.kv.insert(
                k.to_string(),
                KvEntry {
                    key: k.to_string(),
                    value: vec![0; *len],
                    create_index: 1,
                    modify_index: 1,
                    ..Default::default()
                },
            );
        }
        s
    }

    #[test]
    fn kv_keys_and_bytes_are_bounded_and_named() {
        let limits = Limits {
            kv_keys: 2,
            kv_bytes: 100,
            ..Limits::default()
        };
        let s = state_with(&[("a", 40), ("b", 40)]);
        let e = limits.check_kv_put(&s, "c", 1).unwrap_err();
        assert!(e.to_string().contains("--max-kv-keys"), "{e}");
        // Overwriting an existing key is no new key.
        assert_eq!(limits.check_kv_put(&s, "a", 60), Ok(()));
        let e = limits.check_kv_put(&s, "a", 61).unwrap_err();
        assert_eq!(
            e,
            LimitError::KvBytes {
                would: 101,
                limit: 100
            }
        );
        assert!(e.to_string().contains("--max-kv-bytes"));
        // Past the limit already (it was lowered): shrinking is allowed.
        let over = state_with(&[("a", 200)]);
        assert_eq!(limits.check_kv_put(&over, "a", 10), Ok(()));
    }

    #[test]
    fn entries_are_bounded_in_bytes_and_routes() {
        let limits = Limits {
            config_entry_bytes: 10,
            routes_per_router: 1,
            ..Limits::default()
        };
        assert!(limits.check_entry_size(10).is_ok());
        let e = limits.check_entry_size(11).unwrap_err();
        assert!(e.to_string().contains("--max-config-entry-bytes"), "{e}");
        let router = |n: usize| {
            let routes: Vec<String> = (0..n)
                .map(|i| format!(r#"{{"Match":{{"HTTP":{{"PathPrefix":"/{i}"}}}},"Destination":{{"Service":"api"}}}}"#))
                .collect();
            weft_api::config_entry::parse_entry_file(
                &format!(
                    r#"{{"Kind":"service-router","Name":"api","Routes":[{}]}}"#,
                    routes.join(",")
                ),
                weft_api::file_format::FileFormat::Json,
            )
            .unwrap()
        };
        assert!(limits.check_entry(&router(1)).is_ok());
        let e = limits.check_entry(&router(2)).unwrap_err();
        assert!(e.to_string().contains("--max-routes-per-router"), "{e}");
    }

    #[test]
    fn intentions_are_bounded_and_fewer_always_fit() {
        use weft_api::intention::{Intention, IntentionAction};
        let mut s = State::default();
        for (src, dst) in [("a", "api"), ("b", "api"), ("a", "db")] {
            let i = Intention::l4(src, dst, IntentionAction::Allow);
            s.intentions
                .entry(src.to_string())
                .or_default()
                .insert(dst.to_string(), i);
        }
        let limits = Limits {
            intentions: 3,
            ..Limits::default()
        };
        let e = limits.check_intention_upsert(&s, "c", "api").unwrap_err();
        assert!(e.to_string().contains("--max-intentions"), "{e}");
        assert_eq!(
            limits.check_intention_upsert(&s, "a", "api"),
            Ok(()),
            "there already"
        );
        // api's two replaced by one, or by two: fine; by three: over.
        assert_eq!(limits.check_intentions(&s, "api", 1), Ok(()));
        assert_eq!(limits.check_intentions(&s, "api", 2), Ok(()));
        assert!(limits.check_intentions(&s, "api", 3).is_err());
        // Already over (a lowered limit): shrinking still fits.
        let tight = Limits {
            intentions: 1,
            ..Limits::default()
        };
        assert_eq!(tight.check_intentions(&s, "api", 1), Ok(()));
    }
}
