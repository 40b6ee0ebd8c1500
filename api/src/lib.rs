//! weft's API: the `weft.v1` protobuf/gRPC definitions ([`proto`], with
//! conversions in [`convert`]) and the domain types that servers, agents and the
//! CLI share, with the validation and decision logic that goes with them.
//!
//! - [`names`]: service, node and datacenter names (DNS labels), the `*` wildcard.
//! - [`catalog`]: nodes, service instances, health; [`vip`]: virtual-IP allocation.
//! - [`intention`]: intentions, Consul's precedence and L4/L7 evaluation.
//! - [`config_entry`]: `service-defaults`, `service-router`, `service-splitter`,
//!   `service-resolver` entries, their files and write-time validation;
//!   [`filter`]: resolver subset filters; [`duration`]: `"5s"`-style durations.
//! - [`kv`]: key/value entries and key rules; [`session`]: Consul's sessions (locks).
//! - [`acl`]: ACL rules (Consul's HCL/JSON language), policy merging and decisions.
//! - [`spiffe`]: SPIFFE ids of services.
//! - [`file_format`]: JSON/TOML documents with positioned errors;
//!   [`http_match`]: HTTP path/method/header rules shared by intentions and routers;
//!   [`path`]: request paths normalized before they are matched (Envoy's rules).
//! - [`client_hello`]: the server name of a TLS ClientHello; [`gateway`]: the
//!   names mesh gateways route on and where each goes.
//! - [`tls_certs`]: the operator's CA and server/client certificates for TLS (`weft tls`).
//!
//! The domain modules are pure: no I/O, no clocks, no global state ([`tls_certs`]
//! does no I/O but reads the clock and generates keys).

pub mod acl;
pub mod catalog;
pub mod catalog_register;
pub mod client_hello;
pub mod compiled;
pub mod config_entry;
pub mod consul_keys;
pub mod convert;
pub mod duration;
pub mod exposition;
pub mod federation;
pub mod file_format;
pub mod filter;
pub mod gateway;
pub mod header_edits;
pub mod http_match;
pub mod intention;
pub mod kv;
pub mod load_balancer;
pub mod logging;
pub mod names;
pub mod path;
pub mod private_dir;
pub mod proto;
pub mod routing;
pub mod service_intentions;
pub mod session;
pub mod spiffe;
pub mod tls_certs;
pub mod traffic;
pub mod vip;
