//! The packet path: classify a frame, pick a real server, rewrite in place. No I/O.
//!
//! A worker hands [`Dataplane::process`] each received frame as a mutable byte slice; the frame
//! is either sent back out on the same interface, modified in place and with the same length
//! ([`Verdict::Transmit`]), or dropped under a counted [`DropReason`]. Every rule below is a
//! unit test on byte arrays at the bottom of this file.
//!
//! - ARP request (RFC 826) for a VIP: turned into the reply from the interface's MAC.
//! - IPv4 TCP/UDP to VIP:port of a service: Direct Routing, as IPVS does it. Only the Ethernet
//!   header changes: destination = the chosen real server, source = our own MAC (leaving the
//!   client's MAC as source would teach the switch that the client lives on our port). The IP
//!   packet is untouched, so the real server sees the client's address and answers it directly.
//! - ICMP echo request (RFC 792) to a VIP: turned into the echo reply from the VIP, unless it
//!   comes from an address no reply may go to (broadcast, multicast, a VIP).
//! - An ICMP error to a VIP (destination unreachable, fragmentation needed, time exceeded,
//!   parameter problem; ICMPv6's packet too big and the rest) quotes a packet a real server
//!   sent from the VIP. The connection is read from the quote (addresses and ports reversed)
//!   and the error goes to the server the client's own packets go to (flow table, then
//!   persistence, then Maglev), as IPVS does: a server that never hears "fragmentation
//!   needed" keeps sending segments too large for the path, and the stream stalls. Nothing is
//!   recorded; an error about no service is dropped.
//! - IPv6 ([`crate::packet::ipv6`]) the same way, with tables of its own (the code is generic
//!   over the address family, [`Family`]): Neighbor Solicitation for a VIP answered with a
//!   Neighbor Advertisement, ICMPv6 echo answered, TCP and UDP forwarded by MAC rewrite.
//!   Clients are persisted by their address's leading `persistence_prefix_v6` bits.
//! - A connection is placed when it opens (a TCP SYN, or any UDP datagram) and recorded in the
//!   flow table. A mid-connection TCP segment that no table knows (the entry was lost to a full
//!   table, a restart) is placed as its connection most likely was: the client's persisted
//!   server, else the Maglev table that still holds drained and full servers. It records
//!   nothing: spoofed segments cannot fill the tables or count as connections.
//! - IP fragments: the first piece carries the ports and is placed like any datagram; the
//!   fragment table then sends the later pieces (source, destination, protocol, IP ID) to the
//!   same server. A later piece whose first was not seen is dropped: nothing says where its
//!   datagram went.
//! - The DR check ([`crate::packet::drcheck`]): another station speaking for a VIP (ARP with
//!   a VIP as sender, a Neighbor Advertisement for one) is recorded and answered with our own
//!   announcement; a real server's SYN-ACK to a DR probe is recorded and reset.
//! - In a group of balancers (an HA pair), established connections and persistent clients are
//!   offered to the peers and theirs installed here ([`crate::packet::sync`]), so a node that
//!   takes over sends every known client where the other did.
//!
//! The Ethernet and IPv4 headers, read for every frame, are checked by hand at fixed offsets
//! (every read bounds-checked: a malformed frame is a counted drop, never a panic); ARP goes
//! through etherparse's checked slices. The in-place rewrites write fixed offsets whose bounds
//! those checks have already established.
//!
//! The per-frame path of a known connection (Ethernet, IPv4, connection, service, rewrite,
//! counters) is inlined into [`Dataplane::process`]; new connections, fragments, ICMP and a
//! new snapshot's relocations are out-of-line functions.

use crate::packet::counters::{Counters, DropReason, Sent, ServiceTraffic};
use crate::packet::drcheck::{self, ClaimKind, DrWatch, PROBE_PORTS, ProbeAnswer};
use crate::packet::flows::{
    Address, Census, ConnectionCensus, FRAGMENT_TIMEOUT_MS, FlowEntry, FlowKey, FlowState,
    FlowTable, FragmentEntry, FragmentKey, FragmentTable, NO_FLAGS, PersistEntry, PersistenceTable,
    SWEEP_PASS_MS, tcp_flags,
};
use crate::packet::ipv6::{self, Icmpv6};
use crate::packet::maglev::MaglevTable;
use crate::packet::snapshot::{RealServerEntry, ServiceEntry, Snapshot, service_key};
use crate::packet::sync::{Installed, Outbox, OutboxCounters, SyncEntry, WalkPosition, remaining};
use etherparse::{ArpPacketSlice, EtherType};
use lbd_config::Persistence;
use std::net::IpAddr;
use std::sync::Arc;

/// Byte offsets in an Ethernet II frame and the headers the balancer touches.
mod field {
    use std::ops::Range;
    pub const ETH_DST: Range<usize> = 0..6;
    pub const ETH_SRC: Range<usize> = 6..12;
    pub const ETH_HEADER_LEN: usize = 14;

    // ARP for Ethernet/IPv4, relative to the frame start (RFC 826 packet after the 14-byte header).
    pub const ARP_OPER: Range<usize> = 20..22;
    pub const ARP_SHA: Range<usize> = 22..28;
    pub const ARP_SPA: Range<usize> = 28..32;
    pub const ARP_THA: Range<usize> = 32..38;
    pub const ARP_TPA: Range<usize> = 38..42;
    pub const ARP_FRAME_LEN: usize = 42;

    // IPv4, relative to the frame start.
    pub const IP_VERSION_IHL: usize = 14;
    pub const IP_TOTAL_LEN: usize = 16;
    pub const IP_ID: usize = 18;
    pub const IP_FLAGS_FRAGMENT: usize = 20;
    pub const IP_TTL: usize = 22;
    pub const IP_PROTOCOL: usize = 23;
    pub const IP_CHECKSUM: Range<usize> = 24..26;
    pub const IP_SRC: Range<usize> = 26..30;
    pub const IP_DST: Range<usize> = 30..34;
    /// Ethernet header and the fixed part of the IPv4 header.
    pub const IP_MIN_FRAME_LEN: usize = 34;
}

const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;
const IP_PROTO_ICMP: u8 = 1;
const IP_PROTO_TCP: u8 = 6;
/// Offset of the flags byte in the TCP header (RFC 9293).
const TCP_FLAGS_OFFSET: usize = 13;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REPLY: u8 = 129;
const BROADCAST: [u8; 6] = [0xff; 6];
/// TTL of the replies the balancer originates (ICMP echo replies), as Linux uses by default.
const REPLY_TTL: u8 = 64;
/// Minimum Ethernet frame without FCS; generated frames are padded to it.
pub const MIN_FRAME_LEN: usize = 60;
/// Fragmented datagrams remembered per worker (they live for [`FRAGMENT_TIMEOUT_MS`]).
const FRAGMENT_TABLE_SIZE: usize = 16_384;

/// What to do with a processed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the (rewritten) frame out of the interface it came in on.
    Transmit,
    /// Recycle the frame; the reason has been counted.
    Drop(DropReason),
}

/// One worker's packet path: the snapshot it reads, its connection and persistence tables
/// and the counters it keeps.
#[derive(Debug)]
pub struct Dataplane {
    snapshot: Arc<Snapshot>,
    /// The snapshot's own MAC as [`mac_word`] gives it for a frame sent to it.
    own_mac_word: u64,
    counters: Counters,
    /// IPv4's tables.
    v4: Tables<u32>,
    /// IPv6's (boxed: the IPv4 path's fields stay together).
    v6: Box<Tables<u128>>,
    /// Where entries go for the peers, in a group (boxed: the packet path's fields stay
    /// together).
    outbox: Option<Box<Outbox>>,
    /// What the DR check saw.
    dr: Box<DrWatch>,
    /// When the last step of the sweep of expired entries ran.
    swept_ms: u64,
}

/// One address family's connection, persistence and fragment tables.
#[derive(Debug)]
pub struct Tables<A: Address> {
    /// Connections.
    pub flows: FlowTable<A>,
    /// Persistent clients.
    pub persistence: PersistenceTable<A>,
    /// Fragmented datagrams.
    pub fragments: FragmentTable<A>,
}

impl<A: Address> Tables<A> {
    fn new(sizes: TableSizes) -> Self {
        Tables {
            flows: FlowTable::new(sizes.flows),
            persistence: PersistenceTable::new(sizes.persistent_clients),
            fragments: FragmentTable::new(FRAGMENT_TABLE_SIZE),
        }
    }

    fn sweep_gradually(&mut self, now_ms: u64) {
        self.flows.sweep_gradually(now_ms, SWEEP_PASS_MS);
        self.persistence.sweep_gradually(now_ms, SWEEP_PASS_MS);
        self.fragments.sweep_gradually(now_ms, SWEEP_PASS_MS);
    }
}

/// What the packet path does differently for IPv4 (`u32`) and IPv6 (`u128`); the rest of it
/// is one generic code path.
pub trait Family: Address {
    /// Reads and checks the IP header of a frame of this family.
    fn parse(frame: &[u8]) -> Result<Ip<Self>, DropReason>;
    /// This family's tables.
    fn tables<'a>(v4: &'a mut Tables<u32>, v6: &'a mut Tables<u128>) -> &'a mut Tables<Self>;
    /// The service at `dst`, `protocol`, `port`.
    fn service(snapshot: &Snapshot, dst: Self, protocol: u8, port: u16) -> Option<u16>;
    /// Whether `address` is a VIP.
    fn is_vip(snapshot: &Snapshot, address: Self) -> bool;
    /// The part of a client's address that persistence keys on.
    fn client(service: &ServiceEntry, src: Self) -> Self;
    /// The address's bytes as the Maglev hash reads them.
    fn bytes(address: Self) -> [u8; 16];
    /// Bytes of an address.
    const LEN: usize;
    /// A connection as the group's peers hear of it.
    fn flow_entry(
        key: FlowKey<Self>,
        real_server: u32,
        state: FlowState,
        remaining_ms: u32,
    ) -> SyncEntry;
    /// A persistent client as the group's peers hear of it.
    fn persist_entry(client: Self, service: u64, real_server: u32, remaining_ms: u32) -> SyncEntry;
    /// This host's address that DR probes come from, of this family.
    fn probe_address(snapshot: &Snapshot) -> Option<Self>;
    /// The address as a standard one.
    fn ip(address: Self) -> IpAddr;
}

impl Family for u32 {
    #[inline(always)]
    fn parse(frame: &[u8]) -> Result<Ip<u32>, DropReason> {
        Ip::parse_v4(frame)
    }

