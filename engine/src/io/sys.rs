//! The one room where unsafe code lives: AF_XDP sockets and their UMEM, through xsk-rs.
//!
//! [`XskRings`] owns one socket bound to one queue, its UMEM and the four rings, and offers
//! them through the safe [`Rings`] trait that the worker drives. The unsafe contract of the
//! xsk-rs ring and UMEM calls is that a frame descriptor belongs to this UMEM and is in one
//! place at a time (the fill ring, RX, TX, completion, or its holder's hands), and that its
//! bytes are touched only by its holder. Safe code cannot break it: a descriptor leaves this
//! module only inside a [`Frame`], which has no public constructor and is neither `Copy` nor
//! `Clone`, so it is in one place at a time by Rust's own rules; each frame carries the id of
//! the socket it belongs to, and a socket refuses (panics on) a frame of another one.
//!
//! It also holds the socket options nix does not wrap: AF_XDP's TX skb budget, and the peer's
//! supplementary groups on a unix socket (`SO_PEERGROUPS`), which the control socket checks;
//! and the hook that ties a child process (HAProxy) to the thread that started it.
#![expect(
    unsafe_code,
    reason = "xsk-rs ring and UMEM calls, setsockopt(XDP_MAX_TX_SKB_BUDGET) through nix's \
              macro, getsockopt(SO_PEERGROUPS), a child's pre-exec hook"
)]

use crate::io::doorbell::Doorbell;
use crate::io::worker::{Rings, SocketStats};
use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// One UMEM frame of one socket, owned: see the module's contract.
#[derive(Debug)]
pub struct Frame {
    desc: FrameDesc,
    /// [`XskRings::id`] of the socket whose UMEM holds it.
    socket: u32,
}

/// Ids for sockets, so that a frame is never given to a socket it does not belong to.
static NEXT_SOCKET_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// How a socket moves frames between the NIC and the UMEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// The kernel copies frames (works everywhere, veth included).
    Copy,
    /// The NIC DMAs straight into the UMEM (needs driver support and native XDP).
    ZeroCopy,
}

/// Sizes for one socket.
#[derive(Debug, Clone, Copy)]
pub struct XskSettings {
    /// Bytes per UMEM frame (2048 or 4096).
    pub frame_size: u32,
    /// UMEM frames for this socket.
    pub frame_count: u32,
    /// Entries in each of the four rings.
    pub ring_size: u32,
    /// Copy or zero-copy.
    pub mode: CopyMode,
    /// Frames one `sendto` turns into skbs in copy mode (`XDP_MAX_TX_SKB_BUDGET`); 0: the
    /// kernel's default (32).
    pub tx_skb_budget: u32,
}

/// Why a socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("AF_XDP socket on {interface} queue {queue}: {reason}")]
pub struct XskError {
    interface: String,
    queue: u32,
    reason: String,
}

/// One AF_XDP socket with its UMEM and rings.
pub struct XskRings {
    id: u32,
    umem: Umem,
    fill: FillQueue,
    completion: CompQueue,
    rx: RxQueue,
    tx: TxQueue,
    /// Every frame of the UMEM, handed out once by [`XskRings::take_frames`].
    initial_frames: Vec<FrameDesc>,
    /// Descriptors on their way between the rings and [`Frame`]s (ring calls take slices).
    scratch: Vec<FrameDesc>,
}

impl std::fmt::Debug for XskRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XskRings")
            .field("fd", &self.rx.fd().as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl XskRings {
    /// Creates a UMEM and binds a socket to `interface`/`queue`. The XDP program is ours, so
    /// libxdp is told not to load its default one.
    pub fn open(interface: &str, queue: u32, settings: XskSettings) -> Result<XskRings, XskError> {
        let fail = |reason: String| XskError {
            interface: interface.to_owned(),
            queue,
            reason,
        };
        let ring = QueueSize::new(settings.ring_size).map_err(|e| fail(e.to_string()))?;
        let umem_config = UmemConfig::builder()
            .frame_size(FrameSize::new(settings.frame_size).map_err(|e| fail(e.to_string()))?)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let frame_count = NonZeroU32::new(settings.frame_count)
            .ok_or_else(|| fail("frame_count must not be zero".to_owned()))?;
        let (umem, initial_frames) = Umem::new(umem_config, frame_count, false)
            .map_err(|e| fail(format!("creating the UMEM: {e}")))?;
        let bind = match settings.mode {
            CopyMode::Copy => BindFlags::XDP_COPY,
            CopyMode::ZeroCopy => BindFlags::XDP_ZEROCOPY,
        } | BindFlags::XDP_USE_NEED_WAKEUP;
        let socket_config = SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(bind)
            .build();
        let name = Interface::new(
            std::ffi::CString::new(interface).map_err(|e| fail(format!("bad name: {e}")))?,
        );
        // SAFETY: the UMEM was created just above and is not shared with another socket, so
        // libxdp's shared-UMEM double-free case (same queue bound twice without
        // INHIBIT_PROG_LOAD) cannot arise; INHIBIT_PROG_LOAD is set anyway.
        let (tx, rx, rings) = unsafe { Socket::new(socket_config, &umem, &name, queue) }
            .map_err(|e| fail(format!("binding: {e}")))?;
        let (fill, completion) = rings
            .ok_or_else(|| fail("the UMEM's fill and completion rings were missing".into()))?;
        if settings.tx_skb_budget > 0 {
            set_tx_skb_budget(&rx, settings.tx_skb_budget);
        }
        Ok(XskRings {
            id: NEXT_SOCKET_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            umem,
            fill,
            completion,
            rx,
            tx,
            initial_frames,
            scratch: Vec::new(),
        })
    }
}

impl AsRawFd for XskRings {
    /// The socket's file descriptor, for the steering program's XSKMAP.
    fn as_raw_fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }
}

