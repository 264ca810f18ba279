//! Human output of `lbctl`: aligned tables for `status` and `stats`, plain text otherwise.

use lbd_proto::{HaReport, Reply, StatsReport, StatusReport, WorkerStats};
use std::fmt::Write;

/// Rows of cells printed as left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `lbctl status`: the system overview.
pub fn status(report: &StatusReport) -> String {
    let mut rows = vec![vec![
        "LABEL".to_owned(),
        "VIP / IP".to_owned(),
        "PORTS / WEIGHT".to_owned(),
        "PROTOCOL".to_owned(),
        "METHOD".to_owned(),
        "MODE".to_owned(),
        "CONNS".to_owned(),
        "STATE".to_owned(),
        "MAC".to_owned(),
        "LAST CHECK".to_owned(),
        "DR CHECK".to_owned(),
    ]];
    for service in &report.services {
        // A service on both families shows both VIPs.
        let vips = match service.vip6 {
            Some(vip6) => format!("{} {vip6}", service.vip),
            None => service.vip.to_string(),
        };
        rows.push(vec![
            service.label.clone(),
            vips,
            service.ports.clone(),
            service.protocol.clone(),
            service.method.clone(),
            service.mode.clone(),
            service.conns.to_string(),
        ]);
        for rs in &service.real_servers {
            let address = match rs.port {
                Some(port) => std::net::SocketAddr::new(rs.ip, port).to_string(),
                None => rs.ip.to_string(),
            };
            rows.push(vec![
                format!("  {}", rs.label),
                address,
                rs.weight.to_string(),
                String::new(),
                String::new(),
                String::new(),
                rs.conns.to_string(),
                rs.state.clone(),
                rs.mac.clone().unwrap_or_else(|| "-".to_owned()),
                rs.check.clone().unwrap_or_else(|| "-".to_owned()),
                rs.dr_check.clone().unwrap_or_else(|| "-".to_owned()),
            ]);
        }
        if let Some(fallback) = &service.fallback {
            rows.push(vec!["  (fallback)".to_owned(), fallback.clone()]);
        }
    }
    let mut out = String::new();
    if let Some(ha) = &report.ha {
        out.push_str(&banner(ha));
        out.push('\n');
    }
    let _ = writeln!(out, "generation {}", report.generation);
    if report.services.is_empty() {
        out.push_str("no services\n");
    } else {
        out.push_str(&table(&rows));
    }
    // Others speaking for a VIP take its traffic: said below the table, every one.
    for claim in &report.vip_claims {
        let _ = writeln!(
            out,
            "VIP {} {} by {}{} ({} frames)",
            claim.vip,
            claim.kind.replace('_', " "),
            claim.mac,
            claim
                .real_server
                .as_ref()
                .map(|rs| format!(", real server {rs}"))
                .unwrap_or_default(),
            claim.frames
        );
    }
    out
}

