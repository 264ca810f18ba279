//! Loads and attaches the XDP steering program (bpf/steer.c) and keeps its maps current.
//!
//! The program, compiled by clang at build time, redirects frames for VIPs (and ARP requests
//! and Neighbor Solicitations for VIPs) to the AF_XDP socket of their queue and passes everything else to the host. It is
//! attached through a BPF link, so it is detached when the [`Steering`] value is dropped and
//! also when the process dies: a crashed balancer never leaves the interface steering into a
//! socket that no longer exists (the lab test `no_xdp_program_outlives_lbd_however_it_ends`
//! looks with `ip link` after SIGTERM and SIGKILL). On a kernel without BPF links for XDP
//! (before 5.9) aya attaches through netlink instead; dropping [`Steering`] still detaches it
//! (aya's program drop detaches every link it holds, the netlink one included), on every exit
//! path lbd takes, but a SIGKILL there leaves the program until the next lbd replaces it.
//!
//! aya does the loading, map updates and attaching with safe calls; nothing here is `unsafe`.

use aya::maps::{HashMap, MapData, XskMap};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, include_bytes_aligned};
use std::net::IpAddr;
use std::os::fd::AsRawFd;

static STEER_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.o"));

/// A VIP's flag in the program's map: ARP requests for it go to the workers (`VIP_ANSWERS_ARP`
/// in bpf/steer.c).
const VIP_ANSWERS_ARP: u32 = 1;

/// Why the steering program could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// The object could not be loaded (or verified) into the kernel.
    #[error("loading the XDP steering program: {0} (lbd needs root, or CAP_BPF and CAP_NET_ADMIN)")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No mode of attaching to the interface worked.
    #[error("attaching the XDP steering program to {interface}: {source}")]
    Attach {
        /// The interface.
        interface: String,
        /// What the kernel said.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map update failed.
    #[error("updating the {map} map: {source}")]
    Map {
        /// Which map.
        map: &'static str,
        /// What the kernel said.
        #[source]
        source: aya::maps::MapError,
    },
}

/// The steering program's VIP map, as the control side changes it: behind a trait so that the
/// order of map updates and publication, and what a failed update leaves, are unit-tested
/// without a kernel.
pub trait VipSteering: Send {
    /// Steers frames for `vip` to the sockets, ARP requests for it too when `answer_arp` (the
    /// node is not the passive one of a pair); for a VIP already steered, sets that.
    fn add_vip(&mut self, vip: IpAddr, answer_arp: bool) -> Result<(), SteerError>;
    /// Stops steering frames for `vip`.
    fn remove_vip(&mut self, vip: IpAddr) -> Result<(), SteerError>;
    /// Steers real servers' answers to DR probes sent from these addresses of this host (and
    /// no others).
    fn set_probe_sources(&mut self, sources: &[IpAddr]) -> Result<(), SteerError>;
}

/// How the program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (native XDP): needed for zero-copy; veth supports it too.
    Driver,
    /// In the generic (skb) path: works on any interface, copy mode only.
    Generic,
}

