//! Packet rate through lbd on a veth pair, side by side with the kernel's own forwarding paths.
//!
//! `sudo scripts/bench-pps` (or, as root, `cargo bench -p lbd-engine --bench pps`) builds a
//! network namespace `lbdpps` with one veth pair, `lb0` (the forwarder's interface) and `sw0`
//! (the wire's far end), and measures, over the same topology and the same traffic:
//! - lbd (release build, AF_XDP copy mode, one worker on its own core; one service with an
//!   IPv4 and an IPv6 VIP);
//! - the kernel's netdev ingress path: an nftables `netdev` chain that rewrites both MACs from
//!   a `jhash ip saddr` map and `fwd`s the frame back out (this kernel has no IPVS);
//! - an in-kernel XDP program doing the same rewrite and sending the frame back: the ceiling
//!   on this topology;
//! - the smallest AF_XDP forwarder: lbd's own rings (`XskRings`, the same settings parsed from
//!   the same config) driven by lbd's worker loop shape with a fixed MAC rewrite and nothing
//!   else, on core 1 like lbd's worker: the ceiling of any AF_XDP copy-mode program here.
//!
//! Traffic: TCP SYNs (60-byte frames) to VIP:1935 from 4096 client addresses, written by an XDP
//! generator run with `BPF_PROG_TEST_RUN` in live-frames mode on `sw0`, pinned to core 0; it
//! sends as fast as the kernel takes frames, so every contender runs saturated. The generator
//! needs no program attached to `sw0`: test_run runs it, and its XDP_TX goes out through
//! `sw0`'s `ndo_xdp_xmit` to `lb0`, which runs XDP in every contender.
//!
//! Two sinks on `sw0` count what comes back per destination MAC (one counter per real server)
//! and drop it: the rate is what arrives at the real servers. Every contender runs with both:
//! - the fair sink (the headline): a tc ingress program (TCX), no XDP on `sw0`, GRO on (so that
//!   `sw0` has the NAPI that frames sent by XDP need). A veth whose peer runs XDP copies every
//!   skb with less than 256 bytes of headroom into a new page first, which AF_XDP copy mode's
//!   skbs are and the nftables path's are not; without XDP on `sw0` nobody pays that copy. XDP_TX
//!   to a veth peer without XDP is never flushed (veth_xdp_flush schedules the peer's NAPI only
//!   when the peer runs XDP), so with this sink the XDP contender sends by XDP_REDIRECT to its
//!   own device, which is;
//! - the XDP sink: an XDP program on `sw0`, cheapest for the XDP contender's XDP_TX and dearest
//!   for the AF_XDP ones (the copy above).
//!
//! Each round measures every contender once per sink (the order rotates) over a fixed window
//! after a warm-up; the tables give medians over the rounds.
//!
//! Also measured: lbd with 2 workers on 2 queues (a generator thread on each core; veth picks
//! the receive queue by the sending core) against 1 worker; a mix with 1% ARP requests for the
//! VIP and 1% frames to a non-VIP address; IPv6: lbd, nftables and XDP again with 74-byte TCP
//! SYNs to the service's IPv6 VIP (2001:2::/48, RFC 5180's benchmarking range), the nftables
//! rule matching `ip6 daddr` and hashing `ip6 saddr`; lbd with several `engine.tx_skb_budget`
//! values (fair sink); a 10-million-frame run paced at half lbd's rate (fair sink) that checks
//! lbd's frame accounting and that every frame lbd forwarded arrived; and lbd's idle CPU with
//! the default settings, its health checks answered from a second namespace (`lbdpps-rs`,
//! behind the veth pair `hc0`/`hc1`) that exists only for that run. Otherwise the namespace
//! holds no addresses of either family: the frames are written by XDP and forwarded by XDP,
//! AF_XDP or the netdev ingress hook, none of which needs one.
//!
//! Options (after `--`): `--rounds N` (5; 0 runs only the long run), `--window-ms MS` (2000),
//! `--long-frames N` (10000000; 0 skips the long run), `--long-rate PPS` (default: half lbd's
//! median rate with the fair sink), `--engine 'KEY = VALUE'` (repeatable: extra `[engine]`
//! settings for lbd and the minimal forwarder, e.g. `polling = "busy"`), `--sinks tc,xdp`,
//! `--tx-budgets 0,64,...` (the budget rows; empty: none), `--only TEXT` (only the rows whose
//! name contains it), `--idle-secs N` (10; 0 skips the idle run). The generator and every
//! contender share this machine's cores: the table prints how many cores were busy during
//! each measurement, and how many NET_RX softirq runs each forwarded frame took (the kernel
//! batches its receive work inside a softirq; a transmit from user space on veth runs the
//! peer's receive once per frame).

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, XskMap};
use aya::programs::{
    SchedClassifier, TcAttachType, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode,
    tc::SchedClassifierLinkId, xdp::XdpLinkId,
};
use aya::{Ebpf, include_bytes_aligned};
use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep};
use lbd_engine::io::sys::{CopyMode, Frame, XskRings, XskSettings};
use lbd_engine::io::worker::Rings;
use lbd_proto::{Command as CtlCommand, Outcome, Reply, Request, StatsReport};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static PPS_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pps.o"));
const LBD: &str = env!("CARGO_BIN_EXE_lbd");

const NAMESPACE: &str = "lbdpps";
const LB_IF: &str = "lb0";
const WIRE_IF: &str = "sw0";
const QUEUES: usize = 2;
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const WIRE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
const PORT: u16 = 1935;
const FIRST_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);
/// The generator adds the client's number to the last 32 bits.
const FIRST_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 0);
const CLIENTS: u32 = 4096;
const REAL_SERVERS: usize = 4;
const FRAME_LEN: usize = 60;
/// An IPv6 TCP SYN without options: Ethernet 14, IPv6 40, TCP 20.
const FRAME6_LEN: usize = 74;
/// Bytes of a generator template (`struct frame_template`).
const TEMPLATE_LEN: usize = 80;
/// Frames per BPF_PROG_TEST_RUN call when the generator runs flat out: as many as possible,
/// because each call sets up and tears down a page pool and waits for the frames of the last
/// one (an RCU grace period: milliseconds of silence). A signal (SIGUSR1) ends a call.
const FLOOD_CHUNK: u32 = 1 << 30;
const STATE_DIR: &str = "/tmp/lbdpps";
/// The real servers' namespace of the idle run, which health checks reach through `hc0`.
const SERVERS_NAMESPACE: &str = "lbdpps-rs";
/// `engine.tx_skb_budget` values measured side by side by default (0: the kernel's 32).
const DEFAULT_TX_BUDGETS: [u32; 5] = [0, 64, 128, 256, 4096];

fn real_server_mac(index: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, 0x10 + index as u8]
}

fn real_server_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 11 + index as u8)
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Options {
    rounds: usize,
    window: Duration,
    long_frames: u64,
    long_rate: Option<u64>,
    /// Extra `[engine]` lines for lbd's config (e.g. `polling = "busy"`, `batch_size = 256`).
    engine: Vec<String>,
    /// `engine.tx_skb_budget` values to measure lbd with, side by side (fair sink only).
    tx_budgets: Vec<u32>,
    /// The sinks every contender runs with, in this order.
    sinks: Vec<Sink>,
    /// Only the rows whose name contains this (for quick iterations).
    only: Option<String>,
    /// Seconds of the idle measurement; 0 skips it.
    idle_secs: u64,
}

