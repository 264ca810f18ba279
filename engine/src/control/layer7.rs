//! The control plane's side of the `mode = "snat"` services: HAProxy kept in step with every
//! change (runtime API for states and weights, a checked seamless reload for the rest), the
//! SNAT VIPs put on the interface while this node serves them, and HAProxy's view of the
//! servers in `status` and `stats`.

use super::{Control, ControlError, OperatorStates};
use crate::io::host;
use crate::l7::haproxy::{self, Admin, names, snat_services};
use crate::l7::runtime::Stat;
use crate::packet::snapshot::AdminState;
use lbd_config::{Config, Service, ServiceMode};
use lbd_proto::{Layer7Stats, RealServerStatus, ServiceStatus};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

fn admin(state: AdminState) -> Admin {
    match state {
        AdminState::Online => Admin::Ready,
        AdminState::Drain => Admin::Drain,
        AdminState::Halt => Admin::Halt,
    }
}

/// The SNAT VIPs of `config` (IPv4 only: the config refuses others).
pub fn snat_vips(config: &Config) -> BTreeSet<Ipv4Addr> {
    snat_services(config)
        .filter_map(|(_, s)| match s.vip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// The runtime API lines that take HAProxy from `old`'s server states and weights to `new`'s,
/// when nothing else differs.
fn runtime_lines(old: (&Config, &OperatorStates), new: (&Config, &OperatorStates)) -> Vec<String> {
    let mut lines = Vec::new();
    for ((index, before), (_, after)) in snat_services(old.0).zip(snat_services(new.0)) {
        let backend = names::backend(index, &after.label);
        for (i, ((rs, old_weight), new_weight)) in after
            .real_servers
            .iter()
            .zip(haproxy::weights(before))
            .zip(haproxy::weights(after))
            .enumerate()
        {
            let key = (after.label.clone(), rs.label.clone());
            let (was, is) = (
                admin(old.1.state_of(&key).admin),
                admin(new.1.state_of(&key).admin),
            );
            let server = format!("{backend}/{}", names::server(i, &rs.label));
            match is {
                Admin::Halt if was != Admin::Halt => {
                    lines.push(format!("set server {server} state maint"));
                    lines.push(format!("shutdown sessions server {server}"));
                }
                Admin::Drain if was != Admin::Drain => {
                    lines.push(format!("set server {server} state drain"));
                }
                Admin::Ready if was != Admin::Ready || old_weight != new_weight => {
                    lines.push(format!("set server {server} state ready"));
                    lines.push(format!("set server {server} weight {new_weight}"));
                }
                _ => {}
            }
        }
    }
    lines
}

impl Control {
    /// HAProxy's configuration for `config` with `operator`'s states.
    fn haproxy_config(&self, config: &Config, operator: &OperatorStates) -> String {
        haproxy::render(config, &self.layer7_setup, |service, rs| {
            admin(
                operator
                    .state_of(&(service.to_owned(), rs.to_owned()))
                    .admin,
            )
        })
    }

    /// Brings HAProxy to `config` with `operator`'s states: through its runtime API when only
    /// states and weights change, else a checked seamless reload (or a start, or a stop when
    /// no SNAT service is left). HAProxy's words when it refuses.
    pub(super) fn update_layer7(
        &mut self,
        config: &Config,
        operator: &OperatorStates,
    ) -> Result<(), ControlError> {
        if snat_services(config).next().is_none() {
            if self.layer7_running {
                self.layer7.apply(None).map_err(ControlError::Layer7)?;
                self.layer7_running = false;
            }
            return Ok(());
        }
        let wanted = self.haproxy_config(config, operator);
        let shape = |config: &Config| {
            let mut config = config.clone();
            for service in &mut config.services {
                for rs in &mut Arc::make_mut(service).real_servers {
                    rs.weight = 1;
                }
            }
            haproxy::render(&config, &self.layer7_setup, |_, _| Admin::Ready)
        };
        let result = if self.layer7_running && shape(&self.config) == shape(config) {
            let lines = runtime_lines((&self.config, &self.operator), (config, operator));
            self.layer7.change(&lines, &wanted)
        } else {
            self.layer7.apply(Some(&wanted))
        };
        result.map_err(ControlError::Layer7)?;
        self.layer7_running = true;
        Ok(())
    }

    /// Starts HAProxy for the SNAT services of the configuration lbd started with, and puts
    /// their VIPs on the interface when this node serves them.
    pub fn start_layer7(&mut self) -> Result<(), ControlError> {
        let (config, operator) = (self.config.clone(), self.operator.clone());
        self.update_layer7(&config, &operator)?;
        // A killed lbd leaves its SNAT VIPs on the interface: the ones it will not hold now go.
        let label = format!("{}{}", config.engine.interface, host::LABEL_SUFFIX);
        let wanted = if self.answers_arp {
            snat_vips(&config)
        } else {
            BTreeSet::new()
        };
        for (name, vip) in self.host.local_addresses().unwrap_or_default() {
            let IpAddr::V4(vip) = vip else {
                continue;
            };
            if name == label && !wanted.contains(&vip) {
                tracing::info!(%vip, "taking a SNAT VIP left by an earlier lbd off the interface");
                if let Err(error) = self.host.release_vip(vip) {
                    tracing::error!(%vip, %error, "taking a SNAT VIP off the interface");
                }
            }
        }
        self.hold_snat_vips();
        Ok(())
    }

    /// Puts the SNAT VIPs on the interface while this node answers for the VIPs (alone, or the
    /// active node of a pair) and takes them off otherwise; announces the ones it puts on.
    pub(super) fn hold_snat_vips(&mut self) {
        let wanted = if self.answers_arp {
            snat_vips(&self.config)
        } else {
            BTreeSet::new()
        };
        let leaving: Vec<Ipv4Addr> = self.held.difference(&wanted).copied().collect();
        for vip in leaving {
            match self.host.release_vip(vip) {
                Ok(()) => {
                    self.held.remove(&vip);
                }
                Err(error) => tracing::error!(%vip, %error, "taking a SNAT VIP off the interface"),
            }
        }
        let arriving: Vec<Ipv4Addr> = wanted.difference(&self.held).copied().collect();
        for &vip in &arriving {
            match self.host.hold_vip(vip) {
                Ok(()) => {
                    self.held.insert(vip);
                }
                Err(error) => tracing::error!(%vip, %error, "putting a SNAT VIP on the interface"),
            }
        }
        if !arriving.is_empty()
            && let Some(first) = self.workers.first()
        {
            let _ = first
                .commands
                .send(crate::io::worker::WorkerCommand::Announce(
                    self.own_mac,
                    arriving.into_iter().map(IpAddr::V4).collect(),
                ));
        }
    }

    /// Takes every SNAT VIP off the interface and stops HAProxy (lbd stops).
    pub fn stop_layer7(&mut self) {
        for vip in std::mem::take(&mut self.held) {
            if let Err(error) = self.host.release_vip(vip) {
                tracing::error!(%vip, %error, "taking a SNAT VIP off the interface");
            }
        }
        if self.layer7_running {
            let _ = self.layer7.apply(None);
            self.layer7_running = false;
        }
    }

    /// The checks a SNAT service's addresses need from the host: its VIP on one of the
    /// interface's networks (clients must reach it on the segment), and a port below 1024
    /// only with the capability to bind it.
    pub fn check_snat_host(&self, config: &Config) -> Result<(), ControlError> {
        let interface = &config.engine.interface;
        let labelled = format!("{interface}{}", host::LABEL_SUFFIX);
        let networks: Vec<(Ipv4Addr, u8)> = self
            .host
            .local_networks()
            .map_err(|e| {
                ControlError::HostAddress(format!("cannot read the host's networks: {e}"))
            })?
            .into_iter()
            .filter(|(name, _, _)| {
                // The interface's own addresses and aliases, not lbd's SNAT VIPs.
                name == interface
                    || (name.starts_with(&format!("{interface}:")) && *name != labelled)
            })
            .map(|(_, ip, prefix)| (ip, prefix))
            .collect();
        for (i, service) in snat_services(config) {
            let path = format!("service[{i}] {:?}", service.label);
            let on_segment = networks.iter().any(|&(ip, prefix)| {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                let IpAddr::V4(vip) = service.vip else {
                    return false;
                };
                u32::from(ip) & mask == u32::from(vip) & mask && prefix < 32
            });
            if !on_segment {
                let listed: Vec<String> =
                    networks.iter().map(|(ip, p)| format!("{ip}/{p}")).collect();
                return Err(ControlError::HostAddress(format!(
                    "{path}.vip: {} is on none of {interface}'s networks ({}): clients on the \
                     segment could not reach it",
                    service.vip,
                    listed.join(", ")
                )));
            }
            if service.ports.first() < 1024 && !host::may_bind_low_ports() {
                return Err(ControlError::HostAddress(format!(
                    "{path}.ports: port {} is below 1024 and lbd lacks CAP_NET_BIND_SERVICE, \
                     which HAProxy (started by lbd) needs to listen on it",
                    service.ports.first()
                )));
            }
        }
        Ok(())
    }

    /// `status` rows of SNAT service `service` (at `index`), from HAProxy's `show stat`.
    pub(super) fn snat_status(
        &self,
        index: usize,
        service: &Service,
        stats: &[Stat],
    ) -> ServiceStatus {
        let backend = names::backend(index, &service.label);
        let real_servers: Vec<RealServerStatus> = service
            .real_servers
            .iter()
            .enumerate()
            .map(|(i, rs)| {
                let stat = stats
                    .iter()
                    .find(|s| s.proxy == backend && s.name == names::server(i, &rs.label));
                let key = (service.label.clone(), rs.label.clone());
                let operator = self.operator.state_of(&key).admin;
                let state = match (operator, stat.map(|s| s.status.as_str())) {
                    (AdminState::Halt, _) => "halt",
                    (_, None) => "unknown",
                    (_, Some(status)) if status.starts_with("DOWN") => "down",
                    (AdminState::Drain, _) => "drain",
                    _ if rs.weight == 0 => "drain",
                    _ if rs.max_connections > 0
                        && stat.is_some_and(|s| {
                            s.current_sessions >= u64::from(rs.max_connections)
                        }) =>
                    {
                        "full"
                    }
                    _ => "up",
                };
                RealServerStatus {
                    label: rs.label.clone(),
                    ip: rs.ip,
                    port: rs.port,
                    weight: rs.weight,
                    conns: stat.map_or(0, |s| s.current_sessions),
                    state: state.to_owned(),
                    mac: None,
                    check: stat
                        .filter(|s| !s.check_status.is_empty())
                        .map(|s| format!("{} ({})", s.check_status, s.check_desc)),
                    // A SNAT server is reached through HAProxy: no DR setup to check, and
                    // HAProxy runs its health checks.
                    dr_check: None,
                    health: None,
                }
            })
            .collect();
        ServiceStatus {
            label: service.label.clone(),
            vip: service.vip,
            vip6: None,
            ports: service.ports.to_string(),
            protocol: service.protocol.to_string(),
            method: "Layer 7".to_owned(),
            mode: "SNAT".to_owned(),
            conns: real_servers.iter().map(|rs| rs.conns).sum(),
            fallback: service.fallback.map(|ip| {
                let in_use = stats
                    .iter()
                    .any(|s| s.proxy == backend && s.name == "fallback" && s.current_sessions > 0);
                format!("{ip} ({})", if in_use { "in use" } else { "standby" })
            }),
            real_servers,
        }
    }

    /// HAProxy's view of every SNAT service, or nothing while it does not run.
    pub(super) fn layer7_stats(&self) -> Vec<Stat> {
        if self.layer7_running {
            self.layer7.stats()
        } else {
            Vec::new()
        }
    }

    /// `stats` for the SNAT services: sessions and bytes per service and real server.
    pub(super) fn layer7_counters(&self) -> Vec<Layer7Stats> {
        let stats = self.layer7_stats();
        let counters = |label: &str, stat: Option<&Stat>| Layer7Stats {
            label: label.to_owned(),
            current_sessions: stat.map_or(0, |s| s.current_sessions),
            total_sessions: stat.map_or(0, |s| s.total_sessions),
            bytes_in: stat.map_or(0, |s| s.bytes_in),
            bytes_out: stat.map_or(0, |s| s.bytes_out),
            real_servers: Vec::new(),
        };
        snat_services(&self.config)
            .map(|(index, service)| {
                let backend = names::backend(index, &service.label);
                let find = |name: &str| stats.iter().find(|s| s.proxy == backend && s.name == name);
                Layer7Stats {
                    real_servers: service
                        .real_servers
                        .iter()
                        .enumerate()
                        .map(|(i, rs)| counters(&rs.label, find(&names::server(i, &rs.label))))
                        .collect(),
                    ..counters(&service.label, find("BACKEND"))
                }
            })
            .collect()
    }
}

/// Whether `service` is one lbd forwards itself.
pub fn is_dr(service: &Service) -> bool {
    service.mode == ServiceMode::Dr
}
