//! The agent's side of the eBPF data path: loading and attaching the programs,
//! keeping their maps current, and reading back what they recorded.

mod cgroup;
mod logs;
pub mod pins;
mod redirector;
mod socket;

pub use cgroup::{cgroup2_mount, cgroup_id, CgroupError};
pub use pins::Pins;
pub use redirector::{
    Egress, OriginalDst, Records, RedirectCounters, Redirector, RedirectorError, Settings,
};
pub use socket::netns_cookie;
pub use weft_agent_common::maps::DESTINATIONS_CAPACITY;
