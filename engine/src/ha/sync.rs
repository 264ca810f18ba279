//! The sync streams as they run: every node sends its shared entries and, while active, its
//! configuration to every peer over a TCP stream it opens to the peer's `sync_port`
//! ([`crate::ha::session`]), and takes the peers' streams in on its own. Designed for a group,
//! not only a pair: each stream carries one node's entries one way, and a node with N peers
//! runs N streams out and takes N in.
//!
//! - One sending thread drains the workers' outboxes into `Entries` frames for every
//!   connected peer, sends a `Replica` of the configuration when it changes and every second
//!   while this node is active (a passive peer adopts it; an unchanged one costs nothing), and
//!   a keepalive when idle. A stream that fails is dropped and opened again with backoff;
//!   each new stream makes every worker walk its tables at once (a full dump).
//! - One listening thread accepts connections from the configured peers' addresses only, and
//!   one thread per peer reads its stream: entries go to every worker as `Install` batches
//!   (the workers' tables are their own; a worker with a backlog skips the batch, which the
//!   peer's next refresh makes good), replicas to [`Control::adopt`]. A peer's new stream
//!   replaces its old one once authenticated.
//!
//! Nothing here blocks the packet path: workers only push into their bounded outboxes and
//! take install batches between frames.

use crate::control::Control;
use crate::control::replica::Replica;
use crate::ha::session::{
    self, CHALLENGE_LEN, HELLO_LEN, Hello, Kind, SessionError, Stream, challenge, check_challenge,
};
use crate::io::worker::{WorkerCommand, WorkerSender};
use crate::packet::sync::{OUTBOX_CAPACITY, Outbox, RECORD_LEN, SyncEntry};
use crossbeam::queue::ArrayQueue;
use lbd_config::Ha;
use lbd_proto::{HaSyncLink, HaSyncReport};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Entries per frame at most: about 100 KB.
const ENTRIES_PER_FRAME: usize = 4096;
/// How long a stream's opening may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// A write that takes longer ends the stream (the peer is gone or cannot keep up).
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// A stream silent for longer is dead (the sender keeps it alive every [`KEEPALIVE`]).
const IDLE_LIMIT: Duration = Duration::from_secs(3);
/// Quiet streams carry a keepalive this often.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// The active node's configuration goes out at least this often.
const REPLICA_REFRESH: Duration = Duration::from_secs(1);
/// How often the threads look at the stop flag while they wait.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait between attempts to open a stream to a peer that is away.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Install batches a worker may have waiting before further ones skip it.
const MAX_INSTALL_BACKLOG: usize = 64;

/// What the workers share with the sync threads: their outboxes' queues, and the counter
/// that asks them all for a full walk.
#[derive(Debug, Clone)]
pub struct SyncParts {
    queues: Vec<Arc<ArrayQueue<SyncEntry>>>,
    dumps: Arc<AtomicU64>,
}

