//! Criterion benchmarks of the dataplane core alone: frames in memory, no I/O, no kernel.
//!
//! `cargo bench -p lbd-engine --bench dataplane` reports the time per frame for the VIP
//! forwarding path (TCP segments of 4096 connections from 4096 client addresses, so lookups are
//! spread over the tables; after the first pass every connection is in the flow and
//! persistence tables: the warm path) and for the ARP path (requests for the VIP answered),
//! then the same two for IPv6: forwarding to the service's IPv6 VIP (IPv6 has tables of its
//! own) and Neighbor Solicitations for it answered. Those forwarding rows send SYNs; one more
//! row sends what an established connection carries, from 65536 clients (a flow table larger
//! than the CPU's caches): ACKs and 1000-byte data segments on connections whose handshake
//! completed in the warm-up, 4096 of them per iteration, a different 4096 each time.
//! The frames sit in one buffer of 2048-byte frames, as in the worker's UMEM. Every verdict is
//! checked: a change that drops frames fails the benchmark instead of speeding it up.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use etherparse::{Ethernet2Header, IpHeaders, PacketBuilder, PacketBuilderStep};
use lbd_config::Config;
use lbd_engine::packet::dataplane::{Dataplane, Verdict};
use lbd_engine::packet::testing;
use std::hint::black_box;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

const OWN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENTS: usize = 4096;
/// Clients of the established-traffic row: all of 198.19.0.0/16.
const MANY_CLIENTS: usize = 65_536;
/// 2001:2::/48 is IPv6's benchmarking range (RFC 5180), as 198.18.0.0/15 is IPv4's.
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);

fn dataplane() -> Dataplane {
    // The streaming service is dual-stack, as a service on both families is configured.
    let mut text = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\n\n[[service]]\nlabel = \"Wowza Streaming\"\n\
         vip = \"198.18.0.100\"\nvip6 = \"{VIP6}\"\nports = \"1935\"\n\n[[service]]\nlabel = \"Wowza GUI\"\n\
         vip = \"198.18.0.100\"\nports = \"8088\"\n",
    );
    // Ten real servers with pinned MACs on the streaming service.
    let streaming_end = text
        .find("\n\n[[service]]\nlabel = \"Wowza GUI\"")
        .expect("layout");
    let mut servers = String::new();
    for i in 0..10u8 {
        servers += &format!(
            "\n[[service.real_server]]\nlabel = \"rs{i}\"\nip = \"198.18.0.{}\"\nmac = \"02:00:00:00:01:{i:02x}\"\n",
            11 + i
        );
    }
    text.insert_str(streaming_end, &servers);
    let config = Config::from_toml_str(&text).expect("bench config is valid");
    testing::dataplane(&config, OWN_MAC)
}

/// One TCP SYN to VIP:1935 per client; `ip` writes client `i`'s IP header.
fn syn_frames(
    ip: impl Fn(PacketBuilderStep<Ethernet2Header>, usize) -> PacketBuilderStep<IpHeaders>,
) -> Vec<Vec<u8>> {
    (0..CLIENTS)
        .map(|i| {
            let builder = ip(PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC), i)
                .tcp(40000 + i as u16, 1935, 1, 64240)
                .syn();
            let mut frame = Vec::new();
            builder.write(&mut frame, &[]).expect("write");
            frame
        })
        .collect()
}

/// Client `i`'s connection as it runs after the handshake: even clients send a bare ACK,
/// odd ones an ACK with 1000 bytes of data (PSH), as a stream's uplink and an upload do.
fn established_frames() -> Vec<Vec<u8>> {
    (0..MANY_CLIENTS)
        .map(|i| {
            let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
                .ipv4([198, 19, (i >> 8) as u8, i as u8], [198, 18, 0, 100], 64)
                .tcp(40000 + (i % 20000) as u16, 1935, 2, 64240)
                .ack(1);
            let payload = if i % 2 == 1 {
                vec![0x5a; 1000]
            } else {
                Vec::new()
            };
            let builder = if payload.is_empty() {
                builder
            } else {
                builder.psh()
            };
            let mut frame = Vec::new();
            builder.write(&mut frame, &payload).expect("write");
            frame
        })
        .collect()
}

fn arp_frames() -> Vec<Vec<u8>> {
    (0..CLIENTS)
        .map(|i| {
            let mut frame = vec![0u8; 60];
            frame[0..6].copy_from_slice(&[0xff; 6]);
            frame[6..12].copy_from_slice(&CLIENT_MAC);
            frame[12..14].copy_from_slice(&[0x08, 0x06]);
            frame[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
            frame[22..28].copy_from_slice(&CLIENT_MAC);
            frame[28..32].copy_from_slice(&[198, 19, (i >> 8) as u8, i as u8]);
            frame[38..42].copy_from_slice(&[198, 18, 0, 100]);
            frame
        })
        .collect()
}

/// Client `i` of 4096 in 2001:2:1::/64; `persistence_prefix_v6` is 128 by default, so each
/// address is a client of its own, as in IPv4's rows.
fn client6(i: usize) -> [u8; 16] {
    Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, i as u16).octets()
}

