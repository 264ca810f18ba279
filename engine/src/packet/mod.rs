//! The packet path's core: no I/O, no clock, no syscalls. A worker hands it frames, the time
//! and its buffers (as quinn-proto's `Endpoint` takes them), so every rule is a unit test on
//! byte arrays.
//!
//! - [`dataplane`]: classify, choose a real server, rewrite in place.
//! - [`drcheck`]: other stations speaking for a VIP, and the probes of real servers.
//! - [`flows`]: the per-worker connection, persistence and fragment tables.
//! - [`ipv6`]: IPv6 headers read in place, and the Neighbor Discovery and echo answers.
//! - [`maglev`]: the consistent-hash tables real servers are looked up in.
//! - [`snapshot`]: the immutable configuration view the packet path reads.
//! - [`counters`]: per-worker counters, every frame in exactly one.
//! - [`sync`]: the entries a group of balancers shares, and how they are walked and installed.
//! - [`testing`]: frames as hosts send them, for the unit tests and the benchmarks.

pub mod counters;
pub mod dataplane;
pub mod drcheck;
pub mod flows;
pub mod ipv6;
pub mod maglev;
pub mod snapshot;
pub mod sync;
pub mod testing;
