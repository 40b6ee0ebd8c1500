//! Which instances hold each address:port, so that registering an instance
//! checks for another service at its address without scanning every
//! instance (a scan made registration O(n) per write, O(n²) for a fleet).
//!
//! The index is derived from `State::instances`, never stored (snapshots
//! and restores leave it out) and built on first use. Its entries are
//! candidates: each is looked up in the instances before it counts, so an
//! entry left behind by a change cannot make a clash that is not there.
use std::collections::{BTreeSet, HashMap};

use weft_api::catalog::{is_node_local, ServiceInstance};

/// An address:port as far as clashes go: a node-local address (loopback,
/// link-local) is per node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Endpoint {
    node: Option<String>,
    address: String,
    port: u16,
}

impl Endpoint {
    fn of(instance: &ServiceInstance) -> Self {
        let node_local = instance.address.parse().is_ok_and(is_node_local);
        Self {
            node: node_local.then(|| instance.node.clone()),
            address: instance.address.clone(),
            port: instance.port,
        }
    }
}

/// Endpoint -> (node, instance id) of the instances there, in order.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    built: bool,
    by_endpoint: HashMap<Endpoint, BTreeSet<(String, String)>>,
}

/// Derived data: two states are equal whatever their indexes hold.
impl PartialEq for Endpoints {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Endpoints {
    /// Builds the index from `instances` unless it is built.
    pub fn ensure<'a>(&mut self, instances: impl FnOnce() -> Vec<&'a ServiceInstance>) {
        if self.built {
            return;
        }
        self.by_endpoint.clear();
        for i in instances() {
            self.insert(i);
        }
        self.built = true;
    }

    pub fn insert(&mut self, instance: &ServiceInstance) {
        self.by_endpoint
            .entry(Endpoint::of(instance))
            .or_default()
            .insert((instance.node.clone(), instance.id.clone()));
    }

    pub fn remove(&mut self, instance: &ServiceInstance) {
        let endpoint = Endpoint::of(instance);
        if let Some(set) = self.by_endpoint.get_mut(&endpoint) {
            set.remove(&(instance.node.clone(), instance.id.clone()));
            if set.is_empty() {
                self.by_endpoint.remove(&endpoint);
            }
        }
    }

    /// The (node, id) of the instances that may be at `instance`'s
    /// address:port, in (node, id) order.
    pub fn candidates(
        &self,
        instance: &ServiceInstance,
    ) -> impl Iterator<Item = &(String, String)> {
        self.by_endpoint
            .get(&Endpoint::of(instance))
            .into_iter()
            .flatten()
    }
}
