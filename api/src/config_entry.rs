//! Config entries, with Consul's kinds and PascalCase field names:
//! `proxy-defaults`, `service-defaults`, `service-router`, `service-splitter`,
//! `service-resolver`.
//! Reading them from JSON or TOML files, validating them on write against the rest
//! of the configuration, and the pure choices they drive (which route, which split,
//! which instances form a subset).
//!
//! A file names its kind in `Kind`; unknown kinds and unknown fields are errors:
//!
//! ```toml
//! Kind = "service-splitter"
//! Name = "api"
//! Splits = [ { Weight = 90, ServiceSubset = "v1" }, { Weight = 10, ServiceSubset = "v2" } ]
//! ```

mod keys;

pub use keys::{kind_of as document_kind, name_of as document_name};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::catalog::{HealthStatus, ServiceInstance};
use crate::compiled::Compiled;
use crate::file_format::{parse_document, FileFormat, ParseError};
use crate::filter::Filter;
use std::time::Duration;

/// Datacenters (or targets) one failover may list.
pub const MAX_FAILOVER_DATACENTERS: usize = 16;
use crate::header_edits::{HeaderEditError, HeaderModifiers};
use crate::http_match::{
    check_rule_paths, validate_http_match, HttpMatch, HttpMatchError, Request,
};
use crate::intention::Intention;
use crate::load_balancer::LoadBalancer;
use crate::names::{validate_name, NameError, WILDCARD};

/// The protocol a service speaks, set by its `service-defaults` (default `tcp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    /// Whether L7 features (routers, splitters, L7 intentions) apply.
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = ConfigEntryError;
    fn from_str(s: &str) -> Result<Self, ConfigEntryError> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "http" => Ok(Protocol::Http),
            "http2" => Ok(Protocol::Http2),
            "grpc" => Ok(Protocol::Grpc),
            _ => Err(invalid(
                "Protocol",
                format!("{s:?} is not one of tcp, http, http2, grpc"),
            )),
        }
    }
}

/// `service-defaults`: per-service settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ServiceDefaults {
    pub name: String,
    /// Consul's `Meta`: the operator's own key/value pairs, kept and shown.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// None: the `protocol` of `proxy-defaults`, else tcp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// How this service's agents treat the services it calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_config: Option<UpstreamConfig>,
    /// How this service reaches other datacenters' instances (its
    /// upstreams' own setting wins; proxy-defaults' is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_gateway: Option<MeshGatewayConfig>,
    /// Consul's `MutualTLSMode`: whether the service's instances accept only
    /// mutual-TLS tunnels from the mesh (`strict`, the default) or also
    /// plaintext through their agent (`permissive`, for migrations).
    #[serde(
        default,
        rename = "MutualTLSMode",
        skip_serializing_if = "MutualTlsMode::is_default"
    )]
    pub mutual_tls_mode: MutualTlsMode,
}

/// How a service's instances take connections that do not come over the
/// mesh (`MutualTLSMode` of service-defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MutualTlsMode {
    /// Only mutual-TLS tunnels from the mesh; everything else is refused in
    /// the kernel. Consul's `""` (default) means strict here.
    #[default]
    #[serde(rename = "strict", alias = "")]
    Strict,
    /// Plaintext connections from other hosts are also admitted, through the
    /// agent: their source is unauthenticated, so only intentions from `*`
    /// can allow them.
    #[serde(rename = "permissive")]
    Permissive,
}

impl MutualTlsMode {
    fn is_default(&self) -> bool {
        *self == MutualTlsMode::Strict
    }
}

/// `UpstreamConfig` of a service-defaults entry: how the service's agents
/// treat the services it calls.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct UpstreamConfig {
    /// For every upstream of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<UpstreamDefaults>,
    /// For the upstreams they name, instead of `Defaults`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<UpstreamOverride>,
}

/// `UpstreamConfig.Defaults`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct UpstreamDefaults {
    /// How long opening a connection to an instance may take, in
    /// milliseconds (the upstream's resolver `ConnectTimeout` wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_health_check: Option<PassiveHealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_gateway: Option<MeshGatewayConfig>,
}

/// Consul's `MeshGateway`: which gateway a tunnel to another datacenter's
/// instance is dialed to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct MeshGatewayConfig {
    #[serde(default)]
    pub mode: MeshGatewayMode,
}

/// `local` (the default, also for `""`): one of this datacenter's gateways,
/// which sends it on to the other datacenter's; `remote`: one of the other
/// datacenter's gateways directly (the node must reach their WAN
/// addresses). Consul's `none` (straight to the remote node) is refused:
/// agents do not know other datacenters' node addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MeshGatewayMode {
    #[default]
    #[serde(rename = "local", alias = "")]
    Local,
    #[serde(rename = "remote")]
    Remote,
    #[serde(rename = "none")]
    None,
}

/// One of `UpstreamConfig.Overrides`: the settings for the upstream `Name`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct UpstreamOverride {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_health_check: Option<PassiveHealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_gateway: Option<MeshGatewayConfig>,
}

/// Circuit breaking by limits (Consul's `Limits`, Envoy's circuit breaker
/// thresholds), counted per calling service on one agent, over all of the
/// upstream's instances. A connection or request past a limit is refused at
/// once (503 with `x-envoy-overloaded` for a request; a reset for a TCP
/// connection). Absent: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Limits {
    /// Open connections to the upstream's instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// HTTP requests waiting for a connection to an instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// HTTP requests in flight to the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
}

/// Circuit breaking by outlier detection: an instance that fails
/// `MaxFailures` times in a row (connections refused, 5xx answers) is left
/// out of balancing, with Envoy's semantics for the other fields.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct PassiveHealthCheck {
    pub max_failures: u32,
    /// How often ejections are reviewed: an ejected instance returns at the
    /// first review after its ejection time, and an instance that stayed in
    /// for a whole interval has one past ejection forgotten. 10 s when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Compiled<Duration>>,
    /// The base ejection time; the real one is it times the number of
    /// times the instance was ejected, at most 300 s (or the base, if
    /// longer). A duration such as `"30s"`; 30 s when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Compiled<Duration>>,
    /// The chance, in percent, that reaching `MaxFailures` ejects (100 when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcing_consecutive_5xx: Option<u32>,
    /// At most this percentage of the upstream's instances is left out at
    /// once, but always at least one (10 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