impl Options {
    fn parse() -> BenchResult<Options> {
        let mut options = Options {
            rounds: 5,
            window: Duration::from_millis(2000),
            long_frames: 10_000_000,
            long_rate: None,
            engine: Vec::new(),
            tx_budgets: DEFAULT_TX_BUDGETS.to_vec(),
            sinks: vec![Sink::Tc, Sink::Xdp],
            only: None,
            idle_secs: 10,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || -> BenchResult<u64> {
                let text = args.next().ok_or(format!("{arg} needs a value"))?;
                Ok(text.parse().map_err(|e| format!("{arg} {text}: {e}"))?)
            };
            match arg.as_str() {
                "--rounds" => options.rounds = value()? as usize,
                "--window-ms" => options.window = Duration::from_millis(value()?.max(100)),
                "--long-frames" => options.long_frames = value()?,
                "--long-rate" => options.long_rate = Some(value()?.max(1000)),
                "--engine" => options
                    .engine
                    .push(args.next().ok_or("--engine needs a TOML line")?),
                "--idle-secs" => options.idle_secs = value()?,
                "--only" => options.only = Some(args.next().ok_or("--only needs a name")?),
                "--sinks" => {
                    let list = args.next().ok_or("--sinks needs tc, xdp or tc,xdp")?;
                    options.sinks = list
                        .split(',')
                        .map(|name| match name.trim() {
                            "tc" => Ok(Sink::Tc),
                            "xdp" => Ok(Sink::Xdp),
                            other => Err(format!("--sinks: {other} is not tc or xdp")),
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--tx-budgets" => {
                    let list = args.next().ok_or("--tx-budgets needs a list")?;
                    options.tx_budgets = list
                        .split(',')
                        .filter(|v| !v.trim().is_empty())
                        .map(|v| v.trim().parse())
                        .collect::<Result<_, _>>()
                        .map_err(|e| format!("--tx-budgets {list}: {e}"))?;
                }
                // cargo bench passes --bench; criterion-style filters are not used here.
                _ => {}
            }
        }
        Ok(options)
    }
}

fn main() -> BenchResult<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("pps: needs root (namespaces, XDP, AF_XDP); run `sudo scripts/bench-pps`");
        std::process::exit(2);
    }
    let options = Options::parse()?;
    // The generator threads are stopped by SIGUSR1, which makes their BPF_PROG_TEST_RUN
    // return EINTR; the handler itself only has to exist.
    signal_hook::flag::register(
        signal_hook::consts::SIGUSR1,
        std::sync::Arc::new(AtomicBool::new(false)),
    )?;
    let wire = Wire::create()?;
    let mut bench = Bench::load(&wire)?;
    let report = bench.run(&options)?;
    println!("{report}");
    Ok(())
}

/// The namespace with the veth pair. This thread (and every thread it starts) lives in it.
struct Wire {
    wire_ifindex: u32,
}

impl Wire {
    fn create() -> BenchResult<Wire> {
        let _ = Command::new("ip")
            .args(["netns", "del", NAMESPACE])
            .stderr(Stdio::null())
            .status();
        sh("ip", &["netns", "add", NAMESPACE])?;
        let handle = std::fs::File::open(format!("/run/netns/{NAMESPACE}"))?;
        nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let queues = QUEUES.to_string();
        sh(
            "ip",
            &[
                "link",
                "add",
                LB_IF,
                "numtxqueues",
                &queues,
                "numrxqueues",
                &queues,
                "type",
                "veth",
                "peer",
                "name",
                WIRE_IF,
                "numtxqueues",
                &queues,
                "numrxqueues",
                &queues,
            ],
        )?;
        sh("ip", &["link", "set", LB_IF, "address", &mac_text(LB_MAC)])?;
        sh(
            "ip",
            &["link", "set", WIRE_IF, "address", &mac_text(WIRE_MAC)],
        )?;
        for interface in ["lo", LB_IF, WIRE_IF] {
            sh("ip", &["link", "set", interface, "up"])?;
        }
        Ok(Wire {
            wire_ifindex: ifindex(WIRE_IF)?,
        })
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        // The namespace (and the veth pair in it) goes away with the last process inside.
        for namespace in [SERVERS_NAMESPACE, NAMESPACE] {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The real servers' namespace: their addresses on `hc1`, reached from the wire's namespace
/// (this thread's) through `hc0` (198.18.1.1).
fn servers_namespace() -> BenchResult<()> {
    let _ = Command::new("ip")
        .args(["netns", "del", SERVERS_NAMESPACE])
        .stderr(Stdio::null())
        .status();
    sh("ip", &["netns", "add", SERVERS_NAMESPACE])?;
    let peer = [
        "link", "add", "hc0", "type", "veth", "peer", "name", "hc1", "netns",
    ];
    sh("ip", &[&peer[..], &[SERVERS_NAMESPACE]].concat())?;
    sh("ip", &["addr", "add", "198.18.1.1/24", "dev", "hc0"])?;
    sh("ip", &["link", "set", "hc0", "up"])?;
    let inside = |args: &[&str]| sh("ip", &[&["-n", SERVERS_NAMESPACE][..], args].concat());
    for index in 0..REAL_SERVERS {
        let ip = real_server_ip(index).to_string();
        sh("ip", &["route", "add", &format!("{ip}/32"), "dev", "hc0"])?;
        inside(&["addr", "add", &format!("{ip}/32"), "dev", "hc1"])?;
    }
    inside(&["link", "set", "hc1", "up"])?;
    inside(&["link", "set", "lo", "up"])?;
    inside(&["route", "add", "198.18.1.0/24", "dev", "hc1"])?;
    Ok(())
}

fn ifindex(interface: &str) -> BenchResult<u32> {
    // `ip -o link show lb0` starts with "<index>: lb0@sw0: ...".
    let output = Command::new("ip")
        .args(["-o", "link", "show", interface])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let index = text
        .split(':')
        .next()
        .ok_or(format!("no ifindex for {interface}"))?;
    Ok(index.trim().parse()?)
}

fn sh(program: &str, args: &[&str]) -> BenchResult<()> {
    sh_with_input(program, args, "")
}

/// Runs `program` with `input` on its stdin; its stderr becomes the error when it fails.
fn sh_with_input(program: &str, args: &[&str], input: &str) -> BenchResult<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(())
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Who forwards the frames in one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    /// lbd with this many workers (one per queue, pinned to cores 1, 0).
    Lbd { workers: usize },
    /// nftables netdev ingress: MAC rewrite + fwd.
    Nftables,
    /// In-kernel XDP rewrite + XDP_TX.
    XdpKernel,
    /// The smallest AF_XDP forwarder: lbd's socket setup and loop shape, a fixed MAC rewrite.
    MinimalXsk,
    /// lbd, 1 worker, with this `engine.tx_skb_budget`.
    LbdBudget(u32),
}

impl Contender {
    fn name(self) -> String {
        match self {
            Contender::Lbd { workers: 1 } => "lbd, 1 worker (AF_XDP copy mode)".to_owned(),
            Contender::Lbd { workers } => format!("lbd, {workers} workers on {workers} queues"),
            Contender::Nftables => "nftables netdev: MAC rewrite + fwd".to_owned(),
            Contender::XdpKernel => "XDP in kernel: MAC rewrite + XDP_TX".to_owned(),
            Contender::MinimalXsk => "minimal AF_XDP forwarder (lbd's rings)".to_owned(),
            Contender::LbdBudget(0) => "lbd, 1 worker, tx_skb_budget = 0 (32)".to_owned(),
            Contender::LbdBudget(budget) => format!("lbd, 1 worker, tx_skb_budget = {budget}"),
        }
    }
}

/// What takes the frames back on `sw0` and counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// tc ingress (TCX) BPF on `sw0`, GRO on: no XDP on the wire's side, so a frame the
    /// forwarder sends is not copied again on arrival (the fair sink).
    Tc,
    /// XDP on `sw0`: veth copies every skb with under 256 bytes of headroom into a new page
    /// before running it, which AF_XDP copy mode's skbs are and nftables's are not.
    Xdp,
}

impl Sink {
    fn name(self) -> &'static str {
        match self {
            Sink::Tc => "tc ingress sink on sw0 (no XDP on sw0, GRO on): the fair sink",
            Sink::Xdp => "XDP sink on sw0 (veth re-copies skbs with little headroom)",
        }
    }
}

