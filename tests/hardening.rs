//! What must not be lost silently, in the namespace lab: frames larger than a UMEM frame holds
//! (refused at start, counted live after), IP fragments where two services share a VIP, and
//! connections after a flood of spoofed segments (no table or connection limit exhausted, a
//! drain keeps what it promises).

mod common;

use common::{
    Lab, Lbd, VIP, keepalive_while, lab_allowed, lbctl_ok, repo_root, run, start_error, stats,
    status,
};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Sets the MTU of every link between the client and the balancer.
fn set_path_mtu(lab: &Lab, mtu: u32) {
    let mtu = mtu.to_string();
    for (namespace, link) in [
        ("NS_CLIENT", "eth0"),
        ("NS_SWITCH", "p-cl"),
        ("NS_SWITCH", "p-lb"),
        ("NS_SWITCH", "br0"),
        ("NS_LB", "eth0"),
    ] {
        let output = lab.exec(namespace, &["ip", "link", "set", link, "mtu", &mtu]);
        assert!(
            output.status.success(),
            "mtu {mtu} on {link}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn frames_larger_than_a_umem_frame_are_refused_at_start_and_counted_while_running() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(1);
    let config = lab.config(1);
    let small_frames = config.replace("queues = [0]", "queues = [0]\nframe_size = 2048");

    // Jumbo frames do not fit a 4096-byte UMEM frame; 3000-byte ones not a 2048-byte one.
    set_path_mtu(&lab, 9000);
    let error = start_error(&lab, "jumbo.toml", &config);
    assert!(
        error.contains("interface eth0 has MTU 9000")
            && error.contains("lower the MTU to 3826 or less"),
        "{error}"
    );
    set_path_mtu(&lab, 3000);
    let error = start_error(&lab, "small-frames.toml", &small_frames);
    assert!(
        error.contains("MTU 3000") && error.contains("engine.frame_size = 2048 holds 1792"),
        "{error}"
    );

    // Raised while lbd runs: the kernel drops what does not fit, and lbctl stats says so.
    set_path_mtu(&lab, 1500);
    let mut lbd = Lbd::start(&lab, &small_frames);
    set_path_mtu(&lab, 3000);
    let ping = lab.exec(
        "NS_CLIENT",
        &[
            "ping", "-c", "3", "-i", "0.2", "-W", "1", "-M", "do", "-s", "2500", VIP,
        ],
    );
    assert!(
        !ping.status.success(),
        "a 2528-byte packet cannot reach lbd"
    );
    let socket = stats(&lab)
        .total
        .socket
        .expect("the kernel's socket counters");
    assert!(socket.rx_dropped >= 3, "{socket:?}");
    lbd.wait_for_log(
        "the interface MTU rose past what a UMEM frame holds",
        Duration::from_secs(3),
    );
    // Frames that fit are served as before.
    let ping = lab.exec(
        "NS_CLIENT",
        &["ping", "-c", "1", "-W", "2", "-s", "1000", VIP],
    );
    assert!(ping.status.success());
}

#[test]
fn later_fragments_follow_their_first_where_two_services_share_the_vip() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    // Two UDP services on one VIP, each with a server of its own: only a datagram's first
    // fragment carries the port that says whose it is.
    let mut config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n",
        lab.socket().display()
    );
    for (label, port, server) in [("Media A", 5000, 1), ("Media B", 6000, 2)] {
        config += &format!(
            "\n[[service]]\nlabel = \"{label}\"\nvip = \"{VIP}\"\nports = {port}\nprotocol = \"udp\"\n\
             [service.health_check]\nkind = \"none\"\n\
             [[service.real_server]]\nlabel = \"rs{server}\"\nip = \"{}\"\n",
            lab.fact(&format!("RS{server}_IP"))
        );
    }
    let _lbd = Lbd::start(&lab, &config);
    let sink = repo_root().join("tests/clients/udp_sink.py");
    let sinks: Vec<_> = (1..=2)
        .map(|i| {
            let mut child = Command::new("ip")
                .args(["netns", "exec", lab.fact(&format!("NS_RS{i}")), "python3"])
                .arg(&sink)
                .args(["--ports", "5000,6000", "--seconds", "6"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("start a UDP sink");
            let mut ready = String::new();
            let stdout = child.stdout.as_mut().expect("stdout");
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready)
                .expect("sink ready");
            child
        })
        .collect();
    // 4000-byte datagrams from every client address: the client's kernel sends each in three
    // fragments (MTU 1500).
    // (The client learns the VIP's MAC first: while it waits for ARP its kernel holds only
    // so many packets, and drops the rest.)
    let ping = lab.exec("NS_CLIENT", &["ping", "-c", "1", "-W", "2", VIP]);
    assert!(ping.status.success(), "the VIP answers ping");
    let script = "import socket, sys, time\n\
                  for source in sys.argv[2].split():\n\
                  \x20   for port in (5000, 6000):\n\
                  \x20       s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                  \x20       s.bind((source, 0))\n\
                  \x20       s.sendto(b'x' * 4000, (sys.argv[1], port))\n\
                  \x20       s.close()\n\
                  \x20       time.sleep(0.002)";
    let clients = lab.client_ips().join(" ");
    let sent = lab.exec("NS_CLIENT", &["python3", "-c", script, VIP, &clients]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    // Each server got every datagram of its own service, whole, and nothing of the other's.
    let clients = lab.client_ips().len();
    for (i, (child, (mine, other))) in sinks
        .into_iter()
        .zip([("5000", "6000"), ("6000", "5000")])
        .enumerate()
    {
        let output = child.wait_with_output().expect("sink ends");
        let received: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("sink said {}", String::from_utf8_lossy(&output.stdout)));
        // Where a datagram was lost, if one was: lbd's counters and the server's reassembly.
        let explain = || {
            let server = lab.exec(
                &format!("NS_RS{}", i + 1),
                &["nstat", "-az", "IpReasm*", "Udp*"],
            );
            format!(
                "{received}\nlbd: {:?}\nrs{}: {}",
                stats(&lab).total,
                i + 1,
                String::from_utf8_lossy(&server.stdout)
            )
        };
        assert_eq!(
            received[mine],
            serde_json::json!({ "4000": clients }),
            "{}",
            explain()
        );
        assert_eq!(received[other], serde_json::json!({}), "{}", explain());
    }
    let report = stats(&lab);
    assert!(
        !report.total.drops.contains_key("fragment_unmatched"),
        "{report:?}"
    );
}

#[test]
fn spoofed_segments_exhaust_no_table_and_no_server_and_drain_keeps_its_promise() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\
         flow_table_size = 1024\npersistence_table_size = 1024\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{}\"\nmax_connections = 200\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{}\"\nmax_connections = 200\n",
        lab.socket().display(),
        lab.fact("RS1_IP"),
        lab.fact("RS2_IP")
    );
    let _lbd = Lbd::start(&lab, &config);
    let flood = repo_root().join("tests/clients/flood.py");
    for (flags, count, first) in [("ack", "1000", "0"), ("syn", "3000", "1000")] {
        let output = run(Command::new("ip")
            .args(["netns", "exec", lab.fact("NS_CLIENT"), "python3"])
            .arg(&flood)
            .args([
                "--dst-mac",
                lab.fact("LB_MAC"),
                "--src-mac",
                lab.fact("CLIENT_MAC"),
            ])
            .args([
                "--vip", VIP, "--flags", flags, "--count", count, "--first", first,
            ]));
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    // Bare ACKs of connections nobody opened are recorded nowhere; SYNs that never complete
    // fill the flow table only with entries that give way, and persist nobody.
    let report = stats(&lab);
    assert!(report.total.forwarded_packets >= 4000, "{report:?}");
    assert_eq!(report.total.persistent_clients, 0, "{report:?}");
    assert!(report.total.flow_evictions > 0, "{report:?}");
    for rs in &status(&lab).services[0].real_servers {
        assert_eq!(rs.state, "up", "{rs:?}");
        assert!(rs.conns < 200, "{rs:?}");
    }
    // Connections opened after the flood are tracked: a drain of every server keeps them.
    let sources: Vec<String> = lab.client_ips().into_iter().take(7).collect();
    let (ok, summary) = keepalive_while(&lab, &sources, &[], 6, || {
        lbctl_ok(&lab, &["drain", "Wowza GUI", "Wowza Srv 1"]);
        lbctl_ok(&lab, &["drain", "Wowza GUI", "Wowza Srv 2"]);
    });
    assert!(ok, "connections broke after the drain: {summary}");
    assert_eq!(summary["connections"], 7, "{summary}");
    assert!(
        summary["requests"].as_u64().unwrap_or(0) > 7 * 40,
        "{summary}"
    );
}
