//! End-to-end tests of lbd in a Direct Routing lab of network namespaces (scripts/lab): real
//! nginx servers, real curl and ffmpeg clients, the real `lbd` binary on AF_XDP.
//!
//! Each test builds its own lab under a name unique to the run, so a leftover lab or a test
//! running beside it never collides, and a guard tears the lab down even when the test fails.
//! The lab needs root: outside CI a non-root run skips with a message; under CI=true it fails.

mod common;

use common::{LBD, Lab, Lbd, VIP, lab_allowed, run, unique_name};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::process::Command;

/// `server=rsN client=IP` from the lab's nginx, fetched through the VIP from `source`.
fn fetch_through_vip(lab: &Lab, source: &str) -> (String, String) {
    let url = format!("http://{VIP}:8088/");
    let output = lab.exec(
        "NS_CLIENT",
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--interface",
            source,
            &url,
        ],
    );
    assert!(
        output.status.success(),
        "curl from {source} through the VIP failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let body = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let mut server = None;
    let mut client = None;
    for word in body.split_whitespace() {
        if let Some(value) = word.strip_prefix("server=") {
            server = Some(value.to_owned());
        }
        if let Some(value) = word.strip_prefix("client=") {
            client = Some(value.to_owned());
        }
    }
    (
        server.unwrap_or_else(|| panic!("no server= in {body:?}")),
        client.unwrap_or_else(|| panic!("no client= in {body:?}")),
    )
}

/// The MAC addresses that answer ARP for the VIP, as the client sees them.
fn arp_responders(lab: &Lab) -> HashSet<String> {
    let output = lab.exec(
        "NS_CLIENT",
        &["arping", "-c", "3", "-w", "5", "-I", "eth0", VIP],
    );
    let text = String::from_utf8_lossy(&output.stdout).to_lowercase();
    text.split(|c: char| !(c.is_ascii_hexdigit() || c == ':'))
        .filter(|word| word.len() == 17 && word.matches(':').count() == 5)
        .map(str::to_owned)
        .collect()
}

#[test]
fn http_through_the_vip_keeps_each_client_on_one_server() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let lbd = Lbd::start(&lab, &lab.config(2));

    let mut server_of: HashMap<String, String> = HashMap::new();
    let clients = lab.client_ips();
    assert!(
        clients.len() >= 20,
        "the lab has {} client addresses",
        clients.len()
    );
    for round in 0..2 {
        for source in &clients {
            let (server, seen_client) = fetch_through_vip(&lab, source);
            assert_eq!(
                &seen_client, source,
                "the real server must see the true client address"
            );
            let first = server_of
                .entry(source.clone())
                .or_insert_with(|| server.clone());
            assert_eq!(first, &server, "{source} moved servers in round {round}");
        }
    }
    let used: HashSet<&String> = server_of.values().collect();
    assert_eq!(used.len(), 2, "both servers get clients: {server_of:?}");

    let responders = arp_responders(&lab);
    let lb_mac = lab.fact("LB_MAC").to_lowercase();
    assert!(!responders.is_empty(), "nobody answered ARP for the VIP");
    assert_eq!(
        responders,
        HashSet::from([lb_mac]),
        "only the balancer may answer ARP for the VIP"
    );

    let ping = lab.exec("NS_CLIENT", &["ping", "-c", "2", "-W", "2", VIP]);
    assert!(ping.status.success(), "the VIP answers ping");

    let (status, log) = lbd.stop();
    assert!(
        status.success(),
        "lbd exits 0 on SIGTERM ({status}):\n{log}"
    );
    assert!(log.contains("XDP program detached"), "{log}");
    assert!(
        log.contains("gratuitous_arps=3"),
        "three gratuitous ARP rounds for the VIP:\n{log}"
    );
    assert!(
        log.contains("accounted=true"),
        "every UMEM frame accounted for:\n{log}"
    );

    // The interface is clean again: a second start works and forwards.
    let again = Lbd::start(&lab, &lab.config(2));
    let (_, seen_client) = fetch_through_vip(&lab, &clients[0]);
    assert_eq!(seen_client, clients[0]);
    let (status, log) = again.stop_with("INT");
    assert!(status.success(), "second lbd exits 0 on SIGINT:\n{log}");
    assert!(log.contains("XDP program detached"), "{log}");
}

/// Whether an XDP program is attached to the balancer's interface, as `ip link` shows it.
fn xdp_attached(lab: &Lab) -> bool {
    let output = lab.exec("NS_LB", &["ip", "-details", "link", "show", "dev", "eth0"]);
    assert!(output.status.success(), "ip link show");
    String::from_utf8_lossy(&output.stdout).contains("prog/xdp")
}

