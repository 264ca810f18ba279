//! The control protocol between `lbctl` and `lbd`: one JSON request per line over a unix socket,
//! one JSON response per line. Empty until the control socket lands; the crate exists so that
//! the daemon and the CLI share one definition of every message from the start.
