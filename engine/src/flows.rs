//! Per-worker connection and persistence tables: what keeps established connections and
//! persistent clients on their real server while the server set changes.
//!
//! - The flow table maps a connection's 5-tuple to the real server (by address) it was sent to,
//!   with an idle timeout that follows the TCP flags the balancer sees, as IPVS does for DR
//!   (it sees only the client's half): SYN 60 s, established 900 s, FIN 120 s, RST 10 s; UDP
//!   300 s. A SYN on a tuple whose connection was closing starts a new connection.
//! - The persistence table maps (client address, service) to a real server for the service's
//!   `persistence_timeout_s` after the client's last packet (IPVS `-p`).
//!
//! Both are bounded: when a table is full, expired entries are swept out; if it is still full
//! the new entry is not recorded (the frame is still forwarded by Maglev, which is stable as
//! long as the server set is) and a counter says so. Time is milliseconds given by the caller.

use hashbrown::HashMap;

/// TCP flags the state machine reads (RFC 9293 header byte 13).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

const SYN_TIMEOUT_MS: u64 = 60_000;
const ESTABLISHED_TIMEOUT_MS: u64 = 900_000;
const FIN_TIMEOUT_MS: u64 = 120_000;
const RST_TIMEOUT_MS: u64 = 10_000;
const UDP_TIMEOUT_MS: u64 = 300_000;
/// A full table is swept at most this often; in between, new entries are not recorded.
const SWEEP_INTERVAL_MS: u64 = 1_000;

/// A connection as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    /// Client address.
    pub src: u32,
    /// VIP.
    pub dst: u32,
    /// Source port (high 16 bits) and destination port (low 16 bits).
    pub ports: u32,
    /// IP protocol.
    pub protocol: u8,
}

impl std::hash::Hash for FlowKey {
    /// One 128-bit word: a single hash round instead of one per field.
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(
            u128::from(self.src) << 96
                | u128::from(self.dst) << 64
                | u128::from(self.ports) << 32
                | u128::from(self.protocol),
        );
    }
}

/// Where a connection goes and how it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEntry {
    /// The real server's address: what identifies it across snapshots.
    pub real_server: u32,
    /// Snapshot generation in which `index` was valid.
    pub generation: u64,
    /// The real server's index in that snapshot's service.
    pub index: u16,
    /// Connection state from the flags seen.
    pub state: FlowState,
    /// When the entry expires unless traffic renews it.
    pub expires_ms: u64,
    /// Until when the client's persistence entry is known to last; the connection renews it
    /// (IPVS keeps a persistence template alive while its connections live) once it is half
    /// spent, so a long stream costs one persistence write per half timeout, not per packet.
    pub persisted_until_ms: u64,
}

/// Connection states, IPVS-style, from the client-to-server direction alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// SYN seen, no ACK yet.
    SynSent,
    /// Data flowing.
    Established,
    /// FIN seen.
    Closing,
    /// RST seen.
    Reset,
    /// UDP (no states).
    Datagram,
}

impl FlowState {
    /// The state after a packet with `flags` (`None` for UDP), and its idle timeout.
    pub fn after(flags: Option<u8>) -> (FlowState, u64) {
        let Some(flags) = flags else {
            return (FlowState::Datagram, UDP_TIMEOUT_MS);
        };
        if flags & tcp_flags::RST != 0 {
            (FlowState::Reset, RST_TIMEOUT_MS)
        } else if flags & tcp_flags::FIN != 0 {
            (FlowState::Closing, FIN_TIMEOUT_MS)
        } else if flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0 {
            (FlowState::SynSent, SYN_TIMEOUT_MS)
        } else {
            (FlowState::Established, ESTABLISHED_TIMEOUT_MS)
        }
    }

    /// The state after a packet with `flags` on a connection in this state: a closing or
    /// reset connection stays so until it expires (its last ACKs do not revive it).
    pub fn next(self, flags: Option<u8>) -> (FlowState, u64) {
        let (next, timeout) = FlowState::after(flags);
        match (self, next) {
            (FlowState::Closing, FlowState::Established | FlowState::SynSent) => {
                (FlowState::Closing, FIN_TIMEOUT_MS)
            }
            (FlowState::Reset, FlowState::Established | FlowState::SynSent) => {
                (FlowState::Reset, RST_TIMEOUT_MS)
            }
            _ => (next, timeout),
        }
    }

    /// Whether the connection counts as active for a server's connection count.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            FlowState::SynSent | FlowState::Established | FlowState::Datagram
        )
    }
}

/// A bounded map whose entries expire.
#[derive(Debug)]
pub struct ExpiringTable<K, V> {
    entries: HashMap<K, V>,
    capacity: usize,
    last_sweep_ms: u64,
    /// Entries that could not be recorded because the table was full of live entries.
    pub full_misses: u64,
}

/// Values that know when they expire.
pub trait Expires {
    /// Absolute expiry time in milliseconds.
    fn expires_ms(&self) -> u64;
}

impl Expires for FlowEntry {
    fn expires_ms(&self) -> u64 {
        self.expires_ms
    }
}

/// A persistent client's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistEntry {
    /// The real server's address.
    pub real_server: u32,
    /// When the client is forgotten unless it sends again.
    pub expires_ms: u64,
}

impl Expires for PersistEntry {
    fn expires_ms(&self) -> u64 {
        self.expires_ms
    }
}

