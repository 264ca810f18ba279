//! The control socket: a unix stream socket where `lbctl` sends one JSON request per line.
//!
//! - Created mode 0600 (root only), or 0660 and owned by `engine.control_group` when set; the
//!   peer's credentials are checked on every connection, from the connection itself (the
//!   kernel's SO_PEERCRED and SO_PEERGROUPS, fixed when the peer connected): root and lbd's own
//!   user get [`Role::Root`], a member of the control group [`Role::Operator`]. A path that
//!   exists and is not a socket is refused, never removed.
//! - One thread per client, so a client stuck half-way through a request holds up nobody
//!   else; a client silent for [`IDLE_TIMEOUT`] is disconnected, and one that does not read
//!   its replies for [`WRITE_TIMEOUT`] too. At most [`MAX_CLIENTS`] at once, of which
//!   [`MAX_CLIENTS_PER_USER`] per user other than root and [`RESERVED_FOR_ROOT`] are kept for
//!   root: no other user can lock root out.
//! - A line longer than [`MAX_REQUEST_BYTES`] gets an error and the connection is closed (the
//!   rest of such a line cannot be trusted to be a request); malformed JSON, unknown commands
//!   and wrong types get an error reply and the connection stays usable.

use crate::control::{Control, Role};
use crate::io::doorbell::Doorbell;
use lbd_proto::{MAX_REQUEST_BYTES, Response, decode_request, encode_line};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Group, Uid};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// Clients served at once; more are told to come back later.
pub const MAX_CLIENTS: usize = 32;
/// Of those, kept for root: however many connections other users hold, root gets in.
pub const RESERVED_FOR_ROOT: usize = 8;
/// Connections one user other than root may hold at once.
pub const MAX_CLIENTS_PER_USER: usize = 8;
/// A client that sends nothing for this long is disconnected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that does not take a reply within this long is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another lbd answers on the socket.
    #[error("{0}: another lbd is already listening there")]
    InUse(PathBuf),
    /// The control group does not exist.
    #[error("engine.control_group: no group named {0:?}")]
    NoGroup(String),
    /// The path holds something that is not a socket.
    #[error(
        "engine.control_socket: {0} exists and is not a socket; lbd removes only a socket it left \
         behind (move the file away or choose another path)"
    )]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("control socket {path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// The listening socket and its accept thread; removes the socket file when dropped.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    /// Wakes the accept thread to see `stop`.
    bell: Arc<Doorbell>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` and serves requests on `control` until dropped.
    pub fn start(
        path: &Path,
        group: Option<&str>,
        control: Arc<Mutex<Control>>,
    ) -> Result<ControlServer, ServerError> {
        let io = |what: &'static str| {
            let path = path.to_owned();
            move |source| ServerError::Io { path, what, source }
        };
        let group_id = match group {
            Some(name) => Some(
                Group::from_name(name)
                    .map_err(|e| io("looking up the control group")(e.into()))?
                    .ok_or_else(|| ServerError::NoGroup(name.to_owned()))?
                    .gid,
            ),
            None => None,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("creating its directory"))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(metadata) if !metadata.file_type().is_socket() => {
                return Err(ServerError::NotASocket(path.to_owned()));
            }
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ServerError::InUse(path.to_owned()));
                }
                // A socket left behind by an lbd that did not stop cleanly.
                std::fs::remove_file(path).map_err(io("removing a stale socket"))?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io("looking at the path")(error)),
        }
        // The socket is born with its mode (the umask, for the bind alone: no other thread
        // creates files while lbd starts) and given to the group without following a link, so
        // nothing swapped in at the path in between can be changed through it.
        let mode = if group_id.is_some() { 0o660 } else { 0o600 };
        let umask = Mode::from_bits_truncate(0o777 & !mode);
        let before = nix::sys::stat::umask(umask);
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(before);
        let listener = bound.map_err(io("binding"))?;
        if let Some(gid) = group_id {
            std::os::unix::fs::lchown(path, None, Some(gid.as_raw()))
                .map_err(io("giving it to the control group"))?;
        }
        listener
            .set_nonblocking(true)
            .map_err(io("making it non-blocking"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let bell = Arc::new(Doorbell::new().map_err(io("creating its doorbell (eventfd)"))?);
        let thread = {
            let (stop, bell) = (Arc::clone(&stop), Arc::clone(&bell));
            std::thread::Builder::new()
                .name("lbd-control".to_owned())
                .spawn(move || accept_loop(&listener, &stop, &bell, &control, group_id))
                .map_err(io("starting its thread"))?
        };
        tracing::info!(socket = %path.display(), mode = format!("{mode:o}"), "control socket ready");
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            bell,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.bell.ring();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Only the socket: whatever else may have been put at the path since is left alone.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Connections open now: in all, and per user.
#[derive(Debug, Default)]
struct Clients {
    total: usize,
    per_user: HashMap<u32, usize>,
}

impl Clients {
    /// Takes a slot for a client of `uid` with `role`, or says why there is none.
    fn admit(&mut self, uid: u32, role: Role) -> Result<(), &'static str> {
        let limit = match role {
            Role::Root => MAX_CLIENTS,
            Role::Operator => MAX_CLIENTS - RESERVED_FOR_ROOT,
        };
        if self.total >= limit {
            return Err("too many control clients; try again");
        }
        let mine = self.per_user.entry(uid).or_default();
        if role == Role::Operator && *mine >= MAX_CLIENTS_PER_USER {
            return Err("too many control connections from this user; close some and try again");
        }
        *mine += 1;
        self.total += 1;
        Ok(())
    }

    fn leave(&mut self, uid: u32) {
        self.total -= 1;
        if let Some(mine) = self.per_user.get_mut(&uid) {
            *mine -= 1;
            if *mine == 0 {
                self.per_user.remove(&uid);
            }
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    stop: &AtomicBool,
    bell: &Doorbell,
    control: &Arc<Mutex<Control>>,
    group: Option<Gid>,
) {
    let clients = Arc::new(Mutex::new(Clients::default()));
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                // Asleep until a client connects or the server stops: no wake-ups when idle.
                bell.going_to_sleep();
                if !stop.load(Ordering::Relaxed) {
                    bell.wait_with(listener.as_fd(), -1);
                }
                bell.awake();
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a control connection");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let (uid, role) = match authorize(&stream, group) {
            Ok(peer) => peer,
            Err(reason) => {
                tracing::warn!(%reason, "control connection refused");
                refuse(stream, &reason);
                continue;
            }
        };
        let admitted = match clients.lock() {
            Ok(mut clients) => clients.admit(uid, role),
            Err(_) => Err("lbd's control state is unusable; restart lbd"),
        };
        if let Err(reason) = admitted {
            tracing::warn!(uid, reason, "control connection refused");
            refuse(stream, reason);
            continue;
        }
        // Client threads are not joined at stop; a weak reference lets the control state (and
        // with it the XDP program) go when the daemon drops it, whatever clients are connected.
        let control = Arc::downgrade(control);
        let count = Arc::clone(&clients);
        let leave = move || {
            if let Ok(mut clients) = count.lock() {
                clients.leave(uid);
            }
        };
        let spawned = std::thread::Builder::new()
            .name("lbd-client".to_owned())
            .spawn({
                let leave = leave.clone();
                move || {
                    serve_client(stream, &control, role);
                    leave();
                }
            });
        if spawned.is_err() {
            leave();
        }
    }
}

fn refuse(mut stream: UnixStream, reason: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(encode_line(&Response::error(reason)).as_bytes());
}

/// The peer's uid and role: root and lbd's own user are [`Role::Root`], a member of the
/// control group (by its primary or a supplementary group) [`Role::Operator`].
fn authorize(stream: &UnixStream, group: Option<Gid>) -> Result<(u32, Role), String> {
    let credentials = getsockopt(stream, PeerCredentials)
        .map_err(|e| format!("reading peer credentials: {e}"))?;
    let uid = Uid::from_raw(credentials.uid());
    if uid.is_root() || uid == Uid::effective() {
        return Ok((uid.as_raw(), Role::Root));
    }
    if let Some(gid) = group {
        let groups = crate::io::sys::peer_groups(stream)
            .map_err(|e| format!("reading the peer's groups: {e}"))?;
        if credentials.gid() == gid.as_raw() || groups.contains(&gid.as_raw()) {
            return Ok((uid.as_raw(), Role::Operator));
        }
    }
    Err(format!(
        "permission denied: uid {uid} is not root{}",
        if group.is_some() {
            " and not in the control group"
        } else {
            " (set engine.control_group to let a group in)"
        }
    ))
}

fn serve_client(stream: UnixStream, control: &Weak<Mutex<Control>>, role: Role) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        // One byte past the limit tells an oversized line from one that just fits.
        let read = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 2)
            .read_until(b'\n', &mut line);
        match read {
            // The client closed (or timed out, or vanished): nothing more to do.
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        } else if line.len() <= MAX_REQUEST_BYTES {
            // End of stream in the middle of a request: the client went away half-way.
            return;
        }
        if line.len() > MAX_REQUEST_BYTES {
            let response = Response::error(format!(
                "request over the limit of {MAX_REQUEST_BYTES} bytes; closing the connection"
            ));
            let _ = writer.write_all(encode_line(&response).as_bytes());
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let response = match decode_request(&line) {
            Ok(request) => match control.upgrade() {
                None => Response::error("lbd is stopping"),
                Some(control) => match control.lock() {
                    Ok(mut control) => control.handle(request.command, role),
                    Err(_) => Response::error("lbd's control state is unusable; restart lbd"),
                },
            },
            Err(message) => Response::error(message),
        };
        // A client that does not read its replies is dropped once the write times out.
        if writer.write_all(encode_line(&response).as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_user_can_take_the_slots_kept_for_root() {
        let mut clients = Clients::default();
        // Three operators take what they may: 8 each, then 24 in all.
        for uid in [1000, 1001, 1002] {
            for _ in 0..MAX_CLIENTS_PER_USER {
                assert_eq!(clients.admit(uid, Role::Operator), Ok(()));
            }
            assert!(clients.admit(uid, Role::Operator).is_err());
        }
        assert_eq!(clients.total, MAX_CLIENTS - RESERVED_FOR_ROOT);
        assert_eq!(
            clients.admit(1003, Role::Operator),
            Err("too many control clients; try again")
        );
        // Root still gets in, up to the total.
        for _ in 0..RESERVED_FOR_ROOT {
            assert_eq!(clients.admit(0, Role::Root), Ok(()));
        }
        assert!(clients.admit(0, Role::Root).is_err());
        // A slot freed is a slot again.
        clients.leave(1000);
        assert!(clients.admit(1003, Role::Root).is_ok());
        assert_eq!(
            clients.per_user.get(&1000),
            Some(&(MAX_CLIENTS_PER_USER - 1))
        );
    }
}
