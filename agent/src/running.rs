//! The parts of a running agent that follow its configuration file: local
//! services with their registrations, checks, certificates, explicit
//! upstream listeners and workload cgroups. [`Running::reload`] re-reads
//! the file and applies a [`crate::reload::Plan`] to them, touching nothing
//! the plan does not name: connections of unchanged services go on.
//!
//! A reload does what can fail first (read and check the file, bind new
//! upstream ports, get certificates, register with the servers); a failure
//! there leaves the running configuration serving and is reported with its
//! cause (a bad file with its file:line).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::control::Control;
use crate::health::runner::HealthChecks;
use crate::identity::Identities;
use crate::intercept::Interception;
use crate::proxy::{outbound, ProxyContext};
use crate::registered::{ApiCheck, Registered, RegisteredCheck, RegisteredService};
use crate::reload::{plan, Plan};

/// One explicit upstream's accept loop.
struct Upstream {
    source: String,
    destination: Dest,
    task: JoinHandle<()>,
}

/// Why a reload failed: before anything was changed (the running
/// configuration stays), or after the point of no return (the new one runs,
/// but a last step failed).
enum Failed {
    Before(String),
    After(String),
}

/// What a reload changes.
pub struct Running {
    pub path: PathBuf,
    pub config: Arc<RwLock<Arc<AgentConfig>>>,
    pub control: Arc<Control>,
    pub checks: HealthChecks,
    pub identities: Arc<Identities>,
    pub ctx: Arc<ProxyContext>,
    pub interception: Option<Arc<Interception>>,
    /// Duplicates of the listening sockets, by name, to hand to a successor.
    pub offered: Arc<Mutex<Vec<(String, OwnedFd)>>>,
    upstreams: Mutex<BTreeMap<SocketAddr, Upstream>>,
    /// Services registered through the local API (kept in the data dir).
    registered: Mutex<Vec<RegisteredService>>,
    /// Checks added through the local API to services of the file.
    api_checks: Mutex<Vec<ApiCheck>>,
    /// The configuration file's text as last started or reloaded: what a
    /// registration through the local API runs with (only a reload reads
    /// the file again, so an operator's edits wait for it).
    file_text: Mutex<crate::config::ConfigFile>,
    /// One reload or registration at a time.
    reloading: tokio::sync::Mutex<()>,
}

/// Why a local registration or deregistration was not done.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The request does not make a valid configuration.
    #[error("{0}")]
    Invalid(String),
    #[error("no service {0:?} was registered through the local API")]
    NotFound(String),
    #[error("Unknown check ID {0:?}: no such check was added through the local API")]
    CheckNotFound(String),
    #[error(
        "service {0:?} is defined in the agent's configuration file: remove it there and reload"
    )]
    InFile(String),
    /// The id's registration changed between the caller's permission check
    /// and the change.
    #[error("the registration of {0:?} changed meanwhile: try again")]
    Changed(String),
    /// Valid, but the servers refused it or could not be reached.
    #[error("{0}")]
    Failed(String),
}

/// The listener name of an explicit upstream on `addr`.
pub fn upstream_name(addr: SocketAddr) -> String {
    format!("upstream:{addr}")
}

/// Where `upstream`'s local port listens.
fn upstream_addr(local_port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], local_port))
}

/// (local address, source service, destination service) of every explicit
/// upstream in `config`.
/// An upstream's destination: a service, and its datacenter when another's.
type Dest = (String, Option<String>);

fn upstreams_of(config: &AgentConfig) -> BTreeMap<SocketAddr, (String, Dest)> {
    config
        .services
        .iter()
        .flat_map(|s| {
            s.upstreams.iter().map(|u| {
                (
                    upstream_addr(u.local_port),
                    (s.name.clone(), (u.name.clone(), u.datacenter.clone())),
                )
            })
        })
        .collect()
}

