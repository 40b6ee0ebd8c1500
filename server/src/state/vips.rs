//! Virtual IPs: a service gets one with its first instance (another
//! datacenter's service as that datacenter lists it) and gives it back once
//! nothing holds it any longer, when the leader writes `Command::ReleaseVips`
//! for it (`crate::vip_release` decides when).
//!
//! What was given back is kept in [`ReleasedVips`]: a service that comes
//! back gets its own address again, and no other service is given one of
//! those addresses while the block has another free. New addresses are taken
//! from a cursor that moves on through the block, so an address given back
//! and then forgotten is given again only after every other one was: a
//! workload still holding a departed service's address (a DNS cache, a
//! configuration file) does not reach another service at it.
//!
//! Before, a virtual IP was kept for every name ever registered: in the
//! servers' state, in every agent's view and in every node's eBPF
//! destinations map, whose 65,536 entries a mesh with short-lived service
//! names filled (a full map fails the agent's sync, and its programs then
//! refuse every workload's connection).
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use weft_api::config_entry::EntryKind;
use weft_api::vip::{next_free_vip_from, split_key, Cidr};

use super::{ApplyError, Change, State};

/// Addresses given back that are kept for their services at most; past it
/// the oldest are forgotten (their addresses become free like any other).
pub const MAX_RELEASED_VIPS: usize = 16_384;
/// Of those, the most other datacenters' services keep once the book is
/// full: past it their oldest go first, so that another datacenter whose
/// names come and go cannot push this datacenter's services out.
pub const MAX_RELEASED_REMOTE_VIPS: usize = weft_api::federation::MAX_REMOTE_VIPS;
/// Virtual IPs one `Command::ReleaseVips` gives back at most.
pub const MAX_RELEASE_BATCH: usize = 1024;

/// The config entries that hold their service's virtual IP without an
/// instance: a name routed, split or resolved elsewhere is still dialled.
const HOLDING_KINDS: [EntryKind; 3] = [
    EntryKind::ServiceRouter,
    EntryKind::ServiceSplitter,
    EntryKind::ServiceResolver,
];

/// A virtual IP given back, and the index of the command that did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedVip {
    pub vip: Ipv4Addr,
    pub index: u64,
}

/// Virtual IPs given back, by the key they had (a service name, or
/// `service.dc` for another datacenter's), with indexes by age and by
/// address (derived, never stored) so that keeping, forgetting and the
/// oldest entry cost a logarithm of its size, not a pass over it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    from = "BTreeMap<String, ReleasedVip>",
    into = "BTreeMap<String, ReleasedVip>"
)]
pub struct ReleasedVips {
    by_key: BTreeMap<String, ReleasedVip>,
    by_age: BTreeSet<(u64, String)>,
    /// Other datacenters' keys of `by_age`.
    remote_by_age: BTreeSet<(u64, String)>,
    by_vip: BTreeMap<Ipv4Addr, String>,
}

impl From<BTreeMap<String, ReleasedVip>> for ReleasedVips {
    fn from(stored: BTreeMap<String, ReleasedVip>) -> Self {
        let mut book = ReleasedVips::default();
        for (key, r) in stored {
            book.insert(key, r);
        }
        book
    }
}

impl From<ReleasedVips> for BTreeMap<String, ReleasedVip> {
    fn from(book: ReleasedVips) -> Self {
        book.by_key
    }
}

impl ReleasedVips {
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The address `key` gave back, if it is still kept.
    pub fn get(&self, key: &str) -> Option<&ReleasedVip> {
        self.by_key.get(key)
    }

    fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.by_vip.keys().copied()
    }

    /// The highest address kept in `cidr`.
    fn highest_in(&self, cidr: &Cidr) -> Option<Ipv4Addr> {
        let block = cidr.network()..=cidr.broadcast();
        self.by_vip.range(block).next_back().map(|(vip, _)| *vip)
    }

    /// The host address of `cidr` given back first (by index, then key)
    /// that `taken` does not hold.
    fn oldest_free(&self, cidr: &Cidr, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        (self.by_age.iter())
            .map(|(_, key)| self.by_key[key].vip)
            .find(|vip| cidr.contains_host(*vip) && !taken.contains(vip))
    }

    fn insert(&mut self, key: String, r: ReleasedVip) {
        self.remove_key(&key);
        if let Some(other) = self.by_vip.get(&r.vip).cloned() {
            self.remove_key(&other);
        }
        if split_key(&key).1.is_some() {
            self.remote_by_age.insert((r.index, key.clone()));
        }
        self.by_age.insert((r.index, key.clone()));
        self.by_vip.insert(r.vip, key.clone());
        self.by_key.insert(key, r);
    }

    fn remove_key(&mut self, key: &str) {
        if let Some(r) = self.by_key.remove(key) {
            let aged = (r.index, key.to_string());
            self.remote_by_age.remove(&aged);
            self.by_age.remove(&aged);
            self.by_vip.remove(&r.vip);
        }
    }

    /// Keeps `vip` for `key`, forgetting the oldest past the bound: other
    /// datacenters' first while they hold more than their share.
    fn keep(&mut self, key: String, vip: Ipv4Addr, index: u64) {
        self.insert(key, ReleasedVip { vip, index });
        while self.by_key.len() > MAX_RELEASED_VIPS {
            let ages = if self.remote_by_age.len() > MAX_RELEASED_REMOTE_VIPS {
                &self.remote_by_age
            } else {
                &self.by_age
            };
            let Some((_, oldest)) = ages.first().cloned() else {
                break;
            };
            self.remove_key(&oldest);
        }
    }

    /// Forgets what `key` gave back and any entry of address `vip`.
    fn forget(&mut self, key: &str, vip: Ipv4Addr) {
        self.remove_key(key);
        if let Some(other) = self.by_vip.get(&vip).cloned() {
            self.remove_key(&other);
        }
    }
}

impl State {
    fn vip_block(&self) -> Result<Cidr, ApplyError> {
        match &self.vip_cidr {
            Some(text) => text
                .parse::<Cidr>()
                .map_err(|e| ApplyError::Invalid(e.to_string())),
            None => Ok(Cidr::default_vip()),
        }
    }

    /// Where the next new address is looked for: past the last one given.
    /// A state without a cursor (one of an earlier version, which gave
    /// addresses lowest first and none back) has every address up to its
    /// highest in use: past that is where a server that kept a cursor
    /// looks too, so that servers whose states came either way agree.
    fn vip_cursor(&self, cidr: &Cidr) -> Option<Ipv4Addr> {
        self.vip_next.or_else(|| {
            let in_use = (self.vips.values().copied()).filter(|vip| cidr.contains(*vip));
            let highest = in_use.chain(self.released_vips.highest_in(cidr)).max()?;
            Some(Ipv4Addr::from(u32::from(highest).wrapping_add(1)))
        })
    }

