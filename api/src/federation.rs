//! The datacenters of a federation, as their servers know each other: each
//! datacenter's name and its mesh gateways' WAN addresses. The primary
//! datacenter collects every datacenter's state and hands all of them back
//! to each secondary; the gateways route by them. Pure: validation and
//! conversions.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::names::validate_name;
use crate::proto;

/// Gateways one datacenter may list.
pub const MAX_GATEWAYS: usize = 64;
/// Datacenters one federation may hold.
pub const MAX_DATACENTERS: usize = 256;
/// Instances of another datacenter a datacenter keeps.
pub const MAX_REMOTE_INSTANCES: usize = 20_000;
/// Services of another datacenter a datacenter keeps (each takes a virtual
/// IP here, given back once that datacenter no longer lists it).
pub const MAX_REMOTE_SERVICES: usize = 2_000;
/// Virtual IPs a datacenter gives another datacenter's services at once:
/// a service that leaves keeps its address for the servers'
/// `--vip-release-after` (clients may still hold it), so without a bound
/// another datacenter whose service names come and go (a compromised server
/// there, or a tenant renaming services) would take more and more of this
/// datacenter's range. Past it, a new service of that datacenter gets no
/// virtual IP here until others are given back and its listing next
/// changes.
pub const MAX_REMOTE_VIPS: usize = 2 * MAX_REMOTE_SERVICES;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationState {
    pub datacenter: String,
    /// WAN addresses of its passing gateways, sorted.
    pub gateways: Vec<SocketAddr>,
    /// When its leader reported it (unix ms).
    pub updated_ms: i64,
}

/// Whether another datacenter's gateways may be sent to `addr`: a port,
/// and an IP that is not unspecified, loopback, link-local, multicast or
/// broadcast (a gateway told to dial itself or the host it runs on would
/// loop or expose it). An IPv4-mapped IPv6 address is judged as the IPv4
/// one (`[::ffff:127.0.0.1]` is loopback).
pub fn advertisable(addr: &SocketAddr) -> bool {
    let ip = addr.ip().to_canonical();
    let odd = match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    addr.port() != 0 && !ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast() && !odd
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FederationError {
    #[error("datacenter {0:?}: {1}")]
    Datacenter(String, crate::names::NameError),
    #[error("datacenter {dc}: gateway {addr:?} is not an IP:PORT address")]
    Address { dc: String, addr: String },
    #[error("datacenter {dc}: {count} gateways, at most {MAX_GATEWAYS}")]
    TooMany { dc: String, count: usize },
}

impl FederationState {
    /// Reads and checks a state from the wire.
    pub fn from_proto(p: &proto::FederationState) -> Result<Self, FederationError> {
        validate_name(&p.datacenter)
            .map_err(|e| FederationError::Datacenter(p.datacenter.clone(), e))?;
        if p.gateways.len() > MAX_GATEWAYS {
            return Err(FederationError::TooMany {
                dc: p.datacenter.clone(),
                count: p.gateways.len(),
            });
        }
        let mut gateways = p
            .gateways
            .iter()
            .map(|a| {
                // Kept in canonical form, so that a mapped address compares
                // equal to the IPv4 one (the gateways' loop check).
                a.parse::<SocketAddr>()
                    .ok()
                    .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                    .filter(advertisable)
                    .ok_or_else(|| FederationError::Address {
                        dc: p.datacenter.clone(),
                        addr: a.clone(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        gateways.sort();
        gateways.dedup();
        Ok(FederationState {
            datacenter: p.datacenter.clone(),
            gateways,
            updated_ms: p.updated_ms,
        })
    }

    pub fn to_proto(&self) -> proto::FederationState {
        proto::FederationState {
            datacenter: self.datacenter.clone(),
            gateways: self.gateways.iter().map(|a| a.to_string()).collect(),
            updated_ms: self.updated_ms,
        }
    }

    /// Whether `other` says the same (its time aside).
    pub fn same_gateways(&self, other: &FederationState) -> bool {
        self.datacenter == other.datacenter && self.gateways == other.gateways
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(dc: &str, gateways: &[&str]) -> proto::FederationState {
        proto::FederationState {
            datacenter: dc.into(),
            gateways: gateways.iter().map(|g| g.to_string()).collect(),
            updated_ms: 5,
        }
    }

    #[test]
    fn states_are_checked_sorted_and_round_trip() {
        let s = FederationState::from_proto(&p(
            "dc2",
            &["10.0.0.2:8443", "10.0.0.1:8443", "10.0.0.2:8443"],
        ))
        .unwrap();
        assert_eq!(
            s.gateways,
            vec![
                "10.0.0.1:8443".parse().unwrap(),
                "10.0.0.2:8443".parse().unwrap()
            ]
        );
        assert_eq!(FederationState::from_proto(&s.to_proto()).unwrap(), s);
    }

    #[test]
    fn bad_states_are_refused_by_name() {
        assert!(matches!(
            FederationState::from_proto(&p("DC2", &[])),
            Err(FederationError::Datacenter(..))
        ));
        for bad in [
            "x",
            "0.0.0.0:8443",
            "10.0.0.1:0",
            "10.0.0.1",
            "127.0.0.1:8443",
            "169.254.1.1:8443",
            "224.0.0.1:8443",
            "[::1]:8443",
            "[fe80::1]:8443",
            "[::ffff:127.0.0.1]:15020",
            "[::ffff:169.254.169.254]:80",
            "[::ffff:0.0.0.0]:8443",
        ] {
            assert!(
                matches!(
                    FederationState::from_proto(&p("dc2", &[bad])),
                    Err(FederationError::Address { .. })
                ),
                "{bad}"
            );
        }
        // A mapped address that is fine is kept as the IPv4 one.
        let mapped = FederationState::from_proto(&p("dc2", &["[::ffff:10.0.0.7]:8443"])).unwrap();
        assert_eq!(
            mapped.gateways,
            ["10.0.0.7:8443".parse::<SocketAddr>().unwrap()]
        );
        let many: Vec<String> = (0..65).map(|i| format!("10.0.1.{i}:8443")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            FederationState::from_proto(&p("dc2", &many)),
            Err(FederationError::TooMany { .. })
        ));
    }
}
