//! Sessions and the KV locks they hold, as `State::apply` changes them.
//!
//! A lock is a key whose `session` is set. `acquire` takes a free key (or
//! one the session holds already) unless its lock delay runs; `release`
//! gives back a key the session holds. Invalidating a session (destroyed,
//! expired, its node critical or gone) releases its keys or deletes them,
//! as its behavior says, and starts each key's lock delay. Everything here
//! is deterministic: times come in the commands (`now_ms`), never from a
//! clock.

use std::collections::{BTreeMap, BTreeSet};

use weft_api::kv::KvEntry;
use weft_api::session::{Behavior, Session, MAX_SESSIONS, MAX_SESSIONS_PER_NODE};

use super::apply::ApplyError;
use super::{Change, KvLock, State};
use weft_api::catalog::HealthStatus;

/// How a refused acquire or release's message starts: the HTTP API
/// answers `false` for it, as Consul does.
pub const LOCK_REFUSED: &str = "lock refused";

/// Most keys in their lock delay at once (a bound on the state).
pub const MAX_LOCK_DELAYS: usize = 65_536;

fn refused(why: String) -> ApplyError {
    ApplyError::Invalid(format!("{LOCK_REFUSED}: {why}"))
}

impl State {
    pub(super) fn create_session(
        &mut self,
        mut session: Session,
        index: u64,
    ) -> Result<Vec<Change>, ApplyError> {
        let Some(node) = self.nodes.get(&session.node) else {
            return Err(ApplyError::UnknownNode(session.node));
        };
        if session.node_checks && node.health == HealthStatus::Critical {
            return Err(ApplyError::Invalid(format!(
                "node {:?} is critical (serfHealth): no session can be tied to it",
                session.node
            )));
        }
        if self.lock_sessions.contains_key(&session.id) {
            return Err(ApplyError::Invalid(format!(
                "session {:?} exists already",
                session.id
            )));
        }
        if self.lock_sessions.len() >= MAX_SESSIONS {
            return Err(ApplyError::Invalid(format!(
                "the cluster holds {MAX_SESSIONS} sessions, its limit: destroy some first"
            )));
        }
        let on_node = self
            .lock_sessions
            .values()
            .filter(|s| s.node == session.node)
            .count();
        if on_node >= MAX_SESSIONS_PER_NODE {
            return Err(ApplyError::Invalid(format!(
                "node {:?} holds {MAX_SESSIONS_PER_NODE} sessions, its limit: destroy some first",
                session.node
            )));
        }
        session.create_index = index;
        session.modify_index = index;
        self.lock_sessions.insert(session.id.clone(), session);
        Ok(Vec::new())
    }

    /// The lock index and holder a put leaves on `key`.
    pub(super) fn lock_after_put(
        &self,
        key: &str,
        existing: Option<&KvEntry>,
        lock: Option<&KvLock>,
    ) -> Result<(u64, Option<String>), ApplyError> {
        let lock_index = existing.map_or(0, |e| e.lock_index);
        let holder = existing.and_then(|e| e.session.clone());
        match lock {
            // A plain write leaves the lock as it is (as Consul's does).
            None => Ok((lock_index, holder)),
            Some(KvLock::Acquire { session, now_ms }) => {
                if !self.lock_sessions.contains_key(session) {
                    return Err(ApplyError::Invalid(format!(
                        "session {session:?} not found: cannot acquire {key:?}"
                    )));
                }
                match holder {
                    // Held already: the value is updated, the lock kept.
                    Some(h) if &h == session => Ok((lock_index, Some(h))),
                    Some(_) => Err(refused(format!("{key:?} is held by another session"))),
                    None => {
                        if let Some(until) = self.lock_delays.get(key).filter(|u| now_ms < u) {
                            return Err(refused(format!(
                                "{key:?} is in its lock delay for another {} ms",
                                until - now_ms
                            )));
                        }
                        Ok((lock_index + 1, Some(session.clone())))
                    }
                }
            }
            Some(KvLock::Release { session }) => match holder {
                Some(h) if &h == session => Ok((lock_index, None)),
                _ => Err(refused(format!(
                    "{key:?} is not held by session {session:?}"
                ))),
            },
        }
    }

