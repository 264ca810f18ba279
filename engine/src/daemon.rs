//! Start-up, the workers' threads, neighbour resolution, signals and shutdown.
//!
//! Order matters at start: what would lose frames or traffic is refused first (an interface
//! MTU larger than a UMEM frame holds, a VIP or real server that is one of the host's own
//! addresses); the XDP program is attached with an empty VIP map (so it steers nothing yet),
//! then each queue's socket is bound and entered in the XSKMAP, its worker starts and fills
//! the fill ring, and only then are the VIPs added: no VIP frame is ever redirected to a queue
//! that cannot take it. A worker that does not start in time, or stops while lbd runs, stops
//! lbd with an error: a queue nobody serves would drop its share of the traffic unseen. At
//! stop (SIGINT/SIGTERM) the workers finish their batch and exit, the sockets close, and
//! dropping the steering program's link detaches it, leaving the interface as it was.

use crate::control::health;
use crate::control::server::{ControlServer, ServerError};
use crate::control::{
    Control, Doors, SystemClock, WorkerLink, addresses_to_resolve, check_host_addresses,
};
use crate::ha::node::Node;
use crate::ha::sync::SyncParts;
use crate::io::host;
use crate::io::steer::{AttachMode, SteerError, Steering};
use crate::io::sys::{CopyMode, XskError, XskRings, XskSettings};
use crate::io::worker::{Rings, Worker, WorkerSender, WorkerSettings, worker_channel};
use crate::packet::counters::{Counters, DropReason};
use crate::packet::dataplane::{Dataplane, TableSizes};
use crate::packet::snapshot::Snapshot;
use lbd_config::{Config, Polling, XdpMode};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long start-up waits for real servers' MACs before it starts without them.
const INITIAL_RESOLUTION: Duration = Duration::from_secs(3);
/// How often unresolved real servers are retried, and known ones re-read, while running.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(1);
/// How often connection counts are summed and the limits applied.
const LIMITS_INTERVAL: Duration = Duration::from_millis(200);
/// Spacing of the gratuitous ARP rounds at start.
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(500);
/// How often the neighbour table is read while a change waits for a new server's MAC.
const FAST_RESOLVE_INTERVAL: Duration = Duration::from_millis(100);
/// How long every worker has to start (open its rings, fill the fill ring).
const WORKER_START: Duration = Duration::from_secs(5);
/// Bytes the kernel keeps free at the start of every UMEM frame (`XDP_PACKET_HEADROOM`).
const XDP_PACKET_HEADROOM: u32 = 256;
/// An Ethernet header: what a frame carries beyond the MTU (lbd serves no VLAN tags).
const ETHERNET_HEADER: u32 = 14;

