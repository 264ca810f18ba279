//! A poll-mode worker: drives one queue's rings through the dataplane in batches.
//!
//! The worker owns every UMEM frame of its socket and knows at all times where each one is:
//! on its free list, in the fill ring (lent to the kernel for RX), or in the TX ring until the
//! completion ring returns it. A received frame is processed in place and either goes straight
//! to TX (forwarded or answered: zero copies in userspace) or back to the free list, from which
//! the fill ring is topped up. [`Worker::frames_accounted`] checks that the three places always
//! add up to the UMEM's frame count.
//!
//! The rings come through the [`Rings`] trait, so the whole loop runs in tests against a fake
//! ring in plain memory (as s2n-quic-xdp does), and in the daemon against AF_XDP (`sys`). A
//! frame is an owned token ([`Rings::Frame`], neither `Copy` nor `Clone`) that moves from one
//! place to the next: no code, this worker's or any other safe code, can lend one frame to
//! the kernel twice or touch a frame the kernel holds.

use crate::io::doorbell::Doorbell;
use crate::packet::counters::{Counters, DropReason, Sent};
use crate::packet::dataplane::{Dataplane, MIN_FRAME_LEN, Verdict, write_gratuitous_arp};
use crate::packet::drcheck::{self, Claim, PROBE_FRAME_LEN, ProbeAnswer, ServerProbe};
use crate::packet::ipv6::{UNSOLICITED_NA_LEN, write_unsolicited_na};
use crate::packet::snapshot::Snapshot;
use crate::packet::sync::{Installed, OutboxCounters, SyncEntry};
use crossbeam::channel::{Receiver, SendError, Sender, unbounded};
/// What the kernel counts for an AF_XDP socket (`XDP_STATISTICS`), as `lbctl stats` shows it.
pub use lbd_proto::SocketStats;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The four AF_XDP rings of one socket and access to its UMEM frames.
///
/// Frames move by value: what a ring takes is removed from the caller's vector, what it gives
/// back is pushed onto one. The caller holds a frame, or the kernel does, never both.
pub trait Rings {
    /// An owned frame of this socket's UMEM (its address and length). Not `Copy` or `Clone`:
    /// holding one is the right to its bytes.
    type Frame;
    /// Every frame of the UMEM, once, at start.
    fn take_frames(&mut self) -> Vec<Self::Frame>;
    /// Moves at most `max` transmitted frames off the completion ring onto the end of `out`;
    /// returns how many.
    fn reclaim(&mut self, out: &mut Vec<Self::Frame>, max: usize) -> usize;
    /// Lends at most `max` frames from the end of `frames` to the kernel for RX; returns how
    /// many it took (they are gone from `frames`).
    fn fill(&mut self, frames: &mut Vec<Self::Frame>, max: usize) -> usize;
    /// Moves at most `max` received frames off the RX ring onto the end of `out`; returns
    /// how many.
    fn receive(&mut self, out: &mut Vec<Self::Frame>, max: usize) -> usize;
    /// Runs `f` on the frame's bytes.
    fn with_payload<R>(&mut self, frame: &mut Self::Frame, f: impl FnOnce(&mut [u8]) -> R) -> R;
    /// Replaces the frame's contents with `bytes`.
    fn write(&mut self, frame: &mut Self::Frame, bytes: &[u8]);
    /// Queues frames from the front of `frames` for transmission, in order; returns how many
    /// it took (they are gone from `frames`).
    fn transmit(&mut self, frames: &mut Vec<Self::Frame>) -> usize;
    /// Asks the kernel to process the TX ring again (frames it has not sent yet).
    fn kick(&mut self);
    /// Sleeps until a frame arrives, `doorbell` rings or `timeout_ms` passes; clears the bell
    /// when it rang.
    fn wait_for_rx(&mut self, timeout_ms: i32, doorbell: &Doorbell);
    /// The kernel's counters for the socket (frames it could not deliver), when it has any.
    fn kernel_stats(&self) -> Option<SocketStats> {
        None
    }
}