/// What the generator sends (`enum traffic` in pps.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// Every frame a SYN to the VIP.
    Vip,
    /// 1% ARP requests for the VIP, 1% SYNs to a non-VIP address, the rest to the VIP.
    Mix,
    /// Every frame a SYN to the IPv6 VIP.
    Vip6,
}

impl Traffic {
    fn code(self) -> u32 {
        match self {
            Traffic::Vip => 0,
            Traffic::Mix => 1,
            Traffic::Vip6 => 2,
        }
    }

    fn frame_len(self) -> usize {
        match self {
            Traffic::Vip | Traffic::Mix => FRAME_LEN,
            Traffic::Vip6 => FRAME6_LEN,
        }
    }

    /// Share of the frames that are for the VIP: the rest are not forwarded by design.
    fn vip_share(self) -> f64 {
        match self {
            Traffic::Mix => 0.98,
            Traffic::Vip | Traffic::Vip6 => 1.0,
        }
    }
}

/// The in-kernel XDP contender's program for `sink`: XDP_TX frames reach a veth peer without
/// XDP only by redirect (see pps.c).
fn xdp_program(sink: Sink) -> &'static str {
    match sink {
        Sink::Tc => "pps_fwd_redirect",
        Sink::Xdp => "pps_fwd",
    }
}

/// A row's name with `sink`: the tc sink's XDP contender redirects instead of XDP_TX.
fn row_label(contender: Contender, traffic: Traffic, sink: Sink) -> String {
    let name = label(contender, traffic);
    if contender == Contender::XdpKernel && sink == Sink::Tc {
        name.replace("XDP_TX", "XDP_REDIRECT")
    } else {
        name
    }
}

/// A row's name: the contender, and the traffic when it is not IPv4's plain SYNs.
fn label(contender: Contender, traffic: Traffic) -> String {
    match traffic {
        Traffic::Vip => contender.name(),
        // Only lbd with one worker gets the mix.
        Traffic::Mix => "lbd, 1 worker, 1% ARP + 1% non-VIP".to_owned(),
        Traffic::Vip6 => format!("IPv6: {}", contender.name()),
    }
}

/// Counters read at one instant.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    /// Frames the generator wrote (and handed to sw0's XDP transmit).
    generated: u64,
    /// Frames that entered lb0 (its XDP receive path).
    entered: u64,
    /// Per sink slot: 0 = any other destination, 1.. = real server i - 1.
    sink: Vec<u64>,
    /// (busy, total) jiffies over all cores.
    cpu: (u64, u64),
    /// NET_RX softirq runs per core (`/proc/softirqs`).
    net_rx_softirqs: Vec<u32>,
}

/// What one measurement window saw.
#[derive(Debug, Clone)]
struct Measurement {
    contender: Contender,
    traffic: Traffic,
    sink: Sink,
    /// Frames per second arriving at the real servers.
    forwarded_pps: f64,
    generated_pps: f64,
    entered_pps: f64,
    per_server: Vec<u64>,
    /// Frames per second to any other destination (ARP replies in the mix).
    other_pps: f64,
    /// Cores busy on average (all processes and softirq).
    busy_cores: f64,
    /// NET_RX softirq runs, all cores, per frame that reached a real server: how well the
    /// kernel's receive work (lb0's and the sink's) was batched.
    softirqs_per_frame: f64,
}

impl Measurement {
    /// Share of the generated VIP frames that did not reach a real server.
    fn loss(&self) -> f64 {
        let to_vip = self.generated_pps * self.traffic.vip_share();
        if to_vip <= 0.0 {
            return 0.0;
        }
        (1.0 - self.forwarded_pps / to_vip).max(0.0)
    }
}

struct Bench<'w> {
    wire: &'w Wire,
    ebpf: Ebpf,
    lbd_config: PathBuf,
    engine_extra: String,
    /// The sink attached to `sw0` now.
    sink: Option<(Sink, SinkLink)>,
}

enum SinkLink {
    Tc(SchedClassifierLinkId),
    Xdp(XdpLinkId),
}

impl<'w> Bench<'w> {
    fn load(wire: &'w Wire) -> BenchResult<Bench<'w>> {
        let mut ebpf = Ebpf::load(PPS_OBJECT)?;
        for name in [
            "pps_gen",
            "pps_sink",
            "pps_fwd",
            "pps_fwd_redirect",
            "pps_pass",
            "pps_xsk",
        ] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(format!("no program {name}"))?
                .try_into()?;
            program.load()?;
        }
        let tc_sink: &mut SchedClassifier = ebpf
            .program_mut("pps_sink_tc")
            .ok_or("no program pps_sink_tc")?
            .try_into()?;
        tc_sink.load()?;
        let mut bench = Bench {
            wire,
            ebpf,
            lbd_config: PathBuf::from(STATE_DIR).join("lbd.toml"),
            engine_extra: String::new(),
            sink: None,
        };
        bench.write_maps()?;
        // The generator needs no program attached to sw0: BPF_PROG_TEST_RUN runs it, and its
        // XDP_TX goes out through sw0's ndo_xdp_xmit to lb0, which has a program (and so the
        // NAPI that takes such frames) in every contender.
        bench.set_sink(Sink::Tc)?;
        Ok(bench)
    }

