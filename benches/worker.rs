//! Criterion benchmark of lbd's whole userspace path per frame, without a kernel: the worker
//! loop ([`Worker::poll_once`]: completion reclaim, RX, the dataplane, TX, fill-ring refill)
//! over AF_XDP-shaped rings in plain memory, beside the dataplane core alone on the same frames.
//!
//! `cargo bench -p lbd-engine --bench worker`. The UMEM, ring sizes and batch are lbd's
//! defaults, as the config gives them (`frame_count`, `frame_size`, `ring_size`,
//! `batch_size`). The frames are the dataplane bench's warm path: TCP segments of 4096
//! connections from 4096 clients, in the flow and persistence tables after a first pass.
//! Between batches, untimed, the bench plays the NIC: it takes frames off the fill ring, writes
//! a received frame into each and posts them on RX, and moves what the worker queued on TX to
//! the completion ring. What is timed is the worker's part alone, so the figure bounds lbd on
//! a zero-copy NIC, where the kernel's share of a frame is a descriptor write. Every frame must
//! come out on TX. The core row processes the same frames the same way: each batch written
//! into UMEM frames (the next ones round the UMEM, as the fill ring hands them out) just before
//! it is timed.
//!
//! The report row times [`Worker::report`] (what `lbctl status`, the metrics and the
//! `max_connections` check ask every worker for, every 200 ms while a limit is set) with 65,536
//! established connections in the flow table: its per-server connection counts.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use lbd_config::{Config, Engine};
use lbd_engine::io::doorbell::Doorbell;
use lbd_engine::io::worker::{Rings, Worker, WorkerSettings};
use lbd_engine::packet::dataplane::{Dataplane, Verdict};
use lbd_engine::packet::testing;
use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

const OWN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENTS: usize = 4096;

/// A UMEM frame: its offset in the UMEM and the length of what it holds. Owned, like the
/// daemon's, so the worker cannot hand one out twice.
#[derive(Debug)]
struct Frame {
    offset: usize,
    len: usize,
}

/// Four bounded rings and a UMEM in memory, as an AF_XDP socket lays them out.
#[derive(Debug)]
struct MemoryRings {
    frame_size: usize,
    frame_count: usize,
    ring_size: usize,
    umem: Vec<u8>,
    fill: VecDeque<Frame>,
    rx: VecDeque<Frame>,
    tx: VecDeque<Frame>,
    completion: VecDeque<Frame>,
}

impl MemoryRings {
    fn new(engine: &Engine) -> MemoryRings {
        let ring_size = engine.ring_size as usize;
        MemoryRings {
            frame_size: engine.frame_size as usize,
            frame_count: engine.frame_count as usize,
            ring_size,
            umem: vec![0; engine.frame_size as usize * engine.frame_count as usize],
            fill: VecDeque::with_capacity(ring_size),
            rx: VecDeque::with_capacity(ring_size),
            tx: VecDeque::with_capacity(ring_size),
            completion: VecDeque::with_capacity(ring_size),
        }
    }

    /// The NIC receives `frames` into fill-ring frames; returns how many found one.
    fn arrive<'a>(&mut self, frames: impl Iterator<Item = &'a [u8]>) -> usize {
        let mut arrived = 0;
        for bytes in frames {
            if self.rx.len() == self.ring_size {
                break;
            }
            let Some(mut frame) = self.fill.pop_front() else {
                break;
            };
            self.umem[frame.offset..frame.offset + bytes.len()].copy_from_slice(bytes);
            frame.len = bytes.len();
            self.rx.push_back(frame);
            arrived += 1;
        }
        arrived
    }

    /// The NIC sends everything on TX; returns how many frames.
    fn send_all(&mut self) -> usize {
        let sent = self.tx.len();
        self.completion.extend(self.tx.drain(..));
        sent
    }
}

impl Rings for MemoryRings {
    type Frame = Frame;

    fn take_frames(&mut self) -> Vec<Frame> {
        (0..self.frame_count)
            .map(|i| Frame {
                offset: i * self.frame_size,
                len: 0,
            })
            .collect()
    }

