//! Library target of weft's eBPF crate. It is empty: it exists so that the
//! agent can name this crate as a build-dependency and be rebuilt when it
//! changes. The programs are in `main.rs`, built for `bpfel-unknown-none`.
#![no_std]