    /// Gives each of `keys` (none of which holds one) a virtual IP: its own
    /// address back when it gave one back that is still in the block and no
    /// one took since, else the next free one after the cursor that is not
    /// kept for another key; when the block has no such address left, the
    /// one given back first. All or none: on an error nothing changed.
    pub(super) fn assign_vips(&mut self, keys: Vec<String>) -> Result<Vec<Change>, ApplyError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let cidr = self.vip_block()?;
        let mut taken: BTreeSet<Ipv4Addr> = self.vips.values().copied().collect();
        let mut unavailable: BTreeSet<Ipv4Addr> = taken
            .iter()
            .copied()
            .chain(self.released_vips.addresses())
            .collect();
        let mut cursor = self.vip_cursor(&cidr);
        let mut given = Vec::with_capacity(keys.len());
        for key in keys {
            let own = (self.released_vips.get(&key))
                .map(|r| r.vip)
                .filter(|vip| cidr.contains_host(*vip) && !taken.contains(vip));
            let vip = match own {
                Some(vip) => vip,
                None => match next_free_vip_from(&cidr, &unavailable, cursor) {
                    Ok(vip) => {
                        cursor = Some(Ipv4Addr::from(u32::from(vip).wrapping_add(1)));
                        vip
                    }
                    Err(e) => match self.released_vips.oldest_free(&cidr, &taken) {
                        Some(vip) => vip,
                        None => return Err(ApplyError::VipExhausted(e.to_string())),
                    },
                },
            };
            taken.insert(vip);
            unavailable.insert(vip);
            given.push((key, vip));
        }
        self.vip_next = cursor;
        let mut changes = Vec::with_capacity(given.len());
        for (key, vip) in given {
            self.released_vips.forget(&key, vip);
            self.vips.insert(key.clone(), vip);
            changes.push(Change::VipAssigned { service: key, vip });
        }
        Ok(changes)
    }

    /// The keys whose virtual IP nothing holds any longer, in key order: a
    /// service of this datacenter with no instance on any node and no
    /// router, splitter or resolver named for it; another datacenter's
    /// service that datacenter no longer lists.
    pub fn unused_vips(&self) -> Vec<String> {
        let local: BTreeSet<&str> = (self.instances.values())
            .flat_map(|by_id| by_id.values())
            .map(|i| i.service.as_str())
            .collect();
        let remote: BTreeSet<(&str, &str)> = (self.remote.iter())
            .flat_map(|(dc, instances)| {
                instances
                    .iter()
                    .map(move |i| (i.service.as_str(), dc.as_str()))
            })
            .collect();
        let configured = |service: &str| {
            HOLDING_KINDS.iter().any(|kind| {
                self.config
                    .get(kind.as_str())
                    .is_some_and(|by_name| by_name.contains_key(service))
            })
        };
        (self.vips.keys())
            .filter(|key| match split_key(key) {
                (service, None) => !local.contains(service) && !configured(service),
                (service, Some(dc)) => !remote.contains(&(service, dc)),
            })
            .cloned()
            .collect()
    }

    /// Gives back the virtual IPs of `keys` that nothing holds (see
    /// [`State::unused_vips`]); a key held again since it was asked for (an
    /// instance registered meanwhile) keeps its address.
    pub(super) fn release_vips(
        &mut self,
        keys: Vec<String>,
        index: u64,
    ) -> Result<Vec<Change>, ApplyError> {
        if keys.len() > MAX_RELEASE_BATCH {
            return Err(ApplyError::Invalid(format!(
                "{} virtual IPs to give back in one write, at most {MAX_RELEASE_BATCH}",
                keys.len()
            )));
        }
        // From the first address given back on, every server keeps the
        // cursor: one whose state came from an earlier version's snapshot
        // would otherwise look past the highest address left, which the
        // others' cursors are already past.
        if self.vip_next.is_none() {
            let cidr = self.vip_block()?;
            self.vip_next = self.vip_cursor(&cidr);
        }
        let unused: BTreeSet<String> = self.unused_vips().into_iter().collect();
        let mut changes = Vec::new();
        for key in keys {
            if !unused.contains(&key) {
                continue;
            }
            if let Some(vip) = self.vips.remove(&key) {
                self.released_vips.keep(key.clone(), vip, index);
                changes.push(Change::VipReleased { service: key, vip });
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{register_node as node, Command};
    use weft_api::catalog::{HealthStatus, ServiceInstance};

    fn instance(node: &str, id: &str, service: &str, port: u16) -> Command {
        Command::RegisterService(ServiceInstance {
            node: node.into(),
            id: id.into(),
            service: service.into(),
            address: "10.0.0.1".into(),
            port,
            health: HealthStatus::Passing,
            ..Default::default()
        })
    }

    fn deregister(node: &str, id: &str) -> Command {
        Command::DeregisterService {
            node: node.into(),
            id: id.into(),
        }
    }

    fn release(keys: &[&str]) -> Command {
        Command::ReleaseVips {
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// A state with node "a" and one instance of each of `services`.
    fn with(services: &[&str]) -> State {
        let mut s = State {
            vip_cidr: Some("10.9.0.0/29".into()), // hosts .1 to .6
            ..State::default()
        };
        s.apply(node("a"), 1);
        for (n, service) in services.iter().enumerate() {
            let (result, _) = s.apply(instance("a", service, service, 8000 + n as u16), 2);
            assert!(matches!(
                result,
                crate::state::CommandResult::Applied { .. }
            ));
        }
        s
    }

    #[test]
    fn a_service_without_instances_gives_its_address_back_and_gets_it_again() {
        let mut s = with(&["web", "api"]);
        assert_eq!(s.vips["web"], ip("10.9.0.1"));
        assert!(s.unused_vips().is_empty());

        s.apply(deregister("a", "web"), 3);
        assert_eq!(s.unused_vips(), vec!["web".to_string()]);
        let (_, changes) = s.apply(release(&["web"]), 4);
        assert_eq!(
            changes,
            vec![Change::VipReleased {
                service: "web".into(),
                vip: ip("10.9.0.1")
            }]
        );
        assert!(!s.vips.contains_key("web"));
        assert!(!s.service_names().contains("web"), "no longer listed");

        // Another new service does not get it while the block has others.
        s.apply(instance("a", "db", "db", 9000), 5);
        assert_eq!(s.vips["db"], ip("10.9.0.3"));
        // web comes back to its own address.
        s.apply(instance("a", "web-2", "web", 8000), 6);
        assert_eq!(s.vips["web"], ip("10.9.0.1"));
        assert!(s.released_vips.is_empty());
    }

    #[test]
    fn what_is_held_again_or_never_unused_keeps_its_address() {
        let mut s = with(&["web", "api"]);
        s.apply(deregister("a", "web"), 3);
        // Registered again between the leader's look and the write.
        s.apply(instance("a", "web-2", "web", 8000), 4);
        let (_, changes) = s.apply(release(&["web", "api", "nothing"]), 5);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(s.vips["web"], ip("10.9.0.1"));
        assert_eq!(s.vips["api"], ip("10.9.0.2"));

        // A resolver named for a service holds its address without
        // instances (as a router or splitter does).
        let resolver: weft_api::config_entry::ConfigEntry = serde_json::from_value(
            serde_json::json!({"Kind": "service-resolver", "Name": "api", "ConnectTimeout": "5s"}),
        )
        .unwrap();
        let (result, _) = s.apply(Command::WriteConfig(resolver), 6);
        assert!(
            matches!(result, crate::state::CommandResult::Applied { .. }),
            "{result:?}"
        );
        s.apply(deregister("a", "api"), 7);
        assert!(s.unused_vips().is_empty());
        s.apply(release(&["api"]), 8);
        assert!(s.vips.contains_key("api"));
        s.apply(
            Command::DeleteConfig {
                kind: "service-resolver".into(),
                name: "api".into(),
            },
            9,
        );
        assert_eq!(s.unused_vips(), vec!["api".to_string()]);
    }

    #[test]
    fn a_node_gone_releases_its_services_and_a_full_block_reuses_the_oldest() {
        let mut s = with(&["s1", "s2", "s3", "s4", "s5", "s6"]);
        let (result, _) = s.apply(instance("a", "s7", "s7", 9999), 3);
        assert!(
            matches!(&result, crate::state::CommandResult::Refused { reason } if reason.contains("no free virtual IP")),
            "{result:?}"
        );
        s.apply(
            Command::DeregisterNode {
                name: "a".into(),
                now_ms: 0,
            },
            4,
        );
        assert_eq!(s.unused_vips().len(), 6);
        s.apply(release(&["s2"]), 5);
        s.apply(release(&["s1", "s3", "s4", "s5", "s6"]), 6);
        assert_eq!(s.released_vips.len(), 6);
        s.apply(node("a"), 7);
        // Every free address is kept for a service: the one given back
        // first (s2's) goes to the newcomer, and s2 forgets it.
        s.apply(instance("a", "s7", "s7", 9999), 8);
        assert_eq!(s.vips["s7"], ip("10.9.0.2"));
        assert!(s.released_vips.get("s2").is_none());
        // s2 now gets the oldest left (s1's, index 6 before s3's by name).
        s.apply(instance("a", "s2", "s2", 9998), 9);
        assert_eq!(s.vips["s2"], ip("10.9.0.1"));
        s.apply(instance("a", "s3", "s3", 9997), 10);
        assert_eq!(s.vips["s3"], ip("10.9.0.3"), "its own, still kept");
    }

    #[test]
    fn an_address_kept_outside_the_block_now_is_not_given() {
        let mut s = with(&["web", "api"]);
        s.apply(deregister("a", "web"), 3);
        s.apply(deregister("a", "api"), 3);
        s.apply(release(&["web", "api"]), 4);
        s.vip_cidr = Some("10.9.1.0/30".into()); // hosts .1 and .2
        s.apply(instance("a", "web-2", "web", 8000), 5);
        assert_eq!(s.vips["web"], ip("10.9.1.1"));
        // The block full: api's address, kept outside it, is no fallback.
        assert_eq!(
            s.released_vips.get("api").map(|r| r.vip),
            Some(ip("10.9.0.2"))
        );
        s.apply(instance("a", "db", "db", 9000), 6);
        let (result, _) = s.apply(instance("a", "mq", "mq", 9001), 7);
        assert!(
            matches!(&result, crate::state::CommandResult::Refused { reason } if reason.contains("no free virtual IP")),
            "{result:?}"
        );
    }

    #[test]
    fn new_addresses_move_on_through_the_block() {
        let mut s = with(&["a1", "a2"]);
        s.apply(deregister("a", "a1"), 3);
        s.apply(release(&["a1"]), 4);
        // Forgotten (as past the bound): still not given before the others.
        s.released_vips = ReleasedVips::default();
        s.apply(instance("a", "b1", "b1", 9000), 5);
        assert_eq!(s.vips["b1"], ip("10.9.0.3"));
        s.apply(instance("a", "b2", "b2", 9001), 6);
        s.apply(instance("a", "b3", "b3", 9002), 7);
        s.apply(instance("a", "b4", "b4", 9003), 8);
        assert_eq!(s.vips["b4"], ip("10.9.0.6"));
        // Round the block's end, to the address given back.
        s.apply(instance("a", "b5", "b5", 9004), 9);
        assert_eq!(s.vips["b5"], ip("10.9.0.1"));
    }

    #[test]
    fn another_datacenters_services_give_back_what_it_no_longer_lists() {
        let mut s = State::default();
        s.apply(
            Command::SetFederationState(weft_api::federation::FederationState {
                datacenter: "dc2".into(),
                gateways: vec!["10.9.0.1:8443".parse().unwrap()],
                updated_ms: 1,
            }),
            1,
        );
        let listed = |services: &[&str]| Command::SetRemoteInstances {
            datacenter: "dc2".into(),
            instances: services
                .iter()
                .map(|svc| ServiceInstance {
                    node: "n".into(),
                    id: svc.to_string(),
                    service: svc.to_string(),
                    address: "10.1.0.1".into(),
                    port: 80,
                    ..Default::default()
                })
                .collect(),
        };
        s.apply(listed(&["web", "api"]), 2);
        let web = s.vips["web.dc2"];
        assert!(s.unused_vips().is_empty());
        s.apply(listed(&["api"]), 3);
        assert_eq!(s.unused_vips(), vec!["web.dc2".to_string()]);
        s.apply(release(&["web.dc2"]), 4);
        assert!(!s.vips.contains_key("web.dc2"));
        s.apply(listed(&["api", "web"]), 5);
        assert_eq!(s.vips["web.dc2"], web);
    }

    #[test]
    fn the_book_is_bounded_and_forgets_the_oldest() {
        let mut book = ReleasedVips::default();
        for n in 0..(MAX_RELEASED_VIPS as u32 + 3) {
            book.keep(format!("s{n}"), Ipv4Addr::from(n), u64::from(n) + 1);
        }
        assert_eq!(book.len(), MAX_RELEASED_VIPS);
        assert!(book.get("s0").is_none() && book.get("s2").is_none());
        assert!(book.get("s3").is_some());
        let all = Cidr::new(Ipv4Addr::from(0), 0).unwrap();
        assert_eq!(
            book.oldest_free(&all, &BTreeSet::new()),
            Some(Ipv4Addr::from(3))
        );
        // A key kept again moves to the young end; an address given to
        // another key is forgotten for the first.
        book.keep("s3".into(), Ipv4Addr::from(3), 1_000_000);
        assert_eq!(
            book.oldest_free(&all, &BTreeSet::new()),
            Some(Ipv4Addr::from(4))
        );
        book.forget("s5", Ipv4Addr::from(4));
        assert!(book.get("s4").is_none() && book.get("s5").is_none());
        assert_eq!(book.by_age.len(), book.len());
        assert_eq!(book.by_vip.len(), book.len());

        // Other datacenters' keys, however many come after, leave this
        // datacenter's all but their share of the book.
        for n in 0..(2 * MAX_RELEASED_VIPS as u32) {
            let vip = Ipv4Addr::from(1_000_000 + n);
            book.keep(format!("r{n}.dc2"), vip, 2_000_000 + u64::from(n));
        }
        assert_eq!(book.len(), MAX_RELEASED_VIPS);
        assert_eq!(book.remote_by_age.len(), MAX_RELEASED_REMOTE_VIPS);
        assert_eq!(
            book.len() - book.remote_by_age.len(),
            MAX_RELEASED_VIPS - MAX_RELEASED_REMOTE_VIPS
        );
        assert!(book.get("s3").is_some(), "the oldest local kept");
        let newest = format!("r{}.dc2", 2 * MAX_RELEASED_VIPS - 1);
        assert!(book.get(&newest).is_some());
        let s = State::default();
        let mut s2 = s.clone();
        let (result, _) = s2.apply(
            Command::ReleaseVips {
                keys: (0..=MAX_RELEASE_BATCH).map(|n| format!("s{n}")).collect(),
            },
            1,
        );
        assert!(
            matches!(&result, crate::state::CommandResult::Refused { reason } if reason.contains("at most 1024")),
            "{result:?}"
        );
    }

    #[test]
    fn a_state_of_an_earlier_version_loads_with_nothing_given_back() {
        use crate::raft::codec;
        let s = with(&["web"]);
        let mut value: serde_json::Value =
            rmp_serde::from_slice(&codec::encode(&s).unwrap()).unwrap();
        let map = value.as_object_mut().unwrap();
        assert!(map.remove("released_vips").is_some() && map.remove("vip_next").is_some());
        let back: State = codec::decode(&codec::encode(&value).unwrap()).unwrap();
        assert!(back.released_vips.is_empty() && back.vip_next.is_none());
        assert_eq!(back.vips, s.vips);

        // The book goes through the codec with its indexes rebuilt.
        let mut s = with(&["web", "api"]);
        s.apply(deregister("a", "web"), 3);
        s.apply(release(&["web"]), 4);
        let back: State = codec::decode(&codec::encode(&s).unwrap()).unwrap();
        assert_eq!(back.released_vips, s.released_vips);
        assert_eq!(back.vip_next, s.vip_next);
    }

    /// One server's state came from an earlier version's snapshot (no
    /// cursor), another's applied the same writes with this version (a
    /// cursor): they give the same addresses, also once the highest
    /// address given back is forgotten.
    #[test]
    fn servers_with_and_without_a_cursor_give_the_same_addresses() {
        let mut kept = State {
            vip_cidr: Some("10.9.0.0/28".into()), // hosts .1 to .14
            ..State::default()
        };
        kept.apply(node("a"), 1);
        for n in 1..=7u16 {
            kept.apply(instance("a", &format!("s{n}"), &format!("s{n}"), n), 2);
        }
        kept.apply(deregister("a", "s7"), 3);
        assert_eq!(kept.vip_next, Some(ip("10.9.0.8")));
        let mut loaded = kept.clone();
        loaded.vip_next = None;
        for s in [&mut kept, &mut loaded] {
            s.apply(release(&["s7"]), 5);
            // Forgotten, as past the bound.
            s.released_vips = ReleasedVips::default();
            s.apply(instance("a", "s8", "s8", 8), 6);
        }
        assert_eq!(kept.vips, loaded.vips);
        assert_eq!(loaded.vips["s8"], ip("10.9.0.8"), "not the forgotten .7");
    }
}
