//! Recursion: names outside the mesh's domains, asked with "recursion
//! desired", go to the configured `recursors` (Consul's option of the same
//! name), so that the agent can be a workload's only resolver.
//!
//! - Only names outside the domains are forwarded: a mesh name, known or
//!   not, never leaves the agent.
//! - Recursors are tried in order, each for at most [`TIMEOUT`]; a UDP
//!   request goes out over UDP, a TCP one over TCP. The first valid answer
//!   is relayed; none gives SERVFAIL.
//! - Each forwarded query gets a fresh random id on a socket connected to
//!   the recursor alone; an answer is taken only with that id and the same
//!   question, so no one else can answer for the recursor.
//! - At most [`MAX_IN_FLIGHT`] queries are forwarded at once; beyond that
//!   the answer is SERVFAIL at once, so a flood cannot exhaust the agent.
//!
//! Which requests go out is decided with the answer itself
//! ([`super::respond_or_forward`], pure); [`Recursors::forward`] does the
//! I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::{encode, Transport, UDP_MAX_PAYLOAD, UDP_MIN_PAYLOAD};

/// How long one recursor gets to answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Queries forwarded at once, at most.
pub const MAX_IN_FLIGHT: usize = 256;
/// Most recursors a configuration may name.
pub const MAX_RECURSORS: usize = 8;
/// Largest answer read from a recursor over UDP.
const UDP_ANSWER_BUF: usize = 4096;

/// The recursors and the bound on queries in flight.
#[derive(Debug, Clone)]
pub struct Recursors {
    addrs: Arc<[SocketAddr]>,
    in_flight: Arc<Semaphore>,
}