    /// Puts `sink` on sw0 in place of the one there. The tc sink needs GRO on sw0: without
    /// XDP or GRO a veth has no NAPI for frames that arrive by XDP_TX (in-kernel XDP's) and
    /// drops them; the XDP sink runs with veth's default (GRO off).
    fn set_sink(&mut self, sink: Sink) -> BenchResult<()> {
        if self.sink.as_ref().is_some_and(|(now, _)| *now == sink) {
            return Ok(());
        }
        match self.sink.take() {
            Some((_, SinkLink::Tc(link))) => self.tc_sink()?.detach(link)?,
            Some((_, SinkLink::Xdp(link))) => self.xdp("pps_sink")?.detach(link)?,
            None => {}
        }
        let link = match sink {
            Sink::Tc => {
                sh("ethtool", &["-K", WIRE_IF, "gro", "on"])?;
                // TCX on this kernel (6.6+): the same ingress hook as clsact, no qdisc.
                SinkLink::Tc(self.tc_sink()?.attach(WIRE_IF, TcAttachType::Ingress)?)
            }
            Sink::Xdp => {
                sh("ethtool", &["-K", WIRE_IF, "gro", "off"])?;
                SinkLink::Xdp(self.xdp("pps_sink")?.attach(WIRE_IF, XdpMode::Driver)?)
            }
        };
        self.sink = Some((sink, link));
        // The veth's NAPI comes and goes with XDP/GRO: let it settle.
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    fn tc_sink(&mut self) -> BenchResult<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut("pps_sink_tc")
            .ok_or("no program pps_sink_tc")?
            .try_into()?)
    }

    fn sink_now(&self) -> Sink {
        self.sink.as_ref().map_or(Sink::Tc, |(sink, _)| *sink)
    }

    fn xdp(&mut self, name: &str) -> BenchResult<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or(format!("no program {name}"))?
            .try_into()?)
    }

    fn write_maps(&mut self) -> BenchResult<()> {
        let templates = frame_templates()?;
        let mut map: Array<&mut MapData, [u8; TEMPLATE_LEN]> =
            Array::try_from(self.ebpf.map_mut("gen_templates").ok_or("gen_templates")?)?;
        for (index, template) in templates.iter().enumerate() {
            map.set(index as u32, template, 0)?;
        }
        let mut sink: BpfHashMap<&mut MapData, u64, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut("sink_macs").ok_or("sink_macs")?)?;
        for index in 0..REAL_SERVERS {
            sink.insert(mac_key(real_server_mac(index)), index as u32 + 1, 0)?;
        }
        // struct fwd_config: vip, servers, own_mac, pad, vip6.
        let mut config = [0u8; 32];
        config[0..4].copy_from_slice(&VIP.octets());
        config[4..8].copy_from_slice(&(REAL_SERVERS as u32).to_ne_bytes());
        config[8..14].copy_from_slice(&LB_MAC);
        config[16..32].copy_from_slice(&VIP6.octets());
        let mut fwd: Array<&mut MapData, [u8; 32]> =
            Array::try_from(self.ebpf.map_mut("fwd_config").ok_or("fwd_config")?)?;
        fwd.set(0, config, 0)?;
        let mut servers: Array<&mut MapData, [u8; 8]> =
            Array::try_from(self.ebpf.map_mut("fwd_servers").ok_or("fwd_servers")?)?;
        for index in 0..REAL_SERVERS {
            let mut entry = [0u8; 8];
            entry[..6].copy_from_slice(&real_server_mac(index));
            servers.set(index as u32, entry, 0)?;
        }
        Ok(())
    }

    /// The generator's settings: the traffic, and `paced = (rate, frames)` or flat out.
    fn set_generator(&mut self, traffic: Traffic, paced: Option<(u64, u64)>) -> BenchResult<()> {
        let (interval_ns, limit) = paced.map_or((0, 0), |(rate, frames)| {
            (1_000_000_000 / rate.max(1), frames)
        });
        if paced.is_some() {
            // struct pacing: sent, next_ns.
            let mut pacing: PerCpuArray<&mut MapData, [u64; 2]> =
                PerCpuArray::try_from(self.ebpf.map_mut("gen_paced").ok_or("gen_paced")?)?;
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
            pacing.set(
                0,
                aya::maps::PerCpuValues::try_from(vec![[0u64; 2]; cpus])?,
                0,
            )?;
        }
        // struct gen_config: sources, traffic, interval_ns, limit.
        let mut bytes = [0u8; 24];
        bytes[0..4].copy_from_slice(&CLIENTS.to_ne_bytes());
        bytes[4..8].copy_from_slice(&traffic.code().to_ne_bytes());
        bytes[8..16].copy_from_slice(&interval_ns.to_ne_bytes());
        bytes[16..24].copy_from_slice(&limit.to_ne_bytes());
        let mut config: Array<&mut MapData, [u8; 24]> =
            Array::try_from(self.ebpf.map_mut("gen_config").ok_or("gen_config")?)?;
        config.set(0, bytes, 0)?;
        Ok(())
    }

    fn paced_sent(&self) -> BenchResult<u64> {
        let pacing: PerCpuArray<&MapData, [u64; 2]> =
            PerCpuArray::try_from(self.ebpf.map("gen_paced").ok_or("gen_paced")?)?;
        Ok(pacing.get(&0, 0)?.iter().map(|p| p[0]).sum())
    }

    fn sample(&self) -> BenchResult<Sample> {
        let at = Instant::now();
        let generated: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("gen_sent").ok_or("gen_sent")?)?;
        let generated = generated.get(&0, 0)?.iter().sum();
        let counts: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("sink_counts").ok_or("sink_counts")?)?;
        let mut sink = Vec::with_capacity(REAL_SERVERS + 1);
        for slot in 0..=REAL_SERVERS as u32 {
            sink.push(counts.get(&slot, 0)?.iter().sum());
        }
        Ok(Sample {
            at,
            generated,
            entered: lb_xdp_packets()?,
            sink,
            cpu: cpu_jiffies()?,
            net_rx_softirqs: net_rx_softirqs()?,
        })
    }

    fn run(&mut self, options: &Options) -> BenchResult<String> {
        std::fs::create_dir_all(STATE_DIR)?;
        self.engine_extra = options.engine.iter().map(|l| format!("{l}\n")).collect();
        let main = [
            Contender::Lbd { workers: 1 },
            Contender::Nftables,
            Contender::XdpKernel,
            Contender::MinimalXsk,
        ];
        let main6 = [
            Contender::Lbd { workers: 1 },
            Contender::Nftables,
            Contender::XdpKernel,
        ];
        let mut results: Vec<Measurement> = Vec::new();
        for round in 0..options.rounds {
            for &sink in &options.sinks {
                self.set_sink(sink)?;
                let mut order: Vec<(Contender, Traffic)> = main.map(|c| (c, Traffic::Vip)).to_vec();
                order.rotate_left(round % main.len());
                // The scaling and mix runs are lbd only; they follow IPv4's main four.
                order.push((Contender::Lbd { workers: 2 }, Traffic::Vip));
                order.push((Contender::Lbd { workers: 1 }, Traffic::Mix));
                // Then IPv6's three, rotating the same way.
                let mut v6 = main6.map(|c| (c, Traffic::Vip6));
                v6.rotate_left(round % main6.len());
                order.extend(v6);
                if sink == Sink::Tc {
                    let mut budgets: Vec<(Contender, Traffic)> = options
                        .tx_budgets
                        .iter()
                        .map(|&b| (Contender::LbdBudget(b), Traffic::Vip))
                        .collect();
                    let shift = round % budgets.len().max(1);
                    budgets.rotate_left(shift);
                    order.extend(budgets);
                }
                let wanted = |(contender, traffic): &(Contender, Traffic)| {
                    options
                        .only
                        .as_ref()
                        .is_none_or(|only| label(*contender, *traffic).contains(only.as_str()))
                };
                for (contender, traffic) in order.into_iter().filter(wanted) {
                    let measurement = self.measure(contender, traffic, options.window)?;
                    eprintln!("round {}: {}", round + 1, line(&measurement));
                    results.push(measurement);
                }
            }
        }
        let mut report = String::new();
        for sink in [Sink::Tc, Sink::Xdp] {
            report += &table(&results, sink);
        }
        if !results.is_empty() {
            report += LEGEND;
        }
        report += &budget_table(&results, &options.tx_budgets);
        // The long run and the idle run use the fair sink.
        self.set_sink(Sink::Tc)?;
        if options.long_frames > 0 {
            let lbd = median_of(
                &results,
                Sink::Tc,
                Contender::Lbd { workers: 1 },
                Traffic::Vip,
            )
            .map_or(0.0, |m| m.forwarded_pps);
            // Half the saturated rate: a load lbd is expected to carry without any loss.
            let half = if lbd > 0.0 { lbd / 2.0 } else { 300_000.0 };
            let rate = options.long_rate.unwrap_or(half as u64).max(10_000);
            report += &self.long_run(options.long_frames, rate)?;
        }
        if options.idle_secs > 0 {
            report += &self.idle_cost(Duration::from_secs(options.idle_secs))?;
        }
        report += &machine();
        Ok(report)
    }

    /// CPU used by an lbd (one worker) with no traffic at all, with the default settings:
    /// adaptive polling, gratuitous ARP at start, the DR check, and a TCP health check of each
    /// real server every second. The real servers' addresses live for the run in a namespace of
    /// their own behind a second veth pair (`hc0`, 198.18.1.1, to `hc1`), where a listener of
    /// the bench's accepts each check (and counts it): lbd refuses a real server whose address
    /// is its own host's.
    fn idle_cost(&mut self, window: Duration) -> BenchResult<String> {
        let result = servers_namespace().and_then(|()| self.idle_with_checks(window));
        let _ = Command::new("ip")
            .args(["netns", "del", SERVERS_NAMESPACE])
            .status();
        result
    }

    fn idle_with_checks(&mut self, window: Duration) -> BenchResult<String> {
        let stop = AtomicBool::new(false);
        let accepted = std::sync::atomic::AtomicU64::new(0);
        let (listening, listening_rx) = std::sync::mpsc::channel();
        let (share, _log) = std::thread::scope(|scope| {
            // Bounded by `stop`, set when the measurement ends whatever its result.
            scope.spawn(|| {
                let listener = (|| -> BenchResult<std::net::TcpListener> {
                    let handle = std::fs::File::open(format!("/run/netns/{SERVERS_NAMESPACE}"))?;
                    // This thread only: the bench's other threads stay in the wire's namespace.
                    nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT))?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })();
                let listener = match listener {
                    Ok(listener) => {
                        let _ = listening.send(Ok(()));
                        listener
                    }
                    Err(error) => {
                        let _ = listening.send(Err(error.to_string()));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok(_) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
            let result = match listening_rx.recv() {
                Ok(Ok(())) => self.idle_window(window),
                Ok(Err(error)) => Err(format!("the real servers' listener: {error}").into()),
                Err(_) => Err("the real servers' listener did not start".into()),
            };
            stop.store(true, Ordering::Relaxed);
            result
        })?;
        Ok(format!(
            "\nIdle: lbd with 1 worker, default settings (adaptive polling, {} gratuitous ARP \
             rounds, DR check every 10 s, TCP health check of each of {REAL_SERVERS} real servers \
             every 1 s, answered from a namespace of their own: {} checks accepted), no traffic: \
             {share:.2}% of one core over {} s (utime + stime)\n",
            3,
            accepted.load(Ordering::Relaxed),
            window.as_secs(),
        ))
    }

    /// Starts lbd with the default settings, waits past its start, and measures its CPU use
    /// over `window`: (% of one core, its log).
    fn idle_window(&mut self, window: Duration) -> BenchResult<(f64, String)> {
        let text = lbd_config_defaults(&LbdProcess::socket_path(), &self.engine_extra);
        let lbd = LbdProcess::start_with(&self.lbd_config, &text)?;
        // Past start-up (the gratuitous ARP rounds go at 0.5 s intervals) and the first checks.
        std::thread::sleep(Duration::from_secs(2));
        let before = (Instant::now(), process_cpu_ticks(lbd.child.id())?);
        std::thread::sleep(window);
        let after = (Instant::now(), process_cpu_ticks(lbd.child.id())?);
        let log = lbd.stop()?;
        let ticks_per_second =
            nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.ok_or("no CLK_TCK")? as f64;
        let used = (after.1 - before.1) as f64 / ticks_per_second;
        let share = used / after.0.duration_since(before.0).as_secs_f64() * 100.0;
        Ok((share, log))
    }

    /// One window of one contender, saturated: warm-up, then counters before and after.
    fn measure(
        &mut self,
        contender: Contender,
        traffic: Traffic,
        window: Duration,
    ) -> BenchResult<Measurement> {
        self.set_generator(traffic, None)?;
        let setup = self.start(contender, traffic)?;
        let generator_cores: Vec<usize> = match contender {
            Contender::Lbd { workers } => (0..workers).collect(),
            _ => vec![0],
        };
        let (before, after) = with_generators(
            self.gen_program()?,
            self.wire,
            &generator_cores,
            traffic.frame_len(),
            || {
                std::thread::sleep(Duration::from_millis(700));
                let before = self.sample()?;
                std::thread::sleep(window);
                Ok((before, self.sample()?))
            },
        )?;
        self.stop(contender, setup)?;
        Ok(measure_between(
            contender,
            traffic,
            self.sink_now(),
            &before,
            &after,
        ))
    }

    fn gen_program(&self) -> BenchResult<&Xdp> {
        Ok(self
            .ebpf
            .program("pps_gen")
            .ok_or("no pps_gen")?
            .try_into()?)
    }

    fn start(&mut self, contender: Contender, traffic: Traffic) -> BenchResult<Setup> {
        match contender {
            Contender::Lbd { workers } => {
                let lbd = LbdProcess::start(&self.lbd_config, workers, &self.engine_extra)?;
                Ok(Setup::Lbd(lbd))
            }
            Contender::Nftables => {
                let link = self.xdp("pps_pass")?.attach(LB_IF, XdpMode::Driver)?;
                sh_with_input("nft", &["-f", "-"], &nft_ruleset(traffic))?;
                Ok(Setup::Xdp(link))
            }
            Contender::XdpKernel => {
                let program = xdp_program(self.sink_now());
                let link = self.xdp(program)?.attach(LB_IF, XdpMode::Driver)?;
                Ok(Setup::Xdp(link))
            }
            Contender::LbdBudget(budget) => {
                let extra = format!("{}tx_skb_budget = {budget}\n", self.engine_extra);
                Ok(Setup::Lbd(LbdProcess::start(&self.lbd_config, 1, &extra)?))
            }
            Contender::MinimalXsk => {
                // lbd's own config, parsed by lbd's own code: the same socket settings.
                let text = lbd_config(1, Path::new("/dev/null"), &self.engine_extra);
                let engine = lbd_config::Config::from_toml_str(&text)?.engine;
                let settings = XskSettings {
                    frame_size: engine.frame_size,
                    frame_count: engine.frame_count,
                    ring_size: engine.ring_size,
                    mode: CopyMode::Copy,
                    tx_skb_budget: engine.tx_skb_budget,
                };
                let batch_size = engine.batch_size as usize;
                let rings = XskRings::open(LB_IF, 0, settings)?;
                let mut sockets: XskMap<&mut MapData> =
                    XskMap::try_from(self.ebpf.map_mut("xsks").ok_or("xsks")?)?;
                sockets.set(0, rings.as_raw_fd(), 0)?;
                let link = self.xdp("pps_xsk")?.attach(LB_IF, XdpMode::Driver)?;
                let stop = std::sync::Arc::new(AtomicBool::new(false));
                let thread = {
                    let stop = stop.clone();
                    std::thread::spawn(move || forward_minimal(rings, batch_size, &stop))
                };
                Ok(Setup::Minimal { link, stop, thread })
            }
        }
    }

    fn stop(&mut self, contender: Contender, setup: Setup) -> BenchResult<()> {
        if contender == Contender::Nftables {
            sh("nft", &["delete", "table", "netdev", "lbdbench"])?;
        }
        match (contender, setup) {
            (Contender::Nftables, Setup::Xdp(link)) => self.xdp("pps_pass")?.detach(link)?,
            (Contender::XdpKernel, Setup::Xdp(link)) => {
                let program = xdp_program(self.sink_now());
                self.xdp(program)?.detach(link)?
            }
            (Contender::MinimalXsk, Setup::Minimal { link, stop, thread }) => {
                stop.store(true, Ordering::Relaxed);
                let (forwarded, stats) = thread
                    .join()
                    .map_err(|_| "the minimal forwarder panicked")??;
                self.xdp("pps_xsk")?.detach(link)?;
                let mut sockets: XskMap<&mut MapData> =
                    XskMap::try_from(self.ebpf.map_mut("xsks").ok_or("xsks")?)?;
                // Gone with the socket already, as a rule.
                let _ = sockets.unset(0);
                eprintln!("    minimal forwarder: forwarded={forwarded} socket {stats:?}");
            }
            (_, Setup::Lbd(lbd)) => {
                let log = lbd.stop()?;
                for line in log.lines().filter(|l| {
                    l.contains("kernel socket") || l.contains("totals") || l.contains("dropped")
                }) {
                    eprintln!("    lbd: {}", line.split("daemon: ").last().unwrap_or(line));
                }
            }
            _ => return Err("contender and setup do not match".into()),
        }
        // Let the frames in flight drain before the next contender is measured.
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    }

    /// `frames` frames at `rate` per second through lbd (one worker): every frame lbd forwards
    /// must arrive, and lbd must account for every UMEM frame at stop.
    fn long_run(&mut self, frames: u64, rate: u64) -> BenchResult<String> {
        let lbd = LbdProcess::start(&self.lbd_config, 1, &self.engine_extra)?;
        let before = self.sample()?;
        self.set_generator(Traffic::Vip, Some((rate, frames)))?;
        let started = Instant::now();
        // Bounded: the schedule takes frames / rate seconds; twice that and a minute more is
        // a generator that cannot keep up, and the run says so.
        let limit = Duration::from_secs_f64(frames as f64 / rate as f64 * 2.0 + 60.0);
        with_generators(self.gen_program()?, self.wire, &[0], FRAME_LEN, || {
            while self.paced_sent()? < frames {
                if started.elapsed() > limit {
                    return Err("the paced generator fell behind its schedule".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })?;
        let elapsed = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let after = self.sample()?;
        let stats = lbd.stats()?;
        let log = lbd.stop()?;
        let generated = after.generated - before.generated;
        let entered = after.entered - before.entered;
        let received: u64 = (1..=REAL_SERVERS)
            .map(|slot| after.sink[slot] - before.sink[slot])
            .sum();
        let total = &stats.total;
        let accounted = log.matches("accounted=true").count();
        let unaccounted = log.matches("accounted=false").count();
        let kernel = log
            .lines()
            .filter(|l| l.contains("kernel socket statistics"))
            .map(|l| l.split("statistics").nth(1).unwrap_or("").trim().to_owned())
            .collect::<Vec<_>>()
            .join("; ");
        let mut out = format!(
            "\nLong run: {frames} frames paced at {rate} frames/s (bursts of at most 32), \
             {:.1} s, {:.0} frames/s achieved, lbd 1 worker\n",
            elapsed.as_secs_f64(),
            frames as f64 / elapsed.as_secs_f64()
        );
        out += &format!("  generated            {generated}\n");
        out += &format!("  entered lb0 (XDP)    {entered}\n");
        out += &format!("  lbd received         {}\n", total.rx_frames);
        out += &format!("  lbd forwarded        {}\n", total.forwarded_packets);
        out += &format!("  arrived at servers   {received}\n");
        out += &format!(
            "  forwarded - arrived  {}\n",
            total.forwarded_packets as i64 - received as i64
        );
        out += &format!(
            "  sent - arrived       {}\n",
            generated as i64 - received as i64
        );
        out += &format!("  lbd drops            {:?}\n", total.drops);
        out += &format!("  AF_XDP socket        {kernel}\n");
        out += &format!(
            "  UMEM frames at stop  {} worker(s) accounted, {} not\n",
            accounted, unaccounted
        );
        Ok(out)
    }
}

enum Setup {
    Lbd(LbdProcess),
    Xdp(XdpLinkId),
    Minimal {
        link: XdpLinkId,
        stop: std::sync::Arc<AtomicBool>,
        thread: std::thread::JoinHandle<BenchResult<(u64, Option<lbd_proto::SocketStats>)>>,
    },
}

/// The minimal AF_XDP forwarder, until `stop`: lbd's worker loop (`Worker::poll_once`: reclaim
/// at most 4 batches, receive a batch, transmit it with the same wake-and-retry on a full TX
/// ring, refill the fill ring keeping a batch back) with a fixed MAC rewrite in place of the
/// dataplane, on lbd's rings, pinned to core 1 as lbd's worker is. Returns frames forwarded.
fn forward_minimal(
    mut rings: XskRings,
    batch_size: usize,
    stop: &AtomicBool,
) -> BenchResult<(u64, Option<lbd_proto::SocketStats>)> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: 1 }) {
        return Err("cannot pin the minimal forwarder to core 1".into());
    }
    // Destination and source MAC per real server, chosen by the source address's last byte
    // (offset 29 of an IPv4 frame): the sink's shares stay meaningful.
    let headers: Vec<[u8; 12]> = (0..REAL_SERVERS)
        .map(|i| {
            let mut header = [0u8; 12];
            header[..6].copy_from_slice(&real_server_mac(i));
            header[6..].copy_from_slice(&LB_MAC);
            header
        })
        .collect();
    let rewrite = |bytes: &mut [u8]| {
        if let Some(&last) = bytes.get(29) {
            bytes[..12].copy_from_slice(&headers[usize::from(last) % REAL_SERVERS]);
        }
    };
    let mut free: Vec<Frame> = rings.take_frames();
    let mut batch: Vec<Frame> = Vec::with_capacity(batch_size);
    let mut in_tx = 0usize;
    let mut forwarded = 0u64;
    let refill = |rings: &mut XskRings, free: &mut Vec<Frame>| {
        let lendable = free.len().saturating_sub(batch_size);
        if lendable > 0 {
            rings.fill(free, lendable);
        }
    };
    refill(&mut rings, &mut free);
    while !stop.load(Ordering::Relaxed) {
        if in_tx > 0 {
            in_tx -= rings.reclaim(&mut free, in_tx.min(batch_size * 4));
        }
        if rings.receive(&mut batch, batch_size) == 0 {
            if in_tx > 0 {
                rings.kick();
            }
            continue;
        }
        for frame in batch.iter_mut() {
            rings.with_payload(frame, rewrite);
        }
        let received = batch.len();
        in_tx += rings.transmit(&mut batch);
        let mut tries = 0;
        while !batch.is_empty() && tries < 4 {
            rings.kick();
            in_tx -= rings.reclaim(&mut free, in_tx.min(batch_size * 4));
            in_tx += rings.transmit(&mut batch);
            tries += 1;
        }
        if in_tx > 0 {
            rings.kick();
        }
        forwarded += (received - batch.len()) as u64;
        free.append(&mut batch);
        refill(&mut rings, &mut free);
    }
    Ok((forwarded, rings.kernel_stats()))
}

/// Runs the generator on `core` until `stop` is set and a signal ends the current run; its
/// frames are `frame_len` bytes long.
fn generate(
    program: &Xdp,
    wire: &Wire,
    core: usize,
    frame_len: usize,
    stop: &AtomicBool,
) -> BenchResult<()> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        return Err(format!("cannot pin the generator to core {core}").into());
    }
    let frame = vec![0u8; frame_len];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    // The kernel wants data_end = the frame's length and the device in this namespace.
    let mut context = [0u8; 24];
    context[4..8].copy_from_slice(&(frame_len as u32).to_ne_bytes());
    context[12..16].copy_from_slice(&wire.wire_ifindex.to_ne_bytes());
    while !stop.load(Ordering::Relaxed) {
        let options = TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(&context),
            repeat: FLOOD_CHUNK,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..TestRunOptions::default()
        };
        match program.test_run(options) {
            Ok(_) => {}
            // The stop signal; the frames sent so far are counted by the program.
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Runs generators on `cores`, sending `frame_len`-byte frames, while `during` runs, then
/// stops them.
fn with_generators<T>(
    program: &Xdp,
    wire: &Wire,
    cores: &[usize],
    frame_len: usize,
    during: impl FnOnce() -> BenchResult<T>,
) -> BenchResult<T> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (ids, id) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for &core in cores {
            let stop = &stop;
            let ids = ids.clone();
            threads.push(scope.spawn(move || {
                let _ = ids.send(nix::sys::pthread::pthread_self());
                generate(program, wire, core, frame_len, stop)
            }));
        }
        let ids: Vec<_> = id.iter().take(threads.len()).collect();
        let result = during();
        stop.store(true, Ordering::Relaxed);
        // Signal until every generator has seen the flag: a signal that lands between its
        // check of the flag and the next call would otherwise be missed.
        while threads.iter().any(|t| !t.is_finished()) {
            for &thread in &ids {
                let _ = nix::sys::pthread::pthread_kill(thread, nix::sys::signal::Signal::SIGUSR1);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for thread in threads {
            thread.join().map_err(|_| "generator panicked")??;
        }
        result
    })
}