impl SyncParts {
    /// Queues for `workers` workers.
    pub fn new(workers: usize) -> SyncParts {
        SyncParts {
            queues: (0..workers)
                .map(|_| Arc::new(ArrayQueue::new(OUTBOX_CAPACITY)))
                .collect(),
            dumps: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Worker `index`'s outbox.
    pub fn outbox(&self, index: usize) -> Option<Outbox> {
        let queue = self.queues.get(index)?;
        Some(Outbox::new(Arc::clone(queue), Arc::clone(&self.dumps)))
    }
}

/// The running sync threads.
#[derive(Debug)]
pub struct Sync {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    report: Arc<Mutex<HaSyncReport>>,
}

/// What every sync thread needs.
struct Context {
    key: Vec<u8>,
    local: Ipv4Addr,
    peers: Vec<Ipv4Addr>,
    port: u16,
    control: Arc<Mutex<Control>>,
    report: Arc<Mutex<HaSyncReport>>,
    stop: Arc<AtomicBool>,
}

impl Context {
    fn count(&self, update: impl FnOnce(&mut HaSyncReport)) {
        if let Ok(mut report) = self.report.lock() {
            update(&mut report);
        }
    }

    fn link(&self, peer: Ipv4Addr, update: impl FnOnce(&mut HaSyncLink)) {
        self.count(|report| {
            if let Some(link) = report.links.iter_mut().find(|l| l.peer == peer) {
                update(link);
            }
        });
    }
}

impl Sync {
    /// Listens on `ha.local_address:sync_port` and starts sending to every peer. The workers
    /// must be attached to `control` already: their command channels take the installs.
    pub fn start(
        ha: &Ha,
        key: Vec<u8>,
        control: Arc<Mutex<Control>>,
        parts: SyncParts,
    ) -> std::io::Result<Sync> {
        let address = SocketAddrV4::new(ha.local_address, ha.sync_port);
        let listener = TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let installs: Vec<WorkerSender> = control
            .lock()
            .map_err(|_| std::io::Error::other("control lock poisoned"))?
            .workers()
            .iter()
            .map(|worker| worker.commands.clone())
            .collect();
        let report = Arc::new(Mutex::new(HaSyncReport {
            links: ha
                .peer_address
                .0
                .iter()
                .map(|&peer| HaSyncLink {
                    peer,
                    sending: false,
                    receiving: false,
                })
                .collect(),
            ..HaSyncReport::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let context = Arc::new(Context {
            key,
            local: ha.local_address,
            peers: ha.peer_address.0.clone(),
            port: ha.sync_port,
            control,
            report: Arc::clone(&report),
            stop: Arc::clone(&stop),
        });
        let sender = {
            let (context, workers) = (Arc::clone(&context), installs.clone());
            std::thread::Builder::new()
                .name("lbd-sync-out".to_owned())
                .spawn(move || send_loop(&context, &parts, &workers))?
        };
        let receiver = std::thread::Builder::new()
            .name("lbd-sync-in".to_owned())
            .spawn(move || accept_loop(&context, &listener, &installs))?;
        Ok(Sync {
            stop,
            threads: vec![sender, receiver],
            report,
        })
    }

    /// Where the threads keep the streams' state and counters.
    pub fn report(&self) -> Arc<Mutex<HaSyncReport>> {
        Arc::clone(&self.report)
    }
}

impl Drop for Sync {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A stream to one peer.
struct Outgoing {
    peer: Ipv4Addr,
    open: Option<(TcpStream, Stream)>,
    retry_at: Instant,
    backoff: Duration,
}

/// Opens a stream to `peer` from `local` and completes the handshake.
fn connect(context: &Context, peer: Ipv4Addr) -> Result<(TcpStream, Stream), SessionError> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // The peer accepts streams from its configured peers' addresses only.
    socket.bind(&SocketAddr::from(SocketAddrV4::new(context.local, 0)).into())?;
    socket.connect_timeout(
        &SocketAddr::from(SocketAddrV4::new(peer, context.port)).into(),
        CONNECT_TIMEOUT,
    )?;
    let mut tcp: TcpStream = socket.into();
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    tcp.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let hello = Hello {
        sender: context.local,
        nonce: session::nonce()?,
    };
    tcp.write_all(&hello.encode())?;
    let mut answer = [0u8; CHALLENGE_LEN];
    tcp.read_exact(&mut answer)?;
    let nonce = check_challenge(&context.key, &hello, &answer)?;
    Ok((tcp, Stream::new(&context.key, &hello, nonce)))
}

fn send_loop(context: &Context, parts: &SyncParts, workers: &[WorkerSender]) {
    let now = Instant::now();
    let mut links: Vec<Outgoing> = context
        .peers
        .iter()
        .map(|&peer| Outgoing {
            peer,
            open: None,
            retry_at: now,
            backoff: Duration::from_millis(100),
        })
        .collect();
    let mut records: Vec<u8> = Vec::with_capacity(ENTRIES_PER_FRAME * RECORD_LEN);
    let mut replica_sent: Option<(u64, Instant)> = None;
    let mut last_sent = now;
    while !context.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut opened = false;
        for link in &mut links {
            if link.open.is_some() || now < link.retry_at {
                continue;
            }
            match connect(context, link.peer) {
                Ok(open) => {
                    tracing::info!(peer = %link.peer, "sync stream to the peer open");
                    link.open = Some(open);
                    link.backoff = Duration::from_millis(100);
                    context.link(link.peer, |l| l.sending = true);
                    opened = true;
                }
                Err(error) => {
                    tracing::debug!(peer = %link.peer, %error, "sync stream to the peer not open");
                    if matches!(error, SessionError::BadMac | SessionError::Malformed) {
                        context.count(|r| r.rejected += 1);
                    }
                    link.retry_at = now + link.backoff;
                    link.backoff = (link.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if opened {
            // Everything this node carries, to the new stream (and again to the others).
            parts.dumps.fetch_add(1, Ordering::Relaxed);
            // A sleeping worker starts its walk now, not at the end of its sleep.
            for worker in workers {
                worker.wake();
            }
            replica_sent = None;
        }
        let connected = links.iter().any(|l| l.open.is_some());

        records.clear();
        let mut entries = 0u64;
        for queue in &parts.queues {
            while records.len() < ENTRIES_PER_FRAME * RECORD_LEN {
                let Some(entry) = queue.pop() else { break };
                entry.encode_into(&mut records);
                entries += 1;
            }
        }
        if entries > 0 {
            if connected {
                send_all(context, &mut links, Kind::Entries, &records);
                context.count(|r| r.entries_sent += entries);
                last_sent = now;
            } else {
                context.count(|r| r.unsent += entries);
            }
        }

        if connected && let Some(replica) = replica_due(context, replica_sent, now) {
            let (generation, replica) = replica;
            match serde_json::to_vec(&replica) {
                Ok(json) => {
                    send_all(context, &mut links, Kind::Replica, &json);
                    context.count(|r| r.configs_sent += 1);
                    replica_sent = Some((generation, now));
                    last_sent = now;
                }
                Err(error) => tracing::error!(%error, "the configuration cannot be encoded"),
            }
        }
        if connected && now.duration_since(last_sent) >= KEEPALIVE {
            send_all(context, &mut links, Kind::Keepalive, &[]);
            last_sent = now;
        }
        if entries == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The configuration to send now, with the snapshot generation it is of: when this node is
/// active and it changed, or a refresh is due. `None` while control is busy (next loop).
fn replica_due(
    context: &Context,
    sent: Option<(u64, Instant)>,
    now: Instant,
) -> Option<(u64, Replica)> {
    let control = context.control.try_lock().ok()?;
    if !control.answers_arp() {
        return None;
    }
    let generation = control.snapshot().generation;
    let due = sent
        .is_none_or(|(last, at)| last != generation || now.duration_since(at) >= REPLICA_REFRESH);
    due.then(|| (generation, control.replica()))
}

/// Sends one frame on every open stream; a stream that fails is closed for a retry.
fn send_all(context: &Context, links: &mut [Outgoing], kind: Kind, payload: &[u8]) {
    for link in links.iter_mut() {
        let Some((tcp, stream)) = &mut link.open else {
            continue;
        };
        if let Err(error) = tcp.write_all(&stream.seal(kind, payload)) {
            tracing::warn!(peer = %link.peer, %error, "sync stream to the peer lost");
            link.open = None;
            link.retry_at = Instant::now() + link.backoff;
            context.link(link.peer, |l| l.sending = false);
        }
    }
}

fn accept_loop(context: &Arc<Context>, listener: &TcpListener, installs: &[WorkerSender]) {
    // Per peer: the number of its newest stream; an older stream's reader stops.
    let newest: Arc<Mutex<std::collections::HashMap<Ipv4Addr, u64>>> = Arc::default();
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    let mut count = 0u64;
    while !context.stop.load(Ordering::Relaxed) {
        readers.retain(|reader| !reader.is_finished());
        let (tcp, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "sync listener");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let SocketAddr::V4(from) = from else {
            continue;
        };
        // Only the peers' addresses, and a bounded number of readers at once.
        if !context.peers.contains(from.ip()) || readers.len() >= 2 * context.peers.len() + 2 {
            context.count(|r| r.rejected += 1);
            tracing::warn!(%from, "sync connection refused: not a peer, or too many");
            continue;
        }
        count += 1;
        let (context, newest, installs) =
            (Arc::clone(context), Arc::clone(&newest), installs.to_vec());
        let spawned = std::thread::Builder::new()
            .name("lbd-sync-peer".to_owned())
            .spawn(move || {
                let peer = *from.ip();
                let result = read_stream(&context, tcp, peer, count, &newest, &installs);
                let current = newest
                    .lock()
                    .map(|n| n.get(&peer) == Some(&count))
                    .unwrap_or(false);
                if current {
                    context.link(peer, |l| l.receiving = false);
                }
                match result {
                    Ok(()) => {}
                    Err(error @ (SessionError::BadMac | SessionError::Malformed)) => {
                        context.count(|r| r.rejected += 1);
                        tracing::warn!(%peer, %error, "sync stream from the peer refused");
                    }
                    Err(error) => tracing::info!(%peer, %error, "sync stream from the peer ended"),
                }
            });
        if let Ok(reader) = spawned {
            readers.push(reader);
        }
    }
    for reader in readers {
        let _ = reader.join();
    }
}

/// Reads one peer's stream until it ends, fails, is replaced or lbd stops.
fn read_stream(
    context: &Context,
    mut tcp: TcpStream,
    peer: Ipv4Addr,
    number: u64,
    newest: &Mutex<std::collections::HashMap<Ipv4Addr, u64>>,
    installs: &[WorkerSender],
) -> Result<(), SessionError> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    tcp.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut hello = [0u8; HELLO_LEN];
    tcp.read_exact(&mut hello)?;
    let hello = Hello::decode(&hello)?;
    if hello.sender != peer {
        return Err(SessionError::Malformed);
    }
    let nonce = session::nonce()?;
    tcp.write_all(&challenge(&context.key, &hello, nonce))?;
    let mut stream = Stream::new(&context.key, &hello, nonce);
    let mut authenticated = false;
    // A refused configuration comes again every second: logged once until it changes.
    let mut refusal: Option<String> = None;
    let mut heard = Instant::now();
    loop {
        if context.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if authenticated
            && newest
                .lock()
                .map(|n| n.get(&peer) != Some(&number))
                .unwrap_or(true)
        {
            return Ok(());
        }
        // Wait for the next frame in short steps (to see the stop flag), then read it whole.
        tcp.set_read_timeout(Some(POLL))?;
        match tcp.peek(&mut [0u8; 1]) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if heard.elapsed() > IDLE_LIMIT {
                    return Err(SessionError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the peer's stream went silent",
                    )));
                }
                continue;
            }
            Err(error) => return Err(error.into()),
        }
        tcp.set_read_timeout(Some(IDLE_LIMIT))?;
        let (kind, payload) = stream.open(&mut tcp)?;
        heard = Instant::now();
        if !authenticated {
            // The first authentic frame: this stream is the peer's from now on.
            authenticated = true;
            if let Ok(mut newest) = newest.lock() {
                newest.insert(peer, number);
            }
            context.link(peer, |l| l.receiving = true);
            tracing::info!(%peer, "sync stream from the peer open");
        }
        match kind {
            Kind::Entries => install(context, &payload, installs)?,
            Kind::Replica => adopt(context, peer, &payload, &mut refusal)?,
            Kind::Keepalive => {}
        }
    }
}

/// Hands a frame's entries to every worker.
fn install(
    context: &Context,
    payload: &[u8],
    installs: &[WorkerSender],
) -> Result<(), SessionError> {
    if !payload.len().is_multiple_of(RECORD_LEN) {
        return Err(SessionError::Malformed);
    }
    let (entries, malformed) = SyncEntry::decode_all(payload);
    let received = entries.len() + malformed;
    let entries: Arc<[SyncEntry]> = entries.into();
    let mut skipped = 0u64;
    for worker in installs {
        if worker.backlog() >= MAX_INSTALL_BACKLOG
            || worker
                .send(WorkerCommand::Install(Arc::clone(&entries)))
                .is_err()
        {
            skipped += entries.len() as u64;
        }
    }
    context.count(|r| {
        r.entries_received += received as u64;
        r.entries_kept_out += skipped + malformed as u64;
    });
    Ok(())
}

/// Hands the active node's configuration to control; `refusal` is the last refusal logged.
fn adopt(
    context: &Context,
    peer: Ipv4Addr,
    payload: &[u8],
    refusal: &mut Option<String>,
) -> Result<(), SessionError> {
    let replica: Replica = serde_json::from_slice(payload).map_err(|error| {
        tracing::warn!(%peer, %error, "the peer's configuration cannot be read");
        SessionError::Malformed
    })?;
    let Ok(mut control) = context.control.lock() else {
        return Ok(());
    };
    match control.adopt(peer, replica) {
        Ok(adopted) => {
            if adopted {
                context.count(|r| r.configs_adopted += 1);
            }
            *refusal = None;
        }
        Err(error) => {
            let error = error.to_string();
            if refusal.as_deref() != Some(error.as_str()) {
                tracing::error!(%peer, %error, "the active node's configuration refused");
                *refusal = Some(error);
            }
        }
    }
    Ok(())
}
