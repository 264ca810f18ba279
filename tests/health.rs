//! Health checks in the namespace lab: a real server whose nginx stops is taken out within
//! `fall x interval + 1 s` and comes back after `rise` checks; HTTP and external checks with a
//! passing and a failing server each; forty servers that never answer delay no other check.

mod common;

use common::{Lab, Lbd, VIP, keepalive_while, lab_allowed, lbctl_ok, status, wait_for_state};
use lbd_proto::{Reply, StatusReport};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn state_of(report: &StatusReport, service: &str, label: &str) -> (String, Option<String>) {
    let rs = report
        .services
        .iter()
        .find(|s| s.label == service)
        .and_then(|s| s.real_servers.iter().find(|rs| rs.label == label))
        .unwrap_or_else(|| panic!("no {service}/{label} in {report:?}"));
    (rs.state.clone(), rs.check.clone())
}

/// The server (`rs1`, `rs2`) each client reaches through the VIP.
fn servers_by_client(lab: &Lab) -> HashMap<String, String> {
    lab.client_ips()
        .into_iter()
        .map(|source| {
            let output = lab.exec(
                "NS_CLIENT",
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "3",
                    "--interface",
                    &source,
                    &format!("http://{VIP}:8088/"),
                ],
            );
            let body = String::from_utf8_lossy(&output.stdout).to_string();
            let server = body
                .split_whitespace()
                .find_map(|w| w.strip_prefix("server="))
                .unwrap_or_else(|| panic!("{source}: no answer ({body:?})"))
                .to_owned();
            (source, server)
        })
        .collect()
}

fn nginx(lab: &Lab, server: usize, start: bool) {
    let dir = lab.fact(&format!("RS{server}_DIR")).to_owned();
    let conf = format!("{dir}/nginx.conf");
    let mut args = vec!["nginx", "-p", dir.as_str(), "-c", conf.as_str()];
    if !start {
        args.extend(["-s", "stop"]);
    }
    let output = lab.exec(&format!("NS_RS{server}"), &args);
    assert!(
        output.status.success(),
        "nginx {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_dead_server_leaves_within_fall_checks_and_returns_after_rise() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let (interval_ms, fall, rise) = (300u64, 2u64, 2u64);
    let config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\npersistence_timeout_s = 2\n\n\
         [service.health_check]\nkind = \"tcp\"\ninterval_ms = {interval_ms}\ntimeout_ms = 200\nrise = {rise}\nfall = {fall}\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{}\"\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{}\"\n",
        lab.socket().display(),
        lab.fact("RS1_IP"),
        lab.fact("RS2_IP")
    );
    let lbd = Lbd::start(&lab, &config);
    std::thread::sleep(Duration::from_millis(interval_ms * 2));
    let before = servers_by_client(&lab);
    assert!(
        before.values().any(|s| s == "rs1") && before.values().any(|s| s == "rs2"),
        "{before:?}"
    );
    assert_eq!(state_of(&status(&lab), "Wowza GUI", "Wowza Srv 1").0, "up");

    nginx(&lab, 1, false);
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(fall * interval_ms + 1000));
    let report = status(&lab);
    let (state, check) = state_of(&report, "Wowza GUI", "Wowza Srv 1");
    assert_eq!(state, "down", "{report:?}");
    assert!(
        check.as_deref().is_some_and(|c| c.starts_with("failed")),
        "{check:?}"
    );
    let during = servers_by_client(&lab);
    assert!(stopped.elapsed() < Duration::from_secs(10));
    for (client, server) in &during {
        assert_eq!(server, "rs2", "{client} must avoid the dead server");
        if before[client] == "rs2" {
            assert_eq!(
                server, &before[client],
                "a healthy server's client never moves"
            );
        }
    }
    assert!(
        lbd.log_text().contains("real server down"),
        "{}",
        lbd.log_text()
    );

    nginx(&lab, 1, true);
    // rise checks, then the 1 s persistence of the clients that moved runs out.
    std::thread::sleep(Duration::from_millis(rise * interval_ms + 2500));
    assert_eq!(state_of(&status(&lab), "Wowza GUI", "Wowza Srv 1").0, "up");
    let after = servers_by_client(&lab);
    assert_eq!(after, before, "every client is back on its own server");
}