    /// Removes session `id` (which exists) and releases or deletes its
    /// keys; their lock delay runs from `now_ms`.
    pub(super) fn invalidate_session(&mut self, id: &str, now_ms: i64, index: u64) -> Vec<Change> {
        self.invalidate_sessions(&BTreeSet::from([id.to_string()]), now_ms, index)
    }

    /// [`Self::invalidate_session`] for every session of `ids`, with one
    /// pass over the keys for all of them.
    fn invalidate_sessions(
        &mut self,
        ids: &BTreeSet<String>,
        now_ms: i64,
        index: u64,
    ) -> Vec<Change> {
        let gone: BTreeMap<String, Session> = ids
            .iter()
            .filter_map(|id| self.lock_sessions.remove_entry(id))
            .collect();
        if gone.is_empty() {
            return Vec::new();
        }
        // Expired delays go; they would refuse nothing.
        self.lock_delays.retain(|_, until| *until > now_ms);
        let held: Vec<(String, String)> = self
            .kv
            .values()
            .filter_map(|e| {
                let holder = e.session.as_ref().filter(|s| gone.contains_key(*s))?;
                Some((e.key.clone(), holder.clone()))
            })
            .collect();
        let mut changes = Vec::with_capacity(held.len());
        for (key, holder) in held {
            let session = &gone[&holder];
            // Bounded: past the bound a key goes without its delay rather
            // than the state growing.
            if session.lock_delay_ms > 0
                && (self.lock_delays.len() < MAX_LOCK_DELAYS || self.lock_delays.contains_key(&key))
            {
                self.lock_delays.insert(
                    key.clone(),
                    now_ms.saturating_add(session.lock_delay_ms as i64),
                );
            }
            match session.behavior {
                Behavior::Release => {
                    if let Some(e) = self.kv.get_mut(&key) {
                        e.session = None;
                        e.modify_index = index;
                        changes.push(Change::KvUpsert(e.clone()));
                    }
                }
                Behavior::Delete => {
                    if let Some(e) = self.kv.remove(&key) {
                        self.kv_total.replace(e.value.len() as u64, 0);
                        changes.push(Change::KvDelete(key));
                    }
                }
            }
        }
        changes
    }