#[test]
fn no_xdp_program_outlives_lbd_however_it_ends() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(1);
    assert!(!xdp_attached(&lab));
    for signal in ["TERM", "KILL"] {
        let lbd = Lbd::start(&lab, &lab.config(1));
        assert!(xdp_attached(&lab), "lbd runs its XDP program");
        let (status, log) = lbd.stop_with(signal);
        assert!(
            signal == "KILL" || status.success(),
            "lbd exits 0 on SIGTERM ({status}):\n{log}"
        );
        // The program hangs on a BPF link that the kernel drops with the process.
        assert!(
            !xdp_attached(&lab),
            "an XDP program is left after SIG{signal}"
        );
    }
    // And the interface takes a new lbd.
    let again = Lbd::start(&lab, &lab.config(1));
    let (_, seen_client) = fetch_through_vip(&lab, &lab.client_ips()[0]);
    assert_eq!(seen_client, lab.client_ips()[0]);
    drop(again);
}

#[test]
fn rtmp_stream_through_the_vip_reaches_a_server() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    // A third real server that does not exist: lbd warns, gives it no traffic, serves the rest.
    let config =
        lab.config(2) + "\n[[service.real_server]]\nlabel = \"Ghost\"\nip = \"198.18.0.99\"\n";
    let lbd = Lbd::start(&lab, &config);
    assert!(
        lbd.log_text().contains("real server unresolved"),
        "unresolved real server is warned about:\n{}",
        lbd.log_text()
    );
    let url = format!("rtmp://{VIP}:1935/live/lbdtest");
    let output = lab.exec(
        "NS_CLIENT",
        &[
            "timeout",
            "60",
            "ffmpeg",
            "-nostdin",
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=25",
            "-t",
            "3",
            "-c:v",
            "flv",
            "-f",
            "flv",
            &url,
        ],
    );
    assert!(
        output.status.success(),
        "ffmpeg publish through the VIP failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut received = Vec::new();
    for i in 1..=2 {
        let dir = PathBuf::from(lab.fact(&format!("RS{i}_RECORD_DIR")));
        let bytes: u64 = fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        if bytes > 0 {
            received.push(i);
        }
    }
    assert_eq!(
        received.len(),
        1,
        "exactly one server recorded the stream: {received:?}"
    );
    let (status, log) = lbd.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn start_errors_are_clear() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(1);
    let dir = PathBuf::from(lab.fact("STATE_DIR"));

    let missing = dir.join("missing-if.toml");
    fs::write(
        &missing,
        lab.config(1)
            .replace("interface = \"eth0\"", "interface = \"nosuch0\""),
    )
    .expect("write");
    let output = lab.exec(
        "NS_LB",
        &[LBD, "--config", missing.to_str().expect("utf-8")],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("interface nosuch0 not found"), "{stderr}");

    // Without privileges (uid 65534, no capabilities) the BPF load is refused with a hint.
    let config = dir.join("unprivileged.toml");
    fs::write(&config, lab.config(1)).expect("write");
    let _ = fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    let _ = fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let output = lab.exec(
        "NS_LB",
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            LBD,
            "--config",
            config.to_str().expect("utf-8"),
        ],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs root"), "{stderr}");
}

#[test]
fn check_mode_validates_and_names_the_field() {
    let dir = std::env::temp_dir().join(format!("lbd-check-{}", unique_name()));
    fs::create_dir_all(&dir).expect("temp dir");
    let good = dir.join("good.toml");
    fs::write(
        &good,
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\n\n[[service]]\nlabel = \"web\"\n\
         vip = \"198.18.0.100\"\nports = \"8088\"\n\n[[service.real_server]]\nlabel = \"a\"\n\
         ip = \"198.18.0.11\"\n",
    )
    .expect("write");
    let output = run(Command::new(LBD).args(["--check", "--config"]).arg(&good));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let bad = dir.join("bad.toml");
    fs::write(
        &bad,
        fs::read_to_string(&good)
            .expect("read")
            .replace("ports = \"8088\"", "ports = \"8088\"\ntable_size = 65536"),
    )
    .expect("write");
    let output = run(Command::new(LBD).args(["--check", "--config"]).arg(&bad));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("table_size"), "{stderr}");

    // The XDP program steers at most 4096 VIPs: a file with more fails the check, not the start.
    let mut many = String::from("[engine]\ninterface = \"eth0\"\nqueues = [0]\n");
    for i in 0..4101u32 {
        let vip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 0, 1)) + i);
        many += &format!(
            "[[service]]\nlabel = \"s{i}\"\nvip = \"{vip}\"\nports = 80\ntable_size = 3\n"
        );
    }
    let too_many = dir.join("too-many-vips.toml");
    fs::write(&too_many, many).expect("write");
    let output = run(Command::new(LBD)
        .args(["--check", "--config"])
        .arg(&too_many));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at most 4096 distinct VIPs"), "{stderr}");
    let _ = fs::remove_dir_all(&dir);
}
