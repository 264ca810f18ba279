//! lbd's engine: a Layer-4 Direct Routing load balancer in userspace on AF_XDP sockets.
//!
//! - [`dataplane`]: classify, choose a real server, rewrite in place; no I/O.
//! - [`flows`]: per-worker connection and persistence tables.
//! - [`health`]: health checks and their rise/fall state machine.
//! - [`maglev`]: the consistent-hash tables the dataplane looks real servers up in.
//! - [`snapshot`]: the immutable configuration view the packet path reads.
//! - [`worker`]: the poll loop that drives one queue's rings through the dataplane.
//! - [`steer`]: the XDP program that sends VIP traffic to the sockets and the rest to the host.
//! - [`sys`]: AF_XDP sockets and UMEM; the only module with `unsafe` code.
//! - [`host`]: facts read from the host: interface MAC and queues, the neighbour table.
//! - [`control`]: the running config and live changes; [`server`]: the control socket.
//! - [`daemon`]: start-up, the workers' threads, signals and shutdown.

pub mod control;
pub mod counters;
pub mod daemon;
pub mod dataplane;
pub mod flows;
pub mod health;
pub mod host;
pub mod maglev;
pub mod server;
pub mod snapshot;
pub mod steer;
pub mod sys;
pub mod worker;