    #[inline(always)]
    fn tables<'a>(v4: &'a mut Tables<u32>, _: &'a mut Tables<u128>) -> &'a mut Tables<u32> {
        v4
    }

    #[inline(always)]
    fn service(snapshot: &Snapshot, dst: u32, protocol: u8, port: u16) -> Option<u16> {
        snapshot
            .by_port
            .get(&service_key(dst, protocol, port))
            .copied()
    }

    #[inline(always)]
    fn is_vip(snapshot: &Snapshot, address: u32) -> bool {
        snapshot.vips.contains(&address)
    }

    #[inline(always)]
    fn client(_: &ServiceEntry, src: u32) -> u32 {
        src
    }

    fn bytes(address: u32) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..4].copy_from_slice(&address.to_be_bytes());
        bytes
    }

    const LEN: usize = 4;

    fn flow_entry(
        key: FlowKey,
        real_server: u32,
        state: FlowState,
        remaining_ms: u32,
    ) -> SyncEntry {
        SyncEntry::Flow {
            key,
            real_server,
            state,
            remaining_ms,
        }
    }

    fn persist_entry(client: u32, service: u64, real_server: u32, remaining_ms: u32) -> SyncEntry {
        SyncEntry::Persist {
            client,
            service,
            real_server,
            remaining_ms,
        }
    }

    fn probe_address(snapshot: &Snapshot) -> Option<u32> {
        snapshot.probe_v4
    }

    fn ip(address: u32) -> IpAddr {
        IpAddr::V4(address.into())
    }
}

impl Family for u128 {
    fn parse(frame: &[u8]) -> Result<Ip<u128>, DropReason> {
        ipv6::parse(frame)
    }

    fn tables<'a>(_: &'a mut Tables<u32>, v6: &'a mut Tables<u128>) -> &'a mut Tables<u128> {
        v6
    }

    fn service(snapshot: &Snapshot, dst: u128, protocol: u8, port: u16) -> Option<u16> {
        snapshot.by_port6.get(&(dst, protocol, port)).copied()
    }

    fn is_vip(snapshot: &Snapshot, address: u128) -> bool {
        snapshot.vips6.contains(&address)
    }

    fn client(service: &ServiceEntry, src: u128) -> u128 {
        src & service.client_mask_v6
    }

    fn bytes(address: u128) -> [u8; 16] {
        address.to_be_bytes()
    }

    const LEN: usize = 16;

    fn flow_entry(
        key: FlowKey<u128>,
        real_server: u32,
        state: FlowState,
        remaining_ms: u32,
    ) -> SyncEntry {
        SyncEntry::Flow6 {
            key,
            real_server,
            state,
            remaining_ms,
        }
    }

    fn persist_entry(client: u128, service: u64, real_server: u32, remaining_ms: u32) -> SyncEntry {
        SyncEntry::Persist6 {
            client,
            service,
            real_server,
            remaining_ms,
        }
    }

    fn probe_address(snapshot: &Snapshot) -> Option<u128> {
        snapshot.probe_v6
    }

    fn ip(address: u128) -> IpAddr {
        IpAddr::V6(address.into())
    }
}

/// What a known connection's packet changed that the peers should hear of.
const CHANGED_FLOW: u8 = 1;
/// ...and its client's persistence entry was written.
const CHANGED_PERSISTENCE: u8 = 2;

/// Table sizes for [`Dataplane::new`].
#[derive(Debug, Clone, Copy)]
pub struct TableSizes {
    /// Connections tracked.
    pub flows: usize,
    /// Persistent clients remembered.
    pub persistent_clients: usize,
}

impl Default for TableSizes {
    fn default() -> Self {
        TableSizes {
            flows: 262_144,
            persistent_clients: 65_536,
        }
    }
}

impl Dataplane {
    /// A packet path over `snapshot` with empty tables and zeroed counters.
    pub fn new(snapshot: Arc<Snapshot>, sizes: TableSizes) -> Dataplane {
        let counters = Counters::for_services(snapshot.real_server_counts());
        Dataplane {
            own_mac_word: own_mac_word(snapshot.own_mac),
            snapshot,
            counters,
            v4: Tables::new(sizes),
            v6: Box::new(Tables::new(sizes)),
            outbox: None,
            dr: Box::default(),
            swept_ms: 0,
        }
    }

    /// Offers this worker's entries to the group through `outbox` from now on.
    pub fn share_through(&mut self, outbox: Outbox) {
        self.outbox = Some(Box::new(outbox));
    }

    /// True while a walk offering the tables to the group is under way.
    pub fn sharing_walk_under_way(&self) -> bool {
        self.outbox
            .as_ref()
            .is_some_and(|outbox| outbox.walk.is_some())
    }

    /// True when the group asked for a walk that has not started yet.
    pub fn sharing_walk_requested(&self) -> bool {
        self.outbox
            .as_ref()
            .is_some_and(|outbox| outbox.dump_requested())
    }

    /// What the outbox has done, when there is one.
    pub fn outbox_counters(&self) -> Option<OutboxCounters> {
        self.outbox.as_ref().map(|outbox| outbox.counters)
    }

    /// One step of the walk that offers every entry again (when one is due): call it once per
    /// loop. It looks at a few hundred slots and stops early when the queue is full.
    pub fn share(&mut self, now_ms: u64) {
        let Some(outbox) = &mut self.outbox else {
            return;
        };
        let Some((mut position, budget)) = outbox.due(now_ms) else {
            return;
        };
        let snapshot = &*self.snapshot;
        let mut next = Some(position);
        for _ in 0..budget {
            let offer = match position {
                WalkPosition::Flows(i) if i >= self.v4.flows.slot_count() => {
                    position = WalkPosition::Flows6(0);
                    next = Some(position);
                    continue;
                }
                WalkPosition::Flows(i) => {
                    position = WalkPosition::Flows(i + 1);
                    flow_offer_at(&self.v4, i, now_ms)
                }
                WalkPosition::Flows6(i) if i >= self.v6.flows.slot_count() => {
                    position = WalkPosition::Persistence(0);
                    next = Some(position);
                    continue;
                }
                WalkPosition::Flows6(i) => {
                    position = WalkPosition::Flows6(i + 1);
                    flow_offer_at(&self.v6, i, now_ms)
                }
                WalkPosition::Persistence(i) if i >= self.v4.persistence.slot_count() => {
                    position = WalkPosition::Persistence6(0);
                    next = Some(position);
                    continue;
                }
                WalkPosition::Persistence(i) => {
                    position = WalkPosition::Persistence(i + 1);
                    persist_offer_at(snapshot, &self.v4, i, now_ms)
                }
                WalkPosition::Persistence6(i) if i >= self.v6.persistence.slot_count() => {
                    next = None;
                    break;
                }
                WalkPosition::Persistence6(i) => {
                    position = WalkPosition::Persistence6(i + 1);
                    persist_offer_at(snapshot, &self.v6, i, now_ms)
                }
            };
            if let Some(offer) = offer
                && !outbox.offer_from_walk(offer)
            {
                // Full: this slot again at the next loop.
                break;
            }
            next = Some(position);
        }
        outbox.walked(next, now_ms);
    }

    /// One step of the sweep that removes expired entries from every table, a whole pass
    /// every [`SWEEP_PASS_MS`]: call it once per loop. An expired connection leaves its
    /// server's count ([`Dataplane::connections`]) when it is swept.
    pub fn sweep_expired(&mut self, now_ms: u64) {
        // A busy worker loops many times a millisecond: one step per tick of the clock.
        if now_ms == self.swept_ms {
            return;
        }
        self.swept_ms = now_ms;
        self.v4.sweep_gradually(now_ms);
        self.v6.sweep_gradually(now_ms);
    }

    /// Active connections ([`FlowState::is_active`]) per service and real server of the
    /// snapshot in use, as the flow tables' census counts them: a connection counts for the
    /// service at its VIP and port, and for its server while that server is in the service.
    pub fn connections(&self) -> Vec<Vec<u64>> {
        let snapshot = &*self.snapshot;
        let mut connections: Vec<Vec<u64>> = snapshot
            .services
            .iter()
            .map(|s| vec![0; s.real_servers.len()])
            .collect();
        let v4 = self.v4.flows.census().counts().map(|(served, count)| {
            let key = service_key(served.vip, served.protocol, served.port);
            (snapshot.by_port.get(&key), served.real_server, count)
        });
        let v6 = self.v6.flows.census().counts().map(|(served, count)| {
            let key = (served.vip, served.protocol, served.port);
            (snapshot.by_port6.get(&key), served.real_server, count)
        });
        for (service, real_server, count) in v4.chain(v6) {
            let Some(&service) = service else {
                continue;
            };
            let service = usize::from(service);
            if let Some(rs) = snapshot.services[service].by_ip.get(&real_server)
                && let Some(slot) = connections[service].get_mut(usize::from(*rs))
            {
                *slot += count;
            }
        }
        connections
    }

    /// Installs entries a peer shared: a connection or client this node does not carry
    /// itself, or carries with an earlier expiry, takes the peer's server. Entries of services
    /// this node does not have are kept out.
    pub fn install(&mut self, entries: &[SyncEntry], now_ms: u64) -> Installed {
        let mut done = Installed::default();
        for entry in entries {
            let installed = match *entry {
                SyncEntry::Flow {
                    key,
                    real_server,
                    state,
                    remaining_ms,
                } => install_flow(
                    &self.snapshot,
                    &mut self.v4,
                    key,
                    (real_server, state),
                    remaining_ms,
                    now_ms,
                ),
                SyncEntry::Flow6 {
                    key,
                    real_server,
                    state,
                    remaining_ms,
                } => install_flow(
                    &self.snapshot,
                    &mut self.v6,
                    key,
                    (real_server, state),
                    remaining_ms,
                    now_ms,
                ),
                SyncEntry::Persist {
                    client,
                    service,
                    real_server,
                    remaining_ms,
                } => install_persist(
                    &self.snapshot,
                    &mut self.v4,
                    (client, service),
                    real_server,
                    remaining_ms,
                    now_ms,
                ),
                SyncEntry::Persist6 {
                    client,
                    service,
                    real_server,
                    remaining_ms,
                } => install_persist(
                    &self.snapshot,
                    &mut self.v6,
                    (client, service),
                    real_server,
                    remaining_ms,
                    now_ms,
                ),
            };
            if installed {
                done.installed += 1;
            } else {
                done.kept_out += 1;
            }
        }
        done
    }

    /// The IPv4 connection table.
    pub fn flows(&self) -> &FlowTable {
        &self.v4.flows
    }

