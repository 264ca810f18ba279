//! The control socket and `lbctl` against a real lbd in the namespace lab: every command, its
//! error paths, hostile clients on the socket, and live changes under long-lived connections.

mod common;

use common::{Lab, Lbd, VIP, keepalive_while, lab_allowed, lbctl, lbctl_ok, run, status};
use lbd_proto::{RealServerStatus, Reply, ServiceStatus, StatusReport};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

const SECOND_VIP: &str = "198.18.0.101";

/// Starts lbd with one service ("Wowza GUI", 8088) and real server 1.
fn start(lab: &Lab) -> Lbd {
    let config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{}\"\n",
        lab.socket().display(),
        lab.fact("RS1_IP")
    );
    Lbd::start(lab, &config)
}

fn service<'a>(report: &'a StatusReport, label: &str) -> &'a ServiceStatus {
    report
        .services
        .iter()
        .find(|s| s.label == label)
        .unwrap_or_else(|| panic!("no service {label} in {report:?}"))
}

fn real_server<'a>(
    report: &'a StatusReport,
    service_label: &str,
    label: &str,
) -> &'a RealServerStatus {
    service(report, service_label)
        .real_servers
        .iter()
        .find(|rs| rs.label == label)
        .unwrap_or_else(|| panic!("no real server {label} in {report:?}"))
}

/// The status without the health checks' results, which change with every check.
fn without_check_times(mut report: StatusReport) -> StatusReport {
    for rs in report
        .services
        .iter_mut()
        .flat_map(|s| s.real_servers.iter_mut())
    {
        rs.check = None;
        // The checks' counts grow with time, not with changes.
        rs.health = None;
    }
    report
}

