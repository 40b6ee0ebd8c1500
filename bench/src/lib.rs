//! What the benchmark's programs share (the `weft-bench` binary and
//! `weft-bench-populate`).
pub mod mesh_shape;
