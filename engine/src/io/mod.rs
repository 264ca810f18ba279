//! The kernel's doors: what the packet path and the control plane reach the system through.
//!
//! - [`sys`]: AF_XDP sockets and their UMEM; the only module with `unsafe` code.
//! - [`steer`]: the XDP program that sends VIP traffic to the sockets and the rest to the host.
//! - [`worker`]: the poll loop that drives one socket's rings through the packet core.
//! - [`doorbell`]: how a command or the stop flag wakes a worker that sleeps.
//! - [`host`]: facts read from the host: the interface, its addresses, the neighbour table.

pub mod doorbell;
pub mod host;
pub mod steer;
pub mod sys;
pub mod worker;