impl<K: std::hash::Hash + Eq + Copy, V: Expires + Copy> ExpiringTable<K, V> {
    /// An empty table of at most `capacity` entries (memory is reserved as it fills).
    pub fn new(capacity: usize) -> Self {
        ExpiringTable {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            last_sweep_ms: 0,
            full_misses: 0,
        }
    }

    /// The live entry for `key`, if any.
    #[inline]
    pub fn get(&self, key: &K, now_ms: u64) -> Option<V> {
        self.entries
            .get(key)
            .copied()
            .filter(|v| v.expires_ms() > now_ms)
    }

    /// The live entry for `key`, to update in place.
    #[inline]
    pub fn get_mut(&mut self, key: &K, now_ms: u64) -> Option<&mut V> {
        self.entries
            .get_mut(key)
            .filter(|v| v.expires_ms() > now_ms)
    }

    /// Records or replaces the entry for `key`; false when the table is full of live entries.
    #[inline]
    pub fn insert(&mut self, key: K, value: V, now_ms: u64) -> bool {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            if now_ms.saturating_sub(self.last_sweep_ms) >= SWEEP_INTERVAL_MS {
                self.sweep(now_ms);
            }
            if self.entries.len() >= self.capacity {
                self.full_misses += 1;
                return false;
            }
        }
        self.entries.insert(key, value);
        true
    }

    /// Removes expired entries.
    pub fn sweep(&mut self, now_ms: u64) {
        self.last_sweep_ms = now_ms;
        self.entries.retain(|_, v| v.expires_ms() > now_ms);
    }

    /// Entries, live or not yet swept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Live entries.
    pub fn live(&self, now_ms: u64) -> impl Iterator<Item = (&K, &V)> {
        self.entries
            .iter()
            .filter(move |(_, v)| v.expires_ms() > now_ms)
    }
}

/// The flow table.
pub type FlowTable = ExpiringTable<FlowKey, FlowEntry>;

/// Persistence key: client address and the service's identity.
pub type PersistKey = (u32, u64);

/// The persistence table.
pub type PersistenceTable = ExpiringTable<PersistKey, PersistEntry>;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            src: 1,
            dst: 2,
            ports: u32::from(port) << 16 | 1935,
            protocol: 6,
        }
    }

    fn entry(expires_ms: u64) -> FlowEntry {
        FlowEntry {
            real_server: 11,
            generation: 1,
            index: 0,
            state: FlowState::Established,
            expires_ms,
            persisted_until_ms: 0,
        }
    }

    #[test]
    fn states_follow_the_flags_with_ipvs_timeouts() {
        use tcp_flags::*;
        assert_eq!(FlowState::after(Some(SYN)), (FlowState::SynSent, 60_000));
        assert_eq!(
            FlowState::after(Some(ACK)),
            (FlowState::Established, 900_000)
        );
        assert_eq!(
            FlowState::after(Some(SYN | ACK)),
            (FlowState::Established, 900_000)
        );
        assert_eq!(
            FlowState::after(Some(FIN | ACK)),
            (FlowState::Closing, 120_000)
        );
        assert_eq!(
            FlowState::after(Some(RST | ACK)),
            (FlowState::Reset, 10_000)
        );
        assert_eq!(FlowState::after(None), (FlowState::Datagram, 300_000));
        assert_eq!(
            FlowState::Closing.next(Some(ACK)),
            (FlowState::Closing, 120_000)
        );
        assert_eq!(FlowState::Reset.next(Some(ACK)), (FlowState::Reset, 10_000));
        assert_eq!(
            FlowState::SynSent.next(Some(ACK)),
            (FlowState::Established, 900_000)
        );
        assert_eq!(
            FlowState::Established.next(Some(FIN | ACK)),
            (FlowState::Closing, 120_000)
        );
        assert!(FlowState::Established.is_active());
        assert!(!FlowState::Closing.is_active());
    }

    #[test]
    fn entries_expire() {
        let mut table = FlowTable::new(8);
        assert!(table.insert(key(1), entry(1_000), 0));
        assert_eq!(table.get(&key(1), 999), Some(entry(1_000)));
        assert_eq!(table.get(&key(1), 1_000), None);
    }

    #[test]
    fn a_full_table_sweeps_expired_entries_then_refuses() {
        let mut table = FlowTable::new(2);
        assert!(table.insert(key(1), entry(500), 0));
        assert!(table.insert(key(2), entry(5_000), 0));
        // Full of live entries and swept recently: refused, counted.
        assert!(!table.insert(key(3), entry(5_000), 10));
        assert_eq!(table.full_misses, 1);
        // A second later key(1) has expired and is swept to make room.
        assert!(table.insert(key(3), entry(5_000), 1_100));
        assert_eq!(table.len(), 2);
        assert_eq!(table.get(&key(1), 1_100), None);
        // Replacing an existing key never needs room.
        assert!(table.insert(key(3), entry(9_000), 1_200));
    }

    #[test]
    fn the_table_never_grows_past_its_capacity() {
        let mut table = FlowTable::new(100);
        for port in 0..10_000u16 {
            table.insert(key(port), entry(u64::MAX), u64::from(port) * 10);
            assert!(table.len() <= 100);
        }
        assert_eq!(table.full_misses, 9_900);
    }
}
