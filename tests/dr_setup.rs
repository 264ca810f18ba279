//! `lbctl dr-setup --apply` on a bare real server: a lab whose server has no DR setup at all
//! (`scripts/lab up --bare`: no VIP on lo, ARP sysctls at 0) gets nothing through the VIP, then
//! serves through lbd once dr-setup has run in its namespace, with each method that can run here.
//! Applying twice must work and leave one copy of everything.
//!
//! The lab is dual-stack: the IPv6 VIP goes through lbd as the IPv4 one does. firewalld runs
//! inside rs1's namespace on a D-Bus of its own (a dbus-daemon listening in the lab's state
//! directory), so it touches neither the host's firewall nor its bus.

mod common;

use common::{Lab, Lbd, VIP, as_unprivileged, lab_allowed, lbctl_for_anyone, lbctl_path, run};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VIP6: &str = "2001:2::100";

/// Curl's body, or its error: `--max-time 2`, since a bare server drops the VIP's packets and
/// the failure is a timeout.
fn fetch(lab: &Lab, args: &str) -> Result<String, String> {
    let line = format!("curl -fsS --max-time 2 {args}");
    let output = lab.exec("NS_CLIENT", &line.split_whitespace().collect::<Vec<_>>());
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn fetch_through_vip(lab: &Lab, source: &str) -> Result<String, String> {
    fetch(lab, &format!("--interface {source} http://{VIP}:8088/"))
}

fn fetch_through_vip6(lab: &Lab, source: &str) -> Result<String, String> {
    fetch(
        lab,
        &format!("-g --interface {source} http://[{VIP6}]:8088/"),
    )
}

/// Runs `line` (split at its spaces) in a lab namespace and insists on success; its stdout.
fn exec_ok(lab: &Lab, namespace_key: &str, line: &str) -> String {
    let output = lab.exec(namespace_key, &line.split_whitespace().collect::<Vec<_>>());
    assert!(
        output.status.success(),
        "`{line}` in {namespace_key}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The lab's private D-Bus for firewalld (`DBUS_SYSTEM_BUS_ADDRESS`).
fn bus_address(lab: &Lab) -> String {
    format!("unix:path={}/bus", lab.fact("STATE_DIR"))
}

/// firewalld in rs1's namespace, on its own D-Bus, with the lab's service ports open in its
/// zone (as an operator opens them); both stop on drop.
struct Firewalld {
    bus: Child,
    daemon: Child,
}

impl Firewalld {
    fn start(lab: &Lab) -> Firewalld {
        let config = std::path::Path::new(lab.fact("STATE_DIR")).join("bus.conf");
        std::fs::write(
            &config,
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
                 \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
                 <busconfig><type>system</type><listen>{}</listen><auth>EXTERNAL</auth>\
                 <policy context=\"default\"><allow user=\"root\"/><allow own=\"*\"/>\
                 <allow send_destination=\"*\"/><allow receive_sender=\"*\"/></policy>\
                 <includedir>/usr/share/dbus-1/system.d</includedir></busconfig>\n",
                bus_address(lab)
            ),
        )
        .expect("write the bus configuration");
        let in_rs1 = |args: &[&str]| {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", lab.fact("NS_RS1"), "env"])
                .arg(format!("DBUS_SYSTEM_BUS_ADDRESS={}", bus_address(lab)))
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            command
        };
        let bus = in_rs1(&["dbus-daemon", "--nofork", "--config-file"])
            .arg(&config)
            .spawn()
            .expect("start dbus-daemon");
        let daemon = in_rs1(&["firewalld", "--nofork", "--nopid"])
            .spawn()
            .expect("start firewalld");
        let firewalld = Firewalld { bus, daemon };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !firewall_cmd(lab, &["--state"]).status.success() {
            assert!(Instant::now() < deadline, "firewalld did not start in rs1");
            std::thread::sleep(Duration::from_millis(200));
        }
        let opened = firewall_cmd(lab, &["--add-port=8088/tcp", "--add-port=1935/tcp"]);
        assert!(opened.status.success(), "{opened:?}");
        firewalld
    }
}

impl Drop for Firewalld {
    fn drop(&mut self) {
        for child in [&mut self.daemon, &mut self.bus] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `firewall-cmd` in rs1's namespace, on the lab's bus.
fn firewall_cmd(lab: &Lab, args: &[&str]) -> std::process::Output {
    run(Command::new("ip")
        .args(["netns", "exec", lab.fact("NS_RS1"), "env"])
        .arg(format!("DBUS_SYSTEM_BUS_ADDRESS={}", bus_address(lab)))
        .arg("firewall-cmd")
        .args(args))
}

/// Runs `lbctl dr-setup --vip VIP --vip VIP6 --method METHOD --apply` in rs1's namespace (on
/// the lab's D-Bus, for firewalld).
fn apply(lab: &Lab, method: &str) -> String {
    let output = run(Command::new("ip")
        .args(["netns", "exec", lab.fact("NS_RS1"), "env"])
        .arg(format!("DBUS_SYSTEM_BUS_ADDRESS={}", bus_address(lab)))
        .arg(lbctl_path())
        .args(["dr-setup", "--vip", VIP, "--vip", VIP6])
        .args(["--method", method, "--apply"]));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "dr-setup --method {method} --apply failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("To keep this across reboots"), "{stdout}");
    stdout
}

/// A bare lab and lbd, shown to serve nothing through either VIP; then dr-setup with `method`,
/// twice, and both VIPs reach rs1, which sees the client's own address. Returns the lab (and
/// its lbd, and firewalld for that method, kept running) for the method's own checks; None
/// when the lab may not run.
fn bare_server_serves_after_dr_setup(method: &str) -> Option<(Lab, Lbd, Option<Firewalld>)> {
    if !lab_allowed() {
        return None;
    }
    let lab = Lab::up_with_options(1, 1, &["--bare", "--vip6", VIP6]);
    // Both VIPs; DR check rounds every second (the loopback test reads their verdict).
    let config = lab
        .config(1)
        .replace(
            &format!("vip = \"{VIP}\"\n"),
            &format!("vip = \"{VIP}\"\nvip6 = \"{VIP6}\"\n"),
        )
        .replace(
            "xdp_mode = \"auto\"\n",
            "xdp_mode = \"auto\"\ndr_check_interval_ms = 1000\n",
        );
    let lbd = Lbd::start(&lab, &config);
    let source = lab.client_ips()[0].clone();
    let source6 = lab
        .fact("CLIENT_IPS6")
        .split_whitespace()
        .next()
        .expect("an IPv6 client")
        .to_owned();

    let firewalld = (method == "firewalld").then(|| Firewalld::start(&lab));
    let before = fetch_through_vip(&lab, &source);
    assert!(
        before.is_err(),
        "a bare server answered the VIP: {before:?}"
    );
    let before = fetch_through_vip6(&lab, &source6);
    assert!(before.is_err(), "a bare server answered {VIP6}: {before:?}");

    apply(&lab, method);
    // Again: everything is in place already, and nothing fails or doubles.
    apply(&lab, method);

    let body = fetch_through_vip(&lab, &source).unwrap_or_else(|e| {
        panic!("no answer through the VIP after dr-setup --method {method}: {e}")
    });
    assert!(body.contains("server=rs1"), "{body}");
    assert!(
        body.contains(&format!("client={source} ")),
        "the server must see the client's own address: {body}"
    );
    let body = fetch_through_vip6(&lab, &source6).unwrap_or_else(|e| {
        panic!("no answer through {VIP6} after dr-setup --method {method}: {e}")
    });
    assert!(body.contains(&format!("client={source6} ")), "{body}");
    Some((lab, lbd, firewalld))
}

/// Asserts that exactly `count` lines of `text` contain `needle`.
fn assert_lines_with(text: &str, needle: &str, count: usize) {
    let found = text.lines().filter(|line| line.contains(needle)).count();
    assert_eq!(
        found, count,
        "{count} line(s) with {needle:?} expected in:\n{text}"
    );
}

#[test]
fn loopback_makes_a_bare_server_serve_and_keeps_it_silent_on_arp_and_ndp() {
    let Some((lab, _lbd, _)) = bare_server_serves_after_dr_setup("loopback") else {
        return;
    };

    let addresses = exec_ok(&lab, "NS_RS1", "ip -o addr show dev lo");
    assert_lines_with(&addresses, &format!("{VIP}/32"), 1);
    assert_lines_with(&addresses, &format!("{VIP6}/128 scope global nodad"), 1);
    let sysctls = exec_ok(
        &lab,
        "NS_RS1",
        "sysctl -n net.ipv4.conf.all.arp_ignore net.ipv4.conf.all.arp_announce",
    );
    assert_eq!(sysctls, "1\n2\n");

    // The server holds the VIP now, yet only the balancer answers ARP for it.
    let arping = exec_ok(
        &lab,
        "NS_CLIENT",
        &format!("arping -c 2 -w 3 -I eth0 {VIP}"),
    );
    assert!(arping.contains(lab.fact("LB_MAC")), "{arping}");
    assert!(
        !arping.contains(lab.fact("RS1_MAC")),
        "the real server answered ARP for the VIP: {arping}"
    );
    // Nor a neighbour solicitation for the IPv6 VIP: the client resolves it to the balancer.
    exec_ok(&lab, "NS_CLIENT", &format!("ip -6 neigh flush {VIP6}"));
    exec_ok(&lab, "NS_CLIENT", &format!("ping -6 -c 1 -W 2 {VIP6}"));
    let neighbour = exec_ok(&lab, "NS_CLIENT", &format!("ip -6 neigh show {VIP6}"));
    assert!(
        neighbour.contains(lab.fact("LB_MAC")),
        "{VIP6} resolves to the balancer: {neighbour}"
    );
    // And lbd's DR check, which found it bare, finds it set up right within a few rounds.
    let mut verdict = None;
    for _ in 0..40 {
        verdict = common::status(&lab).services[0].real_servers[0]
            .dr_check
            .clone();
        if verdict.as_deref() == Some("ok") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(verdict.as_deref(), Some("ok"));
}

#[test]
fn nftables_makes_a_bare_server_serve_with_one_table() {
    let Some((lab, _lbd, _)) = bare_server_serves_after_dr_setup("nftables") else {
        return;
    };
    let table = exec_ok(&lab, "NS_RS1", "nft list table inet lbd_dr");
    assert_lines_with(&table, "redirect", 2);
    assert_lines_with(&table, &format!("ip daddr {VIP} redirect"), 1);
    assert_lines_with(&table, &format!("ip6 daddr {VIP6} redirect"), 1);
    let lo = exec_ok(&lab, "NS_RS1", "ip -o addr show dev lo");
    assert_lines_with(&lo, VIP, 0);
}

#[test]
fn iptables_makes_a_bare_server_serve_with_one_rule_per_vip() {
    let Some((lab, _lbd, _)) = bare_server_serves_after_dr_setup("iptables") else {
        return;
    };
    for (program, vip) in [("iptables", VIP), ("ip6tables", VIP6)] {
        let rules = exec_ok(&lab, "NS_RS1", &format!("{program} -t nat -S PREROUTING"));
        assert_lines_with(&rules, "-j REDIRECT", 1);
        assert_lines_with(&rules, &format!("-A PREROUTING -d {vip}/"), 1);
    }
}

#[test]
fn firewalld_makes_a_bare_server_serve_with_one_direct_rule_per_vip() {
    let Some((lab, _lbd, _firewalld)) = bare_server_serves_after_dr_setup("firewalld") else {
        return;
    };
    let rules = firewall_cmd(&lab, &["--direct", "--get-all-rules"]);
    assert!(rules.status.success(), "{rules:?}");
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert_lines_with(&rules, "REDIRECT", 2);
    assert_lines_with(
        &rules,
        &format!("ipv4 nat PREROUTING 0 -d {VIP} -j REDIRECT"),
        1,
    );
    assert_lines_with(
        &rules,
        &format!("ipv6 nat PREROUTING 0 -d {VIP6} -j REDIRECT"),
        1,
    );
}

#[test]
fn printing_needs_no_root_and_applying_says_it_does() {
    if !lab_allowed() {
        return;
    }
    // Any lab: only its state directory, for a copy of lbctl that nobody may run.
    let lab = Lab::up_with_options(1, 1, &["--bare"]);
    let lbctl = lbctl_for_anyone(&lab);
    let (code, stdout, stderr) =
        as_unprivileged(false, &lbctl, &["dr-setup", "--vip", VIP, "--vip", VIP6]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("\nip addr replace {VIP}/32 dev lo\n")),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("\nip -6 addr replace {VIP6}/128 dev lo nodad\n")));
    let (code, _, stderr) = as_unprivileged(false, &lbctl, &["dr-setup", "--vip", VIP, "--apply"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("run it as root"), "{stderr}");
    let (code, _, stderr) = as_unprivileged(false, &lbctl, &["dr-setup", "--vip", "::1"]);
    assert_eq!(code, 2, "a bad VIP is a usage error: {stderr}");
}
