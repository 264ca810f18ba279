//! The active/passive pair: which node answers ARP for the VIPs.
//!
//! - [`wire`]: the heartbeat datagram, authenticated with the pair's key, ordered against
//!   replay.
//! - [`machine`]: the rules of who is active, as a state machine with no I/O.
//! - [`session`]: the sync stream's handshake and authenticated frames.
//! - [`sync`]: the sync streams as they run: entries both ways, the active's configuration.
//!
//! Being active changes one thing on the packet path: whether the XDP program hands ARP
//! requests for the VIPs to the workers (which answer them) or to the host (which does not).
//! A passive node forwards every VIP frame that still reaches it exactly as the active one
//! would.

pub mod machine;
pub mod node;
pub mod session;
pub mod sync;
pub mod wire;
