//! The HA pair in the namespace lab: two lbd nodes (NS_LB at .2, the primary; NS_LB2 at .3, the
//! secondary) on one segment, real nginx servers behind them, and a keep-alive client asking
//! every 20 ms through the VIP while the active node is killed, stopped, cut off, partitioned
//! or handed over from.

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

/// The pair's configuration for `node`: one service on 8088 with both real servers.
fn config(lab: &Lab, node: u8, preempt: bool) -> String {
    let (role, me, peer) = if node == 1 {
        ("primary", lab.fact("LB_IP"), lab.fact("LB2_IP"))
    } else {
        ("secondary", lab.fact("LB2_IP"), lab.fact("LB_IP"))
    };
    format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
         [ha]\nrole = \"{role}\"\nlocal_address = \"{me}\"\npeer_address = \"{peer}\"\n\
         key_file = \"{}\"\npreempt = {preempt}\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{}\"\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{}\"\n",
        socket(lab, node).display(),
        key(lab).display(),
        lab.fact("RS1_IP"),
        lab.fact("RS2_IP"),
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

#[test]
fn killing_the_active_node_moves_the_traffic_in_under_a_second_and_breaks_nothing() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let primary = start(&lab, 1, false);
    let _secondary = start(&lab, 2, false);
    wait_for(&lab, 1, "active", Duration::from_secs(3));
    wait_for(&lab, 2, "passive", Duration::from_secs(3));
    let (_, banner) = lbctl(&lab, 2, &["status"]);
    assert!(
        banner.starts_with("secondary, passive; peer 198.18.0.2 primary, active, in sync"),
        "{banner}"
    );
    let mut primary = Some(primary);
    let gap = longest_gap_while(&lab, 5, || {
        let (_, log) = primary.take().expect("running").stop_with("KILL");
        assert!(!log.is_empty());
    });
    assert!(gap < 1000, "the longest wait was {gap} ms");
    wait_for(&lab, 2, "active", Duration::from_secs(1));
}

#[test]
fn a_planned_handover_moves_the_traffic_in_under_200_ms() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_pair(2);
    let primary = start(&lab, 1, false);
    let _secondary = start(&lab, 2, false);
    wait_for(&lab, 1, "active", Duration::from_secs(3));
    wait_for(&lab, 2, "passive", Duration::from_secs(3));
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
    let _primary = start(&lab, 1, false);
    let _secondary = start(&lab, 2, false);
    wait_for(&lab, 1, "active", Duration::from_secs(3));
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
    let primary = start(&lab, 1, false);
    let _secondary = start(&lab, 2, false);
    wait_for(&lab, 1, "active", Duration::from_secs(3));
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
    std::fs::write(&key, "short").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let error = common::start_error(&lab, "lbd1.toml", &config(&lab, 1, false));
    assert!(error.contains("at least 16 are needed"), "{error}");
}
