//! lbd's engine: a Layer-4 load balancer in Direct Routing mode, in userspace on AF_XDP
//! sockets. Three rooms, and the daemon that wires them:
//!
//! - [`packet`]: the packet path's core, with no I/O: classify a frame, choose a real server,
//!   rewrite in place; the tables it keeps and the configuration view it reads.
//! - [`io`]: the kernel's doors: AF_XDP sockets (the only `unsafe` code), the XDP steering
//!   program, the worker loop that drives a socket's rings through the packet core, and the
//!   host's facts (interface, addresses, neighbour table).
//! - [`control`]: the running configuration and its live changes, the control socket, the
//!   health checks.
//! - [`ha`]: the active/passive pair: heartbeat, state and configuration sync.
//! - [`l7`]: the `mode = "snat"` services, through HAProxy.
//! - [`http`]: the HTTP listener: `/metrics` for Prometheus.
//! - [`daemon`]: start-up, the workers' threads, signals and shutdown.
//!
//! `ha`, `l7` and `http` sit beside `control`: each reads what the
//! control plane holds and changes the packet path only through it.

pub mod control;
pub mod daemon;
pub mod ha;
pub mod http;
pub mod io;
pub mod l7;
pub mod packet;
