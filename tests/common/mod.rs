//! Shared parts of the lab tests: the namespace lab (scripts/lab) and a running lbd, each torn
//! down by a guard even when the test fails.
#![allow(dead_code, reason = "each test file uses its own subset")]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const LBD: &str = env!("CARGO_BIN_EXE_lbd");
pub const VIP: &str = "198.18.0.100";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("engine/ sits in the workspace")
        .to_path_buf()
}

/// Programs the lab tests run, with the Debian package of each (scripts/install-deps installs
/// them all).
const LAB_PROGRAMS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("sysctl", "procps"),
    ("nginx", "nginx"),
    ("curl", "curl"),
    ("ffmpeg", "ffmpeg"),
    ("ffprobe", "ffmpeg"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("ip6tables", "iptables"),
    ("keepalived", "keepalived"),
    ("haproxy", "haproxy"),
    ("firewalld", "firewalld"),
    ("firewall-cmd", "firewalld"),
    ("dbus-daemon", "dbus-daemon"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("chromium", "chromium"),
    ("dpkg-deb", "dpkg"),
    ("systemd-analyze", "systemd"),
    ("arping", "arping"),
    ("ping", "iputils-ping"),
    ("python3", "python3"),
    ("setpriv", "util-linux"),
];

/// Whether `program` is an executable file on the PATH.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// True when the lab can run; false (skip) only outside CI, without root. A skipped test is
/// recorded in the file `LBD_TEST_SKIPS` names (scripts/test sets it and counts them), so the
/// suite's closing line says skipped, not passed. A missing program fails the test, naming it
/// and its package.
pub fn lab_allowed() -> bool {
    // `id -u` rather than a libc call: the tests stay free of unsafe code.
    let uid = Command::new("id").arg("-u").output().expect("run id");
    let root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    if !root {
        assert!(
            std::env::var("CI").is_err(),
            "the lab tests must run as root in CI (network namespaces, XDP, AF_XDP)"
        );
        let test = std::thread::current()
            .name()
            .unwrap_or("a lab test")
            .to_owned();
        eprintln!("skipping {test}: the lab tests need root (network namespaces, XDP, AF_XDP)");
        if let Some(file) = std::env::var_os("LBD_TEST_SKIPS") {
            use std::io::Write;
            let _ = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .and_then(|mut f| writeln!(f, "{test}"));
        }
        return false;
    }
    for (program, package) in LAB_PROGRAMS {
        assert!(
            on_path(program),
            "the lab tests run `{program}`, which is not installed: apt-get install {package} \
             (or run scripts/install-deps, which installs everything the tests use)"
        );
    }
    true
}

pub fn unique_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // At most 8 characters, as scripts/lab requires: t + 4 hex digits of the pid + counter.
    format!("t{:04x}{}", std::process::id() & 0xffff, n % 1000)
}

pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// A lab of namespaces; torn down on drop.
pub struct Lab {
    pub name: String,
    pub facts: HashMap<String, String>,
}

impl Lab {
    pub fn up(servers: usize) -> Lab {
        Lab::up_with(servers, 1)
    }

    /// A lab with two balancers (NS_LB at .2, NS_LB2 at .3), for an HA pair.
    pub fn up_pair(servers: usize) -> Lab {
        Lab::up_with(servers, 2)
    }

    fn up_with(servers: usize, balancers: usize) -> Lab {
        Lab::up_with_options(servers, balancers, &[])
    }

