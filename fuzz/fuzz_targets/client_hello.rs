//! The gateway's ClientHello reader: whatever the bytes, it never panics; a
//! hello it accepts took no more bytes than it was given, reads the same
//! from exactly those bytes, and its name is a lowercase DNS name; a prefix
//! of those bytes is never a different hello. The name then goes through
//! the gateway's SNI parser, which must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_api::client_hello::{parse, Parsed};
use weft_api::gateway::parse_sni;

fuzz_target!(|data: &[u8]| {
    let Ok(Parsed::Hello { server_name, consumed }) = parse(data) else {
        return;
    };
    assert!(consumed <= data.len());
    assert_eq!(
        parse(&data[..consumed]),
        Ok(Parsed::Hello { server_name: server_name.clone(), consumed })
    );
    if consumed > 0 {
        assert_eq!(parse(&data[..consumed - 1]), Ok(Parsed::NeedMore));
    }
    if let Some(name) = &server_name {
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
        let _ = parse_sni(Some(name), "c0ffee.weft");
    }
});
