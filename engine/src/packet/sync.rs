//! Connection and persistence entries shared with the other balancers of a group (the HA
//! pair; ECMP peers later), so that whichever node a client's packets reach sends them to the
//! same real server. The rules, without I/O; `ha::sync` carries them between nodes.
//!
//! - A worker offers an entry when it starts to matter to a peer: a connection whose handshake
//!   completes (or a datagram flow), a change of its state (closing, reset), a persistence entry
//!   written or renewed. Half-open connections are not offered: a SYN flood stays local, as in
//!   IPVS, which syncs a connection after its third packet.
//! - Every [`REFRESH_MS`], and at once when a peer asks for a full dump (it connected), the
//!   worker walks its tables a few hundred slots per loop and offers every live entry it
//!   carries itself again, with its remaining lifetime: a peer's copy never outlives the
//!   original by more than the refresh period, and an offer lost to overflow is made good.
//! - Offers go into a bounded lock-free queue ([`Outbox`]) that the sync thread drains: the
//!   packet path never waits. An event that finds the queue full is counted; a walk that does
//!   waits for the next loop.
//! - Entries learned from peers are marked foreign and are not offered again until this node
//!   carries a packet on them, so nothing echoes between nodes. A peer's entry replaces a local
//!   one when the local one is foreign (the peer is its owner) or expires sooner (the peer saw
//!   the client last).
//!
//! On the wire an IPv4 entry is a fixed [`RECORD_LEN`]-byte record that carries its remaining
//! lifetime, never an absolute time (the nodes' clocks share no epoch), and names its service
//! by VIP, protocol and first port, never by a node's local id. An IPv6 entry takes three
//! records (a connection) or two (a client): its first says how many, the others are
//! continuations; a node that does not know them skips every record as unknown.

use crate::packet::flows::{FlowKey, FlowState};
use crossbeam::queue::ArrayQueue;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of one entry on the wire.
pub const RECORD_LEN: usize = 24;
/// How often a worker offers its whole tables again.
pub const REFRESH_MS: u64 = 10_000;
/// Slots a walk looks at per worker loop: a few microseconds.
const WALK_BUDGET: usize = 512;
/// Entries a worker's queue holds for the sync thread.
pub const OUTBOX_CAPACITY: usize = 16_384;

const KIND_FLOW: u8 = 1;
const KIND_PERSIST: u8 = 2;
const KIND_FLOW6: u8 = 3;
const KIND_PERSIST6: u8 = 4;
/// A record that continues the IPv6 entry before it.
const KIND_CONTINUED: u8 = 5;
/// Records an IPv6 connection takes.
const FLOW6_RECORDS: usize = 3;
/// Records an IPv6 client takes.
const PERSIST6_RECORDS: usize = 2;

/// One shared entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncEntry {
    /// A connection and its real server.
    Flow {
        /// The connection.
        key: FlowKey,
        /// Its real server's address.
        real_server: u32,
        /// Its state.
        state: FlowState,
        /// Milliseconds it lives on without traffic.
        remaining_ms: u32,
    },
    /// A persistent client's real server.
    Persist {
        /// The client's address.
        client: u32,
        /// The service, as [`crate::packet::snapshot::service_key`] of its VIP, protocol and
        /// first port.
        service: u64,
        /// The real server's address.
        real_server: u32,
        /// Milliseconds it lives on without traffic.
        remaining_ms: u32,
    },
    /// An IPv6 connection and its real server.
    Flow6 {
        /// The connection.
        key: FlowKey<u128>,
        /// Its real server's key.
        real_server: u32,
        /// Its state.
        state: FlowState,
        /// Milliseconds it lives on without traffic.
        remaining_ms: u32,
    },
    /// A persistent IPv6 client's (prefix's) real server.
    Persist6 {
        /// The client's address, or its service's persistence prefix of it.
        client: u128,
        /// The service, as for [`SyncEntry::Persist`].
        service: u64,
        /// The real server's key.
        real_server: u32,
        /// Milliseconds it lives on without traffic.
        remaining_ms: u32,
    },
}

/// Milliseconds from `now_ms` to `expires_ms`, saturated to the wire's 32 bits (49 days).
pub fn remaining(expires_ms: u64, now_ms: u64) -> u32 {
    u32::try_from(expires_ms.saturating_sub(now_ms)).unwrap_or(u32::MAX)
}

