//! The HA pair in the namespace lab: two lbd nodes (NS_LB at .2, the primary; NS_LB2 at .3, the
//! secondary) on one segment, real nginx servers behind them, and a keep-alive client asking
//! every 20 ms through the VIP (and an RTMP stream) while the active node is killed, stopped,
//! cut off, partitioned or handed over from; the state and configuration sync between them.

mod common;

use common::{Lab, Lbd, VIP, keepalive_every, lab_allowed, lbctl_path, run};
use lbd_proto::{HaReport, Reply};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Node 1 (the primary) or 2 (the secondary).
fn namespace(node: u8) -> &'static str {
    if node == 1 { "NS_LB" } else { "NS_LB2" }
}

fn socket(lab: &Lab, node: u8) -> PathBuf {
    PathBuf::from(lab.fact("STATE_DIR")).join(format!("lbd{node}.sock"))
}

fn key(lab: &Lab) -> PathBuf {
    let path = PathBuf::from(lab.fact("STATE_DIR")).join("ha.key");
    if !path.exists() {
        std::fs::write(&path, "a test key for the pair, 32 bytes long").expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    path
}

/// The pair's configuration for `node`: "Wowza GUI" on 8088 with both real servers and
/// "Wowza Streaming" (RTMP) on 1935 with both.
fn config(lab: &Lab, node: u8, preempt: bool) -> String {
    config_with(lab, node, preempt, 2)
}

/// The same with only the first `gui_servers` real servers on 8088.
fn config_with(lab: &Lab, node: u8, preempt: bool, gui_servers: usize) -> String {
    let (role, me, peer) = if node == 1 {
        ("primary", lab.fact("LB_IP"), lab.fact("LB2_IP"))
    } else {
        ("secondary", lab.fact("LB2_IP"), lab.fact("LB_IP"))
    };
    let servers = |count: usize| lab.real_servers(count, "IP");
    format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
         [ha]\nrole = \"{role}\"\nlocal_address = \"{me}\"\npeer_address = \"{peer}\"\n\
         key_file = \"{}\"\npreempt = {preempt}\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\n{}\n\
         [[service]]\nlabel = \"Wowza Streaming\"\nvip = \"{VIP}\"\nports = 1935\n{}",
        socket(lab, node).display(),
        key(lab).display(),
        servers(gui_servers),
        servers(2),
    )
}

fn start(lab: &Lab, node: u8, preempt: bool) -> Lbd {
    Lbd::start_in(
        lab,
        namespace(node),
        &format!("lbd{node}.toml"),
        &config(lab, node, preempt),
    )
}

/// Starts both nodes and waits until the primary is active, the secondary passive and their
/// sync streams up with one configuration.
fn start_pair(lab: &Lab, gui_servers: usize) -> (Lbd, Lbd) {
    start_pair_with(lab, |n| config_with(lab, n, false, gui_servers))
}

/// Starts both nodes with `config(node)` and waits for them to pair up.
fn start_pair_with(lab: &Lab, config: impl Fn(u8) -> String) -> (Lbd, Lbd) {
    let node = |n: u8| Lbd::start_in(lab, namespace(n), &format!("lbd{n}.toml"), &config(n));
    let pair = (node(1), node(2));
    wait_for(lab, 1, "active", Duration::from_secs(3));
    wait_for(lab, 2, "passive", Duration::from_secs(3));
    wait_in_sync(lab, 2, Duration::from_secs(3));
    pair
}

