//! The agent's DNS server (default `127.0.0.1:8600`, UDP and TCP on the same
//! address): the mesh's names in Consul's forms, in the `weft` and `consul`
//! domains (see [`names`] for every form: services' virtual IPs, SRV with the
//! passing instances, tags, nodes, reverse lookups of virtual IPs and nodes).
//!
//! The agent is not a general resolver:
//! - a domain itself and the parents of names (`service.weft`, `dc1.weft`…)
//!   are NOERROR with an empty answer (an NXDOMAIN there would tell
//!   resolvers that follow RFC 8020 that no name below them exists either);
//! - any other name inside a domain that names nothing: NXDOMAIN;
//! - names outside the domains: REFUSED, or, with `recursors` configured and
//!   recursion desired, forwarded to them ([`recurse`]);
//! - undecodable queries: FORMERR; a request that is not even a DNS header (under 12
//!   bytes) or that is itself a response gets no reply.
//!
//! Names are matched case-insensitively, with or without the trailing dot. What the
//! mesh holds is injected as a [`Resolver`] (a [`DnsCatalog`] and the [`Zone`]).
//!
//! [`names::decide`] (name and type → [`Decision`]) and [`respond`] (request bytes →
//! response bytes) are pure and unit-tested; [`DnsServer`] owns the sockets and serves
//! until the shutdown future given to [`DnsServer::serve`] completes. No input packet
//! can make it panic or stop. [`view_catalog`] reads the names from the agent's view.

pub mod names;
pub mod recurse;
pub mod view_catalog;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SOA, SRV};
#[cfg(test)]
use hickory_proto::rr::RecordType;
use hickory_proto::rr::{DNSClass, Name, RData, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// The default listening address (field `dns_addr`).
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8600);

/// Time to live of the A records, and of negative answers (through the SOA minimum).
pub const TTL_SECS: u32 = 5;

/// The zone the agent answers for, and the sub-domain of services inside it.
pub const ZONE: &str = "weft";
/// The suffix of service names: `NAME.service.weft`.
pub const SERVICE_SUFFIX: &str = "service.weft";

/// Largest UDP response without EDNS (RFC 1035).
pub(crate) const UDP_MIN_PAYLOAD: usize = 512;
/// Largest UDP response the server sends even when a client offers more (the
/// fragmentation-safe size recommended by DNS Flag Day 2020).
pub(crate) const UDP_MAX_PAYLOAD: u16 = 1232;
/// Receive buffer for one UDP datagram.
const UDP_RECV_BUF: usize = 4096;
/// The smallest DNS message: its header.
const HEADER_LEN: usize = 12;
/// Open TCP connections beyond this are closed at once.
pub const MAX_TCP_CONNECTIONS: usize = 128;
/// A TCP connection that sends nothing, or does not take an answer, for
/// this long is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// DNS server errors.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A listening socket could not be bound (field `dns_addr`).
    #[error("dns_addr {addr}: cannot listen on {transport}: {source}")]
    Bind {
        addr: SocketAddr,
        transport: Transport,
        #[source]
        source: std::io::Error,
    },
    /// The bound socket's address could not be read.
    #[error("dns socket: {0}")]
    LocalAddr(#[source] std::io::Error),
}

pub use names::{decide, Decision, DnsCatalog, DnsInstance, Srv, Zone};
pub use view_catalog::ViewCatalog;

/// What the server answers from: the mesh as the agent sees it, and the
/// domains and datacenter it answers for.
#[derive(Clone)]
pub struct Resolver {
    pub catalog: Arc<dyn DnsCatalog>,
    pub zone: Zone,
    /// Where names outside the domains go (none: they are refused).
    pub recursors: recurse::Recursors,
}

/// The server's [`Resolver`] (the name the agent's wiring uses).
pub type ServiceResolver = Resolver;

/// The transport a request came on: it bounds the size of the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        })
    }
}

/// What the server does with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send this response.
    Reply(Vec<u8>),
    /// Hand the request to the recursors ([`recurse`]).
    Forward,
    /// Send nothing (shorter than a DNS header, or itself a response).
    NoReply,
}