/// What a TX batch holds, for the frames the ring has no room for.
#[derive(Debug, Clone, Copy)]
enum Unsent {
    /// Received frames the dataplane passed at `now_ms`: each is a drop, its count taken back.
    Received(u64),
    /// Frames the worker wrote (gratuitous ARP): not sent after all.
    Generated,
}

/// Wake-and-retry rounds for a batch that found the TX ring full before its rest is recycled.
const MAX_TX_RETRIES: usize = 4;

/// What the control side asks of a running worker; applied between batches.
#[derive(Debug)]
pub enum WorkerCommand {
    /// Use this snapshot from the next frame on.
    Snapshot(Arc<Snapshot>),
    /// Announce these VIPs from this MAC: gratuitous ARP, unsolicited Neighbor Advertisements.
    Announce([u8; 6], Vec<IpAddr>),
    /// Send the DR check's questions (source, VIP) and probes from this MAC.
    Probe {
        /// Our MAC.
        mac: [u8; 6],
        /// "Who has VIP?", from this host's address.
        questions: Vec<(IpAddr, IpAddr)>,
        /// SYNs to the real servers.
        probes: Vec<ServerProbe>,
    },
    /// Send a copy of the counters and table figures back.
    Report(Sender<WorkerReport>),
    /// Install entries a peer shared (the same batch goes to every worker).
    Install(Arc<[SyncEntry]>),
}

/// Hands commands to one worker, and wakes it when it sleeps.
#[derive(Debug, Clone)]
pub struct WorkerSender {
    commands: Sender<WorkerCommand>,
    doorbell: Arc<Doorbell>,
}

impl WorkerSender {
    /// Queues `command`; fails only when the worker has stopped.
    pub fn send(&self, command: WorkerCommand) -> Result<(), SendError<WorkerCommand>> {
        self.commands.send(command)?;
        self.doorbell.ring();
        Ok(())
    }

    /// Wakes the worker if it sleeps, to look at its stop flag or its outbox.
    pub fn wake(&self) {
        self.doorbell.ring();
    }

    /// Commands the worker has not taken yet.
    pub(crate) fn backlog(&self) -> usize {
        self.commands.len()
    }
}

/// A worker's end of its command channel.
#[derive(Debug)]
pub struct WorkerInbox {
    commands: Receiver<WorkerCommand>,
    doorbell: Arc<Doorbell>,
}

impl WorkerInbox {
    /// The next command, if one is waiting.
    pub fn try_recv(&self) -> Option<WorkerCommand> {
        self.commands.try_recv().ok()
    }

    /// Blocks for the next command; `None` once every sender is gone (for stand-ins of a
    /// worker in tests).
    pub fn recv(&self) -> Option<WorkerCommand> {
        self.commands.recv().ok()
    }
}

/// A command channel with its doorbell.
pub fn worker_channel() -> io::Result<(WorkerSender, WorkerInbox)> {
    let (sender, receiver) = unbounded();
    let doorbell = Arc::new(Doorbell::new()?);
    Ok((
        WorkerSender {
            commands: sender,
            doorbell: Arc::clone(&doorbell),
        },
        WorkerInbox {
            commands: receiver,
            doorbell,
        },
    ))
}

/// A worker's counters and table figures, as of one moment.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    /// Snapshot generation in use.
    pub generation: u64,
    /// The counters.
    pub counters: Counters,
    /// Entries in the flow table.
    pub flows: usize,
    /// Entries in the persistence table.
    pub persistent_clients: usize,
    /// Connections, persistent clients and fragmented datagrams that found their table full
    /// of live entries and were not recorded.
    pub table_full: TableFull,
    /// Half-open or closing connections that gave way to new ones in a full flow table.
    pub flow_evictions: u64,
    /// The kernel's counters for the worker's socket.
    pub socket: Option<SocketStats>,
    /// Active connections per service and real server (snapshot order).
    pub connections: Vec<Vec<u64>>,
    /// What it shared with the group's peers, and installed of theirs.
    pub shared: SharedCounters,
    /// Other stations it saw speaking for a VIP.
    pub claims: Vec<Claim>,
    /// Real servers' answers to DR probes it saw (the most recent).
    pub probe_answers: Vec<ProbeAnswer>,
}