/// Waits (at most `limit`) until node `node`'s banner says the pair is in sync.
fn wait_in_sync(lab: &Lab, node: u8, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (_, text) = lbctl(lab, node, &["status"]);
        let banner = text.lines().next().unwrap_or_default().to_owned();
        if banner.ends_with(", in sync") {
            return banner;
        }
        assert!(
            Instant::now() < deadline,
            "not in sync after {limit:?}: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lbctl(lab: &Lab, node: u8, args: &[&str]) -> (bool, String) {
    let output = run(Command::new(lbctl_path())
        .arg("--socket")
        .arg(socket(lab, node))
        .args(args));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

fn ha_status(lab: &Lab, node: u8) -> HaReport {
    let (ok, text) = lbctl(lab, node, &["--json", "ha", "status"]);
    assert!(ok, "lbctl ha status on node {node}: {text}");
    match serde_json::from_str::<Reply>(&text) {
        Ok(Reply::Ha(report)) => *report,
        other => panic!("ha status gave {other:?}"),
    }
}

/// Waits (at most `limit`) until node `node` reports `state`.
fn wait_for(lab: &Lab, node: u8, state: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let report = ha_status(lab, node);
        if report.state == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} is {}, not {state}, after {limit:?}: {report:?}",
            report.state
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Twelve long-lived connections, a request on each every 20 ms, for `seconds` with `during`
/// run a second in: asserts that none broke or moved and returns the longest wait seen.
fn longest_gap_while(lab: &Lab, seconds: u32, during: impl FnOnce()) -> u64 {
    let sources: Vec<String> = lab.client_ips().into_iter().take(12).collect();
    let (ok, summary) = keepalive_every(lab, &sources, &[], seconds, 0.02, during);
    assert!(ok, "connections broke or moved: {summary}");
    assert_eq!(summary["connections"], 12, "{summary}");
    summary["max_gap_ms"].as_u64().expect("max_gap_ms")
}

/// An RTMP stream published through the VIP for `seconds` (ffmpeg, 25 frames a second, in
/// real time), running until [`RtmpStream::finish`].
struct RtmpStream {
    publisher: std::process::Child,
    seconds: u32,
}

impl RtmpStream {
    fn start(lab: &Lab, seconds: u32) -> RtmpStream {
        let url = format!("rtmp://{VIP}:1935/live/failover");
        let publisher = Command::new("ip")
            .args(["netns", "exec", lab.fact("NS_CLIENT")])
            .args(["timeout", "60", "ffmpeg", "-nostdin", "-hide_banner"])
            .args(["-loglevel", "error", "-re", "-f", "lavfi"])
            .args([
                "-i",
                "testsrc=size=320x240:rate=25",
                "-t",
                &seconds.to_string(),
            ])
            .args(["-c:v", "flv", "-f", "flv", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start ffmpeg");
        RtmpStream { publisher, seconds }
    }

    /// Waits for the publisher, checks it never broke, and returns the recording's largest
    /// step between frames and its frame count, from the one server that recorded it.
    fn finish(self, lab: &Lab) -> (f64, usize) {
        let output = self.publisher.wait_with_output().expect("ffmpeg ends");
        assert!(
            output.status.success(),
            "the RTMP stream broke: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let recordings: Vec<PathBuf> = (1..=2)
            .flat_map(|i| {
                let dir = PathBuf::from(lab.fact(&format!("RS{i}_RECORD_DIR")));
                std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .filter(|path| path.to_string_lossy().contains("failover"))
            })
            .collect();
        assert_eq!(recordings.len(), 1, "one server records it: {recordings:?}");
        let probe = run(Command::new("ffprobe")
            .args(["-v", "error", "-select_streams", "v"])
            .args(["-show_entries", "packet=pts_time", "-of", "csv=p=0"])
            .arg(&recordings[0]));
        assert!(probe.status.success(), "ffprobe: {probe:?}");
        let times: Vec<f64> = String::from_utf8_lossy(&probe.stdout)
            .lines()
            .filter_map(|line| line.trim().trim_end_matches(',').parse().ok())
            .collect();
        let largest_step = times
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .fold(0.0, f64::max);
        let expected = 25 * self.seconds as usize;
        assert!(
            times.len() + 5 >= expected,
            "{} of {expected} frames recorded",
            times.len()
        );
        (largest_step, times.len())
    }
}

#[test]
fn killing_the_active_node_moves_the_traffic_in_under_a_second_and_breaks_nothing() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let (primary, _secondary) = start_pair(&lab, 2);
    let banner = wait_in_sync(&lab, 2, Duration::from_secs(1));
    assert_eq!(
        banner,
        "secondary, passive; peer 198.18.0.2 primary, active, in sync"
    );
    let stream = RtmpStream::start(&lab, 6);
    let mut primary = Some(primary);
    // The keep-alive client's connections also check that every client keeps its server.
    let gap = longest_gap_while(&lab, 5, || {
        let (_, log) = primary.take().expect("running").stop_with("KILL");
        assert!(!log.is_empty());
    });
    assert!(gap < 1000, "the longest wait was {gap} ms");
    wait_for(&lab, 2, "active", Duration::from_secs(1));
    let (step, frames) = stream.finish(&lab);
    assert!(step < 1.0, "the recording skips {step} s ({frames} frames)");
}

#[test]
fn a_planned_handover_moves_the_traffic_in_under_200_ms() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let (primary, _secondary) = start_pair(&lab, 2);
    let mut primary = Some(primary);
    let gap = longest_gap_while(&lab, 4, || {
        let (status, log) = primary.take().expect("running").stop_with("TERM");
        assert!(status.success(), "{log}");
        assert!(log.contains("handed over: the peer is active"), "{log}");
    });
    assert!(gap < 200, "the longest wait was {gap} ms");
    wait_for(&lab, 2, "active", Duration::from_millis(100));
}

#[test]
fn when_the_active_nodes_link_goes_down_the_other_takes_over() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let _pair = start_pair(&lab, 2);
    let gap = longest_gap_while(&lab, 5, || {
        let down = lab.exec("NS_LB", &["ip", "link", "set", "eth0", "down"]);
        assert!(down.status.success());
    });
    assert!(gap < 1000, "the longest wait was {gap} ms");
    wait_for(&lab, 2, "active", Duration::from_secs(1));
    wait_for(&lab, 1, "fault", Duration::from_secs(1));
}

#[test]
fn a_returning_primary_waits_for_takeover_and_then_takes_over_cleanly() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let (primary, _secondary) = start_pair(&lab, 2);
    drop(primary.stop_with("KILL"));
    wait_for(&lab, 2, "active", Duration::from_secs(2));
    // Back, without preempt: no second switch.
    let _primary = start(&lab, 1, false);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ha_status(&lab, 1).state, "passive");
    assert_eq!(ha_status(&lab, 2).state, "active");
    // Until the operator asks for it, with the same guarantees.
    let gap = longest_gap_while(&lab, 4, || {
        let (ok, text) = lbctl(&lab, 1, &["ha", "takeover"]);
        assert!(ok, "{text}");
    });
    assert!(gap < 1000, "the longest wait was {gap} ms");
    wait_for(&lab, 1, "active", Duration::from_millis(500));
    wait_for(&lab, 2, "passive", Duration::from_millis(500));
}

