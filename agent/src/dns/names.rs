//! What a DNS question asks, and what the agent answers: pure, no I/O.
//!
//! The agent answers for its domains (`weft` and, as Consul users expect,
//! `consul`; `dns_domain` and `dns_alt_domain` in agent.toml), each
//! optionally followed by this node's datacenter (`api.service.dc1.weft`):
//!
//! | name | A | SRV |
//! |---|---|---|
//! | `NAME.service.D` | the service's virtual IP | one record per passing instance: its port and a target whose A record (additional section) is the instance's address |
//! | `TAG.NAME.service.D` | the addresses of the passing instances with tag `TAG` | those instances |
//! | `NODE.node.D` | the node's address | – |
//! | `NAME.virtual.D` | the virtual IP | – |
//! | `HEX.addr.D` | the IPv4 address `HEX` spells (an SRV target) | – |
//! | `a.b.c.d.in-addr.arpa` (PTR) | – | – (PTR: `NAME.service.D` for a virtual IP, `NODE.node.D` for a node) |
//!
//! SRV targets are `NODE.node.DC.D` when the instance listens on its node's
//! address, else `HEX.addr.DC.D`. Another datacenter of the federation
//! answers `NAME.service.DC2.D` with the virtual IP this datacenter gave that
//! service there (its connections go through the gateways); other names of
//! other datacenters are NXDOMAIN; names outside the domains are REFUSED.

use std::net::Ipv4Addr;

use hickory_proto::rr::RecordType;

/// A passing instance, as DNS shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsInstance {
    pub node: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub tags: Vec<String>,
}

/// What the DNS server knows of the mesh (the agent's view). Names come in
/// lowercase.
pub trait DnsCatalog: Send + Sync {
    /// The virtual IP of `service`, if it has one.
    fn vip(&self, service: &str) -> Option<Ipv4Addr>;
    /// The passing instances of `service` (their node up), in a stable order.
    fn passing(&self, service: &str) -> Vec<DnsInstance>;
    /// The address of `node`.
    fn node(&self, node: &str) -> Option<Ipv4Addr>;
    /// The service whose virtual IP is `ip`.
    fn service_by_vip(&self, ip: Ipv4Addr) -> Option<String>;
    /// The node whose address is `ip`.
    fn node_by_addr(&self, ip: Ipv4Addr) -> Option<String>;
}

/// The domains the agent answers for, and its datacenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// Lowercase, without dots at either end; the first is the one PTR
    /// answers and SRV targets use.
    pub domains: Vec<String>,
    pub datacenter: String,
}

impl Default for Zone {
    fn default() -> Self {
        Zone {
            domains: vec!["weft".into(), "consul".into()],
            datacenter: "dc1".into(),
        }
    }
}

/// One SRV record: the instance's port and a target name whose A record
/// is `address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub port: u16,
    pub target: String,
    pub address: Ipv4Addr,
}

/// What to answer for one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// NOERROR with one A record.
    Address(Ipv4Addr),
    /// NOERROR with one A record per address.
    Addresses(Vec<Ipv4Addr>),
    /// NOERROR with these SRV records, their targets' A records in the
    /// additional section.
    Srv(Vec<Srv>),
    /// NOERROR with one PTR record to this name (fully qualified).
    Ptr(String),
    /// NOERROR with no answer: the name exists, without records of the asked type.
    NoData,
    /// NXDOMAIN: a name inside a domain that does not exist.
    NxDomain,
    /// REFUSED: a name outside the agent's domains.
    Refused,
}

/// The zone (domain) a negative answer's SOA belongs to, for `name`: the
/// domain it is in, or None outside them.
pub fn zone_of<'a>(name: &str, zone: &'a Zone) -> Option<&'a str> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    zone.domains
        .iter()
        .find(|d| name == **d || name.ends_with(&format!(".{d}")))
        .map(String::as_str)
}

/// Another datacenter's name: a service's virtual IP here, if it has one.
fn remote(labels: &[&str], dc: &str, query_type: RecordType, catalog: &dyn DnsCatalog) -> Decision {
    let [service, "service"] = labels else {
        return Decision::NxDomain;
    };
    if weft_api::names::validate_name(service).is_err()
        || weft_api::names::validate_name(dc).is_err()
    {
        return Decision::NxDomain;
    }
    match catalog.vip(&weft_api::vip::remote_key(service, dc)) {
        None => Decision::NxDomain,
        Some(vip) if matches!(query_type, RecordType::A | RecordType::ANY) => {
            Decision::Address(vip)
        }
        Some(_) => Decision::NoData,
    }
}