impl XskRings {
    /// Panics on a frame of another socket: a bug in the caller, never input from the wire.
    #[inline]
    fn check(&self, frame: &Frame) {
        assert_eq!(
            frame.socket, self.id,
            "a frame of another AF_XDP socket was given to this one"
        );
    }

    /// Copies the descriptors of `frames` into the scratch buffer, checking that each
    /// belongs here.
    fn stage(&mut self, frames: &[Frame]) {
        self.scratch.clear();
        for frame in frames {
            self.check(frame);
            self.scratch.push(frame.desc);
        }
    }

    /// Wraps the first `count` scratch descriptors as this socket's frames onto `out`.
    fn unstage(&mut self, count: usize, out: &mut Vec<Frame>) {
        let socket = self.id;
        out.extend(
            self.scratch
                .iter()
                .take(count)
                .map(|&desc| Frame { desc, socket }),
        );
    }
}

/// `max` descriptors of `scratch` for a ring to overwrite (it grows, and is not cleared).
fn scratch_of(scratch: &mut Vec<FrameDesc>, max: usize) -> &mut [FrameDesc] {
    if scratch.len() < max {
        scratch.resize(max, FrameDesc::default());
    }
    &mut scratch[..max]
}

impl Rings for XskRings {
    type Frame = Frame;

    fn take_frames(&mut self) -> Vec<Frame> {
        let socket = self.id;
        std::mem::take(&mut self.initial_frames)
            .into_iter()
            .map(|desc| Frame { desc, socket })
            .collect()
    }

    fn reclaim(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        let scratch = scratch_of(&mut self.scratch, max);
        // SAFETY: the completion ring holds descriptors of this UMEM that the kernel is done
        // with; each comes out once, into a new `Frame` that is now their only holder.
        let count = unsafe { self.completion.consume(scratch) };
        self.unstage(count, out);
        count
    }

    fn fill(&mut self, frames: &mut Vec<Frame>, max: usize) -> usize {
        let count = (self.fill.nb_free(max as u32) as usize)
            .min(max)
            .min(frames.len());
        if count == 0 {
            return 0;
        }
        let start = frames.len() - count;
        self.stage(&frames[start..]);
        // SAFETY: each descriptor comes from a `Frame` of this socket (checked), owned by the
        // caller and thus in no ring; the frames produced are dropped from `frames` below, so
        // the kernel is their only holder until RX gives them back.
        let produced = unsafe { self.fill.produce(&self.scratch) };
        frames.truncate(frames.len() - produced);
        if produced > 0 && self.fill.needs_wakeup() {
            // A wakeup failing is not fatal: the next poll retries it.
            let _ = self.fill.wakeup(self.rx.fd_mut(), 0);
        }
        produced
    }

    fn receive(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        let scratch = scratch_of(&mut self.scratch, max);
        // SAFETY: the RX ring holds descriptors of this UMEM that the kernel has filled and
        // handed back; each comes out once, into a new `Frame` that is their only holder.
        let count = unsafe { self.rx.consume(scratch) };
        self.unstage(count, out);
        count
    }

    #[inline]
    fn with_payload<R>(&mut self, frame: &mut Frame, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.check(frame);
        // SAFETY: `frame` is a frame of this UMEM (checked) held by the caller: no ring has it,
        // so the kernel does not touch its bytes, and the `&mut` borrow of the frame excludes
        // any other reference to them while `f` runs.
        let mut data = unsafe { self.umem.data_mut(&mut frame.desc) };
        f(data.contents_mut())
    }

    fn write(&mut self, frame: &mut Frame, bytes: &[u8]) {
        self.check(frame);
        // SAFETY: as in `with_payload`.
        let mut data = unsafe { self.umem.data_mut(&mut frame.desc) };
        let mut cursor = data.cursor();
        cursor.set_pos(0);
        // A frame is at least 2048 bytes and generated frames are 60: the write cannot be short.
        let _ = std::io::Write::write_all(&mut cursor, bytes);
    }

    fn transmit(&mut self, frames: &mut Vec<Frame>) -> usize {
        let count = (self.tx.nb_free(frames.len() as u32) as usize).min(frames.len());
        if count == 0 {
            return 0;
        }
        self.stage(&frames[..count]);
        // SAFETY: as in `fill`: frames of this socket, owned by the caller, in no ring; those
        // produced leave `frames` below until the completion ring gives them back.
        let produced = unsafe { self.tx.produce(&self.scratch) };
        frames.drain(..produced);
        if produced > 0 && self.tx.needs_wakeup() {
            // ENOBUFS/EAGAIN/EBUSY are swallowed by xsk-rs; other errors retry on the next batch.
            let _ = self.tx.wakeup();
        }
        produced
    }

