//! HAProxy's configuration for the `mode = "snat"` services, written from lbd's own: no I/O.
//!
//! One frontend and one backend per service, named from the service's place and label
//! ([`names`]). The frontend binds every port of the VIP `transparent` (so an HA pair's passive
//! node can run it before it holds the VIP); HTTP mode adds `option forwardfor`. The backend
//! balances by weight (lbd's 0..65535 scaled to HAProxy's 0..256 when needed), keeps a client
//! on its server with a stick table on `src` that expires after `persistence_timeout_s` and is
//! shared through the `lbd` peers section (with the next HAProxy process on a reload, and with
//! the HA peer), limits a server to `max_connections`, checks it as
//! `[service.health_check]` says, and sends to the `fallback` server only when no real server
//! can take a client. Operator states are written in: a halted server is `disabled`, a drained
//! one has weight 0.

use lbd_config::{
    Config, HealthCheck, HealthKind, Layer7Protocol, Persistence, Service, ServiceMode,
};
use std::fmt::Write;
use std::net::SocketAddrV4;
use std::path::PathBuf;

/// HAProxy's largest server weight.
const MAX_WEIGHT: u32 = 256;

/// What an operator set a server to, as HAProxy is told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Admin {
    /// Takes clients by its weight.
    #[default]
    Ready,
    /// No new clients (weight 0); persisted clients and open connections stay.
    Drain,
    /// No traffic (maintenance); open connections are shut.
    Halt,
}

/// Where HAProxy's files live and whom it shares stick tables with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// The directory of its sockets and pid file.
    pub dir: PathBuf,
    /// This node's name and address in the `peers` section.
    pub local_peer: (String, SocketAddrV4),
    /// The HA peer's, when there is one.
    pub remote_peers: Vec<(String, SocketAddrV4)>,
}

impl Setup {
    /// The runtime API's socket (level admin, listening sockets handed over on reload).
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// The master process's CLI.
    pub fn master_socket(&self) -> PathBuf {
        self.dir.join("master.sock")
    }

    /// The configuration file.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }
}

/// HAProxy's names for a service's frontend and backend, and for its real servers.
pub mod names {
    /// Keeps what HAProxy allows in a name (letters, digits, `-`, `_`, `.`).
    fn clean(label: &str) -> String {
        label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// Service `index` (its place among all services), labelled `label`.
    pub fn backend(index: usize, label: &str) -> String {
        format!("s{index}-{}", clean(label))
    }

    /// Real server `index` of its service, labelled `label`.
    pub fn server(index: usize, label: &str) -> String {
        format!("r{index}-{}", clean(label))
    }
}

/// A real server's weight in HAProxy's range: lbd's weights scaled down when the service's
/// largest is above 256 (a weight above 0 stays above 0).
fn scaled(weight: u16, largest: u16) -> u32 {
    let (weight, largest) = (u32::from(weight), u32::from(largest));
    if largest <= MAX_WEIGHT || weight == 0 {
        weight
    } else {
        (weight * MAX_WEIGHT).div_ceil(largest).max(1)
    }
}

/// HAProxy's weight for each real server of `service`, operator states left aside.
pub fn weights(service: &Service) -> Vec<u32> {
    let largest = service
        .real_servers
        .iter()
        .map(|rs| rs.weight)
        .max()
        .unwrap_or(0);
    service
        .real_servers
        .iter()
        .map(|rs| scaled(rs.weight, largest))
        .collect()
}

/// The `mode = "snat"` services of `config`, with their places among all services.
pub fn snat_services(config: &Config) -> impl Iterator<Item = (usize, &Service)> {
    config
        .services
        .iter()
        .enumerate()
        .filter(|(_, service)| service.mode == ServiceMode::Snat)
        .map(|(i, service)| (i, &**service))
}

/// The whole configuration file for the SNAT services of `config`, with the operator states
/// `admin` gives (service label, real-server label).
pub fn render(config: &Config, setup: &Setup, admin: impl Fn(&str, &str) -> Admin) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by lbd for its mode = \"snat\" services; lbd rewrites it on every change.\n\
         global\n    master-worker\n    \
         stats socket {} mode 600 level admin expose-fd listeners\n    \
         stats timeout 10s\n    \
         pidfile {}\n    \
         localpeer {}\n    \
         log stderr format raw local0 notice\n\n\
         defaults\n    log global\n    option dontlognull\n    \
         timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n    \
         timeout tunnel 1h\n",
        setup.admin_socket().display(),
        setup.dir.join("haproxy.pid").display(),
        setup.local_peer.0,
    );
    let _ = writeln!(out, "peers lbd");
    for (name, address) in std::iter::once(&setup.local_peer).chain(&setup.remote_peers) {
        let _ = writeln!(out, "    peer {name} {address}");
    }
    for (index, service) in snat_services(config) {
        out.push('\n');
        render_service(&mut out, index, service, &admin);
    }
    out
}