    /// Invalidates the sessions of `node`: all of them, or (`checked_only`)
    /// those tied to its node-level check.
    pub(super) fn invalidate_node_sessions(
        &mut self,
        node: &str,
        checked_only: bool,
        now_ms: i64,
        index: u64,
    ) -> Vec<Change> {
        let ids: BTreeSet<String> = self
            .lock_sessions
            .values()
            .filter(|s| s.node == node && (s.node_checks || !checked_only))
            .map(|s| s.id.clone())
            .collect();
        self.invalidate_sessions(&ids, now_ms, index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::register_node as node;
    use crate::state::{Command, CommandResult};

    fn session(id: &str, node: &str, behavior: Behavior, ttl: Option<u64>) -> Command {
        Command::SessionCreate(Session {
            id: id.into(),
            name: String::new(),
            node: node.into(),
            lock_delay_ms: 1_000,
            behavior,
            ttl_secs: ttl,
            node_checks: true,
            create_index: 0,
            modify_index: 0,
            expires_at_ms: ttl.map(|t| 100_000 + t as i64 * 2_000),
        })
    }

    fn put(key: &str, value: &str, lock: Option<KvLock>) -> Command {
        Command::KvPut {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            cas: None,
            flags: 0,
            lock,
        }
    }

    fn acquire(key: &str, session: &str, now_ms: i64) -> Command {
        put(
            key,
            session,
            Some(KvLock::Acquire {
                session: session.into(),
                now_ms,
            }),
        )
    }

    fn release(key: &str, session: &str) -> Command {
        put(
            key,
            "",
            Some(KvLock::Release {
                session: session.into(),
            }),
        )
    }

    /// Applies `cmds` in order from index 1; the reasons of refusals.
    fn run(s: &mut State, cmds: Vec<Command>) -> Vec<Option<String>> {
        cmds.into_iter()
            .map(|c| match s.apply(c, s.index + 1).0 {
                CommandResult::Refused { reason } => Some(reason),
                _ => None,
            })
            .collect()
    }

    fn ok(s: &mut State, cmds: Vec<Command>) {
        for (i, r) in run(s, cmds).into_iter().enumerate() {
            assert_eq!(r, None, "command {i} refused");
        }
    }

    #[test]
    fn one_holder_at_a_time_and_the_lock_index_counts_acquisitions() {
        let mut s = State::default();
        ok(
            &mut s,
            vec![
                node("n1"),
                session("a", "n1", Behavior::Release, None),
                session("b", "n1", Behavior::Release, None),
                acquire("leader", "a", 0),
            ],
        );
        assert_eq!(s.kv["leader"].session.as_deref(), Some("a"));
        assert_eq!(s.kv["leader"].lock_index, 1);
        let r = run(
            &mut s,
            vec![acquire("leader", "b", 0), release("leader", "b")],
        );
        assert!(r[0].as_ref().unwrap().starts_with(LOCK_REFUSED));
        assert!(r[1].as_ref().unwrap().starts_with(LOCK_REFUSED));
        // The holder re-acquires (value updated, same lock), then releases.
        ok(&mut s, vec![acquire("leader", "a", 0)]);
        assert_eq!(s.kv["leader"].lock_index, 1);
        ok(
            &mut s,
            vec![release("leader", "a"), acquire("leader", "b", 0)],
        );
        assert_eq!(s.kv["leader"].session.as_deref(), Some("b"));
        assert_eq!(s.kv["leader"].lock_index, 2);
        // A plain write keeps the lock.
        ok(&mut s, vec![put("leader", "x", None)]);
        assert_eq!(s.kv["leader"].session.as_deref(), Some("b"));
        // Unknown sessions take nothing.
        let r = run(&mut s, vec![acquire("other", "nope", 0)]);
        assert!(r[0].as_ref().unwrap().contains("not found"));
        assert!(!s.kv.contains_key("other"));
    }

    #[test]
    fn destroying_releases_or_deletes_and_starts_the_lock_delay() {
        let mut s = State::default();
        ok(
            &mut s,
            vec![
                node("n1"),
                session("r", "n1", Behavior::Release, None),
                session("d", "n1", Behavior::Delete, None),
                session("other", "n1", Behavior::Release, None),
                acquire("kept", "r", 0),
                acquire("gone", "d", 0),
                Command::SessionDestroy {
                    id: "r".into(),
                    now_ms: 10_000,
                },
                Command::SessionDestroy {
                    id: "d".into(),
                    now_ms: 10_000,
                },
            ],
        );
        assert_eq!(s.kv["kept"].session, None);
        assert_eq!(s.kv["kept"].value, b"r");
        assert!(!s.kv.contains_key("gone"));
        assert!(s.lock_sessions.len() == 1);
        // Within the delay (1 s) no one takes the key; after it, one does.
        let r = run(&mut s, vec![acquire("kept", "other", 10_999)]);
        assert!(r[0].as_ref().unwrap().contains("lock delay"));
        ok(&mut s, vec![acquire("kept", "other", 11_000)]);
        let r = run(
            &mut s,
            vec![Command::SessionDestroy {
                id: "r".into(),
                now_ms: 0,
            }],
        );
        assert!(r[0].as_ref().unwrap().contains("not found"));
    }

    #[test]
    fn ttl_sessions_expire_unless_renewed() {
        let mut s = State::default();
        ok(
            &mut s,
            vec![
                node("n1"),
                session("t", "n1", Behavior::Release, Some(10)),
                acquire("k", "t", 0),
            ],
        );
        // Created at 100 s with a 10 s TTL: expires at 120 s.
        let r = run(
            &mut s,
            vec![Command::SessionExpire {
                id: "t".into(),
                now_ms: 119_999,
            }],
        );
        assert!(r[0].as_ref().unwrap().contains("not expired"));
        ok(
            &mut s,
            vec![Command::SessionRenew {
                id: "t".into(),
                now_ms: 115_000,
            }],
        );
        assert_eq!(s.lock_sessions["t"].expires_at_ms, Some(135_000));
        let r = run(
            &mut s,
            vec![Command::SessionExpire {
                id: "t".into(),
                now_ms: 120_000,
            }],
        );
        assert!(r[0].is_some(), "a renewal came first");
        ok(
            &mut s,
            vec![Command::SessionExpire {
                id: "t".into(),
                now_ms: 135_000,
            }],
        );
        assert!(s.lock_sessions.is_empty());
        assert_eq!(s.kv["k"].session, None);
    }

    #[test]
    fn a_critical_or_departed_node_takes_its_sessions() {
        let mut s = State::default();
        let mut unchecked = session("free", "n1", Behavior::Release, None);
        if let Command::SessionCreate(x) = &mut unchecked {
            x.node_checks = false;
        }
        ok(
            &mut s,
            vec![
                node("n1"),
                session("checked", "n1", Behavior::Release, None),
                unchecked,
                acquire("a", "checked", 0),
                acquire("b", "free", 0),
                Command::SetNodeHealth {
                    node: "n1".into(),
                    health: HealthStatus::Critical,
                    output: "silent".into(),
                    now_ms: 5_000,
                },
            ],
        );
        assert_eq!(s.kv["a"].session, None);
        assert_eq!(s.kv["b"].session.as_deref(), Some("free"));
        // No new checked session on a critical node.
        let r = run(&mut s, vec![session("late", "n1", Behavior::Release, None)]);
        assert!(r[0].as_ref().unwrap().contains("critical"));
        ok(
            &mut s,
            vec![Command::DeregisterNode {
                name: "n1".into(),
                now_ms: 6_000,
            }],
        );
        assert!(s.lock_sessions.is_empty());
        assert_eq!(s.kv["b"].session, None);
        let r = run(&mut s, vec![session("x", "n1", Behavior::Release, None)]);
        assert!(r[0].as_ref().unwrap().contains("not registered"));
    }

    #[test]
    fn lock_delays_are_bounded_and_an_acquire_clears_its_own() {
        let mut s = State::default();
        ok(
            &mut s,
            vec![
                node("n1"),
                session("a", "n1", Behavior::Release, None),
                session("b", "n1", Behavior::Release, None),
                acquire("k", "a", 0),
                release("k", "a"),
            ],
        );
        // Full of other keys' delays (far in the future).
        for i in 0..MAX_LOCK_DELAYS {
            s.lock_delays.insert(format!("other/{i}"), i64::MAX);
        }
        ok(
            &mut s,
            vec![
                acquire("k", "a", 0),
                Command::SessionDestroy {
                    id: "a".into(),
                    now_ms: 10,
                },
                // No room for k's delay: it is free at once.
                acquire("k", "b", 11),
            ],
        );
        assert_eq!(s.lock_delays.len(), MAX_LOCK_DELAYS);
        assert!(!s.lock_delays.contains_key("k"));
    }

    #[test]
    fn one_pass_releases_every_session_of_a_failing_node() {
        let mut s = State::default();
        let mut cmds = vec![node("n1")];
        for i in 0..5 {
            cmds.push(session(&format!("s{i}"), "n1", Behavior::Release, None));
            cmds.push(acquire(&format!("k{i}"), &format!("s{i}"), 0));
        }
        cmds.push(Command::SetNodeHealth {
            node: "n1".into(),
            health: HealthStatus::Critical,
            output: String::new(),
            now_ms: 100,
        });
        ok(&mut s, cmds);
        assert!(s.lock_sessions.is_empty());
        assert!(s.kv.values().all(|e| e.session.is_none()));
        assert_eq!(s.lock_delays.len(), 5);
    }

    #[test]
    fn sessions_are_bounded_per_node() {
        let mut s = State::default();
        ok(&mut s, vec![node("n1")]);
        for i in 0..MAX_SESSIONS_PER_NODE {
            ok(
                &mut s,
                vec![session(&format!("s{i}"), "n1", Behavior::Release, None)],
            );
        }
        let r = run(
            &mut s,
            vec![session("one-more", "n1", Behavior::Release, None)],
        );
        assert!(r[0].as_ref().unwrap().contains("limit"));
    }
}