#[test]
fn after_a_partition_heals_exactly_one_node_is_active() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let _primary = start(&lab, 1, false);
    let _secondary = start(&lab, 2, false);
    wait_for(&lab, 1, "active", Duration::from_secs(3));
    // The heartbeats are blocked both ways at the secondary.
    let nft = |rules: &str| {
        let output = lab.exec("NS_LB2", &["nft", rules]);
        assert!(output.status.success(), "nft {rules}: {output:?}");
    };
    nft("add table inet partition");
    nft("add chain inet partition in { type filter hook input priority 0; }");
    nft("add chain inet partition out { type filter hook output priority 0; }");
    nft("add rule inet partition in udp dport 6694 drop");
    nft("add rule inet partition out udp dport 6694 drop");
    wait_for(&lab, 2, "active", Duration::from_secs(2));
    assert_eq!(
        ha_status(&lab, 1).state,
        "active",
        "each thinks the other dead"
    );
    nft("delete table inet partition");
    wait_for(&lab, 2, "passive", Duration::from_secs(1));
    assert_eq!(ha_status(&lab, 1).state, "active");
}

#[test]
fn forged_and_replayed_heartbeats_change_nothing_and_are_counted() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let _primary = start(&lab, 1, false);
    let _secondary = start(&lab, 2, false);
    wait_for(&lab, 1, "active", Duration::from_secs(3));
    wait_for(&lab, 2, "passive", Duration::from_secs(3));
    // From the client's namespace (anyone on the segment): a heartbeat that claims to be the
    // primary releasing, under a wrong key; and one under the right key but older than what
    // the secondary has seen (a replay).
    let script = r#"
