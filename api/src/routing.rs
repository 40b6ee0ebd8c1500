//! Where an HTTP request to a service goes: Consul's discovery chain
//! (`service-router`, then `service-splitter`, then `service-resolver`) as
//! pure functions over the config entries and the catalog.
//!
//! 1. The router's first matching route may name another service and a
//!    subset.
//! 2. When no subset has been chosen, the splitter of the service reached so
//!    far picks a share by weight (the caller rolls the dice).
//! 3. The resolver of that service may redirect it (once), and gives the
//!    default subset when none was chosen.
//! 4. The matched route's destination also carries the request's policy:
//!    a timeout for the whole request, when and how often to retry it, and
//!    the headers to change on the request and its answer ([`RoutePolicy`]);
//!    a split's header changes come after the route's.
//! 5. The instances are those of the resulting service that belong to the
//!    subset (its filter and health rule), or its passing instances when
//!    there is no subset. A subset that the resolver does not define has no
//!    instances: traffic is refused rather than sent somewhere unintended.
//! 6. When that leaves no instance, the resolver's `Failover` for the subset
//!    (or for `*`) names where to go instead: another service or subset
//!    here, or in other datacenters in order ([`instances_or_failover`]).
//!    A `Redirect.Datacenter` sends the service to another datacenter
//!    outright.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::catalog::{HealthStatus, ServiceInstance};
use crate::config_entry::{
    pick_split, select_route, ConfigEntry, EntryKind, EntrySet, RetryOn, Route,
};
use crate::header_edits::HeaderModifiers;
use crate::http_match::Request;

/// A service and, optionally, one of its resolver's subsets, with the
/// policy of the route that led there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub subset: Option<String>,
    /// Another datacenter (a resolver's `Redirect.Datacenter`, or an
    /// upstream's); `None`: this one.
    pub datacenter: Option<String>,
    pub policy: RoutePolicy,
}

impl Target {
    /// `service` (in `datacenter`, or this one), before any entry applies.
    pub fn service_in(service: &str, datacenter: Option<&str>) -> Self {
        Target {
            service: service.to_string(),
            subset: None,
            datacenter: datacenter.map(str::to_string),
            policy: RoutePolicy::default(),
        }
    }

    fn service(service: &str) -> Self {
        Self::service_in(service, None)
    }
}

/// The instances a target resolved to: their service, their datacenter
/// (`None`: this one) and the instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved<'a> {
    pub service: String,
    pub datacenter: Option<String>,
    pub instances: Vec<&'a ServiceInstance>,
}

/// How one request is carried: a route destination's `RequestTimeout`,
/// `NumRetries`, `RetryOnConnectFailure`, `RetryOnStatusCodes`, `RetryOn`,
/// `PrefixRewrite` and header changes (with the split's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePolicy {
    /// For the whole request, retries included.
    pub timeout: Option<Duration>,
    /// How many times a request is tried again. As in Consul (which leaves
    /// Envoy's default in place), a route with a retry condition and no
    /// `NumRetries` (or 0) retries once.
    pub num_retries: u32,
    pub retry_on_connect_failure: bool,
    pub retry_on_status_codes: Vec<u16>,
    pub retry_on: Vec<RetryOn>,
    /// `PrefixRewrite`: the path (prefix) the route matched, and what
    /// replaces it before the request is sent.
    pub rewrite: Option<(String, String)>,
    /// `RequestHeaders` of the route, then of the split, applied in order.
    pub request_headers: Vec<HeaderModifiers>,
    /// `ResponseHeaders` of the route, then of the split.
    pub response_headers: Vec<HeaderModifiers>,
}

/// What one attempt at a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// No connection to the instance could be made (the request was not sent).
    ConnectFailure,
    /// The request went out and no answer came: the connection or stream
    /// was reset (`refused_stream`: an HTTP/2 REFUSED_STREAM).
    Reset { refused_stream: bool },
    /// The instance answered.
    Answer(Answer),
}

/// What a retry decision needs of an answer: its status, the gRPC status
/// in its headers (a trailers-only gRPC answer), whether it carries
/// `x-envoy-ratelimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Answer {
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub ratelimited: bool,
}

impl Answer {
    pub fn status(status: u16) -> Self {
        Answer {
            status,
            ..Default::default()
        }
    }
}

