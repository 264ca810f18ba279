//! The immutable picture of the running configuration that the packet path reads: VIPs,
//! services keyed by VIP:protocol:port, Maglev tables and real-server MACs.
//!
//! A snapshot is built once, off the packet path, from the parsed config and the resolved MAC
//! addresses, and never changes afterwards; workers hold it behind an `Arc`. Real servers keep
//! their config order (counters and status refer to them by that index); a real server that
//! cannot take traffic (weight 0 or no MAC) is in the list but owns no Maglev slot.
//!
//! Indices change from one snapshot to the next; identities do not. A service is known by a
//! stable id ([`ServiceIds`]: kept across edits of its label, VIP and ports), a real server
//! by its address within its service. The tables and counters that outlive a snapshot
//! (persistence, fragments, per-server traffic) are keyed by those.

use crate::packet::maglev::{Backend, MAX_BACKENDS, MaglevTable};
use hashbrown::{HashMap, HashSet};
use lbd_config::{Config, MacAddr, Persistence, real_server_key};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

/// VIP, protocol and port packed into one word: one hash input instead of three.
#[inline]
pub fn service_key(vip: u32, protocol: u8, port: u16) -> u64 {
    u64::from(vip) << 32 | u64::from(protocol) << 16 | u64::from(port)
}

/// [`service_key`] -> service index: an open-addressing table (linear probing, at most half
/// full) with one multiply to hash, so that the lookup every forwarded frame makes is a few
/// instructions inlined into the packet path. Built once per snapshot, never changed after.
#[derive(Debug, Clone)]
pub struct PortMap {
    /// `(key, service)`; [`PortMap::EMPTY`] marks a free slot.
    slots: Box<[(u64, u16)]>,
    /// 64 - log2 of the slot count: the hash's top bits index the slots.
    shift: u32,
    len: usize,
}

impl Default for PortMap {
    fn default() -> Self {
        PortMap {
            slots: vec![(PortMap::EMPTY, 0); 2].into_boxed_slice(),
            shift: 63,
            len: 0,
        }
    }
}

impl PortMap {
    /// Never a [`service_key`]: bits 24..32 (above the 8-bit protocol) are always zero there.
    const EMPTY: u64 = u64::MAX;

