//! The agent's configuration file, `agent.toml`: its fields and defaults, parsing with
//! errors that name the file, line, column and field, and the semantic checks that run
//! after parsing (names, ports, addresses, durations, uniqueness).
//!
//! Parsing happens in two steps. Serde reads the TOML into private "raw" structs that
//! mirror the file (`deny_unknown_fields`, strings for durations and addresses). Then
//! [`validate`] turns them into the public, typed [`AgentConfig`], reporting the first
//! problem with its field path (`service[1].check[0]`) and, where the field can be found
//! in the text, its line.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_api::catalog::HealthStatus;
use weft_api::duration::parse_duration;
use weft_api::names::validate_name;

/// Default address of a service's workload.
pub const DEFAULT_SERVICE_ADDRESS: &str = "127.0.0.1";
/// Default inbound mTLS / HBONE listener.
pub const DEFAULT_INBOUND_ADDR: &str = "0.0.0.0:15008";
/// Default outbound listener for redirected connections.
pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
/// Services one agent takes: workload ids (1..=4095) fit in the low 12
/// bits of the socket mark.
pub const MAX_SERVICES: usize = 4095;
/// Upstream listeners of all services together at most: the eBPF
/// destinations map keeps this many entries for them.
pub const MAX_UPSTREAM_LISTENERS: usize = 1024;
/// Shortest `deregister_critical_service_after` (Consul's minimum is a
/// minute; shorter values are for tests and demos).
pub const MIN_DEREGISTER_CRITICAL_AFTER: Duration = Duration::from_secs(1);
/// Default listener for plaintext connections to permissive services.
pub const DEFAULT_PERMISSIVE_ADDR: &str = "127.0.0.1:15006";
/// Default socket mark of the connections the agent checked. Its low 12 bits
/// are zero (they carry a workload id); it avoids the bits kube-proxy
/// (0x4000, 0x8000), Istio (0x539), Cilium (0xf00) and Calico (upper 16) use.
pub const DEFAULT_SOCKET_MARK: u32 = 0x3000;
/// Default admin listener (`/healthz`, `/metrics`, `/config`).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15020";
/// Default DNS listener.
pub const DEFAULT_DNS_ADDR: &str = "127.0.0.1:8600";
/// Default local HTTP API listener (Consul's agent port): workloads report
/// their TTL checks here.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8500";
/// Default time given to open connections to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "5s";
/// Default time a predecessor serves its open connections after an
/// in-place upgrade (Envoy's hot restart drains for 10 minutes too).
pub const DEFAULT_UPGRADE_DRAIN_TIMEOUT: &str = "10m";
/// One thread: every hop of a proxied message stays on it, which measured
/// ~25 % lower request latency than two work-stealing threads (bench/).
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// The shortest interval between two runs of a check.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Default interval between two runs of a check.
pub const DEFAULT_CHECK_INTERVAL: &str = "10s";
/// Most checks one service may have (the file's and the local API's).
pub const MAX_CHECKS_PER_SERVICE: usize = 32;
/// Longest check `name`.
pub const MAX_CHECK_NAME_BYTES: usize = 256;
/// Longest check `notes`.
pub const MAX_CHECK_NOTES_BYTES: usize = 1024;
/// Default timeout of one run of a check.
pub const DEFAULT_CHECK_TIMEOUT: &str = "2s";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the agent configuration: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax error, unknown field, missing field or wrong type.
    #[error("{file}:{line}:{column}: {}{message}", field_prefix(field))]
    Syntax {
        file: String,
        /// 1-based.
        line: usize,
        /// 1-based, in characters.
        column: usize,
        /// Field path such as `service[0].port`; empty when not known.
        field: String,
        message: String,
    },
    /// The file parsed but a value is not acceptable.
    #[error("{file}{}: {field}: {message}", line_suffix(*line))]
    Invalid {
        file: String,
        /// 1-based line of the field, when it appears in the file.
        line: Option<usize>,
        /// Field path such as `service[1].check[0]`.
        field: String,
        message: String,
    },
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

/// The whole agent configuration, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentConfig {
    pub node_name: String,
    pub datacenter: String,
    /// Consul's `node_meta`: the node's meta in the catalog.
    pub node_meta: BTreeMap<String, String>,
    /// gRPC addresses of the servers, `HOST:PORT` each.
    pub servers: Vec<String>,
    /// The servers' HTTPS API port (on the hosts of `servers`), where the
    /// local API forwards what it does not answer itself.
    pub server_http_port: u16,
    /// Where other agents reach this node (on the inbound port).
    pub advertise_addr: IpAddr,
    pub data_dir: PathBuf,
    /// `None`: the cgroup2 mount, found at start-up.
    pub cgroup_root: Option<PathBuf>,
    /// `false`: explicit upstreams only, no interception.
    pub ebpf: bool,
    /// Where the eBPF programs' links and maps are pinned (`None`: under
    /// /sys/fs/bpf/weft/, named after the cgroup root).
    pub bpf_pin_dir: Option<PathBuf>,
    /// Mesh workloads' connections to destinations outside the mesh.
    pub egress: EgressPolicy,
    /// `SO_MARK` of the connections the agent checked: inbound capture lets
    /// only those reach mesh workloads.
    pub socket_mark: u32,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    /// Plaintext connections to permissive services arrive here.
    pub permissive_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    /// The DNS domain the agent answers for (`weft`), and a second one
    /// (`consul`, as Consul users' tools expect; empty: none).
    pub dns_domain: String,
    pub dns_alt_domain: String,
    /// Where the DNS server sends names outside its domains (Consul's
    /// `recursors`; none: they are refused).
    pub recursors: Vec<SocketAddr>,
    /// The local HTTP API (`/v1/agent/check/...`); a loopback address.
    pub http_addr: SocketAddr,
    #[serde(with = "duration_text")]
    pub drain_timeout: Duration,
    /// How long a predecessor keeps serving its open connections after an
    /// in-place upgrade handed its listeners to the successor.
    #[serde(with = "duration_text")]
    pub upgrade_drain_timeout: Duration,
    /// Runtime threads: 1 runs everything on one thread; more spread
    /// connections over cores.
    pub worker_threads: usize,
    /// The ACL token, written in the file (`token_file` and `WEFT_TOKEN`
    /// are read at start, see `control::Credentials`). Never serialized.
    #[serde(skip)]
    pub token: Option<SecretText>,
    /// A file holding the ACL token.
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the servers' TLS certificates
    /// (`WEFT_CACERT` when absent).
    pub ca_file: Option<PathBuf>,
    /// The name the servers' certificates must carry:
    /// `server.<datacenter>.weft` unless set.
    pub tls_server_name: String,
    pub services: Vec<ServiceConfig>,
    /// A mesh gateway run by this agent (`[gateway]`), if any.
    pub gateway: Option<GatewayConfig>,
}

/// `[gateway]`: this agent is also its datacenter's mesh gateway. It
/// listens on both addresses and registers as service `mesh-gateway`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayConfig {
    /// Where this datacenter's agents and servers reach it: it forwards
    /// their connections to other datacenters' gateways, and theirs to
    /// local nodes and servers.
    pub lan_address: SocketAddr,
    /// Where other datacenters' gateways reach it (advertised to them).
    /// Connections arriving here only go to this datacenter's nodes and
    /// servers, never on to a third datacenter.
    pub wan_address: SocketAddr,
    /// The port the servers (the hosts of `servers`) take federation
    /// connections on (their `--federation-addr`).
    pub server_port: u16,
}

/// Default port of the servers' federation listener.
pub const DEFAULT_SERVER_FEDERATION_PORT: u16 = 8302;

fn default_server_federation_port() -> u16 {
    DEFAULT_SERVER_FEDERATION_PORT
}

/// What happens to a mesh workload's connection to a destination outside
/// the mesh (neither a virtual IP nor a registered instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressPolicy {
    /// Passthrough, counted (`weft_agent_ebpf_total{event="egress_allowed"}`).
    #[default]
    Allow,
    /// Refused in the kernel (the connect fails with EPERM), counted.
    Deny,
}

/// A secret from the configuration: shows itself in no debug output.
#[derive(Clone, PartialEq)]
pub struct SecretText(String);

impl SecretText {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One `[[service]]`: a workload on this node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceConfig {
    /// Unique on the node; defaults to the name.
    pub id: String,
    pub name: String,
    /// Where the workload listens.
    pub port: u16,
    pub address: IpAddr,
    /// The workload's cgroup, relative to the cgroup root.
    pub cgroup: Option<PathBuf>,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub checks: Vec<CheckConfig>,
    pub upstreams: Vec<UpstreamConfig>,
}

/// One `[[service.check]]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckConfig {
    /// Unique on the agent: the file's `id`, or Consul's default
    /// `service:<service id>` (`service:<service id>:<n>`, n from 1, when
    /// the service has several checks). The local API names checks by it.
    pub id: String,
    pub kind: CheckKind,
    #[serde(with = "duration_text")]
    pub interval: Duration,
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    /// Consul's `DeregisterCriticalServiceAfter`: the servers remove the
    /// instance once it has been critical this long.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "duration_text::serialize_some"
    )]
    pub deregister_critical_service_after: Option<Duration>,
    /// Consul's check `Name` (shown by `/v1/agent/checks`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Consul's `Notes`: text for people, shown by `/v1/agent/checks`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// Consul's initial `Status` of a TTL check (the TTL runs from the
    /// start); `None`: critical until the first update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<HealthStatus>,
    /// Added through the local API (with the service, or to a service of
    /// the file), not written in the file: its probes are the workload's
    /// connections, not the agent's ([`crate::mark::of_workload`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub through_api: bool,
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// `GET url`; only `http://` URLs.
    Http { url: String },
    /// TCP connect to `HOST:PORT`.
    Tcp { addr: String },
    /// gRPC health protocol at `HOST:PORT`, for `service` (empty: the whole server).
    Grpc { addr: String, service: String },
    /// Passing while refreshed within `ttl`.
    Ttl {
        #[serde(with = "duration_text")]
        ttl: Duration,
    },
}