/// Decides one request received on `transport`, decoding it once: the
/// response, or that it goes to the recursors (only a name outside the
/// domains, with recursion desired and recursors configured). Never
/// panics, whatever the bytes.
pub fn respond_or_forward(request: &[u8], transport: Transport, resolver: &Resolver) -> Outcome {
    if request.len() < HEADER_LEN {
        return Outcome::NoReply;
    }
    let id = u16::from_be_bytes([request[0], request[1]]);
    // QR bit set: a response; answering it could start a loop between two servers.
    if request[2] & 0x80 != 0 {
        return Outcome::NoReply;
    }
    let op_code = OpCode::from_u8((request[2] >> 3) & 0x0f);
    let response = match Message::from_vec(request) {
        Err(_) => Message::error_msg(id, op_code, ResponseCode::FormErr),
        Ok(query) => match answer(&query, resolver) {
            Some(response) => response,
            None => return Outcome::Forward,
        },
    };
    encode(response, transport).map_or(Outcome::NoReply, Outcome::Reply)
}

/// The response to one request, or `None` when it gets no reply; a
/// request for the recursors gets none here ([`respond_or_forward`] tells).
pub fn respond(request: &[u8], transport: Transport, resolver: &Resolver) -> Option<Vec<u8>> {
    match respond_or_forward(request, transport, resolver) {
        Outcome::Reply(reply) => Some(reply),
        Outcome::Forward | Outcome::NoReply => None,
    }
}

/// The response to a decoded request; `None`: it goes to the recursors.
fn answer(request: &Message, resolver: &Resolver) -> Option<Message> {
    let meta = &request.metadata;
    let mut response = Message::response(meta.id, meta.op_code);
    response.metadata.recursion_desired = meta.recursion_desired;
    response.metadata.checking_disabled = meta.checking_disabled;
    if let Some(edns) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().clamp(512, UDP_MAX_PAYLOAD));
        response.edns = Some(ours);
    }
    if meta.message_type != MessageType::Query {
        response.metadata.response_code = ResponseCode::FormErr;
        return Some(response);
    }
    if meta.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return Some(response);
    }
    let [query] = request.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return Some(response);
    };
    response.add_query(query.clone());
    if !matches!(query.query_class, DNSClass::IN | DNSClass::ANY) {
        response.metadata.response_code = ResponseCode::Refused;
        return Some(response);
    }
    let name = query.name.to_ascii();
    let decision = decide(&name, query.query_type, &*resolver.catalog, &resolver.zone);
    let zone = names::zone_of(&name, &resolver.zone);
    // Outside the domains (never a mesh name), asked to recurse.
    if decision == Decision::Refused
        && zone.is_none()
        && meta.recursion_desired
        && !resolver.recursors.is_empty()
    {
        return None;
    }
    apply(&mut response, query, decision, zone.unwrap_or("weft"));
    Some(response)
}

/// Writes `decision` for `query` into `response`; negative answers carry
/// the SOA of `zone`.
fn apply(response: &mut Message, query: &Query, decision: Decision, zone: &str) {
    let meta = &mut response.metadata;
    meta.authoritative = decision != Decision::Refused;
    let a = |name: Name, ip| Record::from_rdata(name, TTL_SECS, RData::A(A(ip)));
    let fqdn = |text: &str| Name::from_ascii(text).unwrap_or_else(|_| Name::root());
    match decision {
        Decision::Address(ip) => {
            response.add_answer(a(query.name.clone(), ip));
        }
        Decision::Addresses(ips) => {
            for ip in ips {
                response.add_answer(a(query.name.clone(), ip));
            }
        }
        Decision::Srv(records) => {
            for r in records {
                let target = fqdn(&r.target);
                let srv = SRV::new(1, 1, r.port, target.clone());
                response.add_answer(Record::from_rdata(
                    query.name.clone(),
                    TTL_SECS,
                    RData::SRV(srv),
                ));
                response.add_additional(a(target, r.address));
            }
        }
        Decision::Ptr(target) => {
            let ptr = RData::PTR(PTR(fqdn(&target)));
            response.add_answer(Record::from_rdata(query.name.clone(), TTL_SECS, ptr));
        }
        Decision::NoData => {
            response.add_authority(zone_soa(zone));
        }
        Decision::NxDomain => {
            meta.response_code = ResponseCode::NXDomain;
            response.add_authority(zone_soa(zone));
        }
        Decision::Refused => meta.response_code = ResponseCode::Refused,
    }
}

