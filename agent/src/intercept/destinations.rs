//! The destinations the programs take over, kept in step with the view by
//! difference: a sync compares the instances the last sync saw with the
//! view's (persistent maps share what did not change, so the comparison
//! skips it) and names only the destinations a change may have touched.
//! A health flip in a mesh of 10,000 instances touches none; before, every
//! sync rebuilt and compared the whole set.
//!
//! Pure: no maps, no syscalls; [`super::Interception`] applies what it says.
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use im::ordmap::DiffItem;
use im::OrdMap;
use weft_api::catalog::ServiceInstance;

use crate::view::View;

/// A destination the programs take over: an address and port, or a
/// virtual IP on any port (`None`).
pub type Destination = (IpAddr, Option<u16>);

type Instances = OrdMap<crate::view::InstanceKey, std::sync::Arc<ServiceInstance>>;
type Nodes = OrdMap<crate::view::Name, std::sync::Arc<weft_api::catalog::Node>>;

/// What the last sync saw and what it wants taken over.
#[derive(Debug, Clone)]
pub struct Destinations {
    node: String,
    /// The agent's own addresses: never taken over, whatever instance
    /// claims one.
    own: Vec<std::net::SocketAddr>,
    instances: Instances,
    /// The nodes as the last sync saw them: whether one is external.
    nodes: Nodes,
    vips: OrdMap<String, IpAddr>,
    /// Destination -> how many instances or services want it (two
    /// instances may share an address and port, on different nodes).
    wanted: HashMap<Destination, u32>,
}

/// The destination an instance wants on node `node`: its address and port.
/// Another node's instance at a node-local address (loopback, link-local
/// such as 169.254.169.254) wants none: that address here is this node's.
/// Nor does one at the agent's own ports (`own`): workloads' tokens and
/// queries for the agent would go to that service's instances. Nor does
/// one on an external node (registered through the catalog, no agent):
/// the mesh has no tunnel to it, so taking its address over would only
/// cut workloads off from it, and a token that may register an external
/// node would cut them off from any address it names.
fn of_instance(
    instance: &ServiceInstance,
    node: &str,
    own: &[std::net::SocketAddr],
    external: bool,
) -> Option<Destination> {
    if external {
        return None;
    }
    let ip = instance.address.parse::<IpAddr>().ok()?;
    let here = instance.node == node;
    if here && crate::config::is_among(own, ip, instance.port) {
        return None;
    }
    (here || !weft_api::catalog::is_node_local(ip)).then_some((ip, Some(instance.port)))
}

/// Whether `name` is an external node in `nodes`.
fn external(nodes: &Nodes, name: &str) -> bool {
    nodes
        .get(name)
        .is_some_and(|n| weft_api::catalog_register::is_external(n))
}

impl Destinations {
    /// Nothing seen yet, nothing wanted.
    pub fn new(node: &str, own: Vec<std::net::SocketAddr>) -> Self {
        Destinations {
            node: node.to_string(),
            own,
            instances: OrdMap::new(),
            nodes: OrdMap::new(),
            vips: OrdMap::new(),
            wanted: HashMap::new(),
        }
    }

    /// Moves to `view` and returns the destinations whose being wanted may
    /// have changed (ask [`Destinations::wants`]); each appears once.
    pub fn update(&mut self, view: &View) -> BTreeSet<Destination> {
        let mut changes: Vec<(Option<Destination>, Option<Destination>)> = Vec::new();
        let was = |name: &str| external(&self.nodes, name);
        let is = |name: &str| external(&view.nodes, name);
        let (node, own) = (&self.node, &self.own);
        for item in self.instances.diff(&view.instances) {
            let (old, new) = match item {
                DiffItem::Add(_, new) => (None, of_instance(new, node, own, is(&new.node))),
                DiffItem::Remove(_, old) => (of_instance(old, node, own, was(&old.node)), None),
                DiffItem::Update {
                    old: (_, old),
                    new: (_, new),
                } => (
                    of_instance(old, node, own, was(&old.node)),
                    of_instance(new, node, own, is(&new.node)),
                ),
            };
            if old != new {
                changes.push((old, new));
            }
        }
        // A node that became external, or stopped being: its instances the
        // diff above did not name (unchanged) change what they want.
        for item in self.nodes.diff(&view.nodes) {
            let name = match item {
                DiffItem::Add(name, _) | DiffItem::Remove(name, _) => name,
                DiffItem::Update { new: (name, _), .. } => name,
            };
            if was(name) == is(name) {
                continue;
            }
            for instance in view.instances_on(name) {
                let key: crate::view::InstanceKey =
                    (instance.node.as_str().into(), instance.id.as_str().into());
                let unchanged = self
                    .instances
                    .get(&key)
                    .is_some_and(|old| **old == *instance);
                if unchanged {
                    changes.push((
                        of_instance(instance, node, own, was(name)),
                        of_instance(instance, node, own, is(name)),
                    ));
                }
            }
        }
        self.nodes = view.nodes.clone();
        for item in self.vips.diff(&view.vips) {
            changes.push(match item {
                DiffItem::Add(_, new) => (None, Some((*new, None))),
                DiffItem::Remove(_, old) => (Some((*old, None)), None),
                DiffItem::Update {
                    old: (_, old),
                    new: (_, new),
                } => (Some((*old, None)), Some((*new, None))),
            });
        }
        self.vips = view.vips.clone();
        self.instances = view.instances.clone();
        self.count(changes)
    }

