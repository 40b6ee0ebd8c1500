//! The `weft.v1` protobuf messages and gRPC clients and servers, generated
//! from `proto/weft/v1/weft.proto` at build time.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("weft.v1");