fn measure_between(
    contender: Contender,
    traffic: Traffic,
    sink: Sink,
    before: &Sample,
    after: &Sample,
) -> Measurement {
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let per_server: Vec<u64> = (1..=REAL_SERVERS)
        .map(|slot| after.sink[slot] - before.sink[slot])
        .collect();
    let forwarded: u64 = per_server.iter().sum();
    let busy = after.cpu.0.saturating_sub(before.cpu.0) as f64;
    let total = after.cpu.1.saturating_sub(before.cpu.1).max(1) as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    Measurement {
        contender,
        traffic,
        sink,
        forwarded_pps: forwarded as f64 / seconds,
        generated_pps: (after.generated - before.generated) as f64 / seconds,
        entered_pps: (after.entered - before.entered) as f64 / seconds,
        per_server,
        other_pps: (after.sink[0] - before.sink[0]) as f64 / seconds,
        busy_cores: busy / total * cores,
        softirqs_per_frame: if forwarded == 0 {
            f64::NAN
        } else {
            softirqs_between(&before.net_rx_softirqs, &after.net_rx_softirqs) as f64
                / forwarded as f64
        },
    }
}

fn line(m: &Measurement) -> String {
    format!(
        "{:<3} {:<48} {:>10.0} pps forwarded, generated {:>10.0}, entered lb0 {:>10.0}, loss {:>5.1}%, busy cores {:.2}, softirqs/frame {:.2}",
        if m.sink == Sink::Tc { "tc" } else { "xdp" },
        row_label(m.contender, m.traffic, m.sink),
        m.forwarded_pps,
        m.generated_pps,
        m.entered_pps,
        m.loss() * 100.0,
        m.busy_cores,
        m.softirqs_per_frame
    )
}