    /// Counts each `(was wanted, is wanted)` pair and returns every
    /// destination named.
    fn count(
        &mut self,
        changes: Vec<(Option<Destination>, Option<Destination>)>,
    ) -> BTreeSet<Destination> {
        let mut touched = BTreeSet::new();
        for (old, new) in changes {
            if let Some(old) = old {
                self.release(old);
                touched.insert(old);
            }
            if let Some(new) = new {
                *self.wanted.entry(new).or_insert(0) += 1;
                touched.insert(new);
            }
        }
        touched
    }

    /// Takes the agent's own addresses after a reload (an upstream port
    /// added or moved) and returns the destinations whose being wanted may
    /// have changed: an instance of this node that claims a port the agent
    /// took since is no longer taken over, and one at a port it gave up is.
    pub fn set_own(&mut self, own: Vec<std::net::SocketAddr>) -> BTreeSet<Destination> {
        let mut changes = Vec::new();
        for instance in self.instances.values() {
            let external = external(&self.nodes, &instance.node);
            let old = of_instance(instance, &self.node, &self.own, external);
            let new = of_instance(instance, &self.node, &own, external);
            if old != new {
                changes.push((old, new));
            }
        }
        self.own = own;
        self.count(changes)
    }

    fn release(&mut self, destination: Destination) {
        if let Some(count) = self.wanted.get_mut(&destination) {
            *count -= 1;
            if *count == 0 {
                self.wanted.remove(&destination);
            }
        }
    }

    /// Whether the view last given wants `destination` taken over.
    pub fn wants(&self, destination: &Destination) -> bool {
        self.wanted.contains_key(destination)
    }

