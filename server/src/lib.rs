//! weft-server: the control plane of the weft service mesh.
//!
//! A cluster of 1, 3 or 5 servers replicates, with openraft over sled, the
//! mesh's state: nodes, services and instances with health, intentions,
//! config entries and KV. Servers serve the `weft.v1` gRPC API to agents and
//! the CLI; agents hold a watch stream that delivers a snapshot and then
//! every change in index order.

pub mod acl;
pub mod ca;
pub mod cluster;
pub mod conn_limit;
pub mod contact;
pub mod federation;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod liveness;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod settings;
pub mod state;
pub mod tls;
pub mod traffic;
pub mod vip_release;
pub mod watch;
pub mod write_error;
