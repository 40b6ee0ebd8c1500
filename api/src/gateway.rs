//! The server names (SNI) mesh gateways route on, and the decision of where
//! a connection with one goes. Pure: no I/O.
//!
//! A TLS client that reaches another datacenter through gateways names its
//! destination in SNI, and the gateways forward the bytes without
//! terminating TLS:
//! - `<node>.<dc>.node.<trust-domain>`: the HBONE port of agent `<node>` in
//!   datacenter `<dc>` (the SPIFFE id the client then checks is that node's);
//! - `server.<dc>.weft`: the servers of `<dc>`, the name their TLS
//!   certificates carry.
//!
//! A gateway sends a name of its own datacenter to the node or the servers,
//! one of another datacenter to that datacenter's gateways, and refuses
//! everything else: names it cannot read, other trust domains, nodes it
//! does not know.

use crate::names::validate_name;

/// The name suffix of the servers' TLS certificates (`server.<dc>.weft`).
pub const SERVER_SUFFIX: &str = "weft";

/// The service name mesh gateways register under (Consul's default).
pub const SERVICE: &str = "mesh-gateway";

/// The instance meta key holding a gateway's WAN address (`ip:port`).
pub const WAN_META: &str = "wan-address";

/// What an SNI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The agent of `node` in datacenter `dc`.
    Node { node: String, dc: String },
    /// The servers of datacenter `dc`.
    Servers { dc: String },
}

impl Destination {
    pub fn datacenter(&self) -> &str {
        match self {
            Destination::Node { dc, .. } | Destination::Servers { dc } => dc,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("no server name: a gateway routes on it")]
    Missing,
    #[error("server name {0:?} names neither a node nor servers of this mesh")]
    Unknown(String),
    #[error("server name {name:?}: {what}: {error}")]
    BadLabel {
        name: String,
        what: &'static str,
        error: crate::names::NameError,
    },
}

/// The SNI for node `node` of datacenter `dc` in `trust_domain`.
pub fn node_sni(node: &str, dc: &str, trust_domain: &str) -> String {
    format!("{node}.{dc}.node.{trust_domain}")
}

/// The SNI (and certificate name) of datacenter `dc`'s servers.
pub fn server_sni(dc: &str) -> String {
    format!("server.{dc}.{SERVER_SUFFIX}")
}

/// Reads an SNI of this mesh (`trust_domain`, lowercase as SPIFFE ids are).
pub fn parse_sni(sni: Option<&str>, trust_domain: &str) -> Result<Destination, SniError> {
    let name = sni.ok_or(SniError::Missing)?;
    let unknown = || SniError::Unknown(name.to_string());
    let label = |what, l: &str| {
        validate_name(l).map_err(|error| SniError::BadLabel {
            name: name.to_string(),
            what,
            error,
        })
    };
    if let Some(rest) = name
        .strip_suffix(trust_domain)
        .and_then(|r| r.strip_suffix(".node."))
    {
        let (node, dc) = rest.split_once('.').ok_or_else(unknown)?;
        label("node", node)?;
        label("datacenter", dc)?;
        return Ok(Destination::Node {
            node: node.to_string(),
            dc: dc.to_string(),
        });
    }
    if let Some(dc) = name
        .strip_prefix("server.")
        .and_then(|r| r.strip_suffix(SERVER_SUFFIX))
        .and_then(|r| r.strip_suffix('.'))
    {
        label("datacenter", dc)?;
        return Ok(Destination::Servers { dc: dc.to_string() });
    }
    Err(unknown())
}

/// Where a gateway of datacenter `local_dc` sends a connection for `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// To the HBONE port of this local node.
    LocalNode(String),
    /// To this datacenter's servers.
    LocalServers,
    /// To a gateway of datacenter `dc`.
    RemoteGateway(String),
}

/// The hop for `to` at a gateway of `local_dc`.
pub fn hop(to: &Destination, local_dc: &str) -> Hop {
    match to {
        Destination::Node { node, dc } if dc == local_dc => Hop::LocalNode(node.clone()),
        Destination::Servers { dc } if dc == local_dc => Hop::LocalServers,
        other => Hop::RemoteGateway(other.datacenter().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "c0ffee.weft";

    #[test]
    fn names_round_trip() {
        let sni = node_sni("node-b", "dc2", TD);
        assert_eq!(sni, "node-b.dc2.node.c0ffee.weft");
        assert_eq!(
            parse_sni(Some(&sni), TD),
            Ok(Destination::Node {
                node: "node-b".into(),
                dc: "dc2".into()
            })
        );
        assert_eq!(
            parse_sni(Some(&server_sni("dc1")), TD),
            Ok(Destination::Servers { dc: "dc1".into() })
        );
    }

    #[test]
    fn hops_by_datacenter() {
        let node = |dc: &str| Destination::Node {
            node: "n1".into(),
            dc: dc.into(),
        };
        assert_eq!(hop(&node("dc1"), "dc1"), Hop::LocalNode("n1".into()));
        assert_eq!(hop(&node("dc2"), "dc1"), Hop::RemoteGateway("dc2".into()));
        let servers = |dc: &str| Destination::Servers { dc: dc.into() };
        assert_eq!(hop(&servers("dc1"), "dc1"), Hop::LocalServers);
        assert_eq!(
            hop(&servers("dc3"), "dc1"),
            Hop::RemoteGateway("dc3".into())
        );
    }

    #[test]
    fn other_names_are_refused() {
        assert_eq!(parse_sni(None, TD), Err(SniError::Missing));
        for name in [
            "example.com",
            "node-b.dc1.node.other.weft",
            "node-b.node.c0ffee.weft",
            "server.weft",
            "servers.dc1.weft",
            "x.server.dc1.weft",
            "node.c0ffee.weft",
        ] {
            assert!(
                matches!(parse_sni(Some(name), TD), Err(SniError::Unknown(_))),
                "{name}: {:?}",
                parse_sni(Some(name), TD)
            );
        }
        // A dot inside would make a label of two; bad labels are named.
        for name in [
            "a.b.dc1.node.c0ffee.weft",
            "-n.dc1.node.c0ffee.weft",
            "server..weft",
            "server.d_c.weft",
        ] {
            assert!(
                matches!(parse_sni(Some(name), TD), Err(SniError::BadLabel { .. })),
                "{name}: {:?}",
                parse_sni(Some(name), TD)
            );
        }
    }
}