impl RetryOn {
    /// Whether this condition holds for `attempt`.
    pub fn holds(self, attempt: Attempt) -> bool {
        let grpc = |code: u32| matches!(attempt, Attempt::Answer(a) if a.grpc_status == Some(code));
        match self {
            RetryOn::FiveXx => match attempt {
                Attempt::Answer(a) => (500..=599).contains(&a.status),
                _ => true,
            },
            RetryOn::GatewayError => match attempt {
                Attempt::Answer(a) => matches!(a.status, 502..=504),
                _ => true,
            },
            RetryOn::Reset => !matches!(attempt, Attempt::Answer(_)),
            RetryOn::ConnectFailure => attempt == Attempt::ConnectFailure,
            RetryOn::RefusedStream => matches!(
                attempt,
                Attempt::Reset {
                    refused_stream: true
                }
            ),
            RetryOn::EnvoyRatelimited => matches!(attempt, Attempt::Answer(a) if a.ratelimited),
            RetryOn::Retriable4xx => matches!(attempt, Attempt::Answer(a) if a.status == 409),
            RetryOn::Cancelled => grpc(1),
            RetryOn::DeadlineExceeded => grpc(4),
            RetryOn::ResourceExhausted => grpc(8),
            RetryOn::Internal => grpc(13),
            RetryOn::Unavailable => grpc(14),
        }
    }
}

impl RoutePolicy {
    fn of(route: &Route) -> Self {
        let Some(destination) = &route.destination else {
            return RoutePolicy::default();
        };
        let matched = route
            .route_match
            .as_ref()
            .and_then(|m| m.http.as_ref())
            .and_then(|h| h.path_prefix.as_ref().or(h.path_exact.as_ref()))
            // Requests' paths are normalized: what a route matched of one,
            // and cuts, is its rule's normalized path.
            .and_then(|p| p.normal().map(str::to_string));
        let has_condition = destination.retry_on_connect_failure
            || !destination.retry_on_status_codes.is_empty()
            || !destination.retry_on.is_empty();
        let num_retries = match destination.num_retries {
            Some(n) if n > 0 => n,
            _ if has_condition => 1,
            _ => 0,
        };
        let edits = |m: &HeaderModifiers| (!m.is_empty()).then(|| m.clone());
        RoutePolicy {
            rewrite: matched.zip(destination.prefix_rewrite.clone()),
            // Validated on write; a bad one here means no timeout.
            timeout: destination
                .request_timeout
                .as_ref()
                .and_then(|t| t.get().ok().copied()),
            num_retries,
            retry_on_connect_failure: destination.retry_on_connect_failure,
            retry_on_status_codes: destination.retry_on_status_codes.clone(),
            retry_on: destination.retry_on.clone(),
            request_headers: edits(&destination.request_headers).into_iter().collect(),
            response_headers: edits(&destination.response_headers).into_iter().collect(),
        }
    }

    /// Whether a request whose attempt came to `attempt`, after `retried`
    /// retries already, is tried again.
    pub fn retries(&self, retried: u32, attempt: Attempt) -> bool {
        if retried >= self.num_retries {
            return false;
        }
        let listed = match attempt {
            Attempt::ConnectFailure => self.retry_on_connect_failure,
            Attempt::Answer(a) => self.retry_on_status_codes.contains(&a.status),
            Attempt::Reset { .. } => false,
        };
        listed || self.retry_on.iter().any(|c| c.holds(attempt))
    }

    /// The path to send instead of `path`, when the route rewrites it. The
    /// matched prefix is cut by its length, in any case (the route matched
    /// it already, case-insensitively if it says so).
    pub fn rewritten(&self, path: &str) -> Option<String> {
        let (matched, replacement) = self.rewrite.as_ref()?;
        let head = path.get(..matched.len())?;
        if !head.eq_ignore_ascii_case(matched) {
            return None;
        }
        Some(format!("{replacement}{}", &path[matched.len()..]))
    }

    /// How long to wait before retry number `retried` + 1, as Envoy waits:
    /// fully jittered exponential back-off from 25 ms, at most 250 ms.
    /// `roll` is a number in `[0, 1)`.
    pub fn backoff(retried: u32, roll: f64) -> Duration {
        let base = Duration::from_millis(25);
        let ceiling = base
            .saturating_mul(1u32 << retried.min(4))
            .min(Duration::from_millis(250));
        ceiling.mul_f64(roll.clamp(0.0, 1.0))
    }

    /// Whether anything here needs the request kept for another attempt or
    /// a deadline.
    pub fn is_plain(&self) -> bool {
        self.timeout.is_none() && self.num_retries == 0
    }

    /// Whether a request leaves changed (its path rewritten or its
    /// headers edited): judged before, it is not what is sent.
    pub fn changes_request(&self) -> bool {
        self.rewrite.is_some() || !self.request_headers.is_empty()
    }
}

/// Where `request` to `service` goes. `roll` is a number in `[0, 100)` for
/// the splitter.
pub fn route_request(entries: &EntrySet, service: &str, request: &Request, roll: f32) -> Target {
    route_request_in(entries, Target::service(service), request, roll)
}