fn render_service(
    out: &mut String,
    index: usize,
    service: &Service,
    admin: &impl Fn(&str, &str) -> Admin,
) {
    let name = names::backend(index, &service.label);
    let http = service.layer7_protocol == Some(Layer7Protocol::Http);
    let mode = if http { "http" } else { "tcp" };
    let _ = writeln!(out, "# {:?}", service.label);
    let _ = writeln!(out, "frontend {name}\n    mode {mode}");
    for ports in service.ports.to_string().split(',') {
        let _ = writeln!(out, "    bind {}:{ports} transparent", service.vip);
    }
    if http {
        let _ = writeln!(out, "    option forwardfor");
    }
    let _ = writeln!(out, "    default_backend {name}\n");
    let _ = writeln!(
        out,
        "backend {name}\n    mode {mode}\n    balance roundrobin"
    );
    if service.persistence == Persistence::SourceIp {
        let _ = writeln!(
            out,
            "    stick-table type ip size 1m expire {}s peers lbd\n    stick on src",
            service.persistence_timeout_s.max(1)
        );
    }
    let check = &service.health_check;
    render_check(out, check);
    let weights = weights(service);
    for (i, (rs, weight)) in service.real_servers.iter().zip(weights).enumerate() {
        let state = admin(&service.label, &rs.label);
        let weight = if state == Admin::Drain { 0 } else { weight };
        let address = match rs.port {
            Some(port) => format!("{}:{port}", rs.ip),
            None => rs.ip.to_string(),
        };
        let _ = write!(
            out,
            "    server {} {address} weight {weight}",
            names::server(i, &rs.label)
        );
        if rs.max_connections > 0 {
            let _ = write!(out, " maxconn {}", rs.max_connections);
        }
        let check = rs.health_check.as_ref().unwrap_or(check);
        if check.kind != HealthKind::None {
            // A server without a port of its own is checked on the check's port, or on the
            // service's first.
            let port = check
                .port
                .or(rs.port)
                .unwrap_or_else(|| service.ports.first());
            let _ = write!(
                out,
                " check port {port} inter {} fall {} rise {}",
                check.interval_ms, check.fall, check.rise
            );
        }
        if state == Admin::Halt {
            out.push_str(" disabled");
        }
        out.push('\n');
    }
    if let Some(fallback) = service.fallback {
        let _ = writeln!(out, "    server fallback {fallback} backup");
    }
}

/// The backend's check: how (tcp or an HTTP request) and how long one may take.
fn render_check(out: &mut String, check: &HealthCheck) {
    if check.kind == HealthKind::None {
        return;
    }
    let _ = writeln!(out, "    timeout check {}ms", check.timeout_ms);
    if check.kind == HealthKind::Http {
        let _ = writeln!(out, "    option httpchk");
        // Quoted: a `#` or a quote in them must stay text (lbd's checks forbid spaces and
        // control characters in both, and in the body).
        let _ = match &check.host {
            Some(host) => writeln!(
                out,
                "    http-check send meth GET uri {} ver HTTP/1.1 hdr Host {}",
                quoted(&check.path),
                quoted(host)
            ),
            None => writeln!(
                out,
                "    http-check send meth GET uri {}",
                quoted(&check.path)
            ),
        };
        let _ = writeln!(out, "    http-check expect status {}", check.expect_status);
        if let Some(body) = &check.expect_body {
            let _ = writeln!(out, "    http-check expect string {}", quoted(body));
        }
    }
}

/// A string as one HAProxy word: in double quotes, with `"`, `\` and `$` escaped.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if matches!(c, '"' | '\\' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const GUIDE: &str = r#"
[engine]
interface = "eth0"
queues = [0]

[[service]]
label = "Wowza GUI"
vip = "198.18.0.101"
ports = 8088
mode = "snat"
layer7_protocol = "http"
persistence_timeout_s = 600

[service.health_check]
kind = "http"
path = "/health"
expect_body = "ok"

[[service.real_server]]
label = "Wowza Srv 1"
ip = "10.1.0.11"
port = 8080
max_connections = 500

