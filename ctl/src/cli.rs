//! `lbctl`'s command line: clap definitions and their translation into protocol commands.
//! Values are parsed with the config crate's own parsers, so `lbctl` rejects what the config
//! file would reject, with the same words, before anything reaches the daemon.

use crate::dr_setup::Method;
use clap::{Args, Parser, Subcommand};
use lbd_config::{
    Layer7Protocol, MacAddr, Persistence, PortSet, Protocol, RealServer, Service, ServiceMode,
};
use lbd_proto::{Command, RealServerChanges, ServiceChanges};
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;

/// Control a running lbd over its unix socket.
#[derive(Debug, Parser)]
#[command(name = "lbctl", version, about)]
pub struct Cli {
    /// lbd's control socket.
    #[arg(
        long,
        env = "LBCTL_SOCKET",
        default_value = "/run/lbd/lbd.sock",
        global = true
    )]
    pub socket: PathBuf,
    /// Print the reply as JSON (for scripts) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Verb,
}

fn parse_ports(text: &str) -> Result<PortSet, String> {
    text.parse()
}

/// The commands: the protocol's own (`Command`, parsed straight into), and those whose
/// command line builds what they send.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// status, stats, edit-vip, del-vip, edit-rip, del-rip, set-weight, drain, halt, online,
    /// reload.
    #[command(flatten)]
    Protocol(Command),
    /// Add a virtual service.
    AddVip {
        /// The service's label.
        label: String,
        /// Its virtual IP, IPv4 or IPv6.
        #[arg(long)]
        vip: IpAddr,
        /// A second, IPv6 VIP for an IPv4 --vip: the service on both families.
        #[arg(long)]
        vip6: Option<Ipv6Addr>,
        /// Ports: 1935, "1935,8088" or "9000-9010".
        #[arg(long, value_parser = parse_ports)]
        ports: PortSet,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        protocol: Protocol,
        /// dr (Layer 4 Direct Routing, lbd forwards frames) or snat (Layer 7, HAProxy proxies).
        #[arg(long, default_value = "dr")]
        mode: ServiceMode,
        /// For --mode snat: http (X-Forwarded-For added) or tcp.
        #[arg(long)]
        layer7_protocol: Option<Layer7Protocol>,
        /// source-ip (a client stays on one server) or none (per connection).
        #[arg(long, default_value = "source-ip")]
        persistence: Persistence,
        /// Seconds a client stays on its server after its last packet.
        #[arg(long, default_value_t = 300)]
        persistence_timeout: u32,
        /// Leading bits of an IPv6 client's address that keep it on its server (64: its
        /// privacy addresses stay together).
        #[arg(long, default_value_t = 128)]
        persistence_prefix_v6: u8,
        /// Maglev table size (a prime).
        #[arg(long, default_value_t = 65537)]
        table_size: u32,
    },
    /// Add a real server to a service.
    AddRip {
        /// The service's label.
        service: String,
        /// The real server's label.
        label: String,
        /// Its own IP address, IPv4 or IPv6.
        #[arg(long)]
        ip: IpAddr,
        /// For a snat service: the port it listens on (default: the client's port).
        #[arg(long)]
        port: Option<u16>,
        /// Relative share of new clients (0 drains).
        #[arg(long, default_value_t = 100)]
        weight: u16,
        /// Lower connection threshold.
        #[arg(long, default_value_t = 0)]
        min_conns: u32,
        /// Upper connection threshold (0: unlimited).
        #[arg(long, default_value_t = 0)]
        max_conns: u32,
        /// Pinned MAC (otherwise learned from the neighbour table).
        #[arg(long)]
        mac: Option<MacAddr>,
    },
    /// Show or save the running configuration.
    Config {
        /// show or save.
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// The HA pair: status, takeover, release.
    Ha {
        /// status, takeover or release.
        #[command(subcommand)]
        action: HaAction,
    },
    /// Make this host a DR real server for the VIPs (needs no lbd): prints the commands and
    /// how to keep them across reboots, or runs them with --apply.
    DrSetup(DrSetupArgs),
    /// Writes lbctl's man page and shell completions (for the package; needs no lbd).
    #[command(hide = true)]
    Generate {
        /// Where lbctl.1 goes.
        #[arg(long, value_name = "DIR")]
        man_dir: PathBuf,
        /// Where the bash, zsh and fish completions go.
        #[arg(long, value_name = "DIR")]
        completions_dir: PathBuf,
    },
}