    /// The IPv4 persistence table.
    pub fn persistence(&self) -> &PersistenceTable {
        &self.v4.persistence
    }

    /// The IPv4 fragment table.
    pub fn fragments(&self) -> &FragmentTable {
        &self.v4.fragments
    }

    /// The IPv6 tables.
    pub fn tables_v6(&self) -> &Tables<u128> {
        &self.v6
    }

    /// Takes back the count of a frame that [`Dataplane::process`] passed for transmission
    /// (its bytes as they left `process`) but that could not be sent after all: the driver then
    /// counts it as dropped, so that every frame ends in exactly one counter. What it was
    /// counted as is read back from the frame (the reply's EtherType and protocol, a forwarded
    /// frame's service and destination MAC), so the packet path records nothing for the rare
    /// frame that finds the TX ring full. Call it before the next snapshot is taken.
    #[cold]
    pub fn unsend(&mut self, frame: &[u8], now_ms: u64) {
        if let Some(sent) = self.what_was_sent(frame, now_ms) {
            self.counters.unsend(sent, frame.len());
        }
    }

    fn what_was_sent(&self, frame: &[u8], now_ms: u64) -> Option<Sent> {
        let eth = frame.first_chunk::<{ field::ETH_HEADER_LEN }>()?;
        let ether_type = [eth[12], eth[13]];
        if ether_type == EtherType::ARP.0.to_be_bytes() {
            // Our announcement (sender = target) defends a VIP; a reply answers a question.
            let announcement = frame.get(field::ARP_SPA) == frame.get(field::ARP_TPA);
            return Some(if announcement {
                Sent::VipDefence
            } else {
                Sent::ArpReply
            });
        }
        let snapshot = &*self.snapshot;
        let service_index = if ether_type == EtherType::IPV6.0.to_be_bytes() {
            let ip = ipv6::parse(frame).ok()?;
            if ip.protocol == ipv6::NEXT_ICMPV6 {
                // An echo reply or an advertisement: the balancer's own answers (to all
                // nodes: a defence).
                return match frame.get(ip.l4) {
                    Some(&ICMPV6_ECHO_REPLY) => Some(Sent::EchoReply),
                    _ if eth[0] == 0x33 => Some(Sent::VipDefence),
                    _ => Some(Sent::NdReply),
                };
            }
            if snapshot.probe_v6 == Some(ip.src) {
                return Some(Sent::ProbeReset);
            }
            self.service_sent(&ip, &self.v6, now_ms)?
        } else {
            let ip = Ip::parse_v4(frame).ok()?;
            if ip.protocol == IP_PROTO_ICMP {
                return Some(Sent::EchoReply);
            }
            if snapshot.probe_v4 == Some(ip.src) {
                return Some(Sent::ProbeReset);
            }
            self.service_sent(&ip, &self.v4, now_ms)?
        };
        let service = snapshot.services.get(usize::from(service_index))?;
        let mac = frame.get(field::ETH_DST)?;
        match service
            .real_servers
            .iter()
            .position(|rs| rs.mac.as_ref().map(|m| &m[..]) == Some(mac))
        {
            Some(real_server) => Some(Sent::Forward {
                service: service_index,
                real_server: u16::try_from(real_server).ok()?,
            }),
            None => Some(Sent::Fallback {
                service: service_index,
            }),
        }
    }

    /// The service of a frame that was forwarded.
    fn service_sent<A: Family>(&self, ip: &Ip<A>, tables: &Tables<A>, now_ms: u64) -> Option<u16> {
        let snapshot = &*self.snapshot;
        if ip.first_fragment {
            A::service(snapshot, ip.dst, ip.protocol, ip.ports? as u16)
        } else {
            let key = ip.fragment_key();
            snapshot
                .by_id
                .get(&tables.fragments.get(&key, now_ms)?.service)
                .copied()
        }
    }