    /// Fibonacci hashing: the top bits of the key times 2^64 / golden ratio. The keys
    /// come from the configuration, so no secret is needed to keep the probes short.
    #[inline(always)]
    fn slot(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    /// The service for `key`.
    #[inline(always)]
    pub fn get(&self, key: &u64) -> Option<&u16> {
        let key = *key;
        if key == PortMap::EMPTY {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.slot(key);
        loop {
            // At most half full: the walk ends at a free slot.
            let (k, service) = self.slots.get(i)?;
            if *k == key {
                return Some(service);
            }
            if *k == PortMap::EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Records `key` -> `service` (replacing an earlier one).
    pub fn insert(&mut self, key: u64, service: u16) {
        debug_assert_ne!(key, PortMap::EMPTY);
        if (self.len + 1) * 2 > self.slots.len() {
            let grown = vec![(PortMap::EMPTY, 0); self.slots.len() * 2].into_boxed_slice();
            let old = std::mem::replace(&mut self.slots, grown);
            self.shift -= 1;
            self.len = 0;
            for &(k, v) in old.iter().filter(|(k, _)| *k != PortMap::EMPTY) {
                self.insert(k, v);
            }
        }
        let mask = self.slots.len() - 1;
        let mut i = self.slot(key);
        loop {
            let slot = &mut self.slots[i];
            if slot.0 == key {
                slot.1 = service;
                return;
            }
            if slot.0 == PortMap::EMPTY {
                *slot = (key, service);
                self.len += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Number of keys.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no key is recorded.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The destination and source MAC addresses of a frame sent to `mac` from `own`.
pub fn forward_header(mac: [u8; 6], own: [u8; 6]) -> [u8; 12] {
    let mut header = [0; 12];
    header[..6].copy_from_slice(&mac);
    header[6..].copy_from_slice(&own);
    header
}

/// The stable ids of services: assigned once per label, kept when a service is edited (a
/// rename moves its id to the new label), never reused within a run. Shared by its copies
/// until one changes: every change copies it, few change it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceIds {
    by_label: Arc<HashMap<String, u32>>,
    next: u32,
}

impl ServiceIds {
    /// Gives every service of `config` an id (the ones it has keep theirs) and forgets the
    /// labels no longer there.
    pub fn sync(&mut self, config: &Config) {
        // Labels are unique: as many, all known, is the same set.
        if config.services.len() == self.by_label.len()
            && config
                .services
                .iter()
                .all(|s| self.by_label.contains_key(&s.label))
        {
            return;
        }
        let labels: HashSet<&str> = config.services.iter().map(|s| s.label.as_str()).collect();
        let by_label = Arc::make_mut(&mut self.by_label);
        by_label.retain(|label, _| labels.contains(label.as_str()));
        for service in &config.services {
            if !by_label.contains_key(&service.label) {
                self.next += 1;
                by_label.insert(service.label.clone(), self.next);
            }
        }
    }

    /// The service now called `new` is the one that was called `old`.
    pub fn rename(&mut self, old: &str, new: &str) {
        let by_label = Arc::make_mut(&mut self.by_label);
        if let Some(id) = by_label.remove(old) {
            by_label.insert(new.to_owned(), id);
        }
    }

    /// The id of the service labelled `label`, once [`ServiceIds::sync`] has seen it.
    pub fn get(&self, label: &str) -> Option<u32> {
        self.by_label.get(label).copied()
    }
}

/// What the operator has set a real server to (`lbctl drain/halt/online`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AdminState {
    /// Takes traffic by its weight.
    #[default]
    Online,
    /// No new clients; established flows and persisted clients stay.
    Drain,
    /// No traffic at all.
    Halt,
}

/// Everything the control side knows of a real server beyond its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerState {
    /// The operator's setting.
    pub admin: AdminState,
    /// What the health checks say.
    pub healthy: bool,
    /// At its `max_connections` (until it falls below `min_connections`).
    pub full: bool,
    /// The weight it had before a weight of 0 drained it (0: none): the weight it keeps in the
    /// table for connections no table holds ([`ServiceEntry::known_table`]).
    pub weight_before_zero: u16,
}

impl Default for ServerState {
    fn default() -> Self {
        ServerState {
            admin: AdminState::Online,
            healthy: true,
            full: false,
            weight_before_zero: 0,
        }
    }
}

impl From<AdminState> for ServerState {
    fn from(admin: AdminState) -> Self {
        ServerState {
            admin,
            ..ServerState::default()
        }
    }
}

/// A real server as the packet path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealServerEntry {
    /// Operator's name for it.
    pub label: String,
    /// Its own address (DR: it also holds the VIP on loopback).
    pub ip: IpAddr,
    /// How the tables name it: [`real_server_key`] of its address.
    pub key: u32,
    /// Where frames for it go; `None` while unresolved.
    pub mac: Option<[u8; 6]>,
    /// The Ethernet addresses of a frame forwarded to it (its MAC, then the snapshot's
    /// `own_mac`): written over a frame's first 12 bytes in one go. `None` while unresolved.
    /// Derived from those two by [`Snapshot::build`].
    pub forward_header: Option<[u8; 12]>,
    /// Configured weight; 0 = drain.
    pub weight: u16,
    /// Operator state.
    pub admin: AdminState,
    /// False when its health checks failed: it gets no traffic, its connections move.
    pub healthy: bool,
    /// At its connection limit: no new connections, established ones go on.
    pub full: bool,
    /// Its weight in the known-clients table: `weight`, or when that is 0 (a drain), the
    /// weight it had before.
    pub known_weight: u16,
}

impl RealServerEntry {
    /// The entry for config server `rs` in `state`, its MAC pinned or from `mac_of`, behind
    /// a balancer at `own_mac`; without its label (no copy of it) when `labelled` is false.
    fn new(
        rs: &lbd_config::RealServer,
        state: ServerState,
        mac_of: impl Fn(IpAddr) -> Option<[u8; 6]>,
        own_mac: [u8; 6],
        labelled: bool,
    ) -> RealServerEntry {
        let mac = rs.mac.map(|MacAddr(mac)| mac).or_else(|| mac_of(rs.ip));
        RealServerEntry {
            label: if labelled {
                rs.label.clone()
            } else {
                String::new()
            },
            ip: rs.ip,
            key: real_server_key(rs.ip),
            mac,
            forward_header: mac.map(|mac| forward_header(mac, own_mac)),
            weight: rs.weight,
            admin: state.admin,
            healthy: state.healthy,
            full: state.full,
            known_weight: if rs.weight > 0 {
                rs.weight
            } else {
                state.weight_before_zero
            },
        }
    }

    /// Equal but for the label.
    fn same_but_label(&self, other: &RealServerEntry) -> bool {
        self.unlabelled() == other.unlabelled()
    }

    /// Every field but the label (a field added later fails to compile here until it is
    /// added).
    #[allow(clippy::type_complexity)]
    fn unlabelled(
        &self,
    ) -> (
        IpAddr,
        u32,
        Option<[u8; 6]>,
        Option<[u8; 12]>,
        u16,
        AdminState,
        bool,
        bool,
        u16,
    ) {
        let RealServerEntry {
            label: _,
            ip,
            key,
            mac,
            forward_header,
            weight,
            admin,
            healthy,
            full,
            known_weight,
        } = *self;
        (
            ip,
            key,
            mac,
            forward_header,
            weight,
            admin,
            healthy,
            full,
            known_weight,
        )
    }

    /// True when the server owns Maglev slots: online, healthy, resolved, non-zero weight,
    /// below its connection limit.
    pub fn takes_new_clients(&self) -> bool {
        self.takes_persisted_clients() && self.weight > 0 && self.admin == AdminState::Online
    }

    /// True when a persisted client may open a new connection to it (drained servers keep
    /// their persisted clients; full ones take no new connection at all).
    pub fn takes_persisted_clients(&self) -> bool {
        self.takes_known_clients() && !self.full
    }

    /// True when its established flows and persisted clients may still reach it.
    pub fn takes_known_clients(&self) -> bool {
        self.mac.is_some() && self.healthy && self.admin != AdminState::Halt
    }

    /// The state `lbctl status` shows.
    pub fn state_name(&self) -> &'static str {
        match (self.admin, self.mac) {
            (AdminState::Halt, _) => "halt",
            _ if !self.healthy => "down",
            (_, None) => "unresolved",
            (AdminState::Drain, _) => "drain",
            (AdminState::Online, _) if self.weight == 0 => "drain",
            _ if self.full => "full",
            (AdminState::Online, _) => "up",
        }
    }
}

/// A virtual service as the packet path sees it.
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    /// Operator's name for it.
    pub label: Arc<str>,
    /// Its virtual IP.
    pub vip: IpAddr,
    /// Its second (IPv6) VIP.
    pub vip6: Option<Ipv6Addr>,
    /// The leading `persistence_prefix_v6` bits of an IPv6 address: what keeps its clients
    /// together.
    pub client_mask_v6: u128,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    /// What the Maglev key is: the client's address alone, or the 5-tuple.
    pub persistence: Persistence,
    /// Stable identity across snapshots ([`ServiceIds`]): the persistence and fragment tables'
    /// key and what per-service counters follow.
    pub id: u32,
    /// [`service_key`] of its VIP, protocol and first port: how the nodes of a group name it
    /// to each other (their ids are their own).
    pub wire_key: u64,
    /// How long a client stays on its server after its last packet.
    pub persistence_timeout_ms: u64,
    /// Slot -> index into `real_servers`, over the servers that take new clients.
    pub table: MaglevTable,
    /// The table over every server that still takes known clients (drained and full ones
    /// too, with their weights), when it differs from `table`: where a mid-connection packet
    /// that no table knows goes. Such a connection began while its server took new clients, so
    /// this table, which still holds that server, most likely names it (GLB's "second
    /// chance" keeps drained servers for the same reason).
    pub known_table: Option<MaglevTable>,
    /// Config order (shared with the snapshots that reuse the entry).
    pub real_servers: Arc<[RealServerEntry]>,
    /// Real server's [`RealServerEntry::key`] -> index into `real_servers`.
    pub by_ip: Arc<HashMap<u32, u16>>,
    /// The fallback server's key ([`real_server_key`]) and MAC (`None` when unset; MAC `None`
    /// while unresolved).
    pub fallback: Option<(u32, Option<[u8; 6]>)>,
    /// The service it was built from: a snapshot after it reuses the entry while the config
    /// still shares the service and nothing else the entry holds changed.
    source: Arc<lbd_config::Service>,
}

impl ServiceEntry {
    /// True when no real server takes new clients: new clients go to the fallback, if any.
    pub fn all_unavailable(&self) -> bool {
        !self
            .real_servers
            .iter()
            .any(RealServerEntry::takes_new_clients)
    }
}

/// The whole packet-path view of the configuration.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Increases with every published change; workers report the one they use.
    pub generation: u64,
    /// The balancer interface's MAC: source of every frame it sends.
    pub own_mac: [u8; 6],
    /// Every configured IPv4 VIP (host order `u32`), for ARP and the first classification step.
    pub vips: HashSet<u32>,
    /// [`service_key`]`(VIP, protocol, port)` -> index into `services`.
    pub by_port: PortMap,
    /// Every IPv6 VIP (host order), for Neighbor Discovery.
    pub vips6: HashSet<u128>,
    /// (IPv6 VIP, protocol, port) -> index into `services`.
    pub by_port6: HashMap<(u128, u8, u16), u16>,
    /// [`ServiceEntry::id`] -> index into `services`.
    pub by_id: HashMap<u32, u16>,
    /// [`ServiceEntry::wire_key`] -> index into `services` (DR services): how a peer's
    /// persistent clients find their service here.
    pub by_wire_key: HashMap<u64, u16>,
    /// Config order.
    pub services: Vec<ServiceEntry>,
    /// The HA peers' MACs: their announcements of a VIP are no claim.
    pub peer_macs: Vec<[u8; 6]>,
    /// This host's addresses DR probes come from (host order).
    pub probe_v4: Option<u32>,
    /// See `probe_v4`.
    pub probe_v6: Option<u128>,
}

/// The snapshot a new one is built after ([`Snapshot::build_after`]).
#[derive(Debug, Clone, Copy)]
pub struct After<'a> {
    /// The snapshot before.
    pub snapshot: &'a Snapshot,
    /// Whether `state_of` and `mac_of` answer for every server what they answered when
    /// `snapshot` was built. Then a service the config still shares keeps its entry without a
    /// look at each of its servers (10,000 servers took about 1 ms a change).
    pub same_states: bool,
}