impl CheckKind {
    /// `http`, `tcp`, `grpc` or `ttl`, as in the file.
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Grpc { .. } => "grpc",
            CheckKind::Ttl { .. } => "ttl",
        }
    }
}

/// One `[[service.upstream]]`: a local port that reaches a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamConfig {
    pub name: String,
    pub local_port: u16,
    /// The datacenter whose instances serve it (another of the federation,
    /// reached through the gateways); `None`: this one's.
    pub datacenter: Option<String>,
}

mod duration_text {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{d:?}"))
    }

    pub(super) fn serialize_some<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

/// Whether `ip:port` is one of `own`: the same address, or the port on an
/// address listened on everywhere (`0.0.0.0`), or loopback where that one
/// is loopback.
pub fn is_among(own: &[SocketAddr], ip: IpAddr, port: u16) -> bool {
    let ip = ip.to_canonical();
    own.iter().any(|own| {
        let own_ip = own.ip().to_canonical();
        own.port() == port
            && (own_ip == ip
                || own_ip.is_unspecified()
                || (own_ip.is_loopback() && ip.is_loopback()))
    })
}

/// The configuration file as read: its text, and what the file was when
/// it was read (its mode and owner, which its contents may call for
/// checking: a `token` in it makes it a secret's).
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub text: String,
    meta: std::fs::Metadata,
}

impl AgentConfig {
    /// Every address the agent itself listens on: its API, DNS, admin,
    /// inbound, outbound and permissive ports, its gateway's, and its
    /// services' upstream ports (on 127.0.0.1). No instance may claim one.
    pub fn own_addresses(&self) -> Vec<SocketAddr> {
        let mut own = vec![
            self.http_addr,
            self.dns_addr,
            self.admin_addr,
            self.inbound_addr,
            self.outbound_addr,
            self.permissive_addr,
        ];
        if let Some(g) = &self.gateway {
            own.extend([g.lan_address, g.wan_address]);
        }
        for s in &self.services {
            for up in &s.upstreams {
                own.push(SocketAddr::from(([127, 0, 0, 1], up.local_port)));
            }
        }
        own
    }

    /// Whether `ip:port` is one of [`own_addresses`](Self::own_addresses):
    /// the same address, or the port on an address the agent listens on
    /// everywhere (`0.0.0.0`), or loopback where the agent's is loopback.
    pub fn is_own_address(&self, ip: IpAddr, port: u16) -> bool {
        is_among(&self.own_addresses(), ip, port)
    }

    /// The DNS domains, the main one first.
    pub fn dns_domains(&self) -> Vec<String> {
        let mut domains = vec![self.dns_domain.clone()];
        if !self.dns_alt_domain.is_empty() {
            domains.push(self.dns_alt_domain.clone());
        }
        domains
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<AgentConfig, ConfigError> {
        Self::load_with_registered(path, &crate::registered::Registered::default())
    }

    /// Reads and validates the file at `path` with `registered` (services
    /// registered through the local API) as `[[service]]` blocks after it,
    /// and the checks added through the API to the file's services.
    pub fn load_with_registered(
        path: impl AsRef<Path>,
        registered: &crate::registered::Registered,
    ) -> Result<AgentConfig, ConfigError> {
        let path = path.as_ref();
        let file = Self::read_file(path)?;
        Self::from_file_text(&file, path, registered)
    }

    /// The configuration file at `path`, which no one but its owner (the
    /// agent's user, or root) may write.
    pub fn read_file(path: &Path) -> Result<ConfigFile, ConfigError> {
        let file = path.display().to_string();
        let (bytes, meta) = crate::private_file::read_trusted(path).map_err(|e| match e {
            crate::private_file::PrivateFileError::Io { source, .. } => ConfigError::Read {
                file: file.clone(),
                source,
            },
            refused => ConfigError::Read {
                file: file.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    refused.to_string(),
                ),
            },
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Read {
            file,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
        })?;
        Ok(ConfigFile { text, meta })
    }

    /// The configuration file `read` from `path` ([`Self::read_file`]),
    /// with `registered`: what [`Self::load_with_registered`] gives,
    /// without reading the file again.
    pub fn from_file_text(
        read: &ConfigFile,
        path: &Path,
        registered: &crate::registered::Registered,
    ) -> Result<AgentConfig, ConfigError> {
        let file = path.display().to_string();
        let text = read.text.clone() + &crate::registered::as_toml(&registered.services);
        let config = Self::parse(&text, &file)?;
        if config.token.is_some() {
            // The token in the file: the file is a secret's.
            let refused = |message: String| ConfigError::Invalid {
                file: file.clone(),
                line: None,
                field: "token".into(),
                message,
            };
            // The file as it was read, not as it is now.
            crate::private_file::check(path, &read.meta).map_err(|e| {
                refused(format!(
                    "{e}, or move the token to a token_file of mode 600"
                ))
            })?;
        }
        // How many checks each service has before the API's are appended
        // (none of a service registered through the API is the file's).
        let from_file: std::collections::HashMap<String, usize> = (config.services.iter())
            .filter(|s| !registered.services.iter().any(|r| r.id() == s.id))
            .map(|s| (s.id.clone(), s.checks.len()))
            .collect();
        let mut merged = if registered.checks.is_empty() {
            config
        } else {
            let merged = crate::registered::merge_checks(&text, &config, &registered.checks)
                .map_err(|e| ConfigError::Invalid {
                    file: file.clone(),
                    line: None,
                    field: "service.check".into(),
                    message: format!("checks added through the local API: {e}"),
                })?;
            Self::parse(
                &merged,
                &format!("{file} with the checks added through the local API"),
            )?
        };
        // The checks of services registered through the API, and those
        // added after a file service's own (merge_checks appends them).
        for service in &mut merged.services {
            let skip = from_file.get(&service.id).copied().unwrap_or(0);
            for check in service.checks.iter_mut().skip(skip) {
                check.through_api = true;
            }
        }
        Ok(merged)
    }

    /// Parses and validates `text`; `file` names it in error messages.
    pub fn parse(text: &str, file: &str) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            let (line, column) = line_column(text, offset);
            ConfigError::Syntax {
                file: file.to_string(),
                line,
                column,
                field: if e.span().is_some() {
                    field_path_at(text, offset)
                } else {
                    String::new()
                },
                message: e.message().trim().to_string(),
            }
        })?;
        validate(raw).map_err(|invalid| ConfigError::Invalid {
            file: file.to_string(),
            line: line_of_field(text, &invalid.field),
            field: invalid.field,
            message: invalid.message,
        })
    }
}

// ---------------------------------------------------------------------------------
// The file as serde reads it.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_name: String,
    datacenter: String,
    #[serde(default)]
    node_meta: BTreeMap<String, String>,
    servers: Vec<String>,
    #[serde(default = "default_server_http_port")]
    server_http_port: u16,
    advertise_addr: String,
    data_dir: PathBuf,
    #[serde(default)]
    cgroup_root: Option<PathBuf>,
    #[serde(default = "default_true")]
    ebpf: bool,
    #[serde(default)]
    bpf_pin_dir: Option<PathBuf>,
    #[serde(default)]
    egress: EgressPolicy,
    #[serde(default = "default_socket_mark")]
    socket_mark: u32,
    #[serde(default = "default_inbound")]
    inbound_addr: String,
    #[serde(default = "default_outbound")]
    outbound_addr: String,
    #[serde(default = "default_permissive")]
    permissive_addr: String,
    #[serde(default = "default_admin")]
    admin_addr: String,
    #[serde(default = "default_dns")]
    dns_addr: String,
    #[serde(default = "default_dns_domain")]
    dns_domain: String,
    #[serde(default = "default_dns_alt_domain")]
    dns_alt_domain: String,
    #[serde(default)]
    recursors: Vec<String>,
    #[serde(default = "default_http")]
    http_addr: String,
    #[serde(default = "default_drain")]
    drain_timeout: String,
    #[serde(default = "default_upgrade_drain")]
    upgrade_drain_timeout: String,
    #[serde(default = "default_worker_threads")]
    worker_threads: usize,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    tls_server_name: Option<String>,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default)]
    gateway: Option<RawGateway>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    lan_address: String,
    wan_address: String,
    #[serde(default = "default_server_federation_port")]
    server_port: u16,
}