impl SyncEntry {
    /// Appends the entry's wire records (network byte order) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match *self {
            SyncEntry::Flow6 {
                key,
                real_server,
                state,
                remaining_ms,
            } => {
                let mut records = [[0u8; RECORD_LEN]; FLOW6_RECORDS];
                records[0][..4].copy_from_slice(&[
                    KIND_FLOW6,
                    key.protocol,
                    state as u8,
                    FLOW6_RECORDS as u8,
                ]);
                records[0][4..20].copy_from_slice(&key.src.to_be_bytes());
                records[0][20..24].copy_from_slice(&real_server.to_be_bytes());
                records[1][0] = KIND_CONTINUED;
                records[1][4..20].copy_from_slice(&key.dst.to_be_bytes());
                records[1][20..24].copy_from_slice(&key.ports.to_be_bytes());
                records[2][0] = KIND_CONTINUED;
                records[2][4..8].copy_from_slice(&remaining_ms.to_be_bytes());
                out.extend(records.iter().flatten());
            }
            SyncEntry::Persist6 {
                client,
                service,
                real_server,
                remaining_ms,
            } => {
                let mut records = [[0u8; RECORD_LEN]; PERSIST6_RECORDS];
                records[0][..4].copy_from_slice(&[KIND_PERSIST6, 0, 0, PERSIST6_RECORDS as u8]);
                records[0][4..20].copy_from_slice(&client.to_be_bytes());
                records[0][20..24].copy_from_slice(&real_server.to_be_bytes());
                records[1][0] = KIND_CONTINUED;
                records[1][4..12].copy_from_slice(&service.to_be_bytes());
                records[1][12..16].copy_from_slice(&remaining_ms.to_be_bytes());
                out.extend(records.iter().flatten());
            }
            _ => out.extend_from_slice(&self.encode()),
        }
    }

    /// Decodes a run of records; returns the entries and how many records were refused
    /// (unknown kinds or states, an IPv6 entry cut short).
    pub fn decode_all(records: &[u8]) -> (Vec<SyncEntry>, usize) {
        let records: Vec<&[u8; RECORD_LEN]> = records
            .chunks_exact(RECORD_LEN)
            .filter_map(|r| r.try_into().ok())
            .collect();
        let mut entries = Vec::with_capacity(records.len());
        let mut refused = 0;
        let mut i = 0;
        while i < records.len() {
            let record = records[i];
            let span = match record[0] {
                KIND_FLOW6 => FLOW6_RECORDS,
                KIND_PERSIST6 => PERSIST6_RECORDS,
                _ => 1,
            };
            let group = records.get(i..i + span).filter(|group| {
                group[1..].iter().all(|r| r[0] == KIND_CONTINUED)
                    && (span == 1 || usize::from(record[3]) == span)
            });
            match group.and_then(decode_group) {
                Some(entry) => {
                    entries.push(entry);
                    i += span;
                }
                None => {
                    refused += 1;
                    i += 1;
                }
            }
        }
        (entries, refused)
    }

    /// The wire record of an IPv4 entry (network byte order); an IPv6 entry's takes several
    /// ([`SyncEntry::encode_into`]): this gives none of it.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        match *self {
            SyncEntry::Flow6 { .. } | SyncEntry::Persist6 { .. } => {}
            SyncEntry::Flow {
                key,
                real_server,
                state,
                remaining_ms,
            } => {
                out[0] = KIND_FLOW;
                out[1] = key.protocol;
                out[2] = state as u8;
                out[4..8].copy_from_slice(&key.src.to_be_bytes());
                out[8..12].copy_from_slice(&key.dst.to_be_bytes());
                out[12..16].copy_from_slice(&key.ports.to_be_bytes());
                out[16..20].copy_from_slice(&real_server.to_be_bytes());
                out[20..24].copy_from_slice(&remaining_ms.to_be_bytes());
            }
            SyncEntry::Persist {
                client,
                service,
                real_server,
                remaining_ms,
            } => {
                out[0] = KIND_PERSIST;
                out[4..8].copy_from_slice(&client.to_be_bytes());
                out[8..16].copy_from_slice(&service.to_be_bytes());
                out[16..20].copy_from_slice(&real_server.to_be_bytes());
                out[20..24].copy_from_slice(&remaining_ms.to_be_bytes());
            }
        }
        out
    }

    /// The entry a wire record describes; `None` for an unknown kind or state.
    pub fn decode(record: &[u8; RECORD_LEN]) -> Option<SyncEntry> {
        let word = |at: usize| {
            u32::from_be_bytes([record[at], record[at + 1], record[at + 2], record[at + 3]])
        };
        match record[0] {
            KIND_FLOW => Some(SyncEntry::Flow {
                key: FlowKey {
                    src: word(4),
                    dst: word(8),
                    ports: word(12),
                    protocol: record[1],
                },
                state: FlowState::try_from(record[2]).ok()?,
                real_server: word(16),
                remaining_ms: word(20),
            }),
            KIND_PERSIST => Some(SyncEntry::Persist {
                client: word(4),
                service: u64::from(word(8)) << 32 | u64::from(word(12)),
                real_server: word(16),
                remaining_ms: word(20),
            }),
            _ => None,
        }
    }
}

