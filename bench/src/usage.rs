//! What the servers of a test cluster use: memory (`VmRSS`, and the peak
//! `VmHWM`, from `/proc/PID/status`) and disk (the blocks of every file in
//! a server's data dir, as `du` counts them), one value per server.
use std::path::Path;

use weft_tests::servers::Cluster;

/// A `/proc/PID/status` field in kB (such as `VmRSS`), as MB.
fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1000.0)
}

/// Bytes on disk under `dir` (allocated blocks, as `du`).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn each_server(cluster: &Cluster, f: impl Fn(u64) -> Option<f64>) -> Vec<f64> {
    (1..=cluster.servers.len() as u64).filter_map(f).collect()
}

/// Each running server's resident memory now (MB).
pub fn rss_mb(cluster: &Cluster) -> Vec<f64> {
    each_server(cluster, |id| status_mb(cluster.pid(id)?, "VmRSS"))
}

/// Each running server's peak resident memory since it started (MB).
pub fn peak_rss_mb(cluster: &Cluster) -> Vec<f64> {
    each_server(cluster, |id| status_mb(cluster.pid(id)?, "VmHWM"))
}

/// Each server's data dir on disk (MB).
pub fn disk_mb(cluster: &Cluster) -> Vec<f64> {
    each_server(cluster, |id| {
        Some(disk_bytes(cluster.data_dir(id)) as f64 / 1e6)
    })
}