/// Forty powered-off servers (addresses on the segment that nobody answers ARP for, so every
/// check of them runs to its timeout) do not slow the checks of the others: a live server
/// whose nginx stops is still out within `fall x interval + timeout + 1 s`. A pool of four
/// blocking checks went round the forty in 40 x 200 / 4 = 2 s, so each check of the live
/// server came about 2 s late.
#[test]
fn a_dead_server_leaves_on_time_while_forty_others_never_answer() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let (interval_ms, timeout_ms, fall) = (300u64, 200u64, 2u64);
    let check = format!(
        "[service.health_check]\nkind = \"tcp\"\ninterval_ms = {interval_ms}\ntimeout_ms = {timeout_ms}\nrise = 2\nfall = {fall}\n"
    );
    let mut config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\n\n{check}{}\n\
         [[service]]\nlabel = \"Wowza Streaming\"\nvip = \"{VIP}\"\nports = 1935\n\n{check}",
        lab.socket().display(),
        lab.real_servers(2, "IP"),
    );
    for i in 1..=40 {
        config +=
            &format!("\n[[service.real_server]]\nlabel = \"Off {i}\"\nip = \"198.18.2.{i}\"\n");
    }
    let _lbd = Lbd::start(&lab, &config);
    wait_for_state(
        &lab,
        "Wowza Streaming",
        "Off 40",
        "down",
        Duration::from_secs(5),
    );
    let report = status(&lab);
    assert_eq!(state_of(&report, "Wowza GUI", "Wowza Srv 1").0, "up");
    let (_, off) = state_of(&report, "Wowza Streaming", "Off 1");
    assert!(
        off.as_deref()
            .is_some_and(|c| c.contains("connect: timed out after 200 ms")),
        "{off:?}"
    );

    nginx(&lab, 1, false);
    let limit = Duration::from_millis(fall * interval_ms + timeout_ms + 1000);
    wait_for_state(&lab, "Wowza GUI", "Wowza Srv 1", "down", limit);
    assert_eq!(state_of(&status(&lab), "Wowza GUI", "Wowza Srv 2").0, "up");
}

#[test]
fn http_and_external_checks_pass_and_fail() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let (rs1, rs2) = (lab.fact("RS1_IP").to_owned(), lab.fact("RS2_IP").to_owned());
    let config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\n\n\
         [service.health_check]\nkind = \"http\"\npath = \"/health\"\nexpect_body = \"ok\"\ninterval_ms = 200\ntimeout_ms = 150\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{rs1}\"\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{rs2}\"\n\n\
         [service.real_server.health_check]\nkind = \"http\"\npath = \"/health\"\nexpect_body = \"not-there\"\ninterval_ms = 200\ntimeout_ms = 150\n\n\
         [[service]]\nlabel = \"Wowza Streaming\"\nvip = \"{VIP}\"\nports = 1935\n\n\
         [service.health_check]\nkind = \"external\"\ncommand = \"test \\\"$LBD_RS_IP\\\" = {rs1} && test \\\"$LBD_RS_PORT\\\" = 1935\"\ninterval_ms = 200\ntimeout_ms = 150\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{rs1}\"\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{rs2}\"\n",
        lab.socket().display(),
    );
    let _lbd = Lbd::start(&lab, &config);
    std::thread::sleep(Duration::from_millis(1500));
    let report = status(&lab);
    let expect = [
        ("Wowza GUI", "Wowza Srv 1", "up", "ok (HTTP 200)"),
        (
            "Wowza GUI",
            "Wowza Srv 2",
            "down",
            "failed (HTTP 200, body lacks",
        ),
        ("Wowza Streaming", "Wowza Srv 1", "up", "ok (exit 0)"),
        (
            "Wowza Streaming",
            "Wowza Srv 2",
            "down",
            "failed (exit status: 1)",
        ),
    ];
    for (service, label, state, check) in expect {
        let (got_state, got_check) = state_of(&report, service, label);
        assert_eq!(got_state, state, "{service}/{label}: {report:?}");
        assert!(
            got_check.as_deref().is_some_and(|c| c.starts_with(check)),
            "{service}/{label}: {got_check:?}"
        );
    }
    // Every client of the GUI goes to the one healthy server.
    assert!(servers_by_client(&lab).values().all(|s| s == "rs1"));
    let human = lbctl_ok(&lab, &["status"]);
    assert!(
        human.contains("down") && human.contains("LAST CHECK"),
        "{human}"
    );
}

