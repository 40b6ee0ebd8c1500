//! The names the DNS server answers, read from the agent's view: one
//! snapshot per question.
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use super::{DnsCatalog, DnsInstance};
use crate::shared_view::SharedView;

/// The agent's view as its DNS server sees it: one snapshot per question.
pub struct ViewCatalog(pub Arc<SharedView>);

fn ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

impl DnsCatalog for ViewCatalog {
    /// None for a service whose instances are all on external nodes: the
    /// mesh does not carry its traffic, so names give the instances'
    /// addresses instead.
    fn vip(&self, service: &str) -> Option<Ipv4Addr> {
        let view = self.0.load();
        let all = view.instances_of_service(service);
        let external_only = !all.is_empty() && all.iter().all(|i| view.node_is_external(&i.node));
        if external_only {
            return None;
        }
        ipv4(*view.vips.get(service)?)
    }

    fn passing(&self, service: &str) -> Vec<DnsInstance> {
        let view = self.0.load();
        view.passing(service)
            .into_iter()
            .filter_map(|i| {
                Some(DnsInstance {
                    node: i.node.clone(),
                    address: i.address.parse().ok()?,
                    port: i.port,
                    tags: i.tags.clone(),
                })
            })
            .collect()
    }

    fn node(&self, node: &str) -> Option<Ipv4Addr> {
        self.0.load().nodes.get(node)?.address.parse().ok()
    }

    fn service_by_vip(&self, ip: Ipv4Addr) -> Option<String> {
        let view = self.0.load();
        view.service_by_vip(IpAddr::V4(ip)).map(String::from)
    }

    fn node_by_addr(&self, ip: Ipv4Addr) -> Option<String> {
        let view = self.0.load();
        let text = ip.to_string();
        let mut nodes = view.nodes.values().filter(|n| n.address == text);
        let first = nodes.next()?;
        // Two nodes at one address: no single answer.
        nodes.next().is_none().then(|| first.name.clone())
    }
}
