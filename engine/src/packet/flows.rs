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
//! - The fragment table maps an IP datagram (source, destination, protocol, IP ID) to the real
//!   server its first fragment went to, for a few seconds: the later fragments carry no ports,
//!   so they follow their first piece.
//!
//! All are bounded: when a table is full, expired entries are swept out; if it is still full,
//! an entry that may give way ([`Expires::evictable`]: a connection that never completed its
//! handshake, or is closing) does, the one nearest its expiry among the slots near the new
//! key; failing that the new entry is not recorded (the frame is still forwarded by Maglev,
//! which is stable as long as the server set is) and a counter says so. Only a SYN or a
//! datagram creates a connection entry, so spoofed mid-connection packets cannot fill the
//! table, and a SYN flood only pushes out other half-open connections. Time is milliseconds
//! given by the caller.
//!
//! The flow table keeps a census as entries come and go ([`ConnectionCensus`]): the active
//! connections per real server that `max_connections` and `lbctl status` read, counted where
//! an entry is stored, changes state or is removed, so that no one walks the table to count.
//! An expired entry counts until it is swept; the worker sweeps its tables gradually
//! ([`ExpiringTable::sweep_gradually`]), a whole pass every [`SWEEP_PASS_MS`].

use std::hash::BuildHasher;
use std::marker::PhantomData;

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
/// How long a datagram's first fragment is remembered for its later ones (they arrive within
/// milliseconds of each other; a receiver gives up reassembling after 30 s).
pub const FRAGMENT_TIMEOUT_MS: u64 = 5_000;
/// Slots a full table looks at, from a new key's home slot on, for an entry that may give way.
const EVICTION_WINDOW: usize = 64;
/// A gradual sweep passes over a whole table in this time: an expired connection leaves its
/// server's count within it.
pub const SWEEP_PASS_MS: u64 = 1_000;

/// A connection as the balancer sees it; `A` is its address family ([`Address`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey<A = u32> {
    /// Client address.
    pub src: A,
    /// VIP.
    pub dst: A,
    /// Source port (high 16 bits) and destination port (low 16 bits).
    pub ports: u32,
    /// IP protocol.
    pub protocol: u8,
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
    /// Learned from a peer balancer ([`crate::packet::sync`]) and not carried here since: not
    /// offered back to the group.
    pub foreign: bool,
}

/// Connection states, IPVS-style, from the client-to-server direction alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
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

impl TryFrom<u8> for FlowState {
    type Error = u8;

    /// The state a peer sent (`state as u8`).
    fn try_from(value: u8) -> Result<Self, u8> {
        [
            FlowState::SynSent,
            FlowState::Established,
            FlowState::Closing,
            FlowState::Reset,
            FlowState::Datagram,
        ]
        .into_iter()
        .find(|state| *state as u8 == value)
        .ok_or(value)
    }
}