impl UpstreamConfig {
    /// The settings for upstream `service`: its override, else the defaults.
    /// (A field an override sets wins; the others come from the defaults,
    /// as Consul merges them.)
    pub fn for_upstream(&self, service: &str) -> Option<UpstreamSettings<'_>> {
        let defaults = self.defaults.as_ref().map(UpstreamDefaults::settings);
        let Some(o) = self.overrides.iter().find(|o| o.name == service) else {
            return defaults;
        };
        let (o, base) = (o.settings(), defaults.unwrap_or_default());
        Some(UpstreamSettings {
            connect_timeout_ms: o.connect_timeout_ms.or(base.connect_timeout_ms),
            limits: o.limits.or(base.limits),
            passive_health_check: o.passive_health_check.or(base.passive_health_check),
            mesh_gateway: o.mesh_gateway.or(base.mesh_gateway),
        })
    }
}

impl UpstreamDefaults {
    pub fn settings(&self) -> UpstreamSettings<'_> {
        UpstreamSettings {
            connect_timeout_ms: self.connect_timeout_ms,
            limits: self.limits.as_ref(),
            passive_health_check: self.passive_health_check.as_ref(),
            mesh_gateway: self.mesh_gateway.as_ref().map(|m| m.mode),
        }
    }
}

impl UpstreamOverride {
    /// What this override sets (without the defaults).
    pub fn settings(&self) -> UpstreamSettings<'_> {
        UpstreamSettings {
            connect_timeout_ms: self.connect_timeout_ms,
            limits: self.limits.as_ref(),
            passive_health_check: self.passive_health_check.as_ref(),
            mesh_gateway: self.mesh_gateway.as_ref().map(|m| m.mode),
        }
    }
}

/// The upstream settings that apply to one (caller, upstream) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamSettings<'a> {
    pub connect_timeout_ms: Option<u64>,
    pub limits: Option<&'a Limits>,
    pub passive_health_check: Option<&'a PassiveHealthCheck>,
    pub mesh_gateway: Option<MeshGatewayMode>,
}

impl ServiceDefaults {
    /// The settings of this service's calls to `upstream`, if any.
    pub fn upstream(&self, upstream: &str) -> Option<UpstreamSettings<'_>> {
        self.upstream_config.as_ref()?.for_upstream(upstream)
    }
}

/// `proxy-defaults`: the mesh's defaults, one entry named `global`. Of
/// Consul's `Config` map weft takes `protocol` (the protocol of every
/// service whose service-defaults set none) and `connect_timeout_ms` (how
/// long opening a connection to an instance may take, unless the caller's
/// `UpstreamConfig` or the upstream's resolver says otherwise); Consul's
/// other keys are refused as not supported yet, any other as unknown.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ProxyDefaults {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "ProxyConfig::is_empty")]
    pub config: ProxyConfig,
    /// The mesh's default `MeshGateway` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_gateway: Option<MeshGatewayConfig>,
    /// Read so that it can be refused by name: a mesh-wide default mode is
    /// not supported yet (set it per service).
    #[serde(
        default,
        rename = "MutualTLSMode",
        skip_serializing_if = "Option::is_none"
    )]
    pub mutual_tls_mode: Option<MutualTlsMode>,
}

/// The one name a `proxy-defaults` entry has.
pub const PROXY_DEFAULTS_NAME: &str = "global";

/// `Config` of proxy-defaults, with Consul's (Envoy proxy) key names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
}

impl ProxyConfig {
    fn is_empty(&self) -> bool {
        *self == ProxyConfig::default()
    }
}

/// The protocol of a service: its service-defaults' `Protocol`, else the
/// proxy-defaults' `protocol`, else tcp.
pub fn protocol_of(defaults: Option<&ServiceDefaults>, proxy: Option<&ProxyDefaults>) -> Protocol {
    defaults
        .and_then(|d| d.protocol)
        .or_else(|| proxy.and_then(|p| p.config.protocol))
        .unwrap_or_default()
}

/// `service-router`: ordered HTTP routes; the first matching route decides.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ServiceRouter {
    pub name: String,
    /// Consul's `Meta`: the operator's own key/value pairs, kept and shown.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// One route: a match (none = every request) and where matching requests go.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Route {
    #[serde(rename = "Match", default, skip_serializing_if = "Option::is_none")]
    pub route_match: Option<RouteMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<RouteDestination>,
}

/// The match of a route.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(rename = "HTTP", default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
}

/// Where a route sends requests. `Service` defaults to the router's service.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RouteDestination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_rewrite: Option<String>,
    /// A duration such as `"5s"` (see [`crate::duration`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Compiled<Duration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub retry_on_connect_failure: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on_status_codes: Vec<u16>,
    /// Consul's `RetryOn` conditions (Envoy's names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    #[serde(default, skip_serializing_if = "HeaderModifiers::is_empty")]
    pub request_headers: HeaderModifiers,
    #[serde(default, skip_serializing_if = "HeaderModifiers::is_empty")]
    pub response_headers: HeaderModifiers,
}

/// A condition of `RetryOn`: when a request is tried again (see
/// [`crate::routing::RoutePolicy::retries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx answer, no answer (a reset), or no connection.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503 or 504, no answer, or no connection.
    GatewayError,
    /// No answer: the connection or stream was reset after the request
    /// went out (or no connection could be made).
    Reset,
    ConnectFailure,
    /// An answer carrying `x-envoy-ratelimited`.
    EnvoyRatelimited,
    /// 409.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// An HTTP/2 stream refused (REFUSED_STREAM) by the instance.
    RefusedStream,
    /// gRPC status CANCELLED (1) in the answer's headers.
    Cancelled,
    /// gRPC status DEADLINE_EXCEEDED (4).
    DeadlineExceeded,
    /// gRPC status INTERNAL (13).
    Internal,
    /// gRPC status RESOURCE_EXHAUSTED (8).
    ResourceExhausted,
    /// gRPC status UNAVAILABLE (14).
    Unavailable,
}

