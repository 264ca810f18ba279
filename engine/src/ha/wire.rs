//! The heartbeat on the wire: one UDP datagram, authenticated with HMAC-SHA256 over the shared
//! key (RFC 2104, the RustCrypto `hmac` and `sha2` crates), and ordered against replay.
//!
//! ```text
//!  0  "LBDH"   magic
//!  4  version  1
//!  5  role     1 primary, 2 secondary
//!  6  state    1 active, 2 passive, 3 fault
//!  7  flags    bit 0: released (this node handed over and is not to be chosen)
//!  8  sender   IPv4 address, the sender's ha.local_address
//! 12  epoch    u64: how many takeovers the pair has seen; the higher one wins
//! 20  boot     u64: the sender's start, in ns since the Unix epoch: orders its restarts
//! 28  seq      u64: counts the sender's heartbeats since its start
//! 36  generation u64: the sender's configuration generation
//! 44  mac      32 bytes: HMAC-SHA256(key, bytes 0..44)
//! ```
//!
//! All integers are big-endian. A datagram of another length, magic or version, or with a bad
//! MAC, is refused before any field is believed. [`ReplayGuard`] then accepts a sender's
//! heartbeat only when it is newer than every one accepted before: a later boot, or the same
//! boot and a higher sequence number. A copy recorded and sent again changes nothing.

use hmac::{Hmac, Mac};
use lbd_config::HaRole;
use sha2::Sha256;
use std::collections::HashMap;
use std::net::Ipv4Addr;

/// Bytes of a heartbeat.
pub const HEARTBEAT_LEN: usize = 76;
const BODY_LEN: usize = 44;
const MAGIC: [u8; 4] = *b"LBDH";
const VERSION: u8 = 1;

/// A node's state in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaState {
    /// Answers ARP for the VIPs: the clients' traffic comes to it.
    Active,
    /// Forwards whatever still reaches it, answers no ARP for the VIPs.
    Passive,
    /// Cannot serve (its link is down): never takes over.
    Fault,
}

impl std::fmt::Display for HaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HaState::Active => "active",
            HaState::Passive => "passive",
            HaState::Fault => "fault",
        })
    }
}

/// What a heartbeat says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The sender's address (its `ha.local_address`).
    pub sender: Ipv4Addr,
    /// Its configured role.
    pub role: HaRole,
    /// Its state.
    pub state: HaState,
    /// It handed over (`lbctl ha release`, or it is stopping) and is not to be chosen.
    pub released: bool,
    /// Takeovers the sender has seen.
    pub epoch: u64,
    /// The sender's start (ns since the Unix epoch).
    pub boot: u64,
    /// Its heartbeats since that start.
    pub seq: u64,
    /// Its configuration generation.
    pub generation: u64,
}

/// Why a datagram is not a heartbeat to believe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Wrong length, magic or version: not ours.
    #[error("not an lbd heartbeat")]
    Malformed,
    /// The MAC does not match: another key, or altered on the way.
    #[error("authentication failed")]
    BadMac,
    /// Authentic, but not newer than one already accepted from the sender.
    #[error("replayed or reordered")]
    Replayed,
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length.
    Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key"))
}

impl Heartbeat {
    /// The authenticated datagram.
    pub fn encode(&self, key: &[u8]) -> [u8; HEARTBEAT_LEN] {
        let mut out = [0u8; HEARTBEAT_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = match self.role {
            HaRole::Primary => 1,
            HaRole::Secondary => 2,
        };
        out[6] = match self.state {
            HaState::Active => 1,
            HaState::Passive => 2,
            HaState::Fault => 3,
        };
        out[7] = u8::from(self.released);
        out[8..12].copy_from_slice(&self.sender.octets());
        out[12..20].copy_from_slice(&self.epoch.to_be_bytes());
        out[20..28].copy_from_slice(&self.boot.to_be_bytes());
        out[28..36].copy_from_slice(&self.seq.to_be_bytes());
        out[36..44].copy_from_slice(&self.generation.to_be_bytes());
        let mut hmac = mac(key);
        hmac.update(&out[..BODY_LEN]);
        out[BODY_LEN..].copy_from_slice(&hmac.finalize().into_bytes());
        out
    }

    /// Reads a datagram, after checking its MAC (in constant time).
    pub fn decode(datagram: &[u8], key: &[u8]) -> Result<Heartbeat, WireError> {
        let bytes: &[u8; HEARTBEAT_LEN] = datagram.try_into().map_err(|_| WireError::Malformed)?;
        if bytes[0..4] != MAGIC || bytes[4] != VERSION {
            return Err(WireError::Malformed);
        }
        let mut hmac = mac(key);
        hmac.update(&bytes[..BODY_LEN]);
        hmac.verify_slice(&bytes[BODY_LEN..])
            .map_err(|_| WireError::BadMac)?;
        let role = match bytes[5] {
            1 => HaRole::Primary,
            2 => HaRole::Secondary,
            _ => return Err(WireError::Malformed),
        };
        let state = match bytes[6] {
            1 => HaState::Active,
            2 => HaState::Passive,
            3 => HaState::Fault,
            _ => return Err(WireError::Malformed),
        };
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(word)
        };
        Ok(Heartbeat {
            sender: Ipv4Addr::new(bytes[8], bytes[9], bytes[10], bytes[11]),
            role,
            state,
            released: bytes[7] & 1 != 0,
            epoch: u64_at(12),
            boot: u64_at(20),
            seq: u64_at(28),
            generation: u64_at(36),
        })
    }
}