fn median_of(
    results: &[Measurement],
    sink: Sink,
    contender: Contender,
    traffic: Traffic,
) -> Option<Measurement> {
    let mut runs: Vec<&Measurement> = results
        .iter()
        .filter(|m| m.sink == sink && m.contender == contender && m.traffic == traffic)
        .collect();
    if runs.is_empty() {
        return None;
    }
    runs.sort_by(|a, b| a.forwarded_pps.total_cmp(&b.forwarded_pps));
    Some(runs[runs.len() / 2].clone())
}

/// One sink's table: medians over the rounds, lbd's ratio to each other contender.
fn table(results: &[Measurement], sink: Sink) -> String {
    let main = Contender::Lbd { workers: 1 };
    let rows = [
        (main, Traffic::Vip),
        (Contender::Nftables, Traffic::Vip),
        (Contender::XdpKernel, Traffic::Vip),
        (Contender::MinimalXsk, Traffic::Vip),
        (Contender::Lbd { workers: 2 }, Traffic::Vip),
        (main, Traffic::Mix),
        (main, Traffic::Vip6),
        (Contender::Nftables, Traffic::Vip6),
        (Contender::XdpKernel, Traffic::Vip6),
    ];
    let lbd_pps = |traffic| {
        median_of(results, sink, main, traffic).map_or(0.0, |m: Measurement| m.forwarded_pps)
    };
    let rounds = results
        .iter()
        .filter(|m| m.sink == sink && m.contender == main && m.traffic == Traffic::Vip)
        .count();
    if rounds == 0 {
        return String::new();
    }
    let mut out = format!(
        "\n{}\nForwarded frames per second, median of {rounds} rounds (60-byte TCP SYNs to one VIP \
         from {CLIENTS} clients, {REAL_SERVERS} real servers; IPv6 rows: 74-byte TCP SYNs to \
         the service's IPv6 VIP {VIP6})\n",
        sink.name()
    );
    out += &format!(
        "{:<48} {:>10} {:>21} {:>9} {:>6} {:>6} {:>8}  {}\n",
        "contender",
        "median pps",
        "range over rounds",
        "lbd/this",
        "loss",
        "cores",
        "softirqs",
        "share per real server, %"
    );
    for (contender, traffic) in rows {
        let Some(m) = median_of(results, sink, contender, traffic) else {
            continue;
        };
        let runs: Vec<f64> = results
            .iter()
            .filter(|r| r.sink == sink && r.contender == contender && r.traffic == traffic)
            .map(|r| r.forwarded_pps)
            .collect();
        let low = runs.iter().copied().fold(f64::INFINITY, f64::min);
        let high = runs.iter().copied().fold(0.0, f64::max);
        // The ratio is lbd against the kernel's paths on the same traffic; lbd's other rows
        // have their own lines.
        let ratio = match contender {
            Contender::Nftables | Contender::XdpKernel | Contender::MinimalXsk => {
                format!("{:.2}", lbd_pps(traffic) / m.forwarded_pps.max(1.0))
            }
            _ => "-".to_owned(),
        };
        let total: u64 = m.per_server.iter().sum::<u64>().max(1);
        let shares = m
            .per_server
            .iter()
            .map(|&n| format!("{:.1}", n as f64 * 100.0 / total as f64))
            .collect::<Vec<_>>()
            .join(" ");
        out += &format!(
            "{:<48} {:>10.0} {:>10.0}-{:<10.0} {:>9} {:>5.1}% {:>6.2} {:>8.2}  {}\n",
            row_label(contender, traffic, sink),
            m.forwarded_pps,
            low,
            high,
            ratio,
            m.loss() * 100.0,
            m.busy_cores,
            m.softirqs_per_frame,
            shares
        );
        if traffic == Traffic::Mix {
            out += &format!(
                "{:<48} {:>10.0} ARP replies per second, from 1% ARP requests\n",
                "", m.other_pps
            );
        }
    }
    if let Some(minimal) = median_of(results, sink, Contender::MinimalXsk, Traffic::Vip) {
        out += &format!(
            "lbd / minimal AF_XDP forwarder: {:.2}x\n",
            lbd_pps(Traffic::Vip) / minimal.forwarded_pps.max(1.0)
        );
    }
    if let (Some(one), Some(two)) = (
        median_of(results, sink, main, Traffic::Vip),
        median_of(results, sink, Contender::Lbd { workers: 2 }, Traffic::Vip),
    ) {
        out += &format!(
            "lbd, 2 workers / 1 worker: {:.2}x\n",
            two.forwarded_pps / one.forwarded_pps.max(1.0)
        );
    }
    if lbd_pps(Traffic::Vip6) > 0.0 {
        out += &format!(
            "lbd, IPv6 / IPv4: {:.2}x\n",
            lbd_pps(Traffic::Vip6) / lbd_pps(Traffic::Vip).max(1.0)
        );
    }
    out
}