    /// This worker's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counters, for the driver's own events (TX ring full, gratuitous ARP).
    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// Switches to a new snapshot between frames. Counters keep their totals; per-service and
    /// per-real-server counters follow their service (by id) and server (by address) to their
    /// places in the new snapshot, and end with them.
    pub fn set_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        let mut old = std::mem::take(&mut self.counters);
        let mut old_services = std::mem::take(&mut old.services);
        let mut counters = Counters::default();
        counters.merge(&old);
        let before = &self.snapshot;
        counters.services = snapshot
            .services
            .iter()
            .enumerate()
            .map(|(at, entry)| {
                // Most services keep their place; a moved one is found by its id.
                let old_at = match before.services.get(at) {
                    Some(old_entry) if old_entry.id == entry.id => Some(at),
                    _ => before.by_id.get(&entry.id).map(|&i| usize::from(i)),
                };
                let Some((old_entry, old_traffic)) =
                    old_at.and_then(|i| Some((before.services.get(i)?, old_services.get_mut(i)?)))
                else {
                    return ServiceTraffic::for_servers(entry.real_servers.len());
                };
                // The same index map: every server is where it was, counters and all (each
                // old service is taken once, ids being unique).
                if Arc::ptr_eq(&old_entry.by_ip, &entry.by_ip) {
                    return std::mem::take(old_traffic);
                }
                let mut traffic = ServiceTraffic::for_servers(entry.real_servers.len());
                traffic.total = old_traffic.total;
                for (rs, rs_traffic) in entry.real_servers.iter().zip(&mut traffic.real_servers) {
                    if let Some(&old_index) = old_entry.by_ip.get(&rs.key)
                        && let Some(old_rs) = old_traffic.real_servers.get(usize::from(old_index))
                    {
                        *rs_traffic = *old_rs;
                    }
                }
                traffic
            })
            .collect();
        self.counters = counters;
        self.own_mac_word = own_mac_word(snapshot.own_mac);
        self.snapshot = snapshot;
    }

    /// The snapshot in use.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// Handles one received frame in place at time `now_ms` (milliseconds on any monotonic
    /// clock, the same for every call). The frame keeps its length.
    #[inline]
    pub fn process(&mut self, frame: &mut [u8], now_ms: u64) -> Verdict {
        self.counters.rx_frames += 1;
        let verdict = self.classify_and_rewrite(frame, now_ms);
        if let Verdict::Drop(reason) = verdict {
            self.counters.drop(reason);
        }
        verdict
    }

    #[inline(always)]
    fn classify_and_rewrite(&mut self, frame: &mut [u8], now_ms: u64) -> Verdict {
        let Some(eth) = frame.first_chunk::<{ field::ETH_HEADER_LEN }>() else {
            return Verdict::Drop(DropReason::Truncated);
        };
        let ether_type = [eth[12], eth[13]];
        let to_us = mac_word(eth) == self.own_mac_word;
        if ether_type == EtherType::IPV4.0.to_be_bytes() {
            if !to_us {
                return Verdict::Drop(DropReason::NotOurMac);
            }
            self.ipv4(frame, now_ms)
        } else if ether_type == EtherType::ARP.0.to_be_bytes() {
            if !to_us && eth[field::ETH_DST] != BROADCAST {
                return Verdict::Drop(DropReason::NotOurMac);
            }
            self.arp(frame, now_ms)
        } else if ether_type == EtherType::IPV6.0.to_be_bytes() {
            // Solicitations come to a multicast MAC (33:33:ff + the target's last 24 bits).
            if !to_us && eth[0] != 0x33 {
                return Verdict::Drop(DropReason::NotOurMac);
            }
            self.ipv6(frame, now_ms)
        } else {
            Verdict::Drop(DropReason::UnsupportedEtherType)
        }
    }

    /// RFC 826: answer a request for a VIP with our MAC, by turning the request around.
    fn arp(&mut self, frame: &mut [u8], now_ms: u64) -> Verdict {
        let Ok(arp) = ArpPacketSlice::from_slice(&frame[field::ETH_HEADER_LEN..]) else {
            return Verdict::Drop(DropReason::Truncated);
        };
        let is_ethernet_ipv4 = arp.hw_addr_type() == etherparse::ArpHardwareId::ETHERNET
            && arp.proto_addr_type() == EtherType::IPV4
            && arp.hw_addr_size() == 6
            && arp.proto_addr_size() == 4;
        let (Ok(target), Ok(sender_ip), Ok(sender_mac)) = (
            <[u8; 4]>::try_from(arp.target_protocol_addr()),
            <[u8; 4]>::try_from(arp.sender_protocol_addr()),
            <[u8; 6]>::try_from(arp.sender_hw_addr()),
        ) else {
            return Verdict::Drop(DropReason::ArpNotRequest);
        };
        let request = arp.operation().0 == ARP_OP_REQUEST;
        // Another station speaking for a VIP: the DR check's business.
        if is_ethernet_ipv4 && self.snapshot.vips.contains(&u32::from_be_bytes(sender_ip)) {
            let kind = match (request, sender_ip == target) {
                (false, _) => ClaimKind::Answered,
                (true, true) => ClaimKind::Announced,
                (true, false) => ClaimKind::UsedAsSender,
            };
            let vip = IpAddr::from(sender_ip);
            return self.vip_claimed(frame, vip, sender_mac, kind, now_ms);
        }
        if !is_ethernet_ipv4 || !request {
            return Verdict::Drop(DropReason::ArpNotRequest);
        }
        // A request whose sender is the target is an announcement (gratuitous ARP), not a question.
        if sender_ip == target || !self.snapshot.vips.contains(&u32::from_be_bytes(target)) {
            return Verdict::Drop(DropReason::ArpNotVip);
        }
        let own = self.snapshot.own_mac;
        // The fixed-offset layout below holds: hw/proto sizes are 6/4, and from_slice checked
        // that the packet (hence the frame) is at least ARP_FRAME_LEN long.
        debug_assert!(frame.len() >= field::ARP_FRAME_LEN);
        frame.copy_within(field::ARP_SHA, field::ARP_THA.start);
        frame.copy_within(field::ARP_SPA, field::ARP_TPA.start);
        frame[field::ARP_SHA].copy_from_slice(&own);
        frame[field::ARP_SPA].copy_from_slice(&target);
        frame[field::ARP_OPER].copy_from_slice(&ARP_OP_REPLY.to_be_bytes());
        frame.copy_within(field::ETH_SRC, field::ETH_DST.start);
        frame[field::ETH_SRC].copy_from_slice(&own);
        self.counters.arp_replies += 1;
        Verdict::Transmit
    }

    /// IPv4: a known connection's frame is forwarded here; everything else (ICMP, fragments,
    /// new connections, drops) goes through the out-of-line paths.
    #[inline(always)]
    fn ipv4(&mut self, frame: &mut [u8], now_ms: u64) -> Verdict {
        let ip = match Ip::parse_v4(frame) {
            Ok(ip) => ip,
            Err(reason) => return Verdict::Drop(reason),
        };
        // Out of line, these parse the header again: passing the parsed header on would make
        // the per-frame path keep all of it in memory.
        if ip.protocol == IP_PROTO_ICMP {
            return self.icmp(frame, now_ms);
        }
        if ip.fragmented {
            return self.fragment::<u32>(frame, now_ms);
        }
        self.place(frame, &ip, now_ms).0
    }

    /// IPv6: ICMPv6 to a VIP (Neighbor Discovery, echo) is answered; the rest goes the way of
    /// IPv4's frames, through IPv6's tables.
    #[inline(never)]
    fn ipv6(&mut self, frame: &mut [u8], now_ms: u64) -> Verdict {
        let ip = match ipv6::parse(frame) {
            Ok(ip) => ip,
            Err(reason) => return Verdict::Drop(reason),
        };
        if ip.protocol == ipv6::NEXT_ICMPV6 && !ip.fragmented {
            return self.icmpv6(frame, &ip, now_ms);
        }
        if ip.fragmented {
            return self.fragment::<u128>(frame, now_ms);
        }
        self.place(frame, &ip, now_ms).0
    }

    /// ICMPv6: a solicitation for a VIP is answered with our MAC; an echo request to a VIP is
    /// answered from it.
    fn icmpv6(&mut self, frame: &mut [u8], ip: &Ip<u128>, now_ms: u64) -> Verdict {
        let own_mac = self.snapshot.own_mac;
        match ipv6::classify_icmpv6(frame, ip) {
            Icmpv6::Error if self.snapshot.vips6.contains(&ip.dst) => {
                let quoted = frame
                    .get(ip.l4..ip.l4_end)
                    .and_then(|message| message.get(8..))
                    .and_then(ipv6::quoted);
                self.icmp_error(frame, ip.dst, quoted, now_ms)
            }
            Icmpv6::Error => Verdict::Drop(DropReason::NotVip),
            Icmpv6::Solicitation(target) => {
                if !self.snapshot.vips6.contains(&u128::from_be_bytes(target))
                    || !ipv6::answer_solicitation(frame, ip, target, own_mac)
                {
                    return Verdict::Drop(DropReason::NdNotAnswered);
                }
                self.counters.nd_replies += 1;
                Verdict::Transmit
            }
            Icmpv6::EchoRequest => {
                if !self.snapshot.vips6.contains(&ip.dst) {
                    return Verdict::Drop(DropReason::NotVip);
                }
                if !ipv6::may_answer(ip.src) || self.snapshot.vips6.contains(&ip.src) {
                    return Verdict::Drop(DropReason::IcmpBadSource);
                }
                ipv6::answer_echo(frame, ip, own_mac);
                self.counters.icmp_echo_replies += 1;
                Verdict::Transmit
            }
            Icmpv6::Advertisement(target, mac)
                if self.snapshot.vips6.contains(&u128::from_be_bytes(target)) =>
            {
                let kind = if ip.dst >> 120 == 0xff {
                    ClaimKind::Announced
                } else {
                    ClaimKind::Answered
                };
                self.vip_claimed(frame, IpAddr::from(target), mac, kind, now_ms)
            }
            Icmpv6::Other | Icmpv6::Advertisement(..) if !self.snapshot.vips6.contains(&ip.dst) => {
                Verdict::Drop(DropReason::NdNotAnswered)
            }
            Icmpv6::Other | Icmpv6::Advertisement(..) => Verdict::Drop(DropReason::IcmpNotEcho),
        }
    }

    /// A whole datagram (or the first fragment of one: the transport header is there and says
    /// where it goes): its known connection's server, else placed anew. Returns the verdict and
    /// the address of the server it went to.
    #[inline(always)]
    fn place<A: Family>(
        &mut self,
        frame: &mut [u8],
        ip: &Ip<A>,
        now_ms: u64,
    ) -> (Verdict, Option<u32>) {
        let Some(ports) = ip.ports else {
            return (Verdict::Drop(DropReason::Truncated), None);
        };
        let key = FlowKey {
            src: ip.src,
            dst: ip.dst,
            ports,
            protocol: ip.protocol,
        };
        let Dataplane {
            snapshot,
            counters,
            v4,
            v6,
            outbox,
            ..
        } = self;
        let Tables {
            flows, persistence, ..
        } = A::tables(v4, v6);
        let snapshot = &**snapshot;
        // The connection is looked up before the service (a lookup changes nothing): the key's
        // parts are done with early, which keeps the rest of the path in registers.
        let (entry, census) = flows.get_mut_and_census(&key, now_ms);
        let Some(service_index) = A::service(snapshot, ip.dst, ip.protocol, ports as u16) else {
            return (self.unserved(frame, ip), None);
        };
        // A connection already known keeps its server while that server takes known clients.
        if let Some(service) = snapshot.services.get(usize::from(service_index))
            && let Some(entry) = entry
            && let Some(backend) = known_backend(
                entry,
                census,
                persistence,
                snapshot,
                service,
                &key,
                ip.tcp_flags,
                now_ms,
                outbox,
            )
        {
            let Some(header) = service
                .real_servers
                .get(usize::from(backend))
                .and_then(|rs| rs.forward_header)
            else {
                return (Verdict::Drop(DropReason::NoRealServer), None);
            };
            forward(frame, counters, service_index, backend, header);
            return (Verdict::Transmit, Some(entry.real_server));
        }
        self.new_connection::<A>(frame, service_index, now_ms)
    }

    /// A piece of a fragmented datagram. The first carries the transport header: it goes
    /// where the whole datagram would (its connection's server, or placed anew), and the choice
    /// is remembered for the rest, which follow it. A later piece whose first was not seen (it
    /// came first, was lost, or was dropped) has nothing to say where it goes and is dropped.
    #[inline(never)]
    fn fragment<A: Family>(&mut self, frame: &mut [u8], now_ms: u64) -> Verdict {
        let ip = match A::parse(frame) {
            Ok(ip) => ip,
            Err(reason) => return Verdict::Drop(reason),
        };
        let key = ip.fragment_key();
        if !ip.first_fragment {
            let first = A::tables(&mut self.v4, &mut self.v6)
                .fragments
                .get(&key, now_ms);
            return match first {
                Some(first) => self.follow_first_fragment(frame, first),
                None => Verdict::Drop(DropReason::FragmentUnmatched),
            };
        }
        let (verdict, chosen) = self.place(frame, &ip, now_ms);
        let service = ip
            .ports
            .and_then(|ports| A::service(&self.snapshot, ip.dst, ip.protocol, ports as u16))
            .and_then(|index| self.snapshot.services.get(usize::from(index)));
        if let (Some(real_server), Some(service)) = (chosen, service) {
            let entry = FragmentEntry {
                service: service.id,
                real_server,
                expires_ms: now_ms + FRAGMENT_TIMEOUT_MS,
            };
            A::tables(&mut self.v4, &mut self.v6)
                .fragments
                .insert(key, entry, now_ms);
        }
        verdict
    }

    /// A later fragment, to where its datagram's first fragment went.
    #[cold]
    fn follow_first_fragment(&mut self, frame: &mut [u8], first: FragmentEntry) -> Verdict {
        let snapshot = &*self.snapshot;
        let Some(&service_index) = snapshot.by_id.get(&first.service) else {
            return Verdict::Drop(DropReason::PortNotServed);
        };
        let Some(service) = snapshot.services.get(usize::from(service_index)) else {
            return Verdict::Drop(DropReason::PortNotServed);
        };
        if let Some(backend) = usable(
            service,
            first.real_server,
            RealServerEntry::takes_known_clients,
        ) && let Some(header) = service
            .real_servers
            .get(usize::from(backend))
            .and_then(|rs| rs.forward_header)
        {
            forward(frame, &mut self.counters, service_index, backend, header);
            return Verdict::Transmit;
        }
        match service.fallback {
            Some((key, Some(mac))) if key == first.real_server => {
                self.forward_to_fallback(frame, service_index, mac)
            }
            _ => Verdict::Drop(DropReason::NoRealServer),
        }
    }

    /// Sends the frame to service `service_index`'s fallback server at `mac`.
    fn forward_to_fallback(
        &mut self,
        frame: &mut [u8],
        service_index: u16,
        mac: [u8; 6],
    ) -> Verdict {
        rewrite_macs(frame, mac, self.snapshot.own_mac);
        self.counters
            .forward_fallback(usize::from(service_index), frame.len());
        Verdict::Transmit
    }

    /// A frame no real server can take: to the service's `fallback` server (its address and
    /// MAC) when it has a resolved one, else dropped. Returns the verdict and the address.
    fn fallback_or_drop(
        &mut self,
        frame: &mut [u8],
        service_index: u16,
        fallback: Option<(u32, Option<[u8; 6]>)>,
    ) -> (Verdict, Option<u32>) {
        match fallback {
            Some((key, Some(mac))) => (
                self.forward_to_fallback(frame, service_index, mac),
                Some(key),
            ),
            _ => (Verdict::Drop(DropReason::NoRealServer), None),
        }
    }

    /// A frame of service `service_index` that no known connection places. A TCP segment
    /// that opens a connection (SYN), a datagram, or a fragment is placed on the persisted or
    /// Maglev choice (the fallback server when no real server can take it) and a connection
    /// recorded; a mid-connection segment goes where its connection most likely is and is
    /// recorded nowhere. Returns the verdict and the address of the server chosen. Out of
    /// line, it parses the header again rather than have the per-frame path keep every field
    /// for it.
    #[inline(never)]
    fn new_connection<A: Family>(
        &mut self,
        frame: &mut [u8],
        service_index: u16,
        now_ms: u64,
    ) -> (Verdict, Option<u32>) {
        let ip = match A::parse(frame) {
            Ok(ip) => ip,
            Err(reason) => return (Verdict::Drop(reason), None),
        };
        let Dataplane {
            snapshot,
            counters,
            v4,
            v6,
            ..
        } = self;
        let Tables {
            flows, persistence, ..
        } = A::tables(v4, v6);
        let snapshot = &**snapshot;
        let Some(service) = snapshot.services.get(usize::from(service_index)) else {
            return (Verdict::Drop(DropReason::PortNotServed), None);
        };
        let flow = ip.flow();
        let client_address = A::client(service, ip.src);
        let hash_key = HashKey::of(&ip, client_address);
        let client = (client_address, u64::from(service.id));
        if !ip.opens_connection() {
            // A mid-connection segment no table knows: where its connection most likely is.
            let persisted = persisted_server(
                service,
                persistence,
                client,
                now_ms,
                RealServerEntry::takes_known_clients,
            );
            let table = service.known_table.as_ref().unwrap_or(&service.table);
            let backend = persisted.or_else(|| hash_key.lookup(service.persistence, table));
            let known = backend.and_then(|b| {
                let rs = service.real_servers.get(usize::from(b))?;
                Some((b, rs.forward_header?, rs.key))
            });
            if let Some((backend, header, ip)) = known {
                forward(frame, counters, service_index, backend, header);
                return (Verdict::Transmit, Some(ip));
            }
            // No real server holds it: where its connection began, the fallback server.
            let fallback = service.fallback;
            return self.fallback_or_drop(frame, service_index, fallback);
        }
        let persisted = persisted_server(
            service,
            persistence,
            client,
            now_ms,
            RealServerEntry::takes_persisted_clients,
        );
        let backend = persisted.or_else(|| hash_key.lookup(service.persistence, &service.table));
        let Some(backend) = backend else {
            // No real server can take the client.
            let fallback = service.fallback;
            return self.fallback_or_drop(frame, service_index, fallback);
        };
        let Some(real_server) = service.real_servers.get(usize::from(backend)) else {
            return (Verdict::Drop(DropReason::NoRealServer), None);
        };
        let Some(header) = real_server.forward_header else {
            return (Verdict::Drop(DropReason::NoRealServer), None);
        };
        let real_server_ip = real_server.key;
        let (state, timeout) = FlowState::after(u8::try_from(ip.tcp_flags).ok());
        // The client is persisted once its connection is under way (a datagram at once, a TCP
        // connection at the end of its handshake, by the known-connection path).
        let persisted_until_ms =
            if service.persistence == Persistence::SourceIp && state.is_active() {
                let until = now_ms + service.persistence_timeout_ms;
                persistence.insert(
                    client,
                    PersistEntry {
                        real_server: real_server_ip,
                        expires_ms: until,
                        foreign: false,
                    },
                    now_ms,
                );
                until
            } else {
                0
            };
        if let Some((key, _)) = flow {
            let entry = FlowEntry {
                real_server: real_server_ip,
                generation: snapshot.generation,
                index: backend,
                state,
                expires_ms: now_ms + timeout,
                persisted_until_ms,
                foreign: false,
            };
            flows.insert(key, entry, now_ms);
            // A datagram flow matters to the peers at once; a TCP connection once its
            // handshake completes.
            if state.is_active()
                && let Some(outbox) = &mut self.outbox
            {
                let changed = CHANGED_FLOW
                    | if persisted_until_ms > 0 {
                        CHANGED_PERSISTENCE
                    } else {
                        0
                    };
                offer_change(
                    outbox,
                    key,
                    client_address,
                    &entry,
                    service,
                    changed,
                    now_ms,
                );
            }
        }
        forward(frame, counters, service_index, backend, header);
        (Verdict::Transmit, Some(real_server_ip))
    }

    /// ICMP to a VIP: echo requests are answered, errors go to the real server whose packet
    /// they quote, the rest is dropped.
    #[inline(never)]
    fn icmp(&mut self, frame: &mut [u8], now_ms: u64) -> Verdict {
        let ip = match Ip::parse_v4(frame) {
            Ok(ip) => ip,
            Err(reason) => return Verdict::Drop(reason),
        };
        if !self.snapshot.vips.contains(&ip.dst) {
            return Verdict::Drop(DropReason::NotVip);
        }
        if ip.fragmented {
            return Verdict::Drop(DropReason::IcmpNotEcho);
        }
        if let Some(&kind) = frame.get(ip.l4)
            && ICMP_ERRORS.contains(&kind)
        {
            let quoted = frame
                .get(ip.l4..ip.l4_end)
                .and_then(|message| message.get(8..))
                .and_then(quoted_v4);
            return self.icmp_error(frame, ip.dst, quoted, now_ms);
        }
        // RFC 1122 3.2.2.6: no echo reply to a broadcast or multicast address; nor to an
        // unspecified, loopback or class E source (3.2.1.3), nor to a VIP, which would send
        // the reply back into the balancer.
        let source = std::net::Ipv4Addr::from(ip.src);
        if source.is_broadcast()
            || source.is_multicast()
            || source.is_unspecified()
            || source.is_loopback()
            || source.octets()[0] >= 240
            || self.snapshot.vips.contains(&ip.src)
        {
            return Verdict::Drop(DropReason::IcmpBadSource);
        }
        self.icmp_echo(frame, ip.l4, ip.l4_end)
    }

    /// Another station (`mac`) spoke for `vip`: recorded, and, unless it is us or the HA
    /// peer, answered with our own announcement in the frame's place (at most once a second
    /// per VIP; the other frames are dropped as `vip_claimed`).
    #[cold]
    #[inline(never)]
    fn vip_claimed(
        &mut self,
        frame: &mut [u8],
        vip: IpAddr,
        mac: [u8; 6],
        kind: ClaimKind,
        now_ms: u64,
    ) -> Verdict {
        let own = self.snapshot.own_mac;
        if mac == own || self.snapshot.peer_macs.contains(&mac) {
            // Ours, or the peer's (it takes over): nothing to answer.
            return Verdict::Drop(match vip {
                IpAddr::V4(_) => DropReason::ArpNotVip,
                IpAddr::V6(_) => DropReason::NdNotAnswered,
            });
        }
        if !self.dr.claimed(vip, mac, kind, now_ms) {
            return Verdict::Drop(DropReason::VipClaimed);
        }
        let written = match vip {
            IpAddr::V4(v4) => write_gratuitous_arp_into(frame, own, v4.octets()),
            IpAddr::V6(v6) => match frame.first_chunk_mut::<{ ipv6::UNSOLICITED_NA_LEN }>() {
                Some(announcement) => {
                    ipv6::write_unsolicited_na(announcement, own, v6.octets());
                    true
                }
                None => false,
            },
        };
        if !written {
            return Verdict::Drop(DropReason::VipClaimed);
        }
        if let Some(rest) = frame.get_mut(announcement_len(vip)..) {
            rest.fill(0);
        }
        self.counters.vip_defences += 1;
        Verdict::Transmit
    }

    /// A frame to a VIP:port no service has, or to no VIP: a real server's answer to a DR
    /// probe (a SYN-ACK from a VIP to this host's probe address and a probe port) is recorded
    /// and reset; the rest is dropped.
    #[cold]
    #[inline(never)]
    fn unserved<A: Family>(&mut self, frame: &mut [u8], ip: &Ip<A>) -> Verdict {
        let snapshot = &*self.snapshot;
        let is_probe_answer = ip.protocol == IP_PROTO_TCP
            && A::probe_address(snapshot) == Some(ip.dst)
            && A::is_vip(snapshot, ip.src)
            && u8::try_from(ip.tcp_flags).is_ok_and(|f| {
                f & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN | tcp_flags::ACK
            });
        let Some(ports) = ip.ports.filter(|_| is_probe_answer) else {
            return Verdict::Drop(not_served(snapshot, ip.dst));
        };
        let (port, our_port) = ((ports >> 16) as u16, ports as u16);
        let Some(ack) = frame
            .get(ip.l4 + 8..)
            .and_then(|tcp| tcp.first_chunk::<4>())
            .map(|ack| u32::from_be_bytes(*ack))
        else {
            return Verdict::Drop(DropReason::Truncated);
        };
        if !PROBE_PORTS.contains(&our_port) {
            return Verdict::Drop(not_served(snapshot, ip.dst));
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&frame[field::ETH_SRC]);
        let (vip, ours) = (A::ip(ip.src), A::ip(ip.dst));
        self.dr.answered(ProbeAnswer {
            vip,
            port,
            mac,
            our_port,
            ack,
        });
        if !drcheck::reset_in_place(frame, snapshot.own_mac, mac, ours, our_port, vip, port, ack) {
            return Verdict::Drop(DropReason::Truncated);
        }
        self.counters.probe_resets += 1;
        Verdict::Transmit
    }

    /// What the DR check saw.
    pub fn dr_watch(&self) -> &DrWatch {
        &self.dr
    }

    /// An ICMP error to `vip` about the packet `quoted`: to the server of its connection.
    #[cold]
    #[inline(never)]
    fn icmp_error<A: Family>(
        &mut self,
        frame: &mut [u8],
        vip: A,
        quoted: Option<Quoted<A>>,
        now_ms: u64,
    ) -> Verdict {
        // The quote must be of a packet this VIP sent, to a service it has.
        let Some(quoted) = quoted.filter(|q| q.vip == vip) else {
            return Verdict::Drop(DropReason::IcmpErrorUnmatched);
        };
        let snapshot = &*self.snapshot;
        let service_port = quoted.client_ports as u16;
        let Some(service_index) = A::service(snapshot, vip, quoted.protocol, service_port) else {
            return Verdict::Drop(DropReason::IcmpErrorUnmatched);
        };
        let Some(service) = snapshot.services.get(usize::from(service_index)) else {
            return Verdict::Drop(DropReason::IcmpErrorUnmatched);
        };
        let tables = A::tables(&mut self.v4, &mut self.v6);
        let key = FlowKey {
            src: quoted.client,
            dst: vip,
            ports: quoted.client_ports,
            protocol: quoted.protocol,
        };
        let client = A::client(service, quoted.client);
        let known = tables.flows.get(&key, now_ms);
        // The client's own next packet would go here: its connection's server, its persisted
        // one, else the table that still holds drained and full servers.
        let backend = known
            .and_then(|entry| {
                usable(
                    service,
                    entry.real_server,
                    RealServerEntry::takes_known_clients,
                )
            })
            .or_else(|| {
                persisted_server(
                    service,
                    &tables.persistence,
                    (client, u64::from(service.id)),
                    now_ms,
                    RealServerEntry::takes_known_clients,
                )
            })
            .or_else(|| {
                let as_sent = Ip {
                    src: quoted.client,
                    dst: vip,
                    protocol: quoted.protocol,
                    id: 0,
                    fragment_protocol: quoted.protocol,
                    fragmented: false,
                    first_fragment: true,
                    l4: 0,
                    l4_end: 0,
                    ports: Some(quoted.client_ports),
                    tcp_flags: NO_FLAGS,
                };
                let table = service.known_table.as_ref().unwrap_or(&service.table);
                HashKey::of(&as_sent, client).lookup(service.persistence, table)
            });
        let header = backend
            .and_then(|b| Some((b, service.real_servers.get(usize::from(b))?.forward_header?)));
        if let Some((backend, header)) = header {
            forward(frame, &mut self.counters, service_index, backend, header);
            self.counters.icmp_errors += 1;
            return Verdict::Transmit;
        }
        // A connection the fallback server carries.
        match (known, service.fallback) {
            (Some(entry), Some((key, Some(mac)))) if entry.real_server == key => {
                self.counters.icmp_errors += 1;
                self.forward_to_fallback(frame, service_index, mac)
            }
            _ => Verdict::Drop(DropReason::NoRealServer),
        }
    }

    /// RFC 792 echo request to a VIP -> echo reply from the VIP.
    fn icmp_echo(&mut self, frame: &mut [u8], l4: usize, l4_end: usize) -> Verdict {
        if l4_end - l4 < 8 || frame[l4] != ICMP_ECHO_REQUEST || frame[l4 + 1] != 0 {
            return Verdict::Drop(DropReason::IcmpNotEcho);
        }
        // Type 8 -> 0 changes one 16-bit word (type, code) from 0x0800 to 0x0000: RFC 1624 eqn. 3.
        let old_checksum = u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]);
        let checksum = incremental_checksum(
            old_checksum,
            u16::from_be_bytes([ICMP_ECHO_REQUEST, 0]),
            u16::from_be_bytes([ICMP_ECHO_REPLY, 0]),
        );
        frame[l4] = ICMP_ECHO_REPLY;
        frame[l4 + 2..l4 + 4].copy_from_slice(&checksum.to_be_bytes());

        let mut src = [0u8; 4];
        src.copy_from_slice(&frame[field::IP_SRC]);
        frame.copy_within(field::IP_DST, field::IP_SRC.start);
        frame[field::IP_DST].copy_from_slice(&src);
        frame[field::IP_TTL] = REPLY_TTL;
        frame[field::IP_CHECKSUM].copy_from_slice(&[0, 0]);
        let header = &frame[field::ETH_HEADER_LEN..l4];
        let ip_checksum = etherparse::checksum::Sum16BitWords::new()
            .add_slice(header)
            .ones_complement()
            .to_be();
        frame[field::IP_CHECKSUM].copy_from_slice(&ip_checksum.to_be_bytes());

        frame.copy_within(field::ETH_SRC, field::ETH_DST.start);
        frame[field::ETH_SRC].copy_from_slice(&self.snapshot.own_mac);
        self.counters.icmp_echo_replies += 1;
        Verdict::Transmit
    }
}