/// Decides the answer to a question for `name` (presentation format, any
/// case, with or without the trailing dot) of type `query_type`.
pub fn decide(
    name: &str,
    query_type: RecordType,
    catalog: &dyn DnsCatalog,
    zone: &Zone,
) -> Decision {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if let Some(reverse) = name.strip_suffix(".in-addr.arpa") {
        return ptr(reverse, query_type, catalog, zone);
    }
    let Some(domain) = zone_of(&name, zone) else {
        return Decision::Refused;
    };
    let rest = name[..name.len() - domain.len()].trim_end_matches('.');
    let mut labels: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('.').collect()
    };
    // `….service.dc1.weft`: the datacenter, if named, is this one.
    const KINDS: [&str; 4] = ["service", "node", "virtual", "addr"];
    if let Some(last) = labels.last().copied() {
        if !KINDS.contains(&last) {
            if labels.len() == 1 && last == zone.datacenter {
                return Decision::NoData; // `dc1.weft` itself
            }
            if labels.len() >= 2 && KINDS.contains(&labels[labels.len() - 2]) {
                if last != zone.datacenter {
                    return remote(&labels[..labels.len() - 1], last, query_type, catalog);
                }
                labels.pop();
            }
        }
    }
    let a_like = matches!(query_type, RecordType::A | RecordType::ANY);
    match labels.as_slice() {
        [] => Decision::NoData,
        [kind] if KINDS.contains(kind) => Decision::NoData,
        [service, "service"] => {
            if weft_api::names::validate_name(service).is_err() {
                return Decision::NxDomain;
            }
            let Some(vip) = catalog.vip(service) else {
                // No virtual IP (a service of external nodes only): its
                // instances, reached directly.
                let found = catalog.passing(service);
                if found.is_empty() {
                    return Decision::NxDomain;
                }
                return match query_type {
                    RecordType::A | RecordType::ANY => {
                        Decision::Addresses(found.iter().map(|i| i.address).collect())
                    }
                    RecordType::SRV => srv(found, catalog, zone, domain),
                    _ => Decision::NoData,
                };
            };
            match query_type {
                RecordType::A | RecordType::ANY => Decision::Address(vip),
                RecordType::SRV => srv(catalog.passing(service), catalog, zone, domain),
                _ => Decision::NoData,
            }
        }
        [tag, service, "service"] => {
            if weft_api::names::validate_name(service).is_err() || tag.is_empty() {
                return Decision::NxDomain;
            }
            let tagged: Vec<DnsInstance> = catalog
                .passing(service)
                .into_iter()
                .filter(|i| i.tags.iter().any(|t| t.eq_ignore_ascii_case(tag)))
                .collect();
            if tagged.is_empty() {
                return Decision::NxDomain;
            }
            match query_type {
                RecordType::A | RecordType::ANY => {
                    let mut ips: Vec<Ipv4Addr> = tagged.iter().map(|i| i.address).collect();
                    ips.dedup();
                    Decision::Addresses(ips)
                }
                RecordType::SRV => srv(tagged, catalog, zone, domain),
                _ => Decision::NoData,
            }
        }
        [node, "node"] => match catalog.node(node) {
            None => Decision::NxDomain,
            Some(ip) if a_like => Decision::Address(ip),
            Some(_) => Decision::NoData,
        },
        [service, "virtual"] => match catalog.vip(service) {
            None => Decision::NxDomain,
            Some(ip) if a_like => Decision::Address(ip),
            Some(_) => Decision::NoData,
        },
        [hex, "addr"] => match u32::from_str_radix(hex, 16) {
            Ok(n) if hex.len() == 8 && a_like => Decision::Address(Ipv4Addr::from(n)),
            Ok(_) if hex.len() == 8 => Decision::NoData,
            _ => Decision::NxDomain,
        },
        _ => Decision::NxDomain,
    }
}

/// SRV records for `instances`: targets named after their node when they
/// listen on its address, else after their address.
fn srv(
    instances: Vec<DnsInstance>,
    catalog: &dyn DnsCatalog,
    zone: &Zone,
    domain: &str,
) -> Decision {
    if instances.is_empty() {
        return Decision::NoData;
    }
    let dc = &zone.datacenter;
    Decision::Srv(
        instances
            .into_iter()
            .map(|i| {
                let target = if catalog.node(&i.node) == Some(i.address) {
                    format!("{}.node.{dc}.{domain}.", i.node)
                } else {
                    format!("{:08x}.addr.{dc}.{domain}.", u32::from(i.address))
                };
                Srv {
                    port: i.port,
                    target,
                    address: i.address,
                }
            })
            .collect(),
    )
}

