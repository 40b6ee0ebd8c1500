//! The total size of the KV store's values, kept as writes change it so
//! that the `--max-kv-bytes` check on every put is O(1), not a sum over
//! every key. Derived from `State::kv`, never stored (snapshots and
//! restores leave it out) and summed once on first use.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use weft_api::kv::KvEntry;

/// Not summed yet.
const UNKNOWN: u64 = u64::MAX;

/// Bytes of all values, or UNKNOWN. Atomic so that a reader holding the
/// state's read lock can fill it in; every change to the KV store holds
/// the write lock.
#[derive(Debug)]
pub struct KvTotal(AtomicU64);

impl Default for KvTotal {
    fn default() -> Self {
        Self(AtomicU64::new(UNKNOWN))
    }
}

impl Clone for KvTotal {
    fn clone(&self) -> Self {
        Self(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

/// Derived data: two states are equal whatever their totals hold.
impl PartialEq for KvTotal {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl KvTotal {
    /// The total of `kv`'s values (summed on first use).
    pub fn get(&self, kv: &BTreeMap<String, KvEntry>) -> u64 {
        match self.0.load(Ordering::Relaxed) {
            UNKNOWN => {
                let total = kv.values().map(|e| e.value.len() as u64).sum();
                self.0.store(total, Ordering::Relaxed);
                total
            }
            total => total,
        }
    }

    /// A value of `old` bytes (0 when new) becomes `new` bytes (0 when
    /// deleted). Called before or after the map changes alike; an unknown
    /// total stays unknown.
    pub fn replace(&self, old: u64, new: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
                (total != UNKNOWN).then(|| total - old + new)
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(len: usize) -> KvEntry {
        KvEntry {
            key: String::new(),
            value: vec![0; len],
            create_index: 1,
            modify_index: 1,
            ..Default::default()
        }
    }

    #[test]
    fn follows_puts_and_deletes_and_matches_a_fresh_sum() {
        let mut kv = BTreeMap::new();
        kv.insert("a".to_string(), entry(10));
        let total = KvTotal::default();
        // Changes before the first use are seen by the sum itself.
        total.replace(0, 99);
        assert_eq!(total.get(&kv), 10);
        kv.insert("b".into(), entry(5));
        total.replace(0, 5);
        kv.insert("a".into(), entry(3));
        total.replace(10, 3);
        kv.remove("b");
        total.replace(5, 0);
        assert_eq!(total.get(&kv), 3);
        assert_eq!(total.get(&kv), KvTotal::default().get(&kv));
        assert_eq!(total.clone().get(&BTreeMap::new()), 3, "a clone keeps it");
    }
}