/// `[gateway]`: two distinct, advertisable `IP:PORT` addresses.
fn gateway(raw: &RawGateway) -> Result<GatewayConfig, Invalid> {
    let addr = |field: &str, value: &str| -> Result<SocketAddr, Invalid> {
        let a = socket_addr(field, value)?;
        // `[::ffff:0.0.0.0]` binds every IPv4 address as 0.0.0.0 does.
        if a.ip().to_canonical().is_unspecified() || a.port() == 0 {
            return Err(invalid(
                field,
                format!("{value:?}: a gateway's address is advertised, so it needs a definite IP and port"),
            ));
        }
        Ok(a)
    };
    let lan_address = addr("gateway.lan_address", &raw.lan_address)?;
    let wan_address = addr("gateway.wan_address", &raw.wan_address)?;
    if lan_address.ip().to_canonical() == wan_address.ip().to_canonical() {
        return Err(invalid(
            "gateway.wan_address",
            "must be on another IP than lan_address: what arrives from the WAN may only reach this datacenter, which the gateway tells by the address it arrived at, and on one IP the LAN port is as reachable from the WAN (a relay to every datacenter)",
        ));
    }
    Ok(GatewayConfig {
        lan_address,
        wan_address,
        server_port: port("gateway.server_port", raw.server_port)?,
    })
}

fn default_worker_threads() -> usize {
    DEFAULT_WORKER_THREADS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    id: Option<String>,
    name: String,
    port: u16,
    #[serde(default = "default_service_address")]
    address: String,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    #[serde(default)]
    check: Vec<RawCheck>,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    http: Option<String>,
    #[serde(default)]
    tcp: Option<String>,
    #[serde(default)]
    grpc: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default = "default_interval")]
    interval: String,
    #[serde(default = "default_timeout")]
    timeout: String,
    #[serde(default)]
    deregister_critical_service_after: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    notes: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    local_port: u16,
    #[serde(default)]
    datacenter: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_inbound() -> String {
    DEFAULT_INBOUND_ADDR.to_string()
}
fn default_outbound() -> String {
    DEFAULT_OUTBOUND_ADDR.to_string()
}
fn default_permissive() -> String {
    DEFAULT_PERMISSIVE_ADDR.to_string()
}
fn default_socket_mark() -> u32 {
    DEFAULT_SOCKET_MARK
}
fn default_admin() -> String {
    DEFAULT_ADMIN_ADDR.to_string()
}
fn default_dns_domain() -> String {
    "weft".into()
}

fn default_dns_alt_domain() -> String {
    "consul".into()
}

/// A DNS domain of the agent: lowercase labels (names as services have),
/// dot-separated; `empty_ok` for the optional second domain.
fn domain_name(field: &str, text: &str, empty_ok: bool) -> Result<String, Invalid> {
    let text = text.trim_end_matches('.').to_ascii_lowercase();
    if text.is_empty() {
        return if empty_ok {
            Ok(text)
        } else {
            Err(invalid(field, "must not be empty"))
        };
    }
    for label in text.split('.') {
        weft_api::names::validate_name(label)
            .map_err(|e| invalid(field, format!("{text:?}: label {label:?}: {e}")))?;
    }
    Ok(text)
}

fn default_dns() -> String {
    DEFAULT_DNS_ADDR.to_string()
}
fn default_server_http_port() -> u16 {
    8500
}
fn default_http() -> String {
    DEFAULT_HTTP_ADDR.to_string()
}
fn default_upgrade_drain() -> String {
    DEFAULT_UPGRADE_DRAIN_TIMEOUT.into()
}
fn default_drain() -> String {
    DEFAULT_DRAIN_TIMEOUT.to_string()
}
fn default_service_address() -> String {
    DEFAULT_SERVICE_ADDRESS.to_string()
}
fn default_interval() -> String {
    DEFAULT_CHECK_INTERVAL.to_string()
}
fn default_timeout() -> String {
    DEFAULT_CHECK_TIMEOUT.to_string()
}

// ---------------------------------------------------------------------------------
// Semantic validation (pure).

/// A semantic problem: the field path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Invalid {
    field: String,
    message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn name(field: &str, value: &str) -> Result<String, Invalid> {
    validate_name(value)
        .map(|()| value.to_string())
        .map_err(|e| invalid(field, format!("invalid name {value:?}: {e}")))
}

fn duration(field: &str, value: &str, allow_zero: bool) -> Result<Duration, Invalid> {
    let d = parse_duration(value).map_err(|e| invalid(field, e.to_string()))?;
    if d.is_zero() && !allow_zero {
        return Err(invalid(
            field,
            format!("{value:?} must be greater than zero"),
        ));
    }
    Ok(d)
}

fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, Invalid> {
    value.parse().map_err(|_| {
        invalid(
            field,
            format!("{value:?} is not an IP:PORT address (e.g. \"127.0.0.1:15020\")"),
        )
    })
}

/// `recursors`: `IP` (port 53) or `IP:PORT` each, at most
/// [`crate::dns::recurse::MAX_RECURSORS`], never the agent's own DNS address
/// (it would forward to itself), and only with `dns_addr` on loopback.
fn recursors(values: &[String], dns_addr: SocketAddr) -> Result<Vec<SocketAddr>, Invalid> {
    use crate::dns::recurse::MAX_RECURSORS;
    if !values.is_empty() && !dns_addr.ip().to_canonical().is_loopback() {
        return Err(invalid(
            "recursors",
            format!(
                "with dns_addr {dns_addr} off loopback the agent would resolve any name for anyone who reaches it (an open resolver): bind dns_addr to a loopback address, e.g. \"127.0.0.1:53\""
            ),
        ));
    }
    if values.len() > MAX_RECURSORS {
        return Err(invalid(
            "recursors",
            format!("{} given, at most {MAX_RECURSORS}", values.len()),
        ));
    }
    let mut out = Vec::with_capacity(values.len());
    for value in values {
        let addr = match value.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 53),
            Err(_) => value.parse().map_err(|_| {
                invalid(
                    "recursors",
                    format!("{value:?} is not an IP or IP:PORT address (e.g. \"10.0.0.53\")"),
                )
            })?,
        };
        let (ip, own_ip) = (addr.ip().to_canonical(), dns_addr.ip().to_canonical());
        let own = addr.port() == dns_addr.port()
            && (ip == own_ip || (own_ip.is_unspecified() && ip.is_loopback()));
        if own || addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(invalid(
                "recursors",
                format!("{value:?}: the agent's own DNS address ({dns_addr}) or no address; it would ask itself"),
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

fn ip_addr(field: &str, value: &str) -> Result<IpAddr, Invalid> {
    value.parse().map_err(|_| {
        invalid(
            field,
            format!("{value:?} is not an IP address (e.g. \"10.0.0.2\")"),
        )
    })
}

fn port(field: &str, value: u16) -> Result<u16, Invalid> {
    if value == 0 {
        Err(invalid(field, "port must not be 0"))
    } else {
        Ok(value)
    }
}

/// Checks `HOST:PORT` (IPv6 hosts in brackets) and returns it unchanged.
fn host_port(field: &str, value: &str) -> Result<String, Invalid> {
    let bad = |why: &str| {
        invalid(
            field,
            format!("{value:?} is not HOST:PORT ({why}; e.g. \"10.0.0.1:8502\")"),
        )
    };
    let (host, port_text) = value.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    };
    if !host_ok {
        return Err(bad("bad host"));
    }
    match port_text.parse::<u16>() {
        Ok(0) => Err(bad("port must not be 0")),
        Ok(_) => Ok(value.to_string()),
        Err(_) => Err(bad("port must be a number from 1 to 65535")),
    }
}

fn check_kind(field: &str, raw: &RawCheck) -> Result<CheckKind, Invalid> {
    let set = [
        raw.http.is_some(),
        raw.tcp.is_some(),
        raw.grpc.is_some(),
        raw.ttl.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(invalid(field, "exactly one of http, tcp, grpc, ttl"));
    }
    if let Some(url) = &raw.http {
        let f = format!("{field}.http");
        if url.starts_with("https://") {
            return Err(invalid(
                f,
                format!("{url:?}: https checks are not supported (use http://)"),
            ));
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|e| invalid(&f, format!("{url:?} is not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(invalid(
                f,
                format!("{url:?} must be an http:// URL with a host"),
            ));
        }
        return Ok(CheckKind::Http { url: url.clone() });
    }
    if let Some(addr) = &raw.tcp {
        let addr = host_port(&format!("{field}.tcp"), addr)?;
        return Ok(CheckKind::Tcp { addr });
    }
    if let Some(target) = &raw.grpc {
        let f = format!("{field}.grpc");
        let (addr, service) = target.split_once('/').unwrap_or((target, ""));
        let addr = host_port(&f, addr)?;
        if target.contains('/') && service.is_empty() {
            return Err(invalid(
                f,
                format!("{target:?}: empty service name after '/' (write HOST:PORT or HOST:PORT/SERVICE)"),
            ));
        }
        return Ok(CheckKind::Grpc {
            addr,
            service: service.to_string(),
        });
    }
    let ttl = raw.ttl.as_deref().unwrap_or_default();
    Ok(CheckKind::Ttl {
        ttl: duration(&format!("{field}.ttl"), ttl, false)?,
    })
}

/// A check's id: the file's, or Consul's default for check `index` of
/// `count` of service `service_id`.
fn check_id(
    field: &str,
    raw: Option<&str>,
    service_id: &str,
    index: usize,
    count: usize,
) -> Result<String, Invalid> {
    let Some(id) = raw else {
        return Ok(if count == 1 {
            format!("service:{service_id}")
        } else {
            format!("service:{service_id}:{}", index + 1)
        });
    };
    if id.is_empty()
        || id.len() > 128
        || !id.chars().all(|c| c.is_ascii_graphic())
        || id.contains(['/', '?', '#', '%'])
    {
        return Err(invalid(
            field,
            format!("{id:?}: a check id is 1 to 128 printable ASCII characters without spaces, '/', '?', '#' or '%'"),
        ));
    }
    Ok(id.to_string())
}

fn check(field: &str, raw: &RawCheck, id: String) -> Result<CheckConfig, Invalid> {
    let deregister_field = format!("{field}.deregister_critical_service_after");
    let deregister_critical_service_after = match &raw.deregister_critical_service_after {
        Some(text) => {
            let after = duration(&deregister_field, text, false)?;
            if after < MIN_DEREGISTER_CRITICAL_AFTER {
                return Err(invalid(
                    deregister_field,
                    format!("{text:?} is shorter than {MIN_DEREGISTER_CRITICAL_AFTER:?}"),
                ));
            }
            Some(after)
        }
        None => None,
    };
    let kind = check_kind(field, raw)?;
    let text = |key: &str, value: &Option<String>, max: usize| match value {
        Some(v) if v.len() > max || v.chars().any(char::is_control) => Err(invalid(
            format!("{field}.{key}"),
            format!("at most {max} bytes, without control characters"),
        )),
        v => Ok(v.clone()),
    };
    let name = text("name", &raw.name, MAX_CHECK_NAME_BYTES)?;
    let notes = text("notes", &raw.notes, MAX_CHECK_NOTES_BYTES)?;
    let status = match raw.status.as_deref() {
        None => None,
        Some(_) if !matches!(kind, CheckKind::Ttl { .. }) => {
            return Err(invalid(
                format!("{field}.status"),
                "an initial status on an http, tcp or grpc check is not supported by weft yet (it probes at once); only ttl checks take one",
            ))
        }
        Some(text) => Some(text.parse::<HealthStatus>().map_err(|_| {
            invalid(
                format!("{field}.status"),
                format!("{text:?}: want \"passing\", \"warning\" or \"critical\""),
            )
        })?),
    };
    let interval = duration(&format!("{field}.interval"), &raw.interval, false)?;
    if interval < MIN_CHECK_INTERVAL {
        // However the check came (agent.toml, the local API): a probe a
        // second at most, as Consul's agent.
        return Err(invalid(
            format!("{field}.interval"),
            format!("{:?}: at least 1s", raw.interval),
        ));
    }
    Ok(CheckConfig {
        id,
        kind,
        interval,
        timeout: duration(&format!("{field}.timeout"), &raw.timeout, false)?,
        deregister_critical_service_after,
        name,
        notes,
        status,
        through_api: false,
    })
}

fn cgroup(field: &str, path: &Path) -> Result<PathBuf, Invalid> {
    let ok = !path.as_os_str().is_empty()
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(path.to_path_buf())
    } else {
        Err(invalid(
            field,
            format!(
                "{:?} must be a relative path below cgroup_root, without '..' (e.g. \"weft/api\")",
                path.display().to_string()
            ),
        ))
    }
}