/// An entry from the records of one group (one record, or an IPv6 entry's).
fn decode_group(group: &[&[u8; RECORD_LEN]]) -> Option<SyncEntry> {
    let first = group.first()?;
    let bytes = |record: usize, at: usize| -> Option<u128> {
        Some(u128::from_be_bytes(
            *group.get(record)?.get(at..)?.first_chunk()?,
        ))
    };
    let word = |record: usize, at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            *group.get(record)?.get(at..)?.first_chunk()?,
        ))
    };
    match first[0] {
        KIND_FLOW6 => Some(SyncEntry::Flow6 {
            key: FlowKey {
                src: bytes(0, 4)?,
                dst: bytes(1, 4)?,
                ports: word(1, 20)?,
                protocol: first[1],
            },
            state: FlowState::try_from(first[2]).ok()?,
            real_server: word(0, 20)?,
            remaining_ms: word(2, 4)?,
        }),
        KIND_PERSIST6 => Some(SyncEntry::Persist6 {
            client: bytes(0, 4)?,
            service: u64::from(word(1, 4)?) << 32 | u64::from(word(1, 8)?),
            real_server: word(0, 20)?,
            remaining_ms: word(1, 12)?,
        }),
        _ => SyncEntry::decode(first),
    }
}

/// What a worker's outbox has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounters {
    /// Entries queued for the peers.
    pub offered: u64,
    /// Events that found the queue full (the next walk makes them good).
    pub overflow: u64,
    /// Walks over the whole tables finished.
    pub walks: u64,
}

/// Which table a walk is in, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkPosition {
    /// At this slot of the flow table.
    Flows(usize),
    /// At this slot of the persistence table.
    Persistence(usize),
    /// At this slot of the IPv6 flow table.
    Flows6(usize),
    /// At this slot of the IPv6 persistence table.
    Persistence6(usize),
}

/// A worker's side of the queue to the sync thread, and its walk over its tables.
#[derive(Debug)]
pub struct Outbox {
    queue: Arc<ArrayQueue<SyncEntry>>,
    /// Raised by the sync thread to ask every worker for a full walk now.
    dump_requests: Arc<AtomicU64>,
    dumps_seen: u64,
    /// The walk under way, if any.
    pub walk: Option<WalkPosition>,
    next_walk_ms: u64,
    /// What it has done.
    pub counters: OutboxCounters,
}

impl Outbox {
    /// An outbox that offers into `queue` and walks when `dump_requests` rises (and every
    /// [`REFRESH_MS`]).
    pub fn new(queue: Arc<ArrayQueue<SyncEntry>>, dump_requests: Arc<AtomicU64>) -> Outbox {
        Outbox {
            queue,
            dumps_seen: dump_requests.load(Ordering::Relaxed),
            dump_requests,
            walk: None,
            next_walk_ms: REFRESH_MS,
            counters: OutboxCounters::default(),
        }
    }

    /// Queues an event's entry; counts it as overflow when the queue is full.
    #[cold]
    pub fn offer(&mut self, entry: SyncEntry) {
        match self.queue.push(entry) {
            Ok(()) => self.counters.offered += 1,
            Err(_) => self.counters.overflow += 1,
        }
    }

    /// Queues a walk's entry; false when the queue is full (the walk waits).
    pub fn offer_from_walk(&mut self, entry: SyncEntry) -> bool {
        let queued = self.queue.push(entry).is_ok();
        if queued {
            self.counters.offered += 1;
        }
        queued
    }

    /// Starts a walk when one is due (a dump was asked for, or the refresh period passed);
    /// returns the walk under way and how many slots it may look at now.
    pub fn due(&mut self, now_ms: u64) -> Option<(WalkPosition, usize)> {
        let dumps = self.dump_requests.load(Ordering::Relaxed);
        if dumps != self.dumps_seen {
            self.dumps_seen = dumps;
            self.walk = Some(WalkPosition::Flows(0));
        } else if self.walk.is_none() && now_ms >= self.next_walk_ms {
            self.walk = Some(WalkPosition::Flows(0));
        }
        self.walk.map(|position| (position, WALK_BUDGET))
    }