/// The SOA of `zone` that negative answers carry, so that resolvers cache them for
/// [`TTL_SECS`] at most (RFC 2308).
fn zone_soa(zone: &str) -> Record {
    let name = |text: String| Name::from_ascii(text).unwrap_or_else(|_| Name::root());
    let soa = SOA::new(
        name(format!("agent.{zone}.")),
        name(format!("hostmaster.{zone}.")),
        1,
        3600,
        600,
        86400,
        TTL_SECS,
    );
    Record::from_rdata(name(format!("{zone}.")), TTL_SECS, RData::SOA(soa))
}

/// Serializes `response`, truncating it (TC bit) if it does not fit the transport; a
/// response that cannot be serialized becomes a bare SERVFAIL.
fn encode(response: Message, transport: Transport) -> Option<Vec<u8>> {
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => response
            .edns
            .as_ref()
            .map_or(UDP_MIN_PAYLOAD, |e| usize::from(e.max_payload())),
    };
    let meta = response.metadata;
    match response.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Some(bytes),
        Ok(_) => response.truncate().to_vec().ok(),
        Err(e) => {
            tracing::debug!(error = %e, "dns: cannot encode response");
            Message::error_msg(meta.id, meta.op_code, ResponseCode::ServFail)
                .to_vec()
                .ok()
        }
    }
}

/// The bound DNS server: one UDP socket and one TCP listener on the same address.
pub struct DnsServer {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    resolver: ServiceResolver,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Binds UDP on `addr`, then TCP on the address UDP got (so port 0 gives one port
    /// for both).
    pub async fn bind(addr: SocketAddr, resolver: ServiceResolver) -> Result<Self, DnsError> {
        // With port 0 the kernel picks a UDP port that TCP may have in use
        // (another socket's ephemeral port): then pick again.
        let attempts = if addr.port() == 0 { 16 } else { 1 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let udp = UdpSocket::bind(addr)
                .await
                .map_err(|source| DnsError::Bind {
                    addr,
                    transport: Transport::Udp,
                    source,
                })?;
            let bound = udp.local_addr().map_err(DnsError::LocalAddr)?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => {
                    return Ok(Self {
                        udp: Arc::new(udp),
                        tcp,
                        resolver,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < attempts => {}
                Err(source) => {
                    return Err(DnsError::Bind {
                        addr: bound,
                        transport: Transport::Tcp,
                        source,
                    })
                }
            }
        }
    }

    /// Serves already bound sockets (handed over by a predecessor).
    pub fn from_sockets(
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        resolver: ServiceResolver,
    ) -> Result<Self, DnsError> {
        udp.set_nonblocking(true).map_err(DnsError::LocalAddr)?;
        tcp.set_nonblocking(true).map_err(DnsError::LocalAddr)?;
        Ok(Self {
            udp: Arc::new(UdpSocket::from_std(udp).map_err(DnsError::LocalAddr)?),
            tcp: TcpListener::from_std(tcp).map_err(DnsError::LocalAddr)?,
            resolver,
        })
    }

    /// The sockets, to hand over to a successor.
    pub fn sockets(&self) -> (std::os::fd::BorrowedFd<'_>, std::os::fd::BorrowedFd<'_>) {
        use std::os::fd::AsFd;
        (self.udp.as_fd(), self.tcp.as_fd())
    }

    /// The address both sockets are bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, DnsError> {
        self.udp.local_addr().map_err(DnsError::LocalAddr)
    }

    /// Serves until `shutdown` completes, then closes the sockets and any open TCP
    /// connection. Socket errors are logged and the loop goes on.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; UDP_RECV_BUF];
        let mut conns = JoinSet::new();
        let mut forwards = JoinSet::new();
        let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        let idle = crate::idle_conns::IdleConns::default();
        let mut accept_errors = crate::accept::AcceptErrors::new("dns");
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                received = self.udp.recv_from(&mut buf) => match received {
                    Ok((len, peer)) => {
                        let request = buf.get(..len).unwrap_or_default();
                        let reply = match respond_or_forward(request, Transport::Udp, &self.resolver) {
                            Outcome::Reply(reply) => reply,
                            Outcome::NoReply => continue,
                            Outcome::Forward => {
                                let (udp, recursors) = (self.udp.clone(), self.resolver.recursors.clone());
                                let request = request.to_vec();
                                forwards.spawn(async move {
                                    let Some(reply) = recursors.forward(&request, Transport::Udp).await else {
                                        return;
                                    };
                                    if let Err(e) = udp.send_to(&reply, peer).await {
                                        tracing::debug!(%peer, error = %e, "dns: udp send failed");
                                    }
                                });
                                continue;
                            }
                        };
                        if let Err(e) = self.udp.send_to(&reply, peer).await {
                            tracing::debug!(%peer, error = %e, "dns: udp send failed");
                        }
                    }
                    // E.g. ICMP port unreachable from an earlier reply's peer.
                    Err(e) => tracing::debug!(error = %e, "dns: udp receive failed"),
                },
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Full: the connection idle longest makes room.
                        match idle.take_slot(&slots).await {
                            Some(slot) => {
                                let conn = idle.register();
                                conns.spawn(serve_tcp(stream, self.resolver.clone(), slot, conn));
                            }
                            None => tracing::debug!(%peer, "dns: too many busy tcp connections"),
                        }
                    }
                    Err(e) => accept_errors.failed(&e).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
            }
        }
        conns.shutdown().await;
        forwards.shutdown().await;
    }
}

