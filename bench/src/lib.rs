//! weft's benchmarks: per-node overhead next to direct and next to a plain mTLS proxy.