impl FlowState {
    /// The state after a packet with `flags` (`None` for UDP), and its idle timeout.
    #[inline(always)]
    pub const fn after(flags: Option<u8>) -> (FlowState, u64) {
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
    #[inline(always)]
    pub const fn next(self, flags: Option<u8>) -> (FlowState, u64) {
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

    /// A packet on a known connection in this state, with `flags` the TCP flags byte (or
    /// [`NO_FLAGS`] for a packet without them, UDP): its next state and timeout (as
    /// [`FlowState::next`]), or `None` when it is a new SYN (no ACK) on a closing or reset
    /// tuple, which starts a new connection (port reuse). One lookup in a table built from
    /// those rules at compile time, two loads and no branch on the flags: it runs for every
    /// frame of a known connection.
    #[inline(always)]
    pub fn on_flags(self, flags: u16) -> Option<(FlowState, u64)> {
        let class = FLAG_CLASS[usize::from(flags) & (FLAG_CLASS.len() - 1)];
        let step = STEPS[self as usize][usize::from(class)];
        (!step.new_connection).then_some((step.state, u64::from(step.timeout_ms)))
    }

    /// Whether the connection is under way: its handshake completed (or it is a datagram
    /// flow). Only such a connection counts for a server's connection count and limit (IPVS
    /// shows the others as inactive) and keeps its client persisted: a spoofed SYN never
    /// completes, and must neither fill a server up nor persist anyone.
    #[inline(always)]
    pub fn is_active(self) -> bool {
        matches!(self, FlowState::Established | FlowState::Datagram)
    }
}

/// What a packet does to a known connection, by state and flag class: [`FlowState::on_flags`].
#[derive(Debug, Clone, Copy)]
struct Step {
    state: FlowState,
    new_connection: bool,
    timeout_ms: u32,
}

/// The TCP flags the state machine reads (FIN, SYN, RST, ACK) packed into 4 bits, and one more
/// class for UDP (no flags).
const FLAG_CLASSES: usize = 17;

#[inline(always)]
const fn flag_class(flags: Option<u8>) -> usize {
    match flags {
        Some(f) => ((f & 0x07) | ((f & tcp_flags::ACK) >> 1)) as usize,
        None => FLAG_CLASSES - 1,
    }
}

/// [`FlowState::on_flags`] for a packet without TCP flags (UDP).
pub const NO_FLAGS: u16 = 256;

/// The flag class of every flags byte and of [`NO_FLAGS`] (512 entries: any 9-bit index).
const FLAG_CLASS: [u8; 512] = {
    let mut classes = [0u8; 512];
    let mut flags = 0;
    while flags < 512 {
        let class = if flags < 256 {
            flag_class(Some(flags as u8))
        } else {
            flag_class(None)
        };
        classes[flags] = class as u8;
        flags += 1;
    }
    classes
};

/// A flags byte of each class (the other bits do not change the state machine's answer).
const fn class_flags(class: usize) -> Option<u8> {
    if class == FLAG_CLASSES - 1 {
        None
    } else {
        Some((class as u8 & 0x07) | ((class as u8 & 0x08) << 1))
    }
}

/// [`FlowState::on_flags`] for every state (by discriminant) and flag class.
const STEPS: [[Step; FLAG_CLASSES]; 5] = {
    let states = [
        FlowState::SynSent,
        FlowState::Established,
        FlowState::Closing,
        FlowState::Reset,
        FlowState::Datagram,
    ];
    let mut steps = [[Step {
        state: FlowState::Datagram,
        new_connection: false,
        timeout_ms: 0,
    }; FLAG_CLASSES]; 5];
    let mut s = 0;
    while s < states.len() {
        let state = states[s];
        assert!(state as usize == s);
        let mut class = 0;
        while class < FLAG_CLASSES {
            let flags = class_flags(class);
            let (next, timeout_ms) = state.next(flags);
            assert!(timeout_ms <= u32::MAX as u64);
            let new_syn = match flags {
                Some(f) => f & tcp_flags::SYN != 0 && f & tcp_flags::ACK == 0,
                None => false,
            };
            steps[s][class] = Step {
                state: next,
                new_connection: matches!(state, FlowState::Closing | FlowState::Reset) && new_syn,
                timeout_ms: timeout_ms as u32,
            };
            class += 1;
        }
        s += 1;
    }
    steps
};

/// A bounded map whose entries expire.
///
/// Open addressing with linear probing over a power-of-two array that is at most half full,
/// so a lookup is one hash (a folded multiply), usually one slot, and no call: it runs for
/// every frame. The array doubles as entries arrive (memory is reserved as the table fills);
/// an entry is removed by shifting the rest of its run back (no tombstones). A byte per slot
/// (8 KB for 8192 slots: it stays in the cache) holds a tag of its key's hash, which lookups
/// walk instead of the slots.
#[derive(Debug)]
pub struct ExpiringTable<K: TableKey, V, C = NoCensus> {
    /// Packed keys ([`TableKey::pack`]) and their values.
    slots: Box<[Slot<K, V>]>,
    /// Per slot: 0 when free, else [`tag`] of its key's hash.
    tags: Box<[u8]>,
    /// `slots.len() - 1` (a power of two less one).
    mask: usize,
    /// 64 - log2(`slots.len()`): a hash's top bits index the slots.
    shift: u32,
    keys: PhantomData<K>,
    len: usize,
    seeds: Seeds,
    capacity: usize,
    last_sweep_ms: u64,
    /// Where the gradual sweep goes on, and when it last did.
    gradual: (usize, u64),
    census: C,
    /// Entries that could not be recorded because the table was full of live entries.
    pub full_misses: u64,
    /// Live entries that gave way to a new one in a full table.
    pub evictions: u64,
}

/// A slot of an [`ExpiringTable`]: a packed key and its value, or free.
type Slot<K, V> = Option<(<K as TableKey>::Packed, V)>;

/// A table's random hash keys, drawn when it is created: the keys come from the wire, so
/// their hash must not be predictable.
#[derive(Debug, Clone, Copy)]
pub struct Seeds([u64; 2]);

impl Seeds {
    fn random() -> Seeds {
        let random = hashbrown::DefaultHashBuilder::default();
        Seeds([random.hash_one(0u64), random.hash_one(1u64)])
    }
}

/// 64 x 64 -> 128-bit multiply, high and low halves folded together (as foldhash does).
#[inline(always)]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// Keys of an [`ExpiringTable`]: fixed-size integers packed losslessly into what the table
/// stores and compares. IPv4 keys pack into one `u128`, compared in two words and hashed with
/// one folded multiply; IPv6 keys are stored as they are and hashed a word pair at a time.
pub trait TableKey: Copy + Eq {
    /// What the table stores.
    type Packed: Copy + Eq + std::fmt::Debug;
    /// The key as stored.
    fn pack(&self) -> Self::Packed;
    /// The key back from [`TableKey::pack`].
    fn unpack(packed: Self::Packed) -> Self;
    /// The stored key's hash under the table's secret `seeds`.
    fn hash(packed: &Self::Packed, seeds: &Seeds) -> u64;
}

/// An IP address as the tables hold it, host order: `u32` for IPv4, `u128` for IPv6. It says
/// how the family's keys are stored and hashed: IPv4 keys pack into one `u128`, compared in
/// two words and hashed with one folded multiply; IPv6 keys are stored as they are and hashed
/// a word pair at a time.
pub trait Address: Copy + Eq + std::fmt::Debug + std::hash::Hash + Default + 'static {
    /// A stored [`FlowKey`].
    type Flow: Copy + Eq + std::fmt::Debug;
    /// A stored [`PersistKey`].
    type Persist: Copy + Eq + std::fmt::Debug;
    /// A stored [`FragmentKey`].
    type Fragment: Copy + Eq + std::fmt::Debug;
    /// Packs a connection.
    fn pack_flow(key: &FlowKey<Self>) -> Self::Flow;
    /// Unpacks a connection.
    fn unpack_flow(packed: Self::Flow) -> FlowKey<Self>;
    /// Hashes a stored connection.
    fn hash_flow(packed: &Self::Flow, seeds: &Seeds) -> u64;
    /// Packs a client.
    fn pack_persist(key: &PersistKey<Self>) -> Self::Persist;
    /// Unpacks a client.
    fn unpack_persist(packed: Self::Persist) -> PersistKey<Self>;
    /// Hashes a stored client.
    fn hash_persist(packed: &Self::Persist, seeds: &Seeds) -> u64;
    /// Packs a datagram.
    fn pack_fragment(key: &FragmentKey<Self>) -> Self::Fragment;
    /// Unpacks a datagram.
    fn unpack_fragment(packed: Self::Fragment) -> FragmentKey<Self>;
    /// Hashes a stored datagram.
    fn hash_fragment(packed: &Self::Fragment, seeds: &Seeds) -> u64;
}

impl Address for u32 {
    type Flow = u128;
    type Persist = u128;
    type Fragment = u128;

    #[inline(always)]
    fn pack_flow(key: &FlowKey) -> u128 {
        u128::from(key.src) << 96
            | u128::from(key.dst) << 64
            | u128::from(key.ports) << 32
            | u128::from(key.protocol)
    }