/// The largest MTU whose frames a UMEM frame of `frame_size` bytes holds.
pub fn max_mtu(frame_size: u32) -> u32 {
    frame_size.saturating_sub(XDP_PACKET_HEADROOM + ETHERNET_HEADER)
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The interface is not in this network namespace.
    #[error("interface {0} not found (ip link shows the interfaces of this namespace)")]
    NoInterface(String),
    /// A configured queue does not exist on the interface.
    #[error(
        "engine.queues: interface {interface} has {available} RX queue(s); queue {queue} does not exist"
    )]
    NoQueue {
        /// The interface.
        interface: String,
        /// The missing queue.
        queue: u32,
        /// How many it has.
        available: u32,
    },
    /// Reading the host's facts failed.
    #[error("reading {what}: {source}")]
    Host {
        /// What was being read.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The XDP program could not be set up.
    #[error(transparent)]
    Steer(#[from] SteerError),
    /// An AF_XDP socket could not be opened.
    #[error("{0} (lbd needs root, or CAP_NET_ADMIN, CAP_NET_RAW and CAP_BPF)")]
    Xsk(#[from] XskError),
    /// The signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// A worker's doorbell (an eventfd) could not be created.
    #[error("creating a worker's doorbell (eventfd): {0}")]
    Doorbell(#[source] std::io::Error),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ServerError),
    /// The interface carries frames larger than a UMEM frame holds.
    #[error(
        "interface {interface} has MTU {mtu}: frames of up to {} bytes, but a UMEM frame of \
         engine.frame_size = {frame_size} holds {} ({XDP_PACKET_HEADROOM} bytes are the \
         kernel's headroom), and the kernel would drop every larger frame; lower the MTU to \
         {} or less (ip link set {interface} mtu {}){}",
        mtu + ETHERNET_HEADER,
        frame_size - XDP_PACKET_HEADROOM,
        max_mtu(*frame_size),
        max_mtu(*frame_size),
        if *frame_size < 4096 { ", or set engine.frame_size = 4096" } else { "" }
    )]
    Mtu {
        /// The interface.
        interface: String,
        /// Its MTU.
        mtu: u32,
        /// `engine.frame_size`.
        frame_size: u32,
    },
    /// The configuration names one of the host's own addresses.
    #[error("{0}")]
    HostAddress(String),
    /// The HA node could not start.
    #[error(transparent)]
    Ha(#[from] crate::ha::node::HaError),
    /// The SNAT services cannot be served (HAProxy missing or refusing, a VIP off the
    /// segment, a port lbd may not bind).
    #[error("{0}")]
    Layer7(String),
    /// The HTTP listener could not listen (`engine.http_listen`).
    #[error(transparent)]
    Http(crate::http::HttpError),
    /// A worker did not start, or stopped while lbd ran.
    #[error(
        "worker {worker} (queue {queue}) {what}; lbd stops rather than leave the queue unserved"
    )]
    Worker {
        /// Its index.
        worker: usize,
        /// Its queue.
        queue: u32,
        /// What happened.
        what: String,
    },
}