/// [`route_request`] from `start` (a service, perhaps in another
/// datacenter): routes and splits keep its datacenter.
pub fn route_request_in(entries: &EntrySet, start: Target, request: &Request, roll: f32) -> Target {
    let service = start.service.clone();
    let service = service.as_str();
    let datacenter = start.datacenter.clone();
    let mut target = start;
    if let Some(ConfigEntry::ServiceRouter(router)) = entries.get(EntryKind::ServiceRouter, service)
    {
        if let Some((route, destination)) =
            select_route(router, request).and_then(|(_, r)| r.destination.as_ref().map(|d| (r, d)))
        {
            target = Target {
                service: destination
                    .service
                    .clone()
                    .unwrap_or_else(|| service.to_string()),
                subset: destination.service_subset.clone(),
                datacenter: datacenter.clone(),
                policy: RoutePolicy::of(route),
            };
        }
    }
    if target.subset.is_none() {
        if let Some(ConfigEntry::ServiceSplitter(splitter)) =
            entries.get(EntryKind::ServiceSplitter, &target.service)
        {
            if let Some(split) = pick_split(splitter, roll) {
                let mut policy = target.policy;
                if !split.request_headers.is_empty() {
                    policy.request_headers.push(split.request_headers.clone());
                }
                if !split.response_headers.is_empty() {
                    policy.response_headers.push(split.response_headers.clone());
                }
                target = Target {
                    service: split
                        .service
                        .clone()
                        .unwrap_or_else(|| target.service.clone()),
                    subset: split.service_subset.clone(),
                    datacenter: datacenter.clone(),
                    policy,
                };
            }
        }
    }
    resolve(entries, target)
}

/// Applies the resolver of `target.service`: a redirect (followed once), or
/// the default subset when none was chosen.
pub fn resolve(entries: &EntrySet, target: Target) -> Target {
    let Some(ConfigEntry::ServiceResolver(resolver)) =
        entries.get(EntryKind::ServiceResolver, &target.service)
    else {
        return target;
    };
    if let Some(redirect) = &resolver.redirect {
        let service = redirect
            .service
            .clone()
            .unwrap_or_else(|| target.service.clone());
        let subset = redirect.service_subset.clone();
        let subset = subset.or_else(|| match entries.get(EntryKind::ServiceResolver, &service) {
            Some(ConfigEntry::ServiceResolver(r)) => r.default_subset.clone(),
            _ => None,
        });
        return Target {
            service,
            subset,
            datacenter: redirect.datacenter.clone().or(target.datacenter),
            policy: target.policy,
        };
    }
    Target {
        subset: target.subset.or_else(|| resolver.default_subset.clone()),
        ..target
    }
}

/// The instances of `target`, from `instances` (any services, any health).
pub fn instances_of<'a>(
    entries: &EntrySet,
    target: &Target,
    instances: impl IntoIterator<Item = &'a ServiceInstance>,
) -> Vec<&'a ServiceInstance> {
    let of_service = instances
        .into_iter()
        .filter(|i| i.service == target.service);
    let Some(name) = &target.subset else {
        return of_service
            .filter(|i| i.health == HealthStatus::Passing)
            .collect();
    };
    let subset = match entries.get(EntryKind::ServiceResolver, &target.service) {
        Some(ConfigEntry::ServiceResolver(r)) => r.subsets.get(name),
        _ => None,
    };
    match subset {
        Some(subset) => of_service.filter(|i| subset.contains(i)).collect(),
        None => Vec::new(),
    }
}

