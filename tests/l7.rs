//! Layer 7 SNAT services through HAProxy, in the namespace lab: nginx real servers that listen
//! on 8080 only (HTTP) and 1935 (RTMP), a SNAT VIP (198.18.0.101) beside a DR VIP
//! (198.18.0.100), real curl and ffmpeg clients, lbd driving a real HAProxy.

mod common;

use common::{
    LBD, Lab, Lbd, finished, lab_allowed, lbctl_ok, nginx, publish, recorded, run, status,
    wait_for_state,
};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const SNAT_VIP: &str = "198.18.0.101";
const DR_VIP: &str = common::VIP;

/// A lab whose servers serve HTTP on 8080 only, with both VIPs.
fn lab(servers: usize, balancers: usize) -> Lab {
    Lab::up_with_options(
        servers,
        balancers,
        &["--http-port", "8080", "--vip", DR_VIP, "--vip", SNAT_VIP],
    )
}

/// `[[service.real_server]]` tables for the lab's servers `first..=last`, with `extra` lines.
fn servers(lab: &Lab, range: std::ops::RangeInclusive<usize>, extra: &str) -> String {
    range
        .map(|i| {
            format!(
                "\n[[service.real_server]]\nlabel = \"Wowza Srv {i}\"\nip = \"{}\"\n{extra}",
                lab.fact(&format!("RS{i}_IP"))
            )
        })
        .collect()
}

/// The guide's Layer 7 setup on the SNAT VIP ("Wowza GUI" HTTP 8088 -> 8080, "Wowza Streaming
/// L7" TCP 1935), and the streaming service in DR mode on the DR VIP. `[engine]` and `ha` come
/// first; `count` servers each.
fn config(lab: &Lab, head: &str, count: usize) -> String {
    format!(
        "{head}\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{SNAT_VIP}\"\nports = 8088\nmode = \"snat\"\n\
         layer7_protocol = \"http\"\n\n\
         [service.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval_ms = 300\n\
         timeout_ms = 200\n{}\n\
         [[service]]\nlabel = \"Wowza Streaming L7\"\nvip = \"{SNAT_VIP}\"\nports = 1935\n\
         mode = \"snat\"\nlayer7_protocol = \"tcp\"\n{}\n\
         [[service]]\nlabel = \"Wowza Streaming\"\nvip = \"{DR_VIP}\"\nports = 1935\n{}",
        servers(lab, 1..=count, "port = 8080\n"),
        servers(lab, 1..=count.min(2), ""),
        servers(lab, 1..=count, ""),
    )
}

fn engine(lab: &Lab) -> String {
    format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}/lbd.sock\"\n",
        lab.fact("STATE_DIR")
    )
}

fn start(lab: &Lab, count: usize) -> Lbd {
    Lbd::start(lab, &config(lab, &engine(lab), count))
}

/// An HTTP GET through `vip`:`port` from `source`: the body's words.
fn get(lab: &Lab, source: &str, vip: &str, port: u16) -> std::collections::HashMap<String, String> {
    common::http_get(lab, source, &format!("http://{vip}:{port}/"))
}

#[test]
fn http_through_haproxy_translates_the_port_keeps_each_client_and_names_it() {
    if !lab_allowed() {
        return;
    }
    let lab = lab(2, 1);
    let _lbd = start(&lab, 2);
    let clients: Vec<String> = lab.client_ips().into_iter().take(20).collect();
    let mut used = std::collections::BTreeSet::new();
    for client in &clients {
        let first = get(&lab, client, SNAT_VIP, 8088);
        // The server saw the balancer, and the client in X-Forwarded-For.
        assert_eq!(first["client"], lab.fact("LB_IP"), "{first:?}");
        assert_eq!(&first["xff"], client, "{first:?}");
        for _ in 0..2 {
            assert_eq!(
                get(&lab, client, SNAT_VIP, 8088)["server"],
                first["server"],
                "{client}"
            );
        }
        used.insert(first["server"].clone());
    }
    assert_eq!(used.len(), 2, "both servers take clients: {used:?}");
    let report = status(&lab);
    let gui = &report.services[0];
    assert_eq!(
        (gui.method.as_str(), gui.mode.as_str()),
        ("Layer 7", "SNAT")
    );
    assert!(
        gui.real_servers
            .iter()
            .all(|rs| rs.port == Some(8080) && rs.state == "up"),
        "{gui:?}"
    );
    let human = lbctl_ok(&lab, &["status"]);
    assert!(
        human.contains("198.18.0.11:8080") && human.contains("Layer 7"),
        "{human}"
    );
    let stats = lbctl_ok(&lab, &["--json", "stats"]);
    let stats: lbd_proto::Reply = serde_json::from_str(&stats).expect("stats");
    let lbd_proto::Reply::Stats(stats) = stats else {
        panic!("{stats:?}")
    };
    assert!(stats.layer7[0].total_sessions >= 60, "{:?}", stats.layer7);
    // The configuration round-trips its new keys.
    let shown = lbctl_ok(&lab, &["config", "show"]);
    assert!(
        shown.contains("mode = \"snat\"")
            && shown.contains("layer7_protocol = \"http\"")
            && shown.contains("port = 8080"),
        "{shown}"
    );
}