/// `dr-setup`'s options.
#[derive(Debug, Args)]
pub struct DrSetupArgs {
    /// A VIP the balancer sends to this server, IPv4 or IPv6 (repeat for more).
    #[arg(long = "vip", value_name = "IP", required = true)]
    pub vips: Vec<IpAddr>,
    /// loopback: the VIP on lo, ARP for it silenced (preferred); nftables, iptables or
    /// firewalld: VIP traffic redirected to this host, no VIP on it.
    #[arg(long, value_enum, default_value = "loopback")]
    pub method: Method,
    /// With loopback: also set the ARP sysctls of this interface, the one facing the balancer
    /// (repeatable; those of `all` are always set and are enough).
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// Run the commands on this host now (as root) instead of printing them.
    #[arg(long)]
    pub apply: bool,
}

/// `ha` subcommands.
#[derive(Debug, Subcommand)]
pub enum HaAction {
    /// This node's and its peer's roles and states, the last heartbeat, the counters.
    Status,
    /// Make this node the active one.
    Takeover,
    /// Hand the traffic to the peer (this node stays passive while the peer can serve).
    Release,
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the running configuration as TOML.
    Show,
    /// Write it (atomically) to PATH, or to the file lbd was started with. A relative PATH is
    /// taken from the current directory.
    Save {
        /// Where to write.
        path: Option<String>,
    },
}

/// `path` made absolute from the current directory (lexically: `..` stays).
fn absolute(path: String) -> Result<String, String> {
    let absolute = std::path::absolute(&path).map_err(|e| format!("config save {path}: {e}"))?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|_| format!("config save {path}: the path is not UTF-8"))
}