#[test]
fn all_servers_down_with_and_without_a_fallback() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(3);
    let (rs1, rs2, rs3) = (lab.fact("RS1_IP"), lab.fact("RS2_IP"), lab.fact("RS3_IP"));
    let check = "[service.health_check]\nkind = \"tcp\"\ninterval_ms = 300\ntimeout_ms = 200\nfall = 2\nrise = 2\n";
    let config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\nfallback = \"{rs3}\"\n\n{check}\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{rs1}\"\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{rs2}\"\n\n\
         [[service]]\nlabel = \"Plain\"\nvip = \"198.18.0.101\"\nports = 8088\n\n{check}\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{rs1}\"\n",
        lab.socket().display(),
    );
    let _lbd = Lbd::start(&lab, &config);
    let report = status(&lab);
    let gui = report
        .services
        .iter()
        .find(|s| s.label == "Wowza GUI")
        .expect("gui");
    assert_eq!(
        gui.fallback.as_deref(),
        Some(format!("{rs3} (standby)").as_str())
    );
    assert!(
        servers_by_client(&lab).values().all(|s| s != "rs3"),
        "standby takes nothing"
    );

    nginx(&lab, 1, false);
    nginx(&lab, 2, false);
    std::thread::sleep(Duration::from_millis(2 * 300 + 1000));
    let report = status(&lab);
    let gui = report
        .services
        .iter()
        .find(|s| s.label == "Wowza GUI")
        .expect("gui");
    assert_eq!(
        gui.fallback.as_deref(),
        Some(format!("{rs3} (in use)").as_str()),
        "{report:?}"
    );
    let during = servers_by_client(&lab);
    assert!(
        during.values().all(|s| s == "rs3"),
        "every client on the fallback: {during:?}"
    );

    // Without a fallback the frames are dropped and counted.
    let plain = lab.exec(
        "NS_CLIENT",
        &["curl", "-s", "--max-time", "2", "http://198.18.0.101:8088/"],
    );
    assert!(
        !plain.status.success(),
        "nobody can serve the plain service"
    );
    let stats = lbctl_ok(&lab, &["--json", "stats"]);
    match serde_json::from_str::<Reply>(&stats) {
        Ok(Reply::Stats(report)) => {
            assert!(
                report
                    .total
                    .drops
                    .get("no_real_server")
                    .copied()
                    .unwrap_or(0)
                    > 0,
                "{report:?}"
            );
            assert!(report.total.fallback_packets > 0, "{report:?}");
        }
        other => panic!("stats gave {other:?}"),
    }
}

