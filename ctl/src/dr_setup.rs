//! `lbctl dr-setup`: the real-server side of Direct Routing, on the local host, with no lbd.
//!
//! In DR mode lbd hands a client's frame to a real server with only its MAC addresses changed,
//! so the server receives packets addressed to the VIP. It must accept them, yet never answer
//! ARP for the VIP: only the balancer may, or clients would bypass it (the "ARP problem"). The
//! four ways to get there are the deployment guide's: the VIP on lo with `arp_ignore=1` and
//! `arp_announce=2` (the preferred one), or a NAT redirect of VIP traffic to the host itself
//! with nftables, iptables or firewalld, each for IPv4 and IPv6.
//!
//! [`plan`] is a pure function from the VIPs and the method to argv lists (no shell line is ever
//! run) and to what keeps them across reboots; printing and `--apply` only render or run a plan,
//! so the unit tests below hold every method's exact commands. Every step can run twice: it
//! either replaces what it sets (`ip addr replace`, an nft table rebuilt in one transaction) or
//! first asks whether it is in place (`iptables -C`, `firewall-cmd --query-rule`).

use crate::cli::DrSetupArgs;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// How a real server comes to accept packets for a VIP it must not announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// The VIP on lo, ARP for it silenced by sysctls: the guide's preferred method.
    Loopback,
    /// An nftables `redirect` of VIP traffic to this host (no VIP on the host).
    Nftables,
    /// An iptables `REDIRECT` of VIP traffic (ip6tables for IPv6).
    Iptables,
    /// The iptables `REDIRECT` through firewalld's direct interface.
    Firewalld,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Loopback => "loopback",
            Method::Nftables => "nftables",
            Method::Iptables => "iptables",
            Method::Firewalld => "firewalld",
        }
    }
}

/// One command of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What it does and why, for the operator.
    pub what: String,
    /// The command, run without a shell.
    pub argv: Vec<String>,
    /// A check that succeeds when the step is already in place (for tools that would add a
    /// rule twice); `argv` then does not run.
    pub unless: Option<Vec<String>>,
}

/// How to keep part of a plan across reboots: where it goes and what to write or run there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persistence {
    pub what: String,
    pub text: String,
}

/// Everything a method needs for a set of VIPs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub method: Method,
    pub vips: Vec<IpAddr>,
    /// What the operator should know before running it.
    pub notes: Vec<String>,
    pub steps: Vec<Step>,
    pub persistence: Vec<Persistence>,
}

/// nftables table that holds the redirect rules; lbd's own, so it can be rebuilt whole.
const NFT_TABLE: &str = "inet lbd_dr";
const SYSCTL_FILE: &str = "/etc/sysctl.d/90-lbd-dr.conf";
const NFT_FILE: &str = "/etc/nftables.d/lbd-dr.nft";
const NETWORKD_FILE: &str = "/etc/systemd/network/10-lbd-dr-lo.network";
/// A command that has not finished by then is stopped (firewall-cmd waits on D-Bus, say).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

const REDIRECT_NOTE: &str = "The redirect sends VIP traffic to this host's address on the \
interface it arrives on, ports\nunchanged: the service must listen on 0.0.0.0 / :: (or on that \
address) and sees that address,\nnot the VIP, as its own (IP-based virtual hosts need --method \
loopback). No VIP is on the host,\nso nothing here can answer ARP for it.";

/// A command line split at its spaces: every word here (VIPs and checked interface names
/// included) is free of whitespace.
fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

/// Why `vip` cannot be a VIP, if it cannot.
fn vip_problem(vip: IpAddr) -> Option<&'static str> {
    match vip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            Some("link-local: clients off the segment could not reach it")
        }
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped address: give the IPv4 address itself")
        }
        _ => None,
    }
}

/// The kernel's rule for interface names (`dev_valid_name`): 1 to 15 bytes, not `.` or `..`,
/// no `/`, `:` or whitespace.
fn interface_problem(name: &str) -> Option<String> {
    if name == "all" || name == "default" {
        return Some(format!(
            "{name} is not an interface (the `all` keys are always set)"
        ));
    }
    let valid = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace);
    (!valid).then(|| format!("{name:?} is not a valid interface name"))
}

/// `net.ipv4.conf.IF.KEY`; a dot in an interface name (a VLAN, eth0.100) is written `/` there.
fn arp_key(interface: &str, key: &str) -> String {
    format!("net.ipv4.conf.{}.{key}", interface.replace('.', "/"))
}

fn family_word(vip: IpAddr) -> &'static str {
    if vip.is_ipv4() { "ip" } else { "ip6" }
}