/// `service-splitter`: weighted traffic split; weights add up to 100.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ServiceSplitter {
    pub name: String,
    /// Consul's `Meta`: the operator's own key/value pairs, kept and shown.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    pub splits: Vec<Split>,
}

/// One share of a split. `Service` defaults to the splitter's service.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Split {
    pub weight: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_subset: Option<String>,
    #[serde(default, skip_serializing_if = "HeaderModifiers::is_empty")]
    pub request_headers: HeaderModifiers,
    #[serde(default, skip_serializing_if = "HeaderModifiers::is_empty")]
    pub response_headers: HeaderModifiers,
}

/// `service-resolver`: subsets of a service's instances, redirect and failover.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ServiceResolver {
    pub name: String,
    /// Consul's `Meta`: the operator's own key/value pairs, kept and shown.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_subset: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subsets: BTreeMap<String, ResolverSubset>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<ResolverRedirect>,
    /// Keyed by subset name, or `*` for any subset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failover: BTreeMap<String, ResolverFailover>,
    /// How long opening a connection to an instance may take: a duration
    /// such as `"5s"` (5 s when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Compiled<Duration>>,
    /// Which instance each connection or request goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

/// The longest `ConnectTimeout`.
pub const MAX_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl ServiceResolver {
    /// `ConnectTimeout`, when it is set (and valid).
    pub fn connect_timeout(&self) -> Option<std::time::Duration> {
        self.connect_timeout.as_ref()?.get().ok().copied()
    }
}

/// A named subset: instances matching `Filter` (see [`crate::filter`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ResolverSubset {
    #[serde(default)]
    pub filter: Compiled<Filter>,
    /// Only `passing` instances (otherwise `passing` and `warning`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub only_passing: bool,
}

/// Send all traffic for the service elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ResolverRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
}

/// Where to go when no healthy instance is left.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct ResolverFailover {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_subset: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datacenters: Vec<String>,
    /// Consul's ordered targets, each a service, subset and datacenter:
    /// the first with a healthy instance takes the traffic. Not with
    /// `Service`, `ServiceSubset` or `Datacenters`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<FailoverTarget>,
}

/// One of a failover's `Targets`: what it leaves out is the failing
/// target's own (its service, this datacenter; the subset then is the
/// service's default).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct FailoverTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A config entry, tagged by `Kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "Kind")]
pub enum ConfigEntry {
    #[serde(rename = "proxy-defaults")]
    ProxyDefaults(ProxyDefaults),
    #[serde(rename = "service-defaults")]
    ServiceDefaults(ServiceDefaults),
    #[serde(rename = "service-router")]
    ServiceRouter(ServiceRouter),
    #[serde(rename = "service-splitter")]
    ServiceSplitter(ServiceSplitter),
    #[serde(rename = "service-resolver")]
    ServiceResolver(ServiceResolver),
}

/// The kinds of config entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    #[serde(rename = "proxy-defaults")]
    ProxyDefaults,
    #[serde(rename = "service-defaults")]
    ServiceDefaults,
    #[serde(rename = "service-router")]
    ServiceRouter,
    #[serde(rename = "service-splitter")]
    ServiceSplitter,
    #[serde(rename = "service-resolver")]
    ServiceResolver,
}

impl EntryKind {
    pub const ALL: [EntryKind; 5] = [
        EntryKind::ProxyDefaults,
        EntryKind::ServiceDefaults,
        EntryKind::ServiceRouter,
        EntryKind::ServiceSplitter,
        EntryKind::ServiceResolver,
    ];

    /// The `Kind` string, e.g. `service-router`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::ProxyDefaults => "proxy-defaults",
            EntryKind::ServiceDefaults => "service-defaults",
            EntryKind::ServiceRouter => "service-router",
            EntryKind::ServiceSplitter => "service-splitter",
            EntryKind::ServiceResolver => "service-resolver",
        }
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EntryKind {
    type Err = ConfigEntryError;
    fn from_str(s: &str) -> Result<Self, ConfigEntryError> {
        EntryKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                invalid(
                    "Kind",
                    format!(
                        "unknown kind {s:?} (one of proxy-defaults, service-defaults, \
                         service-router, service-splitter, service-resolver)"
                    ),
                )
            })
    }
}

impl ConfigEntry {
    pub fn kind(&self) -> EntryKind {
        match self {
            ConfigEntry::ProxyDefaults(_) => EntryKind::ProxyDefaults,
            ConfigEntry::ServiceDefaults(_) => EntryKind::ServiceDefaults,
            ConfigEntry::ServiceRouter(_) => EntryKind::ServiceRouter,
            ConfigEntry::ServiceSplitter(_) => EntryKind::ServiceSplitter,
            ConfigEntry::ServiceResolver(_) => EntryKind::ServiceResolver,
        }
    }

    /// The entry's `Meta`.
    pub fn meta(&self) -> &BTreeMap<String, String> {
        match self {
            ConfigEntry::ProxyDefaults(e) => &e.meta,
            ConfigEntry::ServiceDefaults(e) => &e.meta,
            ConfigEntry::ServiceRouter(e) => &e.meta,
            ConfigEntry::ServiceSplitter(e) => &e.meta,
            ConfigEntry::ServiceResolver(e) => &e.meta,
        }
    }

    /// The service the entry is about.
    pub fn name(&self) -> &str {
        match self {
            ConfigEntry::ProxyDefaults(e) => &e.name,
            ConfigEntry::ServiceDefaults(e) => &e.name,
            ConfigEntry::ServiceRouter(e) => &e.name,
            ConfigEntry::ServiceSplitter(e) => &e.name,
            ConfigEntry::ServiceResolver(e) => &e.name,
        }
    }

