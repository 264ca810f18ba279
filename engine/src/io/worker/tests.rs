//! The worker loop against a fake set of rings in plain memory: frames forwarded, answered
//! and dropped, and not one UMEM frame lost or duplicated whatever the kernel side does.

use super::*;
use crate::packet::dataplane::TableSizes;
use crate::packet::snapshot::{AdminState, ServiceIds, Snapshot};
use etherparse::PacketBuilder;
use lbd_config::Config;
use proptest::prelude::*;
use std::collections::{HashSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

const OWN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const RS_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];

/// A fake socket: a UMEM of `Vec<u8>` frames and bounded rings; the test plays the kernel.
#[derive(Debug)]
struct FakeRings {
    umem: Vec<Vec<u8>>,
    fill: VecDeque<usize>,
    rx: VecDeque<usize>,
    tx: VecDeque<usize>,
    completion: VecDeque<usize>,
    capacity: usize,
    handed_out: bool,
    sent: Vec<Vec<u8>>,
    /// Copy mode: a kick sends up to this many frames (the kernel's TX batch); 0: the "NIC"
    /// sends only when the test says so.
    sends_per_kick: usize,
    /// Receive calls (one per poll) and sleeps on the socket.
    polls: usize,
    waits: usize,
    /// Sleeps begun, for a test on another thread.
    sleeps_begun: Arc<AtomicUsize>,
    /// A sleep lasts until the doorbell rings or its timeout passes, as on a socket; otherwise
    /// it only counts.
    sleeps_on_the_bell: bool,
    /// Raises the flag once this many polls have been made, to end `Worker::run`.
    stop_after: Option<(usize, Arc<AtomicBool>)>,
}

impl FakeRings {
    fn new(frames: usize, capacity: usize) -> FakeRings {
        FakeRings {
            umem: vec![Vec::new(); frames],
            fill: VecDeque::new(),
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            completion: VecDeque::new(),
            capacity,
            handed_out: false,
            sent: Vec::new(),
            sends_per_kick: 0,
            polls: 0,
            waits: 0,
            sleeps_begun: Arc::new(AtomicUsize::new(0)),
            sleeps_on_the_bell: false,
            stop_after: None,
        }
    }

    /// The "NIC" receives a frame into the next fill-ring frame; false if none was lent.
    fn arrive(&mut self, bytes: &[u8]) -> bool {
        if self.rx.len() == self.capacity {
            return false;
        }
        let Some(frame) = self.fill.pop_front() else {
            return false;
        };
        self.umem[frame] = bytes.to_vec();
        self.rx.push_back(frame);
        true
    }

    /// The "NIC" sends up to `n` frames from TX and posts them on completion.
    fn send(&mut self, n: usize) {
        for _ in 0..n {
            if self.completion.len() == self.capacity {
                return;
            }
            let Some(frame) = self.tx.pop_front() else {
                return;
            };
            self.sent.push(self.umem[frame].clone());
            self.completion.push_back(frame);
        }
    }

    /// Frames held by the kernel side, for the no-duplicate check.
    fn kernel_held(&self) -> Vec<usize> {
        self.fill
            .iter()
            .chain(&self.rx)
            .chain(&self.tx)
            .chain(&self.completion)
            .copied()
            .collect()
    }
}

/// A fake UMEM frame: its index, owned like the real thing (not `Copy`, not `Clone`).
#[derive(Debug, PartialEq, Eq)]
struct FakeFrame(usize);

impl Rings for FakeRings {
    type Frame = FakeFrame;

    fn take_frames(&mut self) -> Vec<FakeFrame> {
        assert!(!self.handed_out, "frames handed out twice");
        self.handed_out = true;
        (0..self.umem.len()).map(FakeFrame).collect()
    }

    fn reclaim(&mut self, out: &mut Vec<FakeFrame>, max: usize) -> usize {
        let n = max.min(self.completion.len());
        out.extend(self.completion.drain(..n).map(FakeFrame));
        n
    }

    fn fill(&mut self, frames: &mut Vec<FakeFrame>, max: usize) -> usize {
        let n = max.min(frames.len()).min(self.capacity - self.fill.len());
        let start = frames.len() - n;
        self.fill.extend(frames.drain(start..).map(|f| f.0));
        n
    }

