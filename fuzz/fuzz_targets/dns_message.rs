//! The agent's DNS server on arbitrary bytes, over UDP and TCP: never a
//! panic, never a reply to a response (no loops between servers), replies
//! within the transport's size limit.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use weft_agent::dns::{respond, Transport};

fuzz_target!(|data: &[u8]| {
    let lookup = |name: &str| (name == "api").then_some(Ipv4Addr::new(240, 0, 0, 7));
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Some(reply) = respond(data, transport, &lookup) {
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