/// Runs the balancer with `config` (read from `config_path`, which `reload` re-reads) until
/// SIGINT or SIGTERM.
pub fn run(config: Config, config_path: &Path) -> Result<(), DaemonError> {
    let (stop, reload) = stop_on_signals()?;
    let engine = &config.engine;
    let interface = engine.interface.as_str();
    let host = check_host(&config)?;

    let mut steering = Steering::attach(interface, engine.xdp_mode != XdpMode::ZeroCopy)?;
    let mut sockets = Vec::with_capacity(engine.queues.len());
    for &queue in &engine.queues {
        let (rings, mode) = open_socket(&config, queue, steering.mode())?;
        steering.set_socket(queue, &rings)?;
        tracing::info!(interface, queue, ?mode, xdp = ?steering.mode(), "AF_XDP socket bound");
        sockets.push(rings);
    }

    let macs = host::resolve(
        interface,
        &addresses_to_resolve(&config),
        INITIAL_RESOLUTION,
        &stop,
    );
    let mut control = Control::new(
        config.clone(),
        config_path.to_owned(),
        host.own_mac,
        macs,
        Doors {
            steering: Box::new(steering),
            host: Box::new(host::SystemHost {
                interface: interface.to_owned(),
            }),
            clock: Box::new(SystemClock),
            layer7: Box::new(crate::l7::Haproxy::new(&config)),
        },
    );
    let snapshot = Arc::clone(control.snapshot());
    log_services(&config, &snapshot);

    // The workers stop last, after a planned handover, not at the signal itself.
    let workers_stop = Arc::new(AtomicBool::new(false));
    // In a pair, the workers share their entries with the peer through these queues.
    let sync_parts = SyncParts::new(sockets.len());
    let sharing = config.ha.as_ref().map(|_| &sync_parts);
    let (links, threads) = start_workers(&config, sockets, &snapshot, &workers_stop, sharing)?;
    let doorbells: Vec<WorkerSender> = links.iter().map(|link| link.commands.clone()).collect();
    let stop_workers = |threads| halt_workers(&workers_stop, &doorbells, threads);
    // VIPs are steered only once every worker runs (its fill ring holds frames): before that
    // the kernel would have nowhere to put them. One that does not start stops lbd.
    if let Err(error) = wait_for_workers(&links, &threads, &stop) {
        stop_workers(threads);
        return Err(error);
    }
    control.attach_workers(links);
    if let Err(error) = control.steer_all_vips() {
        stop_workers(threads);
        return Err(error.into());
    }
    // HAProxy for the SNAT services; their VIPs go on the interface when this node serves.
    if let Err(error) = control
        .check_snat_host(&config)
        .and_then(|()| control.start_layer7())
    {
        stop_workers(threads);
        return Err(DaemonError::Layer7(error.to_string()));
    }

    let control = Arc::new(Mutex::new(control));
    let ha = match config
        .ha
        .as_ref()
        .map(|ha| Node::start(ha, interface, Arc::clone(&control), sync_parts))
    {
        None => None,
        Some(Ok(node)) => {
            if let Ok(mut control) = control.lock() {
                control.attach_ha(node.link());
            }
            Some(node)
        }
        Some(Err(error)) => {
            stop_workers(threads);
            return Err(error.into());
        }
    };
    let server = match ControlServer::start(
        &engine.control_socket,
        engine.control_group.as_deref(),
        Arc::clone(&control),
    ) {
        Ok(server) => server,
        Err(error) => {
            drop(ha);
            stop_workers(threads);
            return Err(error.into());
        }
    };
    let http = match engine
        .http_listen
        .map(|address| {
            let token = engine
                .http_token_file
                .as_deref()
                .filter(|_| engine.http_actions);
            crate::http::start(address, token, Arc::clone(&control), Arc::clone(&stop))
        })
        .transpose()
    {
        Ok(http) => http,
        Err(error) => {
            drop(ha);
            drop(server);
            stop_workers(threads);
            return Err(DaemonError::Http(error));
        }
    };
    let checker = start_health_checks(&control, &stop);
    tracing::info!(
        interface,
        mac = %host::format_mac(host.own_mac),
        workers = threads.len(),
        "lbd running"
    );

    // systemd (Type=notify): ready now that the VIPs are steered. Nothing to say elsewhere.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let failure = serve(&config, &control, &threads, &stop, &reload, &host);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);

    tracing::info!("stopping");
    stop.store(true, Ordering::Relaxed);
    if let (Some(node), Some(ha)) = (&ha, &config.ha) {
        // The active node of a pair hands over first and forwards until the peer has taken
        // the traffic.
        node.hand_over(Duration::from_millis(u64::from(ha.dead_interval_ms)));
    }
    drop(ha);
    drop(server);
    if let Some(http) = http {
        let _ = http.join();
    }
    let _ = checker.join();
    stop_workers(threads);
    if let Ok(mut control) = control.lock() {
        control.stop_layer7();
    }
    // The last reference to the control state holds the steering program: dropping it detaches.
    drop(control);
    tracing::info!(interface, "XDP program detached; stopped");
    failure.map_or(Ok(()), Err)
}

/// A flag that SIGINT or SIGTERM raises (a second signal, while stopping, exits at once), and
/// one that SIGHUP raises (reload).
fn stop_on_signals() -> Result<(Arc<AtomicBool>, Arc<AtomicBool>), DaemonError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .map_err(DaemonError::Signals)?;
        signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(DaemonError::Signals)?;
    }
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))
        .map_err(DaemonError::Signals)?;
    Ok((stop, reload))
}

/// What lbd learns of the host at start.
#[derive(Debug)]
struct HostAtStart {
    own_mac: [u8; 6],
    mtu: u32,
}