/// A worker's part in the group's state sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedCounters {
    /// Its outbox's.
    pub outbox: OutboxCounters,
    /// The peers' entries it installed or kept out.
    pub installed: Installed,
}

/// Entries that found a full table and were not recorded, per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableFull {
    /// The flow table.
    pub flows: u64,
    /// The persistence table.
    pub persistence: u64,
    /// The fragment table.
    pub fragments: u64,
}

/// Loop tuning.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSettings {
    /// Frames taken off RX (and put on TX) per batch.
    pub batch_size: usize,
    /// Empty polls in a row before the worker sleeps on the socket instead of spinning.
    pub idle_polls_before_sleep: u32,
    /// ...and milliseconds since it last carried traffic: a worker that carries traffic keeps
    /// spinning through short gaps instead of paying a sleep and a wake-up (a halted vCPU, a
    /// deep C-state) on each. A worker that has been idle longer goes back to sleep at once
    /// after each wake-up, so idle costs the same as without it.
    pub spin_after_traffic_ms: u64,
    /// Carrying traffic is receiving at least this many frames within `spin_after_traffic_ms`.
    /// A few frames (an ARP question, the DR check's answers, a client's keepalive) wake the
    /// worker but do not keep it spinning: below a few thousand frames a second, a wake-up
    /// per frame costs less than a spinning core.
    pub frames_to_spin: u64,
    /// How long one sleep lasts at most. A command or the stop flag wakes a sleeping worker at
    /// once (its doorbell); the bound is for what falls due by the clock: the sweep of expired
    /// entries and the periodic walk that shares the tables with the group.
    pub sleep_ms: i32,
    /// The same while such a walk is under way (each wake-up walks a bounded number of slots)
    /// or frames wait in the TX ring (in copy mode the kernel sends a batch per wake-up).
    pub short_sleep_ms: i32,
    /// Never sleep (`engine.polling = "busy"`).
    pub busy_poll: bool,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            batch_size: 64,
            idle_polls_before_sleep: 1024,
            spin_after_traffic_ms: 50,
            // 5,120 frames a second.
            frames_to_spin: 256,
            // Ten wake-ups a second when idle: each costs tens of microseconds of CPU on a VM
            // (a timer, a halted vCPU woken), and a change does not wait for them.
            sleep_ms: 100,
            short_sleep_ms: 10,
            busy_poll: false,
        }
    }
}

/// Whether a worker carries traffic, for adaptive polling: frames counted per window of
/// `spin_after_traffic_ms`.
#[derive(Debug, Default, Clone, Copy)]
struct TrafficWindow {
    started_ms: u64,
    frames: u64,
    /// Until when it spins: a window's length after its count reached `frames_to_spin`.
    spin_until_ms: u64,
}

impl TrafficWindow {
    fn received(&mut self, frames: usize, now_ms: u64, settings: &WorkerSettings) {
        if now_ms.saturating_sub(self.started_ms) >= settings.spin_after_traffic_ms {
            self.started_ms = now_ms;
            self.frames = 0;
        }
        self.frames += frames as u64;
        if self.frames >= settings.frames_to_spin {
            self.spin_until_ms = now_ms + settings.spin_after_traffic_ms;
        }
    }

    fn spinning(&self, now_ms: u64) -> bool {
        now_ms < self.spin_until_ms
    }
}

/// One queue's worker: rings, dataplane and frame bookkeeping.
#[derive(Debug)]
pub struct Worker<R: Rings> {
    rings: R,
    dataplane: Dataplane,
    settings: WorkerSettings,
    free: Vec<R::Frame>,
    total_frames: usize,
    in_fill: usize,
    in_tx: usize,
    rx_batch: Vec<R::Frame>,
    tx_batch: Vec<R::Frame>,
    idle_polls: u32,
    installed: Installed,
}

