//! The control plane: owns the running configuration and applies `lbctl` requests to it.
//!
//! Every change is made on a copy of the config, checked exactly as a config file is
//! ([`Config::validate`]) and against the host (no VIP or real server may be one of the host's
//! own addresses), and only then applied: a rejected change leaves everything as it was.
//! Applying builds a new immutable [`Snapshot`] (generation + 1) and sends it to every worker
//! over its command channel; workers switch between batches and report the generation they
//! use, and the reply waits for all of them, so a change is in force when `lbctl` returns. A
//! change that does not take (a steering-map update fails) is undone and reported as refused;
//! one that some worker has not taken in time is reported as an error saying where it stands.
//! The packet path never takes a lock; this module's own lock is held by control requests,
//! health results and the neighbour refresh only.
//!
//! VIPs enter the XDP steering map after the workers know them and leave it before the workers
//! forget them, and a new VIP is announced with gratuitous ARP. A real server added live is
//! never waited for: the kernel is asked for its MAC and it takes traffic once the neighbour
//! refresh learns it.
//!
//! Who may do what: [`Role::Root`] everything; [`Role::Operator`] (a member of
//! `engine.control_group`) everything an operator does (status, statistics, drain, halt,
//! weights, services and real servers with tcp, http or no checks, reload and save of the file
//! lbd started with) but nothing that would run a command or write a file of its choosing as
//! root: external checks and saving elsewhere are root's.
//!
//! Beside it: [`server`], the control socket, [`health`], the checks whose results come
//! back here, [`replica`], the configuration an HA pair's active node shares, and [`layer7`],
//! HAProxy kept in step for the `mode = "snat"` services.

pub mod drcheck;
pub mod health;
pub mod layer7;
pub mod replica;
pub mod server;

use crate::control::health::{CheckResult, Target, Tracker};
use crate::io::host::{self, HostFacts};
use crate::io::steer::VipSteering;
use crate::io::worker::{WorkerCommand, WorkerReport, WorkerSender};
use crate::packet::counters::DropReason;
use crate::packet::snapshot::{AdminState, After, ServerState, ServiceIds, Snapshot};
use crossbeam::channel::{Sender, bounded};
use hashbrown::Equivalent;
use lbd_config::{Config, ConfigError, HealthKind, RealServer, Service};
use lbd_proto::{
    Command, RealServerChanges, RealServerEdit, RealServerName, RealServerStats, RealServerStatus,
    Reply, Response, ServiceChanges, ServiceEdit, ServiceName, ServiceStats, ServiceStatus,
    StatsReport, StatusReport, WeightChange, WorkerStats,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

/// How long a change waits for every worker to use the new snapshot.
const APPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `status`/`stats` wait for a worker's report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after a change the neighbour table is read often for the MACs it asked for.
const FAST_RESOLUTION: Duration = Duration::from_secs(5);

/// The control side's handle on one worker.
#[derive(Debug)]
pub struct WorkerLink {
    /// The queue it serves.
    pub queue: u32,
    /// Its command channel (which wakes it when it sleeps).
    pub commands: WorkerSender,
    /// The snapshot generation it uses.
    pub applied: Arc<AtomicU64>,
}

/// What the sender of a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// root, or lbd's own user: everything.
    Root,
    /// A member of `engine.control_group`: operate the balancer, gain nothing else.
    Operator,
}

/// A real server's name: (service label, real server label).
type ServerKey = (String, String);

/// A real server's name, borrowed: looks up a [`ServerKey`] without a copy of either label
/// (a snapshot looks up every server of every service).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerName<'a>(pub &'a str, pub &'a str);

impl Hash for ServerName<'_> {
    /// As the [`ServerKey`] it names hashes: a tuple hashes its fields in order, and a
    /// `String` as its `str`.
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.0, self.1).hash(state);
    }
}

impl Equivalent<ServerKey> for ServerName<'_> {
    fn equivalent(&self, key: &ServerKey) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// What a snapshot's server states come from, besides the config: the same sources give
/// every server the same state and MAC.
#[derive(Debug, PartialEq, Eq)]
struct StateSources {
    /// [`Tracker::ups_changed`].
    ups_changed: u64,
    /// `Control::macs_changed`.
    macs_changed: u64,
    full: hashbrown::HashSet<ServerKey>,
    operator: OperatorStates,
}

/// What operators set on real servers beyond the config: drain and halt, and the weight a
/// server had before `set-weight 0` drained it (its connections that no table holds are still
/// looked up with that weight). Follows renames; forgets removed servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct OperatorStates {
    admin: hashbrown::HashMap<ServerKey, AdminState>,
    weight_before_zero: hashbrown::HashMap<ServerKey, u16>,
}

impl OperatorStates {
    fn set(&mut self, key: ServerKey, state: AdminState) {
        if state == AdminState::Online {
            self.admin.remove(&key);
        } else {
            self.admin.insert(key, state);
        }
    }

    fn state_of<Q: Hash + Equivalent<ServerKey>>(&self, key: &Q) -> ServerState {
        ServerState {
            admin: self.admin.get(key).copied().unwrap_or_default(),
            weight_before_zero: self.weight_before_zero.get(key).copied().unwrap_or(0),
            ..ServerState::default()
        }
    }

    /// Moves what was set on the servers matching `from` to the key `to` gives them.
    fn rename(&mut self, from: impl Fn(&ServerKey) -> bool, to: impl Fn(&ServerKey) -> ServerKey) {
        fn moved<V>(
            map: &mut hashbrown::HashMap<ServerKey, V>,
            from: &dyn Fn(&ServerKey) -> bool,
            to: &dyn Fn(&ServerKey) -> ServerKey,
        ) {
            let keys: Vec<ServerKey> = map.keys().filter(|k| from(k)).cloned().collect();
            for key in keys {
                if let Some(value) = map.remove(&key) {
                    map.insert(to(&key), value);
                }
            }
        }
        moved(&mut self.admin, &from, &to);
        moved(&mut self.weight_before_zero, &from, &to);
    }

    /// Keeps only the servers `config` has.
    fn retain_servers_of(&mut self, config: &Config) {
        let exists = |(s, r): &ServerKey| real_server_index(config, s, r).is_ok();
        self.admin.retain(|key, _| exists(key));
        self.weight_before_zero.retain(|key, _| exists(key));
    }

    /// Remembers the weight of each server that `new` gives weight 0 and `old` did not.
    fn note_weights(&mut self, old: &Config, new: &Config) {
        fn weights(config: &Config) -> HashMap<(&str, &str), u16> {
            config
                .services
                .iter()
                .flat_map(|s| {
                    s.real_servers
                        .iter()
                        .map(move |rs| ((s.label.as_str(), rs.label.as_str()), rs.weight))
                })
                .collect()
        }
        // Only servers at weight 0 need a look at the old config (usually none): this runs
        // with every change, whatever the number of servers.
        if !self.weight_before_zero.is_empty() {
            let new_weights = weights(new);
            self.weight_before_zero.retain(|(service, rs), _| {
                new_weights
                    .get(&(service.as_str(), rs.as_str()))
                    .is_none_or(|&weight| weight == 0)
            });
        }
        let mut old_weights = None;
        for service in &new.services {
            for rs in service.real_servers.iter().filter(|rs| rs.weight == 0) {
                let old_weights = old_weights.get_or_insert_with(|| weights(old));
                if let Some(&before) = old_weights.get(&(service.label.as_str(), rs.label.as_str()))
                    && before > 0
                {
                    self.weight_before_zero
                        .insert((service.label.clone(), rs.label.clone()), before);
                }
            }
        }
    }
}

/// The running configuration and what is needed to change it live.
pub struct Control {
    config: Config,
    /// The host's addresses the running config was last checked against.
    host_addresses: Vec<(String, IpAddr)>,
    config_path: PathBuf,
    own_mac: [u8; 6],
    snapshot: Arc<Snapshot>,
    ids: ServiceIds,
    operator: OperatorStates,
    macs: HashMap<IpAddr, [u8; 6]>,
    /// Counts the changes of `macs`.
    macs_changed: u64,
    /// The last snapshot built and what its servers' states came from: a build from the same
    /// (the snapshot before is that one) need not look at each server of a shared service.
    built_from: Option<(Weak<Snapshot>, StateSources)>,
    steering: Box<dyn VipSteering>,
    host: Box<dyn HostFacts>,
    clock: Box<dyn Clock>,
    workers: Vec<WorkerLink>,
    apply_timeout: Duration,
    health: Tracker,
    /// What the health checker checks: built when the checker asks for it after a change of
    /// the config (at most once a tick), not by the change itself. With 10,000 servers a build
    /// takes about 2.4 ms, which made a change with 1000 services cost twice as much.
    health_targets: Option<Arc<[Target]>>,
    /// Real servers at their connection limit (IPVS -x/-y hysteresis).
    full: hashbrown::HashSet<ServerKey>,
    /// When a change last asked the kernel for MACs lbd did not have.
    asked_for_macs: Option<Instant>,
    /// Whether this node answers ARP for the VIPs: always alone, only when active in a pair.
    answers_arp: bool,
    /// The HA pair's node, when there is one.
    ha: Option<HaLink>,
    /// Configuration changes made on the pair ([`Control::config_generation`]).
    config_generation: u64,
    /// The active node whose configuration this passive node follows ([`replica`]).
    following: Option<Ipv4Addr>,
    /// HAProxy, for the SNAT services.
    layer7: Box<dyn crate::l7::Layer7>,
    /// Where HAProxy's files are and whom it shares stick tables with.
    layer7_setup: crate::l7::haproxy::Setup,
    /// Whether HAProxy runs (there are SNAT services).
    layer7_running: bool,
    /// The SNAT VIPs on the interface now.
    held: BTreeSet<Ipv4Addr>,
    /// The DR check's rounds and verdicts.
    dr: drcheck::DrCheck,
    /// This host's addresses on the interface that DR questions and probes come from: one
    /// IPv4 and one global IPv6 address, when it has them.
    probe_sources: Vec<IpAddr>,
}

/// What the control plane asks of the HA node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaRequest {
    /// Become active.
    Takeover,
    /// Hand over to the peer.
    Release,
}

/// The control plane's handle on the HA node: where to send requests, where it publishes
/// its state.
#[derive(Debug, Clone)]
pub struct HaLink {
    /// Requests to the node.
    pub requests: Sender<HaRequest>,
    /// The node's state as `ha status` shows it, kept current by the node.
    pub report: Arc<std::sync::Mutex<lbd_proto::HaReport>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("config_path", &self.config_path)
            .field("generation", &self.snapshot.generation)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// Why a request was refused, or did not take effect as asked. Its text is what `lbctl`
/// prints; every refusal says that nothing changed, every partial effect says what stands.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The sender may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No service has this label.
    #[error("no service named {0:?}")]
    NoService(String),
    /// The service has no real server with this label.
    #[error("service {service:?} has no real server named {label:?}")]
    NoRealServer {
        /// The service's label.
        service: String,
        /// The label asked for.
        label: String,
    },
    /// An edit that changes nothing.
    #[error("{0}: nothing to change")]
    NothingToChange(&'static str),
    /// The changed configuration fails the checks a file gets.
    #[error("{0}; nothing changed")]
    Invalid(#[from] ConfigError),
    /// The change names one of the host's own addresses (or they could not be read).
    #[error("{0}; nothing changed")]
    HostAddress(String),
    /// The file `reload` reads cannot be read or is invalid.
    #[error("{}: {error}; nothing changed", path.display())]
    Reload {
        /// The file lbd started with.
        path: PathBuf,
        /// What is wrong with it.
        error: ConfigError,
    },
    /// A reload would change an `[engine]` key.
    #[error("engine.{0} cannot change while lbd runs (restart lbd to change it); nothing changed")]
    EngineKey(&'static str),
    /// `config save` to a relative path.
    #[error(
        "config save: {} is not an absolute path (lbctl makes a relative path absolute from \
         its own directory)",
        .0.display()
    )]
    RelativePath(PathBuf),
    /// The file could not be written.
    #[error("cannot save the config to {}: {source}", path.display())]
    Save {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A steering-map update failed before the workers saw the change.
    #[error("{0}; nothing changed")]
    Steering(String),
    /// A steering-map update failed after the workers took the change: it was undone.
    #[error(
        "{error}; the change had reached the workers and is undone (generation {generation}), \
         nothing changed{also}"
    )]
    Undone {
        /// The update that failed.
        error: String,
        /// The generation that restores the running configuration.
        generation: u64,
        /// What did not come back as it was, if anything.
        also: String,
    },
    /// A change asked of a passive node, which follows the active one's configuration.
    #[error(
        "this node is passive and follows the configuration of the active node, {0}: make the \
         change there (it reaches this node within a second); nothing changed"
    )]
    Passive(Ipv4Addr),
    /// The active node's replica cannot be adopted.
    #[error("the active node's configuration cannot be adopted: {0}")]
    Replica(String),
    /// HAProxy refused a change to the SNAT services (its own words), or is not there.
    #[error("{0}; nothing changed")]
    Layer7(String),
    /// An `ha` command on a node that is not part of a pair.
    #[error("this node is not part of an HA pair ([ha] is not set in its configuration)")]
    NotInPair,
    /// The change is in force, but some workers had not taken it in time.
    #[error(
        "{message} (generation {generation}), but the worker(s) of queue(s) {queues:?} did not \
         take it within {timeout_ms} ms: it is in force on the other workers and will be on \
         those when they next run (until then they drop frames for VIPs it added); lbd may be \
         overloaded"
    )]
    Lagging {
        /// What was done.
        message: String,
        /// Its generation.
        generation: u64,
        /// The queues of the workers that had not taken it.
        queues: Vec<u32>,
        /// How long they had.
        timeout_ms: u128,
    },
}