/// Waits (at most 3 s) until `status` shows the real server in `state`.
fn wait_for_state(lab: &Lab, service_label: &str, label: &str, state: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let report = status(lab);
        let now = &real_server(&report, service_label, label).state;
        if now == state {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{service_label}/{label} is {now}, not {state}, 3 s on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts lbctl fails with exit code `code` and says `expected`.
fn assert_fails(lab: &Lab, args: &[&str], code: i32, expected: &str) {
    let (got, stdout, stderr) = lbctl(lab, args);
    assert_eq!(got, code, "lbctl {args:?}: {stderr}{stdout}");
    assert!(
        stderr.contains(expected),
        "lbctl {args:?} should say {expected:?}, said: {stderr}"
    );
}

/// One raw request line on a new connection; the response line.
fn raw_exchange(stream: &mut UnixStream, bytes: &[u8]) -> String {
    stream.write_all(bytes).expect("write request");
    let mut line = String::new();
    BufReader::new(stream.try_clone().expect("clone"))
        .read_line(&mut line)
        .expect("read response");
    line
}

fn connect(lab: &Lab) -> UnixStream {
    let stream = UnixStream::connect(lab.socket()).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

#[test]
fn every_lbctl_command_works_against_a_running_lbd() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let lbd = start(&lab);
    let rs2 = lab.fact("RS2_IP").to_owned();
    let gui = "Wowza GUI";

    let mode = std::fs::metadata(lab.socket())
        .expect("socket exists")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "without control_group the socket is root's alone"
    );
    let human = lbctl_ok(&lab, &["status"]);
    for word in [
        gui,
        VIP,
        "8088",
        "tcp",
        "Layer 4",
        "DR",
        "Wowza Srv 1",
        "up",
    ] {
        assert!(
            human.contains(word),
            "status should show {word:?}:\n{human}"
        );
    }
    let start_generation = status(&lab).generation;

    lbctl_ok(
        &lab,
        &[
            "add-rip",
            gui,
            "Wowza Srv 2",
            "--ip",
            &rs2,
            "--weight",
            "50",
        ],
    );
    let report = status(&lab);
    assert_eq!(real_server(&report, gui, "Wowza Srv 2").weight, 50);
    // The change returns at once; the server takes traffic once its MAC is learned.
    wait_for_state(&lab, gui, "Wowza Srv 2", "up");

    lbctl_ok(&lab, &["set-weight", gui, "Wowza Srv 2", "70"]);
    assert_eq!(real_server(&status(&lab), gui, "Wowza Srv 2").weight, 70);
    lbctl_ok(
        &lab,
        &[
            "edit-rip",
            gui,
            "Wowza Srv 2",
            "--max-conns",
            "500",
            "--min-conns",
            "100",
        ],
    );
    lbctl_ok(&lab, &["drain", gui, "Wowza Srv 1"]);
    assert_eq!(
        real_server(&status(&lab), gui, "Wowza Srv 1").state,
        "drain"
    );
    lbctl_ok(&lab, &["halt", gui, "Wowza Srv 1"]);
    assert_eq!(real_server(&status(&lab), gui, "Wowza Srv 1").state, "halt");
    // With server 1 halted every client lands on server 2.
    let body = lab.exec(
        "NS_CLIENT",
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            &format!("http://{VIP}:8088/"),
        ],
    );
    assert!(String::from_utf8_lossy(&body.stdout).contains("server=rs2"));
    lbctl_ok(&lab, &["online", gui, "Wowza Srv 1"]);
    assert_eq!(real_server(&status(&lab), gui, "Wowza Srv 1").state, "up");

    lbctl_ok(
        &lab,
        &[
            "add-vip",
            "Wowza Streaming",
            "--vip",
            SECOND_VIP,
            "--ports",
            "1935",
            "--protocol",
            "tcp",
            "--persistence",
            "source-ip",
            "--persistence-timeout",
            "600",
        ],
    );
    lbctl_ok(
        &lab,
        &[
            "add-rip",
            "Wowza Streaming",
            "Wowza Srv 1",
            "--ip",
            lab.fact("RS1_IP"),
        ],
    );
    lbctl_ok(
        &lab,
        &["edit-vip", "Wowza Streaming", "--ports", "1935,1936"],
    );
    let report = status(&lab);
    assert_eq!(service(&report, "Wowza Streaming").ports, "1935-1936");
    assert_eq!(
        service(&report, "Wowza Streaming").vip.to_string(),
        SECOND_VIP
    );
    // The new VIP answers ARP at once (it entered the steering map).
    let arping = lab.exec(
        "NS_CLIENT",
        &["arping", "-c", "1", "-w", "3", "-I", "eth0", SECOND_VIP],
    );
    assert!(arping.status.success(), "new VIP answers ARP");

    let stats = lbctl_ok(&lab, &["--json", "stats"]);
    match serde_json::from_str::<Reply>(&stats) {
        Ok(Reply::Stats(report)) => {
            assert_eq!(report.workers.len(), 1);
            assert!(report.total.forwarded_packets > 0, "{report:?}");
        }
        other => panic!("stats gave {other:?}"),
    }
    assert!(lbctl_ok(&lab, &["stats"]).contains("Wowza Streaming"));

    let shown = lbctl_ok(&lab, &["config", "show"]);
    assert!(
        shown.contains("Wowza Streaming") && shown.contains("1935-1936"),
        "{shown}"
    );
    let saved = std::path::PathBuf::from(lab.fact("STATE_DIR")).join("saved.toml");
    lbctl_ok(&lab, &["config", "save", saved.to_str().expect("utf-8")]);
    let check = run(Command::new(common::LBD)
        .args(["--check", "--config"])
        .arg(&saved));
    assert!(
        check.status.success(),
        "the saved config is valid: {check:?}"
    );

    lbctl_ok(&lab, &["del-rip", "Wowza Streaming", "Wowza Srv 1"]);
    lbctl_ok(&lab, &["del-vip", "Wowza Streaming"]);
    let report = status(&lab);
    assert!(report.services.iter().all(|s| s.label != "Wowza Streaming"));
    assert!(report.generation > start_generation);

    // reload: re-read the file lbd started with, after an edit.
    let config_path = std::path::PathBuf::from(lab.fact("STATE_DIR")).join("lbd.toml");
    let edited = std::fs::read_to_string(&config_path).expect("read config")
        + &format!(
            "\n[[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{rs2}\"\nweight = 5\n"
        );
    std::fs::write(&config_path, edited).expect("write config");
    lbctl_ok(&lab, &["reload"]);
    assert_eq!(real_server(&status(&lab), gui, "Wowza Srv 2").weight, 5);
    // config save without a path writes that file back, atomically.
    lbctl_ok(&lab, &["config", "save"]);
    assert!(
        std::fs::read_to_string(&config_path)
            .expect("read")
            .contains("weight = 5")
    );

    // Errors: clear, non-zero, and the running state exactly as it was.
    let before = without_check_times(status(&lab));
    assert_fails(
        &lab,
        &["drain", "No Such Service", "Wowza Srv 1"],
        1,
        "no service named",
    );
    assert_fails(
        &lab,
        &["halt", gui, "No Such Server"],
        1,
        "has no real server named",
    );
    assert_fails(
        &lab,
        &["add-rip", gui, "Wowza Srv 1", "--ip", "198.18.0.13"],
        1,
        "duplicate",
    );
    assert_fails(&lab, &["add-rip", gui, "Other", "--ip", &rs2], 1, "already");
    assert_fails(
        &lab,
        &["add-vip", "Clash", "--vip", VIP, "--ports", "8000-9000"],
        1,
        "already served",
    );
    assert_fails(
        &lab,
        &[
            "add-vip",
            "Bad",
            "--vip",
            "198.18.0.5",
            "--ports",
            "80",
            "--table-size",
            "1000",
        ],
        1,
        "prime",
    );
    assert_fails(
        &lab,
        &["add-rip", gui, "X", "--ip", "198.18.0"],
        2,
        "198.18.0",
    );
    assert_fails(
        &lab,
        &["add-vip", "Y", "--vip", SECOND_VIP, "--ports", "9010-9000"],
        2,
        "start is above end",
    );
    assert_fails(&lab, &["del-vip", "No Such Service"], 1, "no service named");
    let broken = std::fs::read_to_string(&config_path)
        .expect("read")
        .replace("ports = \"8088\"", "ports = \"0\"");
    std::fs::write(&config_path, broken).expect("write");
    assert_fails(&lab, &["reload"], 1, "not a port");
    assert_eq!(
        without_check_times(status(&lab)),
        before,
        "rejected changes left everything as it was"
    );

    let (status_code, log) = lbd.stop();
    assert!(status_code.success(), "{log}");
    assert!(!lab.socket().exists(), "the socket file is removed at stop");
}