fn worker_lines(name: &str, w: &WorkerStats, out: &mut String) {
    let listed = |counts: &std::collections::BTreeMap<String, u64>| {
        if counts.is_empty() {
            "none".to_owned()
        } else {
            counts
                .iter()
                .map(|(what, count)| format!("{what}={count}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    };
    let _ = writeln!(
        out,
        "{name}: rx {} forwarded {} ({} bytes) fallback {} icmp-errors {} arp-replies {} nd-replies {} icmp-replies {} gratuitous-arps {} unsolicited-nas {} vip-defences {} dr-probes {} probe-resets {} flows {} persistent-clients {}\n  drops: {}",
        w.rx_frames,
        w.forwarded_packets,
        w.forwarded_bytes,
        w.fallback_packets,
        w.icmp_errors,
        w.arp_replies,
        w.nd_replies,
        w.icmp_echo_replies,
        w.gratuitous_arps,
        w.unsolicited_nas,
        w.vip_defences,
        w.dr_probes,
        w.probe_resets,
        w.flows,
        w.persistent_clients,
        listed(&w.drops)
    );
    // Frames the kernel dropped never reached lbd's own counters: said apart, always.
    if let Some(socket) = &w.socket {
        let _ = writeln!(
            out,
            "  socket (kernel): dropped {} rx-ring-full {} fill-ring-empty {} invalid-rx {} invalid-tx {}",
            socket.rx_dropped,
            socket.rx_ring_full,
            socket.fill_ring_empty,
            socket.rx_invalid,
            socket.tx_invalid
        );
    }
    if !w.table_full.is_empty() || w.flow_evictions > 0 {
        let _ = writeln!(
            out,
            "  tables full (not recorded): {}; half-open connections evicted: {}",
            listed(&w.table_full),
            w.flow_evictions
        );
    }
}

/// `lbctl stats`: per worker, then traffic per service and real server.
pub fn stats(report: &StatsReport) -> String {
    let mut out = String::new();
    for w in &report.workers {
        let name = match w.queue {
            Some(queue) => format!("worker (queue {queue})"),
            None => "worker".to_owned(),
        };
        worker_lines(&name, w, &mut out);
    }
    worker_lines("total", &report.total, &mut out);
    let mut rows = vec![vec![
        "SERVICE / REAL SERVER".to_owned(),
        "PACKETS".to_owned(),
        "BYTES".to_owned(),
    ]];
    for service in &report.total.services {
        rows.push(vec![
            service.label.clone(),
            service.packets.to_string(),
            service.bytes.to_string(),
        ]);
        for rs in &service.real_servers {
            rows.push(vec![
                format!("  {}", rs.label),
                rs.packets.to_string(),
                rs.bytes.to_string(),
            ]);
        }
    }
    out.push('\n');
    out.push_str(&table(&rows));
    if !report.layer7.is_empty() {
        let mut rows = vec![vec![
            "SNAT SERVICE / REAL SERVER".to_owned(),
            "SESSIONS NOW".to_owned(),
            "SESSIONS".to_owned(),
            "BYTES IN".to_owned(),
            "BYTES OUT".to_owned(),
        ]];
        for service in &report.layer7 {
            let row = |label: String, s: &lbd_proto::Layer7Stats| {
                vec![
                    label,
                    s.current_sessions.to_string(),
                    s.total_sessions.to_string(),
                    s.bytes_in.to_string(),
                    s.bytes_out.to_string(),
                ]
            };
            rows.push(row(service.label.clone(), service));
            for rs in &service.real_servers {
                rows.push(row(format!("  {}", rs.label), rs));
            }
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}

/// The pair in one line, as an appliance's banner shows it:
/// `primary, active; peer 198.18.0.3 secondary, passive, in sync`.
pub fn banner(ha: &HaReport) -> String {
    let me = format!(
        "{}, {}{}",
        ha.role,
        ha.state,
        if ha.released { " (released)" } else { "" }
    );
    match &ha.peer {
        // No heartbeat in external mode: another program (keepalived) knows the peer.
        None if ha.mode == "external" => {
            let links: Vec<String> = ha
                .sync
                .links
                .iter()
                .map(|link| {
                    let up = link.sending && link.receiving;
                    format!("sync with {} {}", link.peer, if up { "up" } else { "down" })
                })
                .collect();
            format!("{me} (external mode); {}", links.join(", "))
        }
        None => format!("{me}; peer not heard yet"),
        Some(peer) if peer.state == "dead" => format!(
            "{me}; peer {} {}, not heard for {} ms",
            peer.address, peer.role, peer.heard_ms_ago
        ),
        Some(peer) => {
            let streams = ha.sync.links.iter().find(|link| link.peer == peer.address);
            let sync = match streams {
                Some(link) if !link.sending || !link.receiving => "sync not connected".to_owned(),
                _ if peer.generation != ha.generation => format!(
                    "generation {} here, {} there",
                    ha.generation, peer.generation
                ),
                _ => "in sync".to_owned(),
            };
            format!(
                "{me}; peer {} {}, {}, {sync}",
                peer.address, peer.role, peer.state
            )
        }
    }
}

/// `lbctl ha status`.
pub fn ha(report: &HaReport) -> String {
    let mut out = banner(report);
    out.push('\n');
    let _ = writeln!(
        out,
        "this node: {} ({} mode), {}, epoch {}, generation {}",
        report.local_address, report.mode, report.state, report.epoch, report.generation
    );
    if let Some(peer) = &report.peer {
        let _ = writeln!(
            out,
            "peer: {} {}, {}, last heartbeat {} ms ago, generation {}",
            peer.address, peer.role, peer.state, peer.heard_ms_ago, peer.generation
        );
    }
    let _ = writeln!(
        out,
        "heartbeats: sent {} received {} rejected {} replayed {}",
        report.heartbeats_sent, report.heartbeats_received, report.rejected, report.replayed
    );
    let sync = &report.sync;
    for link in &sync.links {
        let up = |on: bool| if on { "up" } else { "down" };
        let _ = writeln!(
            out,
            "sync with {}: sending {}, receiving {}",
            link.peer,
            up(link.sending),
            up(link.receiving)
        );
    }
    let _ = writeln!(
        out,
        "entries: sent {} received {} installed {} kept out {} overflow {} unsent {}",
        sync.entries_sent,
        sync.entries_received,
        sync.entries_installed,
        sync.entries_kept_out,
        sync.overflow,
        sync.unsent
    );
    let _ = writeln!(
        out,
        "configuration: sent {}, changes adopted {}; sync connections refused {}",
        sync.configs_sent, sync.configs_adopted, sync.rejected
    );
    out
}

/// Any reply, for people.
pub fn human(reply: &Reply) -> String {
    match reply {
        Reply::Status(report) => status(report),
        Reply::Stats(report) => stats(report),
        Reply::Ha(report) => ha(report),
        Reply::Config { toml } => toml.clone(),
        Reply::Done { message } => format!("{message}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lbd_proto::{RealServerStats, RealServerStatus, ServiceStats, ServiceStatus};
    use std::net::Ipv4Addr;

    #[test]
    fn status_is_an_aligned_overview() {
        let report = StatusReport {
            generation: 7,
            ha: None,
            services: vec![ServiceStatus {
                label: "Wowza Streaming".into(),
                vip: Ipv4Addr::new(198, 18, 0, 100).into(),
                vip6: None,
                ports: "1935".into(),
                protocol: "tcp".into(),
                method: "Layer 4".into(),
                mode: "DR".into(),
                conns: 12,
                fallback: Some("198.18.0.50 (standby)".into()),
                real_servers: vec![
                    RealServerStatus {
                        label: "Wowza Srv 1".into(),
                        ip: Ipv4Addr::new(198, 18, 0, 11).into(),
                        port: None,
                        weight: 100,
                        conns: 12,
                        state: "up".into(),
                        mac: Some("02:00:00:00:00:11".into()),
                        check: Some("ok (connected) at 21:04:05 UTC".into()),
                        dr_check: Some("ok".into()),
                        health: None,
                    },
                    RealServerStatus {
                        label: "Wowza Srv 2".into(),
                        ip: Ipv4Addr::new(198, 18, 0, 12).into(),
                        port: Some(8080),
                        weight: 0,
                        conns: 0,
                        state: "unresolved".into(),
                        mac: None,
                        check: None,
                        dr_check: None,
                        health: None,
                    },
                ],
            }],
            vip_claims: vec![lbd_proto::VipClaim {
                vip: Ipv4Addr::new(198, 18, 0, 100).into(),
                mac: "02:00:00:00:00:11".into(),
                kind: "answered".into(),
                real_server: Some("Wowza Srv 1 in Wowza Streaming".into()),
                frames: 3,
            }],
        };
        let text = status(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "generation 7");
        assert!(lines[1].starts_with("LABEL"));
        assert!(lines[2].starts_with("Wowza Streaming  198.18.0.100"));
        assert!(
            lines[2].contains("Layer 4") && lines[2].contains("DR") && lines[2].ends_with("12")
        );
        assert!(lines[3].starts_with("  Wowza Srv 1"));
        assert!(lines[3].contains("  up  ") && lines[3].contains("02:00:00:00:00:11"));
        assert!(lines[3].contains("ok (connected) at 21:04:05 UTC"));
        assert!(lines[3].ends_with("  ok"));
        assert!(lines[4].contains("unresolved"));
        assert!(lines[5].starts_with("  (fallback)"));
        // Columns line up: the IP column starts at the same place on every row.
        let column = lines[2].find("198.18.0.100").expect("vip");
        assert_eq!(lines[5].find("198.18.0.50 (standby)"), Some(column));
        assert_eq!(lines[3].find("198.18.0.11"), Some(column));
        assert_eq!(lines[1].find("VIP / IP"), Some(column));
        assert_eq!(
            lines[6],
            "VIP 198.18.0.100 answered by 02:00:00:00:00:11, real server Wowza Srv 1 in Wowza \
             Streaming (3 frames)"
        );
    }

    #[test]
    fn stats_lists_workers_drops_and_traffic() {
        let mut total = WorkerStats {
            rx_frames: 10,
            forwarded_packets: 8,
            forwarded_bytes: 800,
            ..WorkerStats::default()
        };
        total.drops.insert("not_vip".into(), 2);
        total.services.push(ServiceStats {
            label: "GUI".into(),
            packets: 8,
            bytes: 800,
            real_servers: vec![RealServerStats {
                label: "a".into(),
                packets: 8,
                bytes: 800,
            }],
        });
        let worker = WorkerStats {
            queue: Some(0),
            ..total.clone()
        };
        let text = stats(&StatsReport {
            workers: vec![worker],
            total,
            layer7: vec![lbd_proto::Layer7Stats {
                label: "Wowza GUI".into(),
                current_sessions: 2,
                total_sessions: 40,
                bytes_in: 5120,
                bytes_out: 9000,
                real_servers: vec![lbd_proto::Layer7Stats {
                    label: "Wowza Srv 1".into(),
                    total_sessions: 40,
                    ..lbd_proto::Layer7Stats::default()
                }],
            }],
        });
        assert!(text.contains("SNAT SERVICE / REAL SERVER"), "{text}");
        assert!(text.contains("  Wowza Srv 1"), "{text}");
        assert!(text.contains("worker (queue 0): rx 10 forwarded 8 (800 bytes) fallback 0"));
        assert!(text.contains("drops: not_vip=2"));
        assert!(
            !text.contains("socket (kernel)"),
            "no socket counters given"
        );
        assert!(text.contains("\nGUI "));
        assert!(text.contains("  a "));
        // The kernel's drops are shown even when lbd itself dropped nothing.
        let quiet = WorkerStats {
            socket: Some(lbd_proto::SocketStats {
                rx_dropped: 76,
                ..lbd_proto::SocketStats::default()
            }),
            ..WorkerStats::default()
        };
        let mut table_full = quiet.clone();
        table_full.table_full.insert("flows".into(), 3);
        let text = stats(&StatsReport {
            workers: vec![quiet],
            total: table_full,
            layer7: Vec::new(),
        });
        assert!(!text.contains("SNAT SERVICE"), "{text}");
        assert!(
            text.contains("drops: none\n  socket (kernel): dropped 76 "),
            "{text}"
        );
        assert!(
            text.contains("tables full (not recorded): flows=3"),
            "{text}"
        );
    }

    #[test]
    fn the_pair_is_the_first_line_of_status() {
        let mut ha = HaReport {
            role: "primary".into(),
            mode: "heartbeat".into(),
            state: "active".into(),
            local_address: Ipv4Addr::new(198, 18, 0, 2),
            epoch: 0,
            released: false,
            generation: 4,
            peer: Some(lbd_proto::HaPeerReport {
                address: Ipv4Addr::new(198, 18, 0, 3),
                role: "secondary".into(),
                state: "passive".into(),
                heard_ms_ago: 40,
                generation: 4,
            }),
            heartbeats_sent: 10,
            heartbeats_received: 9,
            rejected: 0,
            replayed: 0,
            sync: lbd_proto::HaSyncReport {
                links: vec![lbd_proto::HaSyncLink {
                    peer: Ipv4Addr::new(198, 18, 0, 3),
                    sending: true,
                    receiving: true,
                }],
                ..lbd_proto::HaSyncReport::default()
            },
        };
        let report = StatusReport {
            ha: Some(Box::new(ha.clone())),
            ..StatusReport::default()
        };
        assert!(status(&report).starts_with(
            "primary, active; peer 198.18.0.3 secondary, passive, in sync\ngeneration 0\n"
        ));
        ha.sync.links[0].receiving = false;
        assert_eq!(
            banner(&ha),
            "primary, active; peer 198.18.0.3 secondary, passive, sync not connected"
        );
        ha.peer.as_mut().expect("peer").state = "dead".into();
        assert_eq!(
            banner(&ha),
            "primary, active; peer 198.18.0.3 secondary, not heard for 40 ms"
        );
        ha.peer = None;
        assert_eq!(banner(&ha), "primary, active; peer not heard yet");
        ha.mode = "external".into();
        assert_eq!(
            banner(&ha),
            "primary, active (external mode); sync with 198.18.0.3 down"
        );
    }

    #[test]
    fn empty_status_says_so() {
        assert!(status(&StatusReport::default()).contains("no services"));
    }
}