    #[inline(always)]
    fn unpack_flow(packed: u128) -> FlowKey {
        FlowKey {
            src: (packed >> 96) as u32,
            dst: (packed >> 64) as u32,
            ports: (packed >> 32) as u32,
            protocol: packed as u8,
        }
    }

    #[inline(always)]
    fn hash_flow(packed: &u128, seeds: &Seeds) -> u64 {
        hash(*packed, seeds)
    }

    #[inline(always)]
    fn pack_persist(key: &PersistKey) -> u128 {
        u128::from(key.0) << 64 | u128::from(key.1)
    }

    #[inline(always)]
    fn unpack_persist(packed: u128) -> PersistKey {
        ((packed >> 64) as u32, packed as u64)
    }

    #[inline(always)]
    fn hash_persist(packed: &u128, seeds: &Seeds) -> u64 {
        hash(*packed, seeds)
    }

    #[inline(always)]
    fn pack_fragment(key: &FragmentKey) -> u128 {
        u128::from(key.src) << 96
            | u128::from(key.dst) << 64
            | u128::from(key.id) << 8
            | u128::from(key.protocol)
    }

    #[inline(always)]
    fn unpack_fragment(packed: u128) -> FragmentKey {
        FragmentKey {
            src: (packed >> 96) as u32,
            dst: (packed >> 64) as u32,
            id: (packed >> 8) as u32,
            protocol: packed as u8,
        }
    }

    #[inline(always)]
    fn hash_fragment(packed: &u128, seeds: &Seeds) -> u64 {
        hash(*packed, seeds)
    }
}

/// The halves of an IPv6 address.
fn halves(address: u128) -> [u64; 2] {
    [(address >> 64) as u64, address as u64]
}

impl Address for u128 {
    type Flow = FlowKey<u128>;
    type Persist = PersistKey<u128>;
    type Fragment = FragmentKey<u128>;

    fn pack_flow(key: &Self::Flow) -> Self::Flow {
        *key
    }

    fn unpack_flow(packed: Self::Flow) -> Self::Flow {
        packed
    }

    #[inline]
    fn hash_flow(key: &Self::Flow, seeds: &Seeds) -> u64 {
        let [src_high, src_low] = halves(key.src);
        let [dst_high, dst_low] = halves(key.dst);
        let rest = u64::from(key.ports) << 8 | u64::from(key.protocol);
        hash_words(&[src_high, src_low, dst_high, dst_low, rest], seeds)
    }

    fn pack_persist(key: &Self::Persist) -> Self::Persist {
        *key
    }

    fn unpack_persist(packed: Self::Persist) -> Self::Persist {
        packed
    }

    #[inline]
    fn hash_persist(key: &Self::Persist, seeds: &Seeds) -> u64 {
        let [high, low] = halves(key.0);
        hash_words(&[high, low, key.1], seeds)
    }

    fn pack_fragment(key: &Self::Fragment) -> Self::Fragment {
        *key
    }

    fn unpack_fragment(packed: Self::Fragment) -> Self::Fragment {
        packed
    }

    #[inline]
    fn hash_fragment(key: &Self::Fragment, seeds: &Seeds) -> u64 {
        let [src_high, src_low] = halves(key.src);
        let [dst_high, dst_low] = halves(key.dst);
        let rest = u64::from(key.id) << 8 | u64::from(key.protocol);
        hash_words(&[src_high, src_low, dst_high, dst_low, rest], seeds)
    }
}

impl<A: Address> TableKey for FlowKey<A> {
    type Packed = A::Flow;

    #[inline(always)]
    fn pack(&self) -> A::Flow {
        A::pack_flow(self)
    }

    #[inline(always)]
    fn unpack(packed: A::Flow) -> Self {
        A::unpack_flow(packed)
    }

    #[inline(always)]
    fn hash(packed: &A::Flow, seeds: &Seeds) -> u64 {
        A::hash_flow(packed, seeds)
    }
}

impl<A: Address> TableKey for (A, u64) {
    type Packed = A::Persist;

    #[inline(always)]
    fn pack(&self) -> A::Persist {
        A::pack_persist(self)
    }

    #[inline(always)]
    fn unpack(packed: A::Persist) -> Self {
        A::unpack_persist(packed)
    }

    #[inline(always)]
    fn hash(packed: &A::Persist, seeds: &Seeds) -> u64 {
        A::hash_persist(packed, seeds)
    }
}

impl<A: Address> TableKey for FragmentKey<A> {
    type Packed = A::Fragment;

    #[inline(always)]
    fn pack(&self) -> A::Fragment {
        A::pack_fragment(self)
    }

    #[inline(always)]
    fn unpack(packed: A::Fragment) -> Self {
        A::unpack_fragment(packed)
    }