    /// Other services the entry sends traffic to (route destinations,
    /// splits, redirect, failover), each once, without the entry's own.
    pub fn referenced_services(&self) -> BTreeSet<&str> {
        let named: Vec<Option<&String>> = match self {
            ConfigEntry::ProxyDefaults(_) | ConfigEntry::ServiceDefaults(_) => Vec::new(),
            ConfigEntry::ServiceRouter(r) => r
                .routes
                .iter()
                .map(|route| route.destination.as_ref().and_then(|d| d.service.as_ref()))
                .collect(),
            ConfigEntry::ServiceSplitter(s) => {
                s.splits.iter().map(|x| x.service.as_ref()).collect()
            }
            ConfigEntry::ServiceResolver(r) => r
                .redirect
                .iter()
                .map(|x| x.service.as_ref())
                .chain(r.failover.values().flat_map(|f| {
                    std::iter::once(f.service.as_ref())
                        .chain(f.targets.iter().map(|t| t.service.as_ref()))
                }))
                .collect(),
        };
        named
            .into_iter()
            .flatten()
            .map(String::as_str)
            .filter(|s| *s != self.name())
            .collect()
    }
}

/// An entry as stored, with its Raft indexes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEntry {
    pub entry: ConfigEntry,
    pub create_index: u64,
    pub modify_index: u64,
}

/// Why an entry (or an L7 intention) was refused. The message starts with the
/// field path, e.g. `Splits[1].ServiceSubset: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigEntryError {
    #[error("{field}: {source}")]
    Name {
        field: String,
        #[source]
        source: NameError,
    },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("{0}")]
    Keys(#[from] crate::consul_keys::KeyError),
}

impl ConfigEntryError {
    /// The field the error is about (empty for a file that did not parse).
    pub fn field(&self) -> &str {
        match self {
            ConfigEntryError::Name { field, .. } | ConfigEntryError::Invalid { field, .. } => field,
            ConfigEntryError::Parse(_) | ConfigEntryError::Keys(_) => "",
        }
    }
}

impl From<HeaderEditError> for ConfigEntryError {
    fn from(e: HeaderEditError) -> Self {
        invalid(e.field, e.reason)
    }
}

impl From<HttpMatchError> for ConfigEntryError {
    fn from(e: HttpMatchError) -> Self {
        invalid(e.field, e.reason)
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigEntryError {
    ConfigEntryError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_name(field: impl Into<String>, name: &str) -> Result<(), ConfigEntryError> {
    validate_name(name).map_err(|source| ConfigEntryError::Name {
        field: field.into(),
        source,
    })
}

fn check_duration(field: &str, d: &Compiled<Duration>) -> Result<Duration, ConfigEntryError> {
    d.get().copied().map_err(|e| invalid(field, e))
}

/// Parses a config entry file. Errors carry line and column where the parser
/// knows them. Does not validate: call [`validate_entry`] before writing.
pub fn parse_entry_file(text: &str, format: FileFormat) -> Result<ConfigEntry, ConfigEntryError> {
    // Consul's spellings (keys in any case, snake_case, default tenancy)
    // are rewritten first; a document already in weft's spelling is
    // decoded from its text, where errors have positions.
    let mut doc: serde_json::Value = parse_document(text, format)?;
    if !doc.is_object() {
        // serde would take a sequence of the fields in order, a form no
        // one writes and that hides which field is which.
        return Err(ConfigEntryError::Parse(ParseError {
            format,
            line: None,
            column: None,
            message: "a config entry is an object (Kind = ..., Name = ...)".into(),
        }));
    }
    if keys::normalize(&mut doc)? | keys::drop_read_only(&mut doc) {
        return serde_json::from_value(doc).map_err(|e| {
            consul_names(ParseError {
                format,
                line: None,
                column: None,
                message: e.to_string(),
            })
        });
    }
    parse_document(text, format).map_err(consul_names)
}

/// Says so when a refused field or kind is one of Consul's that weft does
/// not have yet, rather than "unknown".
fn consul_names(mut e: ParseError) -> ConfigEntryError {
    let named = |prefix: &str| {
        let rest = &e.message[e.message.find(prefix)? + prefix.len()..];
        Some(rest[..rest.find('`')?].to_string())
    };
    if let Some(field) = named("unknown field `").filter(|f| CONSUL_FIELDS.contains(&f.as_str())) {
        e.message = format!("{field}: Consul's field, not supported by weft yet");
    } else if let Some(kind) =
        named("unknown variant `").filter(|k| CONSUL_KINDS.contains(&k.as_str()))
    {
        e.message = format!("Kind {kind:?}: Consul's kind, not supported by weft yet");
    }
    ConfigEntryError::Parse(e)
}

/// Fields of Consul's config entries (the kinds weft has) that weft does not
/// take anywhere yet: refused with a message that says so. (A field weft
/// has in another place stays "unknown" where it does not belong.)
const CONSUL_FIELDS: &[&str] = &[
    "BalanceOutboundConnections",
    "EnvoyListenerJSON",
    "EnvoyClusterJSON",
    "TransparentProxy",
    "Expose",
    "ExternalSNI",
    "BalanceInboundConnections",
    "RateLimits",
    "EnvoyExtensions",
    "LocalConnectTimeoutMs",
    "LocalRequestTimeoutMs",
    "MaxInboundConnections",
    "IdleTimeout",
    "SamenessGroup",
    "Peer",
    "PrioritizeByLocality",
    "RateLimit",
    "Destination",
    // proxy-defaults
    "Mode",
    "AccessLogs",
    "FailoverPolicy",
    // proxy-defaults' Config: Envoy's keys
    "local_connect_timeout_ms",
    "local_request_timeout_ms",
    "local_idle_timeout_ms",
    "handshake_timeout_ms",
    "bind_address",
    "bind_port",
    "balance_inbound_connections",
    "max_inbound_connections",
    "envoy_prometheus_bind_addr",
    "envoy_stats_bind_addr",
    "envoy_dogstatsd_url",
    "envoy_statsd_url",
    "envoy_stats_tags",
    "envoy_stats_flush_interval",
    "envoy_tracing_json",
    "envoy_extra_static_clusters_json",
    "envoy_extra_static_listeners_json",
    "envoy_extra_stats_sinks_json",
    "envoy_local_cluster_json",
    "envoy_public_listener_json",
    "envoy_listener_json",
    "envoy_cluster_json",
];

/// Consul's config entry kinds weft does not have yet.
const CONSUL_KINDS: &[&str] = &[
    "ingress-gateway",
    "terminating-gateway",
    "api-gateway",
    "mesh",
    "exported-services",
    "sameness-group",
    "jwt-provider",
    "control-plane-request-limit",
];

/// What validation needs to know about the rest of the configuration.
pub trait EntryContext {
    /// The protocol of `service` from its `service-defaults` (tcp without one).
    fn protocol(&self, service: &str) -> Protocol;
    /// The `service-resolver` of `service`, if there is one.
    fn resolver(&self, service: &str) -> Option<&ServiceResolver>;
}

/// A set of entries keyed by (kind, name): a ready-made [`EntryContext`].
/// Each entry is shared: copying the set copies its keys, not the rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntrySet {
    entries: BTreeMap<(EntryKind, String), std::sync::Arc<ConfigEntry>>,
}

impl EntrySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the entry of the same kind and name; returns the old one.
    pub fn insert(&mut self, entry: ConfigEntry) -> Option<std::sync::Arc<ConfigEntry>> {
        let key = (entry.kind(), entry.name().to_string());
        self.entries.insert(key, std::sync::Arc::new(entry))
    }

    pub fn get(&self, kind: EntryKind, name: &str) -> Option<&ConfigEntry> {
        self.entries.get(&(kind, name.to_string())).map(|e| &**e)
    }

    pub fn remove(&mut self, kind: EntryKind, name: &str) -> Option<std::sync::Arc<ConfigEntry>> {
        self.entries.remove(&(kind, name.to_string()))
    }

    /// All entries, ordered by kind then name.
    pub fn iter(&self) -> impl Iterator<Item = &ConfigEntry> {
        self.entries.values().map(|e| &**e)
    }
}

impl FromIterator<ConfigEntry> for EntrySet {
    fn from_iter<I: IntoIterator<Item = ConfigEntry>>(iter: I) -> Self {
        let mut set = EntrySet::new();
        for e in iter {
            set.insert(e);
        }
        set
    }
}

impl EntrySet {
    /// The `proxy-defaults` entry, if there is one.
    pub fn proxy_defaults(&self) -> Option<&ProxyDefaults> {
        match self.get(EntryKind::ProxyDefaults, PROXY_DEFAULTS_NAME) {
            Some(ConfigEntry::ProxyDefaults(p)) => Some(p),
            _ => None,
        }
    }

