//! `weft`: the operator CLI. (Commands land with the control-plane issue.)
fn main() {
    eprintln!("weft: not built yet");
    std::process::exit(2);
}