/// The IP header fields the balancer reads, checked; `A` is the address family.
#[derive(Debug, Clone, Copy)]
pub struct Ip<A> {
    /// Client address (host order).
    pub src: A,
    /// Destination address (host order).
    pub dst: A,
    /// The transport protocol (IPv6: the next header after the extension headers walked).
    pub protocol: u8,
    /// Identification: names the datagram its fragments belong to.
    pub id: u32,
    /// The protocol every fragment of the datagram names (IPv6: the Fragment header's next
    /// header): part of the fragment key.
    pub fragment_protocol: u8,
    /// "More fragments" set or a fragment offset: not a whole datagram.
    pub fragmented: bool,
    /// Fragment offset 0: the piece that carries the transport header.
    pub first_fragment: bool,
    /// Transport header start and packet end, as frame offsets: `l4 <= l4_end <= frame.len()`.
    pub l4: usize,
    /// See `l4`.
    pub l4_end: usize,
    /// The transport header's first four bytes (both ports for TCP and UDP), when present.
    pub ports: Option<u32>,
    /// TCP flags when the packet is TCP and holds them, else [`NO_FLAGS`].
    pub tcp_flags: u16,
}

impl Ip<u32> {
    /// Reads and checks the header of an IPv4 frame at fixed offsets: version 4, a header
    /// length (IHL) of at least 20 bytes that the frame holds, a total length that covers the
    /// header and that the frame holds. Too short for the fixed header: truncated; the header
    /// not holding together: a bad header; the packet longer than the frame: truncated.
    #[inline(always)]
    fn parse_v4(frame: &[u8]) -> Result<Ip<u32>, DropReason> {
        let Some(header) = frame.first_chunk::<{ field::IP_MIN_FRAME_LEN }>() else {
            return Err(DropReason::Truncated);
        };
        let version_ihl = header[field::IP_VERSION_IHL];
        // Almost every packet has no options (0x45): a constant header length from there on.
        let header_len = if version_ihl == 0x45 {
            20
        } else {
            let header_len = usize::from(version_ihl & 0x0f) * 4;
            if version_ihl >> 4 != 4
                || header_len < 20
                || frame.len() < field::ETH_HEADER_LEN + header_len
            {
                return Err(DropReason::BadIpHeader);
            }
            header_len
        };
        let total_len = usize::from(u16::from_be_bytes([
            header[field::IP_TOTAL_LEN],
            header[field::IP_TOTAL_LEN + 1],
        ]));
        if total_len < header_len {
            return Err(DropReason::BadIpHeader);
        }
        let l4 = field::ETH_HEADER_LEN + header_len;
        let l4_end = field::ETH_HEADER_LEN + total_len;
        if l4_end > frame.len() {
            return Err(DropReason::Truncated);
        }
        let flags_fragment = u16::from_be_bytes([
            header[field::IP_FLAGS_FRAGMENT],
            header[field::IP_FLAGS_FRAGMENT + 1],
        ]);
        let protocol = header[field::IP_PROTOCOL];
        let word = |at: usize| {
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        // `l4 <= l4_end <= frame.len()`: the transport part is there (its reads below are
        // checked against its own length only). In a later fragment it is data, not a
        // transport header: such a fragment is never placed by its "ports".
        let transport = frame.get(l4..l4_end).unwrap_or_default();
        let ports = transport
            .first_chunk::<4>()
            .map(|ports| u32::from_be_bytes(*ports));
        let tcp_flags = match transport.get(TCP_FLAGS_OFFSET) {
            Some(&flags) if protocol == IP_PROTO_TCP => u16::from(flags),
            _ => NO_FLAGS,
        };
        Ok(Ip {
            src: word(field::IP_SRC.start),
            dst: word(field::IP_DST.start),
            protocol,
            id: u32::from(u16::from_be_bytes([
                header[field::IP_ID],
                header[field::IP_ID + 1],
            ])),
            fragment_protocol: protocol,
            // The low 13 bits are the fragment offset, 0x2000 is "more fragments".
            fragmented: flags_fragment & 0x3fff != 0,
            first_fragment: flags_fragment & 0x1fff == 0,
            l4,
            l4_end,
            ports,
            tcp_flags,
        })
    }
}

impl<A: Address> Ip<A> {
    /// The connection a datagram (or its first fragment) with ports belongs to, and its flags.
    #[inline(always)]
    fn flow(&self) -> Option<(FlowKey<A>, Option<u8>)> {
        let key = FlowKey {
            src: self.src,
            dst: self.dst,
            ports: self.ports?,
            protocol: self.protocol,
        };
        let flags = u8::try_from(self.tcp_flags).ok();
        Some((key, flags))
    }