    /// True when the sync thread has asked for a walk that has not started yet.
    pub fn dump_requested(&self) -> bool {
        self.dump_requests.load(Ordering::Relaxed) != self.dumps_seen
    }

    /// Where the walk stands after a step; `None` when it is done.
    pub fn walked(&mut self, next: Option<WalkPosition>, now_ms: u64) {
        if next.is_none() && self.walk.is_some() {
            self.counters.walks += 1;
            self.next_walk_ms = now_ms + REFRESH_MS;
        }
        self.walk = next;
    }
}

/// What installing a batch of peer entries did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Installed {
    /// Entries written into a table.
    pub installed: u64,
    /// Entries kept out: this node's own entry is newer, the service is unknown here, or the
    /// table is full.
    pub kept_out: u64,
}

impl std::ops::AddAssign for Installed {
    fn add_assign(&mut self, other: Installed) {
        self.installed += other.installed;
        self.kept_out += other.kept_out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> SyncEntry {
        SyncEntry::Flow {
            key: FlowKey {
                src: 0xc612_0a01,
                dst: 0xc612_0064,
                ports: 40_000 << 16 | 1935,
                protocol: 6,
            },
            real_server: 0xc612_0014,
            state: FlowState::Closing,
            remaining_ms: 119_000,
        }
    }

    #[test]
    fn entries_survive_the_wire() {
        let persist = SyncEntry::Persist {
            client: 0xc612_0a01,
            service: crate::packet::snapshot::service_key(0xc612_0064, 6, 8088),
            real_server: 0xc612_0015,
            remaining_ms: u32::MAX,
        };
        for entry in [flow(), persist] {
            assert_eq!(SyncEntry::decode(&entry.encode()), Some(entry));
        }
        for state in [
            FlowState::SynSent,
            FlowState::Established,
            FlowState::Closing,
            FlowState::Reset,
            FlowState::Datagram,
        ] {
            assert_eq!(FlowState::try_from(state as u8), Ok(state));
        }
    }

    #[test]
    fn unknown_kinds_and_states_are_refused() {
        let mut record = flow().encode();
        record[2] = 9;
        assert_eq!(SyncEntry::decode(&record), None);
        record = flow().encode();
        record[0] = 3;
        assert_eq!(SyncEntry::decode(&record), None);
        assert_eq!(SyncEntry::decode(&[0; RECORD_LEN]), None);
    }

    #[test]
    fn remaining_lifetimes_saturate() {
        assert_eq!(remaining(10, 20), 0);
        assert_eq!(remaining(1_500, 500), 1_000);
        assert_eq!(remaining(u64::MAX, 0), u32::MAX);
    }

    #[test]
    fn a_full_queue_counts_events_and_holds_walks_back() {
        let queue = Arc::new(ArrayQueue::new(2));
        let mut outbox = Outbox::new(queue.clone(), Arc::new(AtomicU64::new(0)));
        outbox.offer(flow());
        assert!(outbox.offer_from_walk(flow()));
        assert!(!outbox.offer_from_walk(flow()));
        outbox.offer(flow());
        assert_eq!(
            outbox.counters,
            OutboxCounters {
                offered: 2,
                overflow: 1,
                walks: 0
            }
        );
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn walks_come_every_refresh_and_at_once_on_a_dump_request() {
        let dumps = Arc::new(AtomicU64::new(0));
        let mut outbox = Outbox::new(Arc::new(ArrayQueue::new(4)), dumps.clone());
        assert_eq!(outbox.due(0), None);
        assert_eq!(
            outbox.due(REFRESH_MS),
            Some((WalkPosition::Flows(0), WALK_BUDGET))
        );
        outbox.walked(Some(WalkPosition::Persistence(3)), REFRESH_MS);
        assert_eq!(
            outbox.due(REFRESH_MS + 1),
            Some((WalkPosition::Persistence(3), WALK_BUDGET))
        );
        outbox.walked(None, REFRESH_MS + 1);
        assert_eq!(outbox.counters.walks, 1);
        assert_eq!(outbox.due(REFRESH_MS + 2), None);
        // A peer connected: a full walk now, not at the next refresh.
        dumps.fetch_add(1, Ordering::Relaxed);
        assert_eq!(
            outbox.due(REFRESH_MS + 3),
            Some((WalkPosition::Flows(0), WALK_BUDGET))
        );
    }
}
