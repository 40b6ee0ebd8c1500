//! The agent's DNS server on arbitrary bytes, over UDP and TCP: never a
//! panic, never a reply to a response (no loops between servers), replies
//! within the transport's size limit. The catalog has a service with many
//! instances, so SRV answers can outgrow a datagram.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use weft_agent::dns::{respond, DnsCatalog, DnsInstance, Resolver, Transport, Zone};

struct Mesh;

impl DnsCatalog for Mesh {
    fn vip(&self, service: &str) -> Option<Ipv4Addr> {
        (service == "api").then_some(Ipv4Addr::new(240, 0, 0, 7))
    }
    fn passing(&self, service: &str) -> Vec<DnsInstance> {
        if service != "api" {
            return Vec::new();
        }
        (0..200u16)
            .map(|i| DnsInstance {
                node: format!("node-{}", i % 7),
                address: Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8),
                port: 8000 + i,
                tags: vec![format!("v{}", i % 3)],
            })
            .collect()
    }
    fn node(&self, node: &str) -> Option<Ipv4Addr> {
        node.strip_prefix("node-")?
            .parse::<u8>()
            .ok()
            .map(|n| Ipv4Addr::new(10, 0, 0, n))
    }
    fn service_by_vip(&self, ip: Ipv4Addr) -> Option<String> {
        (ip == Ipv4Addr::new(240, 0, 0, 7)).then(|| "api".into())
    }
    fn node_by_addr(&self, ip: Ipv4Addr) -> Option<String> {
        let [10, 0, 0, n] = ip.octets() else { return None };
        (n < 7).then(|| format!("node-{n}"))
    }
}

fuzz_target!(|data: &[u8]| {
    let resolver = Resolver {
        catalog: Arc::new(Mesh),
        zone: Zone::default(),
        recursors: weft_agent::dns::recurse::Recursors::new(Vec::new()),
    };
    // Whatever the bytes, deciding whether to forward them neither panics
    // nor forwards a mesh name.
    let _ = weft_agent::dns::recurse::forwardable(data, &resolver);
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Some(reply) = respond(data, transport, &resolver) {
            assert!(
                data.len() >= 12 && data[2] & 0x80 == 0,
                "replied to a response"
            );
            assert!(reply.len() <= 65535);
            if transport == Transport::Udp {
                assert!(reply.len() <= 1232, "{} bytes over UDP", reply.len());
            }
        }
    }
});
