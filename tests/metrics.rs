//! lbd's `/metrics` scraped by a real Prometheus (Debian's `prometheus`) in the lab while
//! traffic flows, and checked by `promtool check metrics`.

mod common;

use common::{Lab, Lbd, lab_allowed};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LISTEN: &str = "127.0.0.1:9180";
const PROMETHEUS: &str = "127.0.0.1:9090";

/// Prometheus in the balancer's namespace, scraping lbd every second; stopped on drop.
struct Prometheus(Child);

impl Prometheus {
    fn start(lab: &Lab) -> Prometheus {
        let dir = std::path::Path::new(lab.fact("STATE_DIR")).join("prometheus");
        std::fs::create_dir_all(&dir).expect("prometheus directory");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: lbd\n    static_configs:\n      - targets: ['{LISTEN}']\n"
            ),
        )
        .expect("prometheus.yml");
        let child = Command::new("ip")
            .args(["netns", "exec", lab.fact("NS_LB"), "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus(child)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prometheus's answer to `query` now: (the series' `label`, value) per series.
fn query(lab: &Lab, query: &str, label: &str) -> Vec<(String, f64)> {
    let output = lab.exec(
        "NS_LB",
        &[
            "curl",
            "-sS",
            "--max-time",
            "2",
            "--get",
            "--data-urlencode",
            &format!("query={query}"),
            &format!("http://{PROMETHEUS}/api/v1/query"),
        ],
    );
    let Ok(reply) = serde_json::from_slice::<serde_json::Value>(&output.stdout) else {
        return Vec::new();
    };
    reply["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|series| {
            let server = series["metric"][label].as_str()?.to_owned();
            let value = series["value"][1].as_str()?.parse().ok()?;
            Some((server, value))
        })
        .collect()
}

#[test]
fn prometheus_scrapes_per_server_counters_that_grow_with_traffic() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    // JSON logs too, as a log shipper takes them.
    let config = lab.config(2).replacen(
        "[engine]\n",
        &format!("[engine]\nhttp_listen = \"{LISTEN}\"\nlog_format = \"json\"\n"),
        1,
    );
    let lbd = Lbd::start(&lab, &config);
    let _prometheus = Prometheus::start(&lab);
    let clients = lab.client_ips();
    let traffic = || {
        for client in &clients {
            common::http_get(&lab, client, &format!("http://{}:8088/", common::VIP));
        }
    };
    // Wait (bounded) for Prometheus's first samples of both servers.
    let packets = "lbd_real_server_packets_total{service=\"Wowza GUI\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    traffic();
    let before = loop {
        let seen = query(&lab, packets, "real_server");
        if seen.len() == 2 && seen.iter().all(|(_, v)| *v > 0.0) {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no samples: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // More traffic: both servers' counters grow in Prometheus.
    traffic();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = query(&lab, packets, "real_server");
        let grew = before
            .iter()
            .all(|(server, old)| after.iter().any(|(s, new)| s == server && new > old));
        if grew {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counters did not grow: {before:?} -> {after:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Prometheus judged the scrape healthy, and promtool the text.
    let up = query(&lab, "up", "job");
    assert_eq!(
        up,
        [("lbd".to_owned(), 1.0)],
        "Prometheus's own verdict on the scrape"
    );
    let text = lab.exec(
        "NS_LB",
        &["curl", "-sS", &format!("http://{LISTEN}/metrics")],
    );
    assert!(text.status.success());
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    {
        use std::io::Write;
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(&text.stdout)
            .expect("feed promtool");
    }
    let checked = promtool.wait_with_output().expect("promtool ends");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let body = String::from_utf8_lossy(&text.stdout);
    // Every log line is one JSON object, with no terminal colour codes (stderr is a file).
    let log = lbd.log_text();
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["fields"].is_object(),
            "{line}"
        );
        assert!(!line.contains('\u{1b}'), "colour codes in {line}");
    }
    assert!(
        log.contains("\"message\":\"HTTP listener ready (/, /metrics)\""),
        "{log}"
    );
    for name in [
        "lbd_build_info",
        "lbd_config_generation",
        "lbd_real_server_state{ip=\"198.18.0.11\",real_server=\"Wowza Srv 1\",service=\"Wowza GUI\",state=\"up\"} 1",
        "lbd_drops_total{reason=\"not_vip\"}",
        "lbd_worker_received_frames_total{worker=\"0\"}",
        "lbd_real_server_checks_total{ip=\"198.18.0.12\",real_server=\"Wowza Srv 2\",service=\"Wowza GUI\"}",
        "lbd_real_server_check_duration_seconds{ip=\"198.18.0.11\"",
        "lbd_real_server_transitions_total{ip=\"198.18.0.11\",real_server=\"Wowza Srv 1\",service=\"Wowza GUI\",to=\"down\"} 0",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
}