    fn receive(&mut self, out: &mut Vec<FakeFrame>, max: usize) -> usize {
        self.polls += 1;
        if let Some((limit, stop)) = &self.stop_after
            && self.polls >= *limit
        {
            stop.store(true, Ordering::Relaxed);
        }
        let n = max.min(self.rx.len());
        out.extend(self.rx.drain(..n).map(FakeFrame));
        n
    }

    fn with_payload<T>(&mut self, frame: &mut FakeFrame, f: impl FnOnce(&mut [u8]) -> T) -> T {
        f(&mut self.umem[frame.0])
    }

    fn write(&mut self, frame: &mut FakeFrame, bytes: &[u8]) {
        self.umem[frame.0] = bytes.to_vec();
    }

    fn transmit(&mut self, frames: &mut Vec<FakeFrame>) -> usize {
        let n = frames.len().min(self.capacity - self.tx.len());
        self.tx.extend(frames.drain(..n).map(|f| f.0));
        n
    }

    fn kick(&mut self) {
        self.send(self.sends_per_kick);
    }

    fn wait_for_rx(&mut self, timeout_ms: i32, doorbell: &Doorbell) {
        self.waits += 1;
        self.sleeps_begun.fetch_add(1, Ordering::SeqCst);
        if self.sleeps_on_the_bell {
            doorbell.wait(timeout_ms);
        }
    }
}

fn dataplane() -> Dataplane {
    let config = Config::from_toml_str(
        r#"
        [engine]
        interface = "eth0"
        queues = [0]
        [[service]]
        label = "web"
        vip = "198.18.0.100"
        ports = 8088
        table_size = 251
        [[service.real_server]]
        label = "rs1"
        ip = "198.18.0.11"
        mac = "02:00:00:00:00:11"
        "#,
    )
    .expect("valid config");
    Dataplane::new(
        Arc::new(Snapshot::build(
            &config,
            &mut ServiceIds::default(),
            OWN_MAC,
            1,
            |_| None,
            |_, _| AdminState::Online,
        )),
        TableSizes::default(),
    )
}

fn syn(client: u8, dport: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], OWN_MAC)
        .ipv4([198, 18, 1, client], [198, 18, 0, 100], 64)
        .tcp(40000, dport, 1, 1000)
        .syn();
    let mut frame = Vec::new();
    builder.write(&mut frame, &[]).expect("write");
    frame
}

/// Runs a worker (100 empty polls before a sleep, a minute's spin window after 4 frames) for
/// 5000 polls, with `arrivals` on its RX ring at the start.
fn run_for_5000_polls(busy_poll: bool, arrivals: &[Vec<u8>]) -> Worker<FakeRings> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut rings = FakeRings::new(64, 32);
    rings.stop_after = Some((5_000, Arc::clone(&stop)));
    let settings = WorkerSettings {
        batch_size: 8,
        idle_polls_before_sleep: 100,
        spin_after_traffic_ms: 60_000,
        frames_to_spin: 4,
        busy_poll,
        ..WorkerSettings::default()
    };
    let mut worker = Worker::new(rings, dataplane(), settings);
    for frame in arrivals {
        assert!(worker.rings.arrive(frame));
    }
    let (_commands, inbox) = worker_channel().expect("eventfd");
    worker.run(&stop, &inbox, &AtomicU64::new(0));
    worker
}