/// The instances of `target` (this datacenter's, `here`, from `local`,
/// which gives a service's instances, another's from `remote`) or, when it has none, of the failover its
/// resolver names for the subset (or `*`): its `Service`/`ServiceSubset` in
/// this datacenter, or in each of its `Datacenters` in order, or each of its
/// `Targets` in order, until one has an instance. Failover is one step.
/// Entries come from the primary to every datacenter, so a datacenter named
/// that is `here` means the local instances.
pub fn instances_or_failover<'a>(
    entries: &EntrySet,
    target: &Target,
    (local, here): (impl Fn(&str) -> Vec<&'a ServiceInstance>, &str),
    remote: &'a BTreeMap<String, Vec<ServiceInstance>>,
) -> Resolved<'a> {
    let elsewhere = |dc: Option<&String>| dc.filter(|dc| dc.as_str() != here).cloned();
    let of = |t: &Target, dc: Option<&String>| -> Vec<&'a ServiceInstance> {
        match elsewhere(dc) {
            None => instances_of(entries, t, local(&t.service)),
            Some(dc) => instances_of(entries, t, remote.get(&dc).into_iter().flatten()),
        }
    };
    let found = of(target, target.datacenter.as_ref());
    let resolved = |t: &Target, dc: Option<&String>, instances| Resolved {
        service: t.service.clone(),
        datacenter: elsewhere(dc),
        instances,
    };
    if !found.is_empty() {
        return resolved(target, target.datacenter.as_ref(), found);
    }
    let none = resolved(target, target.datacenter.as_ref(), Vec::new());
    let Some(ConfigEntry::ServiceResolver(resolver)) =
        entries.get(EntryKind::ServiceResolver, &target.service)
    else {
        return none;
    };
    let key = target.subset.as_deref().unwrap_or("*");
    let Some(failover) = resolver
        .failover
        .get(key)
        .or_else(|| resolver.failover.get("*"))
    else {
        return none;
    };
    // Where to look, in order: (the target, the datacenter it is in).
    let to = |service: &Option<String>, subset: &Option<String>, dc: &Option<String>| {
        let next = if service.is_none() && subset.is_none() {
            Target {
                datacenter: dc.clone().or_else(|| target.datacenter.clone()),
                ..target.clone()
            }
        } else {
            resolve(
                entries,
                Target {
                    service: service.clone().unwrap_or_else(|| target.service.clone()),
                    subset: subset.clone(),
                    datacenter: dc.clone().or_else(|| target.datacenter.clone()),
                    policy: target.policy.clone(),
                },
            )
        };
        let dc = next.datacenter.clone();
        (next, dc)
    };
    let candidates: Vec<(Target, Option<String>)> = if !failover.targets.is_empty() {
        failover
            .targets
            .iter()
            .map(|t| to(&t.service, &t.service_subset, &t.datacenter))
            .collect()
    } else if !failover.datacenters.is_empty() {
        failover
            .datacenters
            .iter()
            .map(|dc| {
                to(
                    &failover.service,
                    &failover.service_subset,
                    &Some(dc.clone()),
                )
            })
            .collect()
    } else {
        vec![to(&failover.service, &failover.service_subset, &None)]
    };
    for (next, dc) in &candidates {
        if next == target && elsewhere(dc.as_ref()) == elsewhere(target.datacenter.as_ref()) {
            continue;
        }
        let found = of(next, dc.as_ref());
        if !found.is_empty() {
            return resolved(next, dc.as_ref(), found);
        }
    }
    none
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config_entry::{
        ResolverFailover, ResolverRedirect, ResolverSubset, Route, RouteDestination, RouteMatch,
        ServiceResolver, ServiceRouter, ServiceSplitter, Split,
    };
    use crate::http_match::{HeaderMatch, HttpMatch};

    /// Instances by service, as an agent's view indexes them.
    fn by_service<'a>(all: &'a [ServiceInstance]) -> impl Fn(&str) -> Vec<&'a ServiceInstance> {
        move |service| all.iter().filter(|i| i.service == service).collect()
    }

    fn instance(id: &str, service: &str, version: &str, health: HealthStatus) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            service: service.into(),
            node: "n".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: Vec::new(),
            meta: BTreeMap::from([("version".to_string(), version.to_string())]),
            health,
            check_output: String::new(),
            create_index: 1,
            modify_index: 1,
            ..Default::default()
        }
    }

    fn resolver() -> ConfigEntry {
        let subset = |v: &str| ResolverSubset {
            filter: format!("Service.Meta.version == {v}").into(),
            only_passing: false,
        };
        ConfigEntry::ServiceResolver(ServiceResolver {
            name: "api".into(),
            meta: Default::default(),
            default_subset: Some("v1".into()),
            subsets: BTreeMap::from([("v1".into(), subset("v1")), ("v2".into(), subset("v2"))]),
            ..Default::default()
        })
    }

    fn splitter(v1: f32, v2: f32) -> ConfigEntry {
        let split = |w, s: &str| Split {
            weight: w,
            service: None,
            service_subset: Some(s.into()),
            ..Default::default()
        };
        ConfigEntry::ServiceSplitter(ServiceSplitter {
            name: "api".into(),
            meta: Default::default(),
            splits: vec![split(v1, "v1"), split(v2, "v2")],
        })
    }

    fn canary_router() -> ConfigEntry {
        ConfigEntry::ServiceRouter(ServiceRouter {
            name: "api".into(),
            meta: Default::default(),
            routes: vec![Route {
                route_match: Some(RouteMatch {
                    http: Some(HttpMatch {
                        headers: vec![HeaderMatch {
                            name: "x-canary".into(),
                            exact: Some("1".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                }),
                destination: Some(RouteDestination {
                    service_subset: Some("v2".into()),
                    ..Default::default()
                }),
            }],
        })
    }

    fn entries(list: Vec<ConfigEntry>) -> EntrySet {
        let mut set = EntrySet::new();
        for e in list {
            set.insert(e);
        }
        set
    }

    fn get() -> Request {
        Request::new("GET", "/")
    }

    fn target(service: &str, subset: Option<&str>) -> Target {
        Target {
            datacenter: None,
            service: service.into(),
            subset: subset.map(str::to_string),
            policy: RoutePolicy::default(),
        }
    }

    #[test]
    fn no_entries_means_the_service_itself() {
        let set = EntrySet::new();
        assert_eq!(
            route_request(&set, "api", &get(), 50.0),
            target("api", None)
        );
    }

    #[test]
    fn the_resolver_gives_the_default_subset() {
        let set = entries(vec![resolver()]);
        assert_eq!(
            route_request(&set, "api", &get(), 50.0),
            target("api", Some("v1"))
        );
    }

    #[test]
    fn the_splitter_picks_by_weight() {
        let set = entries(vec![resolver(), splitter(90.0, 10.0)]);
        assert_eq!(
            route_request(&set, "api", &get(), 0.0),
            target("api", Some("v1"))
        );
        assert_eq!(
            route_request(&set, "api", &get(), 89.9),
            target("api", Some("v1"))
        );
        assert_eq!(
            route_request(&set, "api", &get(), 90.0),
            target("api", Some("v2"))
        );
        assert_eq!(
            route_request(&set, "api", &get(), 99.9),
            target("api", Some("v2"))
        );
    }

    #[test]
    fn a_matching_route_wins_over_the_splitter() {
        let set = entries(vec![resolver(), splitter(100.0, 0.0), canary_router()]);
        let mut canary = get();
        canary.headers.push(("x-canary".into(), "1".into()));
        assert_eq!(
            route_request(&set, "api", &canary, 0.0),
            target("api", Some("v2"))
        );
        // Without the header no route matches: the splitter decides.
        assert_eq!(
            route_request(&set, "api", &get(), 99.0),
            target("api", Some("v1"))
        );
    }

    #[test]
    fn the_matched_route_carries_its_policy() {
        let mut router = canary_router();
        if let ConfigEntry::ServiceRouter(r) = &mut router {
            let d = r.routes[0].destination.as_mut().unwrap();
            d.request_timeout = Some("1500ms".into());
            d.num_retries = Some(2);
            d.retry_on_connect_failure = true;
            d.retry_on_status_codes = vec![503];
        }
        let set = entries(vec![resolver(), splitter(100.0, 0.0), router]);
        let mut canary = get();
        canary.headers.push(("x-canary".into(), "1".into()));
        let policy = route_request(&set, "api", &canary, 0.0).policy;
        assert_eq!(policy.timeout, Some(Duration::from_millis(1500)));
        assert!(!policy.is_plain());
        assert_eq!(
            route_request(&set, "api", &get(), 0.0).policy,
            RoutePolicy::default(),
            "no route matched: no policy"
        );
        assert!(RoutePolicy::default().is_plain());
    }

    #[test]
    fn prefix_rewrite_replaces_the_matched_prefix() {
        let route = Route {
            route_match: Some(RouteMatch {
                http: Some(HttpMatch {
                    path_prefix: Some("/v2/".into()),
                    ..Default::default()
                }),
            }),
            destination: Some(RouteDestination {
                prefix_rewrite: Some("/".into()),
                ..Default::default()
            }),
        };
        let policy = RoutePolicy::of(&route);
        assert_eq!(policy.rewritten("/v2/users/7").as_deref(), Some("/users/7"));
        assert_eq!(
            policy.rewritten("/V2/users/7").as_deref(),
            Some("/users/7"),
            "a case-insensitive match is cut too"
        );
        assert_eq!(policy.rewritten("/other"), None);
        // A rule written unnormalized matched the request's normalized
        // path: its normalized form is what is cut.
        let mut unnormal = route.clone();
        if let Some(http) = unnormal.route_match.as_mut().and_then(|m| m.http.as_mut()) {
            http.path_prefix = Some("/v2//".into());
        }
        let policy_of_unnormal = RoutePolicy::of(&unnormal);
        assert_eq!(
            policy_of_unnormal.rewritten("/v2/users/7").as_deref(),
            Some("/users/7")
        );
        assert!(policy.is_plain(), "a rewrite keeps no body");
        assert_eq!(RoutePolicy::default().rewritten("/v2/x"), None);
    }

    #[test]
    fn retries_follow_the_policy_and_stop_at_its_count() {
        let p = RoutePolicy {
            num_retries: 2,
            retry_on_connect_failure: true,
            retry_on_status_codes: vec![502, 503],
            ..Default::default()
        };
        let status = |code| Attempt::Answer(Answer::status(code));
        assert!(p.retries(0, Attempt::ConnectFailure));
        assert!(p.retries(1, status(503)));
        assert!(!p.retries(2, status(503)), "two retries at most");
        assert!(!p.retries(0, status(500)), "not a listed status");
        assert!(!p.retries(0, status(200)));
        let reset = Attempt::Reset {
            refused_stream: false,
        };
        assert!(
            !p.retries(0, reset),
            "a reset only with a RetryOn condition"
        );
        let no_connect = RoutePolicy {
            retry_on_connect_failure: false,
            ..p.clone()
        };
        assert!(!no_connect.retries(0, Attempt::ConnectFailure));
        assert!(!RoutePolicy::default().retries(0, Attempt::ConnectFailure));
    }

    #[test]
    fn retries_back_off_with_jitter_up_to_250ms() {
        assert_eq!(RoutePolicy::backoff(0, 0.0), Duration::ZERO);
        assert_eq!(RoutePolicy::backoff(0, 1.0), Duration::from_millis(25));
        assert_eq!(RoutePolicy::backoff(1, 1.0), Duration::from_millis(50));
        assert_eq!(RoutePolicy::backoff(3, 1.0), Duration::from_millis(200));
        assert_eq!(RoutePolicy::backoff(9, 1.0), Duration::from_millis(250));
        assert_eq!(
            RoutePolicy::backoff(u32::MAX, 0.5),
            Duration::from_millis(125)
        );
    }

    #[test]
    fn retry_on_conditions_as_envoy_reads_them() {
        let status = |code| Attempt::Answer(Answer::status(code));
        let grpc = |code| {
            Attempt::Answer(Answer {
                status: 200,
                grpc_status: Some(code),
                ratelimited: false,
            })
        };
        let reset = Attempt::Reset {
            refused_stream: false,
        };
        let refused = Attempt::Reset {
            refused_stream: true,
        };
        let connect = Attempt::ConnectFailure;
        let cases: &[(RetryOn, &[Attempt], &[Attempt])] = &[
            (
                RetryOn::FiveXx,
                &[status(500), status(503), reset, refused, connect],
                &[status(200), status(409), grpc(14)],
            ),
            (
                RetryOn::GatewayError,
                &[status(502), status(503), status(504), reset, connect],
                &[status(500), status(501), status(200)],
            ),
            (RetryOn::Reset, &[reset, refused, connect], &[status(503)]),
            (RetryOn::ConnectFailure, &[connect], &[reset, status(503)]),
            (RetryOn::RefusedStream, &[refused], &[reset, connect]),
            (
                RetryOn::Retriable4xx,
                &[status(409)],
                &[status(400), status(429)],
            ),
            (RetryOn::Cancelled, &[grpc(1)], &[grpc(14), status(503)]),
            (RetryOn::DeadlineExceeded, &[grpc(4)], &[grpc(1)]),
            (RetryOn::ResourceExhausted, &[grpc(8)], &[grpc(4)]),
            (RetryOn::Internal, &[grpc(13)], &[grpc(8)]),
            (RetryOn::Unavailable, &[grpc(14)], &[grpc(13), status(503)]),
            (
                RetryOn::EnvoyRatelimited,
                &[Attempt::Answer(Answer {
                    status: 429,
                    grpc_status: None,
                    ratelimited: true,
                })],
                &[status(429)],
            ),
        ];
        for (condition, hold, not) in cases {
            for a in *hold {
                assert!(condition.holds(*a), "{condition:?} should hold for {a:?}");
            }
            for a in *not {
                assert!(
                    !condition.holds(*a),
                    "{condition:?} should not hold for {a:?}"
                );
            }
        }
    }

    #[test]
    fn a_retry_condition_without_num_retries_retries_once_as_consul_does() {
        let route = |num_retries, retry_on: Vec<RetryOn>| Route {
            route_match: None,
            destination: Some(RouteDestination {
                num_retries,
                retry_on,
                ..Default::default()
            }),
        };
        assert_eq!(
            RoutePolicy::of(&route(None, vec![RetryOn::Reset])).num_retries,
            1
        );
        assert_eq!(
            RoutePolicy::of(&route(Some(0), vec![RetryOn::Reset])).num_retries,
            1
        );
        assert_eq!(
            RoutePolicy::of(&route(Some(3), vec![RetryOn::Reset])).num_retries,
            3
        );
        assert_eq!(RoutePolicy::of(&route(Some(3), vec![])).num_retries, 3);
        assert!(RoutePolicy::of(&route(None, vec![])).is_plain());
        let p = RoutePolicy::of(&route(None, vec![RetryOn::GatewayError]));
        let reset = Attempt::Reset {
            refused_stream: false,
        };
        assert!(p.retries(0, reset) && !p.retries(1, reset));
    }

    #[test]
    fn a_splits_header_changes_come_after_the_routes() {
        let edit = |name: &str| HeaderModifiers {
            set: BTreeMap::from([(name.to_string(), "1".to_string())]),
            ..Default::default()
        };
        let mut router = canary_router();
        if let ConfigEntry::ServiceRouter(r) = &mut router {
            let d = r.routes[0].destination.as_mut().unwrap();
            d.service_subset = None;
            d.request_headers = edit("x-route");
            d.response_headers = edit("x-route-answer");
        }
        let mut split = splitter(100.0, 0.0);
        if let ConfigEntry::ServiceSplitter(s) = &mut split {
            s.splits[0].request_headers = edit("x-split");
        }
        let set = entries(vec![resolver(), split, router]);
        let mut canary = get();
        canary.headers.push(("x-canary".into(), "1".into()));
        let t = route_request(&set, "api", &canary, 0.0);
        assert_eq!(t.subset.as_deref(), Some("v1"));
        assert_eq!(
            t.policy.request_headers,
            vec![edit("x-route"), edit("x-split")]
        );
        assert_eq!(t.policy.response_headers, vec![edit("x-route-answer")]);
        assert!(t.policy.is_plain(), "header changes keep no body");
    }

    #[test]
    fn a_redirect_is_followed_once() {
        let redirect = ConfigEntry::ServiceResolver(ServiceResolver {
            name: "api".into(),
            meta: Default::default(),
            redirect: Some(ResolverRedirect {
                service: Some("api-next".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let next = ConfigEntry::ServiceResolver(ServiceResolver {
            name: "api-next".into(),
            meta: Default::default(),
            default_subset: Some("blue".into()),
            redirect: Some(ResolverRedirect {
                service: Some("elsewhere".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let set = entries(vec![redirect, next]);
        assert_eq!(
            route_request(&set, "api", &get(), 0.0),
            target("api-next", Some("blue"))
        );
    }

    #[test]
    fn failover_takes_over_when_the_subset_has_no_instance() {
        let mut r = resolver();
        if let ConfigEntry::ServiceResolver(r) = &mut r {
            r.failover.insert(
                "v2".into(),
                ResolverFailover {
                    service_subset: Some("v1".into()),
                    ..Default::default()
                },
            );
            r.failover.insert(
                "*".into(),
                ResolverFailover {
                    service: Some("backup".into()),
                    ..Default::default()
                },
            );
        }
        let set = entries(vec![r]);
        let all = [
            instance("a1", "api", "v1", HealthStatus::Passing),
            instance("a2", "api", "v2", HealthStatus::Critical),
            instance("b1", "backup", "v1", HealthStatus::Passing),
        ];
        let none = BTreeMap::new();
        let pick = |t: Target| -> (String, Vec<String>) {
            let r = instances_or_failover(&set, &t, (by_service(&all), "dc1"), &none);
            assert_eq!(r.datacenter, None);
            (
                r.service,
                r.instances.into_iter().map(|i| i.id.clone()).collect(),
            )
        };
        // v2 has no healthy instance: its failover, v1.
        assert_eq!(
            pick(target("api", Some("v2"))),
            ("api".into(), vec!["a1".into()])
        );
        // v1 has one: no failover.
        assert_eq!(
            pick(target("api", Some("v1"))),
            ("api".into(), vec!["a1".into()])
        );
        // An undefined subset falls to `*`: the backup service.
        assert_eq!(
            pick(target("api", Some("v9"))),
            ("backup".into(), vec!["b1".into()])
        );
    }

    #[test]
    fn failover_follows_datacenters_in_order_and_comes_back() {
        let mut r = resolver();
        if let ConfigEntry::ServiceResolver(r) = &mut r {
            r.default_subset = None;
            r.failover.insert(
                "*".into(),
                ResolverFailover {
                    datacenters: vec!["dc2".into(), "dc3".into()],
                    ..Default::default()
                },
            );
        }
        let set = entries(vec![r]);
        let remote: BTreeMap<String, Vec<ServiceInstance>> = [
            (
                "dc2".to_string(),
                vec![instance("r2", "api", "v1", HealthStatus::Critical)],
            ),
            (
                "dc3".to_string(),
                vec![instance("r3", "api", "v1", HealthStatus::Passing)],
            ),
        ]
        .into();
        let pick = |local: &[ServiceInstance], remote: &BTreeMap<String, Vec<ServiceInstance>>| {
            let r = instances_or_failover(
                &set,
                &target("api", None),
                (by_service(local), "dc1"),
                remote,
            );
            (
                r.datacenter,
                r.instances
                    .into_iter()
                    .map(|i| i.id.clone())
                    .collect::<Vec<_>>(),
            )
        };
        let healthy = [instance("a1", "api", "v1", HealthStatus::Passing)];
        let failing = [instance("a1", "api", "v1", HealthStatus::Critical)];
        // Local instances first; when they all fail, the first datacenter
        // with a passing one (dc2's is critical); back when they pass.
        assert_eq!(pick(&healthy, &remote), (None, vec!["a1".to_string()]));
        assert_eq!(
            pick(&failing, &remote),
            (Some("dc3".to_string()), vec!["r3".to_string()])
        );
        let mut dc2_up = remote.clone();
        dc2_up.get_mut("dc2").unwrap()[0].health = HealthStatus::Passing;
        assert_eq!(
            pick(&failing, &dc2_up),
            (Some("dc2".to_string()), vec!["r2".to_string()])
        );
        assert_eq!(pick(&healthy, &dc2_up), (None, vec!["a1".to_string()]));
        // Nowhere passing: nothing (refused, not sent anywhere else).
        assert_eq!(pick(&failing, &BTreeMap::new()), (None, vec![]));
    }

    #[test]
    fn failover_targets_are_tried_in_order_each_with_its_service_subset_and_datacenter() {
        use crate::config_entry::FailoverTarget;
        let mut r = resolver();
        if let ConfigEntry::ServiceResolver(r) = &mut r {
            r.failover.insert(
                "*".into(),
                ResolverFailover {
                    targets: vec![
                        // Its own v2 here, then backup in dc2, then its own
                        // (default subset v1) in dc3.
                        FailoverTarget {
                            service_subset: Some("v2".into()),
                            ..Default::default()
                        },
                        FailoverTarget {
                            service: Some("backup".into()),
                            datacenter: Some("dc2".into()),
                            ..Default::default()
                        },
                        FailoverTarget {
                            datacenter: Some("dc3".into()),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
            );
        }
        let set = entries(vec![r]);
        let pick = |local: &[ServiceInstance], remote: &BTreeMap<String, Vec<ServiceInstance>>| {
            let r = instances_or_failover(
                &set,
                &target("api", Some("v1")),
                (by_service(local), "dc1"),
                remote,
            );
            let ids: Vec<String> = r.instances.iter().map(|i| i.id.clone()).collect();
            (r.service, r.datacenter, ids)
        };
        let v1_down_v2_up = [
            instance("a1", "api", "v1", HealthStatus::Critical),
            instance("a2", "api", "v2", HealthStatus::Passing),
        ];
        let all_down = [
            instance("a1", "api", "v1", HealthStatus::Critical),
            instance("a2", "api", "v2", HealthStatus::Critical),
        ];
        let remote: BTreeMap<String, Vec<ServiceInstance>> = [
            (
                "dc2".to_string(),
                vec![
                    instance("b2", "backup", "v1", HealthStatus::Passing),
                    // api in dc2 is not a target: never picked.
                    instance("x2", "api", "v1", HealthStatus::Passing),
                ],
            ),
            (
                "dc3".to_string(),
                vec![
                    instance("c3", "api", "v2", HealthStatus::Passing),
                    instance("a3", "api", "v1", HealthStatus::Passing),
                ],
            ),
        ]
        .into();
        let s = |x: &str| x.to_string();
        assert_eq!(
            pick(&v1_down_v2_up, &remote),
            (s("api"), None, vec![s("a2")])
        );
        assert_eq!(
            pick(&all_down, &remote),
            (s("backup"), Some(s("dc2")), vec![s("b2")])
        );
        let mut no_backup = remote.clone();
        no_backup.get_mut("dc2").unwrap()[0].health = HealthStatus::Critical;
        // dc3's api in the failing subset (v1), not c3 (v2).
        assert_eq!(
            pick(&all_down, &no_backup),
            (s("api"), Some(s("dc3")), vec![s("a3")])
        );
        no_backup.remove("dc3");
        assert_eq!(pick(&all_down, &no_backup), (s("api"), None, vec![]));
    }

    #[test]
    fn a_redirect_to_another_datacenter_takes_its_instances() {
        let redirect = ConfigEntry::ServiceResolver(ServiceResolver {
            name: "api".into(),
            meta: Default::default(),
            redirect: Some(ResolverRedirect {
                datacenter: Some("dc2".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let set = entries(vec![redirect]);
        let t = route_request(&set, "api", &get(), 0.0);
        assert_eq!(t.datacenter.as_deref(), Some("dc2"));
        let local = [instance("a1", "api", "v1", HealthStatus::Passing)];
        let remote: BTreeMap<String, Vec<ServiceInstance>> = [(
            "dc2".to_string(),
            vec![instance("r2", "api", "v1", HealthStatus::Passing)],
        )]
        .into();
        let r = instances_or_failover(&set, &t, (by_service(&local), "dc1"), &remote);
        assert_eq!(r.datacenter.as_deref(), Some("dc2"));
        assert_eq!(r.instances[0].id, "r2");
        // In dc2 itself (entries are the primary's everywhere), the same
        // redirect means dc2's own instances.
        let none = BTreeMap::new();
        let r = instances_or_failover(&set, &t, (by_service(&remote["dc2"]), "dc2"), &none);
        assert_eq!((r.datacenter, r.instances[0].id.as_str()), (None, "r2"));
    }

    #[test]
    fn instances_follow_the_subset_and_health() {
        let set = entries(vec![resolver()]);
        let all = [
            instance("a1", "api", "v1", HealthStatus::Passing),
            instance("a2", "api", "v2", HealthStatus::Passing),
            instance("a3", "api", "v2", HealthStatus::Warning),
            instance("a4", "api", "v2", HealthStatus::Critical),
            instance("o1", "other", "v2", HealthStatus::Passing),
        ];
        let ids = |t: &Target| -> Vec<String> {
            instances_of(&set, t, &all)
                .into_iter()
                .map(|i| i.id.clone())
                .collect()
        };
        assert_eq!(ids(&target("api", Some("v2"))), ["a2", "a3"]);
        assert_eq!(ids(&target("api", Some("v1"))), ["a1"]);
        assert_eq!(ids(&target("api", None)), ["a1", "a2"]);
        assert!(ids(&target("api", Some("v3"))).is_empty(), "unknown subset");
        assert!(ids(&target("other", Some("v2"))).is_empty(), "no resolver");
    }
}