    /// The `MutualTLSMode` of `service` (strict without a service-defaults).
    pub fn mutual_tls_mode(&self, service: &str) -> MutualTlsMode {
        match self.get(EntryKind::ServiceDefaults, service) {
            Some(ConfigEntry::ServiceDefaults(d)) => d.mutual_tls_mode,
            _ => MutualTlsMode::Strict,
        }
    }
}

impl EntryContext for EntrySet {
    fn protocol(&self, service: &str) -> Protocol {
        let defaults = match self.get(EntryKind::ServiceDefaults, service) {
            Some(ConfigEntry::ServiceDefaults(d)) => Some(d),
            _ => None,
        };
        protocol_of(defaults, self.proxy_defaults())
    }

    fn resolver(&self, service: &str) -> Option<&ServiceResolver> {
        match self.get(EntryKind::ServiceResolver, service) {
            Some(ConfigEntry::ServiceResolver(r)) => Some(r),
            _ => None,
        }
    }
}

/// Checks an entry before it is written, against the rest of the configuration.
pub fn validate_entry(
    entry: &ConfigEntry,
    ctx: &impl EntryContext,
) -> Result<(), ConfigEntryError> {
    check_name("Name", entry.name())?;
    crate::catalog::validate_meta("Meta", entry.meta())
        .map_err(|e| invalid("Meta", e.to_string()))?;
    match entry {
        ConfigEntry::ProxyDefaults(p) => validate_proxy_defaults(p),
        ConfigEntry::ServiceDefaults(d) => validate_defaults(d),
        ConfigEntry::ServiceRouter(r) => validate_router(r, ctx),
        ConfigEntry::ServiceSplitter(s) => validate_splitter(s, ctx),
        ConfigEntry::ServiceResolver(r) => validate_resolver(r, ctx),
    }
}

fn validate_proxy_defaults(p: &ProxyDefaults) -> Result<(), ConfigEntryError> {
    if p.name != PROXY_DEFAULTS_NAME {
        return Err(invalid(
            "Name",
            format!("{:?}: a proxy-defaults entry is named \"global\"", p.name),
        ));
    }
    if p.mutual_tls_mode.is_some() {
        return Err(invalid(
            "MutualTLSMode",
            "not supported by weft yet on proxy-defaults (set it in each service's service-defaults)",
        ));
    }
    check_mesh_gateway("MeshGateway", p.mesh_gateway.as_ref().map(|m| m.mode))?;
    if let Some(ms) = p.config.connect_timeout_ms {
        if ms == 0 || ms > MAX_CONNECT_TIMEOUT.as_millis() as u64 {
            return Err(invalid(
                "Config.connect_timeout_ms",
                format!(
                    "{ms} is not between 1 and {}",
                    MAX_CONNECT_TIMEOUT.as_millis()
                ),
            ));
        }
    }
    Ok(())
}

/// The longest `BaseEjectionTime` and `Interval`.
pub const MAX_OUTLIER_DURATION: std::time::Duration = std::time::Duration::from_secs(3600);

/// The most `NumRetries` a route takes.
pub const MAX_RETRIES: u32 = 10;

/// At most this many `UpstreamConfig.Overrides`.
pub const MAX_UPSTREAM_OVERRIDES: usize = 256;

/// `MeshGateway.Mode`: `local` or `remote` (see [`MeshGatewayMode`]).
fn check_mesh_gateway(field: &str, mode: Option<MeshGatewayMode>) -> Result<(), ConfigEntryError> {
    if mode == Some(MeshGatewayMode::None) {
        return Err(invalid(
            format!("{field}.Mode"),
            "\"none\" (straight to the other datacenter's node) is not supported: agents do not know other datacenters' node addresses; use \"local\" or \"remote\"",
        ));
    }
    Ok(())
}

fn validate_defaults(d: &ServiceDefaults) -> Result<(), ConfigEntryError> {
    check_mesh_gateway("MeshGateway", d.mesh_gateway.as_ref().map(|m| m.mode))?;
    let Some(config) = &d.upstream_config else {
        return Ok(());
    };
    if let Some(defaults) = &config.defaults {
        validate_upstream("UpstreamConfig.Defaults", defaults.settings())?;
    }
    if config.overrides.len() > MAX_UPSTREAM_OVERRIDES {
        return Err(invalid(
            "UpstreamConfig.Overrides",
            format!("at most {MAX_UPSTREAM_OVERRIDES}"),
        ));
    }
    for (i, o) in config.overrides.iter().enumerate() {
        let field = format!("UpstreamConfig.Overrides[{i}]");
        check_name(format!("{field}.Name"), &o.name)?;
        if config.overrides[..i].iter().any(|x| x.name == o.name) {
            return Err(invalid(
                format!("{field}.Name"),
                format!("{:?} is overridden twice", o.name),
            ));
        }
        validate_upstream(&field, o.settings())?;
    }
    Ok(())
}

fn validate_upstream(base: &str, s: UpstreamSettings<'_>) -> Result<(), ConfigEntryError> {
    check_mesh_gateway(&format!("{base}.MeshGateway"), s.mesh_gateway)?;
    if let Some(ms) = s.connect_timeout_ms {
        if ms == 0 || ms > MAX_CONNECT_TIMEOUT.as_millis() as u64 {
            return Err(invalid(
                format!("{base}.ConnectTimeoutMs"),
                format!(
                    "{ms} is not between 1 and {}",
                    MAX_CONNECT_TIMEOUT.as_millis()
                ),
            ));
        }
    }
    if let Some(limits) = s.limits {
        for (name, value) in [
            ("MaxConnections", limits.max_connections),
            ("MaxPendingRequests", limits.max_pending_requests),
            ("MaxConcurrentRequests", limits.max_concurrent_requests),
        ] {
            if value == Some(0) {
                return Err(invalid(
                    format!("{base}.Limits.{name}"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
        }
    }
    let Some(check) = s.passive_health_check else {
        return Ok(());
    };
    let field = format!("{base}.PassiveHealthCheck");
    if check.max_failures == 0 {
        return Err(invalid(
            format!("{field}.MaxFailures"),
            "must be at least 1",
        ));
    }
    for (name, value) in [
        ("BaseEjectionTime", &check.base_ejection_time),
        ("Interval", &check.interval),
    ] {
        let Some(t) = value else { continue };
        let d = check_duration(&format!("{field}.{name}"), t)?;
        if d.is_zero() || d > MAX_OUTLIER_DURATION {
            return Err(invalid(
                format!("{field}.{name}"),
                format!("{t:?} is not above 0 and at most 1h"),
            ));
        }
    }
    for (name, value) in [
        ("EnforcingConsecutive5xx", check.enforcing_consecutive_5xx),
        ("MaxEjectionPercent", check.max_ejection_percent),
    ] {
        if value.is_some_and(|v| v > 100) {
            return Err(invalid(
                format!("{field}.{name}"),
                format!("{} is a percentage (0 to 100)", value.unwrap_or_default()),
            ));
        }
    }
    Ok(())
}

fn require_http(
    field: &str,
    kind: EntryKind,
    service: &str,
    ctx: &impl EntryContext,
) -> Result<(), ConfigEntryError> {
    let protocol = ctx.protocol(service);
    if protocol.is_http() {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "a {kind} needs service {service:?} to speak http, http2 or grpc, but its protocol is \
                 {protocol} (set Protocol in its service-defaults first)"
            ),
        ))
    }
}

/// Checks that `subset` exists in the resolver of `service`. `own` is the resolver
/// being validated, which stands in for `service`'s stored one when names agree.
fn check_subset(
    field: &str,
    service: &str,
    subset: &str,
    ctx: &impl EntryContext,
    own: Option<&ServiceResolver>,
) -> Result<(), ConfigEntryError> {
    let resolver = match own {
        Some(r) if r.name == service => Some(r),
        _ => ctx.resolver(service),
    };
    let Some(resolver) = resolver else {
        return Err(invalid(
            field,
            format!("service {service:?} has no service-resolver, so it has no subset {subset:?}"),
        ));
    };
    if resolver.subsets.contains_key(subset) {
        Ok(())
    } else {
        let defined: Vec<&str> = resolver.subsets.keys().map(String::as_str).collect();
        Err(invalid(
            field,
            format!(
                "subset {subset:?} is not defined in the service-resolver of {service:?} (defined: {})",
                if defined.is_empty() { "none".to_string() } else { defined.join(", ") }
            ),
        ))
    }
}

/// Refuses router routes whose `PathExact` or `PathPrefix` no request can
/// have ([`check_rule_paths`]). The servers' API calls it on every write;
/// Raft's apply, which runs [`validate_entry`], does not.
pub fn check_entry_paths(entry: &ConfigEntry) -> Result<(), ConfigEntryError> {
    if let ConfigEntry::ServiceRouter(r) = entry {
        for (i, route) in r.routes.iter().enumerate() {
            if let Some(http) = route.route_match.as_ref().and_then(|m| m.http.as_ref()) {
                check_rule_paths(&format!("Routes[{i}].Match.HTTP"), http)?;
            }
        }
    }
    Ok(())
}

fn validate_router(r: &ServiceRouter, ctx: &impl EntryContext) -> Result<(), ConfigEntryError> {
    require_http("Kind", EntryKind::ServiceRouter, &r.name, ctx)?;
    for (i, route) in r.routes.iter().enumerate() {
        let base = format!("Routes[{i}]");
        let http = route.route_match.as_ref().and_then(|m| m.http.as_ref());
        if let Some(http) = http {
            validate_http_match(&format!("{base}.Match.HTTP"), http)?;
        }
        let Some(dest) = &route.destination else {
            continue;
        };
        let df = format!("{base}.Destination");
        let service = dest.service.as_deref().unwrap_or(&r.name);
        if let Some(s) = &dest.service {
            check_name(format!("{df}.Service"), s)?;
            require_http(&format!("{df}.Service"), EntryKind::ServiceRouter, s, ctx)?;
        }
        if let Some(subset) = &dest.service_subset {
            check_subset(&format!("{df}.ServiceSubset"), service, subset, ctx, None)?;
        }
        if let Some(rewrite) = &dest.prefix_rewrite {
            if !http.is_some_and(|h| h.path_exact.is_some() || h.path_prefix.is_some()) {
                return Err(invalid(
                    format!("{df}.PrefixRewrite"),
                    "needs Match.HTTP.PathExact or Match.HTTP.PathPrefix on the route",
                ));
            }
            if !rewrite.starts_with('/') {
                return Err(invalid(
                    format!("{df}.PrefixRewrite"),
                    format!("{rewrite:?} must start with '/'"),
                ));
            }
        }
        if let Some(t) = &dest.request_timeout {
            check_duration(&format!("{df}.RequestTimeout"), t)?;
        }
        if let Some(n) = dest.num_retries.filter(|n| *n > MAX_RETRIES) {
            return Err(invalid(
                format!("{df}.NumRetries"),
                format!("{n} is more than weft retries ({MAX_RETRIES})"),
            ));
        }
        for (j, code) in dest.retry_on_status_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                return Err(invalid(
                    format!("{df}.RetryOnStatusCodes[{j}]"),
                    format!("{code} is not an HTTP status code (100 to 599)"),
                ));
            }
        }
        dest.request_headers
            .validate(&format!("{df}.RequestHeaders"))?;
        dest.response_headers
            .validate(&format!("{df}.ResponseHeaders"))?;
    }
    Ok(())
}

