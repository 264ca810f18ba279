//! The HAProxy process lbd runs for its SNAT services: master-worker mode, one thread that
//! owns it.
//!
//! Every configuration is checked with `haproxy -c` before it is used; a refused one changes
//! nothing and its error is HAProxy's own. The first starts HAProxy; a different one is a
//! seamless reload (SIGUSR2 to the master: the new worker takes the listening sockets over the
//! admin socket, `expose-fd listeners`, and the old one finishes its connections); the same
//! one again does nothing. HAProxy's output goes to lbd's log. If it dies, it is started again
//! with backoff (1 s, doubling, at most 30 s); when the supervisor is dropped it is stopped.
//! It is started from the supervisor's thread with `PR_SET_PDEATHSIG`, so it never outlives
//! lbd.

use crate::l7::haproxy::Setup;
use crate::l7::runtime::{self, Stat};
use crossbeam::channel::{Receiver, Sender, bounded, unbounded};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a new HAProxy process (or a reloaded worker) may take to answer its admin socket.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait before a dead HAProxy is started again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// HAProxy's last lines of output, kept for the error when it does not start.
const KEPT_LINES: usize = 8;

/// Where the `haproxy` program is on the PATH, or why lbd cannot run SNAT services.
pub fn find_haproxy() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| {
            "a mode = \"snat\" service needs HAProxy, which is not installed \
             (apt-get install haproxy)"
                .to_owned()
        })
}