impl<R: Rings> Worker<R> {
    /// Takes every frame of `rings` and lends as many as fit to the fill ring.
    pub fn new(mut rings: R, dataplane: Dataplane, settings: WorkerSettings) -> Worker<R> {
        let free = rings.take_frames();
        let total_frames = free.len();
        let batch_size = settings.batch_size.max(1);
        let mut worker = Worker {
            rings,
            dataplane,
            settings: WorkerSettings {
                batch_size,
                ..settings
            },
            free,
            total_frames,
            in_fill: 0,
            in_tx: 0,
            rx_batch: Vec::with_capacity(batch_size),
            tx_batch: Vec::with_capacity(batch_size),
            idle_polls: 0,
            installed: Installed::default(),
        };
        worker.refill();
        worker
    }

    /// The dataplane (and its counters).
    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }

    /// The rings.
    pub fn rings(&self) -> &R {
        &self.rings
    }

    /// The rings, for a harness that plays the kernel's side of them (benchmarks).
    pub fn rings_mut(&mut self) -> &mut R {
        &mut self.rings
    }

    /// True when free + lent for RX + in flight on TX is exactly the UMEM's frame count.
    pub fn frames_accounted(&self) -> bool {
        self.free.len() + self.in_fill + self.in_tx == self.total_frames
    }

    /// (free, in fill ring, in TX) for logs and tests.
    pub fn frame_census(&self) -> (usize, usize, usize) {
        (self.free.len(), self.in_fill, self.in_tx)
    }

    /// One batch at time `now_ms`: reclaim, receive, process, transmit, refill. Returns frames
    /// received.
    pub fn poll_once(&mut self, now_ms: u64) -> usize {
        self.reclaim();
        let received = self
            .rings
            .receive(&mut self.rx_batch, self.settings.batch_size);
        self.in_fill -= received;
        let Worker {
            rings,
            dataplane,
            rx_batch,
            tx_batch,
            free,
            ..
        } = self;
        for mut frame in rx_batch.drain(..) {
            let verdict = rings.with_payload(&mut frame, |bytes| dataplane.process(bytes, now_ms));
            match verdict {
                Verdict::Transmit => tx_batch.push(frame),
                Verdict::Drop(_) => free.push(frame),
            }
        }
        self.flush_tx(Unsent::Received(now_ms));
        self.refill();
        received
    }

    /// Applies one command from the control side.
    pub fn apply(&mut self, command: WorkerCommand, now_ms: u64) {
        match command {
            WorkerCommand::Snapshot(snapshot) => self.dataplane.set_snapshot(snapshot),
            WorkerCommand::Announce(mac, vips) => self.announce(mac, &vips),
            WorkerCommand::Probe {
                mac,
                questions,
                probes,
            } => self.probe(mac, &questions, &probes),
            WorkerCommand::Report(reply) => {
                // The asker may have given up waiting; nothing to do then.
                let _ = reply.send(self.report());
            }
            WorkerCommand::Install(entries) => {
                self.installed += self.dataplane.install(&entries, now_ms);
            }
        }
    }

    /// Counters and table figures now.
    pub fn report(&self) -> WorkerReport {
        let dataplane = &self.dataplane;
        let snapshot = dataplane.snapshot();
        let v6_tables = dataplane.tables_v6();
        WorkerReport {
            generation: snapshot.generation,
            counters: dataplane.counters().clone(),
            flows: dataplane.flows().entries() + v6_tables.flows.entries(),
            persistent_clients: dataplane.persistence().entries() + v6_tables.persistence.entries(),
            table_full: TableFull {
                flows: dataplane.flows().full_misses + v6_tables.flows.full_misses,
                persistence: dataplane.persistence().full_misses
                    + v6_tables.persistence.full_misses,
                fragments: dataplane.fragments().full_misses + v6_tables.fragments.full_misses,
            },
            flow_evictions: dataplane.flows().evictions + v6_tables.flows.evictions,
            socket: self.rings.kernel_stats(),
            connections: dataplane.connections(),
            shared: SharedCounters {
                outbox: dataplane.outbox_counters().unwrap_or_default(),
                installed: self.installed,
            },
            claims: dataplane.dr_watch().claims().to_vec(),
            probe_answers: dataplane.dr_watch().answers().copied().collect(),
        }
    }

    /// Polls until `stop` says so, sleeping on the socket and the inbox's doorbell when there
    /// is nothing to do and taking commands between batches (a channel read, no lock).
    /// `applied` receives the generation of each snapshot once the worker uses it. Whoever
    /// sets `stop` wakes the worker through a [`WorkerSender`].
    pub fn run(&mut self, stop: &AtomicBool, inbox: &WorkerInbox, applied: &AtomicU64) {
        let epoch = Instant::now();
        let mut traffic = TrafficWindow::default();
        applied.store(self.dataplane.snapshot().generation, Ordering::Release);
        while !stop.load(Ordering::Relaxed) {
            // One clock read per batch; the flow table's timeouts are seconds long.
            let now_ms = epoch.elapsed().as_millis() as u64;
            // Before the commands: a report taken after a sleep has the sweep's steps the sleep
            // was worth (an expired connection still counts until its slot's turn, within a
            // pass).
            self.dataplane.sweep_expired(now_ms);
            while let Some(command) = inbox.try_recv() {
                self.apply(command, now_ms);
                applied.store(self.dataplane.snapshot().generation, Ordering::Release);
            }
            // In a group: a step of the walk that offers the tables to the peers, when due.
            self.dataplane.share(now_ms);
            let received = self.poll_once(now_ms);
            if received > 0 {
                self.idle_polls = 0;
                traffic.received(received, now_ms, &self.settings);
                continue;
            }
            self.idle_polls = self.idle_polls.saturating_add(1);
            if self.in_tx > 0 {
                // Frames still waiting on TX: make sure the kernel is working on them.
                self.rings.kick();
            }
            if !self.settings.busy_poll
                && self.idle_polls >= self.settings.idle_polls_before_sleep
                && !traffic.spinning(now_ms)
            {
                self.sleep(stop, inbox);
            }
        }
    }

    /// Sleeps on the socket and the doorbell, unless work came in after the last look.
    fn sleep(&mut self, stop: &AtomicBool, inbox: &WorkerInbox) {
        let timeout_ms = if self.dataplane.sharing_walk_under_way() || self.in_tx > 0 {
            self.settings.short_sleep_ms
        } else {
            self.settings.sleep_ms
        };
        inbox.doorbell.going_to_sleep();
        // What a sender handed over before it could see the worker asleep is seen here.
        if inbox.commands.is_empty()
            && !stop.load(Ordering::Relaxed)
            && !self.dataplane.sharing_walk_requested()
        {
            self.rings.wait_for_rx(timeout_ms, &inbox.doorbell);
        }
        inbox.doorbell.awake();
    }

    /// Sends a gratuitous ARP for each IPv4 VIP, and an unsolicited Neighbor Advertisement for
    /// each IPv6 one, from `mac`, from free frames.
    pub fn announce(&mut self, mac: [u8; 6], vips: &[IpAddr]) {
        self.reclaim();
        let mut arp = [0u8; MIN_FRAME_LEN];
        let mut na = [0u8; UNSOLICITED_NA_LEN];
        for vip in vips {
            let written = match vip {
                IpAddr::V4(v4) => {
                    let len = write_gratuitous_arp(&mut arp, mac, v4.octets());
                    &arp[..len]
                }
                IpAddr::V6(v6) => {
                    let len = write_unsolicited_na(&mut na, mac, v6.octets());
                    &na[..len]
                }
            };
            if !self.emit(written) {
                break;
            }
            let counters = self.dataplane.counters_mut();
            match vip {
                IpAddr::V4(_) => counters.gratuitous_arps += 1,
                IpAddr::V6(_) => counters.unsolicited_nas += 1,
            }
        }
        self.flush_tx(Unsent::Generated);
    }

    /// Sends the DR check's questions ("who has this VIP?" from this host's address) and its
    /// probes of real servers, from free frames.
    pub fn probe(&mut self, mac: [u8; 6], questions: &[(IpAddr, IpAddr)], probes: &[ServerProbe]) {
        self.reclaim();
        let mut buf = [0u8; PROBE_FRAME_LEN];
        for &(source, vip) in questions {
            let len = drcheck::write_question(&mut buf, mac, source, vip);
            if len > 0 && !self.emit(&buf[..len]) {
                break;
            }
            self.dataplane.counters_mut().dr_probes += u64::from(len > 0);
        }
        for probe in probes {
            let len = drcheck::write_probe(&mut buf, mac, probe);
            if len > 0 && !self.emit(&buf[..len]) {
                break;
            }
            self.dataplane.counters_mut().dr_probes += u64::from(len > 0);
        }
        self.flush_tx(Unsent::Generated);
    }

    /// Queues a frame the worker wrote for transmission; false when no frame is free.
    fn emit(&mut self, bytes: &[u8]) -> bool {
        let Some(mut frame) = self.free.pop() else {
            return false;
        };
        self.rings.write(&mut frame, bytes);
        self.tx_batch.push(frame);
        if self.tx_batch.len() == self.settings.batch_size {
            self.flush_tx(Unsent::Generated);
        }
        true
    }

    fn reclaim(&mut self) {
        if self.in_tx == 0 {
            return;
        }
        let want = self.in_tx.min(self.settings.batch_size * 4);
        let done = self.rings.reclaim(&mut self.free, want);
        self.in_tx -= done;
    }

    /// Queues the TX batch; what the ring has no room for is recycled and counted as `unsent`
    /// says.
    fn flush_tx(&mut self, unsent: Unsent) {
        if self.tx_batch.is_empty() {
            return;
        }
        self.in_tx += self.rings.transmit(&mut self.tx_batch);
        // A full TX ring: in copy mode the kernel only sends when woken, a bounded number of
        // frames per wakeup, so wake it, take back what it completed, and try again.
        let mut tries = 0;
        while !self.tx_batch.is_empty() && tries < MAX_TX_RETRIES {
            self.rings.kick();
            self.reclaim();
            self.in_tx += self.rings.transmit(&mut self.tx_batch);
            tries += 1;
        }
        if self.in_tx > 0 {
            // Have the kernel work on what is queued now, not at the next idle poll.
            self.rings.kick();
        }
        // What did not fit is recycled: its count is taken back and the drop counted instead,
        // so that every received frame ends in exactly one counter.
        for mut frame in self.tx_batch.drain(..) {
            match unsent {
                Unsent::Received(now_ms) => {
                    let dataplane = &mut self.dataplane;
                    self.rings
                        .with_payload(&mut frame, |bytes| dataplane.unsend(bytes, now_ms));
                    dataplane.counters_mut().drop(DropReason::TxRingFull);
                }
                Unsent::Generated => {
                    let sent = self
                        .rings
                        .with_payload(&mut frame, |bytes| generated(bytes));
                    self.dataplane.counters_mut().unsend(sent, 0);
                }
            }
            self.free.push(frame);
        }
    }

    fn refill(&mut self) {
        if self.free.is_empty() {
            return;
        }
        // Keep a few frames back for frames the worker originates (gratuitous ARP).
        let keep = self.settings.batch_size.min(self.free.len());
        let lendable = self.free.len() - keep;
        if lendable == 0 {
            return;
        }
        self.in_fill += self.rings.fill(&mut self.free, lendable);
    }
}

#[cfg(test)]
mod tests;

/// What a frame the worker wrote was counted as: an announcement (a gratuitous ARP, an
/// unsolicited Neighbor Advertisement) or a DR check question or probe.
fn generated(bytes: &[u8]) -> Sent {
    match bytes.get(12..14) {
        // Sender = target: an announcement; else a question.
        Some([0x08, 0x06]) if bytes.get(28..32) == bytes.get(38..42) => Sent::GratuitousArp,
        Some([0x86, 0xdd]) if bytes.get(54) == Some(&136) => Sent::UnsolicitedNa,
        _ => Sent::DrProbe,
    }
}