/// Accepts each sender's heartbeats in order only.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    newest: HashMap<Ipv4Addr, (u64, u64)>,
}

impl ReplayGuard {
    /// Whether `beat` is newer than every heartbeat accepted from its sender; if so it is now
    /// the newest.
    pub fn accept(&mut self, beat: &Heartbeat) -> Result<(), WireError> {
        let order = (beat.boot, beat.seq);
        match self.newest.get(&beat.sender) {
            Some(&newest) if order <= newest => Err(WireError::Replayed),
            _ => {
                self.newest.insert(beat.sender, order);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"a shared secret of the pair";

    fn beat(seq: u64) -> Heartbeat {
        Heartbeat {
            sender: Ipv4Addr::new(198, 18, 0, 2),
            role: HaRole::Primary,
            state: HaState::Active,
            released: false,
            epoch: 3,
            boot: 1_700_000_000_000_000_000,
            seq,
            generation: 42,
        }
    }

    #[test]
    fn a_heartbeat_round_trips_under_its_key() {
        for (role, state, released) in [
            (HaRole::Primary, HaState::Active, false),
            (HaRole::Secondary, HaState::Passive, true),
            (HaRole::Secondary, HaState::Fault, false),
        ] {
            let sent = Heartbeat {
                role,
                state,
                released,
                ..beat(7)
            };
            assert_eq!(Heartbeat::decode(&sent.encode(KEY), KEY), Ok(sent));
        }
    }

    #[test]
    fn another_key_an_altered_byte_or_garbage_is_refused() {
        let datagram = beat(1).encode(KEY);
        assert_eq!(
            Heartbeat::decode(&datagram, b"another key"),
            Err(WireError::BadMac)
        );
        for at in 0..HEARTBEAT_LEN {
            let mut altered = datagram;
            altered[at] ^= 0x01;
            assert!(Heartbeat::decode(&altered, KEY).is_err(), "byte {at}");
        }
        assert_eq!(
            Heartbeat::decode(&datagram[..HEARTBEAT_LEN - 1], KEY),
            Err(WireError::Malformed)
        );
        assert_eq!(Heartbeat::decode(&[], KEY), Err(WireError::Malformed));
    }

    #[test]
    fn replayed_and_reordered_heartbeats_are_refused() {
        let mut guard = ReplayGuard::default();
        assert_eq!(guard.accept(&beat(1)), Ok(()));
        assert_eq!(guard.accept(&beat(2)), Ok(()));
        assert_eq!(guard.accept(&beat(2)), Err(WireError::Replayed), "a copy");
        assert_eq!(guard.accept(&beat(1)), Err(WireError::Replayed), "older");
        // A restart (a later boot) starts counting again; an older boot is a replay.
        let restarted = Heartbeat {
            boot: beat(1).boot + 1,
            ..beat(1)
        };
        assert_eq!(guard.accept(&restarted), Ok(()));
        assert_eq!(guard.accept(&beat(99)), Err(WireError::Replayed));
        // Each sender on its own.
        let other = Heartbeat {
            sender: Ipv4Addr::new(198, 18, 0, 3),
            ..beat(1)
        };
        assert_eq!(guard.accept(&other), Ok(()));
    }

    proptest::proptest! {
        #[test]
        fn any_datagram_is_refused_or_read_without_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            let _ = Heartbeat::decode(&bytes, KEY);
        }
    }
}