/// The interface and its queues exist, its frames fit a UMEM frame, and no VIP or real server
/// is an address of the host: what would otherwise fail later, or lose traffic unseen.
fn check_host(config: &Config) -> Result<HostAtStart, DaemonError> {
    let engine = &config.engine;
    let interface = engine.interface.as_str();
    if !host::interface_exists(interface) {
        return Err(DaemonError::NoInterface(interface.to_owned()));
    }
    let read = |what: String| move |source| DaemonError::Host { what, source };
    let own_mac =
        host::interface_mac(interface).map_err(read(format!("the MAC address of {interface}")))?;
    let available =
        host::rx_queue_count(interface).map_err(read(format!("the queues of {interface}")))?;
    if let Some(&queue) = engine.queues.iter().find(|&&q| q >= available) {
        return Err(DaemonError::NoQueue {
            interface: interface.to_owned(),
            queue,
            available,
        });
    }
    let mtu = host::interface_mtu(interface).map_err(read(format!("the MTU of {interface}")))?;
    if mtu > max_mtu(engine.frame_size) {
        return Err(DaemonError::Mtu {
            interface: interface.to_owned(),
            mtu,
            frame_size: engine.frame_size,
        });
    }
    let local = host::local_addresses().map_err(read("this host's addresses".to_owned()))?;
    check_host_addresses(config, &local).map_err(DaemonError::HostAddress)?;
    if let Some(ha) = &config.ha {
        crate::ha::node::read_key(&ha.key_file)?;
        if !local.iter().any(|(_, ip)| *ip == ha.local_address) {
            return Err(DaemonError::HostAddress(format!(
                "ha.local_address: {} is not an address of this host",
                ha.local_address
            )));
        }
    }
    if (engine.queues.len() as u32) < available {
        tracing::warn!(
            interface,
            rx_queues = available,
            served = ?engine.queues,
            "not every RX queue is served: VIP frames that RSS puts on another queue go to the \
             host stack; serve all queues or steer VIP traffic to these with ethtool"
        );
    }
    Ok(HostAtStart { own_mac, mtu })
}

/// A worker thread per socket, each with its own dataplane over `snapshot`.
fn start_workers(
    config: &Config,
    sockets: Vec<XskRings>,
    snapshot: &Arc<Snapshot>,
    stop: &Arc<AtomicBool>,
    sharing: Option<&SyncParts>,
) -> Result<(Vec<WorkerLink>, Vec<WorkerThread>), DaemonError> {
    let engine = &config.engine;
    let settings = WorkerSettings {
        batch_size: engine.batch_size as usize,
        busy_poll: engine.polling == Polling::Busy,
        ..WorkerSettings::default()
    };
    let sizes = TableSizes {
        flows: engine.flow_table_size as usize,
        persistent_clients: engine.persistence_table_size as usize,
    };
    let mut threads = Vec::with_capacity(sockets.len());
    let mut links: Vec<WorkerLink> = Vec::with_capacity(sockets.len());
    for (index, rings) in sockets.into_iter().enumerate() {
        let mut dataplane = Dataplane::new(Arc::clone(snapshot), sizes);
        if let Some(outbox) = sharing.and_then(|parts| parts.outbox(index)) {
            dataplane.share_through(outbox);
        }
        let spawned = spawn_worker(
            index,
            engine.queues[index],
            rings,
            dataplane,
            settings,
            engine.cores.get(index).copied(),
            Arc::clone(stop),
        );
        let (link, thread) = match spawned {
            Ok(spawned) => spawned,
            Err(error) => {
                // The workers started so far stop with the daemon's start.
                halt_workers(stop, links.iter().map(|link| &link.commands), threads);
                return Err(DaemonError::Doorbell(error));
            }
        };
        links.push(link);
        threads.push((index, thread));
    }
    Ok((links, threads))
}

