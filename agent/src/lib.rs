//! weft-agent: the node agent of the weft service mesh.
//!
//! One privileged agent runs per node. It loads eBPF programs that bring the
//! connections of local mesh workloads to itself (or takes them on explicit
//! upstream ports), carries them over mutual TLS to the destination node's agent, enforcing
//! intentions on the way. This crate is both the `weft-agent` binary and a
//! library, so that tests drive the same code the binary runs.

pub mod accept;
pub mod admin;
pub mod admission;
pub mod allocator;
pub mod authority;
pub mod background;
pub mod backoff;
pub mod breaker;
pub mod config;
pub mod control;
pub mod dns;
pub mod drain;
pub mod ebpf;
pub mod exec_dns;
pub mod exec_user;
pub mod gateway;
pub mod handover;
pub mod hbone;
pub mod health;
pub mod identity;
pub mod idle_conns;
pub mod intercept;
pub mod lb;
pub mod limits;
pub mod local_api;
pub mod mark;
pub mod metrics;
pub mod outlier;
pub mod private_file;
pub mod proxy;
pub mod pulse;
pub mod registered;
pub mod reload;
pub mod run;
pub mod running;
pub mod shared_view;
pub mod socket_owner;
pub mod splice;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod test_ca;
#[cfg(test)]
pub(crate) mod test_http;
pub mod view;