/// The plan for `vips` (duplicates dropped, order kept) with `method`; `interfaces` adds their
/// own ARP sysctls to the loopback method. Errors are usage errors, naming the bad value.
pub fn plan(vips: &[IpAddr], method: Method, interfaces: &[String]) -> Result<Plan, String> {
    let mut unique: Vec<IpAddr> = Vec::new();
    for &vip in vips {
        if let Some(problem) = vip_problem(vip) {
            return Err(format!("--vip {vip}: {problem}"));
        }
        if !unique.contains(&vip) {
            unique.push(vip);
        }
    }
    if unique.is_empty() {
        return Err("at least one --vip is needed".into());
    }
    let has_ipv4 = unique.iter().any(IpAddr::is_ipv4);
    if !interfaces.is_empty() {
        if method != Method::Loopback {
            return Err(format!(
                "--interface sets the ARP sysctls of --method loopback; --method {} has none",
                method.name()
            ));
        }
        if !has_ipv4 {
            return Err("--interface sets IPv4 ARP sysctls, and no --vip is IPv4".into());
        }
        if let Some(problem) = interfaces.iter().find_map(|i| interface_problem(i)) {
            return Err(format!("--interface {problem}"));
        }
    }
    Ok(match method {
        Method::Loopback => loopback(unique, interfaces),
        Method::Nftables => nftables(unique),
        Method::Iptables => iptables(unique),
        Method::Firewalld => firewalld(unique),
    })
}

fn loopback(vips: Vec<IpAddr>, interfaces: &[String]) -> Plan {
    let mut steps = Vec::new();
    let mut sysctl_lines = Vec::new();
    if vips.iter().any(IpAddr::is_ipv4) {
        let mut scopes = vec!["all"];
        scopes.extend(interfaces.iter().map(String::as_str));
        for scope in scopes {
            let ignore = arp_key(scope, "arp_ignore");
            let announce = arp_key(scope, "arp_announce");
            let what = if scope == "all" {
                "IPv4, every interface: answer ARP only for addresses of the interface asked \
                 (a VIP on lo: never),\nand never name a VIP as the sender of an ARP request"
                    .to_owned()
            } else {
                format!(
                    "The same on {scope} (the kernel takes the higher of `all` and {scope}'s \
                     value;\nwritten too for tools that read {scope}'s)"
                )
            };
            steps.push(Step {
                what,
                argv: words(&format!("sysctl -w {ignore}=1 {announce}=2")),
                unless: None,
            });
            sysctl_lines.push(format!("{ignore} = 1"));
            sysctl_lines.push(format!("{announce} = 2"));
        }
    }
    let mut up_lines = Vec::new();
    let mut networkd = vec!["[Match]".to_owned(), "Name=lo".to_owned()];
    for &vip in &vips {
        let (what, command, address) = match vip {
            IpAddr::V4(_) => (
                format!(
                    "{vip} on lo, as a /32 (it adds no route): the server accepts packets for it"
                ),
                words(&format!("ip addr replace {vip}/32 dev lo")),
                vec![format!("Address={vip}/32")],
            ),
            IpAddr::V6(_) => (
                format!(
                    "{vip} on lo, as a /128; nodad: the balancer and every real server hold \
                     it,\nso it is never probed for or marked duplicate"
                ),
                words(&format!("ip -6 addr replace {vip}/128 dev lo nodad")),
                vec![
                    format!("Address={vip}/128"),
                    "DuplicateAddressDetection=none".to_owned(),
                ],
            ),
        };
        networkd.extend([String::new(), "[Address]".to_owned()]);
        networkd.extend(address);
        up_lines.push(format!("    up {}", shell_line(&command)));
        steps.push(Step {
            what,
            argv: command,
            unless: None,
        });
    }
    let mut notes = Vec::new();
    if vips.iter().any(IpAddr::is_ipv6) {
        notes.push(
            "IPv6 needs no sysctl: Linux answers a neighbour solicitation only for an address \
             of the\ninterface it arrives on, and never solicits from another interface's \
             address: a VIP on lo\nstays silent."
                .to_owned(),
        );
    }
    let mut persistence = Vec::new();
    if !sysctl_lines.is_empty() {
        persistence.push(Persistence {
            what: format!("{SYSCTL_FILE}, read at boot:"),
            text: sysctl_lines.join("\n"),
        });
    }
    persistence.push(Persistence {
        what: "The VIPs on lo with ifupdown: in /etc/network/interfaces, the lo stanza becomes"
            .into(),
        text: format!("auto lo\niface lo inet loopback\n{}", up_lines.join("\n")),
    });
    persistence.push(Persistence {
        what: format!("or with systemd-networkd: {NETWORKD_FILE}"),
        text: networkd.join("\n"),
    });
    Plan {
        method: Method::Loopback,
        vips,
        notes,
        steps,
        persistence,
    }
}