    #[inline(always)]
    fn hash(packed: &A::Fragment, seeds: &Seeds) -> u64 {
        A::hash_fragment(packed, seeds)
    }
}

/// Hashes IPv6 keys: each word pair goes through a folded multiply with the running hash, so
/// every bit counts and no choice of addresses collides without the secret.
#[inline(always)]
fn hash_words(words: &[u64], seeds: &Seeds) -> u64 {
    let mut h = seeds.0[0];
    for pair in words.chunks(2) {
        let second = pair.get(1).copied().unwrap_or(0);
        h = folded_multiply(pair[0] ^ h, second ^ seeds.0[1]);
    }
    h.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Seven bits of a hash that the slot index does not use, with the top bit set: a slot's
/// tag, never 0 (a free slot's).
#[inline(always)]
fn tag(hash: u64) -> u8 {
    hash as u8 | 0x80
}

/// A packed key's hash under `seeds`: one folded multiply of its two halves, then Fibonacci
/// hashing so that the top bits (the slot index) depend on every key bit. The low bits of the
/// folded product alone cluster badly for keys that differ in a few bits (clients of one
/// subnet, consecutive ports): up to 7 probes per lookup in a half-full table for some
/// seeds, against 1.5 with the second multiply.
#[inline(always)]
fn hash(packed: u128, seeds: &Seeds) -> u64 {
    folded_multiply(
        (packed >> 64) as u64 ^ seeds.0[0],
        packed as u64 ^ seeds.0[1],
    )
    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Values that know when they expire.
pub trait Expires {
    /// Absolute expiry time in milliseconds.
    fn expires_ms(&self) -> u64;

    /// Whether the entry may give way to a new one while it is live, when the table is full.
    fn evictable(&self) -> bool {
        false
    }
}

impl Expires for FlowEntry {
    fn expires_ms(&self) -> u64 {
        self.expires_ms
    }

    /// Half-open connections (a spoofed SYN is one, for good) and closing ones; never an
    /// established connection.
    fn evictable(&self) -> bool {
        matches!(
            self.state,
            FlowState::SynSent | FlowState::Closing | FlowState::Reset
        )
    }
}

/// A persistent client's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistEntry {
    /// The real server's address.
    pub real_server: u32,
    /// When the client is forgotten unless it sends again.
    pub expires_ms: u64,
    /// Learned from a peer balancer and not renewed here since (as [`FlowEntry::foreign`]).
    pub foreign: bool,
}

impl Expires for PersistEntry {
    fn expires_ms(&self) -> u64 {
        self.expires_ms
    }
}

/// What a table keeps count of as its entries come and go: every path that stores, replaces or
/// removes an entry tells it, and so must whoever changes an entry in place
/// ([`Census::update`]).
pub trait Census<K, V>: Default {
    /// `value` is now stored under `key`.
    fn enter(&mut self, key: &K, value: &V);

    /// `value`, stored under `key`, is removed or replaced.
    fn leave(&mut self, key: &K, value: &V);

    /// Changes the stored `value` of `key` in place, and counts the change.
    fn update(&mut self, key: &K, value: &mut V, change: impl FnOnce(&mut V)) {
        self.leave(key, value);
        change(value);
        self.enter(key, value);
    }
}

/// Counts nothing: the persistence and fragment tables.
#[derive(Debug, Default)]
pub struct NoCensus;

impl<K, V> Census<K, V> for NoCensus {
    #[inline(always)]
    fn enter(&mut self, _: &K, _: &V) {}

    #[inline(always)]
    fn leave(&mut self, _: &K, _: &V) {}
}

/// What a connection counts for: a real server of the service at a VIP, protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServedBy<A> {
    /// VIP.
    pub vip: A,
    /// IP protocol.
    pub protocol: u8,
    /// Destination port.
    pub port: u16,
    /// The real server's address ([`FlowEntry::real_server`]).
    pub real_server: u32,
}

/// The flow table's active connections ([`FlowState::is_active`]) per [`ServedBy`]: what a
/// real server's connection count is made of. Keyed by address and port, not by snapshot
/// index, so it stays true across snapshots; the report maps it onto the snapshot in use, as
/// a walk of the table would. A key leaves the map with its last connection.
#[derive(Debug, Default)]
pub struct ConnectionCensus<A> {
    counts: hashbrown::HashMap<ServedBy<A>, u64>,
}

impl<A: Address> ConnectionCensus<A> {
    /// Active connections per VIP, protocol, port and real server.
    pub fn counts(&self) -> impl Iterator<Item = (ServedBy<A>, u64)> + '_ {
        self.counts.iter().map(|(&served, &count)| (served, count))
    }

    fn served_by(key: &FlowKey<A>, entry: &FlowEntry) -> ServedBy<A> {
        ServedBy {
            vip: key.dst,
            protocol: key.protocol,
            port: key.ports as u16,
            real_server: entry.real_server,
        }
    }
}

impl<A: Address> Census<FlowKey<A>, FlowEntry> for ConnectionCensus<A> {
    #[inline]
    fn enter(&mut self, key: &FlowKey<A>, entry: &FlowEntry) {
        if entry.state.is_active() {
            *self.counts.entry(Self::served_by(key, entry)).or_default() += 1;
        }
    }

    #[inline]
    fn leave(&mut self, key: &FlowKey<A>, entry: &FlowEntry) {
        if !entry.state.is_active() {
            return;
        }
        let served = Self::served_by(key, entry);
        if let Some(count) = self.counts.get_mut(&served) {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&served);
            }
        }
    }
}

/// Slots of a new table; it doubles from there.
const MIN_SLOTS: usize = 16;

impl<K: TableKey, V: Expires + Copy, C: Census<K, V>> ExpiringTable<K, V, C> {
    /// An empty table of at most `capacity` entries (memory is reserved as it fills).
    pub fn new(capacity: usize) -> Self {
        ExpiringTable {
            slots: vec![None; MIN_SLOTS].into_boxed_slice(),
            tags: vec![0; MIN_SLOTS].into_boxed_slice(),
            mask: MIN_SLOTS - 1,
            shift: 64 - MIN_SLOTS.trailing_zeros(),
            keys: PhantomData,
            len: 0,
            seeds: Seeds::random(),
            capacity: capacity.max(1),
            last_sweep_ms: 0,
            gradual: (0, 0),
            census: C::default(),
            full_misses: 0,
            evictions: 0,
        }
    }

    /// The slot a packed key's probe starts at.
    #[inline(always)]
    fn home(&self, packed: K::Packed) -> usize {
        (K::hash(&packed, &self.seeds) >> self.shift) as usize
    }

    /// The slot holding the packed key, or the free slot that ends its probe.
    #[inline(always)]
    fn probe(&self, packed: K::Packed) -> (usize, bool) {
        let mut i = self.home(packed);
        // At most half full: every walk ends at a free slot.
        while let Some(Some((k, _))) = self.slots.get(i) {
            if *k == packed {
                return (i, true);
            }
            i = (i + 1) & self.mask;
        }
        (i, false)
    }

