//! Virtual IPs for services: IPv4 CIDR parsing and a pure allocator that picks the
//! first free host address of a block (by default `240.0.0.0/4`) at or after a
//! cursor, so that an address given back is given again only once the block
//! has none other.
//!
//! The network address and the broadcast address of the block are never handed out,
//! so a `/31` or `/32` block has no usable addresses.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The block service VIPs come from unless configured otherwise.
pub const DEFAULT_VIP_CIDR: &str = "240.0.0.0/4";

/// An IPv4 block such as `240.0.0.0/4`. Host bits are always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// What is wrong with a CIDR string, or why no VIP could be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error("invalid CIDR {text:?}: expected ADDRESS/PREFIX, e.g. 240.0.0.0/4")]
    MissingPrefix { text: String },
    #[error("invalid CIDR {text:?}: {address:?} is not an IPv4 address")]
    BadAddress { text: String, address: String },
    #[error("invalid CIDR {text:?}: prefix length {prefix:?} is not a number from 0 to 32")]
    BadPrefix { text: String, prefix: String },
    #[error("invalid CIDR {text:?}: host bits are set (did you mean {suggestion}?)")]
    HostBitsSet { text: String, suggestion: String },
    #[error("no free virtual IP left in {cidr} ({in_use} in use)")]
    Exhausted { cidr: Cidr, in_use: usize },
}

impl Cidr {
    /// Builds a block; fails when host bits of `network` are set or `prefix_len > 32`.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, VipError> {
        format!("{network}/{prefix_len}").parse()
    }

    /// The default VIP block, `240.0.0.0/4`.
    pub fn default_vip() -> Self {
        Self {
            network: Ipv4Addr::new(240, 0, 0, 0),
            prefix_len: 4,
        }
    }

    /// The network (first) address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length, 0 to 32.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    /// The broadcast (last) address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// Whether `ip` is inside the block.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Whether `ip` is one of the block's host addresses (neither its
    /// network nor its broadcast address): one a service may be given.
    pub fn contains_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.broadcast()
    }

    /// How many addresses can be allocated (all but network and broadcast).
    pub fn usable_hosts(&self) -> u64 {
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        size.saturating_sub(2)
    }
}

impl Default for Cidr {
    fn default() -> Self {
        Self::default_vip()
    }
}

impl FromStr for Cidr {
    type Err = VipError;

    fn from_str(text: &str) -> Result<Self, VipError> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| VipError::MissingPrefix {
                text: text.to_string(),
            })?;
        let network: Ipv4Addr = address.parse().map_err(|_| VipError::BadAddress {
            text: text.to_string(),
            address: address.to_string(),
        })?;
        let prefix_len: u8 = match prefix.parse::<u8>() {
            Ok(p) if p <= 32 && prefix.chars().all(|c| c.is_ascii_digit()) => p,
            _ => {
                return Err(VipError::BadPrefix {
                    text: text.to_string(),
                    prefix: prefix.to_string(),
                })
            }
        };
        let cidr = Cidr {
            network,
            prefix_len,
        };
        let masked = Ipv4Addr::from(u32::from(network) & cidr.mask());
        if masked != network {
            return Err(VipError::HostBitsSet {
                text: text.to_string(),
                suggestion: format!("{masked}/{prefix_len}"),
            });
        }
        Ok(cidr)
    }
}

impl TryFrom<String> for Cidr {
    type Error = VipError;
    fn try_from(text: String) -> Result<Self, VipError> {
        text.parse()
    }
}

