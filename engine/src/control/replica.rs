//! Configuration sync, control side: the active node's services and real-server states as
//! one message ([`Replica`]), and a passive node adopting it as `lbctl` changes are applied.
//!
//! The active node owns the services and real servers. A passive node that has adopted its
//! replica follows it: it refuses changes of its own (naming the active node), takes the
//! active's health, drain, halt and connection-limit states instead of its own checks' (so
//! both nodes choose the same servers), and once it becomes active its checks carry on from
//! those states. `[engine]` and `[ha]` stay each node's own, except Maglev's `hash_seed`,
//! which is the group's: every node must build the same tables.

use super::{Control, ControlError, OperatorStates};
use crate::packet::snapshot::AdminState;
use lbd_config::Service;
use lbd_proto::Command;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::sync::Arc;

/// The active node's configuration, as it sends it to its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// Configuration changes made on the pair, as the active node counts them.
    pub config_generation: u64,
    /// Maglev's seed.
    pub hash_seed: u64,
    /// The services and their real servers.
    pub services: Vec<Arc<Service>>,
    /// Every real server's state.
    pub servers: Vec<ServerReplica>,
}

/// One real server's state on the active node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerReplica {
    /// Its service's label.
    pub service: String,
    /// Its label.
    pub label: String,
    /// `online`, `drain` or `halt`.
    pub admin: String,
    /// What the active node's checks say.
    pub healthy: bool,
    /// At its connection limit.
    pub full: bool,
    /// The weight it had before a weight of 0 drained it (0: none).
    pub weight_before_zero: u16,
}

fn admin_name(state: AdminState) -> &'static str {
    match state {
        AdminState::Online => "online",
        AdminState::Drain => "drain",
        AdminState::Halt => "halt",
    }
}

fn admin_state(name: &str) -> Option<AdminState> {
    match name {
        "online" => Some(AdminState::Online),
        "drain" => Some(AdminState::Drain),
        "halt" => Some(AdminState::Halt),
        _ => None,
    }
}

/// Whether `command` changes the services or real servers (what a passive node refuses).
pub fn changes_configuration(command: &Command) -> bool {
    match command {
        Command::Status
        | Command::Stats
        | Command::ConfigShow
        | Command::ConfigSave { .. }
        | Command::HaStatus
        | Command::HaTakeover
        | Command::HaRelease => false,
        Command::Reload
        | Command::AddVip { .. }
        | Command::EditVip(_)
        | Command::DelVip(_)
        | Command::AddRip { .. }
        | Command::EditRip(_)
        | Command::DelRip(_)
        | Command::SetWeight(_)
        | Command::Drain(_)
        | Command::Halt(_)
        | Command::Online(_) => true,
    }
}

impl Control {
    /// The configuration generation: changes made on the pair, counted by the node that made
    /// them (a passive node shows the active's).
    pub fn config_generation(&self) -> u64 {
        self.config_generation
    }

    /// The active node this one follows, when it is passive and has adopted its replica.
    pub fn following(&self) -> Option<Ipv4Addr> {
        self.following
    }

    /// This node's services and server states, to send to its peers.
    pub fn replica(&self) -> Replica {
        let servers = self
            .config
            .services
            .iter()
            .flat_map(|service| {
                service.real_servers.iter().map(move |rs| {
                    let key = (service.label.clone(), rs.label.clone());
                    let state = self.operator.state_of(&key);
                    ServerReplica {
                        healthy: self.health.is_up(&key),
                        full: self.full.contains(&key),
                        admin: admin_name(state.admin).to_owned(),
                        weight_before_zero: state.weight_before_zero,
                        service: key.0,
                        label: key.1,
                    }
                })
            })
            .collect();
        Replica {
            config_generation: self.config_generation,
            hash_seed: self.config.engine.hash_seed,
            services: self.config.services.clone(),
            servers,
        }
    }

    /// Adopts the replica the active node at `from` sent, as a change made here would be
    /// applied (checked, then published to the workers); from then on this node follows it.
    /// An active node adopts nothing (a partition that has not healed yet). Returns whether
    /// anything changed.
    pub fn adopt(&mut self, from: Ipv4Addr, replica: Replica) -> Result<bool, ControlError> {
        if self.answers_arp {
            return Ok(false);
        }
        let mut mine = self.replica();
        mine.config_generation = replica.config_generation;
        if mine == replica {
            self.following = Some(from);
            self.config_generation = replica.config_generation;
            return Ok(false);
        }
        let mut config = self.config.clone();
        // A service the replica holds unchanged stays the running one (shared): a replica
        // arrives as JSON, all of it new, and the change then costs this node what it changes,
        // as it did the active one.
        config.services = {
            let running: hashbrown::HashMap<&str, &Arc<Service>> = self
                .config
                .services
                .iter()
                .map(|service| (service.label.as_str(), service))
                .collect();
            replica
                .services
                .into_iter()
                .map(|service| match running.get(service.label.as_str()) {
                    Some(&mine) if *mine == service => Arc::clone(mine),
                    _ => service,
                })
                .collect()
        };
        config.engine.hash_seed = replica.hash_seed;
        let mut operator = OperatorStates::default();
        let mut full = hashbrown::HashSet::new();
        for server in &replica.servers {
            let key = (server.service.clone(), server.label.clone());
            let admin = admin_state(&server.admin).ok_or_else(|| {
                ControlError::Replica(format!(
                    "{}/{}: unknown state {:?}",
                    server.service, server.label, server.admin
                ))
            })?;
            operator.set(key.clone(), admin);
            if server.weight_before_zero > 0 {
                operator
                    .weight_before_zero
                    .insert(key.clone(), server.weight_before_zero);
            }
            if server.full {
                full.insert(key.clone());
            }
            self.health.set(key, server.healthy);
        }
        self.full = full;
        let ids = self.ids.clone();
        self.apply(
            config,
            operator,
            ids,
            format!(
                "configuration generation {} from the active node {from}",
                replica.config_generation
            ),
        )?;
        self.config_generation = replica.config_generation;
        self.following = Some(from);
        Ok(true)
    }
}