/// Checks `file` with `haproxy -c`; HAProxy's complaint when it refuses it.
fn check(program: &Path, file: &Path) -> Result<(), String> {
    let output = Command::new(program)
        .arg("-c")
        .arg("-q")
        .arg("-f")
        .arg(file)
        .output()
        .map_err(|e| format!("running {}: {e}", program.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    let said: Vec<&str> = said
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    Err(format!(
        "HAProxy refused the configuration: {}",
        said.join("; ")
    ))
}

enum Request {
    Apply(String, Sender<Result<(), String>>),
    Remember(String, Sender<Result<(), String>>),
}

/// The running supervisor.
#[derive(Debug)]
pub struct Supervisor {
    requests: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    admin_socket: PathBuf,
}

impl Supervisor {
    /// Starts the supervisor's thread for HAProxy's files in `setup.dir` (created, mode 700).
    /// HAProxy itself starts with the first [`Supervisor::apply`].
    pub fn start(setup: &Setup) -> Result<Supervisor, String> {
        let program = find_haproxy()?;
        std::fs::create_dir_all(&setup.dir)
            .and_then(|()| {
                std::fs::set_permissions(&setup.dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| format!("{}: {e}", setup.dir.display()))?;
        let (requests, incoming) = unbounded();
        let process = Process {
            program,
            setup: setup.clone(),
            child: None,
            running: None,
            lines: Arc::default(),
            restart: None,
        };
        let thread = std::thread::Builder::new()
            .name("lbd-haproxy".to_owned())
            .spawn(move || process.run(&incoming))
            .map_err(|e| format!("starting the HAProxy supervisor: {e}"))?;
        Ok(Supervisor {
            requests: Some(requests),
            thread: Some(thread),
            admin_socket: setup.admin_socket(),
        })
    }

    /// Makes `config` HAProxy's configuration: checked, then started or reloaded (nothing
    /// when it is the one running). On an error what ran before runs on.
    pub fn apply(&self, config: &str) -> Result<(), String> {
        self.ask(|reply| Request::Apply(config.to_owned(), reply))
    }

    /// Sends the thread a request and waits for its answer.
    fn ask(
        &self,
        request: impl FnOnce(Sender<Result<(), String>>) -> Request,
    ) -> Result<(), String> {
        const STOPPED: &str = "the HAProxy supervisor has stopped";
        let (reply, answer) = bounded(1);
        self.requests
            .as_ref()
            .ok_or(STOPPED)?
            .send(request(reply))
            .map_err(|_| STOPPED.to_owned())?;
        answer.recv().map_err(|_| STOPPED.to_owned())?
    }

    /// Makes `config` what a restart starts from, without a reload: HAProxy already runs it
    /// (runtime changes brought it there).
    pub fn remember(&self, config: &str) -> Result<(), String> {
        self.ask(|reply| Request::Remember(config.to_owned(), reply))
    }

    /// A runtime API command that answers nothing when it works.
    pub fn change(&self, line: &str) -> Result<(), String> {
        runtime::change(&self.admin_socket, line)
    }

    /// `show stat`, or nothing while HAProxy does not answer.
    pub fn stats(&self) -> Vec<Stat> {
        runtime::command(&self.admin_socket, "show stat")
            .map(|csv| runtime::parse_stat(&csv))
            .unwrap_or_default()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // The thread stops HAProxy when its channel closes.
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Process {
    program: PathBuf,
    setup: Setup,
    child: Option<Child>,
    /// The configuration HAProxy runs.
    running: Option<String>,
    /// Its last lines of output.
    lines: Arc<Mutex<VecDeque<String>>>,
    /// When to start it again after it died, and the wait after that.
    restart: Option<(Instant, Duration)>,
}

impl Process {
    fn run(mut self, requests: &Receiver<Request>) {
        loop {
            match requests.recv_timeout(Duration::from_millis(200)) {
                Ok(Request::Apply(config, reply)) => {
                    let _ = reply.send(self.apply(config));
                }
                Ok(Request::Remember(config, reply)) => {
                    let file = self.setup.config_file();
                    let written = crate::control::write_atomically(&file, config.as_bytes())
                        .map_err(|e| format!("{}: {e}", file.display()));
                    if written.is_ok() {
                        self.running = Some(config);
                    }
                    let _ = reply.send(written);
                }
                Err(crossbeam::channel::RecvTimeoutError::Timeout) => self.watch(),
                Err(crossbeam::channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.stop();
    }

    fn apply(&mut self, config: String) -> Result<(), String> {
        if self.running.as_deref() == Some(config.as_str()) && self.child.is_some() {
            return Ok(());
        }
        let file = self.setup.config_file();
        let candidate = file.with_extension("cfg.new");
        crate::control::write_atomically(&candidate, config.as_bytes())
            .map_err(|e| format!("{}: {e}", candidate.display()))?;
        if let Err(refused) = check(&self.program, &candidate) {
            let _ = std::fs::remove_file(&candidate);
            return Err(refused);
        }
        std::fs::rename(&candidate, &file).map_err(|e| format!("{}: {e}", file.display()))?;
        let result = if self.child.is_some() {
            self.reload()
        } else {
            self.spawn()
        };
        if result.is_ok() {
            self.running = Some(config);
            self.restart = None;
        }
        result
    }

    /// Starts HAProxy on the configuration file and waits until it answers.
    fn spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new(&self.program);
        command
            .arg("-W")
            .arg("-db")
            .arg("-S")
            .arg(self.setup.master_socket())
            .arg("-f")
            .arg(self.setup.config_file())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::io::sys::die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.program.display()))?;
        for output in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = Arc::clone(&self.lines);
            let _ = std::thread::Builder::new()
                .name("lbd-haproxy-log".to_owned())
                .spawn(move || forward(output, &lines));
        }
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "HAProxy stopped at start ({status}): {}",
                    self.last_lines()
                ));
            }
            if runtime::command(&self.setup.admin_socket(), "show info").is_ok() {
                tracing::info!(pid = child.id(), "HAProxy running");
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "HAProxy did not answer within {READY_TIMEOUT:?}: {}",
            self.last_lines()
        ))
    }

    /// A seamless reload: the master starts a new worker on the (checked) file, which takes
    /// the listening sockets over; waits until the new worker answers.
    fn reload(&mut self) -> Result<(), String> {
        let admin = self.setup.admin_socket();
        let worker = || worker_pid(&admin);
        let before = worker();
        let master = self.child.as_ref().map(Child::id).unwrap_or_default();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(master).unwrap_or(0));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2)
            .map_err(|e| format!("reloading HAProxy: {e}"))?;
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            let now = worker();
            if now.is_some() && now != before {
                tracing::info!(worker = now, "HAProxy reloaded");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "HAProxy's new worker did not answer within {READY_TIMEOUT:?}: {}",
            self.last_lines()
        ))
    }

    /// Starts HAProxy again, with backoff, if it died.
    fn watch(&mut self) {
        let Some(child) = &mut self.child else {
            if let (Some((at, wait)), Some(config)) = (self.restart, self.running.clone())
                && Instant::now() >= at
            {
                self.running = None;
                if let Err(error) = self.apply(config.clone()) {
                    tracing::error!(%error, "HAProxy did not start again");
                    self.running = Some(config);
                    let wait = (wait * 2).min(MAX_BACKOFF);
                    self.restart = Some((Instant::now() + wait, wait));
                }
            }
            return;
        };
        if let Ok(Some(status)) = child.try_wait() {
            tracing::error!(%status, last = %self.last_lines(), "HAProxy stopped; starting it again");
            self.child = None;
            let wait = Duration::from_secs(1);
            self.restart = Some((Instant::now() + wait, wait));
        }
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                tracing::info!("HAProxy stopped");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn last_lines(&self) -> String {
        self.lines
            .lock()
            .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("; "))
            .unwrap_or_default()
    }
}

/// The current worker's pid, from `show info`.
fn worker_pid(admin: &Path) -> Option<u32> {
    let info = runtime::command(admin, "show info").ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("Pid: "))
        .and_then(|pid| pid.trim().parse().ok())
}

/// HAProxy's output into lbd's log, keeping the last lines.
fn forward(output: Box<dyn std::io::Read + Send>, lines: &Mutex<VecDeque<String>>) {
    for line in BufReader::new(output).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        tracing::info!(target: "haproxy", "{line}");
        if let Ok(mut kept) = lines.lock() {
            if kept.len() == KEPT_LINES {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    }
}