import hashlib, hmac, socket, struct, sys
def beat(key, boot, seq):
    body = b"LBDH" + bytes([1, 1, 2, 1]) + socket.inet_aton("198.18.0.2")
    body += struct.pack("!QQQQ", 99, boot, seq, 1)
    return body + hmac.new(key, body, hashlib.sha256).digest()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(beat(b"not the pair's key at all", 2**62, 1), (sys.argv[2], 6694))
    s.sendto(beat(open(sys.argv[1], "rb").read().strip(), 1, 1), (sys.argv[2], 6694))
"#;
    let key = key(&lab);
    let sent = lab.exec(
        "NS_CLIENT",
        &[
            "python3",
            "-c",
            script,
            key.to_str().expect("utf-8"),
            lab.fact("LB2_IP"),
        ],
    );
    assert!(sent.status.success(), "{sent:?}");
    std::thread::sleep(Duration::from_millis(300));
    let report = ha_status(&lab, 2);
    assert_eq!(report.state, "passive", "{report:?}");
    assert!(report.rejected >= 5, "{report:?}");
    assert!(report.replayed >= 5, "{report:?}");
    assert_eq!(ha_status(&lab, 1).state, "active");
}

#[test]
fn forged_sync_streams_are_refused_and_counted() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let _pair = start_pair(&lab, 2);
    let before = ha_status(&lab, 2).sync;
    // A stream from an address that is no peer; then one from the primary's own address (its
    // namespace) that answers the challenge with entries under a made-up MAC.
    let script = r#"
import os, socket, struct, sys
def stream():
    s = socket.create_connection((sys.argv[1], 8848), timeout=2)
    s.sendall(b"LBDS" + bytes([1, 0, 0, 0]) + socket.inet_aton(sys.argv[2]) + os.urandom(16))
    return s
try:
    s = stream()
    print("challenge", len(s.recv(56)))
    body = bytes([1]) + bytes(24)
    s.sendall(struct.pack("!I", len(body)) + body + os.urandom(32))
    print("after", s.recv(1))
except OSError as error:
    print("refused", error)
"#;
    let lb2 = lab.fact("LB2_IP");
    let from_client = lab.exec(
        "NS_CLIENT",
        &["python3", "-c", script, lb2, lab.fact("CLIENT_IP")],
    );
    let from_peer = lab.exec("NS_LB", &["python3", "-c", script, lb2, lab.fact("LB_IP")]);
    let said = |output: &std::process::Output| String::from_utf8_lossy(&output.stdout).into_owned();
    // The stranger is cut off at once; the forger gets its challenge and then the door.
    assert!(
        !said(&from_client).contains("challenge 56"),
        "{}",
        said(&from_client)
    );
    assert!(
        said(&from_peer).contains("challenge 56"),
        "{}",
        said(&from_peer)
    );
    assert!(
        said(&from_peer).contains("after b''") || said(&from_peer).contains("refused"),
        "{}",
        said(&from_peer)
    );
    std::thread::sleep(Duration::from_millis(200));
    let report = ha_status(&lab, 2);
    assert!(
        report.sync.rejected >= before.rejected + 2,
        "{:?}",
        report.sync
    );
    assert_eq!(report.state, "passive");
    assert_eq!(report.sync.entries_received, before.entries_received);
    // The real primary's stream carries on.
    wait_in_sync(&lab, 2, Duration::from_secs(1));
}

#[test]
fn a_node_without_a_usable_key_does_not_start() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let key = key(&lab);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let error = common::start_error(&lab, "lbd1.toml", &config(&lab, 1, false));
    assert!(
        error.contains("lets other users read or change it") && error.contains("HA cannot start"),
        "{error}"
    );
    // Group-readable is too much: the key speaks for the active node.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let error = common::start_error(&lab, "lbd1.toml", &config(&lab, 1, false));
    assert!(error.contains("mode 640 lets other users"), "{error}");
    // Another user's file, whatever its mode: its owner could rewrite it.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(&key, Some(65534), None).expect("chown");
    let error = common::start_error(&lab, "lbd1.toml", &config(&lab, 1, false));
    assert!(error.contains("owned by uid 65534"), "{error}");
    std::os::unix::fs::chown(&key, Some(0), None).expect("chown");
    std::fs::write(&key, "short").expect("write");
    let error = common::start_error(&lab, "lbd1.toml", &config(&lab, 1, false));
    assert!(error.contains("at least 16 are needed"), "{error}");
}