    /// A lab with `scripts/lab up`'s further `options` (`--vip`, `--http-port`).
    pub fn up_with_options(servers: usize, balancers: usize, options: &[&str]) -> Lab {
        let name = unique_name();
        let lab = repo_root().join("scripts/lab");
        let output = run(Command::new(&lab)
            .args([
                "up",
                &name,
                "--servers",
                &servers.to_string(),
                "--clients",
                "24",
                "--balancers",
                &balancers.to_string(),
            ])
            .args(options));
        // Constructed before the check so that a half-built lab is torn down too.
        let mut lab_guard = Lab {
            name: name.clone(),
            facts: HashMap::new(),
        };
        assert!(
            output.status.success(),
            "scripts/lab up {name} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let show = run(Command::new(&lab).args(["show", &name]));
        assert!(show.status.success(), "scripts/lab show {name} failed");
        lab_guard.facts = String::from_utf8_lossy(&show.stdout)
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        lab_guard
    }

    pub fn fact(&self, key: &str) -> &str {
        self.facts
            .get(key)
            .unwrap_or_else(|| panic!("scripts/lab show has no {key}"))
    }

    /// Runs a command inside one of the lab's namespaces.
    pub fn exec(&self, namespace_key: &str, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", self.fact(namespace_key)])
            .args(args))
    }

    pub fn client_ips(&self) -> Vec<String> {
        self.fact("CLIENT_IPS")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// An lbd config for this lab: GUI on 8088 and streaming on 1935, both source-IP.
    pub fn config(&self, servers: usize) -> String {
        let mut text = format!(
            "[engine]\ninterface = \"{}\"\nqueues = [0]\nxdp_mode = \"auto\"\n\
             control_socket = \"/tmp/lbd-lab/{}/lbd.sock\"\n",
            self.fact("LB_IF"),
            self.name
        );
        for (label, port) in [("Wowza GUI", 8088), ("Wowza Streaming", 1935)] {
            text += &format!(
                "\n[[service]]\nlabel = \"{label}\"\nvip = \"{VIP}\"\nports = {port}\n\
                 protocol = \"tcp\"\npersistence = \"source-ip\"\n"
            );
            text += &self.real_servers(servers, "IP");
        }
        text
    }

    /// `[[service.real_server]]` tables for servers 1..=`servers` ("Wowza Srv I"), at their
    /// `family` address: "IP" or "IP6".
    pub fn real_servers(&self, servers: usize, family: &str) -> String {
        (1..=servers)
            .map(|i| {
                format!(
                    "\n[[service.real_server]]\nlabel = \"Wowza Srv {i}\"\nip = \"{}\"\n",
                    self.fact(&format!("RS{i}_{family}"))
                )
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/lab"))
            .args(["down", &self.name])
            .stdout(Stdio::null())
            .status();
    }
}

/// A running lbd inside the lab's balancer namespace; stopped on drop.
pub struct Lbd {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Lbd {
    pub fn start(lab: &Lab, config: &str) -> Lbd {
        Lbd::start_in(lab, "NS_LB", "lbd.toml", config)
    }

    /// lbd in the namespace `namespace_key` names, with `config` written to STATE_DIR/`file`.
    pub fn start_in(lab: &Lab, namespace_key: &str, file: &str, config: &str) -> Lbd {
        let dir = PathBuf::from(lab.fact("STATE_DIR"));
        let config_path = dir.join(file);
        fs::write(&config_path, config).expect("write lbd config");
        let log = dir.join(format!("lbd-{}.log", unique_name()));
        let log_file = fs::File::create(&log).expect("create lbd log");
        let child = Command::new("ip")
            .args(["netns", "exec", lab.fact(namespace_key), LBD, "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start lbd");
        let mut lbd = Lbd {
            child: Some(child),
            log,
        };
        lbd.wait_for_log("lbd running", Duration::from_secs(20));
        lbd
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "lbd exited ({status}) before `{needle}`:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "lbd did not log `{needle}` in {limit:?}:\n{}",
            self.log_text()
        );
    }

    /// Sends `signal` (TERM, INT), then returns the exit status and the log.
    /// Sends `signal` (`HUP`, ...) and returns at once.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let sent = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status();
            assert!(sent.is_ok_and(|s| s.success()), "kill -{signal} lbd");
        }
    }

    pub fn stop_with(mut self, signal: &str) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait for lbd") {
                return (status, self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "lbd did not stop within 10 s of SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(self) -> (std::process::ExitStatus, String) {
        self.stop_with("TERM")
    }
}

impl Drop for Lbd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("lbd log ({}):\n{}", self.log.display(), self.log_text());
        }
    }
}