fn nftables(vips: Vec<IpAddr>) -> Plan {
    // Created, deleted and created again in one transaction: whatever was there goes, and a
    // VIP's traffic is never without its rule while it runs.
    let mut commands = vec![
        format!("add table {NFT_TABLE}"),
        format!("delete table {NFT_TABLE}"),
        format!("add table {NFT_TABLE}"),
        format!(
            "add chain {NFT_TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}"
        ),
    ];
    let mut file = vec![
        format!("table {NFT_TABLE}"),
        format!("delete table {NFT_TABLE}"),
        format!("table {NFT_TABLE} {{"),
        "    chain prerouting {".to_owned(),
        "        type nat hook prerouting priority dstnat; policy accept;".to_owned(),
    ];
    for &vip in &vips {
        let rule = format!("{} daddr {vip} redirect", family_word(vip));
        commands.push(format!("add rule {NFT_TABLE} prerouting {rule}"));
        file.push(format!("        {rule}"));
    }
    file.extend(["    }".to_owned(), "}".to_owned()]);
    Plan {
        method: Method::Nftables,
        notes: vec![REDIRECT_NOTE.to_owned()],
        steps: vec![Step {
            what: format!(
                "The table {NFT_TABLE}, rebuilt whole in one transaction: its prerouting NAT \
                 chain\nredirects each VIP's traffic to this host"
            ),
            argv: vec!["nft".to_owned(), commands.join("\n")],
            unless: None,
        }],
        persistence: vec![Persistence {
            what: format!(
                "{NFT_FILE}, loaded at boot by the nftables service\n(systemctl enable \
                 nftables) once /etc/nftables.conf has the line: include \"{NFT_FILE}\""
            ),
            text: file.join("\n"),
        }],
        vips,
    }
}

/// iptables or ip6tables, by the VIP's family.
fn iptables_rule(vip: IpAddr, action: &str) -> Vec<String> {
    let program = if vip.is_ipv4() {
        "iptables"
    } else {
        "ip6tables"
    };
    words(&format!(
        "{program} -t nat {action} PREROUTING -d {vip} -j REDIRECT"
    ))
}

/// One redirect step per VIP: `rule(vip, check)` asks whether it is in place, and
/// `rule(vip, add)` runs only when it is not.
fn redirect_steps(
    vips: &[IpAddr],
    how: &str,
    rule: fn(IpAddr, &str) -> Vec<String>,
    [add, check]: [&str; 2],
) -> Vec<Step> {
    vips.iter()
        .map(|&vip| Step {
            what: format!("Redirect {vip}'s traffic to this host{how}"),
            argv: rule(vip, add),
            unless: Some(rule(vip, check)),
        })
        .collect()
}

fn iptables(vips: Vec<IpAddr>) -> Plan {
    let how = " (-C first: iptables would add the rule twice)";
    let steps = redirect_steps(&vips, how, iptables_rule, ["-A", "-C"]);
    Plan {
        method: Method::Iptables,
        notes: vec![REDIRECT_NOTE.to_owned()],
        steps,
        persistence: vec![
            Persistence {
                what: "Debian and Ubuntu: iptables-persistent restores /etc/iptables/rules.v4 \
                       and rules.v6\nat boot; save the running rules there:"
                    .into(),
                text: "apt-get install iptables-persistent\nnetfilter-persistent save".into(),
            },
            Persistence {
                what: "Elsewhere: save them with iptables-save and ip6tables-save where your \
                       distribution\nrestores rules at boot, or run the commands above from a \
                       boot script."
                    .into(),
                text: String::new(),
            },
        ],
        vips,
    }
}

/// A firewall-cmd direct-rule command: `options` then the guide's REDIRECT rule for `vip`.
fn firewalld_rule(vip: IpAddr, options: &str) -> Vec<String> {
    let family = if vip.is_ipv4() { "ipv4" } else { "ipv6" };
    words(&format!(
        "firewall-cmd {options} {family} nat PREROUTING 0 -d {vip} -j REDIRECT"
    ))
}

fn firewalld(vips: Vec<IpAddr>) -> Plan {
    let steps = redirect_steps(
        &vips,
        ", in firewalld's running rules",
        firewalld_rule,
        ["--direct --add-rule", "--direct --query-rule"],
    );
    let permanent: Vec<String> = vips
        .iter()
        .map(|&vip| shell_line(&firewalld_rule(vip, "--permanent --direct --add-rule")))
        .collect();
    Plan {
        method: Method::Firewalld,
        notes: vec![
            REDIRECT_NOTE.to_owned(),
            "firewalld must be running. Its documentation marks the direct interface \
             deprecated, but no\nother firewalld rule redirects every port of an address. \
             The service's ports must be open in\nthe zone too (firewall-cmd --add-port=1935/tcp \
             --permanent, and without --permanent for now)."
                .to_owned(),
        ],
        steps,
        persistence: vec![Persistence {
            what: "firewalld's permanent rules (/etc/firewalld/direct.xml), loaded when it starts:"
                .into(),
            text: permanent.join("\n"),
        }],
        vips,
    }
}

/// `word` as a POSIX shell reads it back: bare when it is plain, else in single quotes.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=,@%+".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn shell_line(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A step as one shell line: its check, if any, guards the command.
fn step_line(step: &Step) -> String {
    match &step.unless {
        Some(check) => format!(
            "{} >/dev/null 2>&1 ||\n    {}",
            shell_line(check),
            shell_line(&step.argv)
        ),
        None => shell_line(&step.argv),
    }
}

fn comment(text: &str, out: &mut String) {
    for line in text.lines() {
        out.push_str(format!("# {line}").trim_end());
        out.push('\n');
    }
}