/// The attached steering program and its maps. Dropping it detaches the program.
pub struct Steering {
    vips: HashMap<MapData, u32, u32>,
    vips6: HashMap<MapData, [u8; 16], u32>,
    probe4: HashMap<MapData, u32, u32>,
    probe6: HashMap<MapData, [u8; 16], u32>,
    xsks: XskMap<MapData>,
    mode: AttachMode,
    // Declared last: dropped after the maps, it detaches and unloads the program.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Steering {
    /// Loads the program and attaches it to `interface`, in driver mode when the driver
    /// supports it and `allow_generic` decides whether to fall back to the generic path.
    pub fn attach(interface: &str, allow_generic: bool) -> Result<Steering, SteerError> {
        let mut ebpf = Ebpf::load(STEER_OBJECT).map_err(|e| SteerError::Load(Box::new(e)))?;
        let program: &mut Xdp = ebpf
            .program_mut("lbd_steer")
            .ok_or_else(|| SteerError::Load("the object has no lbd_steer program".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| SteerError::Load(Box::new(e)))?;
        program.load().map_err(|e| SteerError::Load(Box::new(e)))?;
        let mode = match program.attach(interface, XdpMode::Driver) {
            Ok(_) => AttachMode::Driver,
            Err(driver_error) if allow_generic => {
                tracing::debug!(%driver_error, "native XDP not available, trying generic");
                program
                    .attach(interface, XdpMode::Skb)
                    .map_err(|source| SteerError::Attach {
                        interface: interface.to_owned(),
                        source,
                    })?;
                AttachMode::Generic
            }
            Err(source) => {
                return Err(SteerError::Attach {
                    interface: interface.to_owned(),
                    source,
                });
            }
        };
        let vips = take_map(&mut ebpf, "lbd_vips")?;
        let vips6 = take_map(&mut ebpf, "lbd_vips6")?;
        let probe4 = take_map(&mut ebpf, "lbd_probe4")?;
        let probe6 = take_map(&mut ebpf, "lbd_probe6")?;
        let xsks = take_map(&mut ebpf, "lbd_xsks")?;
        Ok(Steering {
            vips,
            vips6,
            probe4,
            probe6,
            xsks,
            mode,
            _ebpf: ebpf,
        })
    }

    /// How the program is attached.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Sends frames arriving on `queue` to the AF_XDP socket `socket`.
    pub fn set_socket(&mut self, queue: u32, socket: &impl AsRawFd) -> Result<(), SteerError> {
        self.xsks
            .set(queue, socket.as_raw_fd(), 0)
            .map_err(|source| SteerError::Map {
                map: "lbd_xsks",
                source,
            })
    }
}

impl VipSteering for Steering {
    fn add_vip(&mut self, vip: IpAddr, answer_arp: bool) -> Result<(), SteerError> {
        let flags = if answer_arp { VIP_ANSWERS_ARP } else { 0 };
        // The program compares with the header field as it sits in memory (network order).
        match vip {
            IpAddr::V4(v4) => self
                .vips
                .insert(u32::from_ne_bytes(v4.octets()), flags, 0)
                .map_err(|source| SteerError::Map {
                    map: "lbd_vips",
                    source,
                }),
            IpAddr::V6(v6) => {
                self.vips6
                    .insert(v6.octets(), flags, 0)
                    .map_err(|source| SteerError::Map {
                        map: "lbd_vips6",
                        source,
                    })
            }
        }
    }

    fn set_probe_sources(&mut self, sources: &[IpAddr]) -> Result<(), SteerError> {
        self.set_probe(sources)
    }

    fn remove_vip(&mut self, vip: IpAddr) -> Result<(), SteerError> {
        match vip {
            IpAddr::V4(v4) => {
                self.vips
                    .remove(&u32::from_ne_bytes(v4.octets()))
                    .map_err(|source| SteerError::Map {
                        map: "lbd_vips",
                        source,
                    })
            }
            IpAddr::V6(v6) => self
                .vips6
                .remove(&v6.octets())
                .map_err(|source| SteerError::Map {
                    map: "lbd_vips6",
                    source,
                }),
        }
    }
}

impl Steering {
    fn set_probe(&mut self, sources: &[IpAddr]) -> Result<(), SteerError> {
        let map_error = |map| move |source| SteerError::Map { map, source };
        let old4: Vec<u32> = self.probe4.keys().filter_map(Result::ok).collect();
        for key in old4 {
            self.probe4.remove(&key).map_err(map_error("lbd_probe4"))?;
        }
        let old6: Vec<[u8; 16]> = self.probe6.keys().filter_map(Result::ok).collect();
        for key in old6 {
            self.probe6.remove(&key).map_err(map_error("lbd_probe6"))?;
        }
        for source in sources {
            match source {
                IpAddr::V4(v4) => self
                    .probe4
                    .insert(u32::from_ne_bytes(v4.octets()), 0, 0)
                    .map_err(map_error("lbd_probe4"))?,
                IpAddr::V6(v6) => self
                    .probe6
                    .insert(v6.octets(), 0, 0)
                    .map_err(map_error("lbd_probe6"))?,
            }
        }
        Ok(())
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, SteerError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| SteerError::Load(format!("the object has no {name} map").into()))?;
    M::try_from(map).map_err(|source| SteerError::Map { map: name, source })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_program_has_the_map_sizes_the_config_checks_assume() {
        let source = include_str!("../../bpf/steer.c");
        let define = |name: &str, value: String| format!("#define {name} {value}\n");
        assert!(source.contains(&define("MAX_VIPS", lbd_config::MAX_VIPS.to_string())));
        assert!(source.contains(&define("MAX_QUEUES", lbd_config::MAX_QUEUES.to_string())));
        assert!(source.contains(&define(
            "VIP_ANSWERS_ARP",
            super::VIP_ANSWERS_ARP.to_string()
        )));
    }
}
