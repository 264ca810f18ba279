//! `/metrics`: what `lbctl status` and `lbctl stats` report, in Prometheus's text format.
//!
//! Names follow what operators already graph: node_exporter's `node_ipvs_*` (packets and bytes
//! per service and real server, active connections, weight) and HAProxy's exporter (one gauge
//! per state, `haproxy_server_status` style). A scrape builds a registry from the reports of
//! one moment; the workers are asked for nothing beyond the counters they already publish to
//! `lbctl`.

use crate::packet::counters::DropReason;
use lbd_proto::{StatsReport, StatusReport};
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// The states a real server may be in (`lbctl status`), one gauge each.
const REAL_SERVER_STATES: [&str; 6] = ["up", "down", "drain", "full", "halt", "unresolved"];
/// The states of an HA node.
const HA_STATES: [&str; 3] = ["active", "passive", "fault"];

/// Counters and gauges of one scrape, registered as they are made.
struct Scrape {
    registry: Registry,
}

impl Scrape {
    fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(counter.clone()))?;
        Ok(counter)
    }

    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
        let gauge = IntGaugeVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(gauge.clone()))?;
        Ok(gauge)
    }
}

/// Saturates a count into what the Prometheus crate's integer metrics hold.
fn value(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

fn count(counter: &IntCounterVec, labels: &[&str], n: u64) -> prometheus::Result<()> {
    counter.get_metric_with_label_values(labels)?.inc_by(n);
    Ok(())
}

fn set(gauge: &IntGaugeVec, labels: &[&str], n: u64) -> prometheus::Result<()> {
    gauge.get_metric_with_label_values(labels)?.set(value(n));
    Ok(())
}

/// The text `/metrics` serves for these reports.
pub fn render(status: &StatusReport, stats: &StatsReport) -> prometheus::Result<String> {
    let scrape = Scrape {
        registry: Registry::new(),
    };
    let build = scrape.gauge("lbd_build_info", "lbd's version; always 1.", &["version"])?;
    set(&build, &[env!("CARGO_PKG_VERSION")], 1)?;
    let generation = scrape.gauge(
        "lbd_config_generation",
        "Configuration generation in force (1 at start, +1 per applied change).",
        &[],
    )?;
    set(&generation, &[], status.generation)?;

    let service_labels = ["service", "vip", "port", "protocol"];
    let rs_labels = ["service", "real_server", "ip"];
    let service_packets = scrape.counter(
        "lbd_service_packets_total",
        "Frames forwarded for the service.",
        &service_labels,
    )?;
    let service_bytes = scrape.counter(
        "lbd_service_bytes_total",
        "Bytes forwarded for the service, Ethernet headers included.",
        &service_labels,
    )?;
    let service_connections = scrape.gauge(
        "lbd_service_connections",
        "Connections the balancer tracks as established for the service.",
        &service_labels,
    )?;
    let rs_packets = scrape.counter(
        "lbd_real_server_packets_total",
        "Frames forwarded to the real server.",
        &rs_labels,
    )?;
    let rs_bytes = scrape.counter(
        "lbd_real_server_bytes_total",
        "Bytes forwarded to the real server, Ethernet headers included.",
        &rs_labels,
    )?;
    let rs_connections = scrape.gauge(
        "lbd_real_server_connections",
        "Connections the balancer tracks as established to the real server (SNAT: HAProxy's sessions).",
        &rs_labels,
    )?;
    let rs_weight = scrape.gauge("lbd_real_server_weight", "Configured weight.", &rs_labels)?;
    let rs_state = scrape.gauge(
        "lbd_real_server_state",
        "1 for the state the real server is in, 0 for the others.",
        &["service", "real_server", "ip", "state"],
    )?;
    let checks = scrape.counter(
        "lbd_real_server_checks_total",
        "Health checks run on the real server (DR services; HAProxy checks SNAT ones).",
        &rs_labels,
    )?;
    let failed = scrape.counter(
        "lbd_real_server_check_failures_total",
        "Health checks of the real server that failed.",
        &rs_labels,
    )?;
    let transitions = scrape.counter(
        "lbd_real_server_transitions_total",
        "Times the checks took the real server up or down.",
        &["service", "real_server", "ip", "to"],
    )?;
    let check_duration = prometheus::GaugeVec::new(
        Opts::new(
            "lbd_real_server_check_duration_seconds",
            "How long the real server's last health check took.",
        ),
        &rs_labels,
    )?;
    scrape.registry.register(Box::new(check_duration.clone()))?;
    let traffic = &stats.total.services;
    for service in &status.services {
        let port = service.ports.as_str();
        let vip = service.vip.to_string();
        let labels = [
            service.label.as_str(),
            vip.as_str(),
            port,
            service.protocol.as_str(),
        ];
        let counted = traffic.iter().find(|s| s.label == service.label);
        count(&service_packets, &labels, counted.map_or(0, |s| s.packets))?;
        count(&service_bytes, &labels, counted.map_or(0, |s| s.bytes))?;
        set(&service_connections, &labels, service.conns)?;
        for rs in &service.real_servers {
            let ip = rs.ip.to_string();
            let labels = [service.label.as_str(), rs.label.as_str(), ip.as_str()];
            let counted = counted.and_then(|s| s.real_servers.iter().find(|r| r.label == rs.label));
            count(&rs_packets, &labels, counted.map_or(0, |r| r.packets))?;
            count(&rs_bytes, &labels, counted.map_or(0, |r| r.bytes))?;
            set(&rs_connections, &labels, rs.conns)?;
            set(&rs_weight, &labels, u64::from(rs.weight))?;
            for state in REAL_SERVER_STATES {
                let labels = [labels[0], labels[1], labels[2], state];
                set(&rs_state, &labels, u64::from(rs.state == state))?;
            }
            if let Some(health) = rs.health {
                count(&checks, &labels, health.checks)?;
                count(&failed, &labels, health.failed)?;
                for (to, n) in [("up", health.went_up), ("down", health.went_down)] {
                    count(&transitions, &[labels[0], labels[1], labels[2], to], n)?;
                }
                check_duration
                    .get_metric_with_label_values(&labels)?
                    .set(health.last_micros as f64 / 1e6);
            }
        }
    }

    let drops = scrape.counter(
        "lbd_drops_total",
        "Frames dropped, by reason (lbctl stats).",
        &["reason"],
    )?;
    // Every reason, counted or not: a series that appears only at the first drop breaks rate().
    for reason in DropReason::ALL {
        let n = stats.total.drops.get(reason.name()).copied().unwrap_or(0);
        count(&drops, &[reason.name()], n)?;
    }
    let answered = [
        (
            "lbd_arp_replies_total",
            "ARP replies sent for VIPs.",
            stats.total.arp_replies,
        ),
        (
            "lbd_nd_replies_total",
            "Neighbor Advertisements sent answering solicitations for VIPs.",
            stats.total.nd_replies,
        ),
        (
            "lbd_icmp_echo_replies_total",
            "ICMP and ICMPv6 echo replies sent from VIPs.",
            stats.total.icmp_echo_replies,
        ),
        (
            "lbd_icmp_errors_forwarded_total",
            "ICMP errors sent on to the real server of the connection they quote.",
            stats.total.icmp_errors,
        ),
        (
            "lbd_vip_defences_total",
            "Announcements of a VIP sent in place of another station's claim.",
            stats.total.vip_defences,
        ),
    ];
    for (name, help, n) in answered {
        count(&scrape.counter(name, help, &[])?, &[], n)?;
    }

    let worker = ["worker"];
    let received = scrape.counter(
        "lbd_worker_received_frames_total",
        "Frames the worker took off its RX ring.",
        &worker,
    )?;
    let forwarded = scrape.counter(
        "lbd_worker_forwarded_frames_total",
        "Frames the worker forwarded to real servers.",
        &worker,
    )?;
    let ring_full = scrape.counter(
        "lbd_worker_rx_ring_full_total",
        "Frames the kernel dropped because the worker's RX ring was full.",
        &worker,
    )?;
    let fill_empty = scrape.counter(
        "lbd_worker_fill_ring_empty_total",
        "Times the kernel found the worker's fill ring empty.",
        &worker,
    )?;
    for w in &stats.workers {
        let queue = w.queue.map(|q| q.to_string()).unwrap_or_default();
        let labels = [queue.as_str()];
        count(&received, &labels, w.rx_frames)?;
        count(&forwarded, &labels, w.forwarded_packets)?;
        let socket = w.socket.unwrap_or_default();
        count(&ring_full, &labels, socket.rx_ring_full)?;
        count(&fill_empty, &labels, socket.fill_ring_empty)?;
    }

    if let Some(ha) = &status.ha {
        let state = scrape.gauge(
            "lbd_ha_state",
            "1 for this node's HA state, 0 for the others.",
            &["state"],
        )?;
        for name in HA_STATES {
            set(&state, &[name], u64::from(ha.state == name))?;
        }
        if let Some(peer) = &ha.peer {
            let age = prometheus::Gauge::new(
                "lbd_ha_peer_heartbeat_age_seconds",
                "Time since the peer's last heartbeat.",
            )?;
            age.set(peer.heard_ms_ago as f64 / 1000.0);
            scrape.registry.register(Box::new(age))?;
        }
        let sync = [
            (
                "lbd_ha_sync_entries_sent_total",
                "Connection and persistence entries sent to the peer.",
                ha.sync.entries_sent,
            ),
            (
                "lbd_ha_sync_entries_received_total",
                "Entries received from the peer.",
                ha.sync.entries_received,
            ),
            (
                "lbd_ha_sync_entries_installed_total",
                "Entries of the peer installed in the workers' tables.",
                ha.sync.entries_installed,
            ),
            (
                "lbd_ha_heartbeats_received_total",
                "Heartbeats received from the peer.",
                ha.heartbeats_received,
            ),
            (
                "lbd_ha_heartbeats_rejected_total",
                "Heartbeats refused as not authentic.",
                ha.rejected,
            ),
        ];
        for (name, help, n) in sync {
            count(&scrape.counter(name, help, &[])?, &[], n)?;
        }
    }

    let mut text = Vec::new();
    TextEncoder::new().encode(&scrape.registry.gather(), &mut text)?;
    String::from_utf8(text).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// The media type of [`render`]'s text.
pub fn content_type() -> &'static str {
    prometheus::TEXT_FORMAT
}

#[cfg(test)]
mod tests {
    use super::*;
    use lbd_proto::{RealServerStats, RealServerStatus, ServiceStats, ServiceStatus, WorkerStats};

    fn reports() -> (StatusReport, StatsReport) {
        let status = StatusReport {
            generation: 4,
            services: vec![ServiceStatus {
                label: "Wowza GUI".into(),
                vip: "198.18.0.100".parse().expect("vip"),
                vip6: None,
                ports: "8088".into(),
                protocol: "tcp".into(),
                method: "Layer 4".into(),
                mode: "DR".into(),
                conns: 3,
                fallback: None,
                real_servers: vec![RealServerStatus {
                    label: "Wowza Srv 1".into(),
                    ip: "198.18.0.11".parse().expect("ip"),
                    port: None,
                    weight: 100,
                    conns: 3,
                    state: "drain".into(),
                    mac: None,
                    check: None,
                    dr_check: None,
                    health: Some(lbd_proto::HealthCounts {
                        checks: 9,
                        failed: 2,
                        went_up: 1,
                        went_down: 1,
                        last_micros: 1_500,
                    }),
                }],
            }],
            ..StatusReport::default()
        };
        let mut total = WorkerStats {
            rx_frames: 12,
            forwarded_packets: 10,
            services: vec![ServiceStats {
                label: "Wowza GUI".into(),
                packets: 10,
                bytes: 640,
                real_servers: vec![RealServerStats {
                    label: "Wowza Srv 1".into(),
                    packets: 10,
                    bytes: 640,
                }],
            }],
            ..WorkerStats::default()
        };
        total.drops.insert("not_vip".into(), 2);
        let worker = WorkerStats {
            queue: Some(0),
            ..total.clone()
        };
        let stats = StatsReport {
            workers: vec![worker],
            total,
            layer7: Vec::new(),
        };
        (status, stats)
    }

    #[test]
    fn the_reports_become_prometheus_series() {
        let (status, stats) = reports();
        let text = render(&status, &stats).expect("render");
        for line in [
            "lbd_config_generation 4",
            "lbd_real_server_packets_total{ip=\"198.18.0.11\",real_server=\"Wowza Srv 1\",service=\"Wowza GUI\"} 10",
            "lbd_real_server_state{ip=\"198.18.0.11\",real_server=\"Wowza Srv 1\",service=\"Wowza GUI\",state=\"drain\"} 1",
            "lbd_real_server_state{ip=\"198.18.0.11\",real_server=\"Wowza Srv 1\",service=\"Wowza GUI\",state=\"up\"} 0",
            "lbd_service_connections{port=\"8088\",protocol=\"tcp\",service=\"Wowza GUI\",vip=\"198.18.0.100\"} 3",
            "lbd_drops_total{reason=\"not_vip\"} 2",
            "lbd_drops_total{reason=\"truncated\"} 0",
            "lbd_worker_received_frames_total{worker=\"0\"} 12",
            "# TYPE lbd_real_server_bytes_total counter",
            "lbd_real_server_checks_total{ip=\"198.18.0.11\",real_server=\"Wowza Srv 1\",service=\"Wowza GUI\"} 9",
            "lbd_real_server_transitions_total{ip=\"198.18.0.11\",real_server=\"Wowza Srv 1\",service=\"Wowza GUI\",to=\"down\"} 1",
            "lbd_real_server_check_duration_seconds{ip=\"198.18.0.11\",real_server=\"Wowza Srv 1\",service=\"Wowza GUI\"} 0.0015",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("lbd_ha_"), "no pair, no HA series");
    }
}