#[test]
fn rtmp_through_haproxy_keeps_a_client_on_one_server_beside_a_dr_service() {
    if !lab_allowed() {
        return;
    }
    let lab = lab(2, 1);
    let _lbd = start(&lab, 2);
    // The SNAT and the DR streaming services at once.
    let snat = publish(&lab, &format!("rtmp://{SNAT_VIP}:1935/live/first"), 3);
    let dr = publish(&lab, &format!("rtmp://{DR_VIP}:1935/live/direct"), 3);
    // And HTTP through the SNAT VIP meanwhile.
    get(&lab, &lab.client_ips()[0], SNAT_VIP, 8088);
    finished(snat);
    finished(dr);
    let first = recorded(&lab, 2, "first");
    assert_eq!(first.len(), 1, "one server records it: {first:?}");
    assert_eq!(recorded(&lab, 2, "direct").len(), 1);
    let again = publish(&lab, &format!("rtmp://{SNAT_VIP}:1935/live/second"), 2);
    finished(again);
    let second = recorded(&lab, 2, "second");
    assert_eq!(
        second.iter().map(|(i, _)| i).collect::<Vec<_>>(),
        first.iter().map(|(i, _)| i).collect::<Vec<_>>(),
        "the same client, the same server"
    );
}

#[test]
fn a_dead_server_goes_down_its_clients_move_and_it_comes_back() {
    if !lab_allowed() {
        return;
    }
    let lab = lab(2, 1);
    let _lbd = start(&lab, 2);
    wait_for_state(
        &lab,
        "Wowza GUI",
        "Wowza Srv 1",
        "up",
        Duration::from_secs(5),
    );
    nginx(&lab, 1, true);
    // fall 2 x interval 300 ms + timeout: well within 3 s.
    wait_for_state(
        &lab,
        "Wowza GUI",
        "Wowza Srv 1",
        "down",
        Duration::from_secs(3),
    );
    for client in lab.client_ips().iter().take(10) {
        assert_eq!(
            get(&lab, client, SNAT_VIP, 8088)["server"],
            "rs2",
            "{client}"
        );
    }
    let report = status(&lab);
    assert!(
        report.services[0].real_servers[0]
            .check
            .as_deref()
            .unwrap_or("")
            .contains("L4CON"),
        "{report:?}"
    );
    nginx(&lab, 1, false);
    wait_for_state(
        &lab,
        "Wowza GUI",
        "Wowza Srv 1",
        "up",
        Duration::from_secs(3),
    );
}

