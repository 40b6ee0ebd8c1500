//! HashiCorp's documented config-entry examples, kept verbatim under
//! `tests/fixtures/consul/docs/` in their HCL and JSON forms (where each
//! comes from: `SOURCES.md` there). Each is written to a real server with
//! `weft config write` and is either taken and does what Consul's docs say
//! (checked with weft's own routing, balancing and intention decisions, and
//! for intentions with `weft intention check` against the server), or is
//! refused with an error that says what weft does not do yet. Every file in
//! the directory must be listed here, so a new example cannot go unchecked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use weft_api::catalog::{HealthStatus, ServiceInstance};
use weft_api::config_entry::{parse_entry_file, ConfigEntry, EntryContext, EntrySet, Protocol};
use weft_api::file_format::FileFormat;
use weft_api::http_match::Request;
use weft_api::load_balancer::{hash_request, Policy};
use weft_api::routing::{instances_of, route_request};
use weft_tests::servers::Cluster;

/// What an example comes to.
#[derive(Clone, Copy)]
enum Expect {
    /// Taken; then `check` shows it does what the docs say.
    Taken(fn(&Docs, &ConfigEntry) -> anyhow::Result<()>),
    /// Taken (a service-intentions entry); then `check` asks the server.
    Intentions(fn(&Docs) -> anyhow::Result<()>),
    /// Refused, the error saying this.
    Refused(&'static str),
}

use Expect::{Intentions, Refused, Taken};

const NOT_YET: &str = "not supported by weft yet";

/// Every example, by path under docs/ without its extension, for both of
/// its forms unless the form is named.
const EXAMPLES: &[(&str, Expect)] = &[
    // proxy-defaults first: the docs' other examples assume HTTP services.
    (
        "proxy-defaults/default-protocol",
        Taken(every_service_speaks_http),
    ),
    (
        "proxy-defaults/default-protocol-enterprise",
        Taken(every_service_speaks_http),
    ),
    (
        "proxy-defaults/access-logs",
        Refused("AccessLogs: Consul's field, not supported by weft yet"),
    ),
    (
        "proxy-defaults/prioritize-by-locality",
        Refused("PrioritizeByLocality: Consul's field, not supported"),
    ),
    (
        "proxy-defaults/prometheus",
        Refused("envoy_prometheus_bind_addr: Consul's field, not supported"),
    ),
    ("proxy-defaults/proxy-specific-defaults", Refused(NOT_YET)),
    (
        "service-defaults/set-the-default-protocol",
        Taken(web_speaks_http),
    ),
    (
        "service-defaults/fault-injection-delay",
        Refused("EnvoyExtensions: Consul's field, not supported"),
    ),
    (
        "service-defaults/rate-limit-all-paths",
        Refused("RateLimit: Consul's field, not supported"),
    ),
    (
        "service-defaults/rate-limit-prefixed-path",
        Refused("RateLimit: Consul's field, not supported"),
    ),
    (
        "service-defaults/rate-limits-multiple-paths",
        Refused("RateLimit: Consul's field, not supported"),
    ),
    (
        "service-defaults/terminating-gateway-destination",
        Refused("Destination: Consul's field, not supported"),
    ),
    (
        "service-defaults/upstream-configuration",
        Taken(counting_through_the_remote_gateway),
    ),
    (
        "service-defaults/upstream-configuration-enterprise",
        Refused("Namespace \"product\": not supported by weft yet"),
    ),
    (
        "service-router/path-prefix-matching",
        Taken(admin_paths_go_to_admin),
    ),
    (
        "service-router/path-prefix-matching-case-insensitive",
        Taken(admin_paths_in_any_case_go_to_admin),
    ),
    (
        "service-router/match-header-and-query-parameter",
        Taken(debug_header_or_query_goes_to_canary),
    ),
    (
        "service-router/grpc-routing",
        Taken(one_grpc_method_goes_to_the_invoice_generator),
    ),
    (
        "service-router/retry-logic",
        Taken(coffees_and_orders_retry_on_reset),
    ),
    (
        "service-splitter/two-subsets-of-same-service",
        Taken(ninety_ten_over_subsets),
    ),
    (
        "service-splitter/set-http-headers",
        Taken(ninety_ten_with_a_version_header),
    ),
    (
        "service-splitter/two-different-services",
        Taken(half_to_web_half_to_web_rewrite),
    ),
    (
        "service-resolver/filter-on-service-version",
        Taken(v1_by_default_by_meta_version),
    ),
    (
        "service-resolver/consistent-load-balancing",
        Taken(maglev_on_the_user_header),
    ),
    (
        "service-resolver/least-request-load-balancing.hcl",
        Taken(least_request_of_two),
    ),
    (
        "service-resolver/failover-targets-federation-and-peering",
        Refused("Peer: Consul's field, not supported"),
    ),
    (
        "service-resolver/failover-to-a-namespace",
        Refused("not supported by weft yet (only \"default\")"),
    ),
    (
        "service-resolver/failover-to-peer",
        Refused("Peer: Consul's field, not supported"),
    ),
    (
        "service-resolver/prioritize-by-locality",
        Refused("PrioritizeByLocality: Consul's field, not supported"),
    ),
    // The docs' HCL writes `Service = frontend`, unquoted: not HCL.
    ("service-resolver/redirect-to-peer.hcl", Refused("HCL")),
    (
        "service-resolver/redirect-to-peer.json",
        Refused("Peer: Consul's field, not supported"),
    ),
    (
        "service-resolver/resolve-virtual-upstreams",
        Taken(web_dc2_is_web_in_dc2),
    ),
    // Its `v2` key names a subset it does not define (Consul refuses it too).
    (
        "service-resolver/service-failover",
        Refused("Failover.v2: no subset \"v2\" in Subsets"),
    ),
    (
        "service-intentions/l4-all-sources",
        Intentions(nothing_reaches_db),
    ),
    (
        "service-intentions/l4-specific-sources-and-destinations",
        Intentions(api_reaches_db_and_web_does_not),
    ),
    (
        "service-intentions/l4-all-destinations",
        Intentions(web_reaches_nothing),
    ),
    (
        "service-intentions/l4-and-l7",
        Intentions(api_by_source_and_by_request),
    ),
    (
        "service-intentions/rest-access",
        Intentions(rest_methods_per_source),
    ),
    (
        "service-intentions/grpc",
        Intentions(billing_methods_per_source),
    ),
    (
        "service-intentions/cluster-peering",
        Refused("Peer: Consul's field, not supported"),
    ),
    ("service-intentions/jwt-validation", Refused("JWT")),
];

/// Entries the examples lean on, as the docs' pages assume them: `web`'s
/// subsets (the canary route and the splits name them).
const SUPPORT: &str = r#"{"Kind": "service-resolver", "Name": "web",
  "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
              "v2": {"Filter": "Service.Meta.version == v2"},
              "canary": {"Filter": "Service.Meta.version == canary"}}}"#;