    fn kick(&mut self) {
        if self.tx.needs_wakeup() {
            let _ = self.tx.wakeup();
        }
    }

    fn wait_for_rx(&mut self, timeout_ms: i32, doorbell: &Doorbell) {
        doorbell.wait_with(socket_fd(&self.rx), timeout_ms);
    }

    fn kernel_stats(&self) -> Option<SocketStats> {
        let stats = self.rx.fd().xdp_statistics().ok()?;
        Some(SocketStats {
            rx_dropped: stats.rx_dropped(),
            rx_ring_full: stats.rx_ring_full(),
            fill_ring_empty: stats.rx_fill_ring_empty_descs(),
            rx_invalid: stats.rx_invalid_descs(),
            tx_invalid: stats.tx_invalid_descs(),
            tx_ring_empty: stats.tx_ring_empty_descs(),
        })
    }
}

/// `XDP_MAX_TX_SKB_BUDGET` (Linux 6.17, linux/if_xdp.h; libc does not export it yet).
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

// The macro calls itself and `setsockopt_impl!` by their bare names.
use nix::{setsockopt_impl, sockopt_impl};
sockopt_impl!(
    /// How many frames one `sendto` turns into skbs in copy mode: 32 (the kernel's
    /// `TX_BATCH_SIZE`) up to the TX ring's size.
    TxSkbBudget,
    SetOnly,
    libc::SOL_XDP,
    XDP_MAX_TX_SKB_BUDGET,
    libc::c_int
);

/// The socket's descriptor, borrowed for as long as `rx` (xsk-rs's `Fd` has no `AsFd` of its
/// own).
fn socket_fd(rx: &RxQueue) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the descriptor is the socket's own and stays open while `rx` lives, which the
    // returned borrow cannot outlast.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(rx.fd().as_raw_fd()) }
}

/// Sets the socket's TX skb budget. A kernel before 6.17 does not know the option
/// (ENOPROTOOPT) and keeps sending 32 frames per call, which works as well, only slower: that
/// is logged at debug and nothing else.
fn set_tx_skb_budget(rx: &RxQueue, budget: u32) {
    let value = libc::c_int::try_from(budget).unwrap_or(libc::c_int::MAX);
    match nix::sys::socket::setsockopt(&socket_fd(rx), TxSkbBudget, &value) {
        Ok(()) => tracing::debug!(budget, "AF_XDP TX skb budget set"),
        Err(nix::errno::Errno::ENOPROTOOPT | nix::errno::Errno::EINVAL) => {
            tracing::debug!(
                budget,
                "this kernel has no XDP_MAX_TX_SKB_BUDGET; keeping its 32"
            );
        }
        Err(error) => {
            tracing::warn!(budget, %error, "XDP_MAX_TX_SKB_BUDGET refused; keeping the kernel's");
        }
    }
}

/// `SO_PEERGROUPS` (Linux 4.13) from asm-generic/socket.h (libc does not export it). Alpha,
/// MIPS, PA-RISC and SPARC number it differently: lbd does not build there.
#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "x86",
    target_arch = "arm",
    target_arch = "riscv64"
))]
const SO_PEERGROUPS: libc::c_int = 59;
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "x86",
    target_arch = "arm",
    target_arch = "riscv64"
)))]
compile_error!(
    "SO_PEERGROUPS has another number on this architecture: add it in engine/src/io/sys.rs"
);

/// The supplementary groups of the process at the other end of a connected unix socket, as
/// the kernel recorded them when it connected (`SO_PEERGROUPS`): a fact of the connection,
/// which the peer cannot change afterwards, unlike anything read from /proc by its pid.
pub fn peer_groups(socket: &impl AsFd) -> io::Result<Vec<u32>> {
    let fd = socket.as_fd().as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let capacity = groups.len() * std::mem::size_of::<libc::gid_t>();
        let mut len = libc::socklen_t::try_from(capacity).map_err(io::Error::other)?;
        // SAFETY: `fd` is a valid descriptor borrowed for the call; the kernel writes at most
        // `len` bytes into `groups`, which holds exactly that many, and stores the size it
        // wrote (or needs) in `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed.min(groups.len()));
            return Ok(groups);
        }
        let error = io::Error::last_os_error();
        // Too small: the kernel said how much it needs (at most NGROUPS_MAX = 65536 groups).
        if error.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65_536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(error);
    }
}

/// Makes the child that `command` starts receive SIGTERM when the thread that starts it ends
/// (`PR_SET_PDEATHSIG`): lbd killed, even by SIGKILL, leaves no HAProxy running behind it.
/// Start it from a thread that lives as long as the child should.
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: prctl is a plain system call, and the hook touches no memory of the
    // parent's (no allocation, no lock).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
