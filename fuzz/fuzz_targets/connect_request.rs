//! The inbound HBONE request line: any method and `:authority` is either a
//! CONNECT to `IP:PORT` with a port that is not 0, or a refusal with a
//! status that is not a success; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_agent::hbone::{classify, Classified};

fuzz_target!(|data: &[u8]| {
    let (method, authority) = match data.iter().position(|b| *b == b' ') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let authority = authority.and_then(|a| std::str::from_utf8(a).ok());
    match classify(&method, authority) {
        Classified::Connect(addr) => {
            assert_eq!(method, http::Method::CONNECT);
            assert_ne!(addr.port(), 0);
            assert_eq!(authority.map(|a| a.parse().ok()), Some(Some(addr)));
        }
        Classified::Reject(refusal) => {
            assert!(!(200..300).contains(&refusal.status), "{refusal:?}");
        }
    }
});