/// The cluster and what the checks need.
struct Docs {
    cluster: Cluster,
    /// The server's entries that the examples rely on (parsed locally).
    support: Vec<ConfigEntry>,
    /// The current example's file, for messages.
    file: PathBuf,
}

impl Docs {
    /// The support entries and `entry`, as the agents would hold them.
    fn set_with(&self, entry: &ConfigEntry) -> EntrySet {
        let mut set: EntrySet = self.support.iter().cloned().collect();
        set.insert(entry.clone());
        set
    }

    /// `weft intention check SRC DST [ARGS]`: whether it is allowed.
    fn allowed(&self, source: &str, destination: &str, args: &[&str]) -> anyhow::Result<bool> {
        let mut full = vec!["intention", "check", source, destination];
        full.extend_from_slice(args);
        let out = self.cluster.cli_at(&self.cluster.addrs(), &full);
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => bail!(
                "weft {}: {}",
                full.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/consul/docs")
}

/// The files an entry of [`EXAMPLES`] stands for.
fn files_of(name: &str) -> Vec<PathBuf> {
    let dir = docs_dir();
    if name.ends_with(".hcl") || name.ends_with(".json") {
        return vec![dir.join(name)];
    }
    ["hcl", "json"]
        .iter()
        .map(|ext| dir.join(format!("{name}.{ext}")))
        .filter(|p| p.exists())
        .collect()
}

#[test]
fn hashicorps_examples_are_taken_and_behave_or_are_refused_as_not_yet() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, &[])?;
    let support = parse_entry_file(SUPPORT, FileFormat::Json)?;
    let mut docs = Docs {
        cluster,
        support: vec![support],
        file: PathBuf::new(),
    };
    let support_file = (docs.cluster.ca_file.parent())
        .context("the cluster's directory")?
        .join("support-web-resolver.json");
    std::fs::write(&support_file, SUPPORT)?;