/// What a host sends to learn the VIP's MAC, from each client.
fn solicitation_frames() -> Vec<Vec<u8>> {
    (0..CLIENTS)
        .map(|i| {
            testing::neighbor_solicitation(CLIENT_MAC, client6(i), VIP6.octets()).expect("write")
        })
        .collect()
}

/// Bytes per frame in the buffer the frames are laid out in. The worker hands the dataplane
/// each frame in place in its UMEM, one contiguous buffer of fixed-size frames (2048 bytes, the
/// AF_XDP default), so the benchmark lays its frames out the same way.
const FRAME_SIZE: usize = 2048;

/// Processes every frame once per iteration, in place in a UMEM-like buffer. Outside the timed
/// part, each iteration restores the frames from pristine copies (a forwarded frame is rewritten
/// in place) and reads the clock once, as the worker does once per batch: milliseconds since
/// the start, so connection timeouts move on as they do under real traffic. One pass before
/// timing fills the tables; every frame must be sent, in that pass and in every iteration.
fn bench_path(c: &mut Criterion, name: &str, frames: Vec<Vec<u8>>) {
    bench_window(c, name, &[], frames, CLIENTS);
}

/// [`bench_path`] after `setup` (processed once, each frame sent), `per_iteration` frames an
/// iteration: the next ones in `frames` each time, round.
fn bench_window(
    c: &mut Criterion,
    name: &str,
    setup: &[Vec<u8>],
    frames: Vec<Vec<u8>>,
    per_iteration: usize,
) {
    let mut dp = dataplane();
    let epoch = Instant::now();
    for (index, frame) in setup.iter().chain(&frames).enumerate() {
        let verdict = dp.process(&mut frame.clone(), 1_000);
        assert_eq!(verdict, Verdict::Transmit, "{name}: frame {index}");
    }
    assert_eq!(frames.len() % per_iteration, 0, "{name}: whole windows");
    // The frames as received, laid out as in the UMEM, and their lengths (what the RX
    // descriptors give); restoring is then a copy between two buffers of the same layout.
    let mut pristine = vec![0u8; frames.len() * FRAME_SIZE];
    for (slot, frame) in pristine.chunks_exact_mut(FRAME_SIZE).zip(&frames) {
        slot[..frame.len()].copy_from_slice(frame);
    }
    let lens: Vec<usize> = frames.iter().map(Vec::len).collect();
    let mut umem = pristine.clone();
    let windows = frames.len() / per_iteration;
    let mut window = 0;
    let mut group = c.benchmark_group("dataplane");
    group.throughput(Throughput::Elements(per_iteration as u64));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let bytes =
                    window * per_iteration * FRAME_SIZE..(window + 1) * per_iteration * FRAME_SIZE;
                let lens = &lens[window * per_iteration..(window + 1) * per_iteration];
                window = (window + 1) % windows;
                let umem = &mut umem[bytes.clone()];
                for ((slot, copy), &len) in umem
                    .chunks_exact_mut(FRAME_SIZE)
                    .zip(pristine[bytes].chunks_exact(FRAME_SIZE))
                    .zip(lens)
                {
                    slot[..len].copy_from_slice(&copy[..len]);
                }
                let now_ms = 1_000 + epoch.elapsed().as_millis() as u64;
                let start = Instant::now();
                // Counted without a branch, checked after the clock stops.
                let mut sent = 0;
                for (slot, &len) in umem.chunks_exact_mut(FRAME_SIZE).zip(lens) {
                    let verdict = dp.process(black_box(&mut slot[..len]), now_ms);
                    sent += usize::from(verdict == Verdict::Transmit);
                }
                timed += start.elapsed();
                assert_eq!(sent, lens.len(), "{name}: frames not sent");
            }
            timed
        })
    });
    group.finish();
}

fn forwarding(c: &mut Criterion) {
    let frames =
        syn_frames(|eth, i| eth.ipv4([198, 19, (i >> 8) as u8, i as u8], [198, 18, 0, 100], 64));
    bench_path(c, "forward_warm_flow_table", frames);
}

fn established(c: &mut Criterion) {
    let many = |i: usize| [198, 19, (i >> 8) as u8, i as u8];
    // The handshakes' SYNs, from the same ports as the segments after them.
    let syns: Vec<Vec<u8>> = (0..MANY_CLIENTS)
        .map(|i| {
            let mut frame = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
                .ipv4(many(i), [198, 18, 0, 100], 64)
                .tcp(40000 + (i % 20000) as u16, 1935, 1, 64240)
                .syn()
                .write(&mut frame, &[])
                .expect("write");
            frame
        })
        .collect();
    bench_window(
        c,
        "forward_established_65536_clients",
        &syns,
        established_frames(),
        CLIENTS,
    );
}

fn arp(c: &mut Criterion) {
    bench_path(c, "arp_reply", arp_frames());
}

fn forwarding_v6(c: &mut Criterion) {
    let frames = syn_frames(|eth, i| eth.ipv6(client6(i), VIP6.octets(), 64));
    bench_path(c, "forward_ipv6_warm_flow_table", frames);
}

fn neighbor_solicitation(c: &mut Criterion) {
    bench_path(c, "neighbor_solicitation_reply", solicitation_frames());
}

criterion_group!(
    benches,
    forwarding,
    established,
    arp,
    forwarding_v6,
    neighbor_solicitation
);
criterion_main!(benches);