/// Waits until every worker has taken its first snapshot (its rings are set up), at most
/// [`WORKER_START`]; says which one did not, and why, if one did not.
fn wait_for_workers(
    links: &[WorkerLink],
    threads: &[WorkerThread],
    stop: &AtomicBool,
) -> Result<(), DaemonError> {
    let deadline = Instant::now() + WORKER_START;
    while links.iter().any(|l| l.applied.load(Ordering::Acquire) == 0)
        && Instant::now() < deadline
        && !stop.load(Ordering::Relaxed)
        && !threads.iter().any(|(_, thread)| thread.is_finished())
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let Some((worker, link)) = links
        .iter()
        .enumerate()
        .find(|(_, l)| l.applied.load(Ordering::Acquire) == 0)
    else {
        return Ok(());
    };
    let what = if threads[worker].1.is_finished() {
        "stopped while starting".to_owned()
    } else if stop.load(Ordering::Relaxed) {
        "was still starting when lbd was told to stop".to_owned()
    } else {
        format!("did not start within {} s", WORKER_START.as_secs())
    };
    Err(DaemonError::Worker {
        worker,
        queue: link.queue,
        what,
    })
}

/// The health checker's thread: checks through the host's network stack, results to `control`.
fn start_health_checks(control: &Arc<Mutex<Control>>, stop: &Arc<AtomicBool>) -> JoinHandle<()> {
    let (control, stop) = (Arc::clone(control), Arc::clone(stop));
    std::thread::Builder::new()
        .name("lbd-health".to_owned())
        .spawn(move || {
            health::run(
                &stop,
                health::NetworkChecker::default(),
                || {
                    control
                        .lock()
                        .map(|mut control| control.health_targets())
                        .unwrap_or_default()
                },
                |target, result| {
                    if let Ok(mut control) = control.lock() {
                        control.record_health(target, result);
                    }
                },
            );
        })
        .expect("spawning the health checker")
}

/// The daemon's own loop until a signal: gratuitous ARP rounds, neighbour upkeep, connection
/// limits, and watching the workers and the MTU. Returns the failure that stopped it, if any.
fn serve(
    config: &Config,
    control: &Mutex<Control>,
    threads: &[WorkerThread],
    stop: &AtomicBool,
    reload: &AtomicBool,
    host: &HostAtStart,
) -> Option<DaemonError> {
    let engine = &config.engine;
    let mut announcements_left = engine.gratuitous_arp_count;
    let mut next_announce = Instant::now();
    let mut next_resolve = Instant::now() + RESOLVE_INTERVAL;
    let mut next_fast_resolve = Instant::now();
    let mut next_limits = Instant::now();
    // The first DR check round a second after start (the MACs are learned by then), its
    // verdicts one interval later.
    let dr_interval = Duration::from_millis(u64::from(engine.dr_check_interval_ms));
    let mut next_dr_check = Instant::now() + Duration::from_secs(1);
    let mut reported_mtu = host.mtu;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // A standalone balancer announces its VIPs at start (an HA node when it becomes
        // active).
        if announcements_left > 0 && now >= next_announce {
            if let Ok(control) = control.lock()
                && control.answers_arp()
                && config.ha.is_none()
            {
                control.announce_vips();
            }
            announcements_left -= 1;
            next_announce = now + ANNOUNCE_INTERVAL;
        }
        if now >= next_resolve {
            next_resolve = now + RESOLVE_INTERVAL;
            if let Ok(mut control) = control.lock() {
                control.refresh_neighbours(true);
            }
            reported_mtu = watch_mtu(&engine.interface, engine.frame_size, reported_mtu);
        } else if now >= next_fast_resolve {
            next_fast_resolve = now + FAST_RESOLVE_INTERVAL;
            if let Ok(mut control) = control.lock()
                && control.awaiting_macs()
            {
                control.refresh_neighbours(false);
            }
        }
        // SIGHUP: what `lbctl reload` does (systemd's ExecReload may send either).
        if reload.swap(false, Ordering::Relaxed)
            && let Ok(mut control) = control.lock()
        {
            let response = control.handle(lbd_proto::Command::Reload, crate::control::Role::Root);
            match response.outcome {
                lbd_proto::Outcome::Ok(_) => tracing::info!("SIGHUP: configuration reloaded"),
                lbd_proto::Outcome::Error(error) => {
                    tracing::error!(%error, "SIGHUP: reload refused; the running configuration stays")
                }
            }
        }
        if !dr_interval.is_zero() && now >= next_dr_check {
            next_dr_check = now + dr_interval;
            if let Ok(mut control) = control.lock() {
                control.dr_round();
            }
        }
        if now >= next_limits {
            next_limits = now + LIMITS_INTERVAL;
            if let Ok(mut control) = control.lock() {
                control.enforce_limits();
            }
        }
        // (A worker that ends because lbd is stopping is no failure.)
        if !stop.load(Ordering::Relaxed)
            && let Some(&(worker, _)) = threads.iter().find(|(_, thread)| thread.is_finished())
        {
            tracing::error!(worker, "worker stopped unexpectedly; stopping lbd");
            return Some(DaemonError::Worker {
                worker,
                queue: engine.queues[worker],
                what: "stopped unexpectedly".to_owned(),
            });
        }
        // Until the next task is due: a signal's flag waits for it too, at most
        // LIMITS_INTERVAL.
        let mut wake = next_limits.min(next_resolve);
        if announcements_left > 0 {
            wake = wake.min(next_announce);
        }
        if !dr_interval.is_zero() {
            wake = wake.min(next_dr_check);
        }
        if control.lock().is_ok_and(|control| control.awaiting_macs()) {
            wake = wake.min(next_fast_resolve);
        }
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
    None
}