impl Snapshot {
    /// Builds the snapshot for a validated config. `ids` gives the services their stable ids
    /// (new services get new ones); `mac_of` gives each real server's MAC when it is known (a
    /// MAC pinned in the config wins over it); `state_of(service, real server)` the
    /// operator's setting and health for it (an [`AdminState`] alone means healthy).
    pub fn build<S: Into<ServerState>>(
        config: &Config,
        ids: &mut ServiceIds,
        own_mac: [u8; 6],
        generation: u64,
        mac_of: impl Fn(IpAddr) -> Option<[u8; 6]>,
        state_of: impl Fn(&str, &str) -> S,
    ) -> Snapshot {
        Snapshot::build_after(None, config, ids, own_mac, generation, mac_of, state_of)
    }

    /// [`Snapshot::build`], taking from `previous` the Maglev tables of the services whose
    /// servers, weights and states did not change: a change costs what it changes, not a
    /// table per service.
    pub fn build_after<S: Into<ServerState>>(
        previous: Option<After<'_>>,
        config: &Config,
        ids: &mut ServiceIds,
        own_mac: [u8; 6],
        generation: u64,
        mac_of: impl Fn(IpAddr) -> Option<[u8; 6]>,
        state_of: impl Fn(&str, &str) -> S,
    ) -> Snapshot {
        ids.sync(config);
        let count = config.services.len();
        let mut vips = HashSet::with_capacity(count);
        let mut by_port = PortMap::default();
        let mut vips6 = HashSet::new();
        let mut by_port6 = HashMap::new();
        let mut by_wire_key = HashMap::with_capacity(count);
        let mut by_id = HashMap::with_capacity(count);
        let mut services = Vec::with_capacity(config.services.len());
        for (index, service) in config.services.iter().enumerate() {
            let index = index as u16;
            let protocol = service.protocol.ip_protocol_number();
            // A SNAT service is HAProxy's: its frames go to the host stack, never here. It
            // keeps its place so that indices match the configuration's.
            if service.mode == lbd_config::ServiceMode::Dr {
                for vip in service.vips() {
                    match vip {
                        IpAddr::V4(v4) => {
                            vips.insert(u32::from(v4));
                            for port in service.ports.iter() {
                                by_port.insert(service_key(u32::from(v4), protocol, port), index);
                            }
                        }
                        IpAddr::V6(v6) => {
                            vips6.insert(u128::from(v6));
                            for port in service.ports.iter() {
                                by_port6.insert((u128::from(v6), protocol, port), index);
                            }
                        }
                    }
                }
            }

            let id = ids.get(&service.label).unwrap_or(u32::MAX);
            by_id.insert(id, index);
            // Peers name a service by its VIP (an IPv6-only one by a fold of it, marked in
            // bit 24, which no IPv4 key sets), protocol and first port.
            let first_port = service.ports.iter().next().unwrap_or(0);
            let wire_key = match service.vip {
                IpAddr::V4(v4) => service_key(u32::from(v4), protocol, first_port),
                IpAddr::V6(_) => {
                    service_key(real_server_key(service.vip), protocol, first_port) | 1 << 24
                }
            };
            if service.mode == lbd_config::ServiceMode::Dr {
                by_wire_key.insert(wire_key, index);
            }
            let fallback = service.fallback.map(|ip| (real_server_key(ip), mac_of(ip)));
            let seed = config.engine.hash_seed;
            let before = previous.and_then(|after| {
                let index = *after.snapshot.by_id.get(&id)?;
                let entry = after.snapshot.services.get(usize::from(index))?;
                Some((entry, after.snapshot.own_mac))
            });
            let same_states = previous.is_some_and(|after| after.same_states);
            // The same service (the config still shares it), MAC, seed, fallback and server
            // states: the entry before, shared rather than built again.
            if let Some((before, mac_before)) = before
                && Arc::ptr_eq(&before.source, service)
                && (mac_before, before.table.seed(), before.fallback) == (own_mac, seed, fallback)
                && (same_states
                    || service
                        .real_servers
                        .iter()
                        .take(MAX_BACKENDS)
                        .zip(before.real_servers.iter())
                        .all(|(rs, entry)| {
                            let state = state_of(&service.label, &rs.label).into();
                            entry.same_but_label(&RealServerEntry::new(
                                rs, state, &mac_of, own_mac, false,
                            ))
                        }))
            {
                services.push(before.clone());
                continue;
            }
            let real_servers: Arc<[RealServerEntry]> = service
                .real_servers
                .iter()
                .take(MAX_BACKENDS)
                .map(|rs| {
                    let state = state_of(&service.label, &rs.label).into();
                    RealServerEntry::new(rs, state, &mac_of, own_mac, true)
                })
                .collect();
            let by_ip = real_servers
                .iter()
                .enumerate()
                .map(|(i, rs)| (rs.key, i as u16))
                .collect::<HashMap<_, _>>()
                .into();
            let backends = |takes: fn(&RealServerEntry) -> bool,
                            weight: fn(&RealServerEntry) -> u16|
             -> Vec<Backend> {
                real_servers
                    .iter()
                    .map(|rs| Backend {
                        ip: rs.ip,
                        weight: if takes(rs) { weight(rs) } else { 0 },
                    })
                    .collect()
            };
            let new_clients = backends(RealServerEntry::takes_new_clients, |rs| rs.weight);
            let known_clients =
                backends(RealServerEntry::takes_known_clients, |rs| rs.known_weight);
            let earlier: Vec<&MaglevTable> = before
                .map(|(before, _)| {
                    std::iter::once(&before.table)
                        .chain(&before.known_table)
                        .collect()
                })
                .unwrap_or_default();
            let table = |backends: &[Backend]| {
                MaglevTable::build_reusing(
                    backends,
                    service.table_size,
                    seed,
                    earlier.iter().copied(),
                )
            };
            services.push(ServiceEntry {
                label: service.label.as_str().into(),
                vip: service.vip,
                vip6: service.vip6,
                client_mask_v6: service.client_mask_v6(),
                protocol,
                persistence: service.persistence,
                id,
                wire_key,
                persistence_timeout_ms: u64::from(service.persistence_timeout_s) * 1000,
                table: table(&new_clients),
                known_table: (known_clients != new_clients).then(|| table(&known_clients)),
                real_servers,
                by_ip,
                fallback,
                source: Arc::clone(service),
            });
        }
        Snapshot {
            generation,
            own_mac,
            vips,
            by_port,
            vips6,
            by_port6,
            by_id,
            by_wire_key,
            services,
            peer_macs: Vec::new(),
            probe_v4: None,
            probe_v6: None,
        }
    }