[[service.real_server]]
label = "Wowza Srv 2"
ip = "10.1.0.12"
port = 8080

[[service]]
label = "Wowza Streaming"
vip = "198.18.0.101"
ports = "1935,8000-8010"
mode = "snat"
layer7_protocol = "tcp"
fallback = "10.1.0.50"

[[service.real_server]]
label = "Wowza Srv 1"
ip = "10.1.0.11"
weight = 1000

[[service.real_server]]
label = "Wowza Srv 2"
ip = "10.1.0.12"
weight = 10

[[service]]
label = "DR elsewhere"
vip = "198.18.0.100"
ports = 80

[[service.real_server]]
label = "a"
ip = "198.18.0.21"
"#;

    fn setup() -> Setup {
        Setup {
            dir: PathBuf::from("/run/lbd/haproxy-lbd"),
            local_peer: (
                "lbd-198.18.0.2".into(),
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 7778),
            ),
            remote_peers: vec![(
                "lbd-198.18.0.3".into(),
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 7778),
            )],
        }
    }

    fn render_guide(admin: impl Fn(&str, &str) -> Admin) -> String {
        render(
            &Config::from_toml_str(GUIDE).expect("valid"),
            &setup(),
            admin,
        )
    }

    #[test]
    fn the_guides_layer_7_setup_becomes_one_frontend_and_backend_per_service() {
        let text = render_guide(|_, _| Admin::Ready);
        for line in [
            "stats socket /run/lbd/haproxy-lbd/admin.sock mode 600 level admin expose-fd listeners",
            "localpeer lbd-198.18.0.2",
            "peers lbd\n    peer lbd-198.18.0.2 198.18.0.2:7778\n    peer lbd-198.18.0.3 198.18.0.3:7778",
            "frontend s0-Wowza_GUI\n    mode http\n    bind 198.18.0.101:8088 transparent\n    option forwardfor\n    default_backend s0-Wowza_GUI",
            "stick-table type ip size 1m expire 600s peers lbd\n    stick on src",
            "option httpchk\n    http-check send meth GET uri \"/health\"\n    http-check expect status 200\n    http-check expect string \"ok\"",
            "server r0-Wowza_Srv_1 10.1.0.11:8080 weight 100 maxconn 500 check port 8080 inter 1000 fall 2 rise 2",
            "server r1-Wowza_Srv_2 10.1.0.12:8080 weight 100 check port 8080 inter 1000 fall 2 rise 2",
            "frontend s1-Wowza_Streaming\n    mode tcp\n    bind 198.18.0.101:1935 transparent\n    bind 198.18.0.101:8000-8010 transparent",
            // Weights above 256 are scaled; a server without a port of its own is checked on the
            // service's first port and gets the client's port.
            "server r0-Wowza_Srv_1 10.1.0.11 weight 256 check port 1935",
            "server r1-Wowza_Srv_2 10.1.0.12 weight 3 check port 1935",
            "server fallback 10.1.0.50 backup",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(
            !text.contains("DR elsewhere"),
            "DR services are lbd's own:\n{text}"
        );
        assert!(
            !text.contains("option forwardfor\n    default_backend s1"),
            "{text}"
        );
    }

    #[test]
    fn operator_states_are_written_in() {
        let text = render_guide(|service, rs| match (service, rs) {
            ("Wowza GUI", "Wowza Srv 1") => Admin::Drain,
            ("Wowza GUI", "Wowza Srv 2") => Admin::Halt,
            _ => Admin::Ready,
        });
        assert!(
            text.contains("server r0-Wowza_Srv_1 10.1.0.11:8080 weight 0 maxconn 500"),
            "{text}"
        );
        assert!(text.contains("rise 2 disabled\n"), "{text}");
    }

    #[test]
    fn names_keep_only_what_haproxy_allows() {
        assert_eq!(names::backend(3, "Wowza GUI / main"), "s3-Wowza_GUI___main");
        assert_eq!(names::server(0, "srv-1.a"), "r0-srv-1.a");
        assert_eq!(quoted(r#"say "ok" $HOME \"#), r#""say \"ok\" \$HOME \\""#);
    }

    #[test]
    fn weights_scale_only_when_above_haproxys_range() {
        assert_eq!(scaled(100, 200), 100);
        assert_eq!(scaled(65535, 65535), 256);
        assert_eq!(scaled(1, 65535), 1);
        assert_eq!(scaled(0, 65535), 0);
    }
}