/// The outcome of a request: the reply, or why it was refused.
type Outcome = Result<Reply, ControlError>;

/// The clock: a door like the others, so that time-dependent rules are tested with a fake.
pub trait Clock: Send {
    /// Monotonic time, for deadlines.
    fn now(&self) -> Instant;
    /// Wall time, for what operators read (when a check ran).
    fn wall(&self) -> SystemTime;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// What the control plane reaches the kernel and the world through: the XDP steering map, the
/// host's facts (addresses, neighbour table), the clock. Tests hand it fakes.
pub struct Doors {
    /// The XDP program's VIP map.
    pub steering: Box<dyn VipSteering>,
    /// The host's addresses and neighbour table.
    pub host: Box<dyn HostFacts>,
    /// The time.
    pub clock: Box<dyn Clock>,
    /// The Layer 7 engine (HAProxy) for the SNAT services.
    pub layer7: Box<dyn crate::l7::Layer7>,
}

impl std::fmt::Debug for Doors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doors").finish_non_exhaustive()
    }
}

impl Control {
    /// Control over the balancer's `config` (read from `config_path`), with the MACs known so
    /// far. Its first snapshot (generation 1) is [`Control::snapshot`]; the workers that use
    /// it are attached with [`Control::attach_workers`].
    pub fn new(
        config: Config,
        config_path: PathBuf,
        own_mac: [u8; 6],
        macs: HashMap<IpAddr, [u8; 6]>,
        doors: Doors,
    ) -> Control {
        let Doors {
            steering,
            host,
            clock,
            layer7,
        } = doors;
        let mut ids = ServiceIds::default();
        let probe_sources = probe_sources(host.as_ref(), &config.engine.interface);
        let mut steering = steering;
        if let Err(error) = steering.set_probe_sources(&probe_sources) {
            tracing::error!(%error, "DR check: cannot steer probe answers");
        }
        let mut snapshot = Snapshot::build(
            &config,
            &mut ids,
            own_mac,
            1,
            |ip| macs.get(&ip).copied(),
            |_, _| AdminState::Online,
        );
        decorate(&mut snapshot, &config, &macs, &probe_sources);
        let snapshot = Arc::new(snapshot);
        let answers_arp = config.ha.is_none();
        Control {
            health_targets: None,
            dr: drcheck::DrCheck::new(),
            probe_sources,
            answers_arp,
            ha: None,
            config_generation: 0,
            following: None,
            layer7,
            layer7_setup: crate::l7::setup_for(&config),
            layer7_running: false,
            held: BTreeSet::new(),
            config,
            host_addresses: Vec::new(),
            config_path,
            own_mac,
            snapshot,
            ids,
            operator: OperatorStates::default(),
            macs,
            macs_changed: 0,
            built_from: None,
            steering,
            host,
            clock,
            workers: Vec::new(),
            apply_timeout: APPLY_TIMEOUT,
            health: Tracker::default(),
            full: hashbrown::HashSet::new(),
            asked_for_macs: None,
        }
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// The running configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Hands over the workers that run the current snapshot.
    pub fn attach_workers(&mut self, workers: Vec<WorkerLink>) {
        self.workers = workers;
    }

    /// The workers' command channels (to stop them, announce, ...).
    pub fn workers(&self) -> &[WorkerLink] {
        &self.workers
    }

    /// Starts steering every configured VIP (at start, once every worker runs).
    pub fn steer_all_vips(&mut self) -> Result<(), crate::io::steer::SteerError> {
        for vip in vip_set(&self.config) {
            self.steering.add_vip(vip, self.answers_arp)?;
        }
        Ok(())
    }

    /// Connects the HA node (its requests and its report).
    pub fn attach_ha(&mut self, link: HaLink) {
        self.ha = Some(link);
    }

    /// Makes this node answer ARP for the VIPs (the active node of a pair) or not; on
    /// becoming active, announces them at once with a gratuitous ARP round. Frames to the
    /// VIPs are forwarded either way.
    pub fn set_active(&mut self, active: bool) -> Result<(), crate::io::steer::SteerError> {
        self.answers_arp = active;
        if active {
            // The services are this node's now; its checks carry on from the states it had.
            self.following = None;
        }
        self.hold_snat_vips();
        for vip in vip_set(&self.config) {
            self.steering.add_vip(vip, active)?;
        }
        if active {
            self.announce_vips();
        }
        Ok(())
    }

    /// Whether this node answers ARP for the VIPs.
    pub fn answers_arp(&self) -> bool {
        self.answers_arp
    }

    /// One gratuitous ARP round for every VIP, sent by the first worker (every queue shares
    /// the interface).
    pub fn announce_vips(&self) {
        let vips: Vec<IpAddr> = vip_set(&self.config).into_iter().collect();
        if !vips.is_empty()
            && let Some(first) = self.workers.first()
        {
            let _ = first
                .commands
                .send(WorkerCommand::Announce(self.own_mac, vips));
        }
    }

    /// The configuration generation in force.
    pub fn generation(&self) -> u64 {
        self.snapshot.generation
    }

    /// Handles one request from a client with `role`.
    pub fn handle(&mut self, command: Command, role: Role) -> Response {
        let outcome = match role {
            Role::Operator => self.operator_may(&command),
            Role::Root => Ok(()),
        }
        .and_then(|()| match self.following {
            Some(active) if replica::changes_configuration(&command) => {
                Err(ControlError::Passive(active))
            }
            _ => Ok(()),
        })
        .and_then(|()| self.dispatch(command));
        match outcome {
            Ok(reply) => Response::ok(reply),
            Err(error) => Response::error(error.to_string()),
        }
    }

    /// Refuses what would let a control-group member run a command or write a file as root,
    /// or take over another host's address.
    fn operator_may(&self, command: &Command) -> Result<(), ControlError> {
        const EXTERNAL: &str = "external health checks run commands as root: only root may set \
             them (the control group may use tcp, http and none)";
        let denied = |reason: String| Err(ControlError::PermissionDenied(reason));
        match command {
            Command::AddVip { service } if has_external_check(service) => denied(EXTERNAL.into()),
            Command::AddVip { service } => self.operator_may_take(service.vip),
            Command::EditVip(ServiceEdit {
                changes: ServiceChanges { vip: Some(vip), .. },
                ..
            }) => self.operator_may_take(*vip),
            Command::AddRip { real_server, .. } if rs_has_external_check(real_server) => {
                denied(EXTERNAL.into())
            }
            Command::ConfigSave { path: Some(path) } if Path::new(path) != self.config_path => {
                denied(format!(
                    "only root may save the configuration elsewhere than {}, the file lbd \
                     started with",
                    self.config_path.display()
                ))
            }
            _ => Ok(()),
        }
    }

    /// A VIP an operator may add: not the address of another host on the segment (one in
    /// the neighbour table with another MAC), which lbd would then answer ARP for in its place.
    fn operator_may_take(&self, vip: IpAddr) -> Result<(), ControlError> {
        if self.config.services.iter().any(|s| s.has_vip(vip)) {
            return Ok(());
        }
        let neighbours = self.host.neighbours().map_err(|e| {
            ControlError::PermissionDenied(format!(
                "cannot read the neighbour table to check {vip}: {e}"
            ))
        })?;
        match neighbours.get(&vip) {
            Some(&mac) if mac != self.own_mac => Err(ControlError::PermissionDenied(format!(
                "{vip} is another host's address on this segment (it answered ARP from {}): only \
                 root may make it a VIP",
                host::format_mac(mac)
            ))),
            _ => Ok(()),
        }
    }

    fn dispatch(&mut self, command: Command) -> Outcome {
        match command {
            Command::Status => Ok(Reply::Status(self.status())),
            Command::Stats => Ok(Reply::Stats(Box::new(self.stats()))),
            Command::ConfigShow => Ok(Reply::Config {
                toml: self.config.to_toml_string(),
            }),
            Command::ConfigSave { path } => self.save(path.map(PathBuf::from)),
            Command::Reload => self.reload(),
            Command::HaStatus => Ok(Reply::Ha(Box::new(self.ha_report(&self.reports())?))),
            Command::HaTakeover => self.ha_request(HaRequest::Takeover),
            Command::HaRelease => self.ha_request(HaRequest::Release),
            Command::AddVip { service } => self.add_vip(service),
            Command::EditVip(ServiceEdit { label, changes }) => self.edit_vip(&label, changes),
            Command::DelVip(ServiceName { label }) => {
                let mut config = self.config.clone();
                let index = service_index(&config, &label)?;
                config.services.remove(index);
                let mut operator = self.operator.clone();
                operator.retain_servers_of(&config);
                let ids = self.ids.clone();
                self.apply(config, operator, ids, format!("service {label:?} removed"))
            }
            Command::AddRip {
                service,
                real_server,
            } => {
                let mut config = self.config.clone();
                let index = service_index(&config, &service)?;
                let label = real_server.label.clone();
                Arc::make_mut(&mut config.services[index])
                    .real_servers
                    .push(real_server);
                let (operator, ids) = (self.operator.clone(), self.ids.clone());
                self.apply(
                    config,
                    operator,
                    ids,
                    format!("real server {label:?} added to {service:?}"),
                )
            }
            Command::EditRip(RealServerEdit {
                service,
                label,
                changes,
            }) => self.edit_rip(&service, &label, changes),
            Command::DelRip(RealServerName { service, label }) => {
                let mut config = self.config.clone();
                let (s, r) = real_server_index(&config, &service, &label)?;
                Arc::make_mut(&mut config.services[s])
                    .real_servers
                    .remove(r);
                let mut operator = self.operator.clone();
                operator.retain_servers_of(&config);
                let ids = self.ids.clone();
                self.apply(
                    config,
                    operator,
                    ids,
                    format!("real server {label:?} removed from {service:?}"),
                )
            }
            Command::SetWeight(WeightChange {
                service,
                label,
                weight,
            }) => self.edit_rip(
                &service,
                &label,
                RealServerChanges {
                    weight: Some(weight),
                    ..RealServerChanges::default()
                },
            ),
            Command::Drain(RealServerName { service, label }) => {
                self.set_admin(&service, &label, AdminState::Drain, "drained")
            }
            Command::Halt(RealServerName { service, label }) => {
                self.set_admin(&service, &label, AdminState::Halt, "halted")
            }
            Command::Online(RealServerName { service, label }) => {
                self.set_admin(&service, &label, AdminState::Online, "online")
            }
        }
    }

    fn ha_link(&self) -> Result<&HaLink, ControlError> {
        self.ha.as_ref().ok_or(ControlError::NotInPair)
    }

    /// The node's report, with the workers' part in the state sync from `reports`.
    fn ha_report(
        &self,
        reports: &[(u32, Option<WorkerReport>)],
    ) -> Result<lbd_proto::HaReport, ControlError> {
        let link = self.ha_link()?;
        let mut report = link
            .report
            .lock()
            .map_err(|_| ControlError::NotInPair)?
            .clone();
        // The node's thread copies the generation for its heartbeats on its next round; the
        // report gives it as of now, as `status` shows the configuration.
        report.generation = self.config_generation;
        for (_, worker) in reports {
            if let Some(worker) = worker {
                let shared = &worker.shared;
                report.sync.entries_installed += shared.installed.installed;
                report.sync.entries_kept_out += shared.installed.kept_out;
                report.sync.overflow += shared.outbox.overflow;
            }
        }
        Ok(report)
    }

    fn ha_request(&self, request: HaRequest) -> Outcome {
        self.ha_link()?
            .requests
            .send(request)
            .map_err(|_| ControlError::NotInPair)?;
        let what = match request {
            HaRequest::Takeover => "takeover requested: this node becomes active",
            HaRequest::Release => "release requested: the peer takes over",
        };
        Ok(Reply::Done {
            message: what.to_owned(),
        })
    }

    fn add_vip(&mut self, service: Service) -> Outcome {
        let mut config = self.config.clone();
        let label = service.label.clone();
        config.services.push(Arc::new(service));
        let (operator, ids) = (self.operator.clone(), self.ids.clone());
        self.apply(config, operator, ids, format!("service {label:?} added"))
    }

    fn edit_vip(&mut self, label: &str, changes: ServiceChanges) -> Outcome {
        if changes == ServiceChanges::default() {
            return Err(ControlError::NothingToChange("edit-vip"));
        }
        let mut config = self.config.clone();
        let index = service_index(&config, label)?;
        let service = Arc::make_mut(&mut config.services[index]);
        let mut operator = self.operator.clone();
        let mut ids = self.ids.clone();
        if let Some(new_label) = changes.label {
            // Operator states and the service's identity follow it to its new name.
            operator.rename(
                |(s, _)| s == label,
                |(_, rs)| (new_label.clone(), rs.clone()),
            );
            ids.rename(label, &new_label);
            service.label = new_label;
        }
        if let Some(vip) = changes.vip {
            service.vip = vip;
        }
        if let Some(vip6) = changes.vip6 {
            service.vip6 = Some(vip6);
        }
        if let Some(prefix) = changes.persistence_prefix_v6 {
            service.persistence_prefix_v6 = prefix;
        }
        if let Some(ports) = changes.ports {
            service.ports = ports;
        }
        if let Some(protocol) = changes.protocol {
            service.protocol = protocol;
        }
        if let Some(persistence) = changes.persistence {
            service.persistence = persistence;
        }
        if let Some(timeout) = changes.persistence_timeout_s {
            service.persistence_timeout_s = timeout;
        }
        if let Some(size) = changes.table_size {
            service.table_size = size;
        }
        if let Some(mode) = changes.mode {
            service.mode = mode;
        }
        if let Some(protocol) = changes.layer7_protocol {
            service.layer7_protocol = Some(protocol);
        }
        self.apply(config, operator, ids, format!("service {label:?} changed"))
    }

    fn edit_rip(&mut self, service: &str, label: &str, changes: RealServerChanges) -> Outcome {
        if changes == RealServerChanges::default() {
            return Err(ControlError::NothingToChange("edit-rip"));
        }
        let mut config = self.config.clone();
        let (s, r) = real_server_index(&config, service, label)?;
        let rs = &mut Arc::make_mut(&mut config.services[s]).real_servers[r];
        let mut operator = self.operator.clone();
        if let Some(new_label) = changes.label {
            operator.rename(
                |(s, r)| s == service && r == label,
                |(s, _)| (s.clone(), new_label.clone()),
            );
            rs.label = new_label;
        }
        if let Some(ip) = changes.ip {
            rs.ip = ip;
        }
        if let Some(weight) = changes.weight {
            rs.weight = weight;
        }
        if let Some(min) = changes.min_connections {
            rs.min_connections = min;
        }
        if let Some(max) = changes.max_connections {
            rs.max_connections = max;
        }
        if let Some(mac) = changes.mac {
            rs.mac = Some(mac);
        }
        if let Some(port) = changes.port {
            rs.port = Some(port);
        }
        let message = match changes.weight {
            Some(weight) => format!("{service}/{label} weight {weight}"),
            None => format!("real server {label:?} of {service:?} changed"),
        };
        let ids = self.ids.clone();
        self.apply(config, operator, ids, message)
    }

    fn set_admin(&mut self, service: &str, label: &str, state: AdminState, what: &str) -> Outcome {
        real_server_index(&self.config, service, label)?;
        let mut operator = self.operator.clone();
        operator.set((service.to_owned(), label.to_owned()), state);
        let (config, ids) = (self.config.clone(), self.ids.clone());
        self.apply(config, operator, ids, format!("{service}/{label} {what}"))
    }

    fn reload(&mut self) -> Outcome {
        let config = Config::load(&self.config_path).map_err(|error| ControlError::Reload {
            path: self.config_path.clone(),
            error,
        })?;
        if let Some(field) = engine_difference(&self.config, &config) {
            return Err(ControlError::EngineKey(field));
        }
        // Operator states stay for the servers that are still there.
        let mut operator = self.operator.clone();
        operator.retain_servers_of(&config);
        let services = config.services.len();
        let ids = self.ids.clone();
        self.apply(
            config,
            operator,
            ids,
            format!(
                "reloaded {} ({services} service(s))",
                self.config_path.display()
            ),
        )
    }

    fn save(&self, path: Option<PathBuf>) -> Outcome {
        let path = path.unwrap_or_else(|| self.config_path.clone());
        if !path.is_absolute() {
            return Err(ControlError::RelativePath(path));
        }
        if let Err(source) = write_atomically(&path, self.config.to_toml_string().as_bytes()) {
            return Err(ControlError::Save { path, source });
        }
        Ok(Reply::Done {
            message: format!("config saved to {}", path.display()),
        })
    }

    /// Checks `config` and, if it is good, makes it (with `operator` and `ids`) the running
    /// state: steering map, snapshot and workers. On any refusal nothing has changed.
    fn apply(
        &mut self,
        config: Config,
        mut operator: OperatorStates,
        mut ids: ServiceIds,
        message: String,
    ) -> Outcome {
        // The services the change did not touch were checked with the running config.
        config.validate_after(Some(&self.config))?;
        let local = self.host.local_addresses().map_err(|e| {
            ControlError::HostAddress(format!(
                "cannot read this host's addresses to check the change: {e}"
            ))
        })?;
        // The services the change did not touch need no second look while the host's
        // addresses are the ones they were checked against.
        let checked = (local == self.host_addresses).then_some(&self.config);
        check_host_addresses_after(&config, &local, checked).map_err(ControlError::HostAddress)?;
        self.check_snat_host(&config)?;
        // HAProxy first: a change it refuses changes nothing.
        self.update_layer7(&config, &operator)?;
        self.ask_for_missing_macs(&config);
        let old_vips = vip_set(&self.config);
        let new_vips = vip_set(&config);
        let leaving: Vec<IpAddr> = old_vips.difference(&new_vips).copied().collect();
        let arriving: Vec<IpAddr> = new_vips.difference(&old_vips).copied().collect();
        let generation = self.snapshot.generation + 1;
        operator.note_weights(&self.config, &config);
        let built = self.build(&config, &operator, &mut ids, generation);
        let snapshot = self.built(built);

        // Leaving VIPs stop being steered before the workers forget them...
        let answer_arp = self.answers_arp;
        update_vips(&mut *self.steering, &leaving, &[], answer_arp)
            .map_err(ControlError::Steering)?;
        let lagging = self.publish(Arc::clone(&snapshot));
        // ...and new ones are steered once the workers know them.
        if let Err(error) = update_vips(&mut *self.steering, &[], &arriving, answer_arp) {
            // Undone: the workers go back to the running configuration, the leaving VIPs
            // are steered again.
            let mut running_ids = self.ids.clone();
            let built = self.build(
                &self.config,
                &self.operator,
                &mut running_ids,
                generation + 1,
            );
            let restored = self.built(built);
            let restore_lagging = self.publish(Arc::clone(&restored));
            self.snapshot = restored;
            let (running, states) = (self.config.clone(), self.operator.clone());
            if let Err(error) = self.update_layer7(&running, &states) {
                tracing::error!(%error, "HAProxy could not be brought back to the running configuration");
            }
            let mut also = String::new();
            if let Err(again) = update_vips(&mut *self.steering, &[], &leaving, answer_arp) {
                also += &format!(", but {again}: those VIPs get no traffic until lbd restarts");
            }
            if !restore_lagging.is_empty() {
                also += &format!(
                    "; the worker(s) of queue(s) {restore_lagging:?} have not taken the undo yet"
                );
            }
            return Err(ControlError::Undone {
                error,
                generation: self.snapshot.generation,
                also,
            });
        }
        if !arriving.is_empty()
            && answer_arp
            && let Some(first) = self.workers.first()
        {
            let _ = first
                .commands
                .send(WorkerCommand::Announce(self.own_mac, arriving));
        }
        self.config = config;
        self.health_targets = None;
        self.host_addresses = local;
        self.operator = operator;
        self.ids = ids;
        self.snapshot = snapshot;
        // Forget the health of servers no longer checked (borrowed look-ups: no copy of every
        // server's name per change).
        if !self.health.is_empty() {
            let checked: hashbrown::HashMap<&str, &lbd_config::Service> = self
                .config
                .services
                .iter()
                .filter(|service| layer7::is_dr(service))
                .map(|service| (service.label.as_str(), &**service))
                .collect();
            self.health.retain(|(service, rs)| {
                checked
                    .get(service.as_str())
                    .is_some_and(|service| service.real_servers.iter().any(|r| &r.label == rs))
            });
        }
        if !lagging.is_empty() {
            tracing::error!(
                generation = self.snapshot.generation,
                ?lagging,
                "{message}: not every worker took it in time"
            );
            return Err(ControlError::Lagging {
                message,
                generation: self.snapshot.generation,
                queues: lagging,
                timeout_ms: self.apply_timeout.as_millis(),
            });
        }
        self.config_generation += 1;
        self.hold_snat_vips();
        tracing::info!(generation = self.snapshot.generation, "{message}");
        Ok(Reply::Done { message })
    }

    /// Sends `snapshot` to every worker and waits until each uses it; returns the queues of
    /// the workers that did not in time.
    fn publish(&self, snapshot: Arc<Snapshot>) -> Vec<u32> {
        publish(&self.workers, snapshot, self.apply_timeout)
    }

    /// Publishes the running config again as a new generation (a health, MAC or limit change).
    fn republish(&mut self) {
        let generation = self.snapshot.generation + 1;
        let mut ids = self.ids.clone();
        let built = self.build(&self.config, &self.operator, &mut ids, generation);
        let snapshot = self.built(built);
        self.publish(Arc::clone(&snapshot));
        self.snapshot = snapshot;
    }

    fn build(
        &self,
        config: &Config,
        operator: &OperatorStates,
        ids: &mut ServiceIds,
        generation: u64,
    ) -> (Snapshot, StateSources) {
        let sources = StateSources {
            ups_changed: self.health.ups_changed(),
            macs_changed: self.macs_changed,
            full: self.full.clone(),
            operator: operator.clone(),
        };
        let same_states = self.built_from.as_ref().is_some_and(|(built, from)| {
            std::ptr::eq(built.as_ptr(), Arc::as_ptr(&self.snapshot)) && *from == sources
        });
        let after = After {
            snapshot: &self.snapshot,
            same_states,
        };
        let mut snapshot = Snapshot::build_after(
            Some(after),
            config,
            ids,
            self.own_mac,
            generation,
            |ip| self.macs.get(&ip).copied(),
            |service, rs| {
                let name = ServerName(service, rs);
                ServerState {
                    healthy: self.health.is_up(&name),
                    full: self.full.contains(&name),
                    ..operator.state_of(&name)
                }
            },
        );
        decorate(&mut snapshot, config, &self.macs, &self.probe_sources);
        (snapshot, sources)
    }

    /// Takes `built` (from [`Control::build`]) as the last snapshot built.
    fn built(&mut self, (snapshot, sources): (Snapshot, StateSources)) -> Arc<Snapshot> {
        let snapshot = Arc::new(snapshot);
        self.built_from = Some((Arc::downgrade(&snapshot), sources));
        snapshot
    }

    /// One round of the DR check (when this node answers for the VIPs): what the workers saw
    /// of the last round is judged and logged, and the next round's questions and probes go
    /// out through the first worker. Also follows this host's own addresses, which the probes
    /// come from.
    pub fn dr_round(&mut self) {
        let sources = probe_sources(self.host.as_ref(), &self.config.engine.interface);
        if sources != self.probe_sources {
            if let Err(error) = self.steering.set_probe_sources(&sources) {
                tracing::error!(%error, "DR check: cannot steer probe answers");
            }
            self.probe_sources = sources;
            self.republish();
        }
        if !self.answers_arp {
            return;
        }
        let reports = self.reports();
        let seen = reports.iter().filter_map(|(_, report)| report.as_ref());
        let claims: Vec<_> = seen
            .clone()
            .flat_map(|r| r.claims.iter().copied())
            .collect();
        let answers: Vec<_> = seen.flat_map(|r| r.probe_answers.iter().copied()).collect();
        for (warning, text) in self.dr.evaluate(&self.snapshot, &claims, &answers) {
            if warning {
                tracing::warn!("{text}");
            } else {
                tracing::info!("{text}");
            }
        }
        let (questions, probes) = self
            .dr
            .plan(&self.config, &self.snapshot, &self.probe_sources);
        if let Some(first) = self.workers.first()
            && !(questions.is_empty() && probes.is_empty())
        {
            let _ = first.commands.send(WorkerCommand::Probe {
                mac: self.own_mac,
                questions,
                probes,
            });
        }
    }

    /// What the health checker checks: every real server with its (own or service's) check.
    /// (HAProxy checks the SNAT services' servers itself.)
    pub fn health_targets(&mut self) -> Arc<[Target]> {
        let config = &self.config;
        Arc::clone(
            self.health_targets
                .get_or_insert_with(|| health_targets_of(config)),
        )
    }

    /// Whether `target` is one of [`Control::health_targets`]: the same server, checked the
    /// same way. Looks up its service and server, not every target: a result arrives for
    /// every check, and building every target for each was O(servers) per result.
    fn is_health_target(&self, target: &Target) -> bool {
        self.service_labelled(&target.service)
            .filter(|service| layer7::is_dr(service))
            .and_then(|service| {
                let rs = service
                    .real_servers
                    .iter()
                    .find(|rs| rs.label == target.label)?;
                Some(health_target(service, rs))
            })
            .is_some_and(|current| current == *target)
    }

    /// The running config's service labelled `label`: through the service ids and the
    /// snapshot's index of them, else (a label the snapshot does not know) a walk of the list.
    fn service_labelled(&self, label: &str) -> Option<&Service> {
        let indexed = self
            .ids
            .get(label)
            .and_then(|id| self.snapshot.by_id.get(&id))
            .and_then(|&index| self.config.services.get(usize::from(index)))
            .filter(|service| service.label == label);
        indexed
            .or_else(|| {
                let index = service_index(&self.config, label).ok()?;
                self.config.services.get(index)
            })
            .map(|service| &**service)
    }

    /// Records a check's result; a server going down or up is logged and published.
    pub fn record_health(&mut self, target: &Target, result: CheckResult) {
        // A passive node uses the active one's results; its own take over with it.
        if self.following.is_some() {
            return;
        }
        // A result for a server that has since been removed or changed is stale.
        if !self.is_health_target(target) {
            return;
        }
        let detail = result.detail.clone();
        let Some(up) = self
            .health
            .record(target.key(), &target.check, result, self.clock.wall())
        else {
            return;
        };
        if up {
            tracing::info!(service = %target.service, real_server = %target.label, ip = %target.ip, %detail, "real server up");
        } else {
            tracing::warn!(service = %target.service, real_server = %target.label, ip = %target.ip, %detail, "real server down");
        }
        self.republish();
    }

    /// Asks the kernel for the MACs of `config`'s real servers that lbd does not know (those a
    /// change adds, and again those still missing), without waiting: they take traffic once
    /// [`Control::refresh_neighbours`] learns them.
    fn ask_for_missing_macs(&mut self, config: &Config) {
        let missing: Vec<IpAddr> = addresses_to_resolve(config)
            .into_iter()
            .filter(|ip| !self.macs.contains_key(ip))
            .collect();
        for &ip in &missing {
            if let Err(error) = self.host.trigger_resolution(ip) {
                tracing::debug!(real_server = %ip, %error, "resolution trigger failed");
            }
        }
        if !missing.is_empty() {
            self.asked_for_macs = Some(self.clock.now());
        }
    }

    /// Whether a recent change asked for MACs not learned yet: the caller then refreshes
    /// the neighbours often, so that a new server takes traffic within a fraction of a second.
    pub fn awaiting_macs(&self) -> bool {
        let now = self.clock.now();
        self.asked_for_macs
            .is_some_and(|asked| now.saturating_duration_since(asked) < FAST_RESOLUTION)
            && addresses_to_resolve(&self.config)
                .iter()
                .any(|ip| !self.macs.contains_key(ip))
    }

    /// Re-reads the neighbour table and publishes a new snapshot when a MAC was learned or
    /// changed; with `ask_again`, asks the kernel to resolve the ones still missing.
    pub fn refresh_neighbours(&mut self, ask_again: bool) {
        let table = match self.host.neighbours() {
            Ok(table) => table,
            Err(error) => {
                tracing::warn!(%error, "cannot read the neighbour table");
                return;
            }
        };
        let mut changed = false;
        for ip in addresses_to_resolve(&self.config) {
            match table.get(&ip) {
                Some(&mac) => {
                    let before = self.macs.insert(ip, mac);
                    if before != Some(mac) {
                        changed = true;
                        self.macs_changed += 1;
                        tracing::info!(real_server = %ip, mac = %host::format_mac(mac), "MAC learned");
                    }
                }
                // A known MAC is kept: the entry may only have aged out. Ask again either way.
                None if ask_again => {
                    if let Err(error) = self.host.trigger_resolution(ip) {
                        tracing::debug!(real_server = %ip, %error, "resolution trigger failed");
                    }
                }
                None => {}
            }
        }
        if changed {
            self.republish();
        }
    }

    /// Applies the connection limits: a server with `max_connections` set stops taking new
    /// connections when its tracked connections reach it and takes them again below
    /// `min_connections` (or, unset, 3/4 of the maximum), as IPVS's -x/-y do. Counts come
    /// from the workers' connection census ([`crate::packet::flows::ConnectionCensus`]), so
    /// the limit holds within one refresh of the caller.
    pub fn enforce_limits(&mut self) {
        // A passive node uses the active one's limits.
        if self.following.is_some() {
            return;
        }
        let limited: Vec<(usize, usize)> = self
            .config
            .services
            .iter()
            .enumerate()
            .flat_map(|(s, service)| {
                service
                    .real_servers
                    .iter()
                    .enumerate()
                    // HAProxy holds a SNAT server to its maxconn itself.
                    .filter(|_| layer7::is_dr(service))
                    .filter(|(_, rs)| rs.max_connections > 0)
                    .map(move |(r, _)| (s, r))
            })
            .collect();
        if limited.is_empty() && self.full.is_empty() {
            return;
        }
        let reports = self.reports();
        let generation = self.snapshot.generation;
        let mut full = hashbrown::HashSet::new();
        for (s, r) in limited {
            let conns: u64 = reports
                .iter()
                .filter_map(|(_, report)| report.as_ref())
                .filter(|report| report.generation == generation)
                .filter_map(|report| report.connections.get(s)?.get(r))
                .sum();
            let service = &self.config.services[s];
            let rs = &service.real_servers[r];
            let key = (service.label.clone(), rs.label.clone());
            let max = u64::from(rs.max_connections);
            // Below the lower threshold: `min_connections`, or else 3/4 of the maximum (as
            // IPVS compares it: conns * 4 < max * 3, no rounding).
            let below_lower = if rs.min_connections > 0 {
                conns < u64::from(rs.min_connections)
            } else {
                conns * 4 < max * 3
            };
            let was_full = self.full.contains(&key);
            if (was_full && !below_lower) || (!was_full && conns >= max) {
                if !was_full {
                    tracing::info!(service = %key.0, real_server = %key.1, conns, max, "connection limit reached");
                }
                full.insert(key);
            } else if was_full {
                tracing::info!(service = %key.0, real_server = %key.1, conns, "below the lower threshold again");
            }
        }
        if full != self.full {
            self.full = full;
            self.republish();
        }
    }

    fn reports(&self) -> Vec<(u32, Option<WorkerReport>)> {
        let mut pending = Vec::with_capacity(self.workers.len());
        for worker in &self.workers {
            let (tx, rx) = bounded(1);
            let sent = worker.commands.send(WorkerCommand::Report(tx)).is_ok();
            pending.push((worker.queue, sent.then_some(rx)));
        }
        let deadline = Instant::now() + REPORT_TIMEOUT;
        pending
            .into_iter()
            .map(|(queue, rx)| {
                let report = rx.and_then(|rx| {
                    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                        .ok()
                });
                (queue, report)
            })
            .collect()
    }

    /// The system overview.
    pub fn status(&self) -> StatusReport {
        let reports = self.reports();
        let snapshot = &self.snapshot;
        let layer7 = self.layer7_stats();
        let services = snapshot
            .services
            .iter()
            .zip(&self.config.services)
            .enumerate()
            .map(|(s, (entry, configured))| {
                if !layer7::is_dr(configured) {
                    return self.snat_status(s, configured, &layer7);
                }
                let conns_of = |r: usize| -> u64 {
                    reports
                        .iter()
                        .filter_map(|(_, report)| report.as_ref())
                        .filter(|report| report.generation == snapshot.generation)
                        .filter_map(|report| report.connections.get(s)?.get(r))
                        .sum()
                };
                let real_servers: Vec<RealServerStatus> = entry
                    .real_servers
                    .iter()
                    .enumerate()
                    .map(|(r, rs)| RealServerStatus {
                        label: rs.label.clone(),
                        ip: rs.ip,
                        port: None,
                        weight: rs.weight,
                        conns: conns_of(r),
                        state: rs.state_name().to_owned(),
                        mac: rs.mac.map(host::format_mac),
                        check: self
                            .health
                            .get(&ServerName(&entry.label, &rs.label))
                            .last
                            .map(|(at, result)| describe_check(at, &result)),
                        dr_check: self
                            .dr
                            .verdict(&entry.label, &rs.label)
                            .map(|verdict| verdict.describe().to_owned()),
                        health: Some(self.health.get(&ServerName(&entry.label, &rs.label)).counts),
                    })
                    .collect();
                ServiceStatus {
                    label: entry.label.to_string(),
                    vip: entry.vip,
                    vip6: entry.vip6,
                    ports: configured.ports.to_string(),
                    protocol: configured.protocol.to_string(),
                    method: "Layer 4".to_owned(),
                    mode: "DR".to_owned(),
                    conns: real_servers.iter().map(|rs| rs.conns).sum(),
                    fallback: entry
                        .fallback
                        .zip(configured.fallback)
                        .map(|((_, mac), ip)| {
                            let use_ = if entry.all_unavailable() {
                                "in use"
                            } else {
                                "standby"
                            };
                            match mac {
                                Some(_) => format!("{ip} ({use_})"),
                                None => format!("{ip} ({use_}, unresolved)"),
                            }
                        }),
                    real_servers,
                }
            })
            .collect();
        // As the workers see them now, not as of the last round.
        let claims: Vec<_> = reports
            .iter()
            .filter_map(|(_, report)| report.as_ref())
            .flat_map(|report| report.claims.iter().copied())
            .collect();
        let vip_claims = drcheck::sum_claims(&claims)
            .iter()
            .map(|claim| lbd_proto::VipClaim {
                vip: claim.vip,
                mac: host::format_mac(claim.mac),
                kind: claim.kind.name().to_owned(),
                real_server: drcheck::owner(snapshot, claim.mac)
                    .map(|(service, rs)| format!("{rs} in {service}")),
                frames: claim.frames,
            })
            .collect();
        StatusReport {
            generation: snapshot.generation,
            ha: self.ha_report(&reports).ok().map(Box::new),
            services,
            vip_claims,
        }
    }

    /// Counters per worker and in total.
    pub fn stats(&self) -> StatsReport {
        let mut report = StatsReport::default();
        let mut total = crate::packet::counters::Counters::default();
        for (queue, worker) in self.reports() {
            let Some(worker) = worker else {
                continue;
            };
            let mut stats = self.worker_stats(&worker.counters);
            stats.queue = Some(queue);
            stats.flows = worker.flows as u64;
            stats.persistent_clients = worker.persistent_clients as u64;
            stats.flow_evictions = worker.flow_evictions;
            stats.table_full = [
                ("flows", worker.table_full.flows),
                ("persistence", worker.table_full.persistence),
                ("fragments", worker.table_full.fragments),
            ]
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .map(|(table, count)| (table.to_owned(), count))
            .collect();
            stats.socket = worker.socket;
            total.merge(&worker.counters);
            report.workers.push(stats);
        }
        let mut sum = self.worker_stats(&total);
        for worker in &report.workers {
            sum.flows += worker.flows;
            sum.persistent_clients += worker.persistent_clients;
            sum.flow_evictions += worker.flow_evictions;
            for (table, count) in &worker.table_full {
                *sum.table_full.entry(table.clone()).or_default() += count;
            }
            if let Some(socket) = &worker.socket {
                sum.socket.get_or_insert_default().add(socket);
            }
        }
        report.total = sum;
        report.layer7 = self.layer7_counters();
        report
    }

    fn worker_stats(&self, counters: &crate::packet::counters::Counters) -> WorkerStats {
        let services = self
            .snapshot
            .services
            .iter()
            .enumerate()
            .map(|(s, entry)| {
                let traffic = counters.services.get(s);
                ServiceStats {
                    label: entry.label.to_string(),
                    packets: traffic.map_or(0, |t| t.total.packets),
                    bytes: traffic.map_or(0, |t| t.total.bytes),
                    real_servers: entry
                        .real_servers
                        .iter()
                        .enumerate()
                        .map(|(r, rs)| {
                            let t = traffic.and_then(|t| t.real_servers.get(r));
                            RealServerStats {
                                label: rs.label.clone(),
                                packets: t.map_or(0, |t| t.packets),
                                bytes: t.map_or(0, |t| t.bytes),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        WorkerStats {
            queue: None,
            rx_frames: counters.rx_frames,
            forwarded_packets: counters.forwarded.packets,
            forwarded_bytes: counters.forwarded.bytes,
            arp_replies: counters.arp_replies,
            icmp_echo_replies: counters.icmp_echo_replies,
            gratuitous_arps: counters.gratuitous_arps,
            nd_replies: counters.nd_replies,
            unsolicited_nas: counters.unsolicited_nas,
            icmp_errors: counters.icmp_errors,
            vip_defences: counters.vip_defences,
            dr_probes: counters.dr_probes,
            probe_resets: counters.probe_resets,
            fallback_packets: counters.fallback,
            flows: 0,
            persistent_clients: 0,
            table_full: BTreeMap::new(),
            flow_evictions: 0,
            socket: None,
            drops: DropReason::ALL
                .iter()
                .filter(|r| counters.drops_for(**r) > 0)
                .map(|r| (r.name().to_owned(), counters.drops_for(*r)))
                .collect(),
            services,
        }
    }
}

/// Sends `snapshot` to every worker and waits (at most `timeout`) until each reports using
/// it. Returns the queues of the workers that did not in time.
pub fn publish(workers: &[WorkerLink], snapshot: Arc<Snapshot>, timeout: Duration) -> Vec<u32> {
    let generation = snapshot.generation;
    for worker in workers {
        let _ = worker
            .commands
            .send(WorkerCommand::Snapshot(Arc::clone(&snapshot)));
    }
    let deadline = Instant::now() + timeout;
    let mut lagging = Vec::new();
    for worker in workers {
        while worker.applied.load(Ordering::Acquire) < generation {
            if Instant::now() >= deadline {
                tracing::warn!(
                    queue = worker.queue,
                    generation,
                    "worker has not taken the new configuration yet"
                );
                lagging.push(worker.queue);
                break;
            }
            std::hint::spin_loop();
            std::thread::yield_now();
        }
    }
    lagging
}

/// Removes `leaving` from the steering map, then adds `arriving`; on a failure, puts back
/// what it had done, so that the map is as it was, and names the VIP that failed.
fn update_vips(
    steering: &mut dyn VipSteering,
    leaving: &[IpAddr],
    arriving: &[IpAddr],
    answer_arp: bool,
) -> Result<(), String> {
    for (done, &vip) in leaving.iter().enumerate() {
        if let Err(error) = steering.remove_vip(vip) {
            for &back in &leaving[..done] {
                let _ = steering.add_vip(back, answer_arp);
            }
            return Err(format!(
                "removing VIP {vip} from the steering map failed: {error}"
            ));
        }
    }
    for (done, &vip) in arriving.iter().enumerate() {
        if let Err(error) = steering.add_vip(vip, answer_arp) {
            for &back in &arriving[..done] {
                let _ = steering.remove_vip(back);
            }
            for &back in leaving {
                let _ = steering.add_vip(back, answer_arp);
            }
            return Err(format!(
                "adding VIP {vip} to the steering map failed: {error}"
            ));
        }
    }
    Ok(())
}

/// Whether a service (or one of its real servers) has an external check.
fn has_external_check(service: &Service) -> bool {
    service.health_check.kind == HealthKind::External
        || service.real_servers.iter().any(rs_has_external_check)
}

fn rs_has_external_check(real_server: &RealServer) -> bool {
    real_server
        .health_check
        .as_ref()
        .is_some_and(|check| check.kind == HealthKind::External)
}

/// Refuses a VIP, real server or fallback that is one of the host's own addresses (`local`):
/// the balancer would take the host's own traffic for it (its health-check replies among
/// them) or forward frames to itself.
pub fn check_host_addresses(config: &Config, local: &[(String, IpAddr)]) -> Result<(), String> {
    check_host_addresses_after(config, local, None)
}

/// [`check_host_addresses`] for a config made from `checked`, a config checked against the
/// same addresses: the services it still shares with `checked` (the same `Arc`) are skipped.
fn check_host_addresses_after(
    config: &Config,
    local: &[(String, IpAddr)],
    checked: Option<&Config>,
) -> Result<(), String> {
    let unchanged: hashbrown::HashSet<*const Service> = checked
        .map(|checked| checked.services.iter().map(Arc::as_ptr).collect())
        .unwrap_or_default();
    // The addresses lbd put on the interface itself (SNAT VIPs) are not the host's own.
    let owner = |ip: IpAddr| {
        local
            .iter()
            .find(|(name, a)| *a == ip && !name.ends_with(host::LABEL_SUFFIX))
            .map(|(name, _)| name)
    };
    for (i, service) in config.services.iter().enumerate() {
        if unchanged.contains(&Arc::as_ptr(service)) {
            continue;
        }
        let path = || format!("service[{i}] {:?}", service.label);
        for (field, vip) in [
            ("vip", Some(service.vip)),
            ("vip6", service.vip6.map(IpAddr::V6)),
        ] {
            if let Some(vip) = vip
                && let Some(interface) = owner(vip)
            {
                return Err(format!(
                    "{}.{field}: {vip} is an address of this host ({interface}); a VIP must \
                     be an address of its own",
                    path()
                ));
            }
        }
        if let Some(fallback) = service.fallback
            && let Some(interface) = owner(fallback)
        {
            return Err(format!(
                "{}.fallback: {fallback} is an address of this host ({interface}); the \
                 fallback must be another machine",
                path()
            ));
        }
        for (j, rs) in service.real_servers.iter().enumerate() {
            if let Some(interface) = owner(rs.ip) {
                return Err(format!(
                    "{}.real_server[{j}].ip: {} is an address of this host ({interface}); a \
                     real server must be another machine",
                    path(),
                    rs.ip
                ));
            }
        }
    }
    Ok(())
}

/// Every address whose MAC lbd must learn: real servers without a pinned MAC, fallbacks, and
/// the HA peers (whose announcements of a VIP are no claim).
pub fn addresses_to_resolve(config: &Config) -> Vec<IpAddr> {
    let peers = config
        .ha
        .iter()
        .flat_map(|ha| ha.peer_address.0.iter().map(|&peer| IpAddr::V4(peer)));
    let mut ips: Vec<IpAddr> = config
        .services
        .iter()
        .flat_map(|s| {
            s.real_servers
                .iter()
                .filter(|rs| rs.mac.is_none())
                .map(|rs| rs.ip)
                .chain(s.fallback)
        })
        .chain(peers)
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// What the control side adds to a built snapshot: the HA peers' MACs, the probe sources.
fn decorate(
    snapshot: &mut Snapshot,
    config: &Config,
    macs: &HashMap<IpAddr, [u8; 6]>,
    probe_sources: &[IpAddr],
) {
    snapshot.peer_macs = config
        .ha
        .iter()
        .flat_map(|ha| ha.peer_address.0.iter())
        .filter_map(|&peer| macs.get(&IpAddr::V4(peer)).copied())
        .collect();
    for source in probe_sources {
        match source {
            IpAddr::V4(v4) => snapshot.probe_v4 = Some(u32::from(*v4)),
            IpAddr::V6(v6) => snapshot.probe_v6 = Some(u128::from(*v6)),
        }
    }
}

/// The addresses DR questions and probes come from: `interface`'s first IPv4 address and its
/// first global IPv6 one (not lbd's own SNAT VIPs).
fn probe_sources(host: &dyn HostFacts, interface: &str) -> Vec<IpAddr> {
    let addresses = host.local_addresses().unwrap_or_default();
    let on_interface = || {
        addresses
            .iter()
            .filter(|(name, _)| name == interface)
            .map(|(_, ip)| *ip)
    };
    let v4 = on_interface().find(IpAddr::is_ipv4);
    let v6 = on_interface().find(|ip| match ip {
        IpAddr::V6(v6) => !v6.is_unicast_link_local() && !v6.is_loopback(),
        IpAddr::V4(_) => false,
    });
    v4.into_iter().chain(v6).collect()
}

/// `ok (HTTP 200) at 21:04:05 UTC`: a check's result for `lbctl status`.
fn describe_check(at: SystemTime, result: &CheckResult) -> String {
    let seconds = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (h, m, s) = (seconds / 3600 % 24, seconds / 60 % 60, seconds % 60);
    let verdict = if result.ok { "ok" } else { "failed" };
    format!("{verdict} ({}) at {h:02}:{m:02}:{s:02} UTC", result.detail)
}

/// [`Control::health_targets`] of `config`.
fn health_targets_of(config: &Config) -> Arc<[Target]> {
    config
        .services
        .iter()
        .filter(|service| layer7::is_dr(service))
        .flat_map(|service| {
            service
                .real_servers
                .iter()
                .map(move |rs| health_target(service, rs))
        })
        .collect()
}

/// What the health checker checks of `rs`: its own check, else its service's.
fn health_target(service: &Service, rs: &RealServer) -> Target {
    let check = rs
        .health_check
        .clone()
        .unwrap_or_else(|| service.health_check.clone());
    Target {
        service: service.label.clone(),
        label: rs.label.clone(),
        vip: service.vip,
        ip: rs.ip,
        port: check.port.unwrap_or_else(|| service.ports.first()),
        check,
    }
}

fn service_index(config: &Config, label: &str) -> Result<usize, ControlError> {
    config
        .services
        .iter()
        .position(|s| s.label == label)
        .ok_or_else(|| ControlError::NoService(label.to_owned()))
}

fn real_server_index(
    config: &Config,
    service: &str,
    label: &str,
) -> Result<(usize, usize), ControlError> {
    let s = service_index(config, service)?;
    let r = config.services[s]
        .real_servers
        .iter()
        .position(|rs| rs.label == label)
        .ok_or_else(|| ControlError::NoRealServer {
            service: service.to_owned(),
            label: label.to_owned(),
        })?;
    Ok((s, r))
}

/// The VIPs lbd steers and answers ARP for itself: those of its DR services.
fn vip_set(config: &Config) -> BTreeSet<IpAddr> {
    config
        .services
        .iter()
        .filter(|s| layer7::is_dr(s))
        .flat_map(|s| s.vips())
        .collect()
}

/// The first engine key that differs, other than those a reload may change.
fn engine_difference(running: &Config, new: &Config) -> Option<&'static str> {
    let (a, b) = (&running.engine, &new.engine);
    [
        ("ha", running.ha != new.ha),
        ("interface", a.interface != b.interface),
        ("queues", a.queues != b.queues),
        ("cores", a.cores != b.cores),
        ("xdp_mode", a.xdp_mode != b.xdp_mode),
        ("polling", a.polling != b.polling),
        ("control_socket", a.control_socket != b.control_socket),
        ("control_group", a.control_group != b.control_group),
        ("hash_seed", a.hash_seed != b.hash_seed),
        ("frame_size", a.frame_size != b.frame_size),
        ("frame_count", a.frame_count != b.frame_count),
        ("ring_size", a.ring_size != b.ring_size),
        ("batch_size", a.batch_size != b.batch_size),
        ("tx_skb_budget", a.tx_skb_budget != b.tx_skb_budget),
        ("flow_table_size", a.flow_table_size != b.flow_table_size),
        (
            "persistence_table_size",
            a.persistence_table_size != b.persistence_table_size,
        ),
        (
            "dr_check_interval_ms",
            a.dr_check_interval_ms != b.dr_check_interval_ms,
        ),
        ("http_listen", a.http_listen != b.http_listen),
        ("http_actions", a.http_actions != b.http_actions),
        ("http_token_file", a.http_token_file != b.http_token_file),
        ("log_format", a.log_format != b.log_format),
    ]
    .into_iter()
    .find(|(_, differs)| *differs)
    .map(|(name, _)| name)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`: a
/// crash leaves the old file or the new one, never half of one. The temporary file has an
/// unpredictable name and is created exclusively, never through a symbolic link (one planted
/// in a shared directory cannot redirect the write); it gets the old file's mode and owner
/// (0600 for a new file). A `path` that exists and is not a regular file is refused.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let existing = match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_file() => Some(metadata),
        Ok(_) => {
            return Err(std::io::Error::other(
                "it exists and is not a regular file (lbd does not write through links)",
            ));
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(error),
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let mode = existing.as_ref().map_or(0o600, |m| m.mode() & 0o7777);
    let mut attempt = 0;
    let (temp, mut file) = loop {
        let temp = dir.join(format!(
            ".{}.tmp.{}.{:016x}",
            name.to_string_lossy(),
            std::process::id(),
            std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                attempt
            )
        ));
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp);
        match opened {
            Ok(file) => break (temp, file),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    };
    let result = (|| {
        if let Some(old) = &existing {
            // Only root may give a file away; as anyone else the new file stays ours.
            let _ = std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()));
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::steer::SteerError;
    use lbd_config::HealthCheck;
    use std::sync::Mutex;

    const CONFIG: &str = "[engine]\ninterface = \"eth0\"\nqueues = [0]\n\n\
        [[service]]\nlabel = \"Wowza GUI\"\nvip = \"198.18.0.100\"\nports = 8088\n\n\
        [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"198.18.0.11\"\n";
    const HOST_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));

    /// What the fake steering map saw: each update with the generation the worker used then.
    #[derive(Debug, Default)]
    struct Map {
        vips: BTreeSet<IpAddr>,
        events: Vec<(&'static str, IpAddr, u64)>,
        refuse: Option<IpAddr>,
    }

    struct FakeSteering {
        map: Arc<Mutex<Map>>,
        worker_generation: Arc<AtomicU64>,
    }

    impl VipSteering for FakeSteering {
        fn add_vip(&mut self, vip: IpAddr, _answer_arp: bool) -> Result<(), SteerError> {
            let mut map = self.map.lock().expect("map");
            if map.refuse == Some(vip) {
                return Err(SteerError::Load("no room in the map".into()));
            }
            let generation = self.worker_generation.load(Ordering::Acquire);
            map.events.push(("add", vip, generation));
            map.vips.insert(vip);
            Ok(())
        }

        fn set_probe_sources(&mut self, _: &[IpAddr]) -> Result<(), SteerError> {
            Ok(())
        }

        fn remove_vip(&mut self, vip: IpAddr) -> Result<(), SteerError> {
            let mut map = self.map.lock().expect("map");
            let generation = self.worker_generation.load(Ordering::Acquire);
            map.events.push(("remove", vip, generation));
            map.vips.remove(&vip);
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeHost {
        neighbours: Arc<Mutex<HashMap<IpAddr, [u8; 6]>>>,
        asked: Arc<Mutex<Vec<IpAddr>>>,
        /// The SNAT VIPs put on the interface.
        held: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
        /// Addresses the host gained since.
        gained: Arc<Mutex<Vec<(String, IpAddr)>>>,
    }

    /// What the fake HAProxy was asked: configurations applied (`None`: stopped) and runtime
    /// lines; `refuse` makes it refuse the next request with those words.
    #[derive(Debug, Default)]
    struct Haproxy {
        applied: Vec<Option<String>>,
        lines: Vec<String>,
        refuse: Option<String>,
    }

    struct FakeLayer7(Arc<Mutex<Haproxy>>);

    impl crate::l7::Layer7 for FakeLayer7 {
        fn apply(&mut self, config: Option<&str>) -> Result<(), String> {
            let mut haproxy = self.0.lock().expect("haproxy");
            if let Some(words) = haproxy.refuse.take() {
                return Err(words);
            }
            haproxy.applied.push(config.map(str::to_owned));
            Ok(())
        }

        fn change(&mut self, lines: &[String], _config: &str) -> Result<(), String> {
            let mut haproxy = self.0.lock().expect("haproxy");
            if let Some(words) = haproxy.refuse.take() {
                return Err(words);
            }
            haproxy.lines.extend_from_slice(lines);
            Ok(())
        }

        fn stats(&self) -> Vec<crate::l7::runtime::Stat> {
            Vec::new()
        }
    }

    impl HostFacts for FakeHost {
        fn local_addresses(&self) -> std::io::Result<Vec<(String, IpAddr)>> {
            let mut addresses = vec![
                ("lo".into(), Ipv4Addr::LOCALHOST.into()),
                ("eth0".into(), HOST_ADDRESS),
            ];
            addresses.extend(self.gained.lock().expect("gained").iter().cloned());
            Ok(addresses)
        }

        fn neighbours(&self) -> std::io::Result<HashMap<IpAddr, [u8; 6]>> {
            Ok(self.neighbours.lock().expect("neighbours").clone())
        }

        fn trigger_resolution(&self, ip: IpAddr) -> std::io::Result<()> {
            self.asked.lock().expect("asked").push(ip);
            Ok(())
        }

        fn local_networks(&self) -> std::io::Result<Vec<(String, Ipv4Addr, u8)>> {
            Ok(vec![
                ("lo".into(), Ipv4Addr::LOCALHOST, 8),
                ("eth0".into(), Ipv4Addr::new(198, 18, 0, 2), 16),
            ])
        }

        fn hold_vip(&self, ip: Ipv4Addr) -> std::io::Result<()> {
            self.held.lock().expect("held").insert(ip);
            Ok(())
        }

        fn release_vip(&self, ip: Ipv4Addr) -> std::io::Result<()> {
            self.held.lock().expect("held").remove(&ip);
            Ok(())
        }
    }

    /// A control over CONFIG with one fake worker; `working: false` makes a worker that never
    /// takes a snapshot.
    /// A clock that moves when the test says so.
    struct FakeClock(Arc<Mutex<Instant>>);

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            *self.0.lock().expect("clock")
        }

        fn wall(&self) -> SystemTime {
            SystemTime::UNIX_EPOCH
        }
    }

    struct Rig {
        control: Control,
        map: Arc<Mutex<Map>>,
        neighbours: Arc<Mutex<HashMap<IpAddr, [u8; 6]>>>,
        asked: Arc<Mutex<Vec<IpAddr>>>,
        /// The connections the fake worker reports, per service and real server.
        connections: Arc<Mutex<Vec<Vec<u64>>>>,
        clock: Arc<Mutex<Instant>>,
        dir: PathBuf,
        haproxy: Arc<Mutex<Haproxy>>,
        held: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
        gained: Arc<Mutex<Vec<(String, IpAddr)>>>,
    }

    impl Rig {
        fn advance(&self, by: Duration) {
            *self.clock.lock().expect("clock") += by;
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn rig(working: bool) -> Rig {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lbd-control-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("lbd.toml");
        std::fs::write(&path, CONFIG).expect("write config");
        let config = Config::from_toml_str(CONFIG).expect("valid");
        let applied = Arc::new(AtomicU64::new(1));
        let map = Arc::new(Mutex::new(Map::default()));
        let host = FakeHost::default();
        let (neighbours, asked) = (Arc::clone(&host.neighbours), Arc::clone(&host.asked));
        let (held, gained) = (Arc::clone(&host.held), Arc::clone(&host.gained));
        let haproxy = Arc::new(Mutex::new(Haproxy::default()));
        let clock = Arc::new(Mutex::new(Instant::now()));
        let mut control = Control::new(
            config,
            path,
            [2, 0, 0, 0, 0, 2],
            HashMap::from([(Ipv4Addr::new(198, 18, 0, 11).into(), [2, 0, 0, 0, 0, 0x11])]),
            Doors {
                steering: Box::new(FakeSteering {
                    map: Arc::clone(&map),
                    worker_generation: Arc::clone(&applied),
                }),
                host: Box::new(host),
                clock: Box::new(FakeClock(Arc::clone(&clock))),
                layer7: Box::new(FakeLayer7(Arc::clone(&haproxy))),
            },
        );
        control.apply_timeout = Duration::from_millis(200);
        let (commands, inbox) = crate::io::worker::worker_channel().expect("eventfd");
        let connections = Arc::new(Mutex::new(Vec::new()));
        if working {
            let (generation, connections) = (Arc::clone(&applied), Arc::clone(&connections));
            std::thread::spawn(move || {
                while let Some(command) = inbox.recv() {
                    match command {
                        WorkerCommand::Snapshot(snapshot) => {
                            generation.store(snapshot.generation, Ordering::Release);
                        }
                        WorkerCommand::Report(reply) => {
                            let _ = reply.send(WorkerReport {
                                generation: generation.load(Ordering::Acquire),
                                counters: crate::packet::counters::Counters::default(),
                                flows: 0,
                                persistent_clients: 0,
                                table_full: crate::io::worker::TableFull::default(),
                                flow_evictions: 0,
                                socket: None,
                                connections: connections.lock().expect("conns").clone(),
                                shared: crate::io::worker::SharedCounters::default(),
                                claims: Vec::new(),
                                probe_answers: Vec::new(),
                            });
                        }
                        WorkerCommand::Announce(..)
                        | WorkerCommand::Install(_)
                        | WorkerCommand::Probe { .. } => {}
                    }
                }
            });
        }
        control.attach_workers(vec![WorkerLink {
            queue: 0,
            commands,
            applied,
        }]);
        control.steer_all_vips().expect("steer");
        Rig {
            control,
            map,
            neighbours,
            asked,
            connections,
            clock,
            dir,
            haproxy,
            held,
            gained,
        }
    }

    /// Adds "Wowza Srv 2" (198.18.0.12), like the first server otherwise, to "Wowza GUI".
    fn add_wowza_srv_2(control: &mut Control) {
        let rs2 = RealServer {
            label: "Wowza Srv 2".into(),
            ip: Ipv4Addr::new(198, 18, 0, 12).into(),
            ..control.config().services[0].real_servers[0].clone()
        };
        done(control.handle(
            Command::AddRip {
                service: "Wowza GUI".into(),
                real_server: rs2,
            },
            Role::Root,
        ));
    }

    /// The health checker's targets are the running config's: a server added live is checked,
    /// a removed one no longer is.
    #[test]
    fn health_targets_follow_live_changes() {
        let mut rig = rig(true);
        let labels = |control: &mut Control| {
            let targets = control.health_targets();
            targets.iter().map(|t| t.label.clone()).collect::<Vec<_>>()
        };
        assert_eq!(labels(&mut rig.control), ["Wowza Srv 1"]);
        add_wowza_srv_2(&mut rig.control);
        assert_eq!(labels(&mut rig.control), ["Wowza Srv 1", "Wowza Srv 2"]);
        done(rig.control.handle(
            Command::DelRip(RealServerName {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 1".into(),
            }),
            Role::Root,
        ));
        assert_eq!(labels(&mut rig.control), ["Wowza Srv 2"]);
    }

    /// A result counts only for a server that is still checked, and checked that way: one for
    /// a removed server, another address or port, or a service of another name changes nothing.
    #[test]
    fn a_result_counts_only_for_a_current_health_target() {
        let mut rig = rig(true);
        let current = rig.control.health_targets()[0].clone();
        let record = |control: &mut Control, target: &Target, ok: bool, times: u32| {
            for _ in 0..times {
                let result = CheckResult {
                    ok,
                    detail: "checked".into(),
                    took: Duration::ZERO,
                };
                control.record_health(target, result);
            }
        };
        let state = |control: &Control| control.snapshot().services[0].real_servers[0].state_name();
        record(&mut rig.control, &current, false, current.check.fall);
        assert_eq!(state(&rig.control), "down");
        let stale = [
            Target {
                port: current.port + 1,
                ..current.clone()
            },
            Target {
                ip: Ipv4Addr::new(198, 18, 0, 99).into(),
                ..current.clone()
            },
            Target {
                label: "Wowza Srv 9".into(),
                ..current.clone()
            },
            Target {
                service: "Wowza Gone".into(),
                ..current.clone()
            },
        ];
        for target in &stale {
            record(&mut rig.control, target, true, current.check.rise * 2);
            assert_eq!(state(&rig.control), "down", "{target:?}");
        }
        record(&mut rig.control, &current, true, current.check.rise);
        assert_eq!(state(&rig.control), "up");
    }

    fn service(label: &str, vip: &str) -> Service {
        let text =
            format!("{CONFIG}\n[[service]]\nlabel = \"{label}\"\nvip = \"{vip}\"\nports = 1935\n");
        Arc::unwrap_or_clone(
            Config::from_toml_str(&text)
                .expect("valid")
                .services
                .remove(1),
        )
    }

    fn error_of(response: Response) -> String {
        match response.outcome {
            lbd_proto::Outcome::Error(message) => message,
            lbd_proto::Outcome::Ok(reply) => panic!("accepted: {reply:?}"),
        }
    }

    fn done(response: Response) {
        if let lbd_proto::Outcome::Error(message) = response.outcome {
            panic!("refused: {message}");
        }
    }

    #[test]
    fn a_borrowed_server_name_finds_its_key() {
        let mut states = OperatorStates::default();
        states.set(("web".into(), "a".into()), AdminState::Drain);
        assert_eq!(
            states.state_of(&ServerName("web", "a")).admin,
            AdminState::Drain
        );
        // Labels that would run together when concatenated stay apart.
        for other in [
            ServerName("web", "b"),
            ServerName("we", "ba"),
            ServerName("weba", ""),
        ] {
            assert_eq!(
                states.state_of(&other).admin,
                AdminState::Online,
                "{other:?}"
            );
        }
    }

    #[test]
    fn a_host_address_is_no_vip_and_no_real_server() {
        let mut rig = rig(true);
        let before = (
            rig.control.config().clone(),
            rig.control.snapshot().generation,
        );
        let refused = error_of(rig.control.handle(
            Command::AddVip {
                service: service("Own", "198.18.0.2"),
            },
            Role::Root,
        ));
        assert!(
            refused
                .contains("service[1] \"Own\".vip: 198.18.0.2 is an address of this host (eth0)")
                && refused.ends_with("nothing changed"),
            "{refused}"
        );
        let mut own_rs = rig.control.config().services[0].real_servers[0].clone();
        own_rs.label = "Self".into();
        own_rs.ip = HOST_ADDRESS;
        let refused = error_of(rig.control.handle(
            Command::AddRip {
                service: "Wowza GUI".into(),
                real_server: own_rs,
            },
            Role::Root,
        ));
        assert!(
            refused.contains("real_server[1].ip: 198.18.0.2 is an address of this host"),
            "{refused}"
        );
        assert_eq!(
            (
                rig.control.config().clone(),
                rig.control.snapshot().generation
            ),
            before
        );
        assert!(!rig.map.lock().expect("map").vips.contains(&HOST_ADDRESS));
    }

    #[test]
    fn a_change_looks_again_at_every_service_once_the_host_has_a_new_address() {
        let mut rig = rig(true);
        let other = service("Other", "198.18.0.101");
        done(
            rig.control
                .handle(Command::AddVip { service: other }, Role::Root),
        );
        // The host takes the first service's real server's address: a change to the other
        // service is refused for it.
        let taken = rig.control.config().services[0].real_servers[0].ip;
        rig.gained
            .lock()
            .expect("gained")
            .push(("eth1".into(), taken));
        let mut real_server = rig.control.config().services[0].real_servers[0].clone();
        real_server.ip = Ipv4Addr::new(198, 18, 0, 12).into();
        let add = Command::AddRip {
            service: "Other".into(),
            real_server,
        };
        let refused = error_of(rig.control.handle(add, Role::Root));
        assert!(
            refused.contains(&format!(
                "service[0] \"Wowza GUI\".real_server[0].ip: {taken} is an address of this host \
                 (eth1)"
            )),
            "{refused}"
        );
    }

    #[test]
    fn vips_leave_the_map_before_the_workers_forget_them_and_join_it_after() {
        let mut rig = rig(true);
        done(rig.control.handle(
            Command::AddVip {
                service: service("Streaming", "198.18.0.101"),
            },
            Role::Root,
        ));
        done(rig.control.handle(
            Command::DelVip(ServiceName {
                label: "Streaming".into(),
            }),
            Role::Root,
        ));
        let events = rig.map.lock().expect("map").events.clone();
        let vip: IpAddr = Ipv4Addr::new(198, 18, 0, 101).into();
        let of_vip: Vec<_> = events.iter().filter(|(_, v, _)| *v == vip).collect();
        // Added once the worker used generation 2 (which knows it); removed while the worker
        // still used generation 2, before generation 3 (which does not) reached it.
        assert_eq!(
            of_vip,
            [&("add", vip, 2), &("remove", vip, 2)],
            "{events:?}"
        );
        assert_eq!(rig.control.snapshot().generation, 3);
    }

    #[test]
    fn a_change_whose_steering_update_fails_is_undone() {
        let mut rig = rig(true);
        let before = rig.control.config().clone();
        rig.map.lock().expect("map").refuse = Some(Ipv4Addr::new(198, 18, 0, 101).into());
        // The change also moves "Wowza GUI" off its VIP: that VIP's removal is undone too.
        let mut config = before.clone();
        Arc::make_mut(&mut config.services[0]).vip = Ipv4Addr::new(198, 18, 0, 101).into();
        std::fs::write(&rig.control.config_path, config.to_toml_string()).expect("write");
        let refused = error_of(rig.control.handle(Command::Reload, Role::Root));
        assert!(
            refused.contains("adding VIP 198.18.0.101 to the steering map failed")
                && refused.contains("the change had reached the workers and is undone (generation 3), nothing changed"),
            "{refused}"
        );
        assert_eq!(rig.control.config(), &before);
        let map = rig.map.lock().expect("map");
        assert_eq!(
            map.vips,
            BTreeSet::from([Ipv4Addr::new(198, 18, 0, 100).into()]),
            "{:?}",
            map.events
        );
        // The workers run the old configuration again, under a newer generation.
        let snapshot = rig.control.snapshot();
        assert_eq!(snapshot.services[0].vip, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(snapshot.generation, 3);
    }

    #[test]
    fn a_change_a_worker_does_not_take_is_an_error_that_says_where_it_stands() {
        let mut rig = rig(false);
        let refused = error_of(rig.control.handle(
            Command::Drain(RealServerName {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 1".into(),
            }),
            Role::Root,
        ));
        assert!(
            refused.contains("Wowza GUI/Wowza Srv 1 drained (generation 2)")
                && refused.contains("queue(s) [0] did not take it within 200 ms"),
            "{refused}"
        );
        // It is the running state, as the message says: the worker takes it when it runs.
        assert_eq!(
            rig.control.snapshot().services[0].real_servers[0].state_name(),
            "drain"
        );
    }

    #[test]
    fn a_new_server_is_never_waited_for() {
        let mut rig = rig(true);
        // Nobody answers for it: the change is done at once, the server unresolved.
        add_wowza_srv_2(&mut rig.control);
        assert_eq!(
            *rig.asked.lock().expect("asked"),
            [Ipv4Addr::new(198, 18, 0, 12)]
        );
        assert_eq!(
            rig.control.snapshot().services[0].real_servers[1].state_name(),
            "unresolved"
        );
        assert!(rig.control.awaiting_macs());
        // The kernel learns it; the next refresh publishes it.
        rig.neighbours
            .lock()
            .expect("neighbours")
            .insert(Ipv4Addr::new(198, 18, 0, 12).into(), [2, 0, 0, 0, 0, 0x12]);
        rig.control.refresh_neighbours(false);
        assert_eq!(
            rig.control.snapshot().services[0].real_servers[1].state_name(),
            "up"
        );
        assert!(!rig.control.awaiting_macs());
    }

    #[test]
    fn a_server_drained_by_weight_zero_keeps_its_weight_for_unknown_connections() {
        let mut rig = rig(true);
        let set_weight = |weight| {
            Command::SetWeight(WeightChange {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 1".into(),
                weight,
            })
        };
        done(rig.control.handle(set_weight(40), Role::Root));
        done(rig.control.handle(set_weight(0), Role::Root));
        let rs = &rig.control.snapshot().services[0].real_servers[0];
        assert_eq!(
            (rs.weight, rs.known_weight, rs.state_name()),
            (0, 40, "drain")
        );
        // Renamed, it keeps it; back to a weight, it has that one.
        done(rig.control.handle(
            Command::EditRip(RealServerEdit {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 1".into(),
                changes: RealServerChanges {
                    label: Some("Renamed".into()),
                    ..RealServerChanges::default()
                },
            }),
            Role::Root,
        ));
        assert_eq!(
            rig.control.snapshot().services[0].real_servers[0].known_weight,
            40
        );
        done(rig.control.handle(
            Command::SetWeight(WeightChange {
                service: "Wowza GUI".into(),
                label: "Renamed".into(),
                weight: 70,
            }),
            Role::Root,
        ));
        assert_eq!(
            rig.control.snapshot().services[0].real_servers[0].known_weight,
            70
        );
    }

    #[test]
    fn an_operator_runs_no_command_and_writes_no_file_as_root() {
        let mut rig = rig(true);
        let external = HealthCheck {
            kind: HealthKind::External,
            command: Some("id > /tmp/owned".into()),
            ..HealthCheck::default()
        };
        let mut rs2 = rig.control.config().services[0].real_servers[0].clone();
        rs2.label = "Wowza Srv 2".into();
        rs2.ip = Ipv4Addr::new(198, 18, 0, 12).into();
        rs2.health_check = Some(external.clone());
        let add_rip = Command::AddRip {
            service: "Wowza GUI".into(),
            real_server: rs2,
        };
        let refused = error_of(rig.control.handle(add_rip.clone(), Role::Operator));
        assert!(
            refused.starts_with("permission denied: external health checks"),
            "{refused}"
        );
        let mut streaming = service("Streaming", "198.18.0.101");
        streaming.health_check = external;
        let refused = error_of(rig.control.handle(
            Command::AddVip {
                service: streaming.clone(),
            },
            Role::Operator,
        ));
        assert!(
            refused.starts_with("permission denied: external"),
            "{refused}"
        );
        let elsewhere = rig.dir.join("elsewhere.toml");
        let refused = error_of(rig.control.handle(
            Command::ConfigSave {
                path: Some(elsewhere.to_string_lossy().into_owned()),
            },
            Role::Operator,
        ));
        assert!(
            refused.contains("only root may save the configuration elsewhere"),
            "{refused}"
        );
        // Nor may an operator take over another host's address (the gateway, say).
        rig.neighbours
            .lock()
            .expect("neighbours")
            .insert(Ipv4Addr::new(198, 18, 0, 1).into(), [2, 0, 0, 0, 0, 1]);
        let hijack = error_of(rig.control.handle(
            Command::AddVip {
                service: service("Gateway", "198.18.0.1"),
            },
            Role::Operator,
        ));
        assert!(
            hijack.contains(
                "198.18.0.1 is another host's address on this segment (it answered ARP from \
                 02:00:00:00:00:01): only root may make it a VIP"
            ),
            "{hijack}"
        );
        assert!(!elsewhere.exists());
        // What an operator does is done: a tcp-checked server, a drain, saving the started file.
        let mut plain = service("Streaming", "198.18.0.101");
        plain.health_check = HealthCheck::default();
        done(
            rig.control
                .handle(Command::AddVip { service: plain }, Role::Operator),
        );
        done(rig.control.handle(
            Command::Drain(RealServerName {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 1".into(),
            }),
            Role::Operator,
        ));
        let started = rig.control.config_path.to_string_lossy().into_owned();
        done(rig.control.handle(
            Command::ConfigSave {
                path: Some(started),
            },
            Role::Operator,
        ));
        done(
            rig.control
                .handle(Command::ConfigSave { path: None }, Role::Operator),
        );
        // Root may do all of it.
        done(rig.control.handle(add_rip, Role::Root));
        done(rig.control.handle(
            Command::ConfigSave {
                path: Some(elsewhere.to_string_lossy().into_owned()),
            },
            Role::Root,
        ));
        assert!(elsewhere.exists());
        let relative = error_of(rig.control.handle(
            Command::ConfigSave {
                path: Some("saved.toml".into()),
            },
            Role::Root,
        ));
        assert!(relative.contains("is not an absolute path"), "{relative}");
    }

    #[test]
    fn a_server_at_its_limit_stays_full_until_below_the_lower_threshold() {
        let mut rig = rig(true);
        done(rig.control.handle(
            Command::EditRip(RealServerEdit {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 1".into(),
                changes: RealServerChanges {
                    max_connections: Some(10),
                    min_connections: Some(5),
                    ..RealServerChanges::default()
                },
            }),
            Role::Root,
        ));
        let mut state_at = |conns: u64| {
            *rig.connections.lock().expect("conns") = vec![vec![conns]];
            rig.control.enforce_limits();
            rig.control.snapshot().services[0].real_servers[0]
                .state_name()
                .to_owned()
        };
        // (IPVS -x/-y.) Up to the maximum, full at it; between the thresholds it stays full,
        // and takes clients again only below the lower one, until it reaches the maximum again.
        let steps = [
            (9, "up"),
            (10, "full"),
            (7, "full"),
            (5, "full"),
            (4, "up"),
            (9, "up"),
        ];
        for (conns, state) in steps {
            assert_eq!(state_at(conns), state, "{conns} connections");
        }
        assert_eq!(state_at(12), "full");
        // Without a lower threshold, 3/4 of the maximum is it.
        done(rig.control.handle(
            Command::EditRip(RealServerEdit {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 1".into(),
                changes: RealServerChanges {
                    min_connections: Some(0),
                    ..RealServerChanges::default()
                },
            }),
            Role::Root,
        ));
        let mut state_at = |conns: u64| {
            *rig.connections.lock().expect("conns") = vec![vec![conns]];
            rig.control.enforce_limits();
            rig.control.snapshot().services[0].real_servers[0]
                .state_name()
                .to_owned()
        };
        assert_eq!(state_at(8), "full", "8 is not below 7.5");
        assert_eq!(state_at(7), "up");
    }

    #[test]
    fn macs_are_learned_kept_when_the_kernel_forgets_them_and_asked_for_again() {
        let mut rig = rig(true);
        let rs2: IpAddr = Ipv4Addr::new(198, 18, 0, 12).into();
        let mut second = rig.control.config().services[0].real_servers[0].clone();
        second.label = "Wowza Srv 2".into();
        second.ip = rs2;
        done(rig.control.handle(
            Command::AddRip {
                service: "Wowza GUI".into(),
                real_server: second,
            },
            Role::Root,
        ));
        let state = |rig: &Rig| {
            let rs = &rig.control.snapshot().services[0].real_servers[1];
            (rs.state_name().to_owned(), rs.mac)
        };
        assert_eq!(state(&rig), ("unresolved".to_owned(), None));
        // Learned: the change's own refresh finds it in the neighbour table.
        let mac = [2, 0, 0, 0, 0, 0x12];
        rig.neighbours.lock().expect("neighbours").insert(rs2, mac);
        rig.control.refresh_neighbours(false);
        assert_eq!(state(&rig), ("up".to_owned(), Some(mac)));
        // The kernel's entry ages out (lbd's own frames bypass the stack): the MAC is kept,
        // and the kernel is asked to resolve it again.
        rig.neighbours.lock().expect("neighbours").clear();
        rig.asked.lock().expect("asked").clear();
        rig.control.refresh_neighbours(true);
        assert_eq!(state(&rig), ("up".to_owned(), Some(mac)));
        assert!(rig.asked.lock().expect("asked").contains(&rs2));
        // A new MAC for the address is taken at once.
        let moved = [2, 0, 0, 0, 0, 0x99];
        rig.neighbours
            .lock()
            .expect("neighbours")
            .insert(rs2, moved);
        rig.control.refresh_neighbours(false);
        assert_eq!(state(&rig), ("up".to_owned(), Some(moved)));
    }

    #[test]
    fn the_neighbour_table_is_read_often_only_for_a_while_after_a_change_asked() {
        let mut rig = rig(true);
        assert!(!rig.control.awaiting_macs(), "nothing asked for");
        let mut ghost = rig.control.config().services[0].real_servers[0].clone();
        ghost.label = "Ghost".into();
        ghost.ip = Ipv4Addr::new(198, 18, 0, 99).into();
        done(rig.control.handle(
            Command::AddRip {
                service: "Wowza GUI".into(),
                real_server: ghost,
            },
            Role::Root,
        ));
        assert!(rig.control.awaiting_macs());
        rig.advance(FAST_RESOLUTION - Duration::from_millis(1));
        assert!(rig.control.awaiting_macs());
        rig.advance(Duration::from_millis(1));
        assert!(
            !rig.control.awaiting_macs(),
            "after 5 s, the once-a-second refresh"
        );
    }

    #[test]
    fn every_refusal_leaves_everything_as_it_was() {
        let mut rig = rig(true);
        let snapshot = |rig: &Rig| {
            let s = rig.control.snapshot();
            (s.generation, format!("{:?}", s.services))
        };
        let before = (rig.control.config().clone(), snapshot(&rig));
        let rs = rig.control.config().services[0].real_servers[0].clone();
        let refused = [
            Command::Drain(RealServerName {
                service: "No Such".into(),
                label: "Wowza Srv 1".into(),
            }),
            Command::Halt(RealServerName {
                service: "Wowza GUI".into(),
                label: "No Such".into(),
            }),
            Command::AddRip {
                service: "Wowza GUI".into(),
                real_server: rs.clone(),
            },
            Command::AddVip {
                service: Service {
                    vip: Ipv4Addr::new(198, 18, 0, 101).into(),
                    ..(*rig.control.config().services[0]).clone()
                },
            },
            Command::EditVip(ServiceEdit {
                label: "Wowza GUI".into(),
                changes: ServiceChanges::default(),
            }),
            Command::EditVip(ServiceEdit {
                label: "Wowza GUI".into(),
                changes: ServiceChanges {
                    table_size: Some(1000),
                    ..ServiceChanges::default()
                },
            }),
            Command::DelRip(RealServerName {
                service: "Wowza GUI".into(),
                label: "No Such".into(),
            }),
            Command::ConfigSave {
                path: Some("relative.toml".into()),
            },
        ];
        for command in refused {
            let message = error_of(rig.control.handle(command.clone(), Role::Root));
            assert!(!message.is_empty(), "{command:?}");
            assert_eq!(
                (rig.control.config().clone(), snapshot(&rig)),
                before,
                "{command:?} changed something: {message}"
            );
        }
        assert!(
            rig.map.lock().expect("map").events.len() == 1,
            "only the start's VIP"
        );
    }

    /// An active node, a passive one, and the active node's address.
    fn pair() -> (Rig, Rig, Ipv4Addr) {
        let active = rig(true);
        let mut passive = rig(true);
        passive.control.set_active(false).expect("passive");
        (active, passive, Ipv4Addr::new(198, 18, 0, 3))
    }

    #[test]
    fn a_passive_node_adopts_the_active_ones_configuration_and_refuses_its_own_changes() {
        let (mut active, mut passive, active_address) = pair();
        // Changes on the active node: a second server, drained; the first found down.
        let mut second = active.control.config().services[0].real_servers[0].clone();
        second.label = "Wowza Srv 2".into();
        second.ip = Ipv4Addr::new(198, 18, 0, 12).into();
        second.mac = Some(lbd_config::MacAddr([2, 0, 0, 0, 0, 0x12]));
        done(active.control.handle(
            Command::AddRip {
                service: "Wowza GUI".into(),
                real_server: second,
            },
            Role::Root,
        ));
        done(active.control.handle(
            Command::Drain(RealServerName {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 2".into(),
            }),
            Role::Root,
        ));
        let mut replica = active.control.replica();
        replica.servers[0].healthy = false;
        assert_eq!(replica.config_generation, 2);
        let adopted = passive.control.adopt(active_address, replica.clone());
        assert!(adopted.expect("adopted"));
        assert_eq!(
            passive.control.config().services,
            active.control.config().services
        );
        assert_eq!(passive.control.config_generation(), 2);
        let states: Vec<&str> = passive.control.snapshot().services[0]
            .real_servers
            .iter()
            .map(|rs| rs.state_name())
            .collect();
        assert_eq!(states, ["down", "drain"]);
        // The same again changes nothing.
        assert!(
            !passive
                .control
                .adopt(active_address, replica.clone())
                .expect("same")
        );
        // The active's checks find the server up again: the services are the ones adopted
        // (shared), only the server's state changed.
        for (healthy, state) in [(true, "up"), (false, "down")] {
            replica.servers[0].healthy = healthy;
            assert!(
                passive
                    .control
                    .adopt(active_address, replica.clone())
                    .expect("adopted")
            );
            assert_eq!(
                passive.control.snapshot().services[0].real_servers[0].state_name(),
                state
            );
        }
        // The passive node's own changes are refused with the active's name; reading is fine.
        let refused = error_of(passive.control.handle(
            Command::Online(RealServerName {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 2".into(),
            }),
            Role::Root,
        ));
        assert!(
            refused.contains("follows the configuration of the active node, 198.18.0.3"),
            "{refused}"
        );
        done(passive.control.handle(Command::Status, Role::Root));
        // Its own checks do not overrule the active's while it follows...
        let target = passive.control.health_targets()[0].clone();
        for _ in 0..5 {
            passive.control.record_health(
                &target,
                CheckResult {
                    ok: true,
                    detail: "fine".into(),
                    took: Duration::ZERO,
                },
            );
        }
        assert_eq!(
            passive.control.snapshot().services[0].real_servers[0].state_name(),
            "down"
        );
        // ...and carry on from its states once the node is active.
        passive.control.set_active(true).expect("active");
        for _ in 0..target.check.rise {
            passive.control.record_health(
                &target,
                CheckResult {
                    ok: true,
                    detail: "fine".into(),
                    took: Duration::ZERO,
                },
            );
        }
        assert_eq!(
            passive.control.snapshot().services[0].real_servers[0].state_name(),
            "up"
        );
        done(passive.control.handle(
            Command::Online(RealServerName {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 2".into(),
            }),
            Role::Root,
        ));
        // An active node adopts nothing.
        let stale = active.control.replica();
        assert!(
            !passive
                .control
                .adopt(active_address, stale)
                .expect("ignored")
        );
        assert_eq!(passive.control.following(), None);
    }

    /// A passive node keeps the services a replica did not change: a replica arrives as JSON
    /// (every service new), and only the service the change touched is built again.
    #[test]
    fn a_passive_node_keeps_the_services_a_replica_did_not_change() {
        let (mut active, mut passive, active_address) = pair();
        done(active.control.handle(
            Command::AddVip {
                service: service("Wowza Streaming", "198.18.0.101"),
            },
            Role::Root,
        ));
        let rs = active.control.config().services[0].real_servers[0].clone();
        done(active.control.handle(
            Command::AddRip {
                service: "Wowza Streaming".into(),
                real_server: rs,
            },
            Role::Root,
        ));
        // The active's replica, through JSON as the sync stream carries it, adopted.
        let sync = |active: &Rig, passive: &mut Rig| {
            let json = serde_json::to_string(&active.control.replica()).expect("to JSON");
            let replica = serde_json::from_str(&json).expect("from JSON");
            let adopted = passive.control.adopt(active_address, replica);
            assert!(adopted.expect("adopted"));
        };
        sync(&active, &mut passive);
        let (services, snapshot) = (
            passive.control.config().services.clone(),
            Arc::clone(passive.control.snapshot()),
        );
        done(active.control.handle(
            Command::SetWeight(WeightChange {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 1".into(),
                weight: 50,
            }),
            Role::Root,
        ));
        sync(&active, &mut passive);
        assert_eq!(
            passive.control.config().services,
            active.control.config().services
        );
        let now = passive.control.config().services.clone();
        assert!(!Arc::ptr_eq(&now[0], &services[0]), "changed");
        assert!(Arc::ptr_eq(&now[1], &services[1]), "kept");
        let after = passive.control.snapshot();
        assert_eq!(after.services[0].real_servers[0].weight, 50);
        assert!(Arc::ptr_eq(
            &after.services[1].real_servers,
            &snapshot.services[1].real_servers
        ));
    }

    /// A SNAT service for `rig`'s config: Wowza GUI's HTTP on VIP .101, to port 8080.
    fn snat_service() -> Service {
        let text = format!(
            "{CONFIG}\n[[service]]\nlabel = \"Wowza L7\"\nvip = \"198.18.0.101\"\nports = 8088\n\
             mode = \"snat\"\nlayer7_protocol = \"http\"\n\n[[service.real_server]]\n\
             label = \"Wowza Srv 1\"\nip = \"198.18.0.11\"\nport = 8080\n"
        );
        Arc::unwrap_or_clone(
            Config::from_toml_str(&text)
                .expect("valid")
                .services
                .remove(1),
        )
    }

    #[test]
    fn snat_services_go_to_haproxy_and_their_vips_onto_the_interface() {
        let mut rig = rig(true);
        done(rig.control.handle(
            Command::AddVip {
                service: snat_service(),
            },
            Role::Root,
        ));
        {
            let haproxy = rig.haproxy.lock().expect("haproxy");
            let config = haproxy
                .applied
                .last()
                .cloned()
                .flatten()
                .expect("HAProxy started");
            assert!(
                config.contains("bind 198.18.0.101:8088 transparent")
                    && config.contains("server r0-Wowza_Srv_1 198.18.0.11:8080 weight 100"),
                "{config}"
            );
        }
        // The VIP is the host's (HAProxy's), not steered to lbd's workers.
        assert!(
            rig.held
                .lock()
                .expect("held")
                .contains(&Ipv4Addr::new(198, 18, 0, 101))
        );
        assert!(
            !rig.map
                .lock()
                .expect("map")
                .vips
                .contains(&Ipv4Addr::new(198, 18, 0, 101).into())
        );
        assert!(
            rig.control
                .health_targets()
                .iter()
                .all(|t| t.service != "Wowza L7")
        );
        let status = rig.control.status();
        assert_eq!(
            (
                status.services[1].method.as_str(),
                status.services[1].mode.as_str()
            ),
            ("Layer 7", "SNAT")
        );
        assert_eq!(status.services[1].real_servers[0].port, Some(8080));
        // States and weights go through the runtime API: no reload.
        let name = |label: &str| RealServerName {
            service: "Wowza L7".into(),
            label: label.into(),
        };
        done(
            rig.control
                .handle(Command::Drain(name("Wowza Srv 1")), Role::Root),
        );
        done(
            rig.control
                .handle(Command::Halt(name("Wowza Srv 1")), Role::Root),
        );
        done(
            rig.control
                .handle(Command::Online(name("Wowza Srv 1")), Role::Root),
        );
        {
            let haproxy = rig.haproxy.lock().expect("haproxy");
            assert_eq!(haproxy.applied.len(), 1, "{haproxy:?}");
            let server = "s1-Wowza_L7/r0-Wowza_Srv_1";
            assert_eq!(
                haproxy.lines,
                [
                    format!("set server {server} state drain"),
                    format!("set server {server} state maint"),
                    format!("shutdown sessions server {server}"),
                    format!("set server {server} state ready"),
                    format!("set server {server} weight 100"),
                ]
            );
        }
        // A new server means a reload; one HAProxy refuses changes nothing.
        let mut second = snat_service().real_servers.remove(0);
        second.label = "Wowza Srv 2".into();
        second.ip = Ipv4Addr::new(198, 18, 0, 12).into();
        rig.haproxy.lock().expect("haproxy").refuse =
            Some("HAProxy refused the configuration: [ALERT] something".into());
        let before = rig.control.config().clone();
        let refused = error_of(rig.control.handle(
            Command::AddRip {
                service: "Wowza L7".into(),
                real_server: second.clone(),
            },
            Role::Root,
        ));
        assert!(
            refused.contains("[ALERT] something") && refused.ends_with("nothing changed"),
            "{refused}"
        );
        assert_eq!(rig.control.config(), &before);
        done(rig.control.handle(
            Command::AddRip {
                service: "Wowza L7".into(),
                real_server: second,
            },
            Role::Root,
        ));
        assert_eq!(rig.haproxy.lock().expect("haproxy").applied.len(), 2);
        // Gone: HAProxy stops, the VIP leaves the interface.
        done(rig.control.handle(
            Command::DelVip(ServiceName {
                label: "Wowza L7".into(),
            }),
            Role::Root,
        ));
        assert_eq!(
            rig.haproxy.lock().expect("haproxy").applied.last(),
            Some(&None)
        );
        assert!(rig.held.lock().expect("held").is_empty());
        // A SNAT VIP must be on the segment, where clients can reach it.
        let mut far = snat_service();
        far.vip = Ipv4Addr::new(203, 0, 113, 9).into();
        let refused = error_of(
            rig.control
                .handle(Command::AddVip { service: far }, Role::Root),
        );
        assert!(
            refused.contains("is on none of eth0's networks (198.18.0.2/16)"),
            "{refused}"
        );
    }

    #[test]
    fn a_passive_node_runs_haproxy_but_holds_no_snat_vip() {
        let mut rig = rig(true);
        rig.control.set_active(false).expect("passive");
        done(rig.control.handle(
            Command::AddVip {
                service: snat_service(),
            },
            Role::Root,
        ));
        assert_eq!(rig.haproxy.lock().expect("haproxy").applied.len(), 1);
        assert!(rig.held.lock().expect("held").is_empty());
        rig.control.set_active(true).expect("active");
        assert!(
            rig.held
                .lock()
                .expect("held")
                .contains(&Ipv4Addr::new(198, 18, 0, 101))
        );
        rig.control.stop_layer7();
        assert!(rig.held.lock().expect("held").is_empty());
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("lbd-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("lbd.toml");
        std::fs::write(&path, "old").expect("write");
        write_atomically(&path, b"new").expect("save");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
        assert!(write_atomically(&dir.join("no/such/dir/x.toml"), b"x").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_save_keeps_the_mode_and_never_follows_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("lbd-save-links-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // A root-only file stays root-only.
        let private = dir.join("private.toml");
        std::fs::write(&private, "old").expect("write");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        write_atomically(&private, b"new").expect("save");
        let mode = std::fs::metadata(&private)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A new file is 0600.
        let fresh = dir.join("fresh.toml");
        write_atomically(&fresh, b"x").expect("save");
        let mode = std::fs::metadata(&fresh)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A link at the path is refused, and its target untouched.
        let target = dir.join("target");
        std::fs::write(&target, "precious").expect("write");
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let error = write_atomically(&link, b"x").expect_err("a link");
        assert!(error.to_string().contains("not a regular file"), "{error}");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "precious");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