fn service_id(field: &str, id: &str) -> Result<String, Invalid> {
    if id.is_empty()
        || id.len() > 128
        || !id.chars().all(|c| c.is_ascii_graphic())
        || id.contains('/')
    {
        return Err(invalid(
            field,
            format!("{id:?}: an id is 1 to 128 printable ASCII characters without spaces or '/'"),
        ));
    }
    Ok(id.to_string())
}

fn validate(raw: RawConfig) -> Result<AgentConfig, Invalid> {
    let node_name = name("node_name", &raw.node_name)?;
    let datacenter = name("datacenter", &raw.datacenter)?;
    weft_api::catalog::validate_meta("node_meta", &raw.node_meta).map_err(|e| {
        let reason = e.to_string();
        let reason = reason
            .strip_prefix(&format!("{}: ", e.field()))
            .unwrap_or(&reason);
        invalid(e.field(), reason)
    })?;
    let reserved = weft_api::catalog_register::EXTERNAL_NODE_META;
    if raw.node_meta.contains_key(reserved) {
        return Err(invalid(
            format!("node_meta.{reserved}"),
            "marks nodes no agent runs (set by /v1/catalog/register); an agent's node cannot carry it",
        ));
    }
    if raw.servers.is_empty() {
        return Err(invalid(
            "servers",
            "must list at least one server (e.g. [\"10.0.0.1:8502\"])",
        ));
    }
    let servers = raw
        .servers
        .iter()
        .enumerate()
        .map(|(i, s)| host_port(&format!("servers[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    let server_http_port = port("server_http_port", raw.server_http_port)?;
    let advertise_addr = ip_addr("advertise_addr", &raw.advertise_addr)?;
    if raw.data_dir.as_os_str().is_empty() {
        return Err(invalid("data_dir", "must not be empty"));
    }
    if let Some(root) = &raw.cgroup_root {
        if !root.is_absolute() {
            return Err(invalid(
                "cgroup_root",
                format!("{:?} must be an absolute path", root.display().to_string()),
            ));
        }
    }
    let inbound_addr = socket_addr("inbound_addr", &raw.inbound_addr)?;
    let outbound_addr = socket_addr("outbound_addr", &raw.outbound_addr)?;
    let permissive_addr = socket_addr("permissive_addr", &raw.permissive_addr)?;
    if raw.socket_mark == 0 || raw.socket_mark & 0xfff != 0 {
        return Err(invalid(
            "socket_mark",
            format!(
                "{:#x} must be non-zero with its low 12 bits clear (they carry a workload id), e.g. {DEFAULT_SOCKET_MARK:#x}",
                raw.socket_mark
            ),
        ));
    }
    if let Some(dir) = &raw.bpf_pin_dir {
        if !dir.is_absolute() {
            return Err(invalid(
                "bpf_pin_dir",
                format!(
                    "{:?} must be an absolute path on bpffs",
                    dir.display().to_string()
                ),
            ));
        }
    }
    let admin_addr = socket_addr("admin_addr", &raw.admin_addr)?;
    let dns_addr = socket_addr("dns_addr", &raw.dns_addr)?;
    let dns_domain = domain_name("dns_domain", &raw.dns_domain, false)?;
    let dns_alt_domain = domain_name("dns_alt_domain", &raw.dns_alt_domain, true)?;
    if dns_alt_domain == dns_domain {
        return Err(invalid(
            "dns_alt_domain",
            format!("{dns_alt_domain:?} is dns_domain already"),
        ));
    }
    let recursors = recursors(&raw.recursors, dns_addr)?;
    let http_addr = socket_addr("http_addr", &raw.http_addr)?;
    if !http_addr.ip().is_loopback() {
        // Workloads send their tokens to this API in clear text: it must
        // not be reachable from the network (Consul's agent, too, listens
        // on 127.0.0.1 by default).
        return Err(invalid(
            "http_addr",
            format!(
                "{http_addr} is not a loopback address: the local API takes ACL tokens over plain HTTP (e.g. {DEFAULT_HTTP_ADDR:?})"
            ),
        ));
    }
    let drain_timeout = duration("drain_timeout", &raw.drain_timeout, true)?;
    let upgrade_drain_timeout =
        duration("upgrade_drain_timeout", &raw.upgrade_drain_timeout, true)?;
    if raw.token.is_some() && raw.token_file.is_some() {
        return Err(invalid("token_file", "give token or token_file, not both"));
    }
    if raw.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(invalid("token", "must not be empty"));
    }
    let tls_server_name = match raw.tls_server_name {
        Some(n) if n.trim().is_empty() => {
            return Err(invalid("tls_server_name", "must not be empty"))
        }
        Some(n) => n,
        None => weft_api::tls_certs::server_name(&datacenter),
    };
    if !(1..=64).contains(&raw.worker_threads) {
        return Err(invalid(
            "worker_threads",
            format!("{} is not between 1 and 64", raw.worker_threads),
        ));
    }

    if raw.service.len() > MAX_SERVICES {
        return Err(invalid(
            "service",
            format!(
                "{} services; an agent takes at most {MAX_SERVICES} (a workload id fits in the socket mark's low 12 bits)",
                raw.service.len()
            ),
        ));
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut local_ports: HashMap<u16, String> = HashMap::new();
    let mut check_ids: HashMap<String, String> = HashMap::new();
    let mut services = Vec::with_capacity(raw.service.len());
    for (i, s) in raw.service.iter().enumerate() {
        let field = format!("service[{i}]");
        let svc_name = name(&format!("{field}.name"), &s.name)?;
        if svc_name == weft_api::gateway::SERVICE {
            return Err(invalid(
                format!("{field}.name"),
                "\"mesh-gateway\" is the name gateways register under: set [gateway] instead",
            ));
        }
        let id = service_id(&format!("{field}.id"), s.id.as_deref().unwrap_or(&svc_name))?;
        if let Some(first) = ids.insert(id.clone(), i) {
            let hint = if names.contains_key(&svc_name) {
                format!("; two instances of {svc_name:?} on one node need distinct ids")
            } else {
                String::new()
            };
            return Err(invalid(
                format!("{field}.id"),
                format!("id {id:?} is already used by service[{first}]{hint}"),
            ));
        }
        names.entry(svc_name.clone()).or_insert(i);
        let svc_port = port(&format!("{field}.port"), s.port)?;
        let address = ip_addr(&format!("{field}.address"), &s.address)?;
        let cg = match &s.cgroup {
            Some(p) => Some(cgroup(&format!("{field}.cgroup"), p)?),
            None => None,
        };
        for (t, tag) in s.tags.iter().enumerate() {
            if tag.is_empty() || tag.chars().any(char::is_whitespace) {
                return Err(invalid(
                    format!("{field}.tags[{t}]"),
                    format!("{tag:?}: a tag must be non-empty and without spaces"),
                ));
            }
        }
        for key in s.meta.keys() {
            if key.is_empty() {
                return Err(invalid(format!("{field}.meta"), "empty meta key"));
            }
        }
        if s.check.len() > MAX_CHECKS_PER_SERVICE {
            return Err(invalid(
                format!("{field}.check"),
                format!(
                    "{} checks; at most {MAX_CHECKS_PER_SERVICE} per service",
                    s.check.len()
                ),
            ));
        }
        let mut checks = Vec::with_capacity(s.check.len());
        for (c, raw) in s.check.iter().enumerate() {
            let cf = format!("{field}.check[{c}]");
            let id_field = format!("{cf}.id");
            let check_id = check_id(&id_field, raw.id.as_deref(), &id, c, s.check.len())?;
            if let Some(first) = check_ids.insert(check_id.clone(), cf.clone()) {
                return Err(invalid(
                    if raw.id.is_some() { id_field } else { cf },
                    format!("check id {check_id:?} is already used by {first}"),
                ));
            }
            checks.push(check(&cf, raw, check_id)?);
        }
        let mut upstreams = Vec::with_capacity(s.upstream.len());
        for (u, up) in s.upstream.iter().enumerate() {
            let uf = format!("{field}.upstream[{u}]");
            let up_name = name(&format!("{uf}.name"), &up.name)?;
            let local_port = port(&format!("{uf}.local_port"), up.local_port)?;
            if let Some(first) = local_ports.insert(local_port, uf.clone()) {
                return Err(invalid(
                    format!("{uf}.local_port"),
                    format!("local_port {local_port} is already used by {first}"),
                ));
            }
            if local_ports.len() > MAX_UPSTREAM_LISTENERS {
                return Err(invalid(
                    uf,
                    format!(
                        "more than {MAX_UPSTREAM_LISTENERS} upstreams on the node (the eBPF \
                         destinations map keeps that many places for their listeners)"
                    ),
                ));
            }
            let up_dc = match &up.datacenter {
                Some(dc) => Some(name(&format!("{uf}.datacenter"), dc)?),
                None => None,
            };
            upstreams.push(UpstreamConfig {
                name: up_name,
                local_port,
                // This datacenter named is this datacenter.
                datacenter: up_dc.filter(|dc| *dc != datacenter),
            });
        }
        services.push(ServiceConfig {
            id,
            name: svc_name,
            port: svc_port,
            address,
            cgroup: cg,
            tags: s.tags.clone(),
            meta: s.meta.clone(),
            checks,
            upstreams,
        });
    }
    let gateway = raw.gateway.as_ref().map(gateway).transpose()?;
    if let Some(g) = &gateway {
        services.push(gateway_service(g));
    }
    Ok(AgentConfig {
        node_name,
        datacenter,
        node_meta: raw.node_meta,
        servers,
        server_http_port,
        advertise_addr,
        data_dir: raw.data_dir,
        cgroup_root: raw.cgroup_root,
        ebpf: raw.ebpf,
        bpf_pin_dir: raw.bpf_pin_dir,
        egress: raw.egress,
        socket_mark: raw.socket_mark,
        inbound_addr,
        outbound_addr,
        permissive_addr,
        admin_addr,
        dns_addr,
        dns_domain,
        dns_alt_domain,
        recursors,
        http_addr,
        drain_timeout,
        upgrade_drain_timeout,
        worker_threads: raw.worker_threads,
        token: raw.token.map(SecretText::new),
        token_file: raw.token_file,
        ca_file: raw.ca_file,
        tls_server_name,
        services,
        gateway,
    })
}

/// The `mesh-gateway` instance a `[gateway]` registers: at its LAN
/// address, its WAN address in meta, healthy while its node is.
fn gateway_service(g: &GatewayConfig) -> ServiceConfig {
    ServiceConfig {
        id: weft_api::gateway::SERVICE.into(),
        name: weft_api::gateway::SERVICE.into(),
        port: g.lan_address.port(),
        address: g.lan_address.ip(),
        cgroup: None,
        tags: Vec::new(),
        meta: [(
            weft_api::gateway::WAN_META.to_string(),
            g.wan_address.to_string(),
        )]
        .into(),
        checks: Vec::new(),
        upstreams: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------
// Positions and field paths in the text (pure).

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

/// What one line of the file defines, as far as a line-based scan can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LineInfo {
    /// The table the line belongs to, e.g. `service[1].check[0]` (empty: top level).
    table: String,
    /// The key this line (or a multi-line value it continues) sets, if any.
    key: Option<String>,
    /// The line is a `[table]` or `[[array]]` header.
    header: bool,
}

impl LineInfo {
    fn path(&self) -> String {
        match (&self.key, self.table.is_empty()) {
            (Some(k), true) => k.clone(),
            (Some(k), false) => format!("{}.{k}", self.table),
            (None, _) => self.table.clone(),
        }
    }
}

/// Scans the file line by line and tells, for each line, which table and key it
/// belongs to. This is a heuristic good enough for error messages in a hand-written
/// file: headers, `key = value` lines and continuation lines of multi-line values.
fn scan_lines(text: &str) -> Vec<LineInfo> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut table = String::new();
    let mut key: Option<String> = None;
    let mut out = Vec::new();
    for line in text.split('\n') {
        let t = line.trim();
        if let Some(inner) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let (prefix, last) = resolve_prefix(inner, &counts);
            let array = join(&prefix, &last);
            let idx = counts
                .entry(array.clone())
                .and_modify(|n| *n += 1)
                .or_insert(0);
            table = format!("{array}[{idx}]");
            key = None;
            out.push(LineInfo {
                table: table.clone(),
                key: None,
                header: true,
            });
        } else if let Some(inner) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            let (prefix, last) = resolve_prefix(inner, &counts);
            table = join(&prefix, &last);
            key = None;
            out.push(LineInfo {
                table: table.clone(),
                key: None,
                header: true,
            });
        } else {
            if !t.starts_with('#') {
                if let Some((k, _)) = t.split_once('=') {
                    let k = k.trim();
                    let plain = k
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c));
                    if plain && !k.is_empty() {
                        key = Some(unquote_key(k));
                    }
                }
            }
            out.push(LineInfo {
                table: table.clone(),
                key: key.clone(),
                header: false,
            });
        }
    }
    out
}

