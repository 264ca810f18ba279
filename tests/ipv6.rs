//! IPv6 through lbd in a dual-stack lab (scripts/lab --vip6, 2001:2::/48): real curl, ffmpeg,
//! ping and nginx clients and servers, lbd on AF_XDP answering Neighbor Discovery for the VIP.

mod common;

use common::{
    Lab, Lbd, finished, http_get, lab_allowed, lbctl_ok, nginx, publish, recorded, status,
    wait_for_state,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const VIP6: &str = "2001:2::100";
/// A second IPv6 VIP the servers hold, for a service added with lbctl.
const SECOND_VIP6: &str = "2001:2::101";

fn lab(servers: usize) -> Lab {
    Lab::up_with_options(servers, 1, &["--vip6", VIP6, "--vip6", SECOND_VIP6])
}

/// The lab's engine section.
fn engine(lab: &Lab) -> String {
    format!(
        "[engine]\ninterface = \"{}\"\nqueues = [0]\nxdp_mode = \"auto\"\n\
         control_socket = \"/tmp/lbd-lab/{}/lbd.sock\"\n",
        lab.fact("LB_IF"),
        lab.name
    )
}

/// GUI (8088) and streaming (1935) on the IPv4 VIP and the IPv6 one, source-IP persistence
/// with `prefix` leading bits for IPv6 clients; real servers at their `family` address
/// (`"IP"` or `"IP6"`).
fn config(lab: &Lab, servers: usize, prefix: u8, family: &str) -> String {
    let mut text = engine(lab);
    for (label, port) in [("Wowza GUI", 8088), ("Wowza Streaming", 1935)] {
        text += &format!(
            "\n[[service]]\nlabel = \"{label}\"\nvip = \"{}\"\nvip6 = \"{VIP6}\"\nports = {port}\n\
             persistence_prefix_v6 = {prefix}\n\
             [service.health_check]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 1\n",
            common::VIP
        );
        text += &lab.real_servers(servers, family);
    }
    text
}

/// The IPv6 client addresses: each client's ::1 (its /64 also holds ::2).
fn clients6(lab: &Lab) -> Vec<String> {
    lab.fact("CLIENT_IPS6")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `server=rsI` of an HTTP GET through the IPv6 VIP from `source`, after checking that the
/// server saw the client's own address.
fn server_for(lab: &Lab, source: &str) -> String {
    let reply = http_get(lab, source, &format!("http://[{VIP6}]:8088/"));
    assert_eq!(
        reply.get("client").map(String::as_str),
        Some(source),
        "the server sees the true client address: {reply:?}"
    );
    reply.get("server").cloned().unwrap_or_default()
}

/// Who answers a Neighbor Solicitation for `target` on the segment (tests/clients/ns_probe.py,
/// scapy from Debian's python3-scapy, hence Debian's python3).
fn neighbour_answers(lab: &Lab, target: &str) -> Vec<String> {
    let probe = common::repo_root().join("tests/clients/ns_probe.py");
    let output = lab.exec(
        "NS_CLIENT",
        &[
            "/usr/bin/python3",
            &probe.to_string_lossy(),
            "--iface",
            "eth0",
            "--source",
            lab.fact("CLIENT_IP6"),
            "--target",
            target,
            "--seconds",
            "1",
        ],
    );
    assert!(output.status.success(), "ns_probe: {output:?}");
    let reply: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("ns_probe prints JSON");
    reply["answered_by"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|mac| mac.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn ipv6_clients_keep_their_server_are_seen_as_themselves_and_stream() {
    if !lab_allowed() {
        return;
    }
    let lab = lab(2);
    // Before lbd runs, nobody answers for the VIP: the real servers hold it on lo only.
    assert_eq!(neighbour_answers(&lab, VIP6), Vec::<String>::new());
    let _lbd = Lbd::start(&lab, &config(&lab, 2, 128, "IP"));
    assert_eq!(
        neighbour_answers(&lab, VIP6),
        [lab.fact("LB_MAC").to_owned()],
        "only the balancer answers for the VIP"
    );

    let mut chosen = BTreeMap::new();
    for source in clients6(&lab).iter().take(20) {
        let first = server_for(&lab, source);
        for _ in 0..2 {
            assert_eq!(
                server_for(&lab, source),
                first,
                "{source} stays on its server"
            );
        }
        chosen.insert(source.clone(), first);
    }
    let used: BTreeSet<&String> = chosen.values().collect();
    assert_eq!(used.len(), 2, "20 clients use both servers: {chosen:?}");

    // ping6 to the VIP is answered (by the balancer).
    let ping = lab.exec("NS_CLIENT", &["ping", "-6", "-c", "2", "-W", "2", VIP6]);
    assert!(ping.status.success(), "ping -6 {VIP6}: {ping:?}");

    // An RTMP stream over IPv6 is recorded by one server.
    let publisher = publish(&lab, &format!("rtmp://[{VIP6}]:1935/live/six"), 3);
    // While it runs, its connection counts for its server (what max_connections limits).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut counted = 0;
    while counted == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        counted = status(&lab).services[1].conns;
    }
    assert_eq!(
        counted, 1,
        "the IPv6 stream is one connection of Wowza Streaming"
    );
    finished(publisher);
    let recorders = recorded(&lab, 2, "six");
    assert_eq!(recorders.len(), 1, "one server recorded it: {recorders:?}");
    let stats = common::stats(&lab);
    assert!(stats.total.nd_replies >= 1, "{:?}", stats.total);
    assert!(stats.total.unsolicited_nas >= 1, "announced at start");
}

#[test]
fn with_a_64_bit_prefix_a_clients_two_addresses_share_a_server() {
    if !lab_allowed() {
        return;
    }
    let lab = lab(2);
    let lbd = Lbd::start(&lab, &config(&lab, 2, 64, "IP"));
    let second = |first: &str| format!("{}2", first.trim_end_matches('1'));
    let mut used = BTreeSet::new();
    for source in clients6(&lab) {
        let server = server_for(&lab, &source);
        assert_eq!(
            server_for(&lab, &second(&source)),
            server,
            "{source} and {} are one /64",
            second(&source)
        );
        used.insert(server);
    }
    assert_eq!(used.len(), 2, "the /64s spread over both servers");
    // The whole address decides with 128 bits: some pair parts.
    drop(lbd);
    let _lbd = Lbd::start(&lab, &config(&lab, 2, 128, "IP"));
    let parted = clients6(&lab)
        .iter()
        .filter(|source| server_for(&lab, source) != server_for(&lab, &second(source)))
        .count();
    assert!(parted > 0, "with 128 bits no pair of 24 parted");
}

#[test]
fn ipv6_real_servers_are_found_checked_drained_and_taken_out_when_down() {
    if !lab_allowed() {
        return;
    }
    let lab = lab(2);
    let _lbd = Lbd::start(&lab, &config(&lab, 2, 128, "IP6"));
    // Their MACs come from the kernel's IPv6 neighbour table, their checks go over IPv6.
    for i in 1..=2 {
        wait_for_state(
            &lab,
            "Wowza GUI",
            &format!("Wowza Srv {i}"),
            "up",
            Duration::from_secs(5),
        );
    }
    let report = status(&lab);
    let gui = &report.services[0];
    assert_eq!(gui.vip6.map(|v| v.to_string()).as_deref(), Some(VIP6));
    for (i, rs) in gui.real_servers.iter().enumerate() {
        assert_eq!(rs.ip.to_string(), lab.fact(&format!("RS{}_IP6", i + 1)));
        assert_eq!(
            rs.mac.as_deref(),
            Some(lab.fact(&format!("RS{}_MAC", i + 1)))
        );
    }

    let clients = clients6(&lab);
    let (known, fresh) = clients.split_at(12);
    let before: BTreeMap<&String, String> =
        known.iter().map(|c| (c, server_for(&lab, c))).collect();
    // Drain rs1: its persisted clients stay, new ones go to rs2 only.
    lbctl_ok(&lab, &["drain", "Wowza GUI", "Wowza Srv 1"]);
    for (client, server) in &before {
        assert_eq!(
            &server_for(&lab, client),
            server,
            "{client} keeps its server"
        );
    }
    for client in fresh {
        assert_eq!(server_for(&lab, client), "rs2", "{client} is new");
    }
    lbctl_ok(&lab, &["online", "Wowza GUI", "Wowza Srv 1"]);
    // rs2 goes down: its IPv6 check fails, every client reaches rs1.
    nginx(&lab, 2, true);
    wait_for_state(
        &lab,
        "Wowza GUI",
        "Wowza Srv 2",
        "down",
        Duration::from_secs(5),
    );
    for client in &clients {
        assert_eq!(server_for(&lab, client), "rs1", "{client}");
    }
    nginx(&lab, 2, false);
    wait_for_state(
        &lab,
        "Wowza GUI",
        "Wowza Srv 2",
        "up",
        Duration::from_secs(5),
    );

    // An IPv6-only service and its IPv6 real server, added live with lbctl.
    lbctl_ok(
        &lab,
        &["add-vip", "Six", "--vip", SECOND_VIP6, "--ports", "8088"],
    );
    lbctl_ok(
        &lab,
        &["add-rip", "Six", "Wowza Srv 1", "--ip", lab.fact("RS1_IP6")],
    );
    wait_for_state(&lab, "Six", "Wowza Srv 1", "up", Duration::from_secs(5));
    let reply = http_get(&lab, &clients[0], &format!("http://[{SECOND_VIP6}]:8088/"));
    assert_eq!(
        reply.get("server").map(String::as_str),
        Some("rs1"),
        "{reply:?}"
    );
    let six = status(&lab).services.into_iter().find(|s| s.label == "Six");
    assert_eq!(six.map(|s| s.vip.to_string()).as_deref(), Some(SECOND_VIP6));
}

/// `tests/clients/icmp_error.py` with `args`, in namespace `namespace_key`.
fn icmp_error_client(lab: &Lab, namespace_key: &str) -> std::process::Command {
    let script = common::repo_root().join("tests/clients/icmp_error.py");
    let mut command = std::process::Command::new("ip");
    command
        .args(["netns", "exec", lab.fact(namespace_key), "/usr/bin/python3"])
        .arg(script);
    command
}

#[test]
fn icmp_errors_reach_the_server_of_the_connection_they_quote_and_no_other() {
    use std::io::BufRead;
    if !lab_allowed() {
        return;
    }
    let lab = lab(2);
    let _lbd = Lbd::start(&lab, &config(&lab, 2, 128, "IP"));
    // A connection of each family, from a known client port.
    let connect = |source: &str, url: &str, port: &str| -> String {
        common::http_get_with(&lab, source, &["--local-port", port], url)
            .remove("server")
            .expect("server=")
    };
    let client4 = lab.client_ips()[4].clone();
    let client6 = clients6(&lab)[4].clone();
    let owner4 = connect(&client4, &format!("http://{}:8088/", common::VIP), "45001");
    let owner6 = connect(&client6, &format!("http://[{VIP6}]:8088/"), "45002");

    // Every real server listens for ICMP errors to the VIPs.
    let sniffers: Vec<std::process::Child> = (1..=2)
        .map(|i| {
            let mut sniffer = icmp_error_client(&lab, &format!("NS_RS{i}"))
                .args(["sniff", "--seconds", "4", "--vip", common::VIP, VIP6])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start the sniffer");
            let mut ready = String::new();
            std::io::BufReader::new(sniffer.stdout.as_mut().expect("stdout"))
                .read_line(&mut ready)
                .expect("sniffer says ready");
            assert_eq!(ready.trim(), "ready");
            sniffer
        })
        .collect();
    // A router's "fragmentation needed" and "packet too big" about the connections, and one
    // about a port no service has.
    let lb_mac = lab.fact("LB_MAC");
    for (vip, router, client, port, client_port) in [
        (
            common::VIP,
            lab.fact("CLIENT_IP"),
            client4.as_str(),
            "8088",
            "45001",
        ),
        (
            VIP6,
            lab.fact("CLIENT_IP6"),
            client6.as_str(),
            "8088",
            "45002",
        ),
        (
            common::VIP,
            lab.fact("CLIENT_IP"),
            client4.as_str(),
            "22",
            "45003",
        ),
    ] {
        let sent = icmp_error_client(&lab, "NS_CLIENT")
            .args(["send", "--vip", vip, "--lb-mac", lb_mac, "--router", router])
            .args([
                "--client",
                client,
                "--port",
                port,
                "--client-port",
                client_port,
            ])
            .output()
            .expect("send an ICMP error");
        assert!(sent.status.success(), "{sent:?}");
    }
    let seen: Vec<serde_json::Value> = sniffers
        .into_iter()
        .map(|sniffer| {
            let output = sniffer.wait_with_output().expect("sniffer ends");
            let last = String::from_utf8_lossy(&output.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .to_owned();
            serde_json::from_str(&last).expect("sniffer prints JSON")
        })
        .collect();
    let count = |server: &str, key: &str| {
        let index: usize = server.trim_start_matches("rs").parse().expect("rsI");
        seen[index - 1][key].as_u64().unwrap_or(0)
    };
    let other = |server: &str| if server == "rs1" { "rs2" } else { "rs1" };
    let v4_key = format!("{} 45001", common::VIP);
    let v6_key = format!("{VIP6} 45002");
    assert_eq!(count(&owner4, &v4_key), 1, "{seen:?}");
    assert_eq!(count(other(&owner4), &v4_key), 0, "{seen:?}");
    assert_eq!(count(&owner6, &v6_key), 1, "{seen:?}");
    assert_eq!(count(other(&owner6), &v6_key), 0, "{seen:?}");
    let stray = format!("{} 45003", common::VIP);
    assert_eq!(count("rs1", &stray) + count("rs2", &stray), 0, "{seen:?}");
    let stats = common::stats(&lab);
    assert_eq!(stats.total.icmp_errors, 2);
    assert_eq!(stats.total.drops.get("icmp_error_unmatched"), Some(&1));
}