/// Where a balancer with `config` (node 1's, its real servers' MACs from the lab) sends a new
/// connection from `client` to the VIP's `port`: Maglev's choice, computed with lbd's own
/// dataplane.
fn maglev_choice(lab: &Lab, config: &str, client: &str, port: u16) -> [u8; 6] {
    use lbd_engine::packet::dataplane::{Dataplane, TableSizes};
    use lbd_engine::packet::snapshot::{AdminState, ServiceIds, Snapshot};
    let config = lbd_config::Config::from_toml_str(config).expect("valid");
    let mac_of = |ip: std::net::IpAddr| {
        (1..=2).find_map(|i| {
            (lab.fact(&format!("RS{i}_IP")) == ip.to_string())
                .then(|| parse_mac(lab.fact(&format!("RS{i}_MAC"))))
        })
    };
    let own = [2, 0, 0, 0, 0, 2];
    let snapshot = Snapshot::build(
        &config,
        &mut ServiceIds::default(),
        own,
        1,
        mac_of,
        |_, _| AdminState::Online,
    );
    let mut dataplane = Dataplane::new(std::sync::Arc::new(snapshot), TableSizes::default());
    let client: std::net::Ipv4Addr = client.parse().expect("client address");
    let vip: std::net::Ipv4Addr = VIP.parse().expect("VIP");
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], own)
        .ipv4(client.octets(), vip.octets(), 64)
        .tcp(40000, port, 1, 64240)
        .syn()
        .write(&mut frame, &[])
        .expect("frame");
    dataplane.process(&mut frame, 0);
    frame[0..6].try_into().expect("MAC")
}

fn parse_mac(text: &str) -> [u8; 6] {
    lbd_engine::io::host::parse_mac(text).expect("a MAC")
}