    // Every example file is listed (the fragment is checked on its own).
    let mut listed: Vec<PathBuf> = EXAMPLES.iter().flat_map(|(n, _)| files_of(n)).collect();
    listed.push(docs_dir().join("service-intentions/l7-permissions-api-payload.fragment.json"));
    for kind in std::fs::read_dir(docs_dir())? {
        let kind = kind?.path();
        if !kind.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&kind)? {
            let file = file?.path();
            ensure!(
                listed.contains(&file),
                "{} is not listed in EXAMPLES",
                file.display()
            );
        }
    }

    let (mut taken, mut refused) = (0, 0);
    for (name, expect) in EXAMPLES {
        let files = files_of(name);
        ensure!(!files.is_empty(), "{name}: no file");
        for file in files {
            docs.file = file.clone();
            // The support entries as the docs assume them, before each.
            if !name.starts_with("proxy-defaults") {
                docs.cluster
                    .cli(&["config", "write", &support_file.display().to_string()])?;
            }
            let out = docs.cluster.cli_at(
                &docs.cluster.addrs(),
                &["config", "write", &file.display().to_string()],
            );
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let shown = file
                .strip_prefix(docs_dir())
                .unwrap_or(&file)
                .display()
                .to_string();
            match expect {
                Refused(says) => {
                    ensure!(
                        !out.status.success(),
                        "{shown}: taken, but weft should refuse it ({says})"
                    );
                    ensure!(
                        stderr.contains(says),
                        "{shown}: refused, but not saying {says:?}: {stderr}"
                    );
                    refused += 1;
                }
                Taken(check) => {
                    ensure!(out.status.success(), "{shown}: refused: {stderr}");
                    let text = std::fs::read_to_string(&file)?;
                    let format = FileFormat::from_path(&shown).context("format")?;
                    let entry = parse_entry_file(&text, format)?;
                    check(&docs, &entry).with_context(|| shown.clone())?;
                    taken += 1;
                }
                Intentions(check) => {
                    ensure!(out.status.success(), "{shown}: refused: {stderr}");
                    check(&docs).with_context(|| shown.clone())?;
                    taken += 1;
                }
            }
        }
    }
    l7_permissions_payload_through_the_http_api(&docs)?;
    eprintln!("HashiCorp's examples: {taken} taken and behaving, {refused} refused as not yet, 1 fragment");
    Ok(())
}

/// The usage page's `payload.json` for `PUT /v1/connect/intentions/exact`:
/// GETs with `Content-Length: 0` only.
fn l7_permissions_payload_through_the_http_api(docs: &Docs) -> anyhow::Result<()> {
    let body = std::fs::read(
        docs_dir().join("service-intentions/l7-permissions-api-payload.fragment.json"),
    )?;
    let reply = docs.cluster.http(
        1,
        "PUT",
        "/v1/connect/intentions/exact?source=web&destination=api",
        Some(&docs.cluster.token),
        Some(&body),
    )?;
    ensure!(
        reply.status == 200,
        "PUT intention: {} {}",
        reply.status,
        reply.body
    );
    ensure!(docs.allowed(
        "web",
        "api",
        &["--method", "GET", "--header", "Content-Length=0"]
    )?);
    ensure!(!docs.allowed(
        "web",
        "api",
        &["--method", "POST", "--header", "Content-Length=0"]
    )?);
    ensure!(!docs.allowed(
        "web",
        "api",
        &["--method", "GET", "--header", "Content-Length=5"]
    )?);
    Ok(())
}

fn get(path: &str) -> Request {
    Request::new("GET", path)
}

fn instance(id: &str, service: &str, version: &str) -> ServiceInstance {
    ServiceInstance {
        id: id.into(),
        service: service.into(),
        node: "n1".into(),
        address: "10.0.0.1".into(),
        port: 8080,
        meta: BTreeMap::from([("version".to_string(), version.to_string())]),
        health: HealthStatus::Passing,
        ..Default::default()
    }
}

fn every_service_speaks_http(docs: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    let set = docs.set_with(entry);
    ensure!(set.protocol("anything") == Protocol::Http);
    Ok(())
}

fn web_speaks_http(_: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    let mut set = EntrySet::new();
    set.insert(entry.clone());
    ensure!(set.protocol("web") == Protocol::Http);
    ensure!(
        set.protocol("other") == Protocol::Tcp,
        "without the proxy-defaults"
    );
    Ok(())
}

/// The service a request to `from` is routed to (with the support entries).
fn service_for(docs: &Docs, entry: &ConfigEntry, from: &str, request: &Request) -> String {
    route_request(&docs.set_with(entry), from, request, 0.0).service
}