/// How far the weights of a splitter may be from 100 in total.
pub const SPLIT_WEIGHT_TOLERANCE: f32 = 0.01;

fn validate_splitter(s: &ServiceSplitter, ctx: &impl EntryContext) -> Result<(), ConfigEntryError> {
    require_http("Kind", EntryKind::ServiceSplitter, &s.name, ctx)?;
    if s.splits.is_empty() {
        return Err(invalid("Splits", "at least one split is required"));
    }
    let mut total = 0.0f64;
    let mut seen: Vec<(&str, Option<&str>)> = Vec::new();
    for (i, split) in s.splits.iter().enumerate() {
        let base = format!("Splits[{i}]");
        if !split.weight.is_finite() || !(0.0..=100.0).contains(&split.weight) {
            return Err(invalid(
                format!("{base}.Weight"),
                format!("must be between 0 and 100, not {}", split.weight),
            ));
        }
        total += f64::from(split.weight);
        let service = split.service.as_deref().unwrap_or(&s.name);
        if let Some(svc) = &split.service {
            check_name(format!("{base}.Service"), svc)?;
            require_http(
                &format!("{base}.Service"),
                EntryKind::ServiceSplitter,
                svc,
                ctx,
            )?;
        }
        if let Some(subset) = &split.service_subset {
            check_subset(&format!("{base}.ServiceSubset"), service, subset, ctx, None)?;
        }
        split
            .request_headers
            .validate(&format!("{base}.RequestHeaders"))?;
        split
            .response_headers
            .validate(&format!("{base}.ResponseHeaders"))?;
        let target = (service, split.service_subset.as_deref());
        if seen.contains(&target) {
            return Err(invalid(
                base,
                format!(
                    "service {service:?}{} appears in more than one split",
                    target
                        .1
                        .map(|s| format!(" subset {s:?}"))
                        .unwrap_or_default()
                ),
            ));
        }
        seen.push(target);
    }
    if (total - 100.0).abs() > f64::from(SPLIT_WEIGHT_TOLERANCE) {
        return Err(invalid(
            "Splits",
            format!(
                "weights add up to {}, not 100",
                (total * 1000.0).round() / 1000.0
            ),
        ));
    }
    Ok(())
}

