//! `weft-server`: the control plane. (The Raft-replicated state lands with the
//! control-plane issue.)
fn main() {
    eprintln!("weft-server: not built yet");
    std::process::exit(2);
}