/// A reverse lookup: `d.c.b.a` (of `d.c.b.a.in-addr.arpa`).
fn ptr(reverse: &str, query_type: RecordType, catalog: &dyn DnsCatalog, zone: &Zone) -> Decision {
    let octets: Vec<u8> = reverse.split('.').filter_map(|o| o.parse().ok()).collect();
    let [d, c, b, a] = octets.as_slice() else {
        return Decision::Refused;
    };
    if reverse.split('.').count() != 4 {
        return Decision::Refused;
    }
    let ip = Ipv4Addr::new(*a, *b, *c, *d);
    let domain = zone.domains.first().map_or("weft", String::as_str);
    let target = if let Some(key) = catalog.service_by_vip(ip) {
        match weft_api::vip::split_key(&key) {
            (service, Some(dc)) => format!("{service}.service.{dc}.{domain}."),
            (service, None) => format!("{service}.service.{domain}."),
        }
    } else if let Some(node) = catalog.node_by_addr(ip) {
        format!("{node}.node.{}.{domain}.", zone.datacenter)
    } else {
        return Decision::Refused; // not the mesh's: someone else's to answer
    };
    match query_type {
        RecordType::PTR | RecordType::ANY => Decision::Ptr(target),
        _ => Decision::NoData,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// api (VIP 240.0.0.7): api-1 on node-b (its node's address, tags v1
    /// and primary), api-2 on node-b at another address (tag v2); db has a
    /// VIP and no passing instance.
    pub struct TestCatalog;

    pub const API_VIP: Ipv4Addr = Ipv4Addr::new(240, 0, 0, 7);
    const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    const OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 9);

    impl DnsCatalog for TestCatalog {
        fn vip(&self, service: &str) -> Option<Ipv4Addr> {
            match service {
                "api" => Some(API_VIP),
                "db" => Some(Ipv4Addr::new(240, 0, 0, 8)),
                "api.dc2" => Some(Ipv4Addr::new(240, 0, 0, 9)),
                _ => None,
            }
        }
        fn passing(&self, service: &str) -> Vec<DnsInstance> {
            if service == "pg" {
                // On an external node: no virtual IP.
                return vec![DnsInstance {
                    node: "db-host".into(),
                    address: Ipv4Addr::new(10, 9, 0, 5),
                    port: 5432,
                    tags: vec![],
                }];
            }
            if service != "api" {
                return Vec::new();
            }
            vec![
                DnsInstance {
                    node: "node-b".into(),
                    address: NODE_B,
                    port: 8080,
                    tags: vec!["v1".into(), "Primary".into()],
                },
                DnsInstance {
                    node: "node-b".into(),
                    address: OTHER,
                    port: 8081,
                    tags: vec!["v2".into()],
                },
            ]
        }
        fn node(&self, node: &str) -> Option<Ipv4Addr> {
            (node == "node-b").then_some(NODE_B)
        }
        fn service_by_vip(&self, ip: Ipv4Addr) -> Option<String> {
            (ip == API_VIP).then(|| "api".into())
        }
        fn node_by_addr(&self, ip: Ipv4Addr) -> Option<String> {
            (ip == NODE_B).then(|| "node-b".into())
        }
    }

    fn d(name: &str, t: RecordType) -> Decision {
        decide(name, t, &TestCatalog, &Zone::default())
    }

    #[test]
    fn a_service_without_a_virtual_ip_is_its_instances() {
        assert_eq!(
            d("pg.service.weft", RecordType::A),
            Decision::Addresses(vec![Ipv4Addr::new(10, 9, 0, 5)])
        );
        assert!(
            matches!(d("pg.service.weft", RecordType::SRV), Decision::Srv(_)),
            "{:?}",
            d("pg.service.weft", RecordType::SRV)
        );
        assert_eq!(d("nothing.service.weft", RecordType::A), Decision::NxDomain);
    }

    #[test]
    fn a_service_is_its_virtual_ip_in_both_domains_and_with_the_datacenter() {
        for name in [
            "api.service.weft",
            "API.Service.Weft.",
            "api.service.consul",
            "api.service.dc1.weft",
            "api.service.dc1.consul.",
            "api.virtual.weft",
        ] {
            assert_eq!(d(name, RecordType::A), Decision::Address(API_VIP), "{name}");
        }
        // Another datacenter's service: the virtual IP it has here.
        assert_eq!(
            d("api.service.dc2.weft", RecordType::A),
            Decision::Address(Ipv4Addr::new(240, 0, 0, 9))
        );
        assert_eq!(d("api.service.dc2.weft", RecordType::SRV), Decision::NoData);
        for name in [
            "db.service.dc2.weft",
            "node-b.node.dc2.weft",
            "v1.api.service.dc2.weft",
            "api.service.DC_2.weft",
        ] {
            assert_eq!(d(name, RecordType::A), Decision::NxDomain, "{name}");
        }
        assert_eq!(d("api.service.weft", RecordType::AAAA), Decision::NoData);
        assert_eq!(d("nope.service.weft", RecordType::A), Decision::NxDomain);
    }

    #[test]
    fn srv_gives_every_passing_instance_with_a_target_that_resolves() {
        let Decision::Srv(records) = d("api.service.weft", RecordType::SRV) else {
            panic!("{:?}", d("api.service.weft", RecordType::SRV));
        };
        assert_eq!(
            records,
            [
                Srv {
                    port: 8080,
                    target: "node-b.node.dc1.weft.".into(),
                    address: NODE_B
                },
                Srv {
                    port: 8081,
                    target: "0a000909.addr.dc1.weft.".into(),
                    address: OTHER
                },
            ]
        );
        // The targets answer A themselves.
        assert_eq!(
            d("node-b.node.dc1.weft", RecordType::A),
            Decision::Address(NODE_B)
        );
        assert_eq!(
            d("0a000909.addr.dc1.weft", RecordType::A),
            Decision::Address(OTHER)
        );
        assert_eq!(
            d("db.service.weft", RecordType::SRV),
            Decision::NoData,
            "none passing"
        );
    }

    #[test]
    fn a_tag_selects_instances() {
        assert_eq!(
            d("v2.api.service.weft", RecordType::A),
            Decision::Addresses(vec![OTHER])
        );
        assert_eq!(
            d("primary.api.service.consul", RecordType::A),
            Decision::Addresses(vec![NODE_B]),
            "tags match case-insensitively"
        );
        let Decision::Srv(v1) = d("v1.api.service.dc1.weft", RecordType::SRV) else {
            panic!()
        };
        assert_eq!(v1.len(), 1);
        assert_eq!(d("v3.api.service.weft", RecordType::A), Decision::NxDomain);
        assert_eq!(d("a.b.api.service.weft", RecordType::A), Decision::NxDomain);
    }

    #[test]
    fn nodes_reverse_lookups_and_the_rest() {
        assert_eq!(
            d("node-b.node.weft", RecordType::A),
            Decision::Address(NODE_B)
        );
        assert_eq!(d("node-x.node.weft", RecordType::A), Decision::NxDomain);
        assert_eq!(
            d("7.0.0.240.in-addr.arpa", RecordType::PTR),
            Decision::Ptr("api.service.weft.".into())
        );
        assert_eq!(
            d("3.0.0.10.in-addr.arpa.", RecordType::PTR),
            Decision::Ptr("node-b.node.dc1.weft.".into())
        );
        assert_eq!(
            d("1.1.1.1.in-addr.arpa", RecordType::PTR),
            Decision::Refused
        );
        assert_eq!(d("x.1.1.in-addr.arpa", RecordType::PTR), Decision::Refused);
        for parent in [
            "weft",
            "service.weft",
            "dc1.weft",
            "node.consul",
            "service.dc1.weft",
        ] {
            assert_eq!(d(parent, RecordType::A), Decision::NoData, "{parent}");
        }
        assert_eq!(d("something.weft", RecordType::A), Decision::NxDomain);
        assert_eq!(d("zzzzzzzz.addr.weft", RecordType::A), Decision::NxDomain);
        assert_eq!(d("example.com", RecordType::A), Decision::Refused);
        assert_eq!(d("weft.example.com", RecordType::A), Decision::Refused);
        let only_weft = Zone {
            domains: vec!["weft".into()],
            datacenter: "dc1".into(),
        };
        assert_eq!(
            decide(
                "api.service.consul",
                RecordType::A,
                &TestCatalog,
                &only_weft
            ),
            Decision::Refused
        );
    }
}
