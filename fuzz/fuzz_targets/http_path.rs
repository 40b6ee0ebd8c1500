//! L7 path normalization and the matchers it feeds: whatever the path,
//! normalizing never panics, a normalized path is normal (starts with `/`,
//! no empty, `.` or `..` segment, no escaped slash) and normalizes to
//! itself, and a prefix rule on `/admin/` sees the same verdict for the
//! path and its normal form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_api::http_match::{HttpMatch, Request};
use weft_api::path::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(normal) = normalize_path(path) else {
        return;
    };
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    assert!(!normal.contains("//"), "{path:?} -> {normal:?}");
    for segment in normal.split('/').skip(1) {
        assert!(segment != "." && segment != "..", "{path:?} -> {normal:?}");
    }
    let upper = normal.to_ascii_uppercase();
    assert!(
        !upper.contains("%2F") && !upper.contains("%5C"),
        "{normal:?}"
    );
    assert_eq!(normalize_path(&normal).unwrap(), normal, "not idempotent");
    let admin = HttpMatch {
        path_prefix: Some("/admin/".into()),
        ..Default::default()
    };
    let matched = admin
        .matches(&Request::new("GET", normal.as_ref()))
        .unwrap();
    assert_eq!(matched, normal.starts_with("/admin/"));
});