    /// The slot holding the packed key, found by walking the tags: whether the key is in its
    /// home slot or further (one key in four is further in a half-full table) is a branch
    /// the predictor cannot guess, and on the tags it resolves within a few cycles instead of
    /// after the slot's load, the access that misses the cache. Only the slot whose tag
    /// matches is read (its key compared: one in 128 other keys has the same tag).
    #[inline(always)]
    fn find(&self, packed: K::Packed) -> Option<usize> {
        let hash = K::hash(&packed, &self.seeds);
        let wanted = tag(hash);
        let mut i = (hash >> self.shift) as usize;
        loop {
            let t = *self.tags.get(i)?;
            if t == wanted && matches!(self.slots.get(i), Some(Some((k, _))) if *k == packed) {
                return Some(i);
            }
            if t == 0 {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The live entry for `key`, if any.
    #[inline]
    pub fn get(&self, key: &K, now_ms: u64) -> Option<V> {
        let i = self.find(key.pack())?;
        let (_, v) = self.slots.get(i)?.as_ref()?;
        (v.expires_ms() > now_ms).then_some(*v)
    }

    /// The live entry for `key`, to update in place, and the census that counts what changes
    /// in it ([`Census::update`]; fields the census does not count may be written directly).
    #[inline(always)]
    pub fn get_mut_and_census(&mut self, key: &K, now_ms: u64) -> (Option<&mut V>, &mut C) {
        let entry = self
            .find(key.pack())
            .and_then(|i| self.slots.get_mut(i)?.as_mut())
            .map(|(_, v)| v)
            .filter(|v| v.expires_ms() > now_ms);
        (entry, &mut self.census)
    }

    /// What the census counts.
    pub fn census(&self) -> &C {
        &self.census
    }

    /// Records or replaces the entry for `key`; false when the table is full of live entries.
    #[inline]
    pub fn insert(&mut self, key: K, value: V, now_ms: u64) -> bool {
        let packed = key.pack();
        let (mut i, found) = self.probe(packed);
        if !found {
            if self.len >= self.capacity {
                if now_ms.saturating_sub(self.last_sweep_ms) >= SWEEP_INTERVAL_MS {
                    self.sweep(now_ms);
                }
                if self.len >= self.capacity && !self.evict_near(packed) {
                    self.full_misses += 1;
                    return false;
                }
                i = self.probe(packed).0;
            }
            if (self.len + 1) * 2 > self.slots.len() {
                self.grow();
                i = self.probe(packed).0;
            }
            self.len += 1;
        }
        if let Some(slot) = self.slots.get_mut(i) {
            if let Some((_, replaced)) = slot {
                self.census.leave(&key, replaced);
            }
            *slot = Some((packed, value));
            self.census.enter(&key, &value);
        }
        if let Some(t) = self.tags.get_mut(i) {
            *t = tag(K::hash(&packed, &self.seeds));
        }
        true
    }

    /// Removes the evictable entry nearest its expiry among [`EVICTION_WINDOW`] slots from
    /// the home slot of `packed` on (random slots: the keys are hashed with a secret); false
    /// when there is none. A half-open connection of a real client is milliseconds old when its
    /// handshake completes, so under a SYN flood the oldest half-open entries, the ones that
    /// give way, are almost always the flood's. (Expired entries go at the next sweep.)
    #[cold]
    fn evict_near(&mut self, packed: K::Packed) -> bool {
        let home = self.home(packed);
        let mut victim: Option<(usize, u64)> = None;
        for step in 0..EVICTION_WINDOW.min(self.slots.len()) {
            let i = (home + step) & self.mask;
            if let Some(Some((_, v))) = self.slots.get(i)
                && v.evictable()
                && victim.is_none_or(|(_, expires)| v.expires_ms() < expires)
            {
                victim = Some((i, v.expires_ms()));
            }
        }
        let Some((i, _)) = victim else {
            return false;
        };
        self.remove_at(i);
        self.evictions += 1;
        true
    }

    /// Twice the slots, every entry placed again.
    #[cold]
    fn grow(&mut self) {
        let grown = vec![None; self.slots.len() * 2].into_boxed_slice();
        let old = std::mem::replace(&mut self.slots, grown);
        self.tags = vec![0; self.slots.len()].into_boxed_slice();
        self.mask = self.slots.len() - 1;
        self.shift -= 1;
        for (packed, value) in old.into_iter().flatten() {
            let (i, _) = self.probe(packed);
            self.slots[i] = Some((packed, value));
            self.tags[i] = tag(K::hash(&packed, &self.seeds));
        }
    }

    /// One step of a sweep that passes over the whole table every `pass_ms`: removes the
    /// expired entries of as many slots as the time since the last step is worth. Call it as
    /// often as you like; an empty table's step is a subtraction.
    pub fn sweep_gradually(&mut self, now_ms: u64, pass_ms: u64) {
        let (mut i, last_ms) = self.gradual;
        let slots = self.slots.len() as u64;
        let pass_ms = pass_ms.max(1);
        // Capped at a pass: slots (2^26 at most) times a pass in ms stays well within a u64.
        let elapsed_ms = now_ms.saturating_sub(last_ms).min(pass_ms);
        let worth = elapsed_ms * slots;
        let due = worth / pass_ms;
        if due == 0 {
            return;
        }
        // The time a step does not use counts for the next, unless a whole pass was due.
        let unused_ms = if due < slots {
            worth % pass_ms / slots
        } else {
            0
        };
        let mut passed = 0;
        i &= self.mask;
        while passed < due {
            match self.slots[i] {
                // The slot is refilled from later in its run: look at it again.
                Some((_, v)) if v.expires_ms() <= now_ms => self.remove_at(i),
                _ => {
                    i = (i + 1) & self.mask;
                    passed += 1;
                }
            }
        }
        self.gradual = (i, now_ms - unused_ms);
    }

    /// Removes expired entries.
    pub fn sweep(&mut self, now_ms: u64) {
        self.last_sweep_ms = now_ms;
        let mut i = 0;
        while i < self.slots.len() {
            match self.slots[i] {
                // The slot is refilled from later in its run: look at it again.
                Some((_, v)) if v.expires_ms() <= now_ms => self.remove_at(i),
                _ => i += 1,
            }
        }
    }

    /// Empties slot `i` and moves back the later entries of its run that may no longer be
    /// found past the gap (Knuth's algorithm R): no tombstones, probes stay short.
    fn remove_at(&mut self, mut gap: usize) {
        if let Some((packed, removed)) = self.slots[gap].take() {
            self.census.leave(&K::unpack(packed), &removed);
        }
        self.tags[gap] = 0;
        self.len -= 1;
        let mut j = gap;
        loop {
            j = (j + 1) & self.mask;
            let Some((packed, _)) = self.slots[j] else {
                return;
            };
            let home = self.home(packed);
            // The entry stays when its home lies cyclically in (gap, j].
            let stays = if gap <= j {
                gap < home && home <= j
            } else {
                gap < home || home <= j
            };
            if !stays {
                self.slots[gap] = self.slots[j].take();
                self.tags[gap] = std::mem::take(&mut self.tags[j]);
                gap = j;
            }
        }
    }

    /// Entries, live or not yet swept.
    pub fn entries(&self) -> usize {
        self.len
    }

    /// Bytes of one slot: its key and value, and its tag. A table is at most half full and
    /// doubles as it fills, so an entry costs two to four slots.
    pub const SLOT_BYTES: usize = std::mem::size_of::<Slot<K, V>>() + 1;

    /// Bytes the table's slots take now.
    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * Self::SLOT_BYTES
    }

    /// Slots a lookup of `key` looks at.
    #[cfg(test)]
    fn probe_length(&self, key: &K) -> usize {
        let packed = key.pack();
        let (i, _) = self.probe(packed);
        (i.wrapping_sub(self.home(packed)) & self.mask) + 1
    }

    /// Slots, for a walk over the table by index ([`ExpiringTable::live_at`]).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The live entry in slot `index`, if any. Entries move when the table grows or an entry
    /// is removed, so a walk by index may see one twice or miss one: good enough for a
    /// periodic refresh, not for an exact census.
    pub fn live_at(&self, index: usize, now_ms: u64) -> Option<(K, V)> {
        let (packed, value) = self.slots.get(index)?.as_ref()?;
        (value.expires_ms() > now_ms).then(|| (K::unpack(*packed), *value))
    }

    /// Live entries.
    pub fn live(&self, now_ms: u64) -> impl Iterator<Item = (K, V)> {
        self.slots
            .iter()
            .flatten()
            .filter(move |(_, v)| v.expires_ms() > now_ms)
            .map(|&(packed, v)| (K::unpack(packed), v))
    }
}

/// An IP datagram that arrives in fragments, as its pieces all say (RFC 791: source,
/// destination, protocol and identification name the datagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentKey<A = u32> {
    /// Client address.
    pub src: A,
    /// VIP.
    pub dst: A,
    /// IP identification (IPv6: the fragment header's 32 bits).
    pub id: u32,
    /// IP protocol.
    pub protocol: u8,
}

/// Where a fragmented datagram's first piece went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentEntry {
    /// The service's stable id ([`crate::packet::snapshot::ServiceEntry::id`]).
    pub service: u32,
    /// The real server's (or the fallback server's) address.
    pub real_server: u32,
    /// When the datagram is forgotten.
    pub expires_ms: u64,
}