fn validate_resolver(r: &ServiceResolver, ctx: &impl EntryContext) -> Result<(), ConfigEntryError> {
    for (name, subset) in &r.subsets {
        check_name(format!("Subsets.{name}"), name)?;
        (subset.filter.get()).map_err(|e| invalid(format!("Subsets.{name}.Filter"), e))?;
    }
    let defined = || {
        let names: Vec<&str> = r.subsets.keys().map(String::as_str).collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    if let Some(default) = &r.default_subset {
        if !r.subsets.contains_key(default) {
            return Err(invalid(
                "DefaultSubset",
                format!(
                    "subset {default:?} is not defined in Subsets (defined: {})",
                    defined()
                ),
            ));
        }
    }
    if let Some(redirect) = &r.redirect {
        if !r.subsets.is_empty() || r.default_subset.is_some() || !r.failover.is_empty() {
            return Err(invalid(
                "Redirect",
                "cannot be combined with Subsets, DefaultSubset or Failover",
            ));
        }
        if redirect.service.is_none()
            && redirect.service_subset.is_none()
            && redirect.datacenter.is_none()
        {
            return Err(invalid(
                "Redirect",
                "one of Service, ServiceSubset or Datacenter is required",
            ));
        }
        if let Some(s) = &redirect.service {
            check_name("Redirect.Service", s)?;
        }
        if let Some(dc) = &redirect.datacenter {
            check_name("Redirect.Datacenter", dc)?;
        }
        let target = redirect.service.as_deref().unwrap_or(&r.name);
        if target == r.name && redirect.datacenter.is_none() {
            return Err(invalid(
                "Redirect",
                format!("redirects {:?} to itself", r.name),
            ));
        }
        if let Some(subset) = &redirect.service_subset {
            check_subset("Redirect.ServiceSubset", target, subset, ctx, Some(r))?;
        }
    }
    for (key, failover) in &r.failover {
        let base = format!("Failover.{key}");
        if key != WILDCARD && !r.subsets.contains_key(key) {
            return Err(invalid(
                base,
                format!(
                    "no subset {key:?} in Subsets (use \"*\" or one of: {})",
                    defined()
                ),
            ));
        }
        if failover.service.is_none()
            && failover.service_subset.is_none()
            && failover.datacenters.is_empty()
            && failover.targets.is_empty()
        {
            return Err(invalid(
                base,
                "one of Service, ServiceSubset, Datacenters or Targets is required",
            ));
        }
        if !failover.targets.is_empty()
            && (failover.service.is_some()
                || failover.service_subset.is_some()
                || !failover.datacenters.is_empty())
        {
            return Err(invalid(
                format!("{base}.Targets"),
                "not with Service, ServiceSubset or Datacenters (list each as a target)",
            ));
        }
        if failover.targets.len() > MAX_FAILOVER_DATACENTERS {
            return Err(invalid(
                format!("{base}.Targets"),
                format!(
                    "{} targets, at most {MAX_FAILOVER_DATACENTERS}",
                    failover.targets.len()
                ),
            ));
        }
        for (i, t) in failover.targets.iter().enumerate() {
            let at = format!("{base}.Targets[{i}]");
            if t.service.is_none() && t.service_subset.is_none() && t.datacenter.is_none() {
                return Err(invalid(
                    at,
                    "one of Service, ServiceSubset or Datacenter is required",
                ));
            }
            if let Some(s) = &t.service {
                check_name(format!("{at}.Service"), s)?;
            }
            if let Some(dc) = &t.datacenter {
                check_name(format!("{at}.Datacenter"), dc)?;
            }
            if let Some(subset) = &t.service_subset {
                let service = t.service.as_deref().unwrap_or(&r.name);
                check_subset(
                    &format!("{at}.ServiceSubset"),
                    service,
                    subset,
                    ctx,
                    Some(r),
                )?;
            }
        }
        if let Some(s) = &failover.service {
            check_name(format!("{base}.Service"), s)?;
        }
        for (i, dc) in failover.datacenters.iter().enumerate() {
            check_name(format!("{base}.Datacenters[{i}]"), dc)?;
        }
        if failover.datacenters.len() > MAX_FAILOVER_DATACENTERS {
            return Err(invalid(
                format!("{base}.Datacenters"),
                format!(
                    "{} datacenters, at most {MAX_FAILOVER_DATACENTERS}",
                    failover.datacenters.len()
                ),
            ));
        }
        if let Some(subset) = &failover.service_subset {
            let target = failover.service.as_deref().unwrap_or(&r.name);
            check_subset(
                &format!("{base}.ServiceSubset"),
                target,
                subset,
                ctx,
                Some(r),
            )?;
        }
    }
    if let Some(t) = &r.connect_timeout {
        let limit = check_duration("ConnectTimeout", t)?;
        if limit.is_zero() || limit > MAX_CONNECT_TIMEOUT {
            return Err(invalid(
                "ConnectTimeout",
                format!("{t:?} is not above 0 and at most 5m"),
            ));
        }
    }
    if let Some(lb) = &r.load_balancer {
        lb.validate(ctx.protocol(&r.name).is_http())
            .map_err(|e| invalid(e.field, e.reason))?;
    }
    Ok(())
}

/// Checks that an L7 intention (one with permissions) targets a service that
/// speaks HTTP. L4 intentions always pass. A `*` destination cannot carry
/// permissions: there is no single protocol to check against.
pub fn validate_intention_protocol(
    intention: &Intention,
    ctx: &impl EntryContext,
) -> Result<(), ConfigEntryError> {
    if intention.permissions.is_empty() {
        return Ok(());
    }
    if intention.destination == WILDCARD {
        return Err(invalid(
            "Permissions",
            "L7 permissions need a specific destination service, not \"*\"",
        ));
    }
    let protocol = ctx.protocol(&intention.destination);
    if protocol.is_http() {
        Ok(())
    } else {
        Err(invalid(
            "Permissions",
            format!(
                "L7 permissions need destination {:?} to speak http, http2 or grpc, but its protocol is \
                 {protocol} (set Protocol in its service-defaults, or use Action for an L4 intention)",
                intention.destination
            ),
        ))
    }
}

/// The first route of `router` that matches `request`, with its index. A route
/// without a match matches everything; a route whose rules cannot be applied
/// (a regex that does not compile) is skipped.
pub fn select_route<'a>(
    router: &'a ServiceRouter,
    request: &Request,
) -> Option<(usize, &'a Route)> {
    router.routes.iter().enumerate().find(|(_, route)| {
        match route.route_match.as_ref().and_then(|m| m.http.as_ref()) {
            None => true,
            Some(http) => http.matches(request).unwrap_or(false),
        }
    })
}

/// The split that a roll in `[0, 100)` lands on: splits take consecutive ranges
/// of their weight, in order. A roll past the total lands on the last split with a
/// non-zero weight. `None` only when there is no split with weight.
pub fn pick_split(splitter: &ServiceSplitter, roll: f32) -> Option<&Split> {
    let mut upper = 0.0f32;
    let mut last = None;
    for split in &splitter.splits {
        if split.weight <= 0.0 {
            continue;
        }
        upper += split.weight;
        last = Some(split);
        if roll < upper {
            return Some(split);
        }
    }
    last
}

impl ResolverSubset {
    /// Whether `instance` belongs to this subset: the filter matches and its health
    /// is `passing` (or `warning`, unless `OnlyPassing`). Critical instances never
    /// belong; an unparsable filter matches nothing.
    pub fn contains(&self, instance: &ServiceInstance) -> bool {
        let healthy = match instance.health {
            HealthStatus::Passing => true,
            HealthStatus::Warning => !self.only_passing,
            HealthStatus::Critical => false,
        };
        healthy && self.filter.get().is_ok_and(|f| f.matches(instance))
    }
}

#[cfg(test)]
mod tests;