/// Resolves all but the last segment of a dotted header name against the arrays seen
/// so far (`service.check` → (`service[1]`, `check`)).
fn resolve_prefix(header: &str, counts: &HashMap<String, usize>) -> (String, String) {
    let segments: Vec<String> = header.split('.').map(unquote_key).collect();
    let mut prefix = String::new();
    for seg in &segments[..segments.len() - 1] {
        let candidate = join(&prefix, seg);
        prefix = match counts.get(&candidate) {
            Some(i) => format!("{candidate}[{i}]"),
            None => candidate,
        };
    }
    (prefix, segments[segments.len() - 1].clone())
}

fn join(prefix: &str, seg: &str) -> String {
    if prefix.is_empty() {
        seg.to_string()
    } else {
        format!("{prefix}.{seg}")
    }
}

fn unquote_key(k: &str) -> String {
    k.split('.')
        .map(|s| s.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// The field path (`service[0].check[1].interval`) at a byte offset of the file.
fn field_path_at(text: &str, offset: usize) -> String {
    let (line, _) = line_column(text, offset);
    scan_lines(text)
        .get(line - 1)
        .map(LineInfo::path)
        .unwrap_or_default()
}

/// The 1-based line where a field path is set, or failing that where its closest
/// enclosing field or table is; `None` when nothing of it appears in the file.
fn line_of_field(text: &str, field: &str) -> Option<usize> {
    let lines = scan_lines(text);
    let mut path = field.to_string();
    loop {
        let hit = lines.iter().position(|l| {
            (l.key.is_some() && !l.header && l.path() == path) || (l.header && l.table == path)
        });
        if let Some(i) = hit {
            return Some(i + 1);
        }
        // Drop the last `[n]` or `.key` and try the enclosing field.
        let cut = path.rfind(['.', '['])?;
        path.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
node_name = "node-a"
datacenter = "dc1"
servers = ["10.77.0.1:8502", "server-2.example:8502", "[fd00::1]:8502"]
advertise_addr = "10.77.0.2"
data_dir = "/var/lib/weft-agent"
cgroup_root = "/sys/fs/cgroup/unified"
ebpf = true
drain_timeout = "10s"

[[service]]
name = "api"
port = 8080
address = "127.0.0.1"
cgroup = "weft/api"
tags = ["v1"]
meta = { version = "v1" }
  [[service.check]]
  http = "http://127.0.0.1:8080/healthz"
  interval = "2s"
  timeout = "1s"
  [[service.check]]
  ttl = "30s"
  [[service.upstream]]
  name = "db"
  local_port = 9191

[[service]]
id = "web-1"
name = "web"
port = 9000
  [[service.check]]
  tcp = "127.0.0.1:9000"
  [[service.check]]
  grpc = "127.0.0.1:9001/web.Health"
  [[service.check]]
  grpc = "localhost:9001"
  [[service.upstream]]
  name = "api"
  local_port = 9192
"#;

    const MINIMAL: &str = r#"
node_name = "node-a"
datacenter = "dc1"
servers = ["10.77.0.1:8502"]
advertise_addr = "10.77.0.2"
data_dir = "/var/lib/weft-agent"
"#;

    #[test]
    fn a_gateways_lan_and_wan_addresses_are_on_different_ips() {
        let with = |lan: &str, wan: &str| {
            parse(&format!(
                "{MINIMAL}\n[gateway]\nlan_address = {lan:?}\nwan_address = {wan:?}\n"
            ))
        };
        for (lan, wan) in [
            ("10.77.0.2:8443", "10.77.0.2:8443"),
            ("203.0.113.5:8443", "203.0.113.5:8444"),
            ("[::ffff:203.0.113.5]:8443", "203.0.113.5:8444"),
        ] {
            let e = with(lan, wan).unwrap_err().to_string();
            assert!(
                e.contains("gateway.wan_address") && e.contains("another IP"),
                "{lan} {wan}: {e}"
            );
        }
        assert!(with("10.77.0.2:8443", "203.0.113.5:8443").is_ok());
        let e = with("[::ffff:0.0.0.0]:8443", "203.0.113.5:8443").unwrap_err();
        assert!(e.to_string().contains("definite IP"), "{e}");
    }

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, "agent.toml")
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// MINIMAL plus `extra` appended.
    fn with(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    #[test]
    fn data_path_settings_default_to_allow_and_the_weft_mark() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.egress, EgressPolicy::Allow);
        assert_eq!(c.socket_mark, DEFAULT_SOCKET_MARK);
        assert_eq!(c.bpf_pin_dir, None);
        assert_eq!(c.permissive_addr, DEFAULT_PERMISSIVE_ADDR.parse().unwrap());
        let c = parse(&with(
            "egress = \"deny\"\nsocket_mark = 0x7000\nbpf_pin_dir = \"/sys/fs/bpf/w\"\n",
        ))
        .unwrap();
        assert_eq!(c.egress, EgressPolicy::Deny);
        assert_eq!(c.socket_mark, 0x7000);
    }

    #[test]
    fn a_check_may_deregister_its_service_after_being_critical() {
        let service = "[[service]]\nname = \"api\"\nport = 8080\n  [[service.check]]\n  tcp = \"127.0.0.1:8080\"\n";
        let c = parse(&with(&format!(
            "{service}  deregister_critical_service_after = \"90s\"\n"
        )))
        .unwrap();
        assert_eq!(
            c.services[0].checks[0].deregister_critical_service_after,
            Some(Duration::from_secs(90))
        );
        let e = err(&with(&format!(
            "{service}  deregister_critical_service_after = \"10ms\"\n"
        )));
        assert!(
            e.contains("service[0].check[0].deregister_critical_service_after"),
            "{e}"
        );
    }

    #[test]
    fn bad_data_path_settings_name_their_field() {
        assert!(err(&with("egress = \"open\"\n")).contains("egress"));
        for mark in ["0", "0x3001"] {
            let e = err(&with(&format!("socket_mark = {mark}\n")));
            assert!(
                e.contains("socket_mark") && e.contains("low 12 bits"),
                "{e}"
            );
        }
        let e = err(&with("bpf_pin_dir = \"weft\"\n"));
        assert!(e.contains("bpf_pin_dir"), "{e}");
    }

    #[test]
    fn full_example_parses() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.datacenter, "dc1");
        assert_eq!(c.servers.len(), 3);
        assert_eq!(c.advertise_addr, "10.77.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/weft-agent"));
        assert_eq!(c.cgroup_root, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert!(c.ebpf);
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.inbound_addr, "0.0.0.0:15008".parse().unwrap());
        assert_eq!(c.services.len(), 2);

        let api = &c.services[0];
        assert_eq!(api.id, "api");
        assert_eq!(api.name, "api");
        assert_eq!(api.port, 8080);
        assert_eq!(api.cgroup, Some(PathBuf::from("weft/api")));
        assert_eq!(api.tags, vec!["v1"]);
        assert_eq!(api.meta.get("version").map(String::as_str), Some("v1"));
        assert_eq!(
            api.checks[0],
            CheckConfig {
                id: "service:api:1".into(),
                kind: CheckKind::Http {
                    url: "http://127.0.0.1:8080/healthz".into()
                },
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                deregister_critical_service_after: None,
                name: None,
                notes: None,
                status: None,
                through_api: false,
            }
        );
        assert_eq!(
            api.checks[1].kind,
            CheckKind::Ttl {
                ttl: Duration::from_secs(30)
            }
        );
        assert_eq!(api.checks[1].interval, Duration::from_secs(10));
        assert_eq!(api.checks[1].timeout, Duration::from_secs(2));
        assert_eq!(
            api.upstreams,
            vec![UpstreamConfig {
                name: "db".into(),
                local_port: 9191,
                datacenter: None,
            }]
        );

        let web = &c.services[1];
        assert_eq!(web.id, "web-1");
        assert_eq!(web.address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(web.cgroup, None);
        assert_eq!(
            web.checks[0].kind,
            CheckKind::Tcp {
                addr: "127.0.0.1:9000".into()
            }
        );
        assert_eq!(
            web.checks[1].kind,
            CheckKind::Grpc {
                addr: "127.0.0.1:9001".into(),
                service: "web.Health".into()
            }
        );
        assert_eq!(
            web.checks[2].kind,
            CheckKind::Grpc {
                addr: "localhost:9001".into(),
                service: String::new()
            }
        );
        // Serializes for the admin /config dump.
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["services"][0]["checks"][0]["interval"], "2s");
        assert_eq!(
            json["services"][0]["checks"][1]["kind"]["ttl"]["ttl"],
            "30s"
        );
    }

    #[test]
    fn defaults() {
        let c = parse(&with("[[service]]\nname = \"api\"\nport = 1\n")).unwrap();
        assert_eq!(c.cgroup_root, None);
        assert!(c.ebpf);
        assert_eq!(c.inbound_addr, "0.0.0.0:15008".parse().unwrap());
        assert_eq!(c.outbound_addr, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(c.admin_addr, "127.0.0.1:15020".parse().unwrap());
        assert_eq!(c.dns_addr, "127.0.0.1:8600".parse().unwrap());
        assert_eq!(c.http_addr, "127.0.0.1:8500".parse().unwrap());
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.upgrade_drain_timeout, Duration::from_secs(600));
        let s = &c.services[0];
        assert_eq!(s.id, "api");
        assert_eq!(s.address, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert!(s.tags.is_empty() && s.meta.is_empty());
        assert!(s.checks.is_empty() && s.upstreams.is_empty());
    }

    #[test]
    fn load_reads_a_file_and_names_it_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, FULL).unwrap();
        assert_eq!(AgentConfig::load(&path).unwrap().node_name, "node-a");
        let missing = dir.path().join("nope.toml");
        let e = AgentConfig::load(&missing).unwrap_err().to_string();
        assert!(e.starts_with(&missing.display().to_string()), "{e}");
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let e = parse("node_name = \"a\"\ndatacenter = = \"x\"\n").unwrap_err();
        match &e {
            ConfigError::Syntax { line, column, .. } => {
                assert_eq!((*line, *column), (2, 14), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with("agent.toml:2:14: "), "{e}");
    }

    #[test]
    fn unknown_top_level_field() {
        let e = err(&with("colour = \"blue\"\n"));
        assert!(
            e.starts_with("agent.toml:7:1: colour: unknown field `colour`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_field_in_check_names_the_path() {
        let e = err(&with(
            "[[service]]\nname = \"a\"\nport = 1\n[[service]]\nname = \"b\"\nport = 2\n  [[service.check]]\n  tcp = \"h:1\"\n  [[service.check]]\n  tcp = \"h:1\"\n  intervall = \"1s\"\n",
        ));
        assert!(
            e.starts_with(
                "agent.toml:17:3: service[1].check[1].intervall: unknown field `intervall`"
            ),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_field_line_and_column() {
        let e = err(&with("[[service]]\nname = \"a\"\nport = \"80\"\n"));
        assert!(
            e.starts_with("agent.toml:9:8: service[0].port: invalid type"),
            "{e}"
        );
        let e = err(&with("[[service]]\nname = \"a\"\nport = 70000\n"));
        assert!(e.starts_with("agent.toml:9:8: service[0].port: "), "{e}");
        let e = err(&with("ebpf = \"yes\"\n"));
        assert!(e.starts_with("agent.toml:7:8: ebpf: invalid type"), "{e}");
    }

    #[test]
    fn missing_field() {
        let e = err("node_name = \"a\"\n");
        assert!(e.contains("missing field `datacenter`"), "{e}");
        assert!(e.starts_with("agent.toml:"), "{e}");
        let e = err(&with("[[service]]\nport = 1\n"));
        assert!(e.contains("missing field `name`"), "{e}");
        assert!(e.contains("service[0]"), "{e}");
    }

    #[test]
    fn duplicate_key_is_a_syntax_error() {
        let e = err(&with("ebpf = true\nebpf = false\n"));
        assert!(e.starts_with("agent.toml:8:1: ebpf: "), "{e}");
    }

    #[test]
    fn bad_names() {
        let e = err(&MINIMAL.replace("node-a", "Node_A"));
        assert!(
            e.starts_with("agent.toml:2: node_name: invalid name \"Node_A\": bad character 'N'"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("dc1", "-dc"));
        assert!(
            e.starts_with("agent.toml:3: datacenter: invalid name \"-dc\""),
            "{e}"
        );
        let e = err(&with("[[service]]\nname = \"API\"\nport = 1\n"));
        assert!(
            e.starts_with("agent.toml:8: service[0].name: invalid name \"API\""),
            "{e}"
        );
        let e = err(&with(
            "[[service]]\nname = \"a\"\nport = 1\n[[service.upstream]]\nname = \"\"\nlocal_port = 1\n",
        ));
        assert!(
            e.starts_with(
                "agent.toml:11: service[0].upstream[0].name: invalid name \"\": must not be empty"
            ),
            "{e}"
        );
    }

    #[test]
    fn servers() {
        let e = err(&MINIMAL.replace("[\"10.77.0.1:8502\"]", "[]"));
        assert!(
            e.starts_with("agent.toml:4: servers: must list at least one server"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("[\"10.77.0.1:8502\"]", "[\"a:1\", \"10.77.0.1\"]"));
        assert!(
            e.starts_with("agent.toml:4: servers[1]: \"10.77.0.1\" is not HOST:PORT (no port"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("10.77.0.1:8502", "h:0"));
        assert!(
            e.contains("servers[0]: \"h:0\" is not HOST:PORT (port must not be 0"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("10.77.0.1:8502", "h:http"));
        assert!(
            e.contains("servers[0]: \"h:http\" is not HOST:PORT (port must be a number"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("10.77.0.1:8502", ":8502"));
        assert!(
            e.contains("servers[0]: \":8502\" is not HOST:PORT (bad host"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("10.77.0.1:8502", "[zz]:8502"));
        assert!(e.contains("(bad host"), "{e}");
    }

    #[test]
    fn addresses() {
        let e = err(&MINIMAL.replace("\"10.77.0.2\"", "\"node-a.local\""));
        assert!(
            e.starts_with("agent.toml:5: advertise_addr: \"node-a.local\" is not an IP address"),
            "{e}"
        );
        for field in [
            "inbound_addr",
            "outbound_addr",
            "admin_addr",
            "dns_addr",
            "http_addr",
        ] {
            let e = err(&with(&format!("{field} = \"localhost:1\"\n")));
            assert!(
                e.starts_with(&format!(
                    "agent.toml:7: {field}: \"localhost:1\" is not an IP:PORT address"
                )),
                "{e}"
            );
        }
        let e = err(&with(
            "[[service]]\nname = \"a\"\nport = 1\naddress = \"x\"\n",
        ));
        assert!(
            e.starts_with("agent.toml:10: service[0].address: \"x\" is not an IP address"),
            "{e}"
        );
    }

    #[test]
    fn http_addr_is_loopback_only() {
        let c = parse(&with("http_addr = \"127.0.0.2:8501\"\n")).unwrap();
        assert_eq!(c.http_addr, "127.0.0.2:8501".parse().unwrap());
        let c = parse(&with("http_addr = \"[::1]:8500\"\n")).unwrap();
        assert_eq!(c.http_addr, "[::1]:8500".parse().unwrap());
        for addr in ["0.0.0.0:8500", "10.77.0.2:8500", "[::]:8500"] {
            let e = err(&with(&format!("http_addr = {addr:?}\n")));
            assert!(
                e.starts_with(&format!(
                    "agent.toml:7: http_addr: {} is not a loopback address",
                    addr.parse::<SocketAddr>().unwrap()
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn check_ids_default_to_consuls_scheme_and_are_unique() {
        let c = parse(FULL).unwrap();
        let ids: Vec<&str> = c
            .services
            .iter()
            .flat_map(|s| s.checks.iter().map(|c| c.id.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                "service:api:1",
                "service:api:2",
                "service:web-1:1",
                "service:web-1:2",
                "service:web-1:3"
            ]
        );
        let one = "[[service]]\nname = \"a\"\nport = 1\n[[service.check]]\nttl = \"5s\"\n";
        assert_eq!(
            parse(&with(one)).unwrap().services[0].checks[0].id,
            "service:a"
        );
        let named = format!("{one}id = \"a-ttl\"\n");
        assert_eq!(
            parse(&with(&named)).unwrap().services[0].checks[0].id,
            "a-ttl"
        );
        let e = err(&with(&format!("{one}id = \"a/ttl\"\n")));
        assert!(
            e.starts_with("agent.toml:12: service[0].check[0].id: \"a/ttl\": a check id is"),
            "{e}"
        );
        // An explicit id may not take another check's (default) id.
        let e = err(&with(&format!(
            "{one}[[service]]\nname = \"b\"\nport = 2\n[[service.check]]\nttl = \"5s\"\nid = \"service:a\"\n"
        )));
        assert!(
            e.contains(
                "service[1].check[0].id: check id \"service:a\" is already used by service[0].check[0]"
            ),
            "{e}"
        );
        // Serialized for /config.
        let json = serde_json::to_value(parse(&with(&named)).unwrap()).unwrap();
        assert_eq!(json["services"][0]["checks"][0]["id"], "a-ttl");
    }

    #[test]
    fn paths() {
        let e = err(&with("cgroup_root = \"sys/fs/cgroup\"\n"));
        assert!(
            e.starts_with("agent.toml:7: cgroup_root: \"sys/fs/cgroup\" must be an absolute path"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("/var/lib/weft-agent", ""));
        assert!(
            e.starts_with("agent.toml:6: data_dir: must not be empty"),
            "{e}"
        );
        for bad in ["/weft/api", "../x", ""] {
            let e = err(&with(&format!(
                "[[service]]\nname = \"a\"\nport = 1\ncgroup = \"{bad}\"\n"
            )));
            assert!(e.starts_with("agent.toml:10: service[0].cgroup: "), "{e}");
            assert!(
                e.contains("must be a relative path below cgroup_root"),
                "{e}"
            );
        }
    }

    #[test]
    fn ports() {
        let e = err(&with("[[service]]\nname = \"a\"\nport = 0\n"));
        assert!(
            e.starts_with("agent.toml:9: service[0].port: port must not be 0"),
            "{e}"
        );
        let e = err(&with(
            "[[service]]\nname = \"a\"\nport = 1\n[[service.upstream]]\nname = \"b\"\nlocal_port = 0\n",
        ));
        assert!(
            e.starts_with("agent.toml:12: service[0].upstream[0].local_port: port must not be 0"),
            "{e}"
        );
    }

    #[test]
    fn local_ports_unique_across_the_file() {
        let e = err(&with(
            "[[service]]\nname = \"a\"\nport = 1\n[[service.upstream]]\nname = \"b\"\nlocal_port = 9000\n\
             [[service]]\nname = \"c\"\nport = 2\n[[service.upstream]]\nname = \"d\"\nlocal_port = 9001\n\
             [[service.upstream]]\nname = \"e\"\nlocal_port = 9000\n",
        ));
        assert!(
            e.starts_with("agent.toml:21: service[1].upstream[1].local_port: local_port 9000 is already used by service[0].upstream[0]"),
            "{e}"
        );
    }

    #[test]
    fn upstream_listeners_are_bounded_by_their_room_in_the_map() {
        let upstreams = |n: usize| {
            let mut text = "[[service]]\nname = \"a\"\nport = 1\n".to_string();
            for i in 0..n {
                text += &format!(
                    "[[service.upstream]]\nname = \"b\"\nlocal_port = {}\n",
                    10_000 + i
                );
            }
            with(&text)
        };
        parse(&upstreams(MAX_UPSTREAM_LISTENERS)).unwrap();
        let e = err(&upstreams(MAX_UPSTREAM_LISTENERS + 1));
        assert!(
            e.contains("service[0].upstream[1024]: more than 1024 upstreams on the node"),
            "{e}"
        );
    }

    #[test]
    fn service_ids_unique_and_names_may_repeat_with_distinct_ids() {
        let e = err(&with(
            "[[service]]\nname = \"a\"\nport = 1\n[[service]]\nname = \"a\"\nport = 2\n",
        ));
        assert!(
            e.starts_with(
                "agent.toml:10: service[1].id: id \"a\" is already used by service[0]; two instances of \"a\" on one node need distinct ids"
            ),
            "{e}"
        );
        let two = AgentConfig::parse(
            &with("[[service]]\nid = \"a-1\"\nname = \"a\"\nport = 1\n[[service]]\nid = \"a-2\"\nname = \"a\"\nport = 2\n"),
            "agent.toml",
        )
        .unwrap();
        assert_eq!(two.services.len(), 2);
        let e = err(&with(
            "[[service]]\nname = \"a\"\nport = 1\n[[service]]\nid = \"a\"\nname = \"b\"\nport = 2\n",
        ));
        assert!(
            e.starts_with("agent.toml:11: service[1].id: id \"a\" is already used by service[0]"),
            "{e}"
        );
        let e = err(&with("[[service]]\nid = \"a b\"\nname = \"a\"\nport = 1\n"));
        assert!(
            e.starts_with("agent.toml:8: service[0].id: \"a b\": an id is"),
            "{e}"
        );
    }

    #[test]
    fn tags_and_meta() {
        let e = err(&with(
            "[[service]]\nname = \"a\"\nport = 1\ntags = [\"ok\", \"\"]\n",
        ));
        assert!(
            e.starts_with("agent.toml:10: service[0].tags[1]: \"\": a tag must be non-empty"),
            "{e}"
        );
        let e = err(&with(
            "[[service]]\nname = \"a\"\nport = 1\nmeta = { \"\" = \"x\" }\n",
        ));
        assert!(
            e.starts_with("agent.toml:10: service[0].meta: empty meta key"),
            "{e}"
        );
    }

    #[test]
    fn dns_domains_default_to_weft_and_consul_and_are_checked() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.dns_domains(), ["weft", "consul"]);
        let c = parse(&format!(
            "dns_domain = \"Mesh.Example.\"\ndns_alt_domain = \"\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.dns_domains(), ["mesh.example"]);
        let e = err(&format!("dns_domain = \"a..b\"\n{MINIMAL}"));
        assert!(e.contains("dns_domain"), "{e}");
        let e = err(&format!("dns_alt_domain = \"weft\"\n{MINIMAL}"));
        assert!(
            e.contains("dns_alt_domain: \"weft\" is dns_domain already"),
            "{e}"
        );
    }

    #[test]
    fn recursors_take_ips_with_or_without_a_port_and_never_the_agent_itself() {
        let c = parse(&format!(
            "recursors = [\"10.0.0.53\", \"127.0.0.2:5353\"]\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.recursors,
            [
                "10.0.0.53:53".parse().unwrap(),
                "127.0.0.2:5353".parse::<SocketAddr>().unwrap()
            ]
        );
        assert!(parse(MINIMAL).unwrap().recursors.is_empty());
        for (bad, says) in [
            ("\"dns.example\"", "not an IP"),
            ("\"127.0.0.1:8600\"", "own DNS address"),
            ("\"0.0.0.0\"", "no address"),
            ("\"[::ffff:127.0.0.1]:8600\"", "own DNS address"),
        ] {
            let e = err(&format!("recursors = [{bad}]\n{MINIMAL}"));
            assert!(e.contains("recursors") && e.contains(says), "{bad}: {e}");
        }
        let many = ["\"10.0.0.1\""; 9].join(", ");
        let e = err(&format!("recursors = [{many}]\n{MINIMAL}"));
        assert!(e.contains("at most 8"), "{e}");
        // Off loopback, recursion would serve the network: refused.
        for dns_addr in ["0.0.0.0:53", "10.77.0.2:8600", "[::]:53"] {
            let e = err(&format!(
                "dns_addr = {dns_addr:?}\nrecursors = [\"10.0.0.53\"]\n{MINIMAL}"
            ));
            assert!(
                e.contains("recursors: with dns_addr") && e.contains("open resolver"),
                "{dns_addr}: {e}"
            );
            let c = parse(&format!("dns_addr = {dns_addr:?}\n{MINIMAL}")).unwrap();
            assert!(c.recursors.is_empty());
        }
    }

    #[test]
    fn node_meta_is_checked_as_the_catalog_checks_it() {
        let c = parse(&format!(
            "node_meta = {{ rack = \"r1\", \"zone-a\" = \"x\" }}\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.node_meta.get("rack").map(String::as_str), Some("r1"));
        let e = err(&format!("node_meta = {{ \"bad key\" = \"x\" }}\n{MINIMAL}"));
        assert!(e.contains("node_meta.bad key: bad character ' '"), "{e}");
    }

    fn check_err(check: &str) -> String {
        err(&with(&format!(
            "[[service]]\nname = \"a\"\nport = 1\n[[service]]\nname = \"b\"\nport = 2\n[[service.check]]\ntcp = \"h:1\"\n[[service.check]]\n{check}\n"
        )))
    }

    #[test]
    fn check_needs_exactly_one_kind() {
        let e = check_err("interval = \"1s\"");
        assert_eq!(
            e,
            "agent.toml:15: service[1].check[1]: exactly one of http, tcp, grpc, ttl"
        );
        let e = check_err("tcp = \"h:1\"\nttl = \"5s\"");
        assert_eq!(
            e,
            "agent.toml:15: service[1].check[1]: exactly one of http, tcp, grpc, ttl"
        );
    }

    #[test]
    fn check_values() {
        let e = check_err("http = \"https://h/x\"");
        assert!(e.starts_with("agent.toml:16: service[1].check[1].http: \"https://h/x\": https checks are not supported"), "{e}");
        let e = check_err("http = \"h:80/x\"");
        assert!(e.contains("service[1].check[1].http: \"h:80/x\""), "{e}");
        let e = check_err("http = \"/healthz\"");
        assert!(e.contains("must be an http:// URL with a host"), "{e}");
        let e = check_err("tcp = \"localhost\"");
        assert!(
            e.starts_with("agent.toml:16: service[1].check[1].tcp: \"localhost\" is not HOST:PORT"),
            "{e}"
        );
        let e = check_err("grpc = \"h:1/\"");
        assert!(
            e.starts_with("agent.toml:16: service[1].check[1].grpc: \"h:1/\": empty service name"),
            "{e}"
        );
        let e = check_err("grpc = \"h/svc\"");
        assert!(
            e.contains("service[1].check[1].grpc: \"h\" is not HOST:PORT"),
            "{e}"
        );
        let e = check_err("ttl = \"soon\"");
        assert!(
            e.starts_with("agent.toml:16: service[1].check[1].ttl: invalid duration \"soon\""),
            "{e}"
        );
        let e = check_err("ttl = \"0\"");
        assert!(
            e.starts_with(
                "agent.toml:16: service[1].check[1].ttl: \"0\" must be greater than zero"
            ),
            "{e}"
        );
        let e = check_err("tcp = \"h:1\"\ninterval = \"100ms\"");
        assert!(e.contains("interval: \"100ms\": at least 1s"), "{e}");
        let e = check_err("tcp = \"h:1\"\ninterval = \"5\"");
        assert!(
            e.starts_with(
                "agent.toml:17: service[1].check[1].interval: invalid duration \"5\": missing unit"
            ),
            "{e}"
        );
        let e = check_err("tcp = \"h:1\"\ntimeout = \"0s\"");
        assert!(
            e.starts_with(
                "agent.toml:17: service[1].check[1].timeout: \"0s\" must be greater than zero"
            ),
            "{e}"
        );
    }

    #[test]
    fn credentials_fields() {
        let e = err(&with("token = \"abc\"\ntoken_file = \"/etc/weft/token\"\n"));
        assert!(
            e.contains("token_file: give token or token_file, not both"),
            "{e}"
        );
        let e = err(&with("token = \"  \"\n"));
        assert!(e.contains("token: must not be empty"), "{e}");
        let c = parse(&with(
            "token = \"s3cret\"\nca_file = \"/etc/weft/ca.pem\"\n",
        ))
        .unwrap();
        assert_eq!(c.token.as_ref().map(SecretText::expose), Some("s3cret"));
        assert_eq!(c.tls_server_name, "server.dc1.weft");
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the token shows in debug output"
        );
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            !json.contains("s3cret"),
            "the token is serialized (as /config shows it)"
        );
        let c = parse(&with("tls_server_name = \"server.east.example\"\n")).unwrap();
        assert_eq!(c.tls_server_name, "server.east.example");
    }

    #[test]
    fn server_http_port() {
        assert_eq!(parse(MINIMAL).unwrap().server_http_port, 8500);
        let c = parse(&with("server_http_port = 8501\n")).unwrap();
        assert_eq!(c.server_http_port, 8501);
        let e = err(&with("server_http_port = 0\n"));
        assert!(e.contains("server_http_port: port must not be 0"), "{e}");
        assert!(err(&with("server_http_port = 70000\n")).contains("server_http_port"));
    }

    #[test]
    fn drain_timeout() {
        let e = err(&with("drain_timeout = \"5 s\"\n"));
        assert!(
            e.starts_with("agent.toml:7: drain_timeout: invalid duration \"5 s\""),
            "{e}"
        );
        let c = parse(&with("drain_timeout = \"0\"\n")).unwrap();
        assert_eq!(c.drain_timeout, Duration::ZERO);
        let e = err(&with("upgrade_drain_timeout = \"soon\"\n"));
        assert!(
            e.starts_with("agent.toml:7: upgrade_drain_timeout: invalid duration"),
            "{e}"
        );
    }

    #[test]
    fn line_column_counts_characters() {
        let text = "a\nµb = 1\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 2), (2, 1));
        assert_eq!(line_column(text, 4), (2, 2)); // after the two-byte µ
        assert_eq!(line_column(text, 1000), (3, 1));
    }

    #[test]
    fn scan_resolves_nested_arrays_and_multiline_values() {
        let text = "servers = [\n  \"a\",\n]\n[[service]]\n[[service]]\nname = 1\n[[service.check]]\n[[service.check]]\nhttp = 2\n[[service]]\n[[service.check]]\n";
        let paths: Vec<String> = scan_lines(text).iter().map(LineInfo::path).collect();
        assert_eq!(paths[1], "servers");
        assert_eq!(paths[5], "service[1].name");
        assert_eq!(paths[8], "service[1].check[1].http");
        assert_eq!(paths[10], "service[2].check[0]");
        assert_eq!(line_of_field(text, "service[1].check[1].http"), Some(9));
        assert_eq!(line_of_field(text, "service[1].check[1].tcp"), Some(8));
        assert_eq!(line_of_field(text, "servers[3]"), Some(1));
        assert_eq!(line_of_field(text, "nothing"), None);
    }
}