impl Lab {
    /// The control socket path the lab's configs use.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/lbd-lab/{}/lbd.sock", self.name))
    }
}

/// The `lbctl` binary built beside `lbd` (scripts/test builds every binary first).
pub fn lbctl_path() -> PathBuf {
    let path = Path::new(LBD).with_file_name("lbctl");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build --workspace --bins; scripts/test does)",
        path.display()
    );
    path
}

/// Runs `lbctl --socket <lab socket> ARGS...`; returns (exit code, stdout, stderr).
pub fn lbctl(lab: &Lab, args: &[&str]) -> (i32, String, String) {
    let output = run(Command::new(lbctl_path())
        .arg("--socket")
        .arg(lab.socket())
        .args(args));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A copy of `lbctl` that any user may run (the build directory may not be theirs to read),
/// in the lab's state directory.
pub fn lbctl_for_anyone(lab: &Lab) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let copy = PathBuf::from(lab.fact("STATE_DIR")).join("lbctl");
    if !copy.exists() {
        fs::copy(lbctl_path(), &copy).expect("copy lbctl");
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod lbctl");
    }
    copy
}

/// Runs a program as user 65534 (nobody) with primary group 65533 and, when `in_group`, the
/// supplementary group `nogroup` (65534): a member of that control group by its supplementary
/// groups only, or nobody at all. Returns (exit code, stdout, stderr).
pub fn as_unprivileged(in_group: bool, program: &Path, args: &[&str]) -> (i32, String, String) {
    let groups = if in_group {
        "--groups=65534"
    } else {
        "--clear-groups"
    };
    let output = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65533", groups])
        .arg(program)
        .args(args));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `lbctl --json status`.
pub fn status(lab: &Lab) -> lbd_proto::StatusReport {
    let text = lbctl_ok(lab, &["--json", "status"]);
    match serde_json::from_str::<lbd_proto::Reply>(&text) {
        Ok(lbd_proto::Reply::Status(report)) => report,
        other => panic!("lbctl --json status gave {other:?} from {text}"),
    }
}

/// `lbctl --json stats`.
pub fn stats(lab: &Lab) -> lbd_proto::StatsReport {
    let text = lbctl_ok(lab, &["--json", "stats"]);
    match serde_json::from_str::<lbd_proto::Reply>(&text) {
        Ok(lbd_proto::Reply::Stats(report)) => *report,
        other => panic!("lbctl --json stats gave {other:?} from {text}"),
    }
}