fn counting_through_the_remote_gateway(_: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    use weft_api::config_entry::MeshGatewayMode;
    let ConfigEntry::ServiceDefaults(d) = entry else {
        bail!("not service-defaults: {entry:?}");
    };
    let counting = d.upstream("counting").context("no settings for counting")?;
    let other = d.upstream("other").context("no default settings")?;
    ensure!(
        counting.mesh_gateway == Some(MeshGatewayMode::Remote),
        "{counting:?}"
    );
    ensure!(
        other.mesh_gateway == Some(MeshGatewayMode::Local),
        "{other:?}"
    );
    ensure!(
        counting.limits.and_then(|l| l.max_connections) == Some(512),
        "the override keeps the defaults' limits: {counting:?}"
    );
    Ok(())
}

fn web_dc2_is_web_in_dc2(docs: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    let set = docs.set_with(entry);
    let target = route_request(&set, "web-dc2", &get("/"), 0.0);
    ensure!(
        target.service == "web" && target.datacenter.as_deref() == Some("dc2"),
        "{target:?}"
    );
    Ok(())
}

fn admin_paths_go_to_admin(docs: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    ensure!(service_for(docs, entry, "web", &get("/admin/users")) == "admin");
    ensure!(
        service_for(docs, entry, "web", &get("/Admin")) == "web",
        "case matters"
    );
    ensure!(service_for(docs, entry, "web", &get("/shop")) == "web");
    Ok(())
}

fn admin_paths_in_any_case_go_to_admin(docs: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    for path in ["/Admin", "/admin/x", "/ADMIN/users"] {
        ensure!(
            service_for(docs, entry, "web", &get(path)) == "admin",
            "{path}"
        );
    }
    ensure!(service_for(docs, entry, "web", &get("/adm")) == "web");
    Ok(())
}

fn debug_header_or_query_goes_to_canary(docs: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    let set = docs.set_with(entry);
    let subset = |r: &Request| route_request(&set, "web", r, 0.0).subset;
    ensure!(subset(&get("/").with_header("x-debug", "1")).as_deref() == Some("canary"));
    ensure!(subset(&get("/").with_query("x-debug=1")).as_deref() == Some("canary"));
    ensure!(subset(&get("/").with_query("x-debug=0")).is_none());
    ensure!(subset(&get("/")).is_none());
    Ok(())
}

fn one_grpc_method_goes_to_the_invoice_generator(
    docs: &Docs,
    entry: &ConfigEntry,
) -> anyhow::Result<()> {
    let call = |m: &str| Request::new("POST", format!("/mycompany.BillingService/{m}"));
    ensure!(service_for(docs, entry, "billing", &call("GenerateInvoice")) == "invoice-generator");
    ensure!(service_for(docs, entry, "billing", &call("IssueRefund")) == "billing");
    Ok(())
}

fn coffees_and_orders_retry_on_reset(docs: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    let set = docs.set_with(entry);
    let coffees = route_request(&set, "orders", &get("/coffees/1"), 0.0);
    // The docs' HCL and JSON disagree on this route's service.
    ensure!(
        ["products", "procurement"].contains(&coffees.service.as_str()),
        "{coffees:?}"
    );
    ensure!(coffees.policy.num_retries == 5 && coffees.policy.retry_on_connect_failure);
    ensure!(coffees.policy.timeout == Some(std::time::Duration::from_secs(15)));
    use weft_api::routing::Attempt;
    let reset = Attempt::Reset {
        refused_stream: false,
    };
    ensure!(coffees.policy.retries(4, reset) && !coffees.policy.retries(5, reset));
    let orders = route_request(&set, "orders", &get("/orders"), 0.0);
    ensure!(orders.service == "procurement" && orders.policy.num_retries == 3);
    ensure!(route_request(&set, "orders", &get("/"), 0.0).service == "orders");
    Ok(())
}

/// The subset a roll lands on.
fn split(docs: &Docs, entry: &ConfigEntry, roll: f32) -> (String, Option<String>) {
    let t = route_request(&docs.set_with(entry), "web", &get("/"), roll);
    (t.service, t.subset)
}

fn ninety_ten_over_subsets(docs: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    ensure!(split(docs, entry, 0.0).1.as_deref() == Some("v1"));
    ensure!(split(docs, entry, 89.9).1.as_deref() == Some("v1"));
    ensure!(split(docs, entry, 90.0).1.as_deref() == Some("v2"));
    Ok(())
}

fn ninety_ten_with_a_version_header(docs: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    let set = docs.set_with(entry);
    for (roll, version) in [(10.0, "v1"), (95.0, "v2")] {
        let t = route_request(&set, "web", &get("/"), roll);
        ensure!(t.subset.as_deref() == Some(version));
        let mut headers = http::HeaderMap::new();
        for edits in &t.policy.response_headers {
            edits.apply(&mut headers);
        }
        ensure!(
            headers.get("x-web-version").is_some_and(|v| v == version),
            "{headers:?}"
        );
    }
    Ok(())
}

