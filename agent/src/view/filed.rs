//! An index that files keys under a heading (instances under their
//! service, under their address; intentions under their destination),
//! kept up to date change by change instead of rebuilt from the whole view.
//! It is persistent: a copy (the published view's) shares everything with
//! the original until one of them changes, and a change copies only the
//! path to its heading and that heading's list.
//!
//! Each heading's keys are kept sorted, so a lookup answers in the order a
//! rebuild from the (ordered) view would.
use std::borrow::Borrow;
use std::sync::Arc;

use im::OrdMap;

#[derive(Debug, Clone)]
pub struct Filed<H: Ord + Clone, K: Ord + Clone> {
    headings: OrdMap<H, Arc<Vec<K>>>,
}

impl<H: Ord + Clone, K: Ord + Clone> Default for Filed<H, K> {
    fn default() -> Self {
        Filed {
            headings: OrdMap::new(),
        }
    }
}

impl<H: Ord + Clone, K: Ord + Clone> Filed<H, K> {
    /// Files `key` under `heading` (once: filing it again changes nothing).
    pub fn add(&mut self, heading: H, key: &K) {
        if let Some(keys) = self.headings.get_mut(&heading) {
            if let Err(at) = keys.binary_search(key) {
                Arc::make_mut(keys).insert(at, key.clone());
            }
        } else {
            self.headings.insert(heading, Arc::new(vec![key.clone()]));
        }
    }

    /// Takes `key` out from under `heading`; a heading left empty goes.
    pub fn remove<Q>(&mut self, heading: &Q, key: &K)
    where
        H: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let Some(keys) = self.headings.get_mut(heading) else {
            return;
        };
        let Ok(at) = keys.binary_search(key) else {
            return;
        };
        if keys.len() == 1 {
            self.headings.remove(heading);
        } else {
            Arc::make_mut(keys).remove(at);
        }
    }

    /// The keys filed under `heading`, sorted.
    pub fn get<Q>(&self, heading: &Q) -> &[K]
    where
        H: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.headings
            .get(heading)
            .map_or(&[], |keys| keys.as_slice())
    }

    /// Whether `other` is this index unchanged (a copy nothing touched).
    #[cfg(test)]
    pub fn same_as(&self, other: &Self) -> bool {
        self.headings.ptr_eq(&other.headings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_back_sorted_once_each_and_empty_headings_go() {
        let mut f: Filed<String, u32> = Filed::default();
        for k in [5, 1, 3, 1] {
            f.add("a".into(), &k);
        }
        f.add("b".into(), &2);
        assert_eq!(f.get("a"), &[1, 3, 5]);
        assert_eq!(f.get("b"), &[2]);
        assert_eq!(f.get("c"), &[] as &[u32]);
        f.remove("a", &3);
        f.remove("a", &4);
        f.remove("c", &1);
        assert_eq!(f.get("a"), &[1, 5]);
        f.remove("b", &2);
        assert!(f.headings.get("b").is_none());
    }

    #[test]
    fn a_copy_keeps_what_it_had_when_the_original_changes() {
        let mut f: Filed<String, u32> = Filed::default();
        f.add("a".into(), &1);
        let copy = f.clone();
        f.add("a".into(), &2);
        f.remove("a", &1);
        f.add("b".into(), &3);
        assert_eq!(copy.get("a"), &[1]);
        assert_eq!(copy.get("b"), &[] as &[u32]);
        assert_eq!(f.get("a"), &[2]);
        assert_eq!(f.get("b"), &[3]);
    }
}