#[test]
fn drain_keeps_open_connections_and_halt_ends_them() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\npersistence_timeout_s = 1\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{}\"\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{}\"\n",
        lab.socket().display(),
        lab.fact("RS1_IP"),
        lab.fact("RS2_IP")
    );
    let _lbd = Lbd::start(&lab, &config);
    let placement = servers_by_client(&lab);
    let on_rs1: Vec<String> = placement
        .iter()
        .filter(|(_, s)| *s == "rs1")
        .map(|(c, _)| c.clone())
        .collect();
    assert!(on_rs1.len() >= 3, "{placement:?}");
    let (long_lived, fresh) = (&on_rs1[..2], &on_rs1[2..]);
    // (They were all just seen: fresh[0]'s persistence runs out during the drain below.)

    // Drain (the README's rule): the open connections to rs1 go on, and so do rs1's persisted
    // clients while their persistence lasts; once it has run out, they go elsewhere.
    let (ok, summary) = keepalive_while(&lab, long_lived, &[], 3, || {
        lbctl_ok(&lab, &["drain", "Wowza GUI", "Wowza Srv 1"]);
    });
    assert!(ok, "drain broke an open connection: {summary}");
    assert_eq!(summary["servers"], serde_json::json!(["rs1"]), "{summary}");
    let server_of = |source: &str| {
        let output = lab.exec(
            "NS_CLIENT",
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                "--interface",
                source,
                &format!("http://{VIP}:8088/"),
            ],
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    // A client whose connection just ended is persisted for 2 s more: it comes back to rs1.
    assert!(
        server_of(&long_lived[0]).contains("server=rs1"),
        "a persisted client stays on a drained server"
    );
    // One of rs1's that has not been seen for over 2 s is a new client: it goes to rs2.
    assert!(
        server_of(&fresh[0]).contains("server=rs2"),
        "a drained server takes no new client"
    );
    std::thread::sleep(Duration::from_millis(2500)); // every persistence runs out
    for (client, server) in servers_by_client(&lab) {
        assert_eq!(
            server, "rs2",
            "{client}: a drained server takes no new client"
        );
    }

    // Halt: rs1's open connections stop at once.
    lbctl_ok(&lab, &["online", "Wowza GUI", "Wowza Srv 1"]);
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, summary) = keepalive_while(&lab, long_lived, &[], 4, || {
        lbctl_ok(&lab, &["halt", "Wowza GUI", "Wowza Srv 1"]);
    });
    assert!(!ok, "a halted server's connections must end: {summary}");
    let failures = summary["failures"].to_string();
    assert!(
        failures.contains("moved from rs1") || failures.contains("request"),
        "{summary}"
    );
}

#[test]
fn a_server_at_max_connections_takes_no_new_client_until_below_the_lower_threshold() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\npersistence_timeout_s = 1\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{}\"\nmax_connections = 3\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{}\"\n",
        lab.socket().display(),
        lab.fact("RS1_IP"),
        lab.fact("RS2_IP")
    );
    let _lbd = Lbd::start(&lab, &config);
    let on_rs1: Vec<String> = servers_by_client(&lab)
        .into_iter()
        .filter(|(_, s)| s == "rs1")
        .map(|(c, _)| c)
        .collect();
    assert!(on_rs1.len() >= 4, "{on_rs1:?}");
    let (holders, next) = (&on_rs1[..3], &on_rs1[3]);
    let fetch = |source: &str| {
        let output = lab.exec(
            "NS_CLIENT",
            &[
                "curl",
                "-s",
                "--max-time",
                "3",
                "--interface",
                source,
                &format!("http://{VIP}:8088/"),
            ],
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    // Three open connections fill rs1; the next client of rs1 goes to rs2.
    let (ok, summary) = keepalive_while(&lab, holders, &[], 3, || {
        std::thread::sleep(Duration::from_millis(800));
        let report = status(&lab);
        let (state, _) = state_of(&report, "Wowza GUI", "Wowza Srv 1");
        assert_eq!(state, "full", "{report:?}");
        assert!(
            fetch(next).contains("server=rs2"),
            "a full server takes no new client"
        );
    });
    assert!(
        ok,
        "the open connections go on while the server is full: {summary}"
    );
    // Closed again: below 3/4 of the limit it takes clients again.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(state_of(&status(&lab), "Wowza GUI", "Wowza Srv 1").0, "up");
    assert!(fetch(next).contains("server=rs1"));
}