fn half_to_web_half_to_web_rewrite(docs: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    ensure!(split(docs, entry, 10.0).0 == "web");
    ensure!(split(docs, entry, 60.0).0 == "web-rewrite");
    Ok(())
}

fn v1_by_default_by_meta_version(_: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    let mut set = EntrySet::new();
    set.insert(entry.clone());
    let target = route_request(&set, "web", &get("/"), 0.0);
    ensure!(target.subset.as_deref() == Some("v1"));
    let all = [instance("w1", "web", "v1"), instance("w2", "web", "v2")];
    let ids: Vec<&str> = instances_of(&set, &target, &all)
        .iter()
        .map(|i| i.id.as_str())
        .collect();
    ensure!(ids == ["w1"], "{ids:?}");
    Ok(())
}

fn maglev_on_the_user_header(_: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    let ConfigEntry::ServiceResolver(r) = entry else {
        bail!("not a resolver")
    };
    let lb = r.load_balancer.as_ref().context("LoadBalancer")?;
    ensure!(lb.policy == Some(Policy::Maglev));
    let hash = |user: &str| {
        hash_request(
            &lb.hash_policies,
            Some(&get("/").with_header("x-user-id", user)),
            None,
            0,
        )
        .hash
    };
    ensure!(hash("ada").is_some() && hash("ada") == hash("ada") && hash("ada") != hash("bob"));
    Ok(())
}

fn least_request_of_two(_: &Docs, entry: &ConfigEntry) -> anyhow::Result<()> {
    let ConfigEntry::ServiceResolver(r) = entry else {
        bail!("not a resolver")
    };
    let lb = r.load_balancer.as_ref().context("LoadBalancer")?;
    ensure!(lb.policy == Some(Policy::LeastRequest) && lb.choice_count() == 2);
    Ok(())
}

fn nothing_reaches_db(docs: &Docs) -> anyhow::Result<()> {
    ensure!(!docs.allowed("web", "db", &[])? && !docs.allowed("anyone", "db", &[])?);
    Ok(())
}

fn api_reaches_db_and_web_does_not(docs: &Docs) -> anyhow::Result<()> {
    ensure!(docs.allowed("api", "db", &[])? && !docs.allowed("web", "db", &[])?);
    Ok(())
}

fn web_reaches_nothing(docs: &Docs) -> anyhow::Result<()> {
    ensure!(!docs.allowed("web", "payments", &[])?);
    ensure!(!docs.allowed("web", "anything-else", &[])?);
    Ok(())
}

fn api_by_source_and_by_request(docs: &Docs) -> anyhow::Result<()> {
    ensure!(!docs.allowed("hackathon-project", "api", &[])?);
    ensure!(docs.allowed("web", "api", &[])?);
    let post = ["--method", "POST", "--path", "/v1/reconcile-data"];
    ensure!(docs.allowed("nightly-reconciler", "api", &post)?);
    ensure!(!docs.allowed(
        "nightly-reconciler",
        "api",
        &["--method", "GET", "--path", "/v1/reconcile-data"]
    )?);
    Ok(())
}

fn rest_methods_per_source(docs: &Docs) -> anyhow::Result<()> {
    ensure!(docs.allowed(
        "admin-dashboard",
        "api",
        &["--method", "PUT", "--path", "/v2/widgets/1"]
    )?);
    ensure!(!docs.allowed(
        "admin-dashboard",
        "api",
        &["--method", "PATCH", "--path", "/v2/x"]
    )?);
    ensure!(docs.allowed(
        "report-generator",
        "api",
        &["--method", "GET", "--path", "/v2/widgets"]
    )?);
    ensure!(!docs.allowed(
        "report-generator",
        "api",
        &["--method", "POST", "--path", "/v2/widgets"]
    )?);
    ensure!(!docs.allowed(
        "report-generator",
        "api",
        &["--method", "GET", "--path", "/v2/users"]
    )?);
    Ok(())
}

fn billing_methods_per_source(docs: &Docs) -> anyhow::Result<()> {
    let allowed = |source: &str, method: &str| {
        let path = format!("/mycompany.BillingService/{method}");
        docs.allowed(source, "billing", &["--method", "POST", "--path", &path])
    };
    ensure!(!allowed("frontend-web", "IssueRefund")?);
    ensure!(allowed("frontend-web", "GenerateInvoice")?);
    ensure!(allowed("support-portal", "IssueRefund")?);
    ensure!(!docs.allowed(
        "support-portal",
        "billing",
        &["--method", "POST", "--path", "/other"]
    )?);
    Ok(())
}