/// Logs an error when the interface's MTU has risen past what a UMEM frame holds since it was
/// `reported` (frames larger than that are dropped by the kernel, counted as the socket's
/// `rx_dropped` in `lbctl stats`); returns the MTU now.
fn watch_mtu(interface: &str, frame_size: u32, reported: u32) -> u32 {
    let Ok(mtu) = host::interface_mtu(interface) else {
        return reported;
    };
    if mtu != reported && mtu > max_mtu(frame_size) {
        tracing::error!(
            interface,
            mtu,
            max_mtu = max_mtu(frame_size),
            frame_size,
            "the interface MTU rose past what a UMEM frame holds: the kernel drops every larger \
             frame (lbctl stats: socket rx_dropped); lower the MTU, or restart lbd with a larger \
             engine.frame_size"
        );
    }
    mtu
}

/// Raises the workers' stop flag, wakes each (a sleeping worker sees the flag now, not at the
/// end of its sleep) and waits for them.
fn halt_workers<'a>(
    stop: &AtomicBool,
    workers: impl IntoIterator<Item = &'a WorkerSender>,
    threads: Vec<WorkerThread>,
) {
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.wake();
    }
    join_workers(threads);
}

fn join_workers(threads: Vec<WorkerThread>) {
    let mut total = Counters::default();
    for (index, thread) in threads {
        match thread.join() {
            Ok(report) => {
                tracing::info!(
                    worker = index,
                    free = report.census.0,
                    in_fill = report.census.1,
                    in_tx = report.census.2,
                    accounted = report.accounted,
                    "UMEM frames at stop"
                );
                total.merge(&report.counters);
            }
            Err(_) => tracing::error!(worker = index, "worker thread panicked"),
        }
    }
    log_counters(&total);
}

/// Opens the socket for `queue` in the configured copy mode; `auto` tries zero-copy where the
/// program runs in the driver and falls back to copy mode.
fn open_socket(
    config: &Config,
    queue: u32,
    attach: AttachMode,
) -> Result<(XskRings, CopyMode), XskError> {
    let engine = &config.engine;
    let settings = |mode| XskSettings {
        frame_size: engine.frame_size,
        frame_count: engine.frame_count,
        ring_size: engine.ring_size,
        mode,
        tx_skb_budget: engine.tx_skb_budget,
    };
    let interface = engine.interface.as_str();
    match engine.xdp_mode {
        XdpMode::Copy => Ok((
            XskRings::open(interface, queue, settings(CopyMode::Copy))?,
            CopyMode::Copy,
        )),
        XdpMode::ZeroCopy => Ok((
            XskRings::open(interface, queue, settings(CopyMode::ZeroCopy))?,
            CopyMode::ZeroCopy,
        )),
        XdpMode::Auto => {
            if attach == AttachMode::Driver {
                match XskRings::open(interface, queue, settings(CopyMode::ZeroCopy)) {
                    Ok(rings) => return Ok((rings, CopyMode::ZeroCopy)),
                    Err(error) => {
                        tracing::debug!(%error, "zero-copy not available, using copy mode");
                    }
                }
            }
            Ok((
                XskRings::open(interface, queue, settings(CopyMode::Copy))?,
                CopyMode::Copy,
            ))
        }
    }
}