impl Expires for FragmentEntry {
    fn expires_ms(&self) -> u64 {
        self.expires_ms
    }

    /// A newer datagram's first fragment may always push out an older one's.
    fn evictable(&self) -> bool {
        true
    }
}

/// The fragment table.
pub type FragmentTable<A = u32> = ExpiringTable<FragmentKey<A>, FragmentEntry>;

/// The flow table, with its census of active connections.
pub type FlowTable<A = u32> = ExpiringTable<FlowKey<A>, FlowEntry, ConnectionCensus<A>>;

/// Persistence key: client address (IPv6: its leading `persistence_prefix_v6` bits) and the
/// service's stable id ([`crate::packet::snapshot::ServiceEntry::id`]), which survives edits of
/// its ports, VIP and label.
pub type PersistKey<A = u32> = (A, u64);

/// The persistence table.
pub type PersistenceTable<A = u32> = ExpiringTable<PersistKey<A>, PersistEntry>;

#[cfg(test)]
mod tests {
    use super::*;

    /// What a connection and a client cost (the README's memory figures): one slot each, two
    /// to four slots per entry, and a full default table's slots.
    #[test]
    fn bytes_per_entry() {
        let sizes = [
            ("IPv4 flow", FlowTable::<u32>::SLOT_BYTES),
            ("IPv6 flow", FlowTable::<u128>::SLOT_BYTES),
            ("IPv4 client", PersistenceTable::<u32>::SLOT_BYTES),
            ("IPv6 client", PersistenceTable::<u128>::SLOT_BYTES),
        ];
        for (what, bytes) in sizes {
            println!("{what}: {bytes} bytes a slot");
        }
        // A table never holds more than half its slots: fill one to capacity and look.
        let capacity = 10_000;
        let mut table = FlowTable::<u32>::new(capacity);
        for port in 0..capacity as u16 {
            assert!(table.insert(key(port), entry(u64::MAX), 0));
        }
        let slots = table.memory_bytes() / FlowTable::<u32>::SLOT_BYTES;
        assert!(
            slots >= 2 * capacity && slots <= 4 * capacity,
            "{slots} slots"
        );
        let bytes: Vec<usize> = sizes.iter().map(|&(_, bytes)| bytes).collect();
        assert_eq!(bytes, [49, 81, 33, 49], "the README's figures");
    }

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
            foreign: false,
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
        assert!(
            !FlowState::SynSent.is_active(),
            "a bare SYN is no connection yet"
        );
    }

    #[test]
    fn the_step_table_follows_the_rules_for_every_flags_byte() {
        use tcp_flags::*;
        let states = [
            FlowState::SynSent,
            FlowState::Established,
            FlowState::Closing,
            FlowState::Reset,
            FlowState::Datagram,
        ];
        let all_flags = (0..=255u8).map(Some).chain([None]);
        for state in states {
            for flags in all_flags.clone() {
                let reused = matches!(state, FlowState::Closing | FlowState::Reset)
                    && flags.is_some_and(|f| f & SYN != 0 && f & ACK == 0);
                let expected = (!reused).then(|| state.next(flags));
                let number = flags.map_or(NO_FLAGS, u16::from);
                assert_eq!(state.on_flags(number), expected, "{state:?} {flags:?}");
            }
        }
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
        assert_eq!(table.entries(), 2);
        assert_eq!(table.get(&key(1), 1_100), None);
        // Replacing an existing key never needs room.
        assert!(table.insert(key(3), entry(9_000), 1_200));
    }

    #[test]
    fn slots_are_no_larger_than_their_entries() {
        // The state's niche holds the free-slot marker: a flow slot is one key and one entry.
        assert_eq!(std::mem::size_of::<Option<(u128, FlowEntry)>>(), 48);
    }

    #[test]
    fn structured_keys_do_not_cluster() {
        // Clients of one /20 on consecutive ports, as in the benchmark: a half-full table
        // should need about 1.5 probes per lookup (linear probing with a random hash), for
        // every seed.
        for _ in 0..30 {
            let mut table = FlowTable::new(1 << 20);
            let keys: Vec<FlowKey> = (0..4096u32)
                .map(|i| FlowKey {
                    src: 0xc613_0000 | i,
                    dst: 0xc612_0064,
                    ports: (40_000 + i) << 16 | 1935,
                    protocol: 6,
                })
                .collect();
            for key in &keys {
                table.insert(*key, entry(u64::MAX), 0);
            }
            let probes: usize = keys.iter().map(|k| table.probe_length(k)).sum();
            let mean = probes as f64 / keys.len() as f64;
            assert!(mean < 1.8, "{mean} probes per lookup");
        }
    }

    #[test]
    fn keys_pack_and_unpack() {
        let flow: FlowKey = FlowKey {
            src: 0xc613_0102,
            dst: 0xc612_0064,
            ports: 40_000 << 16 | 1935,
            protocol: 17,
        };
        assert_eq!(FlowKey::unpack(flow.pack()), flow);
        let client = (0xc613_0102u32, u64::MAX - 1);
        assert_eq!(<(u32, u64)>::unpack(client.pack()), client);
    }

    #[test]
    fn sweeping_keeps_every_live_entry_reachable() {
        // Many keys in a small array: long runs that wrap around its end, then holes in them.
        let mut table = FlowTable::new(1_000);
        for port in 0..500u16 {
            assert!(table.insert(key(port), entry(u64::from(port % 3) * 1_000 + 500), 0));
        }
        table.sweep(600);
        assert_eq!(table.entries(), 333);
        for port in 0..500u16 {
            let live = port % 3 != 0;
            assert_eq!(table.get(&key(port), 600).is_some(), live, "port {port}");
        }
        assert_eq!(table.live(600).count(), 333);
    }

    #[test]
    fn a_gradual_sweep_passes_over_the_table_in_its_time() {
        let mut table = FlowTable::new(1_000);
        for port in 0..1_000u16 {
            let expires_ms = if port % 2 == 0 { 5_000 } else { u64::MAX };
            assert!(table.insert(key(port), entry(expires_ms), 0));
        }
        // A step after a long while passes over the whole table once, and no further.
        table.sweep_gradually(4_000, SWEEP_PASS_MS);
        assert_eq!(table.entries(), 1_000);
        assert_eq!(table.gradual.1, 4_000);
        let mut now = 4_000;
        let mut halfway = 0;
        // A pass after they expire, and a step or two for rounding.
        while now < 5_000 + SWEEP_PASS_MS + 20 {
            now += 7;
            table.sweep_gradually(now, SWEEP_PASS_MS);
            if now <= 5_500 {
                halfway = table.entries();
            }
        }
        assert!(halfway > 500 && halfway < 1_000, "{halfway} left halfway");
        assert_eq!(
            table.entries(),
            500,
            "every expired entry swept within a pass"
        );
        // Every established connection counted, and only those still stored.
        let counted: u64 = table.census().counts().map(|(_, n)| n).sum();
        assert_eq!(counted, 500);
    }

    mod model {
        //! The table against a plain map with the same rules, over random operations.
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        #[derive(Debug, Clone)]
        enum Op {
            Insert(u16, u64, FlowState, u32),
            Get(u16),
            Touch(u16),
            Restate(u16, FlowState),
            Sweep,
            SweepGradually,
            Wait(u64),
        }

        fn state() -> impl Strategy<Value = FlowState> {
            prop::sample::select(vec![
                FlowState::SynSent,
                FlowState::Established,
                FlowState::Closing,
                FlowState::Reset,
                FlowState::Datagram,
            ])
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0..48u16, 0..3_000u64, state(), 11..14u32)
                    .prop_map(|(k, ttl, state, rs)| Op::Insert(k, ttl, state, rs)),
                3 => (0..48u16).prop_map(Op::Get),
                1 => (0..48u16).prop_map(Op::Touch),
                1 => (0..48u16, state()).prop_map(|(k, state)| Op::Restate(k, state)),
                1 => Just(Op::Sweep),
                2 => Just(Op::SweepGradually),
                2 => (0..700u64).prop_map(Op::Wait),
            ]
        }

        /// The census's counts, sorted.
        fn census(table: &FlowTable) -> Vec<(ServedBy<u32>, u64)> {
            let mut counts: Vec<_> = table.census().counts().collect();
            counts.sort_by_key(|(served, _)| served.real_server);
            counts
        }

        /// The active connections among every stored entry, expired or not, counted by walking.
        fn recount(model: &HashMap<FlowKey, FlowEntry>) -> Vec<(ServedBy<u32>, u64)> {
            let mut counts: HashMap<ServedBy<u32>, u64> = HashMap::new();
            for (k, v) in model.iter().filter(|(_, v)| v.state.is_active()) {
                *counts.entry(ConnectionCensus::served_by(k, v)).or_default() += 1;
            }
            let mut counts: Vec<_> = counts.into_iter().collect();
            counts.sort_by_key(|(served, _)| served.real_server);
            counts
        }

        proptest! {
            #[test]
            fn behaves_like_a_map_with_the_same_rules(
                capacity in 1usize..40,
                ops in prop::collection::vec(op(), 1..300),
            ) {
                let mut table = FlowTable::new(capacity);
                let mut model: HashMap<FlowKey, FlowEntry> = HashMap::new();
                let mut model_last_sweep = 0u64;
                let mut model_misses = 0u64;
                let mut now = 0u64;
                for op in ops {
                    match op {
                        Op::Insert(k, ttl, state, real_server) => {
                            let value = FlowEntry {
                                state,
                                real_server,
                                ..entry(now + ttl)
                            };
                            let evictions = table.evictions;
                            let inserted = table.insert(key(k), value, now);
                            let mut recorded = true;
                            if model.len() >= capacity && !model.contains_key(&key(k)) {
                                if now - model_last_sweep >= SWEEP_INTERVAL_MS {
                                    model_last_sweep = now;
                                    model.retain(|_, v| v.expires_ms > now);
                                }
                                if model.len() >= capacity && table.evictions > evictions {
                                    // Which entry gave way depends on the hash: the one the
                                    // table lost, which must be one that may.
                                    let gone: Vec<FlowKey> = model
                                        .iter()
                                        .filter(|(k, _)| table.find(k.pack()).is_none())
                                        .map(|(k, v)| {
                                            assert!(v.evictable(), "{v:?} gave way");
                                            *k
                                        })
                                        .collect();
                                    prop_assert_eq!(gone.len(), 1);
                                    model.remove(&gone[0]);
                                } else if model.len() >= capacity {
                                    model_misses += 1;
                                    recorded = false;
                                }
                            }
                            if recorded {
                                model.insert(key(k), value);
                            }
                            prop_assert_eq!(inserted, recorded);
                        }
                        Op::Get(k) => {
                            let expected = model.get(&key(k)).copied().filter(|v| v.expires_ms > now);
                            prop_assert_eq!(table.get(&key(k), now), expected);
                        }
                        Op::Touch(k) => {
                            let expected = model.get_mut(&key(k)).filter(|v| v.expires_ms > now);
                            let (found, _) = table.get_mut_and_census(&key(k), now);
                            prop_assert_eq!(found.is_some(), expected.is_some());
                            if let (Some(found), Some(expected)) = (found, expected) {
                                found.expires_ms += 100;
                                expected.expires_ms += 100;
                            }
                        }
                        Op::Restate(k, state) => {
                            let expected = model.get_mut(&key(k)).filter(|v| v.expires_ms > now);
                            let (found, census) = table.get_mut_and_census(&key(k), now);
                            prop_assert_eq!(found.is_some(), expected.is_some());
                            if let (Some(found), Some(expected)) = (found, expected) {
                                census.update(&key(k), found, |v| v.state = state);
                                expected.state = state;
                            }
                        }
                        Op::Sweep => {
                            model_last_sweep = now;
                            model.retain(|_, v| v.expires_ms > now);
                            table.sweep(now);
                        }
                        Op::SweepGradually => {
                            table.sweep_gradually(now, 1_000);
                            // Some slots were swept: the model loses what the table lost,
                            // which must all have expired.
                            let mut removed = model.clone();
                            removed.retain(|k, _| table.find(k.pack()).is_none());
                            prop_assert!(removed.values().all(|v| v.expires_ms <= now));
                            model.retain(|k, _| !removed.contains_key(k));
                        }
                        Op::Wait(ms) => now += ms,
                    }
                    prop_assert_eq!(table.entries(), model.len());
                    prop_assert_eq!(table.full_misses, model_misses);
                    prop_assert_eq!(census(&table), recount(&model));
                }
                let mut live: Vec<_> = table.live(now).map(|(k, v)| (k.ports, v)).collect();
                let mut expected: Vec<_> = model
                    .iter()
                    .filter(|(_, v)| v.expires_ms > now)
                    .map(|(k, v)| (k.ports, *v))
                    .collect();
                live.sort_by_key(|(p, _)| *p);
                expected.sort_by_key(|(p, _)| *p);
                prop_assert_eq!(live, expected);
            }
        }
    }

    #[test]
    fn a_full_table_gives_half_open_connections_up_before_established_ones() {
        let half_open = |expires_ms| FlowEntry {
            state: FlowState::SynSent,
            ..entry(expires_ms)
        };
        let mut table = FlowTable::new(64);
        // A flood of half-open connections fills the table...
        for port in 0..64u16 {
            assert!(table.insert(key(port), half_open(60_000 + u64::from(port)), 0));
        }
        // ...and a real client's connections still find room, pushing the oldest out.
        for port in 1000..1010u16 {
            assert!(table.insert(key(port), entry(900_000), 10), "port {port}");
        }
        assert_eq!(
            (table.entries(), table.evictions, table.full_misses),
            (64, 10, 0)
        );
        for port in 1000..1010u16 {
            assert!(table.get(&key(port), 20).is_some());
        }
        // Established connections never give way.
        let mut established = FlowTable::new(64);
        for port in 0..64u16 {
            assert!(established.insert(key(port), entry(900_000), 0));
        }
        assert!(!established.insert(key(1000), half_open(60_000), 10));
        assert_eq!((established.evictions, established.full_misses), (0, 1));
        for port in 0..64u16 {
            assert!(established.get(&key(port), 20).is_some());
        }
    }

    #[test]
    fn fragment_keys_pack_and_unpack() {
        let fragment: FragmentKey = FragmentKey {
            src: 0xc613_0102,
            dst: 0xc612_0064,
            id: 0xbeef,
            protocol: 17,
        };
        assert_eq!(FragmentKey::unpack(fragment.pack()), fragment);
    }

    #[test]
    fn the_table_never_grows_past_its_capacity() {
        let mut table = FlowTable::new(100);
        for port in 0..10_000u16 {
            table.insert(key(port), entry(u64::MAX), u64::from(port) * 10);
            assert!(table.entries() <= 100);
        }
        assert_eq!(table.full_misses, 9_900);
    }
}
