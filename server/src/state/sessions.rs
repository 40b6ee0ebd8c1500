//! Exactly-once writes: the results of recent client requests, kept in the
//! replicated state so that every server answers a retried request with
//! the outcome of its first application instead of applying it again.
//!
//! A client names each logical write with a request id (the CLI sends one
//! per command, in the `x-weft-request-id` metadata; a server makes one when
//! a client sent none, so its own retries are covered). Ids are scoped by
//! the caller's token accessor, so no client can answer for another. What
//! is kept is bounded and evicted deterministically (by log index, never by
//! clock): the last [`RESULTS_PER_CLIENT`] results of each client and the
//! [`CLIENTS`] clients written most recently. Etcd's and Consul's clients
//! do the same with lease or session ids.
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::CommandResult;

/// Results kept per client: a retry comes long before this many later
/// writes of the same client.
pub const RESULTS_PER_CLIENT: usize = 64;
/// Clients kept (the least recently written ones go first).
pub const CLIENTS: usize = 4096;

/// One client's recent results, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientResults {
    /// Index of this client's last write.
    pub last_index: u64,
    pub results: VecDeque<(String, CommandResult)>,
}

/// Recent results by client.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sessions {
    clients: BTreeMap<String, ClientResults>,
}

impl Sessions {
    /// The result of `request` by `client`, if it was applied already.
    pub fn result(&self, client: &str, request: &str) -> Option<&CommandResult> {
        self.clients
            .get(client)?
            .results
            .iter()
            .find(|(id, _)| id == request)
            .map(|(_, r)| r)
    }

    /// Remembers `result` of `request` by `client`, applied at `index`.
    pub fn record(&mut self, client: &str, request: &str, result: CommandResult, index: u64) {
        let entry = self.clients.entry(client.to_string()).or_default();
        entry.last_index = index;
        entry.results.push_back((request.to_string(), kept(result)));
        while entry.results.len() > RESULTS_PER_CLIENT {
            entry.results.pop_front();
        }
        while self.clients.len() > CLIENTS {
            let oldest = self
                .clients
                .iter()
                .min_by_key(|(_, c)| c.last_index)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.clients.remove(&k),
                None => break,
            };
        }
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }
}

/// Longest refusal reason kept: what a retry needs to know, not an echo of
/// whatever large input was refused.
pub const MAX_REASON_BYTES: usize = 1024;

/// `result` as kept: refusal reasons cut to [`MAX_REASON_BYTES`].
fn kept(result: CommandResult) -> CommandResult {
    match result {
        CommandResult::Refused { mut reason } if reason.len() > MAX_REASON_BYTES => {
            let mut end = MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push('…');
            CommandResult::Refused { reason }
        }
        CommandResult::Batch(results) => {
            CommandResult::Batch(results.into_iter().map(kept).collect())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(index: u64) -> CommandResult {
        CommandResult::Applied { index }
    }

    #[test]
    fn long_refusals_are_kept_cut() {
        let mut s = Sessions::default();
        let reason = format!("key \"{}\" refused", "é".repeat(5_000));
        s.record("alice", "r1", CommandResult::Refused { reason }, 1);
        let Some(CommandResult::Refused { reason }) = s.result("alice", "r1") else {
            panic!("no refusal kept");
        };
        assert!(reason.len() <= MAX_REASON_BYTES + '…'.len_utf8() && reason.ends_with('…'));
    }

    #[test]
    fn a_request_is_found_only_for_its_own_client() {
        let mut s = Sessions::default();
        s.record("alice", "r1", applied(7), 7);
        assert_eq!(s.result("alice", "r1"), Some(&applied(7)));
        assert_eq!(s.result("mallory", "r1"), None);
        assert_eq!(s.result("alice", "r2"), None);
    }

    #[test]
    fn results_and_clients_are_bounded_oldest_out() {
        let mut s = Sessions::default();
        for i in 0..(RESULTS_PER_CLIENT as u64 + 5) {
            s.record("alice", &format!("r{i}"), applied(i), i);
        }
        assert_eq!(s.result("alice", "r0"), None);
        assert!(s
            .result("alice", &format!("r{}", RESULTS_PER_CLIENT + 4))
            .is_some());
        let base = 1000;
        for c in 0..(CLIENTS as u64 + 1) {
            s.record(&format!("c{c}"), "r", applied(base + c), base + c);
        }
        assert_eq!(s.clients(), CLIENTS);
        // alice wrote longest ago: evicted first.
        assert_eq!(
            s.result("alice", &format!("r{}", RESULTS_PER_CLIENT + 4)),
            None
        );
        assert!(s.result(&format!("c{CLIENTS}"), "r").is_some());
    }
}
