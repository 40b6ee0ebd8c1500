//! Config entries as operators (and, through the API, any token holder)
//! write them, JSON and TOML: parsing never panics, and an entry that
//! parses serializes to JSON that parses to the same entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_api::config_entry::parse_entry_file;
use weft_api::file_format::FileFormat;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for format in [FileFormat::Json, FileFormat::Toml] {
        if let Ok(entry) = parse_entry_file(text, format) {
            let json = serde_json::to_string(&entry).expect("an entry serializes");
            let again = parse_entry_file(&json, FileFormat::Json).expect("its JSON parses");
            assert_eq!(again, entry);
        }
    }
});