#[test]
fn hostile_clients_never_stop_the_control_socket() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(1);
    let _lbd = start(&lab);

    // A client stuck half-way through a request holds up nobody.
    let mut stuck = connect(&lab);
    stuck
        .write_all(br#"{"version":1,"comm"#)
        .expect("write half");
    lbctl_ok(&lab, &["status"]);

    // Garbage, unknown commands, wrong types and versions: an error each, connection kept.
    let mut client = connect(&lab);
    for (line, expected) in [
        (&b"\xff\xfe\x00garbage\n"[..], "not UTF-8"),
        (b"{not json\n", "malformed JSON"),
        (br#"{"version":1,"command":{"name":"explode"}}"# as &[u8], "unknown variant"),
        (br#"{"version":9,"command":{"name":"status"}}"#, "version 9"),
        (br#"{"version":1,"command":{"name":"set-weight","service":"a","label":"b","weight":-1}}"#, "invalid value"),
    ] {
        let mut bytes = line.to_vec();
        if bytes.last() != Some(&b'\n') {
            bytes.push(b'\n');
        }
        let response = raw_exchange(&mut client, &bytes);
        assert!(response.contains("\"error\"") && response.contains(expected), "{response}");
    }
    let response = raw_exchange(
        &mut client,
        b"{\"version\":1,\"command\":{\"name\":\"status\"}}\n",
    );
    assert!(
        response.contains("\"ok\""),
        "the same connection still works: {response}"
    );

    // An oversized request is refused and its connection closed; the daemon serves on.
    let mut big = connect(&lab);
    let mut line = vec![b'x'; lbd_proto::MAX_REQUEST_BYTES + 10];
    line.push(b'\n');
    let response = raw_exchange(&mut big, &line);
    assert!(response.contains("over the limit"), "{response}");

    // Clients that vanish mid-request.
    for _ in 0..20 {
        let mut gone = connect(&lab);
        gone.write_all(br#"{"version":1,"command":{"na"#)
            .expect("write");
        drop(gone);
    }
    drop(stuck);
    lbctl_ok(&lab, &["status"]);

    // A user who is neither root nor in the control group is turned away.
    let unprivileged = lab.exec(
        "NS_LB",
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::lbctl_path().to_str().expect("utf-8"),
            "--socket",
            lab.socket().to_str().expect("utf-8"),
            "status",
        ],
    );
    assert_eq!(unprivileged.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unprivileged.stderr);
    assert!(stderr.contains("ermission denied"), "{stderr}");
}

#[test]
fn live_changes_never_break_established_connections() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(3);
    let _lbd = {
        let config = format!(
            "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
             [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\n\n\
             [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{}\"\n\n\
             [[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{}\"\n",
            lab.socket().display(),
            lab.fact("RS1_IP"),
            lab.fact("RS2_IP")
        );
        Lbd::start(&lab, &config)
    };
    let clients = lab.client_ips();
    let (long_lived, fresh) = clients.split_at(12);
    let gui = "Wowza GUI";
    let rs3 = lab.fact("RS3_IP").to_owned();
    let (ok, summary) = keepalive_while(&lab, long_lived, fresh, 25, || {
        // 250 changes: a real server and a whole service come and go, weights move.
        for round in 0..50 {
            lbctl_ok(&lab, &["add-rip", gui, "Wowza Srv 3", "--ip", &rs3]);
            lbctl_ok(
                &lab,
                &[
                    "add-vip",
                    "Wowza Streaming",
                    "--vip",
                    SECOND_VIP,
                    "--ports",
                    "1935",
                ],
            );
            lbctl_ok(
                &lab,
                &["set-weight", gui, "Wowza Srv 2", &(50 + round).to_string()],
            );
            if round % 2 == 0 {
                lbctl_ok(&lab, &["del-rip", gui, "Wowza Srv 3"]);
                lbctl_ok(&lab, &["del-vip", "Wowza Streaming"]);
            } else {
                lbctl_ok(&lab, &["del-vip", "Wowza Streaming"]);
                lbctl_ok(&lab, &["del-rip", gui, "Wowza Srv 3"]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    assert!(
        ok,
        "long-lived connections broke during live changes: {summary}"
    );
    assert_eq!(summary["connections"], 12, "{summary}");
    assert!(
        summary["requests"].as_u64().unwrap_or(0) > 12 * 100,
        "{summary}"
    );
    assert!(summary["fresh_ok"].as_u64().unwrap_or(0) > 50, "{summary}");
    assert_eq!(summary["fresh_failed"], 0, "{summary}");
}

#[test]
fn an_unresolvable_server_never_slows_a_change_down() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(1);
    let _lbd = start(&lab);
    let gui = "Wowza GUI";
    // 198.18.0.99 answers no ARP: it stays unresolved, and no later change waits for it.
    lbctl_ok(&lab, &["add-rip", gui, "Ghost", "--ip", "198.18.0.99"]);
    let started = std::time::Instant::now();
    for i in 0..10 {
        let label = format!("Extra {i}");
        let ip = format!("198.18.0.{}", 120 + i);
        lbctl_ok(&lab, &["add-rip", gui, &label, "--ip", &ip]);
        lbctl_ok(&lab, &["del-rip", gui, &label]);
    }
    let took = started.elapsed();
    // Each change used to wait a second for ARP: 20 changes, 20 s or more.
    assert!(
        took < Duration::from_secs(5),
        "20 changes beside an unresolvable server took {took:?}"
    );
    assert_eq!(real_server(&status(&lab), gui, "Ghost").state, "unresolved");
}
