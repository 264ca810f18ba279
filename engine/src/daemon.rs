//! Start-up, the workers' threads, neighbour resolution, signals and shutdown.
//!
//! Order matters at start: the XDP program is attached with an empty VIP map (so it steers
//! nothing yet), then each queue's socket is bound and entered in the XSKMAP, its worker starts
//! and fills the fill ring, and only then are the VIPs added: no VIP frame is ever redirected
//! to a queue that cannot take it. At stop
//! (SIGINT/SIGTERM) the workers finish their batch and exit, the sockets close, and dropping
//! the steering program's link detaches it, leaving the interface as it was.

use crate::control::{Control, WorkerLink, addresses_to_resolve};
use crate::counters::{Counters, DropReason};
use crate::dataplane::{Dataplane, TableSizes};
use crate::server::{ControlServer, ServerError};
use crate::snapshot::{AdminState, Snapshot};
use crate::steer::{AttachMode, SteerError, Steering};
use crate::sys::{CopyMode, XskError, XskRings, XskSettings};
use crate::worker::{Worker, WorkerCommand, WorkerSettings};
use crate::{health, host};
use crossbeam::channel::unbounded;
use lbd_config::{Config, Polling, XdpMode};
use std::net::Ipv4Addr;
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
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ServerError),
}

/// Runs the balancer with `config` (read from `config_path`, which `reload` re-reads) until
/// SIGINT or SIGTERM.
pub fn run(config: Config, config_path: &Path) -> Result<(), DaemonError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal asks for a clean stop; a second one, while stopping, exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .map_err(DaemonError::Signals)?;
        signal_hook::flag::register(signal, Arc::clone(&stop)).map_err(DaemonError::Signals)?;
    }

    let engine = &config.engine;
    let interface = engine.interface.as_str();
    if !host::interface_exists(interface) {
        return Err(DaemonError::NoInterface(interface.to_owned()));
    }
    let own_mac = host::interface_mac(interface).map_err(|source| DaemonError::Host {
        what: format!("the MAC address of {interface}"),
        source,
    })?;
    let available = host::rx_queue_count(interface).map_err(|source| DaemonError::Host {
        what: format!("the queues of {interface}"),
        source,
    })?;
    if let Some(&queue) = engine.queues.iter().find(|&&q| q >= available) {
        return Err(DaemonError::NoQueue {
            interface: interface.to_owned(),
            queue,
            available,
        });
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
    let snapshot = Arc::new(Snapshot::build(
        &config,
        own_mac,
        1,
        |ip| macs.get(&ip).copied(),
        |_, _| AdminState::Online,
    ));
    log_services(&config, &snapshot);

    let vips = distinct_vips(&config);

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
    let mut links = Vec::with_capacity(sockets.len());
    for (index, rings) in sockets.into_iter().enumerate() {
        let core = engine.cores.get(index).copied();
        let (link, thread) = spawn_worker(
            index,
            engine.queues[index],
            rings,
            Dataplane::new(Arc::clone(&snapshot), sizes),
            settings,
            core,
            Arc::clone(&stop),
        );
        links.push(link);
        threads.push((index, thread));
    }

    // VIPs are steered only once every worker runs (its fill ring holds frames): before that
    // the kernel would have nowhere to put them.
    let deadline = Instant::now() + Duration::from_secs(2);
    while links.iter().any(|l| l.applied.load(Ordering::Acquire) == 0) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    for &vip in &vips {
        if let Err(error) = steering.add_vip(vip) {
            stop.store(true, Ordering::Relaxed);
            join_workers(threads);
            return Err(error.into());
        }
    }

    let control = Arc::new(Mutex::new(Control::new(
        config.clone(),
        config_path.to_owned(),
        own_mac,
        snapshot,
        macs,
        steering,
        links,
    )));
    let server = ControlServer::start(
        &engine.control_socket,
        engine.control_group.as_deref(),
        Arc::clone(&control),
    );
    let server = match server {
        Ok(server) => server,
        Err(error) => {
            stop.store(true, Ordering::Relaxed);
            join_workers(threads);
            return Err(error.into());
        }
    };
    let checker = {
        let (control, stop) = (Arc::clone(&control), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("lbd-health".to_owned())
            .spawn(move || {
                health::run(
                    &stop,
                    || {
                        control
                            .lock()
                            .map(|c| c.health_targets())
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
    };
    tracing::info!(
        interface,
        mac = %host::format_mac(own_mac),
        workers = threads.len(),
        "lbd running"
    );

    // Gratuitous ARP rounds and neighbour upkeep, until a signal.
    let mut announcements_left = engine.gratuitous_arp_count;
    let mut next_announce = Instant::now();
    let mut next_resolve = Instant::now() + RESOLVE_INTERVAL;
    let mut next_limits = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if announcements_left > 0 && now >= next_announce && !vips.is_empty() {
            if let Ok(control) = control.lock()
                && let Some(first) = control.workers().first()
            {
                // Only one worker announces: every queue shares the interface.
                let _ = first
                    .commands
                    .send(WorkerCommand::Announce(own_mac, vips.clone()));
            }
            announcements_left -= 1;
            next_announce = now + ANNOUNCE_INTERVAL;
        }
        if now >= next_resolve {
            next_resolve = now + RESOLVE_INTERVAL;
            if let Ok(mut control) = control.lock() {
                control.refresh_neighbours();
            }
        }
        if now >= next_limits {
            next_limits = now + LIMITS_INTERVAL;
            if let Ok(mut control) = control.lock() {
                control.enforce_limits();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    tracing::info!("stopping");
    drop(server);
    let _ = checker.join();
    join_workers(threads);
    // The last reference to the control state holds the steering program: dropping it detaches.
    drop(control);
    tracing::info!(interface, "XDP program detached; stopped");
    Ok(())
}

fn join_workers(threads: Vec<(usize, JoinHandle<WorkerExit>)>) {
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
) -> (WorkerLink, JoinHandle<WorkerExit>) {
    let (commands, receiver) = unbounded();
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
            worker.run(&stop, &receiver, &generation);
            if let Some((dropped, ring_full, fill_empty)) = worker.rings().kernel_stats() {
                tracing::info!(
                    worker = index,
                    dropped,
                    ring_full,
                    fill_empty,
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
    (
        WorkerLink {
            queue,
            commands,
            applied,
        },
        thread,
    )
}

fn distinct_vips(config: &Config) -> Vec<Ipv4Addr> {
    let mut vips: Vec<Ipv4Addr> = config.services.iter().map(|s| s.vip).collect();
    vips.sort();
    vips.dedup();
    vips
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
                "real server unresolved: no MAC in the neighbour table; it gets no traffic until it answers ARP"
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
        "totals"
    );
    for reason in DropReason::ALL {
        let count = total.drops_for(reason);
        if count > 0 {
            tracing::info!(reason = reason.name(), count, "dropped");
        }
    }
}