/// lbd with each `engine.tx_skb_budget`, from the same rounds (fair sink).
fn budget_table(results: &[Measurement], budgets: &[u32]) -> String {
    let median = |budget| {
        median_of(
            results,
            Sink::Tc,
            Contender::LbdBudget(budget),
            Traffic::Vip,
        )
    };
    let Some(base) = budgets.first().and_then(|&b| median(b)) else {
        return String::new();
    };
    let mut out = format!(
        "\nAF_XDP TX skb budget (frames per sendto in copy mode), lbd 1 worker, fair sink, same \
         rounds; x: against tx_skb_budget = {}\n",
        budgets[0]
    );
    for &budget in budgets {
        let Some(m) = median(budget) else { continue };
        out += &format!(
            "{:<48} {:>10.0} pps  x{:.2}  loss {:>5.1}%\n",
            Contender::LbdBudget(budget).name(),
            m.forwarded_pps,
            m.forwarded_pps / base.forwarded_pps.max(1.0),
            m.loss() * 100.0
        );
    }
    out
}

const LEGEND: &str = "loss: VIP frames generated but not received by a real server (the \
    generator sends flat out, so this is what the forwarder could not take). cores: busy cores \
    of the whole machine during the window, generator and sink included. softirqs: NET_RX \
    softirq runs on all cores per frame that reached a real server (the receive of lb0 and of \
    the sink; a run handles every frame queued by then, so below 1 means batched).\n";

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("\nMachine: {cpu}, {cores} cores, Linux {}\n", kernel.trim())
}

/// The nftables contender: the frames of the VIP get both MACs rewritten and go back out. One
/// rule, for the family of the traffic: the other's would be one more rule to pass.
fn nft_ruleset(traffic: Traffic) -> String {
    let map = (0..REAL_SERVERS)
        .map(|i| format!("{i} : {}", mac_text(real_server_mac(i))))
        .collect::<Vec<_>>()
        .join(", ");
    let (family, vip) = match traffic {
        Traffic::Vip6 => ("ip6", VIP6.to_string()),
        Traffic::Vip | Traffic::Mix => ("ip", VIP.to_string()),
    };
    format!(
        "table netdev lbdbench {{\n  chain ingress {{\n    type filter hook ingress device \"{LB_IF}\" priority 0; policy accept;\n    \
         {family} daddr {vip} ether saddr set {} ether daddr set jhash {family} saddr mod {REAL_SERVERS} map {{ {map} }} fwd to \"{LB_IF}\"\n  }}\n}}\n",
        mac_text(LB_MAC)
    )
}

