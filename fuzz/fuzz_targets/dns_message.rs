//! The agent's DNS server on arbitrary bytes, over UDP and TCP: never a
//! panic, never a reply to a response (no loops between servers), replies
//! within the transport's size limit. The catalog has a service with many
//! instances, so SRV answers can outgrow a datagram.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use weft_agent::dns::{
    respond, respond_or_forward, DnsCatalog, DnsInstance, Outcome, Resolver, Transport, Zone,
};

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
    // With recursors, whatever the bytes, deciding neither panics nor
    // forwards a name of the mesh's domains.
    let recursing = Resolver {
        recursors: weft_agent::dns::recurse::Recursors::new(vec!["127.0.0.1:5353".parse().unwrap()]),
        ..resolver.clone()
    };
    if respond_or_forward(data, Transport::Udp, &recursing) == Outcome::Forward {
        // Only what the agent alone would refuse (names outside its
        // domains) goes out.
        let alone = respond(data, Transport::Udp, &resolver).expect("a reply");
        assert_eq!(alone[3] & 0x0f, 5, "forwarded a request the agent answers");
    }
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