impl From<Cidr> for String {
    fn from(cidr: Cidr) -> String {
        cidr.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// The lowest address of `cidr` that is neither the network nor the broadcast
/// address and is not in `in_use`. Addresses in `in_use` outside the block are
/// ignored.
pub fn next_free_vip(cidr: &Cidr, in_use: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, VipError> {
    next_free_vip_from(cidr, in_use, None)
}

/// The first address of `cidr` at or after `from` that is neither the
/// network nor the broadcast address and is not in `in_use`, wrapping round
/// to the block's first host address; from the first host address when
/// `from` is None or outside the block. Addresses in `in_use` outside the
/// block are ignored.
pub fn next_free_vip_from(
    cidr: &Cidr,
    in_use: &BTreeSet<Ipv4Addr>,
    from: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, VipError> {
    let exhausted = || VipError::Exhausted {
        cidr: *cidr,
        in_use: in_use.iter().filter(|ip| cidr.contains(**ip)).count(),
    };
    if cidr.usable_hosts() == 0 {
        return Err(exhausted());
    }
    let first = u32::from(cidr.network) + 1;
    let last = u32::from(cidr.broadcast()) - 1;
    let start = from
        .map(u32::from)
        .filter(|f| (first..=last).contains(f))
        .unwrap_or(first);
    first_free(in_use, start, last)
        .or_else(|| first_free(in_use, first, start.checked_sub(1)?))
        .map(Ipv4Addr::from)
        .ok_or_else(exhausted)
}

/// The lowest address from `lo` to `hi` (inclusive) not in `in_use`.
fn first_free(in_use: &BTreeSet<Ipv4Addr>, lo: u32, hi: u32) -> Option<u32> {
    if lo > hi {
        return None;
    }
    let mut candidate = lo;
    for used in in_use.range(Ipv4Addr::from(lo)..=Ipv4Addr::from(hi)) {
        let used = u32::from(*used);
        if used > candidate {
            break;
        }
        // used == candidate: the set is sorted, so the next candidate is used + 1.
        if used == hi {
            return None;
        }
        candidate = used + 1;
    }
    Some(candidate)
}

/// The virtual-IP key of `service` in another datacenter `dc`:
/// `service.dc`. No service name has a dot, so it never meets a local
/// service's key.
pub fn remote_key(service: &str, dc: &str) -> String {
    format!("{service}.{dc}")
}

/// A virtual-IP key as (service, its datacenter when another's).
pub fn split_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once('.') {
        Some((service, dc)) => (service, Some(dc)),
        None => (key, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_displays() {
        let c: Cidr = "240.0.0.0/4".parse().unwrap();
        assert_eq!(c, Cidr::default());
        assert_eq!(c.to_string(), "240.0.0.0/4");
        assert_eq!(c.broadcast(), ip("255.255.255.255"));
        assert!(c.contains(ip("240.0.0.1")));
        assert!(c.contains(ip("255.1.2.3")));
        assert!(!c.contains(ip("239.255.255.255")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        assert_eq!(
            Cidr::new(ip("10.0.0.0"), 8).unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"240.0.0.0/4\"");
        let back: Cidr = serde_json::from_str("\"10.1.0.0/16\"").unwrap();
        assert_eq!(back.prefix_len(), 16);
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        assert!(matches!(
            "240.0.0.0".parse::<Cidr>(),
            Err(VipError::MissingPrefix { .. })
        ));
        let err = "240.0.0/4".parse::<Cidr>().unwrap_err();
        assert!(matches!(&err, VipError::BadAddress { address, .. } if address == "240.0.0"));
        assert!(err.to_string().contains("is not an IPv4 address"));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(VipError::BadPrefix { .. })),
                "{bad}"
            );
        }
        let err = "240.0.0.1/4".parse::<Cidr>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid CIDR \"240.0.0.1/4\": host bits are set (did you mean 240.0.0.0/4?)"
        );
        assert!(serde_json::from_str::<Cidr>("\"nope\"").is_err());
    }

    #[test]
    fn allocates_lowest_free_skipping_network() {
        let c: Cidr = "240.0.0.0/4".parse().unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(next_free_vip(&c, &used), Ok(ip("240.0.0.1")));
        used.insert(ip("240.0.0.1"));
        used.insert(ip("240.0.0.2"));
        used.insert(ip("240.0.0.4"));
        assert_eq!(next_free_vip(&c, &used), Ok(ip("240.0.0.3")));
        used.insert(ip("240.0.0.3"));
        assert_eq!(next_free_vip(&c, &used), Ok(ip("240.0.0.5")));
        // Addresses outside the block do not matter.
        used.insert(ip("10.0.0.1"));
        assert_eq!(next_free_vip(&c, &used), Ok(ip("240.0.0.5")));
    }

    #[test]
    fn allocates_from_the_cursor_and_wraps_round() {
        let c: Cidr = "10.0.0.0/29".parse().unwrap(); // hosts .1 to .6
        let mut used: BTreeSet<Ipv4Addr> = [ip("10.0.0.1"), ip("10.0.0.4")].into();
        // From the cursor on, skipping what is in use.
        assert_eq!(
            next_free_vip_from(&c, &used, Some(ip("10.0.0.4"))),
            Ok(ip("10.0.0.5"))
        );
        assert_eq!(
            next_free_vip_from(&c, &used, Some(ip("10.0.0.2"))),
            Ok(ip("10.0.0.2"))
        );
        // Past the block's last host: round to its first free one.
        used.extend([ip("10.0.0.5"), ip("10.0.0.6")]);
        assert_eq!(
            next_free_vip_from(&c, &used, Some(ip("10.0.0.5"))),
            Ok(ip("10.0.0.2"))
        );
        // A cursor outside the block, or the network or broadcast address,
        // starts at the first host.
        for from in [ip("10.0.1.0"), ip("10.0.0.0"), ip("10.0.0.7")] {
            assert_eq!(
                next_free_vip_from(&c, &used, Some(from)),
                Ok(ip("10.0.0.2"))
            );
        }
        used.extend([ip("10.0.0.2"), ip("10.0.0.3")]);
        for from in [None, Some(ip("10.0.0.1")), Some(ip("10.0.0.6"))] {
            assert_eq!(
                next_free_vip_from(&c, &used, from),
                Err(VipError::Exhausted { cidr: c, in_use: 6 })
            );
        }
        // The whole default block, from its very last host.
        let d = Cidr::default_vip();
        assert_eq!(
            next_free_vip_from(&d, &BTreeSet::new(), Some(ip("255.255.255.254"))),
            Ok(ip("255.255.255.254"))
        );
        let last: BTreeSet<Ipv4Addr> = [ip("255.255.255.254")].into();
        assert_eq!(
            next_free_vip_from(&d, &last, Some(ip("255.255.255.254"))),
            Ok(ip("240.0.0.1"))
        );
    }

    #[test]
    fn crosses_octet_boundaries() {
        let c: Cidr = "10.0.0.0/23".parse().unwrap();
        let used: BTreeSet<Ipv4Addr> = (1..=255).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        // 10.0.0.255 is a valid host in a /23.
        assert_eq!(next_free_vip(&c, &used), Ok(ip("10.0.1.0")));
    }

    #[test]
    fn exhausts_and_never_returns_broadcast() {
        let c: Cidr = "10.0.0.0/30".parse().unwrap();
        assert_eq!(c.usable_hosts(), 2);
        let mut used = BTreeSet::new();
        assert_eq!(next_free_vip(&c, &used), Ok(ip("10.0.0.1")));
        used.insert(ip("10.0.0.1"));
        assert_eq!(next_free_vip(&c, &used), Ok(ip("10.0.0.2")));
        used.insert(ip("10.0.0.2"));
        let err = next_free_vip(&c, &used).unwrap_err();
        assert_eq!(err, VipError::Exhausted { cidr: c, in_use: 2 });
        assert_eq!(
            err.to_string(),
            "no free virtual IP left in 10.0.0.0/30 (2 in use)"
        );
        // The broadcast address being "in use" changes nothing.
        used.insert(ip("10.0.0.3"));
        assert!(next_free_vip(&c, &used).is_err());
    }

    #[test]
    fn host_addresses_are_inside_but_not_the_ends() {
        let c: Cidr = "10.0.0.0/30".parse().unwrap();
        assert!(c.contains_host(ip("10.0.0.1")) && c.contains_host(ip("10.0.0.2")));
        for not in ["10.0.0.0", "10.0.0.3", "10.0.0.4"] {
            assert!(!c.contains_host(ip(not)), "{not}");
        }
    }

    #[test]
    fn tiny_blocks_have_no_hosts() {
        for text in ["10.0.0.0/31", "10.0.0.7/32"] {
            let c: Cidr = text.parse().unwrap();
            assert_eq!(c.usable_hosts(), 0);
            assert!(matches!(
                next_free_vip(&c, &BTreeSet::new()),
                Err(VipError::Exhausted { .. })
            ));
        }
    }

    #[test]
    fn used_network_address_is_ignored() {
        let c: Cidr = "10.0.0.0/29".parse().unwrap();
        let used: BTreeSet<Ipv4Addr> = [ip("10.0.0.0")].into();
        assert_eq!(next_free_vip(&c, &used), Ok(ip("10.0.0.1")));
    }
}
