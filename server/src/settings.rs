//! Server settings: command-line flags, optionally from a TOML file
//! (`--config server.toml`, same names with underscores); flags win.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

#[derive(Parser, Debug, Clone)]
#[command(name = "weft-server", version, about = "weft's control-plane server")]
pub struct Args {
    /// One server with its data in a temporary directory and the default
    /// intention `allow`, for trying weft out. TLS and ACLs are on: the
    /// certificates and the management token are made at start and printed
    /// as `export` lines.
    #[arg(long)]
    pub dev: bool,
    /// This server's datacenter; its TLS certificate must name
    /// `server.<datacenter>.weft`.
    #[arg(long)]
    pub datacenter: Option<String>,
    /// PEM file of the CA that signed the servers' TLS certificates.
    #[arg(long)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of this server's TLS certificate (`weft tls cert create --server`).
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file of this server's TLS private key.
    #[arg(long)]
    pub tls_key_file: Option<PathBuf>,
    /// This server's id (unique in the cluster, > 0).
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Where the Raft log, vote and snapshots are kept.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address for Raft traffic between servers.
    #[arg(long)]
    pub raft_addr: Option<SocketAddr>,
    /// Address of the gRPC API (agents, CLI).
    #[arg(long)]
    pub grpc_addr: Option<SocketAddr>,
    /// Address of the HTTP endpoint (health).
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// A cluster member as ID=HOST:PORT (its Raft address); repeat for each.
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<(u64, SocketAddr)>,
    /// What happens when no intention matches.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub default_intention: Option<String>,
    /// How to log to stderr: `text` (colours only on a terminal) or `json`
    /// (one object per line).
    #[arg(long, default_value = "text")]
    pub log_format: weft_api::logging::LogFormat,
    /// Build a Raft snapshot after this many log entries (default 16384).
    #[arg(long)]
    pub snapshot_threshold: Option<u64>,
    /// Log entries kept behind a snapshot (default 10240), so that a
    /// follower that fell this far behind catches up from the log rather
    /// than through a whole snapshot.
    #[arg(long)]
    pub raft_trailing_logs: Option<u64>,
    /// The range virtual IPs come from.
    #[arg(long)]
    pub vip_cidr: Option<String>,
    /// Lifetime of leaf certificates (e.g. "72h"; 72 h when never set): the
    /// CA is created with it, and a leader started with another writes it
    /// into the CA (leaves signed from then on have it).
    #[arg(long)]
    pub leaf_ttl: Option<String>,
    /// How long a node's agent may stay silent before its node and every
    /// instance on it count as critical (e.g. "10s", the default).
    #[arg(long)]
    pub node_timeout: Option<String>,
    /// How long a service's virtual IP is kept once nothing holds it (no
    /// instance left; e.g. "1m", the default, from 1s to 168h) before the
    /// leader gives it back; the service gets it again if it returns before
    /// another service needed it.
    #[arg(long)]
    pub vip_release_after: Option<String>,
    /// Connections one client address may hold at once on each port.
    #[arg(long)]
    pub max_conns_per_client: Option<usize>,
    /// KV keys at most (100000).
    #[arg(long)]
    pub max_kv_keys: Option<usize>,
    /// KV bytes (all values) at most (268435456, 256 MiB).
    #[arg(long)]
    pub max_kv_bytes: Option<u64>,
    /// Bytes of one config entry document at most (2097152, 2 MiB).
    #[arg(long)]
    pub max_config_entry_bytes: Option<usize>,
    /// Routes of one service-router at most (1000).
    #[arg(long)]
    pub max_routes_per_router: Option<usize>,
    /// Intentions in the cluster at most (50000).
    #[arg(long)]
    pub max_intentions: Option<usize>,
    /// The federation's primary datacenter (default: this one, which then
    /// federates with whichever secondaries report to it).
    #[arg(long)]
    pub primary_datacenter: Option<String>,
    /// WAN address (IP:PORT) of a mesh gateway of the primary datacenter,
    /// for a secondary to reach the primary's servers before it has heard
    /// of the primary's gateways; repeat for each.
    #[arg(long = "primary-gateway")]
    pub primary_gateways: Vec<SocketAddr>,
    /// Where other datacenters' servers reach this one through the mesh
    /// gateways (mutual TLS with the servers' certificates), usually port
    /// 8302. Set, this server federates: it keeps its datacenter's gateways
    /// in the federation state (and a secondary reports to the primary).
    /// Unset, it stays alone.
    #[arg(long)]
    pub federation_addr: Option<SocketAddr>,
    /// A TOML file with the same settings.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// The settings file: the flags' names with underscores.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub node_id: Option<u64>,
    pub datacenter: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub max_conns_per_client: Option<usize>,
    pub max_kv_keys: Option<usize>,
    pub max_kv_bytes: Option<u64>,
    pub max_config_entry_bytes: Option<usize>,
    pub max_routes_per_router: Option<usize>,
    pub max_intentions: Option<usize>,
    pub primary_datacenter: Option<String>,
    #[serde(default)]
    pub primary_gateways: Vec<SocketAddr>,
    pub federation_addr: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub raft_addr: Option<SocketAddr>,
    pub grpc_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    #[serde(default)]
    pub peers: BTreeMap<String, SocketAddr>,
    pub default_intention: Option<String>,
    pub snapshot_threshold: Option<u64>,
    pub raft_trailing_logs: Option<u64>,
    pub vip_cidr: Option<String>,
    pub leaf_ttl: Option<String>,
    pub node_timeout: Option<String>,
    pub vip_release_after: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The shortest leaf lifetime: agents renew at about half of it.
pub const MIN_LEAF_TTL_SECS: u64 = 10;
/// The longest leaf lifetime (a year, as Consul's): a stolen leaf is
/// good for its whole lifetime.
pub const MAX_LEAF_TTL_SECS: u64 = 365 * 24 * 3600;
/// Default silence after which a node goes critical.
pub const DEFAULT_NODE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Shortest node timeout: heartbeats every 200 ms at most.
pub const MIN_NODE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// The shortest and longest `vip_release_after`.
pub const MIN_VIP_RELEASE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
pub const MAX_VIP_RELEASE_AFTER: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

fn parse_peer(s: &str) -> Result<(u64, SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: a peer is ID=HOST:PORT"))?;
    let id: u64 = id
        .parse()
        .map_err(|_| format!("`{s}`: the id `{id}` is not a number"))?;
    if id == 0 {
        return Err(format!("`{s}`: server ids start at 1"));
    }
    let addr = addr
        .parse()
        .map_err(|_| format!("`{s}`: `{addr}` is not HOST:PORT"))?;
    Ok((id, addr))
}

/// Settings after flags, file and defaults are combined and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dev: bool,
    pub node_id: u64,
    /// None: a temporary directory (dev mode).
    pub data_dir: Option<PathBuf>,
    pub raft_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub peers: BTreeMap<u64, SocketAddr>,
    pub default_allow: bool,
    pub snapshot_threshold: u64,
    pub raft_trailing_logs: u64,
    pub vip_cidr: Option<String>,
    /// `--leaf-ttl`, if set.
    pub leaf_ttl_secs: Option<u64>,
    /// Silence after which a node goes critical.
    pub node_timeout: std::time::Duration,
    /// How long a virtual IP nothing holds is kept.
    pub vip_release_after: std::time::Duration,
    pub datacenter: String,
    /// None only in dev mode, which makes its own.
    pub tls: Option<crate::tls::TlsFiles>,
    pub max_conns_per_client: usize,
    pub limits: crate::limits::Limits,
    pub primary_datacenter: String,
    pub primary_gateways: Vec<SocketAddr>,
    pub federation_addr: Option<SocketAddr>,
}

