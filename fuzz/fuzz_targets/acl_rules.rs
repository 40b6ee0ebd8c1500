//! ACL rules in Consul's language, HCL or JSON: parsing never panics, and
//! whatever parses builds an authorizer that answers for any name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_api::acl::{parse_rules, Access, Authorizer, Resource};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(rules) = parse_rules(text) {
        let authz = Authorizer::from_rules([&rules]);
        for name in ["", "web", "we", "config/web/x"] {
            let _ = authz.allows(Resource::Service(name), Access::Write);
            let _ = authz.allows(Resource::Key(name), Access::Read);
        }
    }
});