    /// Number of real servers of each service, in order: the shape of per-worker counters.
    pub fn real_server_counts(&self) -> impl Iterator<Item = usize> + '_ {
        self.services.iter().map(|s| s.real_servers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_mac_wins_over_the_neighbour_table() {
        let config = Config::from_toml_str(
            "[engine]\ninterface = \"eth0\"\nqueues = [0]\n[[service]]\nlabel = \"s\"\n\
             vip = \"198.18.0.100\"\nports = 1\ntable_size = 7\n[[service.real_server]]\n\
             label = \"pinned\"\nip = \"198.18.0.11\"\nmac = \"02:00:00:00:00:aa\"\n\
             [[service.real_server]]\nlabel = \"learned\"\nip = \"198.18.0.12\"\n\
             [[service.real_server]]\nlabel = \"unknown\"\nip = \"198.18.0.13\"\n",
        )
        .expect("valid");
        let table_mac = [2, 0, 0, 0, 0, 0xbb];
        let snapshot = Snapshot::build(
            &config,
            &mut ServiceIds::default(),
            [2; 6],
            1,
            |ip| (ip != std::net::Ipv4Addr::new(198, 18, 0, 13)).then_some(table_mac),
            |_, _| AdminState::Online,
        );
        let servers = &snapshot.services[0].real_servers;
        assert_eq!(servers[0].mac, Some([2, 0, 0, 0, 0, 0xaa]));
        assert_eq!(servers[1].mac, Some(table_mac));
        assert_eq!(servers[2].mac, None);
        assert!(!servers[2].takes_new_clients());
        // The unresolved server owns no slot.
        assert!(snapshot.services[0].table.slots().iter().all(|&s| s != 2));
        // Frames to a resolved server get its MAC, then ours; an unresolved one has no header.
        let header = |mac: [u8; 6]| [mac, [2; 6]].concat();
        assert_eq!(
            servers[0].forward_header.map(|h| h.to_vec()),
            Some(header([2, 0, 0, 0, 0, 0xaa]))
        );
        assert_eq!(
            servers[1].forward_header.map(|h| h.to_vec()),
            Some(header(table_mac))
        );
        assert_eq!(servers[2].forward_header, None);
    }

    /// A change rebuilds the tables of the service it touches; every other service keeps its
    /// tables, and a rebuilt table is the one a build from nothing gives.
    #[test]
    fn a_change_rebuilds_only_the_tables_it_touches() {
        let text = |weight: u16| {
            let mut text = String::from("[engine]\ninterface = \"eth0\"\nqueues = [0]\n");
            for service in 0..3 {
                text += &format!(
                    "[[service]]\nlabel = \"s{service}\"\nvip = \"198.18.0.100\"\nports = {}\n\
                     table_size = 251\n",
                    1000 + service
                );
                for rs in 0..3 {
                    let weight = if service == 1 && rs == 0 { weight } else { 100 };
                    text += &format!(
                        "[[service.real_server]]\nlabel = \"r{rs}\"\nip = \"198.18.0.{}\"\n\
                         weight = {weight}\n",
                        11 + rs
                    );
                }
            }
            Config::from_toml_str(&text).expect("valid")
        };
        let mut ids = ServiceIds::default();
        let state = |drained: Option<&'static str>| {
            move |service: &str, rs: &str| {
                if drained == Some(service) && rs == "r2" {
                    AdminState::Drain
                } else {
                    AdminState::Online
                }
            }
        };
        let mac = |_| Some([2, 0, 0, 0, 0, 0x11]);
        let first = Snapshot::build(&text(100), &mut ids, [2; 6], 1, mac, state(None));
        let build =
            |previous: Option<&Snapshot>, config: &Config, ids: &mut ServiceIds, drained| {
                let previous = previous.map(|snapshot| After {
                    snapshot,
                    same_states: false,
                });
                Snapshot::build_after(previous, config, ids, [2; 6], 2, mac, state(drained))
            };
        let reweighted = build(Some(&first), &text(50), &mut ids, None);
        let fresh = build(None, &text(50), &mut ServiceIds::default(), None);
        for (index, service) in reweighted.services.iter().enumerate() {
            let before = &first.services[index].table;
            assert_eq!(
                service.table.is_shared_with(before),
                index != 1,
                "service {index}"
            );
            assert_eq!(
                service.table, fresh.services[index].table,
                "service {index}"
            );
        }
        // Draining a server changes the new clients' table only: the table of known clients
        // is the one new clients had.
        let drained = build(Some(&reweighted), &text(50), &mut ids, Some("s2"));
        let (before, after) = (&reweighted.services[2], &drained.services[2]);
        assert!(!after.table.is_shared_with(&before.table));
        let known = after
            .known_table
            .as_ref()
            .expect("a drained server has known clients");
        assert!(known.is_shared_with(&before.table));
        assert!(
            drained.services[0]
                .table
                .is_shared_with(&reweighted.services[0].table)
        );
    }