    /// Every destination wanted.
    pub fn all(&self) -> BTreeSet<Destination> {
        self.wanted.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use weft_api::proto::{self, change::Change as P, watch_event::Event};

    use super::*;

    fn instance(id: &str, node: &str, address: &str, port: u32, health: proto::Health) -> P {
        P::InstanceUpsert(proto::ServiceInstance {
            id: id.into(),
            service: "api".into(),
            node: node.into(),
            address: address.into(),
            port,
            health: health as i32,
            ..Default::default()
        })
    }

    fn apply(view: &mut View, index: u64, changes: Vec<P>) {
        view.apply(crate::view::tests::changes(index, changes))
            .unwrap();
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// What `view` wants, computed from scratch by a loop of its own (the
    /// rule as the agent had it before syncing by difference): the
    /// reference the differences must always agree with.
    fn from_scratch(view: &View, node: &str) -> BTreeSet<Destination> {
        let mut wanted: BTreeSet<Destination> =
            view.vips.values().map(|vip| (*vip, None)).collect();
        for instance in view.instances.values() {
            if view.node_is_external(&instance.node) {
                continue;
            }
            if let Ok(ip) = instance.address.parse::<IpAddr>() {
                if instance.node == node || !weft_api::catalog::is_node_local(ip) {
                    wanted.insert((ip, Some(instance.port)));
                }
            }
        }
        wanted
    }

    #[test]
    fn instances_and_vips_are_wanted_and_other_nodes_local_addresses_are_not() {
        let mut v = View::default();
        apply(
            &mut v,
            1,
            vec![
                instance("a1", "a", "10.0.0.1", 80, proto::Health::Passing),
                instance("b1", "b", "127.0.0.1", 81, proto::Health::Passing),
                instance("a2", "a", "fd00::2", 82, proto::Health::Critical),
                instance("a3", "a", "not-an-address", 83, proto::Health::Passing),
                P::VipAssigned(proto::ServiceVip {
                    service: "api".into(),
                    vip: "240.0.0.2".into(),
                }),
            ],
        );
        assert_eq!(
            from_scratch(&v, "a"),
            BTreeSet::from([
                (ip("10.0.0.1"), Some(80)),
                (ip("fd00::2"), Some(82)),
                (ip("240.0.0.2"), None),
            ]),
            "b's loopback instance is not a's to take over; health does not matter"
        );
        assert!(from_scratch(&v, "b").contains(&(ip("127.0.0.1"), Some(81))));
    }

    #[test]
    fn an_instance_at_the_agents_own_ports_is_never_taken_over() {
        let mut v = View::default();
        apply(
            &mut v,
            1,
            vec![
                // The local API, claimed as given and as another loopback
                // address; the admin port, which listens everywhere.
                instance("claim1", "a", "127.0.0.1", 8500, proto::Health::Passing),
                instance("claim2", "a", "127.0.0.2", 8500, proto::Health::Passing),
                instance("claim3", "a", "10.0.0.1", 15020, proto::Health::Passing),
                instance("fine", "a", "127.0.0.1", 8080, proto::Health::Passing),
            ],
        );
        let own = vec![
            "127.0.0.1:8500".parse().unwrap(),
            "0.0.0.0:15020".parse().unwrap(),
        ];
        let mut d = Destinations::new("a", own);
        assert_eq!(
            d.update(&v),
            BTreeSet::from([(ip("127.0.0.1"), Some(8080))])
        );
    }

    #[test]
    fn a_port_the_agent_takes_by_reload_is_given_up_by_the_instance_claiming_it() {
        let mut v = View::default();
        apply(
            &mut v,
            1,
            vec![
                instance("claim", "a", "127.0.0.1", 9292, proto::Health::Passing),
                instance("other", "b", "10.0.0.2", 9292, proto::Health::Passing),
            ],
        );
        let api: std::net::SocketAddr = "127.0.0.1:8500".parse().unwrap();
        let mut d = Destinations::new("a", vec![api]);
        d.update(&v);
        let claim = (ip("127.0.0.1"), Some(9292));
        assert!(d.wants(&claim));
        // A reload adds an upstream listener at 127.0.0.1:9292.
        let touched = d.set_own(vec![api, "127.0.0.1:9292".parse().unwrap()]);
        assert_eq!(touched, BTreeSet::from([claim]));
        assert!(!d.wants(&claim), "the agent's new port is not taken over");
        assert!(d.wants(&(ip("10.0.0.2"), Some(9292))), "another node's is");
        // The same own addresses again change nothing; giving the port up
        // hands it back.
        assert!(d
            .set_own(vec![api, "127.0.0.1:9292".parse().unwrap()])
            .is_empty());
        assert_eq!(d.set_own(vec![api]), BTreeSet::from([claim]));
        assert!(d.wants(&claim));
    }

    #[test]
    fn a_health_flip_touches_nothing_and_a_move_touches_both_ends() {
        let mut v = View::default();
        apply(
            &mut v,
            1,
            vec![instance("a1", "a", "10.0.0.1", 80, proto::Health::Passing)],
        );
        let mut d = Destinations::new("a", Vec::new());
        assert_eq!(d.update(&v), BTreeSet::from([(ip("10.0.0.1"), Some(80))]));
        assert!(d.update(&v).is_empty(), "nothing changed");

        apply(
            &mut v,
            2,
            vec![instance("a1", "a", "10.0.0.1", 80, proto::Health::Critical)],
        );
        assert!(d.update(&v).is_empty(), "same address and port");

        apply(
            &mut v,
            3,
            vec![instance("a1", "a", "10.0.0.9", 80, proto::Health::Passing)],
        );
        let touched = d.update(&v);
        assert_eq!(
            touched,
            BTreeSet::from([(ip("10.0.0.1"), Some(80)), (ip("10.0.0.9"), Some(80))])
        );
        assert!(!d.wants(&(ip("10.0.0.1"), Some(80))));
        assert!(d.wants(&(ip("10.0.0.9"), Some(80))));
    }

    fn node(name: &str, external: bool) -> P {
        let meta = if external {
            [("external-node".to_string(), "true".to_string())].into()
        } else {
            Default::default()
        };
        P::NodeUpsert(proto::Node {
            name: name.into(),
            address: "10.0.0.50".into(),
            meta,
            ..Default::default()
        })
    }

    /// An external node's instance (registered through the catalog, no
    /// agent to tunnel to) is not taken over: it would only cut workloads
    /// off from the address it names, any address.
    #[test]
    fn an_external_nodes_instances_are_not_taken_over() {
        let mut v = View::default();
        let db = (ip("10.0.0.50"), Some(5432));
        apply(
            &mut v,
            1,
            vec![
                node("x", true),
                instance("db-1", "x", "10.0.0.50", 5432, proto::Health::Passing),
            ],
        );
        let mut d = Destinations::new("a", Vec::new());
        d.update(&v);
        assert!(!d.wants(&db));
        assert_eq!(d.all(), from_scratch(&v, "a"));
        // The node name taken by an agent: its instance is the mesh's.
        apply(&mut v, 2, vec![node("x", false)]);
        assert_eq!(d.update(&v), BTreeSet::from([db]));
        assert!(d.wants(&db));
        assert_eq!(d.all(), from_scratch(&v, "a"));
        // External again, and the instance moved in the same sync.
        apply(
            &mut v,
            3,
            vec![
                node("x", true),
                instance("db-1", "x", "10.0.0.51", 5432, proto::Health::Passing),
            ],
        );
        d.update(&v);
        assert!(d.all().is_empty(), "{:?}", d.all());
        assert_eq!(d.all(), from_scratch(&v, "a"));
    }

    #[test]
    fn a_shared_address_stays_wanted_until_its_last_instance_goes() {
        let mut v = View::default();
        apply(
            &mut v,
            1,
            vec![
                instance("x", "a", "10.0.0.5", 80, proto::Health::Passing),
                instance("y", "b", "10.0.0.5", 80, proto::Health::Passing),
            ],
        );
        let mut d = Destinations::new("a", Vec::new());
        d.update(&v);
        let shared = (ip("10.0.0.5"), Some(80));
        apply(
            &mut v,
            2,
            vec![P::InstanceDelete(proto::InstanceRef {
                node: "a".into(),
                id: "x".into(),
            })],
        );
        assert!(d.update(&v).contains(&shared));
        assert!(d.wants(&shared), "y still listens there");
        apply(&mut v, 3, vec![P::NodeDelete("b".into())]);
        d.update(&v);
        assert!(!d.wants(&shared));
        assert!(d.all().is_empty());
    }

    #[test]
    fn a_vip_moved_or_a_snapshot_taken_agrees_with_a_full_computation() {
        let mut v = View::default();
        let mut d = Destinations::new("a", Vec::new());
        let vip = |service: &str, vip: &str| {
            P::VipAssigned(proto::ServiceVip {
                service: service.into(),
                vip: vip.into(),
            })
        };
        apply(
            &mut v,
            1,
            vec![vip("api", "240.0.0.2"), vip("db", "240.0.0.3")],
        );
        d.update(&v);
        apply(&mut v, 2, vec![vip("api", "240.0.0.9")]);
        let touched = d.update(&v);
        assert!(touched.contains(&(ip("240.0.0.2"), None)));
        assert!(!d.wants(&(ip("240.0.0.2"), None)));
        assert!(d.wants(&(ip("240.0.0.3"), None)));
        assert!(d.wants(&(ip("240.0.0.9"), None)));

        // A snapshot replaces the whole view: the maps share nothing with
        // the last one seen, and the difference is still right.
        let mut fresh = View::default();
        fresh
            .apply(proto::WatchEvent {
                index: 5,
                event: Some(Event::Snapshot(proto::StateSnapshot {
                    instances: vec![proto::ServiceInstance {
                        id: "z".into(),
                        service: "db".into(),
                        node: "c".into(),
                        address: "10.0.0.7".into(),
                        port: 5432,
                        ..Default::default()
                    }],
                    vips: vec![proto::ServiceVip {
                        service: "db".into(),
                        vip: "240.0.0.3".into(),
                    }],
                    ..Default::default()
                })),
            })
            .unwrap();
        d.update(&fresh);
        assert_eq!(d.all(), from_scratch(&fresh, "a"));
    }

    /// Many random changes, each followed by an update: the kept set always
    /// equals the set computed from scratch, and every destination whose
    /// being wanted changed was named as touched.
    #[test]
    fn differences_agree_with_a_full_computation_over_random_changes() {
        let mut v = View::default();
        let mut d = Destinations::new("a", Vec::new());
        let mut before = BTreeSet::new();
        // A small deterministic generator: the same sequence every run.
        let mut seed: u64 = 0x5eed;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let addresses = ["10.0.0.1", "10.0.0.2", "127.0.0.1", "fd00::1", "bad"];
        for index in 1..=2000 {
            let change = match next(5) {
                0 | 1 => instance(
                    &format!("i{}", next(6)),
                    ["a", "b", "c"][next(3) as usize],
                    addresses[next(5) as usize],
                    80 + next(2) as u32,
                    [proto::Health::Passing, proto::Health::Critical][next(2) as usize],
                ),
                2 => P::InstanceDelete(proto::InstanceRef {
                    node: ["a", "b", "c"][next(3) as usize].into(),
                    id: format!("i{}", next(6)),
                }),
                3 => P::VipAssigned(proto::ServiceVip {
                    service: format!("s{}", next(3)),
                    vip: format!("240.0.0.{}", next(4)),
                }),
                _ => P::NodeDelete(["a", "b", "c"][next(3) as usize].into()),
            };
            apply(&mut v, index, vec![change]);
            let touched = d.update(&v);
            let after = from_scratch(&v, "a");
            assert_eq!(d.all(), after, "after change {index}");
            for changed in before.symmetric_difference(&after) {
                assert!(touched.contains(changed), "{changed:?} at {index}");
            }
            before = after;
        }
    }
}