impl Verb {
    /// The protocol command, or a usage error (an edit with nothing to change).
    pub fn into_command(self) -> Result<Command, String> {
        Ok(match self {
            Verb::AddVip {
                label,
                vip,
                vip6,
                ports,
                protocol,
                mode,
                layer7_protocol,
                persistence,
                persistence_timeout,
                persistence_prefix_v6,
                table_size,
            } => Command::AddVip {
                service: Service {
                    label,
                    vip,
                    vip6,
                    persistence_prefix_v6,
                    ports,
                    protocol,
                    mode,
                    layer7_protocol,
                    persistence,
                    persistence_timeout_s: persistence_timeout,
                    table_size,
                    health_check: Default::default(),
                    fallback: None,
                    real_servers: Vec::new(),
                },
            },
            Verb::AddRip {
                service,
                label,
                ip,
                port,
                weight,
                min_conns,
                max_conns,
                mac,
            } => Command::AddRip {
                service,
                real_server: RealServer {
                    label,
                    ip,
                    port,
                    weight,
                    min_connections: min_conns,
                    max_connections: max_conns,
                    mac,
                    health_check: None,
                },
            },
            Verb::Config {
                action: ConfigAction::Show,
            } => Command::ConfigShow,
            Verb::Config {
                action: ConfigAction::Save { path },
            } => Command::ConfigSave {
                // lbd runs elsewhere: a relative path means one from here, not from lbd's cwd.
                path: path.map(absolute).transpose()?,
            },
            Verb::Ha { action } => match action {
                HaAction::Status => Command::HaStatus,
                HaAction::Takeover => Command::HaTakeover,
                HaAction::Release => Command::HaRelease,
            },
            Verb::Protocol(Command::EditVip(edit)) if edit.changes == ServiceChanges::default() => {
                return Err(
                    "edit-vip needs at least one change (see lbctl edit-vip --help)".into(),
                );
            }
            Verb::Protocol(Command::EditRip(edit))
                if edit.changes == RealServerChanges::default() =>
            {
                return Err(
                    "edit-rip needs at least one change (see lbctl edit-rip --help)".into(),
                );
            }
            Verb::Protocol(command) => command,
            Verb::DrSetup(_) | Verb::Generate { .. } => {
                return Err("this works on this host and sends nothing to lbd".into());
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lbd_proto::{RealServerEdit, RealServerName, ServiceEdit, ServiceName, WeightChange};

    fn command(args: &[&str]) -> Result<Command, String> {
        let mut all = vec!["lbctl"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        cli.command.into_command()
    }

    #[test]
    fn every_subcommand_becomes_its_protocol_command() {
        assert_eq!(command(&["status"]), Ok(Command::Status));
        assert_eq!(command(&["--json", "stats"]), Ok(Command::Stats));
        let Ok(Command::AddVip { service }) = command(&[
            "add-vip",
            "Wowza Streaming",
            "--vip",
            "198.18.0.100",
            "--ports",
            "1935,8088",
            "--protocol",
            "udp",
            "--persistence",
            "none",
            "--persistence-timeout",
            "60",
        ]) else {
            panic!("add-vip")
        };
        assert_eq!(service.ports.to_string(), "1935,8088");
        assert_eq!(service.protocol, Protocol::Udp);
        assert_eq!(service.persistence, Persistence::None);
        assert_eq!(service.persistence_timeout_s, 60);
        assert_eq!(service.table_size, 65537);
        let Ok(Command::AddRip {
            service,
            real_server,
        }) = command(&[
            "add-rip",
            "GUI",
            "Srv 1",
            "--ip",
            "198.18.0.11",
            "--mac",
            "02:00:00:00:00:11",
        ])
        else {
            panic!("add-rip")
        };
        assert_eq!((service.as_str(), real_server.weight), ("GUI", 100));
        assert_eq!(real_server.mac, Some(MacAddr([2, 0, 0, 0, 0, 0x11])));
        assert!(matches!(
            command(&["edit-vip", "GUI", "--ports", "80", "--label", "Web"]),
            Ok(Command::EditVip(ServiceEdit { label, changes }))
                if label == "GUI" && changes.ports.is_some() && changes.label.as_deref() == Some("Web")
        ));
        assert!(matches!(
            command(&["edit-rip", "GUI", "a", "--weight", "5", "--label", "b", "--max-conns", "9"]),
            Ok(Command::EditRip(RealServerEdit { changes, .. }))
                if changes.weight == Some(5) && changes.label.as_deref() == Some("b")
                    && changes.max_connections == Some(9)
        ));
        assert_eq!(
            command(&["set-weight", "GUI", "a", "0"]),
            Ok(Command::SetWeight(WeightChange {
                service: "GUI".into(),
                label: "a".into(),
                weight: 0
            }))
        );
        for (verb, expected) in [
            (
                "drain",
                Command::Drain(RealServerName {
                    service: "S".into(),
                    label: "L".into(),
                }),
            ),
            (
                "halt",
                Command::Halt(RealServerName {
                    service: "S".into(),
                    label: "L".into(),
                }),
            ),
            (
                "online",
                Command::Online(RealServerName {
                    service: "S".into(),
                    label: "L".into(),
                }),
            ),
            (
                "del-rip",
                Command::DelRip(RealServerName {
                    service: "S".into(),
                    label: "L".into(),
                }),
            ),
        ] {
            assert_eq!(command(&[verb, "S", "L"]), Ok(expected));
        }
        assert_eq!(
            command(&["del-vip", "S"]),
            Ok(Command::DelVip(ServiceName { label: "S".into() }))
        );
        assert_eq!(command(&["config", "show"]), Ok(Command::ConfigShow));
        assert_eq!(
            command(&["config", "save"]),
            Ok(Command::ConfigSave { path: None })
        );
        let here = std::env::current_dir().expect("cwd");
        assert_eq!(
            command(&["config", "save", "saved.toml"]),
            Ok(Command::ConfigSave {
                path: Some(here.join("saved.toml").to_string_lossy().into_owned())
            })
        );
        assert_eq!(
            command(&["config", "save", "/tmp/x.toml"]),
            Ok(Command::ConfigSave {
                path: Some("/tmp/x.toml".into())
            })
        );
        assert_eq!(command(&["reload"]), Ok(Command::Reload));
        assert_eq!(command(&["ha", "status"]), Ok(Command::HaStatus));
        assert_eq!(command(&["ha", "takeover"]), Ok(Command::HaTakeover));
        assert_eq!(command(&["ha", "release"]), Ok(Command::HaRelease));
    }

    #[test]
    fn bad_values_are_usage_errors_with_the_reason() {
        for (args, expected) in [
            (&["add-rip", "S", "L", "--ip", "198.18.0"][..], "198.18.0"),
            (
                &[
                    "add-vip",
                    "S",
                    "--vip",
                    "198.18.0.1",
                    "--ports",
                    "9010-9000",
                ],
                "start is above end",
            ),
            (
                &[
                    "add-vip",
                    "S",
                    "--vip",
                    "198.18.0.1",
                    "--ports",
                    "80",
                    "--protocol",
                    "sctp",
                ],
                "sctp",
            ),
            (&["set-weight", "S", "L", "70000"], "70000"),
            (
                &["add-rip", "S", "L", "--ip", "198.18.0.1", "--mac", "zz"],
                "invalid MAC",
            ),
            (&["edit-vip", "S"], "at least one change"),
            (&["edit-rip", "S", "L"], "at least one change"),
            (&["explode"], "explode"),
        ] {
            let error = command(args).expect_err("must be refused");
            assert!(error.contains(expected), "{args:?}: {error}");
        }
    }
}
