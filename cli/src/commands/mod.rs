//! One module per `weft` command group.

pub mod acl;
pub mod ca;
pub mod catalog;
pub mod check;
pub mod config;
pub mod intention;
pub mod kv;
pub mod members;
pub mod snapshot;
pub mod tls;
pub mod top;

use serde_json::json;

use crate::client::Ctx;
use crate::output;

/// Reports a write's index.
pub fn written(ctx: &Ctx, what: &str, index: u64) {
    output::message(
        ctx,
        &format!("{what} (index {index})"),
        json!({ "index": index }),
    );
}