    /// The datagram a fragment belongs to.
    fn fragment_key(&self) -> FragmentKey<A> {
        FragmentKey {
            src: self.src,
            dst: self.dst,
            id: self.id,
            protocol: self.fragment_protocol,
        }
    }

    /// Whether the packet may open a connection: a UDP datagram (or other protocol without
    /// TCP's states), or a TCP segment with SYN and without ACK. A TCP segment too short to
    /// hold its flags opens nothing.
    #[inline]
    fn opens_connection(&self) -> bool {
        if self.protocol != IP_PROTO_TCP {
            return true;
        }
        match u8::try_from(self.tcp_flags) {
            Ok(flags) => flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN,
            Err(_) => false,
        }
    }
}

/// ICMPv4 types that quote the packet they are about (RFC 792): destination unreachable
/// (fragmentation needed among them), time exceeded, parameter problem.
const ICMP_ERRORS: [u8; 3] = [3, 11, 12];

/// The connection an ICMP error is about, from the packet it quotes (sent by a real server
/// from the VIP to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted<A> {
    /// The quoted packet's source: the VIP.
    pub vip: A,
    /// Its destination: the client.
    pub client: A,
    /// Its transport protocol.
    pub protocol: u8,
    /// The client's ports as the client sends them: its port (high 16 bits), the service's.
    pub client_ports: u32,
}

/// The quote of an ICMPv4 error (RFC 792: the IP header and at least 8 bytes of its data),
/// when it holds the ports of a first (or only) fragment.
fn quoted_v4(quote: &[u8]) -> Option<Quoted<u32>> {
    let version_ihl = *quote.first()?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return None;
    }
    let word =
        |at: usize| -> Option<u32> { Some(u32::from_be_bytes(*quote.get(at..)?.first_chunk()?)) };
    let flags_fragment = u16::from_be_bytes(*quote.get(6..)?.first_chunk()?);
    if flags_fragment & 0x1fff != 0 {
        return None;
    }
    let ports = word(header_len)?;
    Some(Quoted {
        vip: word(12)?,
        client: word(16)?,
        protocol: *quote.get(9)?,
        client_ports: ports.rotate_left(16),
    })
}

/// What the Maglev tables hash for a packet: the client's address (source-IP persistence), or
/// the 5-tuple (addresses and protocol alone for a packet without ports).
#[derive(Debug, Clone, Copy)]
struct HashKey {
    /// Source, destination, protocol, ports: 13 bytes for IPv4, 37 for IPv6.
    bytes: [u8; 37],
    /// Bytes of an address.
    address_len: usize,
    /// The client's persisted part (its address, or IPv6's prefix of it), first of all.
    client: [u8; 16],
    five_tuple: bool,
}

impl HashKey {
    fn of<A: Family>(ip: &Ip<A>, client: A) -> HashKey {
        let n = A::LEN;
        let mut bytes = [0u8; 37];
        bytes[..n].copy_from_slice(&A::bytes(ip.src)[..n]);
        bytes[n..2 * n].copy_from_slice(&A::bytes(ip.dst)[..n]);
        bytes[2 * n] = ip.protocol;
        if let Some(ports) = ip.ports {
            bytes[2 * n + 1..2 * n + 5].copy_from_slice(&ports.to_be_bytes());
        }
        HashKey {
            bytes,
            address_len: n,
            client: A::bytes(client),
            five_tuple: ip.ports.is_some(),
        }
    }