#[test]
fn live_changes_leave_a_running_stream_alone() {
    if !lab_allowed() {
        return;
    }
    let lab = lab(3, 1);
    let _lbd = start(&lab, 2);
    let stream = publish(&lab, &format!("rtmp://{SNAT_VIP}:1935/live/steady"), 9);
    // Which server carries it: the one whose recording grows.
    let deadline = Instant::now() + Duration::from_secs(4);
    let carrier = loop {
        if let [(server, _)] = recorded(&lab, 2, "steady")[..] {
            break server;
        }
        assert!(Instant::now() < deadline, "no server records the stream");
        std::thread::sleep(Duration::from_millis(100));
    };
    let other = format!("Wowza Srv {}", 3 - carrier);
    let service = "Wowza Streaming L7";
    let rs3 = lab.fact("RS3_IP").to_owned();
    for change in [
        vec!["set-weight", service, &other, "50"],
        vec!["drain", service, &other],
        vec!["online", service, &other],
        vec!["halt", service, &other],
        vec!["online", service, &other],
        // A new server and its removal: HAProxy reloads, the stream stays on the old worker.
        vec!["add-rip", service, "Wowza Srv 3", "--ip", &rs3],
        vec!["set-weight", service, &format!("Wowza Srv {carrier}"), "70"],
        vec!["del-rip", service, "Wowza Srv 3"],
    ] {
        lbctl_ok(&lab, &change);
        std::thread::sleep(Duration::from_millis(300));
    }
    finished(stream);
    let steady = recorded(&lab, 3, "steady");
    assert_eq!(
        steady.len(),
        1,
        "the stream stayed on one server: {steady:?}"
    );
    assert_eq!(steady[0].0, carrier);
    // About 9 s of 320x240 FLV: far more than a broken stream's few seconds would leave.
    let probe = run(Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(
            std::fs::read_dir(lab.fact(&format!("RS{carrier}_RECORD_DIR")))
                .expect("records")
                .filter_map(Result::ok)
                .find(|e| e.file_name().to_string_lossy().starts_with("steady"))
                .expect("the recording")
                .path(),
        ));
    let seconds: f64 = String::from_utf8_lossy(&probe.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    assert!(seconds > 8.0, "the recording holds {seconds} s of 9");
}

#[test]
fn what_lbd_cannot_serve_it_refuses_at_start_with_the_reason() {
    if !lab_allowed() {
        return;
    }
    let lab = lab(2, 1);
    let path = PathBuf::from(lab.fact("STATE_DIR")).join("snat.toml");
    std::fs::write(&path, config(&lab, &engine(&lab), 2)).expect("write");
    // Without HAProxy on the PATH.
    let output = lab.exec(
        "NS_LB",
        &[
            "env",
            "PATH=/usr/bin:/bin",
            LBD,
            "--config",
            path.to_str().expect("utf-8"),
        ],
    );
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("needs HAProxy") && said.contains("apt-get install haproxy"),
        "{said}"
    );
    // A SNAT VIP off the segment.
    let far = config(&lab, &engine(&lab), 2).replace(SNAT_VIP, "203.0.113.9");
    let said = common::start_error(&lab, "far.toml", &far);
    assert!(
        said.contains("203.0.113.9 is on none of eth0's networks"),
        "{said}"
    );
}

#[test]
fn a_client_keeps_its_snat_server_across_a_handover() {
    if !lab_allowed() {
        return;
    }
    let lab = lab(2, 2);
    let dir = lab.fact("STATE_DIR").to_owned();
    let key = format!("{dir}/ha.key");
    std::fs::write(&key, "a test key for the pair, 32 bytes long").expect("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let node = |n: u8| {
        let (namespace, role, me, peer) = if n == 1 {
            ("NS_LB", "primary", lab.fact("LB_IP"), lab.fact("LB2_IP"))
        } else {
            ("NS_LB2", "secondary", lab.fact("LB2_IP"), lab.fact("LB_IP"))
        };
        let head = format!(
            "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{dir}/lbd{n}.sock\"\n\n\
             [ha]\nrole = \"{role}\"\nlocal_address = \"{me}\"\npeer_address = \"{peer}\"\nkey_file = \"{key}\"\n"
        );
        Lbd::start_in(
            &lab,
            namespace,
            &format!("lbd{n}.toml"),
            &config(&lab, &head, 2),
        )
    };
    let primary = node(1);
    let _secondary = node(2);
    let ha_state = |n: u8| {
        let output = run(Command::new(common::lbctl_path())
            .arg("--socket")
            .arg(format!("{dir}/lbd{n}.sock"))
            .args(["--json", "ha", "status"]));
        let reply: lbd_proto::Reply = serde_json::from_slice(&output.stdout).expect("ha status");
        match reply {
            lbd_proto::Reply::Ha(report) => report.state,
            other => panic!("{other:?}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while ha_state(1) != "active" || ha_state(2) != "passive" {
        assert!(Instant::now() < deadline, "the pair did not settle");
        std::thread::sleep(Duration::from_millis(100));
    }
    // One client first, so that the others' places in the round robin differ from what a
    // fresh HAProxy would give them: only the shared stick table keeps them.
    get(&lab, &lab.client_ips()[23], SNAT_VIP, 8088);
    let clients: Vec<String> = lab.client_ips().into_iter().take(8).collect();
    let before: Vec<String> = clients
        .iter()
        .map(|c| get(&lab, c, SNAT_VIP, 8088)["server"].clone())
        .collect();
    // HAProxy shares its stick table with the peer's over TCP 7778.
    std::thread::sleep(Duration::from_secs(1));
    let (status, log) = primary.stop_with("TERM");
    assert!(status.success(), "{log}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while ha_state(2) != "active" {
        assert!(Instant::now() < deadline, "the secondary did not take over");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (client, server) in clients.iter().zip(&before) {
        assert_eq!(
            &get(&lab, client, SNAT_VIP, 8088)["server"],
            server,
            "client {client}"
        );
    }
}