/// How to keep the plan across reboots, as shell comments.
fn persistence_text(plan: &Plan) -> String {
    let mut out = String::from("# To keep this across reboots:\n");
    for keep in &plan.persistence {
        out.push_str("#\n");
        comment(&keep.what, &mut out);
        for line in keep.text.lines() {
            out.push_str(format!("#     {line}").trim_end());
            out.push('\n');
        }
    }
    out
}

fn vip_list(plan: &Plan) -> String {
    plan.vips
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The plan as a shell script: the commands, and as comments what they do and how to keep
/// them. Piped to `sh` as root, it runs exactly the steps.
pub fn script(plan: &Plan) -> String {
    let mut out = format!(
        "# lbd DR real server, method {}, for {}\n\
         # Run as root on each real server (or: lbctl dr-setup ... --apply).\n",
        plan.method.name(),
        vip_list(plan)
    );
    for note in &plan.notes {
        out.push_str("#\n");
        comment(note, &mut out);
    }
    for step in &plan.steps {
        out.push('\n');
        comment(&step.what, &mut out);
        out.push_str(&step_line(step));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&persistence_text(plan));
    out
}

/// The plan for scripts: every command as its argv.
pub fn json(plan: &Plan) -> serde_json::Value {
    serde_json::json!({
        "method": plan.method.name(),
        "vips": plan.vips.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
        "notes": plan.notes,
        "steps": plan.steps.iter().map(|step| serde_json::json!({
            "what": step.what,
            "argv": step.argv,
            "unless": step.unless,
        })).collect::<Vec<_>>(),
        "persistence": plan.persistence.iter().map(|keep| serde_json::json!({
            "what": keep.what,
            "text": keep.text,
        })).collect::<Vec<_>>(),
    })
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    pub success: bool,
    /// "exit status 4", or how it was killed ("signal: 9 (SIGKILL)").
    pub status: String,
    pub stderr: String,
}

/// The Debian package of a program the plans run, for a "not found" hint.
fn package_of(program: &str) -> Option<&'static str> {
    Some(match program {
        "ip" => "iproute2",
        "sysctl" => "procps",
        "nft" => "nftables",
        "iptables" | "ip6tables" => "iptables",
        "firewall-cmd" => "firewalld",
        _ => return None,
    })
}

