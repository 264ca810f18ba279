//! The sync stream between two nodes, on the wire: a TCP connection from the sender to the
//! receiver's `sync_port`, opened with a handshake, then authenticated frames one way.
//!
//! ```text
//! hello      sender -> receiver  "LBDS" 1 0 0 0 | sender address (4) | sender nonce (16)
//! challenge  receiver -> sender  "LBDS" 1 0 0 0 | receiver nonce (16)
//!                                | HMAC(key, "lbd-sync challenge" | hello | receiver nonce)
//! frame      sender -> receiver  length (u32) | body | HMAC(key, "lbd-sync frame"
//!                                | sender nonce | receiver nonce | frame number (u64) | body)
//! body       kind (1 entries, 2 replica, 3 keepalive) | payload
//! ```
//!
//! The challenge proves to the sender that the receiver holds the key; the first frame proves
//! it to the receiver. Each frame's MAC covers both nonces and its number, counted from 0 on
//! either side and never sent: a frame recorded in one connection fails in every other (the
//! receiver's nonce is new), and one dropped, repeated or moved within a connection fails
//! where it lands. A failure ends the connection; the sender opens a new one and the peer's
//! state is sent in full again.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Read;
use std::net::Ipv4Addr;

/// Bytes of a hello.
pub const HELLO_LEN: usize = 28;
/// Bytes of a challenge.
pub const CHALLENGE_LEN: usize = 56;
/// Bytes of a frame's MAC.
pub const TAG_LEN: usize = 32;
/// The largest body a receiver accepts: a bound on what one frame can make it allocate.
pub const MAX_BODY: usize = 1 << 20;
const MAGIC: [u8; 4] = *b"LBDS";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 16;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Shared entries, [`crate::packet::sync::RECORD_LEN`] bytes each.
    Entries = 1,
    /// The active node's services and server states, as JSON.
    Replica = 2,
    /// Nothing: the connection is alive.
    Keepalive = 3,
}

/// Why the stream ends.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Not our protocol or version.
    #[error("not an lbd sync stream")]
    Malformed,
    /// A MAC did not match: another key, or a frame replayed, reordered or altered.
    #[error("authentication failed")]
    BadMac,
    /// A frame longer than [`MAX_BODY`].
    #[error("frame of {0} bytes is over the limit")]
    TooLong(usize),
    /// The connection failed or timed out.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn keyed(key: &[u8], label: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key"));
    mac.update(label);
    mac
}

/// A fresh nonce from the operating system's generator.
pub fn nonce() -> Result<[u8; NONCE_LEN], SessionError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| SessionError::Io(std::io::Error::other(e)))?;
    Ok(nonce)
}

/// The sender's opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The sender's `ha.local_address`.
    pub sender: Ipv4Addr,
    /// Its nonce for this connection.
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    /// On the wire.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[8..12].copy_from_slice(&self.sender.octets());
        out[12..].copy_from_slice(&self.nonce);
        out
    }

    /// From the wire.
    pub fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Hello, SessionError> {
        if bytes[0..4] != MAGIC || bytes[4] != VERSION {
            return Err(SessionError::Malformed);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[12..]);
        Ok(Hello {
            sender: Ipv4Addr::new(bytes[8], bytes[9], bytes[10], bytes[11]),
            nonce,
        })
    }
}