/// Runs lbd in the balancer's namespace with `config` (written to STATE_DIR/`name`), which
/// must make it fail to start; returns what it said.
pub fn start_error(lab: &Lab, name: &str, config: &str) -> String {
    let path = PathBuf::from(lab.fact("STATE_DIR")).join(name);
    fs::write(&path, config).expect("write config");
    let output = lab.exec("NS_LB", &[LBD, "--config", path.to_str().expect("utf-8")]);
    assert!(!output.status.success(), "lbd started with {name}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs lbctl and insists on success, returning stdout.
pub fn lbctl_ok(lab: &Lab, args: &[&str]) -> String {
    let (code, stdout, stderr) = lbctl(lab, args);
    assert_eq!(code, 0, "lbctl {args:?} failed: {stderr}{stdout}");
    stdout
}

/// Runs tests/clients/keepalive.py in the client namespace from `sources` (long-lived
/// connections) and `fresh` (new clients) for `seconds`, calls `during` a second in, and
/// returns whether the client passed and its JSON summary.
pub fn keepalive_while(
    lab: &Lab,
    sources: &[String],
    fresh: &[String],
    seconds: u32,
    during: impl FnOnce(),
) -> (bool, serde_json::Value) {
    keepalive_every(lab, sources, fresh, seconds, 0.1, during)
}

/// [`keepalive_while`] with a request on every connection every `every` seconds.
pub fn keepalive_every(
    lab: &Lab,
    sources: &[String],
    fresh: &[String],
    seconds: u32,
    every: f64,
    during: impl FnOnce(),
) -> (bool, serde_json::Value) {
    let script = repo_root().join("tests/clients/keepalive.py");
    let client = std::process::Command::new("ip")
        .args(["netns", "exec", lab.fact("NS_CLIENT"), "python3"])
        .arg(&script)
        .args(["--vip", VIP, "--seconds", &seconds.to_string()])
        .args(["--every", &every.to_string()])
        .args(["--sources", &sources.join(" "), "--fresh", &fresh.join(" ")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the keep-alive client");
    std::thread::sleep(Duration::from_millis(1000));
    during();
    let output = client.wait_with_output().expect("keep-alive client ends");
    let summary = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "keep-alive client output: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), summary)
}

/// An HTTP GET of `url` from the client namespace, from `source`: the lab server's answer
/// (`server=rsI client=<address seen> xff=<X-Forwarded-For>`) as its words' pairs.
pub fn http_get(lab: &Lab, source: &str, url: &str) -> HashMap<String, String> {
    http_get_with(lab, source, &[], url)
}

/// [`http_get`] with further curl options (`--local-port 45001`).
pub fn http_get_with(
    lab: &Lab,
    source: &str,
    options: &[&str],
    url: &str,
) -> HashMap<String, String> {
    let mut args = vec!["curl", "-sS", "--max-time", "5", "--interface", source];
    args.extend_from_slice(options);
    args.push(url);
    let output = lab.exec("NS_CLIENT", &args);
    assert!(
        output.status.success(),
        "curl from {source} to {url}: {output:?}"
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Publishes a test stream through `url` for `seconds`, in the background.
pub fn publish(lab: &Lab, url: &str, seconds: u32) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", lab.fact("NS_CLIENT")])
        .args([
            "timeout",
            "60",
            "ffmpeg",
            "-nostdin",
            "-hide_banner",
            "-loglevel",
            "error",
        ])
        .args(["-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"])
        .args(["-t", &seconds.to_string(), "-c:v", "flv", "-f", "flv", url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ffmpeg")
}

pub fn finished(publisher: std::process::Child) {
    let output = publisher.wait_with_output().expect("ffmpeg ends");
    assert!(
        output.status.success(),
        "the stream broke: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The servers (1-based) that recorded a stream named `name`, with the bytes recorded.
pub fn recorded(lab: &Lab, count: usize, name: &str) -> Vec<(usize, u64)> {
    (1..=count)
        .filter_map(|i| {
            let dir = PathBuf::from(lab.fact(&format!("RS{i}_RECORD_DIR")));
            let bytes: u64 = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(name))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            (bytes > 0).then_some((i, bytes))
        })
        .collect()
}

/// Waits (at most `limit`) until `lbctl status` shows `state` for `service`'s server `label`.
pub fn wait_for_state(lab: &Lab, service: &str, label: &str, state: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let report = status(lab);
        let now = report
            .services
            .iter()
            .find(|s| s.label == service)
            .and_then(|s| s.real_servers.iter().find(|rs| rs.label == label))
            .map(|rs| rs.state.clone())
            .unwrap_or_default();
        if now == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service}/{label} is {now:?}, not {state}, after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn nginx(lab: &Lab, server: usize, stop: bool) {
    let dir = lab.fact(&format!("RS{server}_DIR"));
    let namespace = format!("NS_RS{server}");
    let output = if stop {
        lab.exec(
            &namespace,
            &[
                "nginx",
                "-p",
                dir,
                "-c",
                &format!("{dir}/nginx.conf"),
                "-s",
                "stop",
            ],
        )
    } else {
        lab.exec(
            &namespace,
            &[
                "nginx",
                "-p",
                dir,
                "-e",
                &format!("{dir}/error.log"),
                "-c",
                &format!("{dir}/nginx.conf"),
            ],
        )
    };
    assert!(output.status.success(), "nginx on rs{server}: {output:?}");
}