/// Runs `argv` (no shell), stdout discarded, stderr kept, bounded by [`COMMAND_TIMEOUT`].
pub fn run_command(argv: &[String]) -> Result<Ran, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("an empty command".into());
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let hint = match (e.kind(), package_of(program)) {
                (std::io::ErrorKind::NotFound, Some(package)) => {
                    format!(" (it comes with the {package} package)")
                }
                _ => String::new(),
            };
            format!("cannot run {program}: {e}{hint}")
        })?;
    // Read on a thread, so a command that writes much to stderr never stalls on a full pipe.
    let mut stderr_pipe = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stderr_pipe.as_mut() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{}` did not finish within {} s and was stopped",
                    shell_line(argv),
                    COMMAND_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for {program}: {e}")),
        }
    };
    Ok(Ran {
        success: status.success(),
        status: match status.code() {
            Some(code) => format!("exit status {code}"),
            None => status.to_string(),
        },
        stderr: reader.join().unwrap_or_default(),
    })
}

/// Runs the plan's steps in order through `run`, reporting each on `progress`; stops at the
/// first failure with the command, how it ended and what it said.
pub fn apply(
    plan: &Plan,
    run: &mut dyn FnMut(&[String]) -> Result<Ran, String>,
    progress: &mut dyn Write,
) -> Result<(), String> {
    let total = plan.steps.len();
    for (index, step) in plan.steps.iter().enumerate() {
        let line = shell_line(&step.argv);
        let failed = |why: String| {
            let done = match index {
                0 => "nothing was changed".to_owned(),
                1 => "step 1 is in place".to_owned(),
                _ => format!("steps 1-{index} are in place"),
            };
            format!("step {} of {total} failed: {why}; {done}", index + 1)
        };
        if let Some(check) = &step.unless
            && run(check).map_err(&failed)?.success
        {
            let _ = writeln!(progress, "in place: {line}");
            continue;
        }
        let ran = run(&step.argv).map_err(&failed)?;
        if !ran.success {
            return Err(failed(format!(
                "`{line}` ended with {}: {}",
                ran.status,
                ran.stderr.trim()
            )));
        }
        let _ = writeln!(progress, "done:     {line}");
    }
    let _ = writeln!(
        progress,
        "\nApplied {} for {} on this host, until it restarts.\n",
        plan.method.name(),
        vip_list(plan)
    );
    let _ = progress.write_all(persistence_text(plan).as_bytes());
    Ok(())
}

/// The effective uid in a /proc/PID/status text ("Uid: real effective saved fs").
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `lbctl dr-setup`: prints the plan (as a script, or JSON), or applies it. Exit status as
/// lbctl's: 0 done, 1 a step failed or not root, 2 usage.
pub fn run(args: DrSetupArgs, as_json: bool) -> ExitCode {
    let plan = match plan(&args.vips, args.method, &args.interfaces) {
        Ok(plan) => plan,
        Err(usage) => {
            eprintln!("lbctl: dr-setup: {usage}");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    if !args.apply {
        let text = if as_json {
            format!("{:#}\n", json(&plan))
        } else {
            script(&plan)
        };
        // A closed stdout (lbctl dr-setup ... | head) is not an error worth reporting.
        let _ = stdout.write_all(text.as_bytes());
        return ExitCode::SUCCESS;
    }
    if as_json {
        eprintln!("lbctl: dr-setup: --json prints the plan; --apply reports as text");
        return ExitCode::from(2);
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_uid(&status));
    if uid.is_some_and(|uid| uid != 0) {
        eprintln!(
            "lbctl: dr-setup --apply changes this host's network settings: run it as root \
             (without --apply it only prints the commands)"
        );
        return ExitCode::FAILURE;
    }
    match apply(&plan, &mut run_command, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lbctl: dr-setup: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Verb};
    use clap::Parser;

    const V4: &str = "198.18.0.100";
    const V6: &str = "2001:db8::10";

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn plan_of(vips: &[&str], method: Method, interfaces: &[&str]) -> Plan {
        let vips: Vec<IpAddr> = vips.iter().map(|v| ip(v)).collect();
        let interfaces: Vec<String> = interfaces.iter().map(|i| (*i).to_owned()).collect();
        plan(&vips, method, &interfaces).expect("a valid plan")
    }

    fn argvs(plan: &Plan) -> Vec<String> {
        plan.steps.iter().map(step_line).collect()
    }

    #[test]
    fn loopback_ipv4_silences_arp_first_then_puts_the_vip_on_lo() {
        let plan = plan_of(&[V4], Method::Loopback, &[]);
        assert_eq!(
            argvs(&plan),
            [
                "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
                "ip addr replace 198.18.0.100/32 dev lo",
            ]
        );
        assert!(plan.notes.is_empty());
        assert_eq!(
            plan.persistence[0],
            Persistence {
                what: "/etc/sysctl.d/90-lbd-dr.conf, read at boot:".into(),
                text: "net.ipv4.conf.all.arp_ignore = 1\nnet.ipv4.conf.all.arp_announce = 2".into(),
            }
        );
    }

    #[test]
    fn loopback_interfaces_get_their_own_keys_with_a_vlan_dot_written_as_a_slash() {
        let plan = plan_of(&[V4], Method::Loopback, &["eth0", "eth0.100"]);
        assert_eq!(
            argvs(&plan),
            [
                "sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
                "sysctl -w net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2",
                "sysctl -w net.ipv4.conf.eth0/100.arp_ignore=1 net.ipv4.conf.eth0/100.arp_announce=2",
                "ip addr replace 198.18.0.100/32 dev lo",
            ]
        );
        assert_eq!(
            plan.persistence[0].text,
            "net.ipv4.conf.all.arp_ignore = 1\nnet.ipv4.conf.all.arp_announce = 2\n\
             net.ipv4.conf.eth0.arp_ignore = 1\nnet.ipv4.conf.eth0.arp_announce = 2\n\
             net.ipv4.conf.eth0/100.arp_ignore = 1\nnet.ipv4.conf.eth0/100.arp_announce = 2"
        );
    }

    #[test]
    fn loopback_ipv6_needs_no_sysctl_and_holds_the_vip_without_dad() {
        let plan = plan_of(&[V6], Method::Loopback, &[]);
        assert_eq!(
            argvs(&plan),
            ["ip -6 addr replace 2001:db8::10/128 dev lo nodad"]
        );
        assert!(plan.notes[0].starts_with("IPv6 needs no sysctl"));
        assert_eq!(plan.persistence.len(), 2, "no sysctl file: {plan:?}");
    }

    #[test]
    fn loopback_keeps_each_family_on_lo_with_ifupdown_or_networkd() {
        for (vip, up, address) in [
            (
                V4,
                "up ip addr replace 198.18.0.100/32 dev lo",
                "Address=198.18.0.100/32",
            ),
            (
                V6,
                "up ip -6 addr replace 2001:db8::10/128 dev lo nodad",
                "Address=2001:db8::10/128\nDuplicateAddressDetection=none",
            ),
        ] {
            let plan = plan_of(&[vip], Method::Loopback, &[]);
            let [.., ifupdown, networkd] = plan.persistence.as_slice() else {
                panic!("{plan:?}")
            };
            assert_eq!(
                ifupdown.text,
                format!("auto lo\niface lo inet loopback\n    {up}")
            );
            assert_eq!(
                networkd.text,
                format!("[Match]\nName=lo\n\n[Address]\n{address}")
            );
        }
    }

    #[test]
    fn loopback_script_for_both_families_is_exact() {
        let plan = plan_of(&[V4, V6], Method::Loopback, &["eth0"]);
        assert_eq!(
            script(&plan),
            "\
# lbd DR real server, method loopback, for 198.18.0.100 2001:db8::10
# Run as root on each real server (or: lbctl dr-setup ... --apply).
#
# IPv6 needs no sysctl: Linux answers a neighbour solicitation only for an address of the
# interface it arrives on, and never solicits from another interface's address: a VIP on lo
# stays silent.

# IPv4, every interface: answer ARP only for addresses of the interface asked (a VIP on lo: never),
# and never name a VIP as the sender of an ARP request
sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2

# The same on eth0 (the kernel takes the higher of `all` and eth0's value;
# written too for tools that read eth0's)
sysctl -w net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2

# 198.18.0.100 on lo, as a /32 (it adds no route): the server accepts packets for it
ip addr replace 198.18.0.100/32 dev lo

# 2001:db8::10 on lo, as a /128; nodad: the balancer and every real server hold it,
# so it is never probed for or marked duplicate
ip -6 addr replace 2001:db8::10/128 dev lo nodad

# To keep this across reboots:
#
# /etc/sysctl.d/90-lbd-dr.conf, read at boot:
#     net.ipv4.conf.all.arp_ignore = 1
#     net.ipv4.conf.all.arp_announce = 2
#     net.ipv4.conf.eth0.arp_ignore = 1
#     net.ipv4.conf.eth0.arp_announce = 2
#
# The VIPs on lo with ifupdown: in /etc/network/interfaces, the lo stanza becomes
#     auto lo
#     iface lo inet loopback
#         up ip addr replace 198.18.0.100/32 dev lo
#         up ip -6 addr replace 2001:db8::10/128 dev lo nodad
#
# or with systemd-networkd: /etc/systemd/network/10-lbd-dr-lo.network
#     [Match]
#     Name=lo
#
#     [Address]
#     Address=198.18.0.100/32
#
#     [Address]
#     Address=2001:db8::10/128
#     DuplicateAddressDetection=none
"
        );
    }

    #[test]
    fn nftables_rebuilds_one_table_in_one_transaction_for_both_families() {
        let plan = plan_of(&[V4, V6], Method::Nftables, &[]);
        assert_eq!(plan.steps.len(), 1);
        assert_eq!(plan.steps[0].unless, None);
        assert_eq!(
            plan.steps[0].argv,
            [
                "nft",
                "add table inet lbd_dr\n\
                 delete table inet lbd_dr\n\
                 add table inet lbd_dr\n\
                 add chain inet lbd_dr prerouting { type nat hook prerouting priority dstnat; policy accept; }\n\
                 add rule inet lbd_dr prerouting ip daddr 198.18.0.100 redirect\n\
                 add rule inet lbd_dr prerouting ip6 daddr 2001:db8::10 redirect"
            ]
        );
        assert_eq!(plan.notes, [REDIRECT_NOTE]);
        assert_eq!(
            plan.persistence,
            [Persistence {
                what: "/etc/nftables.d/lbd-dr.nft, loaded at boot by the nftables service\n\
                       (systemctl enable nftables) once /etc/nftables.conf has the line: \
                       include \"/etc/nftables.d/lbd-dr.nft\""
                    .into(),
                text: "table inet lbd_dr\n\
                       delete table inet lbd_dr\n\
                       table inet lbd_dr {\n    chain prerouting {\n        \
                       type nat hook prerouting priority dstnat; policy accept;\n        \
                       ip daddr 198.18.0.100 redirect\n        \
                       ip6 daddr 2001:db8::10 redirect\n    }\n}"
                    .into(),
            }]
        );
        // The script quotes the transaction as one word, line breaks and all.
        assert!(
            script(&plan).contains("\nnft 'add table inet lbd_dr\ndelete table inet lbd_dr\n"),
            "{}",
            script(&plan)
        );
    }

    #[test]
    fn iptables_checks_before_it_appends_one_rule_per_vip_and_family() {
        let plan = plan_of(&[V4, V6], Method::Iptables, &[]);
        // One word per argument: the VIP is never glued to another word.
        assert_eq!(
            plan.steps[0].argv.join("|"),
            "iptables|-t|nat|-A|PREROUTING|-d|198.18.0.100|-j|REDIRECT"
        );
        assert_eq!(
            plan.steps[0].unless.as_ref().map(|check| check.join("|")),
            Some("iptables|-t|nat|-C|PREROUTING|-d|198.18.0.100|-j|REDIRECT".to_owned())
        );
        assert_eq!(
            argvs(&plan),
            [
                "iptables -t nat -C PREROUTING -d 198.18.0.100 -j REDIRECT >/dev/null 2>&1 ||\n    \
                 iptables -t nat -A PREROUTING -d 198.18.0.100 -j REDIRECT",
                "ip6tables -t nat -C PREROUTING -d 2001:db8::10 -j REDIRECT >/dev/null 2>&1 ||\n    \
                 ip6tables -t nat -A PREROUTING -d 2001:db8::10 -j REDIRECT",
            ]
        );
        assert_eq!(
            plan.persistence[0].text,
            "apt-get install iptables-persistent\nnetfilter-persistent save"
        );
    }

    #[test]
    fn firewalld_queries_before_it_adds_and_persists_with_permanent() {
        let plan = plan_of(&[V4, V6], Method::Firewalld, &[]);
        assert_eq!(
            argvs(&plan),
            [
                "firewall-cmd --direct --query-rule ipv4 nat PREROUTING 0 -d 198.18.0.100 -j REDIRECT \
                 >/dev/null 2>&1 ||\n    \
                 firewall-cmd --direct --add-rule ipv4 nat PREROUTING 0 -d 198.18.0.100 -j REDIRECT",
                "firewall-cmd --direct --query-rule ipv6 nat PREROUTING 0 -d 2001:db8::10 -j REDIRECT \
                 >/dev/null 2>&1 ||\n    \
                 firewall-cmd --direct --add-rule ipv6 nat PREROUTING 0 -d 2001:db8::10 -j REDIRECT",
            ]
        );
        assert_eq!(
            plan.persistence,
            [Persistence {
                what: "firewalld's permanent rules (/etc/firewalld/direct.xml), loaded when it starts:"
                    .into(),
                text: "firewall-cmd --permanent --direct --add-rule ipv4 nat PREROUTING 0 -d \
                       198.18.0.100 -j REDIRECT\n\
                       firewall-cmd --permanent --direct --add-rule ipv6 nat PREROUTING 0 -d \
                       2001:db8::10 -j REDIRECT"
                    .into(),
            }]
        );
        assert!(plan.notes[1].starts_with("firewalld must be running"));
    }

    #[test]
    fn duplicate_vips_count_once_in_the_order_given() {
        let plan = plan_of(&[V6, V4, V6], Method::Iptables, &[]);
        assert_eq!(plan.vips, [ip(V6), ip(V4)]);
        assert_eq!(plan.steps.len(), 2);
    }

    #[test]
    fn bad_input_is_a_usage_error_naming_the_value() {
        let refused = |vips: &[&str], method, names: &[&str]| {
            let vips: Vec<IpAddr> = vips.iter().map(|v| ip(v)).collect();
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            plan(&vips, method, &names).expect_err("refused")
        };
        assert_eq!(
            refused(&[], Method::Loopback, &[]),
            "at least one --vip is needed"
        );
        for (vip, reason) in [
            ("0.0.0.0", "the unspecified address"),
            ("127.0.0.5", "a loopback address"),
            ("224.0.0.1", "a multicast address"),
            ("255.255.255.255", "the broadcast address"),
            ("::", "the unspecified address"),
            ("::1", "a loopback address"),
            ("ff02::1", "a multicast address"),
            (
                "fe80::1",
                "link-local: clients off the segment could not reach it",
            ),
            (
                "::ffff:198.18.0.100",
                "an IPv4-mapped address: give the IPv4 address itself",
            ),
        ] {
            let error = refused(&[V4, vip], Method::Nftables, &[]);
            assert_eq!(error, format!("--vip {vip}: {reason}"));
        }
        assert_eq!(
            refused(&[V4], Method::Nftables, &["eth0"]),
            "--interface sets the ARP sysctls of --method loopback; --method nftables has none"
        );
        assert_eq!(
            refused(&[V6], Method::Loopback, &["eth0"]),
            "--interface sets IPv4 ARP sysctls, and no --vip is IPv4"
        );
        assert_eq!(
            refused(&[V4], Method::Loopback, &["all"]),
            "--interface all is not an interface (the `all` keys are always set)"
        );
        for name in ["", "a/b", "eth0:1", "eth 0", "..", "abcdefghijklmnop"] {
            assert_eq!(
                refused(&[V4], Method::Loopback, &[name]),
                format!("--interface {name:?} is not a valid interface name")
            );
        }
        let longest = ["abcdefghijklmno".to_owned()];
        assert!(plan(&[ip(V4)], Method::Loopback, &longest).is_ok());
    }

    #[test]
    fn shell_words_read_back_as_themselves() {
        assert_eq!(shell_word("198.18.0.100/32"), "198.18.0.100/32");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("{ x; }"), "'{ x; }'");
    }

    /// A runner that answers from a list of outcomes and records what it was asked to run.
    struct FakeRunner {
        outcomes: std::vec::IntoIter<Result<Ran, String>>,
        calls: Vec<String>,
    }

    impl FakeRunner {
        fn new(outcomes: Vec<Result<Ran, String>>) -> FakeRunner {
            FakeRunner {
                outcomes: outcomes.into_iter(),
                calls: Vec::new(),
            }
        }

        fn run(&mut self, argv: &[String]) -> Result<Ran, String> {
            self.calls.push(shell_line(argv));
            self.outcomes
                .next()
                .unwrap_or_else(|| Err("unexpected command".into()))
        }
    }

    fn ran(success: bool, stderr: &str) -> Result<Ran, String> {
        Ok(Ran {
            success,
            status: if success {
                "exit status 0"
            } else {
                "exit status 4"
            }
            .into(),
            stderr: stderr.into(),
        })
    }

    #[test]
    fn apply_skips_what_is_in_place_and_runs_the_rest_in_order() {
        let plan = plan_of(&[V4, V6], Method::Iptables, &[]);
        // 198.18.0.100's rule exists (-C succeeds); 2001:db8::10's does not.
        let mut fake = FakeRunner::new(vec![ran(true, ""), ran(false, "Bad rule"), ran(true, "")]);
        let mut progress = Vec::new();
        apply(&plan, &mut |argv| fake.run(argv), &mut progress).expect("applied");
        assert_eq!(
            fake.calls,
            [
                "iptables -t nat -C PREROUTING -d 198.18.0.100 -j REDIRECT",
                "ip6tables -t nat -C PREROUTING -d 2001:db8::10 -j REDIRECT",
                "ip6tables -t nat -A PREROUTING -d 2001:db8::10 -j REDIRECT",
            ]
        );
        let progress = String::from_utf8(progress).expect("utf-8");
        assert!(
            progress.starts_with(
                "in place: iptables -t nat -A PREROUTING -d 198.18.0.100 -j REDIRECT\n\
                 done:     ip6tables -t nat -A PREROUTING -d 2001:db8::10 -j REDIRECT\n\n\
                 Applied iptables for 198.18.0.100 2001:db8::10 on this host, until it restarts.\n\n\
                 # To keep this across reboots:\n"
            ),
            "{progress}"
        );
    }

    #[test]
    fn apply_stops_at_the_first_failure_naming_the_command_and_what_it_said() {
        let plan = plan_of(&[V4, V6], Method::Loopback, &[]);
        let mut fake = FakeRunner::new(vec![
            ran(true, ""),
            ran(false, "RTNETLINK answers: Operation not permitted\n"),
        ]);
        let error = apply(&plan, &mut |argv| fake.run(argv), &mut Vec::new()).expect_err("fails");
        assert_eq!(
            error,
            "step 2 of 3 failed: `ip addr replace 198.18.0.100/32 dev lo` ended with exit status \
             4: RTNETLINK answers: Operation not permitted; step 1 is in place"
        );
        assert_eq!(fake.calls.len(), 2, "nothing after the failure runs");

        let mut fake =
            FakeRunner::new(vec![
                Err("cannot run nft: No such file or directory".into()),
            ]);
        let plan = plan_of(&[V4], Method::Nftables, &[]);
        let error = apply(&plan, &mut |argv| fake.run(argv), &mut Vec::new()).expect_err("fails");
        assert_eq!(
            error,
            "step 1 of 1 failed: cannot run nft: No such file or directory; nothing was changed"
        );
    }

    #[test]
    fn commands_run_without_a_shell_and_report_how_they_ended() {
        let words = |w: &[&str]| w.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            run_command(&words(&["sh", "-c", "echo oops >&2; exit 3"])),
            Ok(Ran {
                success: false,
                status: "exit status 3".into(),
                stderr: "oops\n".into(),
            })
        );
        assert!(run_command(&words(&["true"])).is_ok_and(|ran| ran.success));
        // No shell: the words reach the program as they are.
        assert_eq!(
            run_command(&words(&["sh", "-c", "[ \"$0\" = 'a;b' ]", "a;b"])).map(|ran| ran.success),
            Ok(true)
        );
        let missing = run_command(&words(&["lbd-no-such-program"])).expect_err("missing");
        assert!(
            missing.starts_with("cannot run lbd-no-such-program: "),
            "{missing}"
        );
        assert!(run_command(&[]).is_err());
    }

    #[test]
    fn the_effective_uid_is_the_second_field() {
        assert_eq!(effective_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n"), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn the_command_line_parses_into_a_plan() {
        let cli = Cli::try_parse_from([
            "lbctl", "dr-setup", "--vip", V4, "--vip", V6, "--method", "nftables", "--apply",
        ])
        .expect("parses");
        let Verb::DrSetup(args) = cli.command else {
            panic!("not dr-setup: {:?}", cli.command)
        };
        assert_eq!(args.vips, [ip(V4), ip(V6)]);
        assert_eq!(args.method, Method::Nftables);
        assert!(args.apply);
        let cli = Cli::try_parse_from(["lbctl", "dr-setup", "--vip", V4, "--interface", "eth0"])
            .expect("parses");
        let Verb::DrSetup(args) = cli.command else {
            panic!("not dr-setup")
        };
        assert_eq!(
            (args.method, args.interfaces.as_slice()),
            (Method::Loopback, &["eth0".to_owned()][..])
        );
        assert!(!args.apply);
        for bad in [
            &["lbctl", "dr-setup"][..],
            &["lbctl", "dr-setup", "--vip", "198.18.0"],
            &["lbctl", "dr-setup", "--vip", V4, "--method", "ipvs"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from(["lbctl", "dr-setup", "--vip", V4]).expect("parses");
        assert!(cli.command.into_command().is_err(), "nothing goes to lbd");
    }

    #[test]
    fn json_gives_every_command_as_its_argv() {
        let plan = plan_of(&[V4], Method::Iptables, &[]);
        let value = json(&plan);
        assert_eq!(value["method"], "iptables");
        assert_eq!(value["vips"], serde_json::json!([V4]));
        assert_eq!(
            value["steps"][0]["argv"],
            serde_json::json!(plan.steps[0].argv)
        );
        assert_eq!(value["steps"][0]["argv"][6], V4);
        assert_eq!(value["steps"][0]["unless"][3], "-C");
        assert_eq!(value["persistence"][0]["text"], plan.persistence[0].text);
    }
}