/// Answers the length-prefixed queries of one TCP connection (RFC 1035 4.2.2) until
/// the client closes it, goes idle, sends something unreadable, does not
/// read its answers, or is evicted while waiting (for a query, or for the
/// client to take an answer) because every slot is taken.
async fn serve_tcp(
    mut stream: TcpStream,
    resolver: ServiceResolver,
    _slot: OwnedSemaphorePermit,
    conn: crate::idle_conns::IdleConn,
) {
    let mut request = Vec::new();
    loop {
        conn.set_waiting(true);
        let read = async {
            let len = stream.read_u16().await?;
            request.resize(usize::from(len), 0);
            stream.read_exact(&mut request).await?;
            Ok::<_, std::io::Error>(())
        };
        tokio::select! {
            result = tokio::time::timeout(TCP_IDLE_TIMEOUT, read) => match result {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            },
            () = conn.evicted() => return,
        }
        conn.set_waiting(false);
        let reply = match respond_or_forward(&request, Transport::Tcp, &resolver) {
            Outcome::Reply(reply) => Some(reply),
            Outcome::NoReply => None,
            Outcome::Forward => resolver.recursors.forward(&request, Transport::Tcp).await,
        };
        let Some(reply) = reply else {
            continue;
        };
        // `encode` keeps TCP replies under 64 KiB, so the length fits.
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        // A client that does not read its answers is as idle as one that
        // sends nothing: it may be evicted, and it is closed in time.
        conn.set_waiting(true);
        tokio::select! {
            written = tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.write_all(&framed)) => {
                if !matches!(written, Ok(Ok(()))) {
                    return;
                }
            }
            () = conn.evicted() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const API_IP: Ipv4Addr = Ipv4Addr::new(240, 0, 0, 7);
    const WEB_IP: Ipv4Addr = Ipv4Addr::new(240, 0, 0, 9);

    /// Two services with virtual IPs and no instance, no node.
    struct TwoServices;

    impl DnsCatalog for TwoServices {
        fn vip(&self, service: &str) -> Option<Ipv4Addr> {
            match service {
                "api" => Some(API_IP),
                "web-2" => Some(WEB_IP),
                _ => None,
            }
        }
        fn passing(&self, _: &str) -> Vec<DnsInstance> {
            Vec::new()
        }
        fn node(&self, _: &str) -> Option<Ipv4Addr> {
            None
        }
        fn service_by_vip(&self, ip: Ipv4Addr) -> Option<String> {
            (ip == API_IP).then(|| "api".into())
        }
        fn node_by_addr(&self, _: Ipv4Addr) -> Option<String> {
            None
        }
    }

    pub(super) fn lookup() -> Resolver {
        Resolver {
            catalog: Arc::new(TwoServices),
            zone: Zone::default(),
            recursors: recurse::Recursors::new(Vec::new()),
        }
    }

    fn d(name: &str, query_type: RecordType) -> Decision {
        decide(name, query_type, &TwoServices, &Zone::default())
    }

    #[test]
    fn known_service_answers_its_address() {
        assert_eq!(
            d("api.service.weft", RecordType::A),
            Decision::Address(API_IP)
        );
        assert_eq!(
            d("web-2.service.weft", RecordType::A),
            Decision::Address(WEB_IP)
        );
        assert_eq!(
            d("api.service.weft", RecordType::ANY),
            Decision::Address(API_IP)
        );
    }

    #[test]
    fn trailing_dot_and_case_do_not_matter() {
        for name in [
            "api.service.weft.",
            "API.service.weft",
            "Api.Service.WEFT.",
            "api.SERVICE.weft",
        ] {
            assert_eq!(d(name, RecordType::A), Decision::Address(API_IP), "{name}");
        }
    }

    #[test]
    fn other_types_of_a_known_service_are_empty_noerror() {
        // SRV too: no instance passes.
        for t in [
            RecordType::AAAA,
            RecordType::TXT,
            RecordType::MX,
            RecordType::SRV,
        ] {
            assert_eq!(d("api.service.weft", t), Decision::NoData, "{t}");
        }
    }

    #[test]
    fn unknown_services_and_invalid_labels_are_nxdomain() {
        let long = format!("{}.service.weft", "a".repeat(64));
        for name in [
            "nope.service.weft",
            "a.b.service.weft",
            "x.api.service.weft",
            "api.service.service.weft.",
            ".service.weft",
            "-api.service.weft",
            "api-.service.weft",
            "a_b.service.weft",
            "ápi.service.weft",
            long.as_str(),
            "api.weft",
            "api.node.weft.",
            "service.service.weft.x.weft",
            "api.service.weft.weft",
            "a.b.c.weft",
        ] {
            for t in [RecordType::A, RecordType::AAAA, RecordType::ANY] {
                assert_eq!(d(name, t), Decision::NxDomain, "{name} {t}");
            }
        }
    }

    #[test]
    fn zone_apex_and_service_parent_exist_without_records() {
        for name in [
            "weft",
            "weft.",
            "WEFT",
            "service.weft",
            "Service.Weft.",
            "consul",
        ] {
            for t in [RecordType::A, RecordType::AAAA, RecordType::ANY] {
                assert_eq!(d(name, t), Decision::NoData, "{name} {t}");
            }
        }
    }

    #[test]
    fn names_outside_the_domains_are_refused() {
        for name in [
            "example.com",
            "example.com.",
            "api.service.weft.example.com",
            "api.service.weftx",
            "xweft",
            "weft.com",
            "",
            ".",
            "localhost",
        ] {
            for t in [RecordType::A, RecordType::AAAA, RecordType::ANY] {
                assert_eq!(d(name, t), Decision::Refused, "{name:?} {t}");
            }
        }
    }

    fn query_bytes(name: &str, query_type: RecordType) -> Vec<u8> {
        let mut msg = Message::query();
        msg.metadata.id = 0x4242;
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), query_type));
        msg.to_vec().unwrap()
    }

    fn parse(bytes: &[u8]) -> Message {
        Message::from_vec(bytes).unwrap()
    }

    fn answer_ips(msg: &Message) -> Vec<Ipv4Addr> {
        msg.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn respond_answers_a_with_ttl_and_echoes_the_question() {
        let reply = respond(
            &query_bytes("Api.Service.Weft.", RecordType::A),
            Transport::Udp,
            &lookup(),
        );
        let msg = parse(&reply.unwrap());
        assert_eq!(msg.metadata.id, 0x4242);
        assert_eq!(msg.metadata.message_type, MessageType::Response);
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert!(msg.metadata.authoritative);
        assert!(msg.metadata.recursion_desired);
        assert!(!msg.metadata.recursion_available);
        assert_eq!(msg.queries.len(), 1);
        assert_eq!(msg.queries[0].name.to_ascii(), "Api.Service.Weft.");
        assert_eq!(answer_ips(&msg), [API_IP]);
        assert_eq!(msg.answers[0].ttl, TTL_SECS);
        assert_eq!(msg.answers[0].name.to_ascii(), "Api.Service.Weft.");
    }

    #[test]
    fn respond_gives_empty_noerror_for_aaaa() {
        let reply = respond(
            &query_bytes("api.service.weft.", RecordType::AAAA),
            Transport::Udp,
            &lookup(),
        );
        let msg = parse(&reply.unwrap());
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert!(msg.answers.is_empty());
        assert_eq!(msg.authorities.len(), 1, "SOA for negative caching");
        assert_eq!(msg.authorities[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn respond_gives_nxdomain_with_soa_and_refused_without() {
        let nx = parse(
            &respond(
                &query_bytes("nope.service.weft.", RecordType::A),
                Transport::Tcp,
                &lookup(),
            )
            .unwrap(),
        );
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert!(nx.metadata.authoritative);
        assert_eq!(nx.authorities.len(), 1);
        assert_eq!(nx.authorities[0].ttl, TTL_SECS);
        let refused = parse(
            &respond(
                &query_bytes("example.com.", RecordType::A),
                Transport::Udp,
                &lookup(),
            )
            .unwrap(),
        );
        assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
        assert!(!refused.metadata.authoritative);
        assert!(refused.answers.is_empty() && refused.authorities.is_empty());
    }

    #[test]
    fn respond_echoes_edns() {
        let mut msg = Message::query();
        msg.add_query(Query::query(
            Name::from_ascii("api.service.weft.").unwrap(),
            RecordType::A,
        ));
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        msg.edns = Some(edns);
        let reply = parse(&respond(&msg.to_vec().unwrap(), Transport::Udp, &lookup()).unwrap());
        assert_eq!(answer_ips(&reply), [API_IP]);
        assert_eq!(reply.edns.map(|e| e.max_payload()), Some(UDP_MAX_PAYLOAD));
    }

    #[test]
    fn respond_ignores_runts_and_responses() {
        for runt in [&[][..], &[0x12], &[0u8; 11]] {
            assert_eq!(respond(runt, Transport::Udp, &lookup()), None);
        }
        let mut response = query_bytes("api.service.weft.", RecordType::A);
        response[2] |= 0x80;
        assert_eq!(respond(&response, Transport::Udp, &lookup()), None);
    }

    #[test]
    fn respond_gives_formerr_for_garbage_after_a_header() {
        let mut garbage = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        garbage.extend_from_slice(&[0xff; 20]);
        let msg = parse(&respond(&garbage, Transport::Udp, &lookup()).unwrap());
        assert_eq!(msg.metadata.id, 0xabcd);
        assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);
        // A header that promises a question and has none.
        let mut cut = query_bytes("api.service.weft.", RecordType::A);
        cut.truncate(HEADER_LEN + 3);
        let msg = parse(&respond(&cut, Transport::Tcp, &lookup()).unwrap());
        assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn respond_gives_formerr_without_exactly_one_question() {
        let mut none = Message::query();
        none.metadata.id = 7;
        let msg = parse(&respond(&none.to_vec().unwrap(), Transport::Udp, &lookup()).unwrap());
        assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);
        let mut two = Message::query();
        for n in ["api.service.weft.", "web-2.service.weft."] {
            two.add_query(Query::query(Name::from_ascii(n).unwrap(), RecordType::A));
        }
        let msg = parse(&respond(&two.to_vec().unwrap(), Transport::Udp, &lookup()).unwrap());
        assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);
        assert!(msg.answers.is_empty());
    }

    #[test]
    fn respond_gives_notimp_for_other_opcodes_and_refused_for_other_classes() {
        let mut update = Message::new(9, MessageType::Query, OpCode::Update);
        update.add_query(Query::query(
            Name::from_ascii("weft.").unwrap(),
            RecordType::SOA,
        ));
        let msg = parse(&respond(&update.to_vec().unwrap(), Transport::Udp, &lookup()).unwrap());
        assert_eq!(msg.metadata.response_code, ResponseCode::NotImp);
        let mut chaos = Query::query(
            Name::from_ascii("api.service.weft.").unwrap(),
            RecordType::A,
        );
        chaos.set_query_class(DNSClass::CH);
        let mut msg = Message::query();
        msg.add_query(chaos);
        let reply = parse(&respond(&msg.to_vec().unwrap(), Transport::Udp, &lookup()).unwrap());
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn respond_never_panics_on_arbitrary_bytes() {
        // A small deterministic generator: every length up to 64, many patterns, and
        // every single-byte corruption of a valid query.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        for len in 0..64 {
            for _ in 0..200 {
                let bytes: Vec<u8> = (0..len).map(|_| next()).collect();
                let _ = respond(&bytes, Transport::Udp, &lookup());
            }
        }
        let valid = query_bytes("api.service.weft.", RecordType::A);
        for i in 0..valid.len() {
            for v in [0x00, 0x3f, 0x40, 0xc0, 0xff] {
                let mut bytes = valid.clone();
                bytes[i] = v;
                let _ = respond(&bytes, Transport::Tcp, &lookup());
            }
        }
    }

    // --- the server over real sockets ---

    async fn start() -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let resolver: ServiceResolver = lookup();
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), resolver)
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    async fn udp_exchange(addr: SocketAddr, request: &[u8]) -> Option<Message> {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(request, addr).await.unwrap();
        let mut buf = [0u8; 2048];
        let got = tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await;
        let len = got.ok()?.unwrap();
        Some(parse(&buf[..len]))
    }

    async fn tcp_send(stream: &mut TcpStream, request: &[u8]) {
        let len = u16::try_from(request.len()).unwrap();
        stream.write_all(&len.to_be_bytes()).await.unwrap();
        stream.write_all(request).await.unwrap();
    }

    async fn tcp_recv(stream: &mut TcpStream) -> Message {
        let read = async {
            let len = stream.read_u16().await.unwrap();
            let mut buf = vec![0u8; usize::from(len)];
            stream.read_exact(&mut buf).await.unwrap();
            buf
        };
        parse(
            &tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn udp_answers_nxdomain_refused_and_formerr() {
        let (addr, stop, task) = start().await;

        let msg = udp_exchange(addr, &query_bytes("API.service.weft", RecordType::A))
            .await
            .unwrap();
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer_ips(&msg), [API_IP]);
        assert_eq!(msg.answers[0].ttl, TTL_SECS);

        let msg = udp_exchange(addr, &query_bytes("api.service.weft.", RecordType::AAAA))
            .await
            .unwrap();
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert!(msg.answers.is_empty());

        let msg = udp_exchange(addr, &query_bytes("nope.service.weft.", RecordType::A))
            .await
            .unwrap();
        assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);

        let msg = udp_exchange(addr, &query_bytes("example.com.", RecordType::A))
            .await
            .unwrap();
        assert_eq!(msg.metadata.response_code, ResponseCode::Refused);

        let mut garbage = vec![0x01, 0x02, 0x00, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0];
        garbage.extend_from_slice(b"\xff\xfe not dns at all");
        let msg = udp_exchange(addr, &garbage).await.unwrap();
        assert_eq!(msg.metadata.id, 0x0102);
        assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);

        // Runts get no reply, and the server goes on.
        assert!(udp_exchange(addr, b"hi").await.is_none());
        let msg = udp_exchange(addr, &query_bytes("web-2.service.weft.", RecordType::A))
            .await
            .unwrap();
        assert_eq!(answer_ips(&msg), [WEB_IP]);

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn tcp_answers_several_queries_on_one_connection() {
        let (addr, stop, task) = start().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();

        tcp_send(
            &mut stream,
            &query_bytes("api.service.weft.", RecordType::A),
        )
        .await;
        tcp_send(
            &mut stream,
            &query_bytes("nope.service.weft.", RecordType::A),
        )
        .await;
        let msg = tcp_recv(&mut stream).await;
        assert_eq!(answer_ips(&msg), [API_IP]);
        let msg = tcp_recv(&mut stream).await;
        assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);

        tcp_send(&mut stream, &query_bytes("example.org.", RecordType::A)).await;
        assert_eq!(
            tcp_recv(&mut stream).await.metadata.response_code,
            ResponseCode::Refused
        );

        let mut garbage = vec![0x77, 0x66, 0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        garbage.extend_from_slice(&[0xc0; 9]);
        tcp_send(&mut stream, &garbage).await;
        let msg = tcp_recv(&mut stream).await;
        assert_eq!(
            (msg.metadata.id, msg.metadata.response_code),
            (0x7766, ResponseCode::FormErr)
        );

        tcp_send(
            &mut stream,
            &query_bytes("web-2.service.weft.", RecordType::ANY),
        )
        .await;
        assert_eq!(answer_ips(&tcp_recv(&mut stream).await), [WEB_IP]);

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn broken_tcp_clients_do_not_stop_the_server() {
        let (addr, stop, task) = start().await;

        // A client that sends half a length prefix and leaves, one that promises more
        // bytes than it sends and leaves, and one sending pure garbage.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(&[0x00]).await.unwrap();
        drop(half);
        let mut short = TcpStream::connect(addr).await.unwrap();
        short.write_all(&[0x01, 0x00, 0xde, 0xad]).await.unwrap();
        drop(short);
        let mut noise = TcpStream::connect(addr).await.unwrap();
        noise.write_all(&[0xff; 300]).await.unwrap();
        drop(noise);
        // A client left open while others are served.
        let _idle = TcpStream::connect(addr).await.unwrap();

        let mut stream = TcpStream::connect(addr).await.unwrap();
        tcp_send(
            &mut stream,
            &query_bytes("api.service.weft.", RecordType::A),
        )
        .await;
        assert_eq!(answer_ips(&tcp_recv(&mut stream).await), [API_IP]);
        let msg = udp_exchange(addr, &query_bytes("api.service.weft.", RecordType::A))
            .await
            .unwrap();
        assert_eq!(answer_ips(&msg), [API_IP]);

        // Shutdown is prompt even with the idle connection open.
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
    }

    /// Idle TCP clients holding every slot do not lock out the next one:
    /// the connection idle longest is closed for it.
    #[tokio::test]
    async fn a_full_tcp_table_evicts_the_connection_idle_longest() {
        let (addr, stop, task) = start().await;
        let mut idle = Vec::new();
        for _ in 0..MAX_TCP_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Every connection has been accepted and is waiting.
        let mut probe = TcpStream::connect(addr).await.unwrap();
        tcp_send(&mut probe, &query_bytes("api.service.weft.", RecordType::A)).await;
        assert_eq!(answer_ips(&tcp_recv(&mut probe).await), [API_IP]);
        // The first idle connection was the one closed.
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf))
            .await
            .expect("the oldest idle connection was not closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    /// A client that sends queries and never reads the answers: once the
    /// sockets' buffers are full the server's write waits, and the
    /// connection is closed after TCP_IDLE_TIMEOUT, its slot freed.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_its_answers_is_closed() {
        let (addr, stop, task) = start().await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let query = query_bytes("api.service.weft.", RecordType::A);
        let mut framed = u16::try_from(query.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(&query);
        // Queries until the server stops taking them (its answers are not
        // read), or the server closes the connection. Bounded either way.
        let sent = async {
            for n in 0..1_000_000u32 {
                if writer.write_all(&framed).await.is_err() {
                    return n;
                }
            }
            u32::MAX
        };
        let sent = tokio::time::timeout(TCP_IDLE_TIMEOUT * 3, sent).await;
        // The writes stopped because the server closed the connection; the
        // paused clock went past the server's limit while they waited.
        assert!(matches!(sent, Ok(n) if n < u32::MAX), "{sent:?}");
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "the server kept the connection"
        );
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn bind_reports_a_taken_address() {
        let (addr, stop, task) = start().await;
        let resolver: ServiceResolver = lookup();
        let err = DnsServer::bind(addr, resolver).await.unwrap_err();
        assert!(
            matches!(
                err,
                DnsError::Bind {
                    transport: Transport::Udp,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        stop.send(()).unwrap();
        task.await.unwrap();
    }
}