#[test]
fn connections_keep_their_server_across_a_failover_after_the_server_set_changed() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    // "Wowza GUI" starts with server 1 alone: every connection goes there.
    let (primary, _secondary) = start_pair(&lab, 1);
    let clients: Vec<String> = lab.client_ips();
    // With server 2 added, Maglev sends some of these clients there: only the state the
    // active node shared keeps their connections where they are after the failover.
    let grown = config(&lab, 1, false);
    let rs2 = parse_mac(lab.fact("RS2_MAC"));
    let would_move = clients
        .iter()
        .filter(|client| maglev_choice(&lab, &grown, client, 8088) == rs2)
        .count();
    assert!(
        would_move >= 3,
        "only {would_move} clients would move: a weak test"
    );
    let mut primary = Some(primary);
    let (ok, summary) = keepalive_every(&lab, &clients, &[], 8, 0.02, || {
        add_second_gui_server(&lab);
        // The passive node has it within a second...
        let deadline = Instant::now() + Duration::from_secs(1);
        while status_of(&lab, 2).services[0].real_servers.len() < 2 {
            assert!(
                Instant::now() < deadline,
                "the new server did not reach node 2"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        // ...and then the active node dies.
        drop(primary.take().expect("running").stop_with("KILL"));
    });
    assert!(ok, "connections broke or moved: {summary}");
    assert_eq!(summary["connections"], clients.len(), "{summary}");
    wait_for(&lab, 2, "active", Duration::from_secs(1));
    // Persisted clients keep their server for their new connections too.
    for client in &clients {
        assert_eq!(server_for(&lab, client), "rs1", "client {client}");
    }
    let sync = ha_status(&lab, 2).sync;
    assert!(
        sync.entries_installed >= 2 * clients.len() as u64,
        "{sync:?}"
    );
}

/// Adds rs2 to "Wowza GUI" on the active node (node 1).
fn add_second_gui_server(lab: &Lab) {
    let (added, text) = lbctl(
        lab,
        1,
        &[
            "add-rip",
            "Wowza GUI",
            "Wowza Srv 2",
            "--ip",
            lab.fact("RS2_IP"),
        ],
    );
    assert!(added, "{text}");
}

/// The real server (`rs1`, `rs2`) a new HTTP connection from `source` through the VIP reaches.
fn server_for(lab: &Lab, source: &str) -> String {
    common::http_get(lab, source, &format!("http://{VIP}:8088/"))["server"].clone()
}

fn status_of(lab: &Lab, node: u8) -> lbd_proto::StatusReport {
    let (ok, text) = lbctl(lab, node, &["--json", "status"]);
    assert!(ok, "{text}");
    match serde_json::from_str::<Reply>(&text) {
        Ok(Reply::Status(report)) => report,
        other => panic!("status gave {other:?}"),
    }
}

#[test]
fn a_change_on_the_active_node_reaches_the_passive_one_which_refuses_its_own() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let _pair = start_pair(&lab, 2);
    let state_on = |node: u8| {
        status_of(&lab, node).services[0].real_servers[1]
            .state
            .clone()
    };
    let (ok, text) = lbctl(&lab, 1, &["drain", "Wowza GUI", "Wowza Srv 2"]);
    assert!(ok, "{text}");
    let changed = Instant::now();
    while state_on(2) != "drain" {
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "node 2 still shows {} a second later",
            state_on(2)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, text) = lbctl(
        &lab,
        1,
        &["set-weight", "Wowza Streaming", "Wowza Srv 1", "7"],
    );
    assert!(ok, "{text}");
    let banner = wait_in_sync(&lab, 2, Duration::from_secs(1));
    assert_eq!(
        banner,
        "secondary, passive; peer 198.18.0.2 primary, active, in sync"
    );
    assert_eq!(status_of(&lab, 2).services[1].real_servers[0].weight, 7);
    assert_eq!(ha_status(&lab, 2).generation, 2);
    // A change on the passive node is refused, naming the active one; nothing changes.
    let (ok, text) = lbctl(&lab, 2, &["online", "Wowza GUI", "Wowza Srv 2"]);
    assert!(!ok);
    assert!(
        text.contains("passive and follows the configuration of the active node, 198.18.0.2"),
        "{text}"
    );
    assert_eq!(state_on(2), "drain");
    // Once it is active (the primary hands over), it takes changes and keeps what it had.
    let (ok, text) = lbctl(&lab, 1, &["ha", "release"]);
    assert!(ok, "{text}");
    wait_for(&lab, 2, "active", Duration::from_secs(1));
    let (ok, text) = lbctl(&lab, 2, &["online", "Wowza GUI", "Wowza Srv 2"]);
    assert!(ok, "{text}");
    // And the old primary, now passive, follows it.
    let changed = Instant::now();
    while state_on(1) != "up" {
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "node 1 shows {}",
            state_on(1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// keepalived running docs/keepalived.conf in node `node`'s namespace, made that node's (its
/// addresses, priority, lbctl and socket); stopped when dropped.
struct Keepalived {
    child: std::process::Child,
    dir: PathBuf,
    node: u8,
}

impl Keepalived {
    fn start(lab: &Lab, node: u8) -> Keepalived {
        let documented = std::fs::read_to_string(common::repo_root().join("docs/keepalived.conf"))
            .expect("docs/keepalived.conf");
        let mut text = documented.clone();
        let mut replace = |from: &str, to: &str| {
            assert!(text.contains(from), "docs/keepalived.conf has no {from:?}");
            text = text.replace(from, to);
        };
        replace("/usr/local/bin/lbctl", &lbctl_path().display().to_string());
        replace(
            "/run/lbd/lbd.sock",
            &socket(lab, node).display().to_string(),
        );
        if node == 2 {
            // As the file's header says for the secondary.
            replace("unicast_src_ip 198.18.0.2", "unicast_src_ip 198.18.0.3");
            replace("        198.18.0.3\n", "        198.18.0.2\n");
            replace("priority 150", "priority 100");
            replace("router_id lbd-primary", "router_id lbd-secondary");
        }
        let dir = PathBuf::from(lab.fact("STATE_DIR"));
        let conf = dir.join(format!("keepalived{node}.conf"));
        std::fs::write(&conf, text).expect("write keepalived.conf");
        let pid = |name: &str| dir.join(format!("keepalived{node}.{name}.pid"));
        let child = Command::new("ip")
            .args(["netns", "exec", lab.fact(namespace(node))])
            .args(["keepalived", "--dont-fork", "--log-console", "--log-detail"])
            .arg("--use-file")
            .arg(&conf)
            .arg("--pid")
            .arg(pid("main"))
            .arg("--vrrp_pid")
            .arg(pid("vrrp"))
            .arg("--checkers_pid")
            .arg(pid("checkers"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start keepalived");
        Keepalived { child, dir, node }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        // Its VRRP child first: it outlives a parent killed alone.
        for name in ["vrrp", "checkers", "main"] {
            let path = self.dir.join(format!("keepalived{}.{name}.pid", self.node));
            if let Ok(pid) = std::fs::read_to_string(&path) {
                let _ = Command::new("kill")
                    .args(["-KILL", pid.trim()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills every process in node `node`'s namespace at once: the node dies.
fn kill_node(lab: &Lab, node: u8) {
    let output = run(Command::new("ip").args(["netns", "pids", lab.fact(namespace(node))]));
    let pids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(!pids.is_empty(), "nothing runs in node {node}'s namespace");
    let killed = run(Command::new("kill").arg("-KILL").args(&pids));
    assert!(killed.status.success(), "{killed:?}");
}

#[test]
fn keepalived_decides_for_an_external_mode_pair_with_the_documented_configuration() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let node = |n: u8| {
        Lbd::start_in(
            &lab,
            namespace(n),
            &format!("lbd{n}.toml"),
            &config(&lab, n, false).replace("[ha]\n", "[ha]\nmode = \"external\"\n"),
        )
    };
    let (_primary, _secondary) = (node(1), node(2));
    // No heartbeat of its own: both wait for keepalived.
    std::thread::sleep(Duration::from_millis(500));
    for n in [1, 2] {
        let report = ha_status(&lab, n);
        assert_eq!(
            (report.state.as_str(), report.heartbeats_sent),
            ("passive", 0),
            "{report:?}"
        );
    }
    let _keepalived = (Keepalived::start(&lab, 1), Keepalived::start(&lab, 2));
    wait_for(&lab, 1, "active", Duration::from_secs(5));
    wait_for(&lab, 2, "passive", Duration::from_secs(1));
    let gap = longest_gap_while(&lab, 5, || kill_node(&lab, 1));
    assert!(gap < 1000, "the longest wait was {gap} ms");
    wait_for(&lab, 2, "active", Duration::from_secs(1));
}

#[test]
fn ipv6_clients_keep_their_server_across_a_failover_after_the_server_set_changed() {
    if !lab_allowed() {
        return;
    }
    const VIP6: &str = "2001:2::100";
    let lab = Lab::up_with_options(2, 2, &["--vip6", VIP6]);
    let dual_stack = |n: u8| {
        config_with(&lab, n, false, 1).replace(
            &format!("vip = \"{VIP}\"\n"),
            &format!("vip = \"{VIP}\"\nvip6 = \"{VIP6}\"\n"),
        )
    };
    let (primary, _secondary) = start_pair_with(&lab, dual_stack);
    let server_for6 = |source: &str| -> String {
        common::http_get(&lab, source, &format!("http://[{VIP6}]:8088/"))["server"].clone()
    };
    // With server 1 alone, every IPv6 client is persisted there (and shared).
    let clients: Vec<String> = lab
        .fact("CLIENT_IPS6")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    for client in &clients {
        assert_eq!(server_for6(client), "rs1");
    }
    add_second_gui_server(&lab);
    // New clients (each /64's second address) now spread: Maglev alone would move some of the
    // old ones too.
    let fresh = clients
        .iter()
        .filter(|client| server_for6(&client.replace("::1", "::2")) == "rs2")
        .count();
    assert!(
        fresh >= 3,
        "only {fresh} new clients went to rs2: a weak test"
    );
    std::thread::sleep(Duration::from_millis(500));
    drop(primary.stop_with("KILL"));
    wait_for(&lab, 2, "active", Duration::from_secs(2));
    for client in &clients {
        assert_eq!(server_for6(client), "rs1", "{client} keeps its server");
    }
    let sync = ha_status(&lab, 2).sync;
    assert!(sync.entries_installed >= clients.len() as u64, "{sync:?}");
}