/// Waits (at most 20 s) until `done` holds; false if it never did.
fn within_20_s(done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// A worker asleep for want of work takes a command, and sees the stop flag, as soon as its
/// sender rings: each sleep here would last a minute otherwise.
#[test]
fn a_command_or_the_stop_flag_wakes_a_sleeping_worker() {
    let stop = Arc::new(AtomicBool::new(false));
    let mut rings = FakeRings::new(64, 32);
    rings.sleeps_on_the_bell = true;
    let sleeps = Arc::clone(&rings.sleeps_begun);
    let settings = WorkerSettings {
        idle_polls_before_sleep: 1,
        sleep_ms: 60_000,
        short_sleep_ms: 60_000,
        ..WorkerSettings::default()
    };
    let mut worker = Worker::new(rings, dataplane(), settings);
    let next = Arc::new(Snapshot {
        generation: worker.dataplane().snapshot().generation + 1,
        ..(**worker.dataplane().snapshot()).clone()
    });
    let (sender, inbox) = worker_channel().expect("eventfd");
    let applied = Arc::new(AtomicU64::new(0));
    let thread = {
        let (stop, applied) = (Arc::clone(&stop), Arc::clone(&applied));
        std::thread::spawn(move || worker.run(&stop, &inbox, &applied))
    };
    assert!(
        within_20_s(|| sleeps.load(Ordering::SeqCst) == 1),
        "never slept"
    );
    sender
        .send(WorkerCommand::Snapshot(Arc::clone(&next)))
        .expect("worker runs");
    assert!(
        within_20_s(|| applied.load(Ordering::Acquire) == next.generation),
        "the snapshot waited for the end of the sleep"
    );
    assert!(
        within_20_s(|| sleeps.load(Ordering::SeqCst) == 2),
        "never slept again"
    );
    stop.store(true, Ordering::Relaxed);
    sender.wake();
    assert!(
        within_20_s(|| thread.is_finished()),
        "the stop flag waited for the end of the sleep"
    );
    thread.join().expect("worker thread");
}

/// Adaptive polling sleeps on the socket once a run of empty polls has gone by (with no
/// traffic yet, the spin window does not apply); busy polling never sleeps.
#[test]
fn an_idle_worker_sleeps_only_when_polling_is_adaptive() {
    // Every empty poll from the 100th on ends in a sleep, but the last: it raised the stop
    // flag, and a worker told to stop does not sleep.
    assert_eq!(run_for_5000_polls(false, &[]).rings().waits, 5_000 - 100);
    assert_eq!(run_for_5000_polls(true, &[]).rings().waits, 0);
}

/// A worker that has just carried traffic keeps spinning through a gap shorter than
/// `spin_after_traffic_ms` instead of sleeping (waking a core can outlast the RX ring).
#[test]
fn a_worker_with_recent_traffic_spins_through_a_gap() {
    let traffic: Vec<Vec<u8>> = (1..=4).map(|client| syn(client, 8088)).collect();
    let worker = run_for_5000_polls(false, &traffic);
    assert_eq!(worker.dataplane().counters().rx_frames, 4);
    assert_eq!(worker.rings().waits, 0);
}

/// Traffic is a rate: `frames_to_spin` frames within one window, not in total; the spin lasts a
/// window's length from the frame that made the count.
#[test]
fn carrying_traffic_is_enough_frames_within_a_window() {
    let settings = WorkerSettings::default();
    let (window, enough) = (settings.spin_after_traffic_ms, settings.frames_to_spin);
    let mut traffic = TrafficWindow::default();
    traffic.received(enough as usize - 1, 0, &settings);
    assert!(!traffic.spinning(0));
    // The window is over: the next frames start a count of their own.
    traffic.received(enough as usize - 1, window, &settings);
    assert!(!traffic.spinning(window));
    traffic.received(1, window + 10, &settings);
    assert!(traffic.spinning(window + 10));
    assert!(traffic.spinning(2 * window + 9));
    assert!(!traffic.spinning(2 * window + 10));
}

/// Fewer frames than `frames_to_spin` (the DR check's answers, an ARP question) are not
/// traffic: the worker handles them and goes back to sleep after its run of empty polls.
#[test]
fn a_few_frames_do_not_keep_a_worker_spinning() {
    let few: Vec<Vec<u8>> = (1..=3).map(|client| syn(client, 8088)).collect();
    let worker = run_for_5000_polls(false, &few);
    assert_eq!(worker.dataplane().counters().rx_frames, 3);
    // The first poll took the frames; every empty poll from the 100th after it sleeps, but the
    // last, which raised the stop flag.
    assert_eq!(worker.rings().waits, 5_000 - 101);
}

fn settings(batch_size: usize) -> WorkerSettings {
    WorkerSettings {
        batch_size,
        ..WorkerSettings::default()
    }
}

/// Every frame is in exactly one place, and the places add up.
fn assert_conserved(worker: &Worker<FakeRings>) {
    assert!(
        worker.frames_accounted(),
        "census {:?}",
        worker.frame_census()
    );
    let mut seen = HashSet::new();
    for frame in worker
        .free
        .iter()
        .map(|f| f.0)
        .chain(worker.rings.kernel_held())
    {
        assert!(seen.insert(frame), "frame {frame} is in two places");
    }
    assert_eq!(seen.len(), worker.rings.umem.len(), "a frame is missing");
    let (_, in_fill, in_tx) = worker.frame_census();
    assert_eq!(in_fill, worker.rings.fill.len() + worker.rings.rx.len());
    assert_eq!(in_tx, worker.rings.tx.len() + worker.rings.completion.len());
}

#[test]
fn forwards_and_drops_through_the_rings() {
    let mut worker = Worker::new(FakeRings::new(64, 16), dataplane(), settings(8));
    assert_conserved(&worker);
    assert!(worker.rings.arrive(&syn(1, 8088)));
    assert!(worker.rings.arrive(&syn(2, 22)));
    assert_eq!(worker.poll_once(0), 2);
    assert_conserved(&worker);
    worker.rings.send(10);
    worker.poll_once(0);
    assert_conserved(&worker);
    assert_eq!(worker.rings.sent.len(), 1);
    assert_eq!(worker.rings.sent[0][0..6], RS_MAC);
    let counters = worker.dataplane().counters();
    assert_eq!(counters.forwarded.packets, 1);
    assert_eq!(counters.drops_for(DropReason::PortNotServed), 1);
}

#[test]
fn full_tx_ring_recycles_and_counts() {
    let mut worker = Worker::new(FakeRings::new(64, 4), dataplane(), settings(4));
    for client in 1..=4 {
        assert!(worker.rings.arrive(&syn(client, 8088)));
    }
    worker.poll_once(0);
    // The TX ring (4) is now full and the "NIC" sends nothing.
    for client in 5..=8 {
        assert!(worker.rings.arrive(&syn(client, 8088)));
    }
    worker.poll_once(0);
    assert_conserved(&worker);
    let counters = worker.dataplane().counters();
    assert_eq!(counters.drops_for(DropReason::TxRingFull), 4);
    // Each frame in one counter: the four recycled ones are drops, not forwarded too, and
    // their real servers' counts do not include them.
    assert_eq!(counters.forwarded.packets, 4);
    assert_eq!(counters.accounted_frames(), counters.rx_frames);
    let per_server: u64 = counters.services[0]
        .real_servers
        .iter()
        .map(|t| t.packets)
        .sum();
    assert_eq!(per_server, 4);
    assert_eq!(counters.services[0].total.packets, 4);
}

#[test]
fn gratuitous_arp_goes_out_for_every_vip() {
    let mut worker = Worker::new(FakeRings::new(64, 16), dataplane(), settings(8));
    let vips = [
        Ipv4Addr::new(198, 18, 0, 100).into(),
        Ipv4Addr::new(198, 18, 0, 101).into(),
    ];
    worker.announce(OWN_MAC, &vips);
    worker.rings.send(10);
    assert_eq!(worker.rings.sent.len(), 2);
    assert_eq!(worker.rings.sent[1][38..42], [198, 18, 0, 101]);
    worker.poll_once(0);
    assert_conserved(&worker);
    assert_eq!(worker.dataplane().counters().gratuitous_arps, 2);
}

#[test]
fn announcements_questions_and_probes_go_out_and_are_counted_by_kind() {
    use crate::packet::drcheck::ServerProbe;
    let mut worker = Worker::new(FakeRings::new(64, 16), dataplane(), settings(8));
    let vip: std::net::IpAddr = Ipv4Addr::new(198, 18, 0, 100).into();
    let vip6: std::net::IpAddr = "2001:2::100".parse().expect("address");
    worker.announce(OWN_MAC, &[vip, vip6]);
    let source: std::net::IpAddr = Ipv4Addr::new(198, 18, 0, 2).into();
    let probe = ServerProbe {
        vip,
        port: 1935,
        mac: [2, 0, 0, 0, 0, 0x11],
        source,
        our_port: 61000,
        seq: 7,
    };
    worker.probe(OWN_MAC, &[(source, vip)], &[probe]);
    worker.rings.send(10);
    let sent = worker.rings.sent.clone();
    assert_eq!(sent.len(), 4);
    // A gratuitous ARP, an unsolicited NA (to all nodes), an ARP question, a SYN.
    assert_eq!(sent[0][12..14], [0x08, 0x06]);
    assert_eq!(sent[1][0..6], [0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!(sent[2][28..32], [198, 18, 0, 2]);
    assert_eq!(sent[3][0..6], [2, 0, 0, 0, 0, 0x11]);
    worker.poll_once(0);
    assert_conserved(&worker);
    let counters = worker.dataplane().counters();
    assert_eq!(
        (
            counters.gratuitous_arps,
            counters.unsolicited_nas,
            counters.dr_probes
        ),
        (1, 1, 2)
    );
    // What a full TX ring sends back is uncounted as what it was.
    assert_eq!(super::generated(&sent[0]), Sent::GratuitousArp);
    assert_eq!(super::generated(&sent[1]), Sent::UnsolicitedNa);
    assert_eq!(super::generated(&sent[2]), Sent::DrProbe);
    assert_eq!(super::generated(&sent[3]), Sent::DrProbe);
}

#[derive(Debug, Clone)]
enum Step {
    Arrive(u8, bool),
    Send(usize),
    Poll,
    Announce,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<u8>(), any::<bool>()).prop_map(|(c, served)| Step::Arrive(c, served)),
        (0usize..20).prop_map(Step::Send),
        Just(Step::Poll),
        Just(Step::Announce),
    ]
}

proptest! {
    /// Whatever order frames arrive, get sent and get polled in, with rings smaller or larger
    /// than the batch, no frame is ever lost or duplicated, and every received frame is counted
    /// exactly once.
    #[test]
    fn no_frame_is_ever_lost(
        frames in 8usize..80,
        capacity in 1usize..24,
        batch in 1usize..16,
        steps in prop::collection::vec(step(), 1..300),
    ) {
        let mut worker = Worker::new(FakeRings::new(frames, capacity), dataplane(), settings(batch));
        let mut arrived = 0u64;
        for step in steps {
            match step {
                Step::Arrive(client, served) => {
                    if worker.rings.arrive(&syn(client, if served { 8088 } else { 9 })) {
                        arrived += 1;
                    }
                }
                Step::Send(n) => worker.rings.send(n),
                Step::Poll => { worker.poll_once(0); }
                Step::Announce => worker.announce(OWN_MAC, &[Ipv4Addr::new(198, 18, 0, 100).into()]),
            }
            assert_conserved(&worker);
        }
        // Drain: the "NIC" sends everything and the worker takes every frame back.
        for _ in 0..(frames * 4) {
            worker.rings.send(frames);
            worker.poll_once(0);
        }
        assert_conserved(&worker);
        let counters = worker.dataplane().counters();
        prop_assert_eq!(counters.rx_frames, arrived);
        // Every frame in exactly one counter: one that found the TX ring full is a drop only.
        prop_assert_eq!(counters.accounted_frames(), arrived);
        prop_assert_eq!(worker.frame_census().2, 0, "TX fully drained");
    }
}

/// Copy mode under a flood: the kernel sends 32 frames per wakeup and nothing on its own; the
/// worker must keep waking it, or TX stalls with a full ring.
#[test]
fn copy_mode_keeps_transmitting_under_sustained_load() {
    let mut rings = FakeRings::new(4096, 2048);
    rings.sends_per_kick = 32;
    let mut worker = Worker::new(rings, dataplane(), settings(64));
    let mut arrived = 0;
    for round in 0..400u32 {
        for client in 0..64u32 {
            if worker.rings.arrive(&syn((round * 64 + client) as u8, 8088)) {
                arrived += 1;
            }
        }
        worker.poll_once(0);
        assert_conserved(&worker);
    }
    let counters = worker.dataplane().counters();
    assert_eq!(
        counters.drops_for(DropReason::TxRingFull),
        0,
        "no frame recycled"
    );
    assert_eq!(counters.forwarded.packets, arrived);
    assert!(
        worker.rings.sent.len() as u64 >= arrived - 2048,
        "{} of {arrived} sent",
        worker.rings.sent.len()
    );
}