    /// The server `table` names for this packet under `persistence`.
    #[inline]
    fn lookup(&self, persistence: Persistence, table: &MaglevTable) -> Option<u16> {
        let n = self.address_len;
        match persistence {
            Persistence::SourceIp => table.lookup(&self.client[..n]),
            Persistence::None if self.five_tuple => table.lookup(&self.bytes[..2 * n + 5]),
            Persistence::None => table.lookup(&self.bytes[..2 * n + 1]),
        }
    }
}

/// The server of a connection the flow table knows (`entry`, live), renewing the entry (state,
/// expiry and, once half spent, the client's persistence entry); `None` when the connection
/// must be placed anew: a new SYN on a closing tuple (port reuse), or a server that no longer
/// takes known clients. What changes that the group's peers need to hear of goes to `outbox`
/// (out of line: a connection's state changes a few times in its life).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn known_backend<A: Family>(
    entry: &mut FlowEntry,
    census: &mut ConnectionCensus<A>,
    persistence: &mut PersistenceTable<A>,
    snapshot: &Snapshot,
    service: &ServiceEntry,
    key: &FlowKey<A>,
    flags: u16,
    now_ms: u64,
    outbox: &mut Option<Box<Outbox>>,
) -> Option<u16> {
    // A new SYN on a closing tuple is a new connection (port reuse): choose again.
    let (state, timeout) = entry.state.on_flags(flags)?;
    // The index is cached with the generation it was found in; a new snapshot means one
    // lookup by address to find the server again (or learn that it is gone).
    let backend = if entry.generation == snapshot.generation {
        entry.index
    } else {
        let index = relocate(entry, snapshot, service)?;
        // A peer's entry is installed with generation 0, so it always comes this way the first
        // time this node carries it: from now on it is this node's, and offered as such.
        if entry.foreign {
            let next = (state, now_ms + timeout);
            change_state(entry, census, next, key, service, now_ms, outbox);
        }
        index
    };
    // Updated in place: one table lookup per packet of a known connection. Fields are written
    // only when they change: the clock has millisecond steps, so at high packet rates most
    // frames of a connection find its entry already up to date, and an entry left clean is
    // dropped from the cache for free instead of being written back.
    let expires_ms = now_ms + timeout;
    if entry.state != state {
        let next = (state, expires_ms);
        change_state(entry, census, next, key, service, now_ms, outbox);
    } else if entry.expires_ms != expires_ms {
        entry.expires_ms = expires_ms;
    }
    if service.persistence == Persistence::SourceIp
        && state.is_active()
        && entry.persisted_until_ms < now_ms + service.persistence_timeout_ms / 2
    {
        let client = A::client(service, key.src);
        renew_persistence(entry, persistence, service, client, now_ms, outbox);
    }
    Some(backend)
}

/// Writes a peer's connection into `tables` when this node serves it and carries no newer
/// entry of its own; the entry's generation 0 makes the first packet find its server by key
/// and claim it ([`known_backend`]).
fn install_flow<A: Family>(
    snapshot: &Snapshot,
    tables: &mut Tables<A>,
    key: FlowKey<A>,
    (real_server, state): (u32, FlowState),
    remaining_ms: u32,
    now_ms: u64,
) -> bool {
    let expires_ms = now_ms + u64::from(remaining_ms);
    let served = A::service(snapshot, key.dst, key.protocol, key.ports as u16).is_some();
    served
        && remaining_ms > 0
        && tables
            .flows
            .get(&key, now_ms)
            .is_none_or(|own| own.foreign || own.expires_ms < expires_ms)
        && tables.flows.insert(
            key,
            FlowEntry {
                real_server,
                // No snapshot has generation 0.
                generation: 0,
                index: 0,
                state,
                expires_ms,
                // Renewed by the first packet carried here.
                persisted_until_ms: 0,
                foreign: true,
            },
            now_ms,
        )
}

/// Writes a peer's persistent client of service `wire_key` into `tables`, as
/// [`install_flow`] does connections.
fn install_persist<A: Family>(
    snapshot: &Snapshot,
    tables: &mut Tables<A>,
    (client, wire_key): (A, u64),
    real_server: u32,
    remaining_ms: u32,
    now_ms: u64,
) -> bool {
    let expires_ms = now_ms + u64::from(remaining_ms);
    let Some(service) = snapshot
        .by_wire_key
        .get(&wire_key)
        .and_then(|&index| snapshot.services.get(usize::from(index)))
    else {
        return false;
    };
    let key = (client, u64::from(service.id));
    remaining_ms > 0
        && tables
            .persistence
            .get(&key, now_ms)
            .is_none_or(|own| own.foreign || own.expires_ms < expires_ms)
        && tables.persistence.insert(
            key,
            PersistEntry {
                real_server,
                expires_ms,
                foreign: true,
            },
            now_ms,
        )
}

/// What the walk offers of flow-table slot `i`.
fn flow_offer_at<A: Family>(tables: &Tables<A>, i: usize, now_ms: u64) -> Option<SyncEntry> {
    let (key, entry) = tables.flows.live_at(i, now_ms)?;
    flow_offer(key, &entry, now_ms)
}

/// What the walk offers of persistence-table slot `i`: an entry this node carries itself.
fn persist_offer_at<A: Family>(
    snapshot: &Snapshot,
    tables: &Tables<A>,
    i: usize,
    now_ms: u64,
) -> Option<SyncEntry> {
    let ((client, id), entry) = tables.persistence.live_at(i, now_ms)?;
    if entry.foreign {
        return None;
    }
    let index = *snapshot.by_id.get(&u32::try_from(id).ok()?)?;
    let service = snapshot.services.get(usize::from(index))?;
    Some(A::persist_entry(
        client,
        service.wire_key,
        entry.real_server,
        remaining(entry.expires_ms, now_ms),
    ))
}

/// A known connection's new state and expiry, or a peer's connection carried here from now on
/// (this node offers it from now on): recorded, counted, and offered to the peers.
#[cold]
#[inline(never)]
fn change_state<A: Family>(
    entry: &mut FlowEntry,
    census: &mut ConnectionCensus<A>,
    (state, expires_ms): (FlowState, u64),
    key: &FlowKey<A>,
    service: &ServiceEntry,
    now_ms: u64,
    outbox: &mut Option<Box<Outbox>>,
) {
    census.update(key, entry, |entry| {
        entry.state = state;
        entry.foreign = false;
        entry.expires_ms = expires_ms;
    });
    if let Some(outbox) = outbox {
        offer_change(outbox, *key, key.src, entry, service, CHANGED_FLOW, now_ms);
    }
}

/// What a peer learns of a connection: nothing while it is half open (a SYN flood stays
/// here) or when it is the peer's own.
fn flow_offer<A: Family>(key: FlowKey<A>, entry: &FlowEntry, now_ms: u64) -> Option<SyncEntry> {
    (!entry.foreign && entry.state != FlowState::SynSent).then(|| {
        A::flow_entry(
            key,
            entry.real_server,
            entry.state,
            remaining(entry.expires_ms, now_ms),
        )
    })
}

/// Offers what a packet changed ([`CHANGED_FLOW`], [`CHANGED_PERSISTENCE`]) to the peers.
#[cold]
#[inline(never)]
fn offer_change<A: Family>(
    outbox: &mut Outbox,
    key: FlowKey<A>,
    client: A,
    entry: &FlowEntry,
    service: &ServiceEntry,
    changed: u8,
    now_ms: u64,
) {
    if changed & CHANGED_FLOW != 0
        && let Some(offer) = flow_offer(key, entry, now_ms)
    {
        outbox.offer(offer);
    }
    if changed & CHANGED_PERSISTENCE != 0 {
        outbox.offer(A::persist_entry(
            client,
            service.wire_key,
            entry.real_server,
            remaining(entry.persisted_until_ms, now_ms),
        ));
    }
}

/// A known connection under a new snapshot: its server's index there, when the server still
/// takes known clients; recorded with the snapshot's generation.
#[cold]
#[inline(never)]
fn relocate(entry: &mut FlowEntry, snapshot: &Snapshot, service: &ServiceEntry) -> Option<u16> {
    let index = usable(
        service,
        entry.real_server,
        RealServerEntry::takes_known_clients,
    )?;
    entry.generation = snapshot.generation;
    entry.index = index;
    Some(index)
}

/// The connection keeps its client's persistence entry alive (IPVS keeps a persistence
/// template alive while its connections live): written again once half spent.
#[cold]
#[inline(never)]
fn renew_persistence<A: Family>(
    entry: &mut FlowEntry,
    persistence: &mut PersistenceTable<A>,
    service: &ServiceEntry,
    client: A,
    now_ms: u64,
    outbox: &mut Option<Box<Outbox>>,
) {
    entry.persisted_until_ms = now_ms + service.persistence_timeout_ms;
    persistence.insert(
        (client, u64::from(service.id)),
        PersistEntry {
            real_server: entry.real_server,
            expires_ms: entry.persisted_until_ms,
            foreign: false,
        },
        now_ms,
    );
    if let Some(outbox) = outbox {
        outbox.offer(A::persist_entry(
            client,
            service.wire_key,
            entry.real_server,
            remaining(entry.persisted_until_ms, now_ms),
        ));
    }
}

/// The destination MAC of an Ethernet header as one word: its first eight bytes (destination
/// and half the source) read at once, the source half shifted out.
#[inline(always)]
fn mac_word(eth: &[u8; field::ETH_HEADER_LEN]) -> u64 {
    u64::from_le_bytes([
        eth[0], eth[1], eth[2], eth[3], eth[4], eth[5], eth[6], eth[7],
    ]) << 16
}

/// [`mac_word`] of a frame sent to `mac`.
fn own_mac_word(mac: [u8; 6]) -> u64 {
    let mut eth = [0; field::ETH_HEADER_LEN];
    eth[field::ETH_DST].copy_from_slice(&mac);
    mac_word(&eth)
}

/// Direct Routing to real server `backend` of service `service_index`: its Ethernet header
/// written, the frame counted.
#[inline(always)]
fn forward(
    frame: &mut [u8],
    counters: &mut Counters,
    service_index: u16,
    backend: u16,
    header: [u8; 12],
) {
    write_header(frame, header);
    counters.forward(
        usize::from(service_index),
        usize::from(backend),
        frame.len(),
    );
}

/// Direct Routing: the Ethernet addresses of [`RealServerEntry::forward_header`], the IP
/// packet untouched.
#[inline(always)]
fn write_header(frame: &mut [u8], header: [u8; 12]) {
    if let Some(addresses) = frame.first_chunk_mut::<12>() {
        *addresses = header;
    }
}

