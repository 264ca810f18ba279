//! Layer 7: the `mode = "snat"` services, served by HAProxy, which lbd configures, runs and
//! drives.
//!
//! - [`haproxy`]: the configuration file lbd writes for it, from its own (no I/O).
//! - [`runtime`]: its runtime API (state, weight, statistics), and the `show stat` reader.
//! - [`supervisor`]: the HAProxy process: checked configurations, seamless reloads, restarts.

pub mod haproxy;
pub mod runtime;
pub mod supervisor;

use crate::l7::haproxy::Setup;
use crate::l7::runtime::Stat;
use crate::l7::supervisor::Supervisor;
use lbd_config::Config;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

/// The TCP port HAProxy's stick tables are shared on (the guide's).
pub const PEERS_PORT: u16 = 7778;

/// What the control plane needs of the Layer 7 engine, in one place tests can replace.
pub trait Layer7: Send {
    /// Runs HAProxy on `config` (started, reloaded, or left as it is), or stops it (`None`:
    /// no SNAT service). HAProxy's own words when it refuses; what ran before runs on.
    fn apply(&mut self, config: Option<&str>) -> Result<(), String>;
    /// Runtime API changes, in order, then `config` (which includes them) as what a restart
    /// starts from. HAProxy's words at the first it refuses.
    fn change(&mut self, lines: &[String], config: &str) -> Result<(), String>;
    /// `show stat` (empty while HAProxy does not run or answer).
    fn stats(&self) -> Vec<Stat>;
}

/// HAProxy, started with the first SNAT service and stopped with the last.
#[derive(Debug)]
pub struct Haproxy {
    setup: Setup,
    supervisor: Option<Supervisor>,
}

impl Haproxy {
    /// HAProxy for `config`'s node: its files beside the control socket
    /// (`/run/lbd/lbd.haproxy/`), its stick tables shared with the HA peer.
    pub fn new(config: &Config) -> Haproxy {
        Haproxy {
            setup: setup_for(config),
            supervisor: None,
        }
    }
}

/// The [`Setup`] for `config`'s node.
pub fn setup_for(config: &Config) -> Setup {
    let socket = &config.engine.control_socket;
    let stem = socket
        .file_stem()
        .map_or_else(|| "lbd".into(), |s| s.to_string_lossy().into_owned());
    let dir = socket
        .parent()
        .map_or_else(|| PathBuf::from("/run/lbd"), PathBuf::from)
        .join(format!("{stem}.haproxy"));
    let peer = |ip: Ipv4Addr| (format!("lbd-{ip}"), SocketAddrV4::new(ip, PEERS_PORT));
    match &config.ha {
        Some(ha) => Setup {
            dir,
            local_peer: peer(ha.local_address),
            remote_peers: ha.peer_address.0.iter().map(|&ip| peer(ip)).collect(),
        },
        None => Setup {
            dir,
            local_peer: (
                "lbd".into(),
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, PEERS_PORT),
            ),
            remote_peers: Vec::new(),
        },
    }
}

impl Layer7 for Haproxy {
    fn apply(&mut self, config: Option<&str>) -> Result<(), String> {
        let Some(config) = config else {
            // Dropping the supervisor stops HAProxy.
            self.supervisor = None;
            return Ok(());
        };
        if self.supervisor.is_none() {
            self.supervisor = Some(Supervisor::start(&self.setup)?);
        }
        match &self.supervisor {
            Some(supervisor) => supervisor.apply(config),
            None => Err("HAProxy is not running".to_owned()),
        }
    }

    fn change(&mut self, lines: &[String], config: &str) -> Result<(), String> {
        let supervisor = self.supervisor.as_ref().ok_or("HAProxy is not running")?;
        for line in lines {
            supervisor.change(line)?;
        }
        supervisor.remember(config)
    }

    fn stats(&self) -> Vec<Stat> {
        self.supervisor
            .as_ref()
            .map(Supervisor::stats)
            .unwrap_or_default()
    }
}