/// The receiver's answer to `hello`, with its nonce, proving it holds `key`.
pub fn challenge(key: &[u8], hello: &Hello, nonce: [u8; NONCE_LEN]) -> [u8; CHALLENGE_LEN] {
    let mut out = [0u8; CHALLENGE_LEN];
    out[0..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[8..24].copy_from_slice(&nonce);
    let mut mac = keyed(key, b"lbd-sync challenge");
    mac.update(&hello.encode());
    mac.update(&nonce);
    out[24..].copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// The receiver's nonce from its answer to `hello`, once the answer proves it holds `key`.
pub fn check_challenge(
    key: &[u8],
    hello: &Hello,
    bytes: &[u8; CHALLENGE_LEN],
) -> Result<[u8; NONCE_LEN], SessionError> {
    if bytes[0..4] != MAGIC || bytes[4] != VERSION {
        return Err(SessionError::Malformed);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&bytes[8..24]);
    let mut mac = keyed(key, b"lbd-sync challenge");
    mac.update(&hello.encode());
    mac.update(&nonce);
    mac.verify_slice(&bytes[24..])
        .map_err(|_| SessionError::BadMac)?;
    Ok(nonce)
}

/// One direction of an established stream: both nonces and the next frame's number.
#[derive(Clone)]
pub struct Stream {
    key: Vec<u8>,
    nonces: [u8; 2 * NONCE_LEN],
    next: u64,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("next", &self.next).finish()
    }
}

impl Stream {
    /// The stream that `hello` and the receiver's `nonce` opened.
    pub fn new(key: &[u8], hello: &Hello, nonce: [u8; NONCE_LEN]) -> Stream {
        let mut nonces = [0u8; 2 * NONCE_LEN];
        nonces[..NONCE_LEN].copy_from_slice(&hello.nonce);
        nonces[NONCE_LEN..].copy_from_slice(&nonce);
        Stream {
            key: key.to_vec(),
            nonces,
            next: 0,
        }
    }

    fn tag(&self, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = keyed(&self.key, b"lbd-sync frame");
        mac.update(&self.nonces);
        mac.update(&self.next.to_be_bytes());
        mac.update(body);
        mac
    }

    /// The next frame, carrying `kind` and `payload`.
    pub fn seal(&mut self, kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(4 + 1 + payload.len() + TAG_LEN);
        let length = u32::try_from(1 + payload.len()).unwrap_or(u32::MAX);
        frame.extend_from_slice(&length.to_be_bytes());
        frame.push(kind as u8);
        frame.extend_from_slice(payload);
        let tag = self.tag(&frame[4..]).finalize().into_bytes();
        frame.extend_from_slice(&tag);
        self.next += 1;
        frame
    }

    /// Reads the next frame from `input` and returns its kind and payload once its MAC
    /// holds. An unknown kind is an error too: the sender speaks another version.
    pub fn open(&mut self, input: &mut impl Read) -> Result<(Kind, Vec<u8>), SessionError> {
        let mut length = [0u8; 4];
        input.read_exact(&mut length)?;
        let length = u32::from_be_bytes(length) as usize;
        if length > MAX_BODY {
            return Err(SessionError::TooLong(length));
        }
        if length == 0 {
            return Err(SessionError::Malformed);
        }
        let mut body = vec![0u8; length + TAG_LEN];
        input.read_exact(&mut body)?;
        let (body, tag) = body.split_at(length);
        self.tag(body)
            .verify_slice(tag)
            .map_err(|_| SessionError::BadMac)?;
        self.next += 1;
        let kind = match body[0] {
            1 => Kind::Entries,
            2 => Kind::Replica,
            3 => Kind::Keepalive,
            _ => return Err(SessionError::Malformed),
        };
        Ok((kind, body[1..].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"the pair's shared secret";

    fn hello() -> Hello {
        Hello {
            sender: Ipv4Addr::new(198, 18, 0, 2),
            nonce: [7; NONCE_LEN],
        }
    }

    /// Both ends of a stream opened by `hello()` and a receiver nonce of `n`s.
    fn ends(n: u8) -> (Stream, Stream) {
        let answer = challenge(KEY, &hello(), [n; NONCE_LEN]);
        let nonce = check_challenge(KEY, &hello(), &answer).expect("authentic");
        (
            Stream::new(KEY, &hello(), nonce),
            Stream::new(KEY, &hello(), [n; NONCE_LEN]),
        )
    }

    #[test]
    fn frames_arrive_in_order_under_the_key() {
        let (mut sender, mut receiver) = ends(9);
        let mut wire = sender.seal(Kind::Entries, b"first");
        wire.extend(sender.seal(Kind::Keepalive, b""));
        wire.extend(sender.seal(Kind::Replica, b"{}"));
        let mut input = &wire[..];
        assert_eq!(
            receiver.open(&mut input).expect("1"),
            (Kind::Entries, b"first".to_vec())
        );
        assert_eq!(
            receiver.open(&mut input).expect("2"),
            (Kind::Keepalive, vec![])
        );
        assert_eq!(
            receiver.open(&mut input).expect("3"),
            (Kind::Replica, b"{}".to_vec())
        );
        assert!(matches!(
            receiver.open(&mut input),
            Err(SessionError::Io(_))
        ));
    }

    #[test]
    fn hello_round_trips_and_garbage_is_refused() {
        assert_eq!(Hello::decode(&hello().encode()).expect("ours"), hello());
        let mut other = hello().encode();
        other[0] = b'X';
        assert!(matches!(
            Hello::decode(&other),
            Err(SessionError::Malformed)
        ));
    }

    #[test]
    fn a_receiver_without_the_key_is_found_out() {
        let answer = challenge(b"somebody else's key", &hello(), [1; NONCE_LEN]);
        assert!(matches!(
            check_challenge(KEY, &hello(), &answer),
            Err(SessionError::BadMac)
        ));
        // An answer to another hello is no answer to this one.
        let other = Hello {
            nonce: [8; NONCE_LEN],
            ..hello()
        };
        let answer = challenge(KEY, &other, [1; NONCE_LEN]);
        assert!(check_challenge(KEY, &hello(), &answer).is_err());
    }

    #[test]
    fn replayed_reordered_altered_or_foreign_frames_are_refused() {
        let (mut sender, _) = ends(1);
        let first = sender.seal(Kind::Entries, b"one");
        let second = sender.seal(Kind::Entries, b"two");
        // A frame twice, or out of its place.
        let (_, mut receiver) = ends(1);
        receiver.open(&mut &first[..]).expect("first");
        assert!(matches!(
            receiver.open(&mut &first[..]),
            Err(SessionError::BadMac)
        ));
        let (_, mut receiver) = ends(1);
        assert!(matches!(
            receiver.open(&mut &second[..]),
            Err(SessionError::BadMac)
        ));
        // Recorded from one connection, sent into another (a new receiver nonce).
        let (_, mut receiver) = ends(2);
        assert!(matches!(
            receiver.open(&mut &first[..]),
            Err(SessionError::BadMac)
        ));
        // Any byte altered.
        for at in 4..first.len() {
            let mut altered = first.clone();
            altered[at] ^= 1;
            let (_, mut receiver) = ends(1);
            assert!(receiver.open(&mut &altered[..]).is_err(), "byte {at}");
        }
        // Under another key.
        let mut stranger = Stream::new(b"another key entirely", &hello(), [1; NONCE_LEN]);
        let (_, mut receiver) = ends(1);
        assert!(matches!(
            receiver.open(&mut &stranger.seal(Kind::Entries, b"x")[..]),
            Err(SessionError::BadMac)
        ));
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        let (_, mut receiver) = ends(1);
        let length = u32::try_from(MAX_BODY + 1).expect("fits").to_be_bytes();
        assert!(matches!(
            receiver.open(&mut &length[..]),
            Err(SessionError::TooLong(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_refused_or_read_without_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let (_, mut receiver) = ends(1);
            let _ = receiver.open(&mut &bytes[..]);
            if let Ok(hello) = <&[u8; HELLO_LEN]>::try_from(bytes.get(..HELLO_LEN).unwrap_or(&[])) {
                let _ = Hello::decode(hello);
            }
        }
    }
}