fn read_file(path: &Path) -> Result<FileSettings, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| SettingsError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Settings {
    pub fn resolve(args: Args) -> Result<Self, SettingsError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let mut file_peers = BTreeMap::new();
        for (id, addr) in file.peers {
            let id: u64 = id.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
                SettingsError::Invalid(format!("peers: `{id}` is not a server id (> 0)"))
            })?;
            file_peers.insert(id, addr);
        }
        let node_id = args.node_id.or(file.node_id).unwrap_or(1);
        if node_id == 0 {
            return Err(SettingsError::Invalid(
                "node_id: server ids start at 1".into(),
            ));
        }
        let raft_addr = args
            .raft_addr
            .or(file.raft_addr)
            .unwrap_or(([127, 0, 0, 1], 8300).into());
        let mut peers: BTreeMap<u64, SocketAddr> = if args.peers.is_empty() {
            file_peers
        } else {
            args.peers.iter().copied().collect()
        };
        if peers.is_empty() {
            peers.insert(node_id, raft_addr);
        }
        match peers.get(&node_id) {
            Some(addr) if *addr == raft_addr => {}
            Some(addr) => {
                return Err(SettingsError::Invalid(format!(
                    "peer {node_id} is {addr} but --raft-addr is {raft_addr}"
                )))
            }
            None => {
                return Err(SettingsError::Invalid(format!(
                    "this server's id {node_id} is not in the peer list"
                )))
            }
        }
        let data_dir = args.data_dir.or(file.data_dir);
        if data_dir.is_none() && !args.dev {
            return Err(SettingsError::Invalid(
                "--data-dir is required (or --dev)".into(),
            ));
        }
        let default_intention = args
            .default_intention
            .or(file.default_intention)
            .unwrap_or_else(|| if args.dev { "allow" } else { "deny" }.to_string());
        let default_allow = match default_intention.as_str() {
            "allow" => true,
            "deny" => false,
            other => {
                return Err(SettingsError::Invalid(format!(
                    "default_intention: `{other}` is not allow or deny"
                )))
            }
        };
        let leaf_ttl_secs = match args.leaf_ttl.or(file.leaf_ttl) {
            Some(text) => {
                let secs = weft_api::duration::parse_duration(&text)
                    .map_err(|e| SettingsError::Invalid(format!("leaf_ttl: {e}")))?
                    .as_secs();
                if secs < MIN_LEAF_TTL_SECS {
                    return Err(SettingsError::Invalid(format!(
                        "leaf_ttl: {text:?} is shorter than {MIN_LEAF_TTL_SECS} s \
                         (agents renew at half the lifetime)"
                    )));
                }
                if secs > MAX_LEAF_TTL_SECS {
                    return Err(SettingsError::Invalid(format!(
                        "leaf_ttl: {text:?} is longer than a year ({MAX_LEAF_TTL_SECS} s): \
                         a stolen leaf is good for its whole lifetime"
                    )));
                }
                Some(secs)
            }
            None => None,
        };
        let node_timeout = match args.node_timeout.or(file.node_timeout) {
            Some(text) => {
                let timeout = weft_api::duration::parse_duration(&text)
                    .map_err(|e| SettingsError::Invalid(format!("node_timeout: {e}")))?;
                if timeout < MIN_NODE_TIMEOUT {
                    return Err(SettingsError::Invalid(format!(
                        "node_timeout: {text:?} is shorter than {MIN_NODE_TIMEOUT:?} \
                         (agents send five heartbeats per timeout)"
                    )));
                }
                timeout
            }
            None => DEFAULT_NODE_TIMEOUT,
        };
        let vip_release_after = match args.vip_release_after.or(file.vip_release_after) {
            Some(text) => {
                let after = weft_api::duration::parse_duration(&text)
                    .map_err(|e| SettingsError::Invalid(format!("vip_release_after: {e}")))?;
                if !(MIN_VIP_RELEASE_AFTER..=MAX_VIP_RELEASE_AFTER).contains(&after) {
                    return Err(SettingsError::Invalid(format!(
                        "vip_release_after: {text:?} is not from {MIN_VIP_RELEASE_AFTER:?} \
                         to {MAX_VIP_RELEASE_AFTER:?}"
                    )));
                }
                after
            }
            None => crate::vip_release::DEFAULT_RELEASE_AFTER,
        };
        let datacenter = args
            .datacenter
            .or(file.datacenter)
            .unwrap_or_else(|| "dc1".into());
        weft_api::names::validate_name(&datacenter)
            .map_err(|e| SettingsError::Invalid(format!("datacenter: {e}")))?;
        let tls = match (
            args.tls_ca_file.or(file.tls_ca_file),
            args.tls_cert_file.or(file.tls_cert_file),
            args.tls_key_file.or(file.tls_key_file),
        ) {
            (Some(ca), Some(cert), Some(key)) => Some(crate::tls::TlsFiles { ca, cert, key }),
            (None, None, None) if args.dev => None,
            _ => {
                return Err(SettingsError::Invalid(
                    "--tls-ca-file, --tls-cert-file and --tls-key-file are required \
                     (every port speaks TLS; make them with `weft tls ca create` and \
                     `weft tls cert create --server`), or --dev"
                        .into(),
                ))
            }
        };
        let max_conns_per_client = args
            .max_conns_per_client
            .or(file.max_conns_per_client)
            .unwrap_or(crate::conn_limit::DEFAULT_MAX_CONNS_PER_CLIENT);
        if max_conns_per_client == 0 {
            return Err(SettingsError::Invalid(
                "max_conns_per_client: must be at least 1".into(),
            ));
        }
        let defaults = crate::limits::Limits::default();
        let limits = crate::limits::Limits {
            kv_keys: args
                .max_kv_keys
                .or(file.max_kv_keys)
                .unwrap_or(defaults.kv_keys),
            kv_bytes: args
                .max_kv_bytes
                .or(file.max_kv_bytes)
                .unwrap_or(defaults.kv_bytes),
            config_entry_bytes: args
                .max_config_entry_bytes
                .or(file.max_config_entry_bytes)
                .unwrap_or(defaults.config_entry_bytes),
            routes_per_router: args
                .max_routes_per_router
                .or(file.max_routes_per_router)
                .unwrap_or(defaults.routes_per_router),
            intentions: args
                .max_intentions
                .or(file.max_intentions)
                .unwrap_or(defaults.intentions),
        };
        for (name, value) in [
            ("max_kv_keys", limits.kv_keys as u64),
            ("max_kv_bytes", limits.kv_bytes),
            ("max_config_entry_bytes", limits.config_entry_bytes as u64),
            ("max_routes_per_router", limits.routes_per_router as u64),
            ("max_intentions", limits.intentions as u64),
        ] {
            if value == 0 {
                return Err(SettingsError::Invalid(format!(
                    "{name}: must be at least 1"
                )));
            }
        }
        let primary_datacenter = args
            .primary_datacenter
            .or(file.primary_datacenter)
            .unwrap_or_else(|| datacenter.clone());
        weft_api::names::validate_name(&primary_datacenter)
            .map_err(|e| SettingsError::Invalid(format!("primary_datacenter: {e}")))?;
        let primary_gateways = if args.primary_gateways.is_empty() {
            file.primary_gateways
        } else {
            args.primary_gateways
        };
        if primary_datacenter == datacenter && !primary_gateways.is_empty() {
            return Err(SettingsError::Invalid(
                "primary_gateways: this server is in the primary datacenter; only secondaries name the primary's gateways".into(),
            ));
        }
        if primary_datacenter != datacenter && leaf_ttl_secs.is_some() {
            return Err(SettingsError::Invalid(format!(
                "leaf_ttl: a secondary datacenter's CA, leaf lifetime included, comes from the primary: set it on {primary_datacenter:?}'s servers"
            )));
        }
        if primary_datacenter != datacenter && primary_gateways.is_empty() {
            return Err(SettingsError::Invalid(format!(
                "primary_gateways: a secondary datacenter needs at least one WAN address of a gateway of {primary_datacenter:?} (--primary-gateway)"
            )));
        }
        let grpc_addr = args
            .grpc_addr
            .or(file.grpc_addr)
            .unwrap_or(([127, 0, 0, 1], 8502).into());
        let federation_addr = args.federation_addr.or(file.federation_addr);
        if federation_addr.is_none() && primary_datacenter != datacenter {
            return Err(SettingsError::Invalid(
                "federation_addr: a secondary datacenter's servers federate, so they need one (e.g. 10.0.0.1:8302)".into(),
            ));
        }
        Ok(Settings {
            datacenter,
            primary_datacenter,
            primary_gateways,
            federation_addr,
            tls,
            max_conns_per_client,
            limits,
            leaf_ttl_secs,
            node_timeout,
            vip_release_after,
            dev: args.dev,
            node_id,
            data_dir,
            raft_addr,
            grpc_addr,
            http_addr: args
                .http_addr
                .or(file.http_addr)
                .unwrap_or(([127, 0, 0, 1], 8500).into()),
            peers,
            default_allow,
            snapshot_threshold: args
                .snapshot_threshold
                .or(file.snapshot_threshold)
                .unwrap_or(16_384)
                .max(1),
            raft_trailing_logs: args
                .raft_trailing_logs
                .or(file.raft_trailing_logs)
                .unwrap_or(10_240),
            vip_cidr: args.vip_cidr.or(file.vip_cidr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("weft-server").chain(list.iter().copied())).unwrap()
    }

    #[test]
    fn dev_defaults_to_allow_and_one_peer() {
        let s = Settings::resolve(args(&["--dev"])).unwrap();
        assert!(s.default_allow);
        assert_eq!(s.peers.len(), 1);
        assert!(s.data_dir.is_none());
    }

    const TLS: [&str; 6] = [
        "--tls-ca-file",
        "ca.pem",
        "--tls-cert-file",
        "s.pem",
        "--tls-key-file",
        "s-key.pem",
    ];

    #[test]
    fn vip_release_after_is_a_bounded_duration() {
        let s = Settings::resolve(args(&["--dev"])).unwrap();
        assert_eq!(
            s.vip_release_after,
            crate::vip_release::DEFAULT_RELEASE_AFTER
        );
        let s = Settings::resolve(args(&["--dev", "--vip-release-after", "5s"])).unwrap();
        assert_eq!(s.vip_release_after, std::time::Duration::from_secs(5));
        for bad in ["500ms", "169h", "soon"] {
            let e = Settings::resolve(args(&["--dev", "--vip-release-after", bad])).unwrap_err();
            assert!(e.to_string().contains("vip_release_after"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_leaf_ttl_is_bounded_and_the_primarys_to_set() {
        let s = Settings::resolve(args(&["--dev", "--leaf-ttl", "1h"])).unwrap();
        assert_eq!(s.leaf_ttl_secs, Some(3600));
        assert_eq!(
            Settings::resolve(args(&["--dev"])).unwrap().leaf_ttl_secs,
            None
        );
        for (ttl, says) in [("5s", "shorter than"), ("9000h", "longer than a year")] {
            let e = Settings::resolve(args(&["--dev", "--leaf-ttl", ttl])).unwrap_err();
            assert!(e.to_string().contains(says), "{ttl}: {e}");
        }
        let e = Settings::resolve(args(&[
            "--dev",
            "--datacenter",
            "dc2",
            "--primary-datacenter",
            "dc1",
            "--primary-gateway",
            "10.0.0.1:8443",
            "--federation-addr",
            "127.0.0.1:8302",
            "--leaf-ttl",
            "1h",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("comes from the primary"), "{e}");
    }

    #[test]
    fn production_defaults_to_deny_and_needs_a_data_dir() {
        let e = Settings::resolve(args(&["--node-id", "1"])).unwrap_err();
        assert!(e.to_string().contains("--data-dir"), "{e}");
        let mut flags = vec!["--data-dir", "/tmp/x"];
        flags.extend(TLS);
        let s = Settings::resolve(args(&flags)).unwrap();
        assert!(!s.default_allow);
        assert_eq!(s.datacenter, "dc1");
    }

    #[test]
    fn production_needs_all_three_tls_files() {
        let e = Settings::resolve(args(&["--data-dir", "/tmp/x"])).unwrap_err();
        assert!(e.to_string().contains("--tls-ca-file"), "{e}");
        let e = Settings::resolve(args(&["--data-dir", "/tmp/x", "--tls-ca-file", "ca.pem"]))
            .unwrap_err();
        assert!(e.to_string().contains("--tls-cert-file"), "{e}");
        let e = Settings::resolve(args(&["--dev", "--tls-ca-file", "ca.pem"])).unwrap_err();
        assert!(e.to_string().contains("--tls-key-file"), "{e}");
    }

    #[test]
    fn peer_list_must_hold_this_server() {
        let e = Settings::resolve(args(&[
            "--data-dir",
            "/tmp/x",
            "--node-id",
            "4",
            "--peer",
            "1=127.0.0.1:8300",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("not in the peer list"), "{e}");
    }

    #[test]
    fn bad_peers_are_named() {
        assert!(Args::try_parse_from(["weft-server", "--peer", "x=1.2.3.4:5"]).is_err());
        assert!(Args::try_parse_from(["weft-server", "--peer", "0=1.2.3.4:5"]).is_err());
        assert!(Args::try_parse_from(["weft-server", "--peer", "1=nowhere"]).is_err());
    }
}