/// A worker thread and its index.
type WorkerThread = (usize, JoinHandle<WorkerExit>);

/// What a worker thread hands back when it stops.
#[derive(Debug)]
struct WorkerExit {
    counters: Counters,
    census: (usize, usize, usize),
    accounted: bool,
}

fn spawn_worker(
    index: usize,
    queue: u32,
    rings: XskRings,
    dataplane: Dataplane,
    settings: WorkerSettings,
    core: Option<usize>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(WorkerLink, JoinHandle<WorkerExit>)> {
    let (commands, inbox) = worker_channel()?;
    let applied = Arc::new(AtomicU64::new(0));
    let generation = Arc::clone(&applied);
    let thread = std::thread::Builder::new()
        .name(format!("lbd-worker-{index}"))
        .spawn(move || {
            if let Some(id) = core
                && !core_affinity::set_for_current(core_affinity::CoreId { id })
            {
                tracing::warn!(worker = index, core = id, "could not pin worker to core");
            }
            let mut worker = Worker::new(rings, dataplane, settings);
            worker.run(&stop, &inbox, &generation);
            if let Some(socket) = worker.rings().kernel_stats() {
                tracing::info!(
                    worker = index,
                    dropped = socket.rx_dropped,
                    ring_full = socket.rx_ring_full,
                    fill_empty = socket.fill_ring_empty,
                    "kernel socket statistics"
                );
            }
            WorkerExit {
                counters: worker.dataplane().counters().clone(),
                census: worker.frame_census(),
                accounted: worker.frames_accounted(),
            }
        })
        .expect("spawning a worker thread");
    Ok((
        WorkerLink {
            queue,
            commands,
            applied,
        },
        thread,
    ))
}

fn log_services(config: &Config, snapshot: &Snapshot) {
    for (service, configured) in snapshot.services.iter().zip(&config.services) {
        let servers: Vec<String> = service
            .real_servers
            .iter()
            .map(|rs| {
                let mac = rs
                    .mac
                    .map_or_else(|| "unresolved".to_owned(), host::format_mac);
                format!("{} {} {} weight {}", rs.label, rs.ip, mac, rs.weight)
            })
            .collect();
        tracing::info!(
            service = %service.label,
            vip = %service.vip,
            vip6 = ?service.vip6,
            ports = %configured.ports,
            protocol = %configured.protocol,
            real_servers = %servers.join(", "),
            "service"
        );
        for rs in service.real_servers.iter().filter(|rs| rs.mac.is_none()) {
            tracing::warn!(
                service = %service.label,
                real_server = %rs.label,
                ip = %rs.ip,
                "real server unresolved: no MAC in the neighbour table; it gets no traffic until it answers ARP (or Neighbor Discovery)"
            );
        }
    }
}

fn log_counters(total: &Counters) {
    tracing::info!(
        rx = total.rx_frames,
        forwarded = total.forwarded.packets,
        forwarded_bytes = total.forwarded.bytes,
        arp_replies = total.arp_replies,
        icmp_echo_replies = total.icmp_echo_replies,
        gratuitous_arps = total.gratuitous_arps,
        nd_replies = total.nd_replies,
        unsolicited_nas = total.unsolicited_nas,
        "totals"
    );
    for reason in DropReason::ALL {
        let count = total.drops_for(reason);
        if count > 0 {
            tracing::info!(reason = reason.name(), count, "dropped");
        }
    }
}