    #[test]
    fn an_untouched_service_keeps_its_entry() {
        let mut text = String::from("[engine]\ninterface = \"eth0\"\nqueues = [0]\n");
        for service in 0..3 {
            text += &format!(
                "[[service]]\nlabel = \"s{service}\"\nvip = \"198.18.0.100\"\nports = {}\n\
                 table_size = 251\n[[service.real_server]]\nlabel = \"r0\"\nip = \"198.18.0.11\"\n\
                 [[service.real_server]]\nlabel = \"r1\"\nip = \"198.18.0.12\"\n",
                1000 + service
            );
        }
        let running = Config::from_toml_str(&text).expect("valid");
        let mut ids = ServiceIds::default();
        let mac = |last: u8| move |_| Some([2, 0, 0, 0, 0, last]);
        let drain = |who: &'static str| {
            move |service: &str, rs: &str| {
                if (service, rs) == (who, "r1") {
                    AdminState::Drain
                } else {
                    AdminState::Online
                }
            }
        };
        let build = |previous: Option<&Snapshot>,
                     config: &Config,
                     ids: &mut ServiceIds,
                     own: u8,
                     last,
                     who| {
            let previous = previous.map(|snapshot| After {
                snapshot,
                same_states: false,
            });
            Snapshot::build_after(previous, config, ids, [own; 6], 2, mac(last), drain(who))
        };
        let shared = |a: &Snapshot, b: &Snapshot| -> Vec<bool> {
            a.services
                .iter()
                .zip(&b.services)
                .map(|(a, b)| Arc::ptr_eq(&a.real_servers, &b.real_servers))
                .collect()
        };
        let first = build(None, &running, &mut ids, 2, 0x11, "");
        // A weight change in s1: s0 and s2 keep their entries.
        let mut changed = running.clone();
        Arc::make_mut(&mut changed.services[1]).real_servers[0].weight = 50;
        let second = build(Some(&first), &changed, &mut ids, 2, 0x11, "");
        assert_eq!(shared(&first, &second), [true, false, true]);
        // A state change (s2's r1 drained), a learned MAC, the balancer's own MAC: rebuilt.
        let drained = build(Some(&second), &changed, &mut ids, 2, 0x11, "s2");
        assert_eq!(shared(&second, &drained), [true, true, false]);
        let moved = build(Some(&drained), &changed, &mut ids, 2, 0x22, "s2");
        assert_eq!(shared(&drained, &moved), [false, false, false]);
        let renamed = build(Some(&moved), &changed, &mut ids, 3, 0x22, "s2");
        assert_eq!(shared(&moved, &renamed), [false, false, false]);
        // A reused entry is what a fresh build gives.
        let fresh = build(None, &changed, &mut ServiceIds::default(), 2, 0x11, "");
        for (reused, fresh) in second.services.iter().zip(&fresh.services) {
            assert_eq!(reused.real_servers, fresh.real_servers);
            assert_eq!(reused.by_ip, fresh.by_ip);
            assert_eq!(reused.table, fresh.table);
            assert_eq!(reused.known_table, fresh.known_table);
            assert_eq!(reused.fallback, fresh.fallback);
        }
        // With the servers' states and MACs known to be the ones `second` was built with, a
        // shared service's servers are not looked at: only those of s1, which changed again.
        let asked = std::cell::RefCell::new(Vec::new());
        let mut again = changed.clone();
        Arc::make_mut(&mut again.services[1]).real_servers[0].weight = 60;
        let after = After {
            snapshot: &second,
            same_states: true,
        };
        let third = Snapshot::build_after(Some(after), &again, &mut ids, [2; 6], 3, mac(0x11), {
            |service: &str, rs: &str| {
                asked.borrow_mut().push(format!("{service}/{rs}"));
                AdminState::Online
            }
        });
        assert_eq!(shared(&second, &third), [true, false, true]);
        assert_eq!(asked.into_inner(), ["s1/r0", "s1/r1"]);
    }

    #[test]
    fn the_port_map_finds_every_key_and_only_those() {
        let mut map = PortMap::default();
        let mut model = std::collections::HashMap::new();
        for (i, port) in (0..3000u16).step_by(3).enumerate() {
            let vip = 0xc612_0064 + (i % 5) as u32;
            let protocol = if i % 2 == 0 { 6 } else { 17 };
            map.insert(service_key(vip, protocol, port), i as u16);
            model.insert(service_key(vip, protocol, port), i as u16);
        }
        // Replacing keeps one entry.
        map.insert(service_key(0xc612_0064, 6, 0), 7);
        model.insert(service_key(0xc612_0064, 6, 0), 7);
        assert_eq!(map.len(), model.len());
        for vip in 0xc612_0063..0xc612_006a {
            for protocol in [6, 17, 1] {
                for port in 0..3100u16 {
                    let key = service_key(vip, protocol, port);
                    assert_eq!(map.get(&key), model.get(&key), "{key:x}");
                }
            }
        }
        assert_eq!(map.get(&u64::MAX), None);
        assert_eq!(PortMap::default().get(&service_key(1, 6, 1)), None);
    }
}