    fn reclaim(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        let n = max.min(self.completion.len());
        out.extend(self.completion.drain(..n));
        n
    }

    fn fill(&mut self, frames: &mut Vec<Frame>, max: usize) -> usize {
        let n = max.min(self.ring_size - self.fill.len()).min(frames.len());
        self.fill.extend(frames.drain(frames.len() - n..));
        n
    }

    fn receive(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        let n = max.min(self.rx.len());
        out.extend(self.rx.drain(..n));
        n
    }

    fn with_payload<R>(&mut self, frame: &mut Frame, f: impl FnOnce(&mut [u8]) -> R) -> R {
        f(&mut self.umem[frame.offset..frame.offset + frame.len])
    }

    fn write(&mut self, frame: &mut Frame, bytes: &[u8]) {
        self.umem[frame.offset..frame.offset + bytes.len()].copy_from_slice(bytes);
        frame.len = bytes.len();
    }

    fn transmit(&mut self, frames: &mut Vec<Frame>) -> usize {
        let n = (self.ring_size - self.tx.len()).min(frames.len());
        self.tx.extend(frames.drain(..n));
        n
    }

    // A zero-copy NIC needs no wakeup to send, and the bench never waits.
    fn kick(&mut self) {}

    fn wait_for_rx(&mut self, _timeout_ms: i32, _doorbell: &Doorbell) {}
}

/// The dataplane bench's service: 10 real servers with pinned MACs behind VIP:1935; every
/// engine setting at its default.
fn config() -> Config {
    let mut text = String::from(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\n\n[[service]]\nlabel = \"Wowza Streaming\"\n\
         vip = \"198.18.0.100\"\nports = \"1935\"\n",
    );
    for i in 0..10u8 {
        text += &format!(
            "\n[[service.real_server]]\nlabel = \"rs{i}\"\nip = \"198.18.0.{}\"\nmac = \"02:00:00:00:01:{i:02x}\"\n",
            11 + i
        );
    }
    Config::from_toml_str(&text).expect("bench config is valid")
}

fn dataplane(config: &Config) -> Dataplane {
    testing::dataplane(config, OWN_MAC)
}

/// One TCP segment to VIP:1935 from each client.
fn frames() -> Vec<Vec<u8>> {
    (0..CLIENTS)
        .map(|i| {
            let mut frame = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
                .ipv4([198, 19, (i >> 8) as u8, i as u8], [198, 18, 0, 100], 64)
                .tcp(40000 + i as u16, 1935, 1, 64240)
                .syn()
                .write(&mut frame, &[])
                .expect("write");
            frame
        })
        .collect()
}

/// The worker loop, timed batch by batch; the NIC's part between batches is not.
fn worker_loop(c: &mut Criterion) {
    let config = config();
    let batch = config.engine.batch_size as usize;
    let batches = CLIENTS / batch;
    let settings = WorkerSettings {
        batch_size: batch,
        ..WorkerSettings::default()
    };
    let rings = MemoryRings::new(&config.engine);
    let mut worker = Worker::new(rings, dataplane(&config), settings);
    let frames = frames();
    let epoch = Instant::now();
    let mut next = frames.iter().map(Vec::as_slice).cycle();
    // Two passes before timing: every connection in the tables, the rings in their steady
    // state.
    for _ in 0..2 * batches {
        worker.rings_mut().arrive(next.by_ref().take(batch));
        assert_eq!(worker.poll_once(1_000), batch);
        worker.rings_mut().send_all();
    }
    let mut group = c.benchmark_group("worker");
    group.throughput(Throughput::Elements(CLIENTS as u64));
    group.bench_function("loop_over_memory_rings", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let now_ms = 1_000 + epoch.elapsed().as_millis() as u64;
                let mut sent = 0;
                for _ in 0..batches {
                    let arrived = worker.rings_mut().arrive(next.by_ref().take(batch));
                    let start = Instant::now();
                    let received = black_box(worker.poll_once(now_ms));
                    timed += start.elapsed();
                    assert_eq!(
                        received, arrived,
                        "the worker takes every frame that arrived"
                    );
                    sent += worker.rings_mut().send_all();
                }
                assert_eq!(sent, CLIENTS, "every frame forwarded");
            }
            timed
        })
    });
    group.finish();
    assert!(worker.frames_accounted(), "no UMEM frame lost");
}