/// The generator's templates (`enum template_kind`): SYN to the VIP, ARP request for the VIP,
/// SYN to a non-VIP, SYN to the IPv6 VIP.
fn frame_templates() -> BenchResult<[[u8; TEMPLATE_LEN]; 4]> {
    let syn = |ip: PacketBuilderStep<IpHeaders>| -> BenchResult<[u8; TEMPLATE_LEN]> {
        let builder = ip.tcp(40000, PORT, 1, 64240).syn();
        let mut frame = Vec::new();
        builder.write(&mut frame, &[])?;
        let mut bytes = [0u8; TEMPLATE_LEN];
        bytes
            .get_mut(..frame.len())
            .ok_or("template too long")?
            .copy_from_slice(&frame);
        Ok(bytes)
    };
    let ethernet = || PacketBuilder::ethernet2(WIRE_MAC, LB_MAC);
    let syn_to = |dst: Ipv4Addr| syn(ethernet().ipv4(FIRST_CLIENT.octets(), dst.octets(), 64));
    let syn6 = syn(ethernet().ipv6(FIRST_CLIENT6.octets(), VIP6.octets(), 64))?;
    let mut arp = [0u8; TEMPLATE_LEN];
    arp[0..6].copy_from_slice(&[0xff; 6]);
    arp[6..12].copy_from_slice(&WIRE_MAC);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp[22..28].copy_from_slice(&WIRE_MAC);
    arp[28..32].copy_from_slice(&FIRST_CLIENT.octets());
    arp[38..42].copy_from_slice(&VIP.octets());
    Ok([syn_to(VIP)?, arp, syn_to(NOT_VIP)?, syn6])
}

fn mac_key(mac: [u8; 6]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..6].copy_from_slice(&mac);
    u64::from_ne_bytes(bytes)
}

/// Frames that went through lb0's XDP receive path, all queues.
fn lb_xdp_packets() -> BenchResult<u64> {
    let output = Command::new("ethtool").args(["-S", LB_IF]).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(key, _)| key.starts_with("rx_queue_") && key.ends_with("_xdp_packets"))
        .filter_map(|(_, value)| value.trim().parse::<u64>().ok())
        .sum())
}

/// utime + stime of a process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn process_cpu_ticks(pid: u32) -> BenchResult<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = text.rsplit_once(')').ok_or("malformed stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11).ok_or("no utime")?.parse()?;
    let stime: u64 = fields.get(12).ok_or("no stime")?.parse()?;
    Ok(utime + stime)
}

/// NET_RX softirq runs so far, per core.
fn net_rx_softirqs() -> BenchResult<Vec<u32>> {
    let text = std::fs::read_to_string("/proc/softirqs")?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("NET_RX:"))
        .ok_or("no NET_RX line in /proc/softirqs")?;
    Ok(line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse::<u32>().ok())
        .collect())
}

/// Runs between two readings, over the cores: the kernel's per-core counts are 32-bit and wrap.
fn softirqs_between(before: &[u32], after: &[u32]) -> u64 {
    before
        .iter()
        .zip(after)
        .map(|(&b, &a)| u64::from(a.wrapping_sub(b)))
        .sum()
}

fn cpu_jiffies() -> BenchResult<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text.lines().next().ok_or("empty /proc/stat")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle and iowait.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// lbd started in the namespace (through `ip netns exec`, which also gives it the namespace's
/// /sys), with a config for `workers` workers.
struct LbdProcess {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl LbdProcess {
    fn start(config_path: &Path, workers: usize, engine_extra: &str) -> BenchResult<LbdProcess> {
        let text = lbd_config(workers, &Self::socket_path(), engine_extra);
        Self::start_with(config_path, &text)
    }

    fn socket_path() -> PathBuf {
        PathBuf::from(STATE_DIR).join("lbd.sock")
    }

    /// lbd with the config `text`, written to `config_path`.
    fn start_with(config_path: &Path, text: &str) -> BenchResult<LbdProcess> {
        let socket = Self::socket_path();
        let log = PathBuf::from(STATE_DIR).join("lbd.log");
        let _ = std::fs::remove_file(&socket);
        std::fs::write(config_path, text)?;
        let child = Command::new("ip")
            .args(["netns", "exec", NAMESPACE, LBD, "--config"])
            .arg(config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut lbd = LbdProcess { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if lbd.stats().is_ok() {
                return Ok(lbd);
            }
            if let Some(status) = lbd.child.try_wait()? {
                return Err(format!(
                    "lbd exited ({status}): {}",
                    std::fs::read_to_string(&lbd.log).unwrap_or_default()
                )
                .into());
            }
            if Instant::now() > deadline {
                return Err("lbd did not answer on its control socket within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stats(&self) -> BenchResult<StatsReport> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let request = Request {
            version: lbd_proto::VERSION,
            command: CtlCommand::Stats,
        };
        stream.write_all(lbd_proto::encode_line(&request).as_bytes())?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        match lbd_proto::decode_response(&line)?.outcome {
            Outcome::Ok(Reply::Stats(stats)) => Ok(*stats),
            other => Err(format!("unexpected reply {other:?}").into()),
        }
    }

    /// SIGTERM, wait, and the log it wrote.
    fn stop(mut self) -> BenchResult<String> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = self.child.wait()?;
        let log = std::fs::read_to_string(&self.log)?;
        if !status.success() {
            return Err(format!("lbd stopped with {status}: {log}").into());
        }
        Ok(log)
    }
}

impl Drop for LbdProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// lbd's config for the idle run: every setting at its default but the interface, the queue,
/// the core, copy mode and the control socket; a TCP health check (the default kind) of
/// each real server on the service's port.
fn lbd_config_defaults(socket: &Path, engine_extra: &str) -> String {
    let text = format!(
        "[engine]\ninterface = \"{LB_IF}\"\nqueues = [0]\ncores = [1]\nxdp_mode = \"copy\"\n\
         control_socket = \"{}\"\n{engine_extra}\n\
         [[service]]\nlabel = \"Wowza Streaming\"\nvip = \"{VIP}\"\nvip6 = \"{VIP6}\"\nports = \"{PORT}\"\n\
         protocol = \"tcp\"\npersistence = \"source-ip\"\n",
        socket.display()
    );
    text + &real_server_tables()
}

/// The bench's real servers as `[[service.real_server]]` tables, MACs pinned.
fn real_server_tables() -> String {
    (0..REAL_SERVERS)
        .map(|index| {
            format!(
                "\n[[service.real_server]]\nlabel = \"Wowza Srv {}\"\nip = \"{}\"\nmac = \"{}\"\n",
                index + 1,
                real_server_ip(index),
                mac_text(real_server_mac(index))
            )
        })
        .collect()
}

fn lbd_config(workers: usize, socket: &Path, engine_extra: &str) -> String {
    let queues: Vec<String> = (0..workers).map(|q| q.to_string()).collect();
    // Worker 0 on core 1, away from the single generator on core 0; with 2 workers each
    // core has a generator thread and a worker.
    let cores: Vec<String> = (0..workers).map(|q| ((q + 1) % 2).to_string()).collect();
    let text = format!(
        "[engine]\ninterface = \"{LB_IF}\"\nqueues = [{}]\ncores = [{}]\nxdp_mode = \"copy\"\n\
         control_socket = \"{}\"\ngratuitous_arp_count = 0\n{engine_extra}\n\
         [[service]]\nlabel = \"Wowza Streaming\"\nvip = \"{VIP}\"\nvip6 = \"{VIP6}\"\nports = \"{PORT}\"\n\
         protocol = \"tcp\"\npersistence = \"source-ip\"\n\n[service.health_check]\nkind = \"none\"\n",
        queues.join(", "),
        cores.join(", "),
        socket.display()
    );
    text + &real_server_tables()
}