impl Recursors {
    pub fn new(addrs: Vec<SocketAddr>) -> Recursors {
        Recursors {
            addrs: addrs.into(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The answer to `request` from the first recursor that gives one, its
    /// id put back; SERVFAIL when none does or too many are in flight.
    pub async fn forward(&self, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            tracing::debug!("dns: too many queries forwarded at once");
            return servfail(request, transport);
        };
        let original = Message::from_vec(request).ok()?;
        for addr in self.addrs.iter() {
            let id: u16 = rand::random();
            let mut ours = request.to_vec();
            ours[..2].copy_from_slice(&id.to_be_bytes());
            let fits = |answer: &[u8]| matching(answer, id, &original);
            let asked = match transport {
                Transport::Udp => tokio::time::timeout(TIMEOUT, over_udp(*addr, &ours, fits)).await,
                Transport::Tcp => tokio::time::timeout(TIMEOUT, over_tcp(*addr, &ours)).await,
            };
            let answer = match asked {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    tracing::debug!(recursor = %addr, error = %e, "dns: recursor failed");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(recursor = %addr, "dns: recursor timed out");
                    continue;
                }
            };
            if matching(&answer, id, &original) {
                if transport == Transport::Udp && answer.len() > udp_limit(&original) {
                    // Larger than the client takes (or than this agent
                    // sends over UDP at all): TC, and the client asks
                    // again over TCP. No amplification through the agent.
                    return truncated(&original);
                }
                let mut relayed = answer;
                relayed[..2].copy_from_slice(&original.metadata.id.to_be_bytes());
                return Some(relayed);
            }
            tracing::debug!(recursor = %addr, "dns: recursor's answer does not match the question");
        }
        servfail(request, transport)
    }
}

/// Whether `answer` is the answer to our query `ours` of `original`'s
/// question.
fn matching(answer: &[u8], ours: u16, original: &Message) -> bool {
    Message::from_vec(answer).is_ok_and(|parsed| {
        parsed.metadata.id == ours
            && parsed.metadata.message_type == MessageType::Response
            && parsed.queries == original.queries
    })
}

/// The largest UDP answer `request`'s client takes from this agent: 512
/// bytes, or what its EDNS offers up to [`UDP_MAX_PAYLOAD`].
fn udp_limit(request: &Message) -> usize {
    request.edns.as_ref().map_or(UDP_MIN_PAYLOAD, |e| {
        usize::from(
            e.max_payload()
                .clamp(UDP_MIN_PAYLOAD as u16, UDP_MAX_PAYLOAD),
        )
    })
}

/// An empty answer with TC set, for a client to ask again over TCP.
fn truncated(original: &Message) -> Option<Vec<u8>> {
    let mut response = Message::response(original.metadata.id, original.metadata.op_code);
    response.metadata.recursion_desired = original.metadata.recursion_desired;
    response.metadata.truncation = true;
    for q in &original.queries {
        response.add_query(q.clone());
    }
    response.to_vec().ok()
}

/// SERVFAIL for `request`, with its question.
fn servfail(request: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let original = Message::from_vec(request).ok()?;
    let mut response = Message::response(original.metadata.id, original.metadata.op_code);
    response.metadata.recursion_desired = original.metadata.recursion_desired;
    response.metadata.response_code = ResponseCode::ServFail;
    for q in original.queries {
        response.add_query(q);
    }
    encode(response, transport)
}

/// Sends `request` to `addr` and waits for a datagram that `fits` (others,
/// e.g. a spoofer's guess, are dropped).
async fn over_udp(
    addr: SocketAddr,
    request: &[u8],
    fits: impl Fn(&[u8]) -> bool,
) -> std::io::Result<Vec<u8>> {
    let local: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((local, 0)).await?;
    // Connected: datagrams from any other address are dropped.
    socket.connect(addr).await?;
    socket.send(request).await?;
    let mut buf = vec![0u8; UDP_ANSWER_BUF];
    loop {
        let len = socket.recv(&mut buf).await?;
        if fits(&buf[..len]) {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

async fn over_tcp(addr: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let len = u16::try_from(request.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "request too long"))?;
    let mut framed = Vec::with_capacity(request.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(request);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await?;
    let mut answer = vec![0u8; usize::from(len)];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn query(name: &str, rd: bool) -> Vec<u8> {
        let mut msg = Message::query();
        msg.metadata.id = 4242;
        msg.metadata.recursion_desired = rd;
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        msg.to_vec().unwrap()
    }

    #[test]
    fn only_names_outside_the_domains_with_recursion_desired_go_out() {
        use super::super::{respond_or_forward, Outcome, Resolver};
        let decide = |r: &Resolver, q: &[u8]| respond_or_forward(q, Transport::Udp, r);
        let mut r = super::super::tests::lookup();
        // Without recursors, nothing goes out.
        assert!(matches!(
            decide(&r, &query("example.org.", true)),
            Outcome::Reply(_)
        ));
        r.recursors = Recursors::new(vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(decide(&r, &query("example.org.", true)), Outcome::Forward);
        assert!(matches!(
            decide(&r, &query("example.org.", false)),
            Outcome::Reply(_)
        ));
        for mesh in [
            "api.service.weft.",
            "nothing.service.weft.",
            "weft.",
            "x.consul.",
        ] {
            assert!(
                matches!(decide(&r, &query(mesh, true)), Outcome::Reply(_)),
                "{mesh}"
            );
        }
        assert_eq!(decide(&r, b"short"), Outcome::NoReply);
        let mut response = query("example.org.", true);
        response[2] |= 0x80;
        assert_eq!(decide(&r, &response), Outcome::NoReply);
    }

    /// A recursor on loopback that answers each query with `reply(request)`
    /// (none: silence); returns its address.
    async fn fake_recursor(reply: fn(&Message) -> Option<Message>) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
                let request = Message::from_vec(&buf[..len]).unwrap();
                if let Some(answer) = reply(&request) {
                    let _ = socket.send_to(&answer.to_vec().unwrap(), peer).await;
                }
            }
        });
        addr
    }

    fn answer_with(ip: Ipv4Addr) -> impl Fn(&Message) -> Option<Message> {
        move |request: &Message| {
            let mut answer = Message::response(request.metadata.id, request.metadata.op_code);
            answer.add_query(request.queries[0].clone());
            answer.add_answer(Record::from_rdata(
                request.queries[0].name.clone(),
                60,
                RData::A(A(ip)),
            ));
            Some(answer)
        }
    }

    fn answers(bytes: &[u8]) -> (u16, ResponseCode, Vec<RData>) {
        let m = Message::from_vec(bytes).unwrap();
        (
            m.metadata.id,
            m.metadata.response_code,
            m.answers.iter().map(|r| r.data.clone()).collect(),
        )
    }

    #[tokio::test]
    async fn the_first_recursor_that_answers_is_relayed_with_the_clients_id() {
        let silent = fake_recursor(|_| None).await;
        let good = fake_recursor(|r| answer_with(Ipv4Addr::new(192, 0, 2, 7))(r)).await;
        let recursors = Recursors::new(vec![silent, good]);
        let reply = recursors
            .forward(&query("example.org.", true), Transport::Udp)
            .await
            .unwrap();
        assert_eq!(
            answers(&reply),
            (
                4242,
                ResponseCode::NoError,
                vec![RData::A(A(Ipv4Addr::new(192, 0, 2, 7)))]
            )
        );
    }

    #[tokio::test]
    async fn a_udp_answer_larger_than_the_client_takes_comes_back_truncated() {
        // 60 A records: about 1 KiB, over the 512 bytes of a client
        // without EDNS.
        let big = fake_recursor(|r| {
            let mut a = answer_with(Ipv4Addr::new(192, 0, 2, 1))(r)?;
            for i in 0..60 {
                a.add_answer(Record::from_rdata(
                    r.queries[0].name.clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, i))),
                ));
            }
            Some(a)
        })
        .await;
        let recursors = Recursors::new(vec![big]);
        let reply = recursors
            .forward(&query("example.org.", true), Transport::Udp)
            .await
            .unwrap();
        let m = Message::from_vec(&reply).unwrap();
        assert!(m.metadata.truncation && m.answers.is_empty() && reply.len() <= 512);
        assert_eq!(m.metadata.id, 4242);
    }

    #[tokio::test]
    async fn answers_with_another_id_or_question_are_not_taken() {
        let wrong_id = fake_recursor(|r| {
            let mut a = answer_with(Ipv4Addr::new(192, 0, 2, 66))(r)?;
            a.metadata.id = r.metadata.id.wrapping_add(1);
            Some(a)
        })
        .await;
        let wrong_question = fake_recursor(|r| {
            let mut a = answer_with(Ipv4Addr::new(192, 0, 2, 66))(r)?;
            a.queries[0] = Query::query(Name::from_ascii("evil.example.").unwrap(), RecordType::A);
            Some(a)
        })
        .await;
        let recursors = Recursors::new(vec![wrong_id, wrong_question]);
        let reply = recursors
            .forward(&query("example.org.", true), Transport::Udp)
            .await
            .unwrap();
        assert_eq!(answers(&reply), (4242, ResponseCode::ServFail, vec![]));
    }
}
