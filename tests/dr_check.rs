//! The DR check in a dual-stack lab: lbd asks who has each VIP, probes every real server
//! through the VIP, and defends the VIP against other stations' claims (real nginx servers set
//! up right and wrong; claims sent with scapy).

mod common;

use common::{Lab, Lbd, lab_allowed, status};
use std::time::{Duration, Instant};

const VIP6: &str = "2001:2::100";

/// The GUI service on both VIPs, checked every second.
fn config(lab: &Lab, servers: usize) -> String {
    let text = format!(
        "[engine]\ninterface = \"{}\"\nqueues = [0]\nxdp_mode = \"auto\"\n\
         control_socket = \"/tmp/lbd-lab/{}/lbd.sock\"\ndr_check_interval_ms = 1000\n\
         \n[[service]]\nlabel = \"Wowza GUI\"\nvip = \"{}\"\nvip6 = \"{VIP6}\"\nports = 8088\n",
        lab.fact("LB_IF"),
        lab.name,
        common::VIP
    );
    text + &lab.real_servers(servers, "IP")
}

/// Waits (at most 8 s: a few check rounds) until every real server has a DR verdict, and
/// returns them in order.
fn verdicts(lab: &Lab, servers: usize) -> (Vec<String>, lbd_proto::StatusReport) {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let report = status(lab);
        let verdicts: Vec<String> = report.services[0]
            .real_servers
            .iter()
            .filter_map(|rs| rs.dr_check.clone())
            .collect();
        if verdicts.len() == servers || Instant::now() > deadline {
            return (verdicts, report);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn misconfigured_real_servers_are_reported_for_what_they_get_wrong() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_with_options(4, 1, &["--vip6", VIP6]);
    // rs1 is set up right. rs2 answers ARP for what it holds on lo; rs3 holds no VIP; rs4 has
    // the IPv6 VIP on eth0, where Linux answers Neighbor Solicitations for it.
    let sysctl = |namespace: &str, settings: &[&str]| {
        let mut args = vec!["sysctl", "-qw"];
        args.extend_from_slice(settings);
        assert!(lab.exec(namespace, &args).status.success());
    };
    sysctl(
        "NS_RS2",
        &[
            "net.ipv4.conf.all.arp_ignore=0",
            "net.ipv4.conf.eth0.arp_ignore=0",
            "net.ipv4.conf.all.arp_announce=0",
            "net.ipv4.conf.eth0.arp_announce=0",
        ],
    );
    let ip = |namespace: &str, args: &[&str]| {
        let mut all = vec!["ip"];
        all.extend_from_slice(args);
        let output = lab.exec(namespace, &all);
        assert!(output.status.success(), "{all:?}: {output:?}");
    };
    ip(
        "NS_RS3",
        &["addr", "del", &format!("{}/32", common::VIP), "dev", "lo"],
    );
    ip(
        "NS_RS3",
        &["addr", "del", &format!("{VIP6}/128"), "dev", "lo"],
    );
    ip(
        "NS_RS4",
        &["addr", "del", &format!("{VIP6}/128"), "dev", "lo"],
    );
    ip(
        "NS_RS4",
        &[
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    );

    let lbd = Lbd::start(&lab, &config(&lab, 4));
    let (verdicts, report) = verdicts(&lab, 4);
    assert_eq!(verdicts.len(), 4, "every server judged: {report:?}");
    assert_eq!(verdicts[0], "ok", "{verdicts:?}");
    assert!(
        verdicts[1].starts_with("answers ARP/ND for the VIP"),
        "{verdicts:?}"
    );
    assert!(
        verdicts[2].starts_with("does not accept the VIP"),
        "{verdicts:?}"
    );
    assert!(
        verdicts[3].starts_with("answers ARP/ND for the VIP"),
        "{verdicts:?}"
    );
    // Which MAC, for which VIP, and whose.
    let claim_of = |server: usize| {
        report
            .vip_claims
            .iter()
            .find(|c| c.mac == lab.fact(&format!("RS{server}_MAC")))
            .unwrap_or_else(|| panic!("no claim by rs{server}: {:?}", report.vip_claims))
    };
    assert_eq!(claim_of(2).vip.to_string(), common::VIP);
    assert_eq!(
        claim_of(2).real_server.as_deref(),
        Some("Wowza Srv 2 in Wowza GUI")
    );
    assert_eq!(claim_of(4).vip.to_string(), VIP6);
    assert!(
        !report
            .vip_claims
            .iter()
            .any(|c| c.mac == lab.fact("RS1_MAC") || c.mac == lab.fact("RS3_MAC")),
        "{:?}",
        report.vip_claims
    );
    let log = lbd.log_text();
    assert!(
        log.contains("DR check: real server \"Wowza Srv 3\" of \"Wowza GUI\": does not accept"),
        "{log}"
    );
}

#[test]
fn a_claim_of_the_vip_is_reported_and_defended_at_once() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up_with_options(2, 1, &["--vip6", VIP6]);
    let _lbd = Lbd::start(&lab, &config(&lab, 2));
    let url = format!("http://{}:8088/", common::VIP);
    let client = lab.fact("CLIENT_IP");
    assert!(common::http_get(&lab, client, &url).contains_key("server"));
    let neighbour = || {
        let output = lab.exec("NS_CLIENT", &["ip", "neigh", "show", common::VIP]);
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    assert!(neighbour().contains(lab.fact("LB_MAC")), "{}", neighbour());
    // rs1 announces the VIP as its own, as a misconfigured server does at boot.
    let claim = format!(
        "from scapy.all import Ether, ARP, sendp\n\
         sendp(Ether(src='{mac}', dst='ff:ff:ff:ff:ff:ff') / ARP(op=1, hwsrc='{mac}', \
         psrc='{vip}', pdst='{vip}'), iface='eth0', verbose=False)",
        mac = lab.fact("RS1_MAC"),
        vip = common::VIP
    );
    let sent = lab.exec("NS_RS1", &["/usr/bin/python3", "-c", &claim]);
    assert!(sent.status.success(), "{sent:?}");
    std::thread::sleep(Duration::from_millis(300));
    // The client's cache points at the balancer again at once, and the VIP answers.
    assert!(neighbour().contains(lab.fact("LB_MAC")), "{}", neighbour());
    assert!(common::http_get(&lab, client, &url).contains_key("server"));
    let report = status(&lab);
    let claim = report
        .vip_claims
        .iter()
        .find(|c| c.mac == lab.fact("RS1_MAC") && c.kind == "announced")
        .unwrap_or_else(|| panic!("{:?}", report.vip_claims));
    assert_eq!(
        claim.real_server.as_deref(),
        Some("Wowza Srv 1 in Wowza GUI")
    );
    assert!(common::stats(&lab).total.vip_defences >= 1);
}