/// The dataplane core on the same frames, batch by batch in the same UMEM, for the ratio.
fn core_alone(c: &mut Criterion) {
    let config = config();
    let (frame_size, frame_count) = (
        config.engine.frame_size as usize,
        config.engine.frame_count as usize,
    );
    let batch = config.engine.batch_size as usize;
    let frames = frames();
    let mut dp = dataplane(&config);
    for frame in &frames {
        assert_eq!(dp.process(&mut frame.clone(), 1_000), Verdict::Transmit);
    }
    let mut umem = vec![0u8; frame_size * frame_count];
    let mut next_frame = 0;
    let epoch = Instant::now();
    let mut group = c.benchmark_group("worker");
    group.throughput(Throughput::Elements(CLIENTS as u64));
    group.bench_function("dataplane_core_alone", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let now_ms = 1_000 + epoch.elapsed().as_millis() as u64;
                let mut sent = 0;
                for received in frames.chunks(batch) {
                    // The NIC's part: the batch lands in the next UMEM frames.
                    let mut slots = Vec::with_capacity(batch);
                    for bytes in received {
                        let offset = next_frame * frame_size;
                        next_frame = (next_frame + 1) % frame_count;
                        umem[offset..offset + bytes.len()].copy_from_slice(bytes);
                        slots.push(offset..offset + bytes.len());
                    }
                    let start = Instant::now();
                    for slot in slots {
                        let verdict = dp.process(black_box(&mut umem[slot]), now_ms);
                        sent += usize::from(verdict == Verdict::Transmit);
                    }
                    timed += start.elapsed();
                }
                assert_eq!(sent, CLIENTS, "every frame forwarded");
            }
            timed
        })
    });
    group.finish();
}

/// Established connections of the report row: one per client of 198.19.0.0/16.
const CONNECTIONS: usize = 65_536;

/// A SYN or the ACK that completes its handshake, from client `i` to VIP:1935.
fn handshake_frame(i: usize, ack: bool) -> Vec<u8> {
    let mut frame = Vec::new();
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv4([198, 19, (i >> 8) as u8, i as u8], [198, 18, 0, 100], 64)
        .tcp(40000, 1935, 1, 64240);
    let builder = if ack { builder.ack(1) } else { builder.syn() };
    builder.write(&mut frame, &[]).expect("write");
    frame
}

/// A worker's report with [`CONNECTIONS`] established connections on 10 real servers.
fn report(c: &mut Criterion) {
    let config = config();
    let batch = config.engine.batch_size as usize;
    let settings = WorkerSettings {
        batch_size: batch,
        ..WorkerSettings::default()
    };
    let mut worker = Worker::new(
        MemoryRings::new(&config.engine),
        dataplane(&config),
        settings,
    );
    for ack in [false, true] {
        let frames: Vec<Vec<u8>> = (0..CONNECTIONS).map(|i| handshake_frame(i, ack)).collect();
        for chunk in frames.chunks(batch) {
            worker.rings_mut().arrive(chunk.iter().map(Vec::as_slice));
            assert_eq!(worker.poll_once(1_000), chunk.len());
            assert_eq!(worker.rings_mut().send_all(), chunk.len());
        }
    }
    let counted: u64 = worker.report().connections.iter().flatten().sum();
    assert_eq!(counted, CONNECTIONS as u64, "every connection counted");
    let mut group = c.benchmark_group("worker");
    group.bench_function("report_with_65536_connections", |b| {
        b.iter(|| black_box(worker.report()))
    });
    group.finish();
}

criterion_group!(benches, core_alone, worker_loop, report);
criterion_main!(benches);