/// Direct Routing: to `dst` from `own`, the IP packet untouched.
#[inline(always)]
fn rewrite_macs(frame: &mut [u8], dst: [u8; 6], own: [u8; 6]) {
    if let Some(header) = frame.first_chunk_mut::<12>() {
        header[field::ETH_DST].copy_from_slice(&dst);
        header[field::ETH_SRC].copy_from_slice(&own);
    }
}

/// The index of the service's real server at `ip` when `accepts` it.
#[inline]
fn usable(service: &ServiceEntry, ip: u32, accepts: fn(&RealServerEntry) -> bool) -> Option<u16> {
    let &index = service.by_ip.get(&ip)?;
    service
        .real_servers
        .get(usize::from(index))
        .filter(|rs| accepts(rs))
        .map(|_| index)
}

/// The client's persisted server, when it still `accepts` persisted clients.
#[inline]
fn persisted_server<A: Family>(
    service: &ServiceEntry,
    persistence: &PersistenceTable<A>,
    client: (A, u64),
    now_ms: u64,
    accepts: fn(&RealServerEntry) -> bool,
) -> Option<u16> {
    if service.persistence != Persistence::SourceIp {
        return None;
    }
    let entry = persistence.get(&client, now_ms)?;
    usable(service, entry.real_server, accepts)
}

/// Why a frame to `dst` matched no service: `dst` is no VIP at all, or the port/protocol is not served.
#[cold]
fn not_served<A: Family>(snapshot: &Snapshot, dst: A) -> DropReason {
    if A::is_vip(snapshot, dst) {
        DropReason::PortNotServed
    } else {
        DropReason::NotVip
    }
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), in one's complement arithmetic.
#[inline]
fn incremental_checksum(checksum: u16, old_word: u16, new_word: u16) -> u16 {
    let mut sum = u32::from(!checksum) + u32::from(!old_word) + u32::from(new_word);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes a gratuitous ARP announcing `vip` at `mac` into `buf` and returns its length.
///
/// A request with sender = target = VIP to the broadcast address, as Linux `arping -U` and
/// keepalived send it: neighbours that cached another MAC for the VIP update it.
pub fn write_gratuitous_arp(buf: &mut [u8; MIN_FRAME_LEN], mac: [u8; 6], vip: [u8; 4]) -> usize {
    write_gratuitous_arp_into(buf, mac, vip);
    MIN_FRAME_LEN
}

/// The length of our announcement of `vip`: an ARP packet, or a Neighbor Advertisement.
fn announcement_len(vip: IpAddr) -> usize {
    match vip {
        IpAddr::V4(_) => field::ARP_FRAME_LEN,
        IpAddr::V6(_) => ipv6::UNSOLICITED_NA_LEN,
    }
}

/// [`write_gratuitous_arp`] into the first [`field::ARP_FRAME_LEN`] bytes of `buf` (the rest
/// zeroed); false when it is shorter.
fn write_gratuitous_arp_into(buf: &mut [u8], mac: [u8; 6], vip: [u8; 4]) -> bool {
    if buf.len() < field::ARP_FRAME_LEN {
        return false;
    }
    buf.fill(0);
    buf[field::ETH_DST].copy_from_slice(&BROADCAST);
    buf[field::ETH_SRC].copy_from_slice(&mac);
    buf[12..14].copy_from_slice(&EtherType::ARP.0.to_be_bytes());
    buf[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    buf[16..18].copy_from_slice(&EtherType::IPV4.0.to_be_bytes());
    buf[18] = 6;
    buf[19] = 4;
    buf[field::ARP_OPER].copy_from_slice(&ARP_OP_REQUEST.to_be_bytes());
    buf[field::ARP_SHA].copy_from_slice(&mac);
    buf[field::ARP_SPA].copy_from_slice(&vip);
    buf[field::ARP_TPA].copy_from_slice(&vip);
    true
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod tests_v6;

#[cfg(test)]
mod path_tests {
    //! The hand-written header checks and the known-connection path against their edge cases.
    use super::*;
    use crate::packet::snapshot::{AdminState, ServiceIds};
    use etherparse::PacketBuilder;
    use lbd_config::Config;

    const OWN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const VIP: [u8; 4] = [198, 18, 0, 100];
    const CLIENT: [u8; 4] = [198, 19, 0, 7];

    fn dataplane() -> Dataplane {
        Dataplane::new(Arc::new(snapshot(OWN_MAC)), TableSizes::default())
    }

    fn snapshot(own_mac: [u8; 6]) -> Snapshot {
        let config = Config::from_toml_str(
            "[engine]\ninterface = \"eth0\"\nqueues = [0]\n[[service]]\nlabel = \"s\"\n\
             vip = \"198.18.0.100\"\nports = \"1935\"\ntable_size = 251\n\
             [[service.real_server]]\nlabel = \"a\"\nip = \"198.18.0.11\"\nmac = \"02:00:00:00:01:01\"\n\
             [[service.real_server]]\nlabel = \"b\"\nip = \"198.18.0.12\"\nmac = \"02:00:00:00:01:02\"\n",
        )
        .expect("valid");
        Snapshot::build(
            &config,
            &mut ServiceIds::default(),
            own_mac,
            1,
            |_| None,
            |_, _| AdminState::Online,
        )
    }

    fn tcp(
        sport: u16,
        flags: impl FnOnce(
            etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], OWN_MAC)
            .ipv4(CLIENT, VIP, 64)
            .tcp(sport, 1935, 1, 64240);
        let builder = flags(builder);
        let mut frame = Vec::new();
        builder.write(&mut frame, b"data").expect("write");
        frame
    }

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            src: u32::from_be_bytes(CLIENT),
            dst: u32::from_be_bytes(VIP),
            ports: u32::from(sport) << 16 | 1935,
            protocol: IP_PROTO_TCP,
        }
    }

    /// The same datagram with four bytes of IP options (four NOPs): IHL 6.
    fn with_options(frame: &[u8]) -> Vec<u8> {
        let mut out = frame[..34].to_vec();
        out.extend_from_slice(&[1, 1, 1, 1]);
        out.extend_from_slice(&frame[34..]);
        out[14] = 0x46;
        let total = u16::from_be_bytes([out[16], out[17]]) + 4;
        out[16..18].copy_from_slice(&total.to_be_bytes());
        out
    }

    #[test]
    fn a_header_with_options_is_forwarded_like_one_without() {
        let mut dp = dataplane();
        let mut plain = tcp(40000, |b| b.syn());
        let mut options = with_options(&tcp(40001, |b| b.syn()));
        assert_eq!(dp.process(&mut plain, 0), Verdict::Transmit);
        assert_eq!(dp.process(&mut options, 0), Verdict::Transmit);
        assert_eq!(dp.flows().entries(), 2);
        // Known now: the next segment of the options one goes the same way.
        let mut again = with_options(&tcp(40001, |b| b.ack(1)));
        assert_eq!(dp.process(&mut again, 5), Verdict::Transmit);
        assert_eq!(again[0..6], options[0..6]);
        assert_eq!(again[12..], with_options(&tcp(40001, |b| b.ack(1)))[12..]);
        // Options longer than the frame: a bad header; a total length short of them: too.
        let mut long = with_options(&tcp(40002, |b| b.syn()));
        long[14] = 0x4f;
        long.truncate(70);
        assert_eq!(
            dp.process(&mut long, 5),
            Verdict::Drop(DropReason::BadIpHeader)
        );
        let mut short_total = with_options(&tcp(40003, |b| b.syn()));
        short_total[16..18].copy_from_slice(&22u16.to_be_bytes());
        assert_eq!(
            dp.process(&mut short_total, 5),
            Verdict::Drop(DropReason::BadIpHeader)
        );
    }

    #[test]
    fn a_known_connection_is_renewed_and_its_state_follows_the_flags() {
        let mut dp = dataplane();
        let mut syn = tcp(40000, |b| b.syn());
        assert_eq!(dp.process(&mut syn, 1_000), Verdict::Transmit);
        let entry = dp.flows().get(&key(40000), 1_000).expect("recorded");
        assert_eq!(
            (entry.state, entry.expires_ms),
            (FlowState::SynSent, 61_000)
        );
        // Same millisecond, same flags: nothing to change.
        let mut syn_again = tcp(40000, |b| b.syn());
        assert_eq!(dp.process(&mut syn_again, 1_000), Verdict::Transmit);
        assert_eq!(dp.flows().get(&key(40000), 1_000), Some(entry));
        // Later segments move the expiry on and the state along.
        let mut ack = tcp(40000, |b| b.ack(1));
        assert_eq!(dp.process(&mut ack, 2_000), Verdict::Transmit);
        let entry = dp.flows().get(&key(40000), 2_000).expect("live");
        assert_eq!(
            (entry.state, entry.expires_ms),
            (FlowState::Established, 902_000)
        );
        let mut fin = tcp(40000, |b| b.fin().ack(1));
        assert_eq!(dp.process(&mut fin, 3_000), Verdict::Transmit);
        let entry = dp.flows().get(&key(40000), 3_000).expect("live");
        assert_eq!(
            (entry.state, entry.expires_ms),
            (FlowState::Closing, 123_000)
        );
        assert!(dp.flows().get(&key(40000), 123_000).is_none());
        assert_eq!(dp.counters().forwarded.packets, 4);
    }

    #[test]
    fn the_own_mac_is_compared_in_full_and_follows_the_snapshot() {
        let mut dp = dataplane();
        for at in 0..6 {
            let mut frame = tcp(40000, |b| b.syn());
            frame[at] ^= 0x40;
            assert_eq!(
                dp.process(&mut frame, 0),
                Verdict::Drop(DropReason::NotOurMac),
                "byte {at}"
            );
        }
        // The source MAC's first bytes share the 8-byte read: they do not count.
        let mut frame = tcp(40000, |b| b.syn());
        frame[6] = 0xff;
        frame[7] = 0xff;
        assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
        // A snapshot with another MAC: frames to it are ours, and leave from it.
        let other = [2, 0, 0, 0, 0, 3];
        dp.set_snapshot(Arc::new(snapshot(other)));
        let mut frame = tcp(40001, |b| b.syn());
        assert_eq!(
            dp.process(&mut frame, 0),
            Verdict::Drop(DropReason::NotOurMac)
        );
        frame[0..6].copy_from_slice(&other);
        assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
        assert_eq!(frame[6..12], other);
    }
}
