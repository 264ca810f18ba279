//! The HA node as it runs: the heartbeat socket, the watch on the link, the state machine, and
//! what a change of state does (the VIPs' ARP ownership, gratuitous ARP rounds). One thread;
//! the packet path never waits on it. It starts the sync streams ([`crate::ha::sync`]) too.

use crate::control::{Control, HaLink, HaRequest};
use crate::ha::machine::{Actions, Event, Machine, Settings};
use crate::ha::sync::{Sync, SyncParts};
use crate::ha::wire::{HEARTBEAT_LEN, HaState, Heartbeat, ReplayGuard, WireError};
use crate::io::host;
use crossbeam::channel::{Receiver, unbounded};
use lbd_config::{Ha, HaMode};
use lbd_proto::{HaPeerReport, HaReport, HaSyncReport};
use std::net::{SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// The shortest key accepted.
pub const MIN_KEY_BYTES: usize = 16;
/// The longest the node waits for a datagram before it looks at its link, its requests and
/// the stop flag again.
const POLL: Duration = Duration::from_millis(10);

/// Why the HA node could not start.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// The key file cannot be used.
    #[error("ha.key_file {}: {reason}; HA cannot start without its key", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The heartbeat socket could not be bound.
    #[error("ha: heartbeat socket on {address}: {source}")]
    Socket {
        /// Where.
        address: SocketAddrV4,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The sync listener could not be bound.
    #[error("ha: sync listener on {address} (ha.sync_port): {source}")]
    Sync {
        /// Where.
        address: SocketAddrV4,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the pair's key: a regular file of at least [`MIN_KEY_BYTES`] bytes, owned by the user
/// lbd runs as and readable by nobody else. Whoever holds it speaks for the active node, whose
/// configuration the passive one applies (external health checks, which run as root,
/// included): it must give nobody more than root already has.
pub fn read_key(path: &Path) -> Result<Vec<u8>, HaError> {
    crate::io::host::read_secret(path, MIN_KEY_BYTES).map_err(|reason| HaError::Key {
        path: path.to_owned(),
        reason,
    })
}

/// A running HA node.
#[derive(Debug)]
pub struct Node {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    link: HaLink,
    /// Stopped after the node's thread (it reads their report).
    _sync: Sync,
}

impl Node {
    /// Starts the node for `ha` on `interface` (its link is watched); changes of state go to
    /// `control`, whose workers share their entries through `parts`. The node starts
    /// passive.
    pub fn start(
        ha: &Ha,
        interface: &str,
        control: Arc<Mutex<Control>>,
        parts: SyncParts,
    ) -> Result<Node, HaError> {
        let key = read_key(&ha.key_file)?;
        let sync_address = SocketAddrV4::new(ha.local_address, ha.sync_port);
        let sync = Sync::start(ha, key.clone(), Arc::clone(&control), parts).map_err(|source| {
            HaError::Sync {
                address: sync_address,
                source,
            }
        })?;
        let address = SocketAddrV4::new(ha.local_address, ha.heartbeat_port);
        let socket = match ha.mode {
            HaMode::Heartbeat => Some(
                UdpSocket::bind(address).map_err(|source| HaError::Socket { address, source })?,
            ),
            HaMode::External => None,
        };
        let settings = Settings {
            role: ha.role,
            mode: ha.mode,
            preempt: ha.preempt,
            interval: Duration::from_millis(u64::from(ha.interval_ms)),
            dead_interval: Duration::from_millis(u64::from(ha.dead_interval_ms)),
        };
        let boot = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let machine = Machine::new(settings, ha.local_address, boot, Instant::now());
        let report = Arc::new(Mutex::new(report_of(&machine, ha, Instant::now())));
        let (requests, incoming) = unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let runner = Runner {
            machine,
            guard: ReplayGuard::default(),
            socket,
            key,
            peers: ha
                .peer_address
                .0
                .iter()
                .map(|&ip| SocketAddrV4::new(ip, ha.heartbeat_port))
                .collect(),
            interface: interface.to_owned(),
            control,
            report: Arc::clone(&report),
            ha: ha.clone(),
            announcements: None,
            counts: Counts::default(),
            sync: sync.report(),
        };
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("lbd-ha".to_owned())
                .spawn(move || runner.run(&incoming, &stop))
                .map_err(|source| HaError::Socket { address, source })?
        };
        Ok(Node {
            stop,
            thread: Some(thread),
            link: HaLink { requests, report },
            _sync: sync,
        })
    }

    /// The control plane's handle on the node.
    pub fn link(&self) -> HaLink {
        self.link.clone()
    }

    /// Hands the traffic to the peer when this node is active, and waits (at most `limit`)
    /// until the peer says it is active: a planned stop loses nothing that waiting can save.
    pub fn hand_over(&self, limit: Duration) {
        let active = |report: &HaReport| report.state == "active";
        let peer_active =
            |report: &HaReport| report.peer.as_ref().is_some_and(|p| p.state == "active");
        let snapshot = || self.link.report.lock().ok().map(|r| r.clone());
        if !snapshot().is_some_and(|r| active(&r)) {
            return;
        }
        let _ = self.link.requests.send(HaRequest::Release);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if snapshot().is_some_and(|r| peer_active(&r)) {
                tracing::info!("handed over: the peer is active");
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        tracing::warn!(
            ?limit,
            "the peer did not report active in time; stopping anyway"
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    sent: u64,
    received: u64,
    rejected: u64,
    replayed: u64,
}

struct Runner {
    machine: Machine,
    guard: ReplayGuard,
    socket: Option<UdpSocket>,
    key: Vec<u8>,
    peers: Vec<SocketAddrV4>,
    interface: String,
    control: Arc<Mutex<Control>>,
    report: Arc<Mutex<HaReport>>,
    ha: Ha,
    /// Gratuitous ARP rounds still to send after becoming active, and when the next is due.
    announcements: Option<(u32, Instant)>,
    counts: Counts,
    sync: Arc<Mutex<HaSyncReport>>,
}

impl Runner {
    fn run(mut self, requests: &Receiver<HaRequest>, stop: &AtomicBool) {
        let mut link = host::link_up(&self.interface);
        if !link {
            self.act(Event::Link(false), Instant::now());
        }
        let mut buf = [0u8; HEARTBEAT_LEN + 1];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let up = host::link_up(&self.interface);
            if up != link {
                link = up;
                self.act(Event::Link(up), now);
            }
            while let Ok(request) = requests.try_recv() {
                let event = match request {
                    HaRequest::Takeover => Event::Takeover,
                    HaRequest::Release => Event::Release,
                };
                self.act(event, now);
            }
            if let Ok(control) = self.control.lock() {
                self.machine.set_generation(control.config_generation());
            }
            if self.machine.next_wakeup(now) <= now {
                self.act(Event::Tick, now);
            }
            if let Some((left, at)) = self.announcements
                && now >= at
            {
                if let Ok(control) = self.control.lock() {
                    control.announce_vips();
                }
                let interval = Duration::from_millis(u64::from(self.ha.gratuitous_arp_interval_ms));
                self.announcements = (left > 1).then_some((left - 1, now + interval));
            }
            self.receive(&mut buf, now);
            self.publish(Instant::now());
        }
    }

    /// Waits for one datagram until the next thing to do, and takes it.
    fn receive(&mut self, buf: &mut [u8], now: Instant) {
        let wait = self
            .machine
            .next_wakeup(now)
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), POLL);
        let Some(socket) = &self.socket else {
            std::thread::sleep(wait);
            return;
        };
        if socket.set_read_timeout(Some(wait)).is_err() {
            std::thread::sleep(wait);
            return;
        }
        let Ok((len, _)) = socket.recv_from(buf) else {
            return;
        };
        match Heartbeat::decode(&buf[..len], &self.key)
            .and_then(|beat| self.guard.accept(&beat).map(|()| beat))
        {
            Ok(beat) => {
                self.counts.received += 1;
                self.act(Event::Heartbeat(beat), Instant::now());
            }
            Err(WireError::Replayed) => self.counts.replayed += 1,
            Err(error) => {
                self.counts.rejected += 1;
                tracing::debug!(%error, "heartbeat refused");
            }
        }
    }

    /// Feeds `event` to the machine and carries out what it says.
    fn act(&mut self, event: Event, now: Instant) {
        let Actions { send, became } = self.machine.handle(event, now);
        if let (Some(beat), Some(socket)) = (send, &self.socket) {
            let datagram = beat.encode(&self.key);
            for peer in &self.peers {
                // A path that is down is no reason to skip the others.
                if socket.send_to(&datagram, peer).is_ok() {
                    self.counts.sent += 1;
                }
            }
        }
        if let Some(state) = became {
            let active = state == HaState::Active;
            tracing::info!(%state, epoch = self.machine.epoch(), "HA state");
            if let Ok(mut control) = self.control.lock()
                && let Err(error) = control.set_active(active)
            {
                tracing::error!(%error, "changing the VIPs' ARP ownership");
            }
            // set_active sent the first round; the rest follow at their interval.
            let interval = Duration::from_millis(u64::from(self.ha.gratuitous_arp_interval_ms));
            self.announcements = (active && self.ha.gratuitous_arp_count > 1)
                .then_some((self.ha.gratuitous_arp_count - 1, now + interval));
        }
    }

    fn publish(&self, now: Instant) {
        let mut report = report_of(&self.machine, &self.ha, now);
        report.heartbeats_sent = self.counts.sent;
        report.heartbeats_received = self.counts.received;
        report.rejected = self.counts.rejected;
        report.replayed = self.counts.replayed;
        if let Ok(sync) = self.sync.lock() {
            report.sync = sync.clone();
        }
        if let Ok(mut shared) = self.report.lock() {
            *shared = report;
        }
    }
}

/// `ha status` for the node as `machine` holds it at `now`.
fn report_of(machine: &Machine, ha: &Ha, now: Instant) -> HaReport {
    HaReport {
        role: ha.role.to_string(),
        mode: match ha.mode {
            HaMode::Heartbeat => "heartbeat",
            HaMode::External => "external",
        }
        .to_owned(),
        state: machine.state().to_string(),
        local_address: ha.local_address,
        epoch: machine.epoch(),
        released: machine.released(),
        generation: machine.generation(),
        peer: machine.peer().map(|peer| HaPeerReport {
            address: peer.beat.sender,
            role: peer.beat.role.to_string(),
            state: if machine.peer_alive(now) {
                peer.beat.state.to_string()
            } else {
                "dead".to_owned()
            },
            heard_ms_ago: u64::try_from(now.saturating_duration_since(peer.heard).as_millis())
                .unwrap_or(u64::MAX),
            generation: peer.beat.generation,
        }),
        heartbeats_sent: 0,
        heartbeats_received: 0,
        rejected: 0,
        replayed: 0,
        sync: HaSyncReport::default(),
    }
}