impl Running {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: PathBuf,
        config: Arc<RwLock<Arc<AgentConfig>>>,
        control: Arc<Control>,
        checks: HealthChecks,
        identities: Arc<Identities>,
        ctx: Arc<ProxyContext>,
        interception: Option<Arc<Interception>>,
        offered: Arc<Mutex<Vec<(String, OwnedFd)>>>,
        file_text: crate::config::ConfigFile,
    ) -> Self {
        Self {
            file_text: Mutex::new(file_text),
            path,
            config,
            control,
            checks,
            identities,
            ctx,
            interception,
            offered,
            upstreams: Mutex::new(BTreeMap::new()),
            registered: Mutex::new(Vec::new()),
            api_checks: Mutex::new(Vec::new()),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// The running configuration.
    pub fn config(&self) -> Arc<AgentConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// Serves `listener` as the upstream from `source` to `destination`.
    pub fn serve_upstream(&self, listener: TcpListener, source: &str, destination: &Dest) {
        let Ok(addr) = listener.local_addr() else {
            return;
        };
        tracing::info!(%addr, %source, destination = %destination.0, datacenter = ?destination.1, "upstream listening");
        let task = tokio::spawn(outbound::serve_upstream(
            self.ctx.clone(),
            listener,
            source.to_string(),
            destination.clone(),
            self.interception.clone(),
        ));
        let old = self.upstreams.lock().expect("upstreams lock").insert(
            addr,
            Upstream {
                source: source.to_string(),
                destination: destination.clone(),
                task,
            },
        );
        if let Some(old) = old {
            old.task.abort();
        }
    }

    /// Stops accepting on every upstream (shutdown, handover); open
    /// connections go on.
    pub fn stop_upstreams(&self) {
        for (_, u) in std::mem::take(&mut *self.upstreams.lock().expect("upstreams lock")) {
            u.task.abort();
        }
    }

    /// Re-reads the configuration file and applies what changed: a line
    /// for the operator, or why nothing was applied.
    pub async fn reload(&self) -> Result<String, String> {
        let _one = self.reloading.lock().await;
        let text = AgentConfig::read_file(&self.path).map_err(|e| e.to_string())?;
        let file = AgentConfig::from_file_text(&text, &self.path, &Registered::default())
            .map_err(|e| e.to_string())?;
        let (kept, gone) = self.kept().yielding_to(&file);
        if !gone.is_empty() {
            tracing::warn!(
                ids = ?gone,
                "the configuration file now defines these: their registrations through the local API are dropped"
            );
        }
        // Held to the rules against the new file: a port it gives the agent
        // (an upstream listener) is no instance's any more.
        let (kept, refused) = kept.admitted_by(&file);
        for why in &refused {
            tracing::warn!("a registration through the local API is dropped: {why}");
        }
        if !gone.is_empty() || !refused.is_empty() {
            return (self.switch_kept(&text, kept).await).map_err(|e| e.to_string());
        }
        let new =
            AgentConfig::from_file_text(&text, &self.path, &kept).map_err(|e| e.to_string())?;
        let summary = match self.switch(new).await {
            Ok(summary) => Ok(summary),
            Err(Failed::Before(why)) => return Err(why),
            // The new configuration runs: its orphans go all the same.
            Err(Failed::After(why)) => Err(why),
        };
        *self.file_text.lock().expect("file text lock") = text;
        let what = summary.as_ref().unwrap_or_else(|why| why);
        self.drop_orphan_checks(&kept)
            .map_err(|e| format!("{what}, but {e}"))?;
        summary
    }

    /// What is registered through the local API now.
    fn kept(&self) -> Registered {
        Registered {
            services: self.registered.lock().expect("registered lock").clone(),
            checks: self.api_checks.lock().expect("checks lock").clone(),
        }
    }

    /// Forgets (and stops keeping) the checks added through the API to
    /// services the running configuration no longer has.
    fn drop_orphan_checks(&self, kept: &Registered) -> Result<(), String> {
        let config = self.config();
        let mut checks = kept.checks.clone();
        checks.retain(|c| config.services.iter().any(|s| s.id == c.service_id));
        if checks.len() == kept.checks.len() {
            return Ok(());
        }
        tracing::info!(
            dropped = kept.checks.len() - checks.len(),
            "checks added through the local API to services that left the configuration dropped"
        );
        *self.api_checks.lock().expect("checks lock") = checks.clone();
        crate::registered::save_checks(&config.data_dir, &checks)
            .map_err(|e| format!("keeping the checks: {e}"))
    }

    /// Starts from the services and checks registered through the local
    /// API that were kept (the configuration already includes them).
    pub fn set_registered(&self, registered: Registered) {
        *self.registered.lock().expect("registered lock") = registered.services;
        *self.api_checks.lock().expect("checks lock") = registered.checks;
    }

    /// The checks added through the local API to file service `service_id`.
    pub fn api_checks(&self, service_id: &str) -> Vec<RegisteredCheck> {
        let checks = self.api_checks.lock().expect("checks lock");
        checks
            .iter()
            .filter(|c| c.service_id == service_id)
            .map(|c| c.check.clone())
            .collect()
    }

    /// Adds `check` to file service `service_id` (replacing one of the
    /// same id added the same way), and keeps it in the data dir.
    pub async fn register_check(
        &self,
        service_id: &str,
        check: RegisteredCheck,
    ) -> Result<String, RegistrationError> {
        // Checked under the lock reloads take, against the configuration
        // that runs: a reload between a check and the switch would
        // otherwise see a registration it never held to its rules.
        let _one = self.reloading.lock().await;
        let config = self.config();
        let address = (config.services.iter())
            .find(|s| s.id == service_id)
            .map(|s| s.address)
            .ok_or_else(|| self.not_registered(service_id))?;
        check
            .check_target(address, &config)
            .map_err(RegistrationError::Invalid)?;
        let mut kept = self.kept();
        // Only this service's check of that id is replaced.
        kept.checks
            .retain(|c| c.service_id != service_id || c.check.check_id != check.check_id);
        kept.checks.push(ApiCheck {
            service_id: service_id.to_string(),
            check,
        });
        self.switch_registered(kept).await
    }

    /// Removes the check added through the local API as `check_id`.
    pub async fn deregister_check(&self, check_id: &str) -> Result<String, RegistrationError> {
        let _one = self.reloading.lock().await;
        let mut kept = self.kept();
        let before = kept.checks.len();
        kept.checks
            .retain(|c| c.check.check_id.as_deref() != Some(check_id));
        if kept.checks.len() == before {
            return Err(RegistrationError::CheckNotFound(check_id.to_string()));
        }
        self.switch_registered(kept).await
    }

    /// The name of the service registered through the local API as `id`.
    pub fn registered_name(&self, id: &str) -> Option<String> {
        let registered = self.registered.lock().expect("registered lock");
        registered
            .iter()
            .find(|r| r.id() == id)
            .map(|r| r.name.clone())
    }

    /// The registration made through the local API as `id`.
    pub fn registration(&self, id: &str) -> Option<RegisteredService> {
        let registered = self.registered.lock().expect("registered lock");
        registered.iter().find(|r| r.id() == id).cloned()
    }

    /// Registers `service` on this node, replacing one of the same id that
    /// was registered the same way if it is an instance of `replacing`
    /// (none: there must be none), and keeps it in the data dir.
    pub async fn register(
        &self,
        service: RegisteredService,
        replacing: Option<String>,
    ) -> Result<String, RegistrationError> {
        // Under the reload lock, as for checks.
        let _one = self.reloading.lock().await;
        service
            .check_addresses(&self.config())
            .map_err(RegistrationError::Invalid)?;
        let mut kept = self.kept();
        let id = service.id().to_string();
        let current = kept.services.iter().find(|r| r.id() == id);
        if current.map(|r| &r.name) != replacing.as_ref() {
            return Err(RegistrationError::Changed(id));
        }
        kept.services.retain(|r| r.id() != id);
        kept.services.push(service);
        self.switch_registered(kept).await
    }

    /// Deregisters the instance registered through the local API as `id`,
    /// if it is (still) an instance of `name`.
    pub async fn deregister(&self, id: &str, name: &str) -> Result<String, RegistrationError> {
        let _one = self.reloading.lock().await;
        let mut kept = self.kept();
        match kept.services.iter().find(|r| r.id() == id) {
            None => return Err(self.not_registered(id)),
            Some(r) if r.name != name => return Err(RegistrationError::Changed(id.to_string())),
            Some(_) => {}
        }
        kept.services.retain(|r| r.id() != id);
        self.switch_registered(kept).await
    }

    /// Why `id` is not registered through the local API.
    pub fn not_registered(&self, id: &str) -> RegistrationError {
        if self.config().services.iter().any(|s| s.id == id) {
            RegistrationError::InFile(id.to_string())
        } else {
            RegistrationError::NotFound(id.to_string())
        }
    }

    /// Runs the file as last started or reloaded with `kept`.
    async fn switch_registered(&self, kept: Registered) -> Result<String, RegistrationError> {
        let text = self.file_text.lock().expect("file text lock").clone();
        self.switch_kept(&text, kept).await
    }

    /// Runs the file's `text` with `kept` and keeps `kept` in the data dir.
    async fn switch_kept(
        &self,
        text: &crate::config::ConfigFile,
        kept: Registered,
    ) -> Result<String, RegistrationError> {
        let new = AgentConfig::from_file_text(text, &self.path, &kept)
            .map_err(|e| RegistrationError::Invalid(e.to_string()))?;
        let data_dir = new.data_dir.clone();
        let summary = match self.switch(new).await {
            Ok(summary) => Ok(summary),
            Err(Failed::Before(why)) => return Err(RegistrationError::Failed(why)),
            // Past the point of no return the registrations run: they are
            // kept (and saved) as when all went well, or the next change
            // would start from the list before this one and drop them.
            Err(Failed::After(why)) => Err(why),
        };
        let what = summary.as_ref().unwrap_or_else(|why| why);
        *self.file_text.lock().expect("file text lock") = text.clone();
        *self.registered.lock().expect("registered lock") = kept.services.clone();
        *self.api_checks.lock().expect("checks lock") = kept.checks.clone();
        let keeping = |e: crate::registered::RegisteredError| {
            RegistrationError::Failed(format!("{what}, but keeping it: {e}"))
        };
        crate::registered::save(&data_dir, &kept.services).map_err(keeping)?;
        crate::registered::save_checks(&data_dir, &kept.checks).map_err(keeping)?;
        self.drop_orphan_checks(&kept)
            .map_err(|e| RegistrationError::Failed(format!("{what}, but {e}")))?;
        summary.map_err(RegistrationError::Failed)
    }

    /// Makes `new` the running configuration. `Failed::After` says what
    /// was applied and which last step failed: `new` runs all the same.
    async fn switch(&self, new: AgentConfig) -> Result<String, Failed> {
        let old = self.config();
        let plan = plan(&old, &new)
            .map_err(|e| Failed::Before(format!("{}: {e}", self.path.display())))?;
        if plan.is_empty() {
            return Ok(plan.summary());
        }
        let new = Arc::new(new);
        // The new upstream ports are the agent's before they listen (the
        // kernel queues connections from the bind on): both sets while the
        // switch runs, the old alone if it fails before its end.
        let mut both = old.own_addresses();
        both.extend(new.own_addresses());
        self.ctx.own.store(Arc::new(both));
        let applied = self.apply(&old, &new, &plan).await;
        if let Err(Failed::Before(why)) = applied {
            self.ctx.own.store(Arc::new(old.own_addresses()));
            return Err(Failed::Before(why));
        }
        // Past the point of no return the new configuration is the running
        // one, even if a last step failed: the next reload starts from what
        // runs (its upstream ports are bound, its services registered).
        *self.config.write().expect("config lock") = new.clone();
        self.ctx.own.store(Arc::new(new.own_addresses()));
        let summary = plan.summary();
        if let Err(Failed::After(why)) = applied {
            tracing::error!(%summary, "configuration reloaded, but {why}");
            return Err(Failed::After(format!("{summary} applied, but {why}")));
        }
        tracing::info!(%summary, "configuration reloaded");
        Ok(summary)
    }

    async fn apply(
        &self,
        old: &AgentConfig,
        new: &Arc<AgentConfig>,
        plan: &Plan,
    ) -> Result<(), Failed> {
        // What can fail, first.
        let (before, after) = (upstreams_of(old), upstreams_of(new));
        let mut bound = Vec::new();
        for addr in after.keys() {
            if before.contains_key(addr) {
                // Running already (for this pair or, below, another).
                continue;
            }
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| Failed::Before(format!("upstream port {addr}: {e}")))?;
            crate::mark::listener(&listener)
                .map_err(|e| Failed::Before(format!("marking upstream port {addr}: {e}")))?;
            bound.push((*addr, listener));
        }
        // Registered first: the CA signs only for services on this node.
        self.control.set_config(new.clone());
        let registering = plan
            .added
            .iter()
            .map(|s| (None, s))
            .chain(plan.changed.iter().map(|(was, s)| (Some(was), s)));
        let mut failed = None;
        let mut registered = Vec::new();
        for (was, s) in registering {
            if let Err(e) = self.control.register_service(s).await {
                failed = Some(format!("registering {}: {e}", s.id));
                break;
            }
            registered.push((was, s));
        }
        let names: Vec<String> = new.services.iter().map(|s| s.name.clone()).collect();
        if failed.is_none() {
            if let Err(e) = self.identities.add_services(&names).await {
                failed = Some(format!("certificates: {e}"));
            }
        }
        if let Some(why) = failed {
            // Back to the running configuration: what was added goes, what
            // was changed is registered as it was.
            self.control.set_config(Arc::new(old.clone()));
            for (was, s) in registered {
                let undone = match was {
                    None => self.control.deregister_service(&s.id).await,
                    Some(was) => self.control.register_service(was).await,
                };
                if let Err(e) = undone {
                    tracing::warn!(service = %s.id, "undoing a refused reload: {e}");
                }
            }
            return Err(Failed::Before(why));
        }

        // From here on, the new configuration is the running one.
        for s in &plan.removed {
            self.checks.remove(&s.id);
            if let Err(e) = self.control.deregister_service(&s.id).await {
                // The next registration after a reconnect does not bring it
                // back; the servers' own reaper or an operator removes it.
                tracing::warn!(service = %s.id, "deregistering a removed service: {e}");
            }
        }
        for (was, s) in &plan.changed {
            if was.checks != s.checks {
                // Replaces the running checks; TTL checks kept go on.
                self.checks.add(&s.id, &s.name, s.checks.clone());
            }
        }
        for s in &plan.added {
            self.checks.add(&s.id, &s.name, s.checks.clone());
        }
        // Upstreams: gone ones stop accepting (their connections go on),
        // moved pairs take the running listener, new ones serve.
        for (addr, (source, destination)) in after.iter().filter(|(a, _)| before.contains_key(*a)) {
            let mut upstreams = self.upstreams.lock().expect("upstreams lock");
            if let Some(u) = upstreams.get_mut(addr) {
                if (&u.source, &u.destination) != (source, destination) {
                    tracing::info!(%addr, %source, destination = %destination.0, "upstream now carries another pair");
                    u.task.abort();
                    drop(upstreams);
                    self.restart_upstream(*addr, source, destination);
                }
            }
        }
        for (addr, _) in before.iter().filter(|(a, _)| !after.contains_key(a)) {
            if let Some(u) = self.upstreams.lock().expect("upstreams lock").remove(addr) {
                u.task.abort();
                tracing::info!(%addr, "upstream removed");
            }
            let name = upstream_name(*addr);
            self.offered
                .lock()
                .expect("sockets lock")
                .retain(|(n, _)| *n != name);
        }
        for (addr, listener) in bound {
            let (source, destination) = &after[&addr];
            if let Ok(dup) = listener.as_fd().try_clone_to_owned() {
                self.offered
                    .lock()
                    .expect("sockets lock")
                    .push((upstream_name(addr), dup));
            }
            self.serve_upstream(listener, source, destination);
        }
        self.identities.retain_services(&names);
        if let Some(interception) = &self.interception {
            let view = self.ctx.view.load();
            interception
                .reconfigure(new, &view)
                .map_err(|e| Failed::After(format!("eBPF workloads: {e}")))?;
        }
        Ok(())
    }

    /// Serves an upstream's running listener (kept among the offered
    /// sockets) for another pair.
    fn restart_upstream(&self, addr: SocketAddr, source: &str, destination: &Dest) {
        let name = upstream_name(addr);
        let dup = self
            .offered
            .lock()
            .expect("sockets lock")
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, fd)| fd.try_clone().ok());
        let listener = dup
            .map(std::net::TcpListener::from)
            .and_then(|l| l.set_nonblocking(true).map(|()| l).ok())
            .and_then(|l| TcpListener::from_std(l).ok());
        match listener {
            Some(listener) => self.serve_upstream(listener, source, destination),
            None => tracing::error!(%addr, "upstream listener lost; reload again to bind it"),
        }
    }
}
