//! Health checks: from the host's own stack to each real server's own IP, off the packet path.
//!
//! One scheduler thread keeps every target's next due time and hands due checks to a
//! [`Checker`]. [`NetworkChecker`] runs them side by side, so a server that never answers
//! delays no other server's check: each starts when due and ends within its own
//! `timeout_ms`, however many others are timing out. Results go through [`Tracker`], the
//! rise/fall state machine (keepalived's and HAProxy's semantics): `fall` consecutive failures
//! take an up server down, `rise` consecutive successes bring it back. A change of state is
//! reported to the caller, which republishes the configuration.

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, unbounded};
use hashbrown::Equivalent;
use lbd_config::{HealthCheck, HealthKind};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// TCP and HTTP checks in flight at most; more wait for one to end. Each holds a socket, and
/// a process may have 1024 descriptors open by default.
pub const MAX_PROBES: usize = 512;
/// External checks' commands running at most; more wait for one to end.
pub const MAX_COMMANDS: usize = 64;
/// How often running commands are looked at.
const COMMAND_POLL: Duration = Duration::from_millis(5);

/// How long a new real server waits for its first check at most, and lbd's stop for the
/// health checker.
pub const LOOK_FOR_NEW_TARGETS: Duration = Duration::from_millis(200);

/// The scheduler looks at the targets at most this often: a check starts at most this late.
const TICK: Duration = Duration::from_millis(20);
/// The most of an HTTP response a check reads.
const MAX_HTTP_RESPONSE: usize = 64 * 1024;

/// What is checked: a real server of a service, with its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The service's label.
    pub service: String,
    /// The real server's label.
    pub label: String,
    /// The service's VIP (for external commands).
    pub vip: IpAddr,
    /// The real server's own address.
    pub ip: IpAddr,
    /// The port checked.
    pub port: u16,
    /// How.
    pub check: HealthCheck,
}

impl Target {
    /// (service, real server): how targets are named.
    pub fn key(&self) -> (String, String) {
        (self.service.clone(), self.label.clone())
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// Passed?
    pub ok: bool,
    /// What was seen: `connected`, `HTTP 200`, `exit 0`, or the error.
    pub detail: String,
    /// How long the check took.
    pub took: Duration,
}

/// A server's health as the checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Up (takes traffic) or down.
    pub up: bool,
    /// The last check's result and when it ended.
    pub last: Option<(SystemTime, CheckResult)>,
    /// What the checks did so far (for `/metrics`).
    pub counts: lbd_proto::HealthCounts,
    successes: u32,
    failures: u32,
}

impl Default for Health {
    /// Servers start up: traffic flows from the start, and `fall` failures take a dead one out.
    fn default() -> Self {
        Health {
            up: true,
            last: None,
            counts: lbd_proto::HealthCounts::default(),
            successes: 0,
            failures: 0,
        }
    }
}

/// The rise/fall state machine.
#[derive(Debug, Default)]
pub struct Tracker {
    health: hashbrown::HashMap<(String, String), Health>,
    /// Counts the changes of any server's [`Tracker::is_up`].
    ups_changed: u64,
}

impl Tracker {
    /// Records a result; returns the new state when it changed.
    pub fn record(
        &mut self,
        key: (String, String),
        check: &HealthCheck,
        result: CheckResult,
        at: SystemTime,
    ) -> Option<bool> {
        let health = self.health.entry(key).or_default();
        health.counts.checks += 1;
        health.counts.last_micros = u64::try_from(result.took.as_micros()).unwrap_or(u64::MAX);
        if result.ok {
            health.successes = health.successes.saturating_add(1);
            health.failures = 0;
        } else {
            health.counts.failed += 1;
            health.failures = health.failures.saturating_add(1);
            health.successes = 0;
        }
        health.last = Some((at, result));
        let changed = if health.up && health.failures >= check.fall {
            health.up = false;
            health.counts.went_down += 1;
            true
        } else if !health.up && health.successes >= check.rise {
            health.up = true;
            health.counts.went_up += 1;
            true
        } else {
            false
        };
        self.ups_changed += u64::from(changed);
        changed.then_some(health.up)
    }

    /// A server's health (up with no result for an unchecked one).
    pub fn get<Q: Hash + Equivalent<(String, String)>>(&self, key: &Q) -> Health {
        self.health.get(key).cloned().unwrap_or_default()
    }

    /// Whether a server takes traffic (servers start up), without a copy of its last result.
    pub fn is_up<Q: Hash + Equivalent<(String, String)>>(&self, key: &Q) -> bool {
        self.health.get(key).is_none_or(|health| health.up)
    }

    /// Sets a server up or down, as another node's checks found it: the next results count
    /// from there.
    pub fn set(&mut self, key: (String, String), up: bool) {
        let health = self.health.entry(key).or_default();
        if health.up != up {
            health.up = up;
            health.successes = 0;
            health.failures = 0;
            self.ups_changed += 1;
        }
    }

    /// Forgets servers that are no longer checked.
    pub fn retain(&mut self, keep: impl Fn(&(String, String)) -> bool) {
        self.health.retain(|key, _| keep(key));
    }

    /// How many times a server's [`Tracker::is_up`] changed so far: equal counts mean every
    /// server still checked is as up as it was (a server forgotten by [`Tracker::retain`] is
    /// in no configuration any more).
    pub fn ups_changed(&self) -> u64 {
        self.ups_changed
    }

    /// Whether no server has a result yet.
    pub fn is_empty(&self) -> bool {
        self.health.is_empty()
    }
}

/// A check to run and where its result goes.
#[derive(Debug)]
struct Job {
    target: Target,
    results: Sender<Done>,
}

impl Job {
    /// Sends the result of a check that started at `started`.
    fn finish(self, started: Instant, outcome: Result<String, String>) {
        let (ok, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        let result = CheckResult {
            ok,
            detail,
            took: started.elapsed(),
        };
        let _ = self.results.send(Done {
            target: self.target,
            result,
        });
    }
}

/// The HTTP check's request.
fn http_request(target: &Target) -> Vec<u8> {
    let host = target
        .check
        .host
        .clone()
        .unwrap_or_else(|| match target.ip {
            IpAddr::V4(v4) => v4.to_string(),
            // RFC 9110 7.2: an IPv6 literal in brackets.
            IpAddr::V6(v6) => format!("[{v6}]"),
        });
    format!(
        "GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n",
        target.check.path
    )
    .into_bytes()
}

/// Whether an HTTP response (all of it, or its first [`MAX_HTTP_RESPONSE`] bytes) passes.
fn judge_http_response(target: &Target, response: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(response);
    let status: u16 = text
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| "no HTTP status line".to_owned())?;
    if status != target.check.expect_status {
        return Err(format!(
            "HTTP {status}, expected {}",
            target.check.expect_status
        ));
    }
    if let Some(expected) = &target.check.expect_body {
        let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        if !body.contains(expected.as_str()) {
            return Err(format!("HTTP {status}, body lacks {expected:?}"));
        }
    }
    Ok(format!("HTTP {status}"))
}

/// Starts the external check's command with `sh -c` in a process group of its own, so that on
/// a timeout the whole group (a pipeline, whatever it started) is killed, not just the shell.
fn spawn_command(target: &Target) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let command = target.check.command.as_deref().unwrap_or("false");
    Command::new("sh")
        .process_group(0)
        .args(["-c", command])
        .env("LBD_RS_IP", target.ip.to_string())
        .env("LBD_RS_PORT", target.port.to_string())
        .env("LBD_SERVICE", &target.service)
        .env("LBD_VIP", target.vip.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))
}

/// An external check's command, running.
#[derive(Debug)]
struct Running {
    job: Job,
    child: Child,
    started: Instant,
    deadline: Instant,
}

impl Running {
    /// The outcome once the command has exited or its time has run out (then it is killed).
    fn outcome(&mut self, now: Instant) -> Option<Result<String, String>> {
        match self.child.try_wait() {
            Ok(Some(status)) if status.success() => Some(Ok("exit 0".to_owned())),
            Ok(Some(status)) => Some(Err(format!("{status}"))),
            Ok(None) if now >= self.deadline => {
                self.kill();
                Some(Err(format!(
                    "timed out after {} ms",
                    self.job.target.check.timeout_ms
                )))
            }
            Ok(None) => None,
            Err(e) => {
                self.kill();
                Some(Err(format!("waiting for the command: {e}")))
            }
        }
    }

    /// Kills the command's whole process group and reaps the shell.
    fn kill(&mut self) {
        // The shell is not reaped yet, so its pid still names its group.
        if let Ok(group) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The external checks' thread: starts the commands handed to it, up to [`MAX_COMMANDS`] at
/// once, looks at them every [`COMMAND_POLL`] while any runs, kills each at its deadline, and
/// returns when its queue is closed (killing what still runs).
fn run_commands_until_closed(queue: &Receiver<Job>) {
    let mut running: Vec<Running> = Vec::new();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        let next = if running.is_empty() && waiting.is_empty() {
            queue.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            queue.recv_timeout(COMMAND_POLL)
        };
        match next {
            Ok(job) => waiting.push_back(job),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        waiting.extend(queue.try_iter());
        while running.len() < MAX_COMMANDS
            && let Some(job) = waiting.pop_front()
        {
            let started = Instant::now();
            match spawn_command(&job.target) {
                Ok(child) => running.push(Running {
                    deadline: started
                        + Duration::from_millis(u64::from(job.target.check.timeout_ms)),
                    job,
                    child,
                    started,
                }),
                Err(e) => job.finish(started, Err(e)),
            }
        }
        let now = Instant::now();
        let mut at = 0;
        while at < running.len() {
            if let Some(outcome) = running[at].outcome(now) {
                let ended = running.swap_remove(at);
                ended.job.finish(ended.started, outcome);
            } else {
                at += 1;
            }
        }
    }
    for mut command in running {
        command.kill();
    }
}

/// Runs checks: the door to the network that the scheduler goes through (a fake in tests).
pub trait Checker: Send {
    /// Starts a check of `target` and returns at once. Its result goes to `results` when the
    /// check ends, at most its `timeout_ms` after it starts.
    fn start(&mut self, target: Target, results: &Sender<Done>);
}

/// Checks over the host's own network stack. TCP and HTTP checks run on one thread that keeps
/// all of them in flight at once (non-blocking sockets under epoll, up to [`MAX_PROBES`]);
/// external checks' commands run side by side too (up to [`MAX_COMMANDS`]), watched by a
/// second thread. So a server that never answers costs its own check's timeout and nobody
/// else's. Each thread starts with the first check of its kind and stops when the checker
/// is dropped.
#[derive(Debug, Default)]
pub struct NetworkChecker {
    probes: Option<CheckThread>,
    commands: Option<CheckThread>,
}

impl Checker for NetworkChecker {
    fn start(&mut self, target: Target, results: &Sender<Done>) {
        let started = Instant::now();
        let job = Job {
            target,
            results: results.clone(),
        };
        let (thread, start_thread): (_, fn() -> std::io::Result<CheckThread>) =
            match job.target.check.kind {
                HealthKind::None => return job.finish(started, Ok("not checked".to_owned())),
                HealthKind::Tcp | HealthKind::Http => (&mut self.probes, CheckThread::probes),
                HealthKind::External => (&mut self.commands, CheckThread::commands),
            };
        if thread.is_none() {
            match start_thread() {
                Ok(started_thread) => *thread = Some(started_thread),
                Err(e) => return job.finish(started, Err(format!("cannot check: {e}"))),
            }
        }
        if let Some(job) = thread.as_ref().and_then(|thread| thread.send(job)) {
            // The thread is gone: the next check starts another.
            *thread = None;
            job.finish(started, Err("the checking thread stopped".to_owned()));
        }
    }
}

/// A thread that runs the checks handed to it, and the way to it.
#[derive(Debug)]
struct CheckThread {
    jobs: Option<Sender<Job>>,
    /// Wakes the probe thread, asleep in epoll; the command thread sleeps on its queue.
    waker: Option<Waker>,
    thread: Option<JoinHandle<()>>,
}

/// The poll token that means "new jobs, or stop".
const WAKE: Token = Token(usize::MAX);

impl CheckThread {
    /// The TCP and HTTP checks' thread.
    fn probes() -> std::io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKE)?;
        let (jobs, queue) = unbounded();
        let thread = std::thread::Builder::new()
            .name("lbd-probe".to_owned())
            .spawn(move || probe_until_closed(poll, &queue))?;
        Ok(CheckThread {
            jobs: Some(jobs),
            waker: Some(waker),
            thread: Some(thread),
        })
    }

    /// The external checks' thread.
    fn commands() -> std::io::Result<Self> {
        let (jobs, queue) = unbounded();
        let thread = std::thread::Builder::new()
            .name("lbd-commands".to_owned())
            .spawn(move || run_commands_until_closed(&queue))?;
        Ok(CheckThread {
            jobs: Some(jobs),
            waker: None,
            thread: Some(thread),
        })
    }

    /// Hands `job` to the thread; gives it back when the thread is gone.
    fn send(&self, job: Job) -> Option<Job> {
        let Some(jobs) = &self.jobs else {
            return Some(job);
        };
        if let Err(unsent) = jobs.send(job) {
            return Some(unsent.0);
        }
        if let Some(waker) = &self.waker {
            let _ = waker.wake();
        }
        None
    }
}

impl Drop for CheckThread {
    fn drop(&mut self) {
        // A closed queue stops the thread; checks in flight end unreported.
        self.jobs = None;
        if let Some(waker) = &self.waker {
            let _ = waker.wake();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where a TCP or HTTP check is.
#[derive(Debug)]
enum Stage {
    Connecting,
    Sending { request: Vec<u8>, sent: usize },
    Receiving { response: Vec<u8> },
}

/// One TCP or HTTP check in flight.
#[derive(Debug)]
struct Probe {
    job: Job,
    stream: mio::net::TcpStream,
    started: Instant,
    deadline: Instant,
    stage: Stage,
}

impl Probe {
    /// Starts connecting; a connect that fails at once is a result at once.
    fn open(job: Job, registry: &Registry, token: Token) -> Option<Probe> {
        let started = Instant::now();
        let address = SocketAddr::from((job.target.ip, job.target.port));
        let opened = mio::net::TcpStream::connect(address).and_then(|mut stream| {
            registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
            Ok(stream)
        });
        match opened {
            Ok(stream) => Some(Probe {
                deadline: started + Duration::from_millis(u64::from(job.target.check.timeout_ms)),
                job,
                stream,
                started,
                stage: Stage::Connecting,
            }),
            Err(e) => {
                job.finish(started, Err(format!("connect: {e}")));
                None
            }
        }
    }

    /// Goes as far as the socket lets it (its events are edge-triggered): the outcome once
    /// the check has one.
    fn advance(&mut self) -> Option<Result<String, String>> {
        loop {
            match &mut self.stage {
                Stage::Connecting => {
                    match self.stream.take_error() {
                        Ok(None) => {}
                        Ok(Some(e)) | Err(e) => return Some(Err(format!("connect: {e}"))),
                    }
                    match self.stream.peer_addr() {
                        Ok(_) => {}
                        Err(e)
                            if e.kind() == ErrorKind::NotConnected
                                || e.raw_os_error() == Some(libc::EINPROGRESS) =>
                        {
                            return None;
                        }
                        Err(e) => return Some(Err(format!("connect: {e}"))),
                    }
                    if self.job.target.check.kind != HealthKind::Http {
                        return Some(Ok("connected".to_owned()));
                    }
                    self.stage = Stage::Sending {
                        request: http_request(&self.job.target),
                        sent: 0,
                    };
                }
                Stage::Sending { request, sent } => match self.stream.write(&request[*sent..]) {
                    Ok(0) => return Some(Err("send: the connection took nothing".to_owned())),
                    Ok(written) => {
                        *sent += written;
                        if *sent == request.len() {
                            self.stage = Stage::Receiving {
                                response: Vec::new(),
                            };
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Some(Err(format!("send: {e}"))),
                },
                Stage::Receiving { response } => {
                    let mut chunk = [0u8; 4096];
                    let room = (MAX_HTTP_RESPONSE - response.len()).min(chunk.len());
                    match self.stream.read(&mut chunk[..room]) {
                        Ok(0) => return Some(judge_http_response(&self.job.target, response)),
                        Ok(read) => {
                            response.extend_from_slice(&chunk[..read]);
                            if response.len() == MAX_HTTP_RESPONSE {
                                return Some(judge_http_response(&self.job.target, response));
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Some(Err(format!("receive: {e}"))),
                    }
                }
            }
        }
    }

    /// The outcome of a check whose time ran out.
    fn timed_out(&self) -> String {
        let doing = match self.stage {
            Stage::Connecting => "connect",
            Stage::Sending { .. } => "send",
            Stage::Receiving { .. } => "receive",
        };
        format!(
            "{doing}: timed out after {} ms",
            self.job.target.check.timeout_ms
        )
    }

    /// Closes the socket and sends the result.
    fn close(mut self, registry: &Registry, outcome: Result<String, String>) {
        let _ = registry.deregister(&mut self.stream);
        drop(self.stream);
        self.job.finish(self.started, outcome);
    }
}

/// The TCP and HTTP checks' thread: starts the checks handed to it, each within
/// [`MAX_PROBES`], drives them as their sockets become ready, ends each at its deadline, and
/// returns when its queue is closed.
fn probe_until_closed(mut poll: Poll, queue: &Receiver<Job>) {
    let mut events = Events::with_capacity(256);
    let mut probes: HashMap<Token, Probe> = HashMap::new();
    let mut deadlines: BTreeSet<(Instant, Token)> = BTreeSet::new();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut next_token = 0;
    loop {
        loop {
            match queue.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        while probes.len() < MAX_PROBES
            && let Some(job) = waiting.pop_front()
        {
            let token = Token(next_token);
            next_token = (next_token + 1) % WAKE.0;
            if let Some(probe) = Probe::open(job, poll.registry(), token) {
                deadlines.insert((probe.deadline, token));
                probes.insert(token, probe);
            }
        }
        let timeout = deadlines
            .first()
            .map(|(deadline, _)| deadline.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != ErrorKind::Interrupted {
                tracing::warn!("health checks: waiting for sockets: {e}");
                std::thread::sleep(TICK);
            }
            continue;
        }
        for event in &events {
            let token = event.token();
            let Some(probe) = probes.get_mut(&token) else {
                continue;
            };
            if let Some(outcome) = probe.advance()
                && let Some(probe) = probes.remove(&token)
            {
                deadlines.remove(&(probe.deadline, token));
                probe.close(poll.registry(), outcome);
            }
        }
        let now = Instant::now();
        while let Some(&(deadline, token)) = deadlines.first()
            && deadline <= now
        {
            deadlines.pop_first();
            if let Some(probe) = probes.remove(&token) {
                let outcome = Err(probe.timed_out());
                probe.close(poll.registry(), outcome);
            }
        }
    }
}

/// When each target is due: a state machine that takes the time and the current targets and
/// says which checks to start, so that its rules are unit-tested without a clock or a thread.
/// A target is checked at once when it appears, then every `interval_ms` from the start of its
/// last check, never twice at a time; a target that goes away is forgotten.
///
/// It keeps the targets not in flight ordered by when they are due: a look finds the due ones
/// without walking every target, and walks them all only when the list is a new one (after a
/// change of the config). With 10,000 servers, a walk of every target took 4 ms a tick.
#[derive(Debug, Default)]
pub struct Schedule {
    /// The list looked at last, and where each of its targets is in it.
    targets: Option<Arc<[Target]>>,
    place: HashMap<(String, String), usize>,
    next_due: HashMap<(String, String), Instant>,
    /// The targets not in flight, by when they are due.
    waiting: BTreeSet<(Instant, (String, String))>,
    in_flight: HashSet<(String, String)>,
}

impl Schedule {
    /// The checks to start at `now` among `targets` (each is then in flight).
    pub fn due(&mut self, now: Instant, targets: &Arc<[Target]>) -> Vec<Target> {
        if !self
            .targets
            .as_ref()
            .is_some_and(|known| Arc::ptr_eq(known, targets))
        {
            self.take_list(now, targets);
        }
        let mut due = Vec::new();
        while let Some(first) = self.waiting.first()
            && first.0 <= now
        {
            let Some((_, key)) = self.waiting.pop_first() else {
                break;
            };
            let Some(target) = self.place.get(&key).map(|&at| &targets[at]) else {
                continue;
            };
            let interval = Duration::from_millis(u64::from(target.check.interval_ms));
            self.next_due.insert(key.clone(), now + interval);
            self.in_flight.insert(key);
            due.push(target.clone());
        }
        due
    }

    /// Takes `targets` as the list from now on: new targets are due at `now`, the ones gone
    /// are forgotten (a check of one still running stays in flight until it ends).
    fn take_list(&mut self, now: Instant, targets: &Arc<[Target]>) {
        self.place = targets
            .iter()
            .enumerate()
            .map(|(at, target)| (target.key(), at))
            .collect();
        let place = &self.place;
        self.next_due.retain(|key, _| place.contains_key(key));
        self.waiting.retain(|(_, key)| place.contains_key(key));
        for key in self.place.keys() {
            if !self.next_due.contains_key(key) {
                self.next_due.insert(key.clone(), now);
                if !self.in_flight.contains(key) {
                    self.waiting.insert((now, key.clone()));
                }
            }
        }
        self.targets = Some(Arc::clone(targets));
    }

    /// The check of `target` has ended.
    pub fn done(&mut self, target: &Target) {
        let key = target.key();
        if self.in_flight.remove(&key)
            && let Some(&due) = self.next_due.get(&key)
        {
            self.waiting.insert((due, key));
        }
    }

    /// When the next check not in flight is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.first().map(|(due, _)| *due)
    }
}

/// A finished check, from the checker to the scheduler.
#[derive(Debug)]
pub struct Done {
    /// What was checked.
    pub target: Target,
    /// How it went.
    pub result: CheckResult,
}

/// Runs the checks of `targets()` through `checker` until `stop`, each at its interval (see
/// [`Schedule`]), calling `on_result(target, result)` for every result. The scheduler sleeps
/// until a result comes in or a check is due, and asks `targets` again at least every
/// [`LOOK_FOR_NEW_TARGETS`], so added, removed and edited servers are picked up.
pub fn run(
    stop: &AtomicBool,
    mut checker: impl Checker,
    targets: impl Fn() -> Arc<[Target]>,
    mut on_result: impl FnMut(&Target, CheckResult),
) {
    let (results, done) = unbounded::<Done>();
    let mut schedule = Schedule::default();
    while !stop.load(Ordering::Relaxed) {
        let looked = Instant::now();
        for target in schedule.due(looked, &targets()) {
            checker.start(target, &results);
        }
        // Results as they come; the targets are asked again (under the control lock) only
        // when a check is due, at most once a tick, so that a thousand results a second do
        // not cost a thousand looks at every target.
        let look_again = looked + LOOK_FOR_NEW_TARGETS;
        loop {
            let wake = schedule
                .next_due()
                .map_or(look_again, |due| due.max(looked + TICK).min(look_again));
            let Ok(Done { target, result }) = done.recv_deadline(wake) else {
                break;
            };
            schedule.done(&target);
            on_result(&target, result);
            if Instant::now() >= look_again {
                break;
            }
        }
    }
    // Stops the checker's threads.
    drop(checker);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn check(kind: HealthKind) -> HealthCheck {
        HealthCheck {
            kind,
            timeout_ms: 500,
            ..HealthCheck::default()
        }
    }

    fn target(port: u16, check: HealthCheck) -> Target {
        Target {
            service: "web".into(),
            label: "a".into(),
            vip: std::net::Ipv4Addr::new(198, 18, 0, 100).into(),
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
            port,
            check,
        }
    }

    /// One check through the network checker, to its end.
    fn check_now(target: Target) -> CheckResult {
        let mut checker = NetworkChecker::default();
        let (results, done) = unbounded();
        checker.start(target, &results);
        done.recv_timeout(Duration::from_secs(10))
            .expect("a result within the timeout")
            .result
    }

    fn result(ok: bool) -> CheckResult {
        CheckResult {
            ok,
            detail: String::new(),
            took: Duration::from_millis(3),
        }
    }

    #[test]
    fn fall_takes_down_and_rise_brings_back() {
        let check = HealthCheck {
            rise: 3,
            fall: 2,
            ..HealthCheck::default()
        };
        let key = ("s".to_owned(), "r".to_owned());
        let mut tracker = Tracker::default();
        let now = SystemTime::now();
        assert!(tracker.get(&key).up, "servers start up");
        assert_eq!(
            tracker.record(key.clone(), &check, result(false), now),
            None
        );
        assert_eq!(tracker.record(key.clone(), &check, result(true), now), None);
        assert_eq!(
            tracker.record(key.clone(), &check, result(false), now),
            None
        );
        assert_eq!(
            tracker.record(key.clone(), &check, result(false), now),
            Some(false)
        );
        assert!(!tracker.get(&key).up);
        assert_eq!(tracker.record(key.clone(), &check, result(true), now), None);
        assert_eq!(tracker.record(key.clone(), &check, result(true), now), None);
        assert_eq!(
            tracker.record(key.clone(), &check, result(false), now),
            None
        );
        for _ in 0..2 {
            assert_eq!(tracker.record(key.clone(), &check, result(true), now), None);
        }
        assert_eq!(
            tracker.record(key.clone(), &check, result(true), now),
            Some(true)
        );
        // Counted for /metrics: 10 checks, 4 failed, down once, up once, 3 ms each.
        assert_eq!(
            tracker.get(&key).counts,
            lbd_proto::HealthCounts {
                checks: 10,
                failed: 4,
                went_up: 1,
                went_down: 1,
                last_micros: 3_000,
            }
        );
    }

    #[test]
    fn tcp_and_http_checks_against_real_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            for (i, stream) in listener.incoming().take(4).enumerate() {
                let mut stream = stream.expect("accept");
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let reply: &[u8] = if i == 3 {
                    b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                };
                let _ = stream.write_all(reply);
            }
        });
        assert!(check_now(target(port, check(HealthKind::Tcp))).ok);
        let http = HealthCheck {
            path: "/health".into(),
            ..check(HealthKind::Http)
        };
        assert_eq!(check_now(target(port, http.clone())).detail, "HTTP 200");
        let wrong_body = HealthCheck {
            expect_body: Some("healthy".into()),
            ..http.clone()
        };
        assert!(
            check_now(target(port, wrong_body))
                .detail
                .contains("body lacks")
        );
        let failing = check_now(target(port, http));
        assert!(
            !failing.ok && failing.detail.contains("HTTP 503"),
            "{failing:?}"
        );
        server.join().expect("server");
        // Nothing listens there any more.
        let refused = check_now(target(port, check(HealthKind::Tcp)));
        assert!(
            !refused.ok && refused.detail.starts_with("connect"),
            "{refused:?}"
        );
    }

    /// A listener that never answers a connect: its accept queue is full (backlog 0, one
    /// connection queued and never accepted), so the kernel drops every further SYN.
    fn silent_listener() -> (socket2::Socket, Vec<TcpStream>, u16) {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let address: SocketAddr = "127.0.0.1:0".parse().expect("address");
        listener.bind(&address.into()).expect("bind");
        listener.listen(0).expect("listen");
        let port = listener
            .local_addr()
            .ok()
            .and_then(|local| local.as_socket())
            .expect("port")
            .port();
        let mut queued = Vec::new();
        for _ in 0..8 {
            match TcpStream::connect_timeout(
                &(address.ip(), port).into(),
                Duration::from_millis(200),
            ) {
                Ok(stream) => queued.push(stream),
                Err(_) => return (listener, queued, port),
            }
        }
        panic!("the listener kept accepting connects");
    }

    /// Checks of servers that never answer end at their own timeout and hold up nobody: 64
    /// silent servers, 4 that accept and say nothing, 12 hung commands and one live server,
    /// all handed over at once, every result within its timeout (300 ms) of the hand-over,
    /// give or take 400 ms. A pool of four blocking checks would take 80 x 300 / 4 = 6 s for
    /// the last of them.
    #[test]
    fn silent_servers_cost_their_own_timeout_and_delay_no_other_check() {
        let (_silent, _queued, silent_port) = silent_listener();
        // Accepts and then says nothing: an HTTP check's receive times out.
        let mute = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mute_port = mute.local_addr().expect("addr").port();
        let holder = std::thread::spawn(move || mute.incoming().take(4).collect::<Vec<_>>());
        let live = TcpListener::bind("127.0.0.1:0").expect("bind");
        let live_port = live.local_addr().expect("addr").port();
        let quick = HealthCheck {
            timeout_ms: 300,
            ..check(HealthKind::Tcp)
        };
        let mut handed = Vec::new();
        for i in 0..64 {
            handed.push(Target {
                label: format!("silent{i}"),
                ..target(silent_port, quick.clone())
            });
        }
        for i in 0..4 {
            handed.push(Target {
                label: format!("mute{i}"),
                ..target(
                    mute_port,
                    HealthCheck {
                        kind: HealthKind::Http,
                        ..quick.clone()
                    },
                )
            });
        }
        // Commands that outlive their timeout.
        for i in 0..12 {
            handed.push(Target {
                label: format!("hung{i}"),
                ..target(
                    8088,
                    HealthCheck {
                        kind: HealthKind::External,
                        command: Some("sleep 5".into()),
                        ..quick.clone()
                    },
                )
            });
        }
        handed.push(Target {
            label: "live".into(),
            ..target(live_port, quick.clone())
        });
        let mut checker = NetworkChecker::default();
        let (results, done) = unbounded();
        let start = Instant::now();
        for target in &handed {
            checker.start(target.clone(), &results);
        }
        let mut seen = HashMap::new();
        while seen.len() < handed.len() {
            let Done { target, result } = done
                .recv_timeout(Duration::from_secs(5))
                .expect("every check ends");
            let since_handed = start.elapsed();
            assert!(
                since_handed < Duration::from_millis(300 + 400),
                "{} ended {since_handed:?} after it was handed over: {result:?}",
                target.label
            );
            seen.insert(target.label, result);
        }
        assert!(seen["live"].ok, "{:?}", seen["live"]);
        for (label, result) in &seen {
            if label.starts_with("silent") {
                assert_eq!(result.detail, "connect: timed out after 300 ms");
            } else if label.starts_with("mute") {
                assert_eq!(result.detail, "receive: timed out after 300 ms");
            } else if label.starts_with("hung") {
                assert_eq!(result.detail, "timed out after 300 ms");
            }
        }
        drop(checker);
        holder.join().expect("holder");
    }

    #[test]
    fn external_checks_see_the_server_and_are_bounded() {
        let with = |command: &str| HealthCheck {
            command: Some(command.into()),
            ..check(HealthKind::External)
        };
        assert!(
            check_now(target(
                8088,
                with("test \"$LBD_RS_IP:$LBD_RS_PORT\" = 127.0.0.1:8088")
            ))
            .ok
        );
        assert!(!check_now(target(8088, with("exit 3"))).ok);
        let slow = check_now(target(8088, with("sleep 5")));
        assert!(!slow.ok && slow.detail.contains("timed out"), "{slow:?}");
        // A pipeline that outlives its timeout leaves nothing behind: the whole group goes.
        let marker = format!("7.{}", std::process::id());
        let piped = check_now(target(8088, with(&format!("sleep {marker} | cat"))));
        assert!(piped.detail.contains("timed out"), "{piped:?}");
        std::thread::sleep(Duration::from_millis(100));
        let left: Vec<String> = std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(Result::ok)
            .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
            .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
            .filter(|cmdline| cmdline.contains(&marker))
            .collect();
        assert!(left.is_empty(), "left running: {left:?}");
        assert!(check_now(target(1, check(HealthKind::None))).ok);
    }

    #[test]
    fn each_target_is_checked_at_once_then_every_interval_never_twice_at_a_time() {
        let every = |interval_ms, label: &str| Target {
            label: label.into(),
            ..target(
                1,
                HealthCheck {
                    interval_ms,
                    ..check(HealthKind::Tcp)
                },
            )
        };
        let ms = |n| Duration::from_millis(n);
        let start = Instant::now();
        let mut schedule = Schedule::default();
        let labels = |due: Vec<Target>| due.into_iter().map(|t| t.label).collect::<Vec<_>>();
        let both = || Arc::<[Target]>::from([every(100, "a"), every(300, "b")]);
        assert_eq!(
            labels(schedule.due(start, &both())),
            ["a", "b"],
            "new: at once"
        );
        // Both in flight: nothing is due until a result comes in.
        assert_eq!(schedule.next_due(), None);
        // a's check is still running at its next due time: not started twice.
        assert!(schedule.due(start + ms(150), &both()).is_empty());
        schedule.done(&every(100, "a"));
        assert_eq!(schedule.next_due(), Some(start + ms(100)), "a is late");
        assert_eq!(labels(schedule.due(start + ms(150), &both())), ["a"]);
        schedule.done(&every(100, "a"));
        schedule.done(&every(300, "b"));
        assert_eq!(
            schedule.next_due(),
            Some(start + ms(250)),
            "the scheduler's wake-up"
        );
        assert!(
            schedule.due(start + ms(200), &both()).is_empty(),
            "a next at 250"
        );
        assert_eq!(labels(schedule.due(start + ms(300), &both())), ["a", "b"]);
        // A target that goes away is forgotten; back, it is new again.
        schedule.done(&every(100, "a"));
        schedule.done(&every(300, "b"));
        assert!(
            schedule
                .due(start + ms(310), &Arc::from([every(100, "a")]))
                .is_empty()
        );
        assert_eq!(labels(schedule.due(start + ms(320), &both())), ["b"]);

        // The same list looked at again and again, as the scheduler does between changes.
        let list = both();
        let mut schedule = Schedule::default();
        assert_eq!(labels(schedule.due(start, &list)), ["a", "b"]);
        assert!(schedule.due(start + ms(100), &list).is_empty(), "in flight");
        schedule.done(&every(100, "a"));
        assert_eq!(labels(schedule.due(start + ms(100), &list)), ["a"]);
        assert!(schedule.due(start + ms(150), &list).is_empty());
        schedule.done(&every(100, "a"));
        schedule.done(&every(300, "b"));
        assert_eq!(schedule.next_due(), Some(start + ms(200)));
        assert!(schedule.due(start + ms(199), &list).is_empty());
        assert_eq!(labels(schedule.due(start + ms(300), &list)), ["a", "b"]);
        // A result for a target no list has any more starts nothing.
        schedule.done(&every(100, "gone"));
        assert_eq!(schedule.next_due(), None, "both in flight");
    }

    struct Passes;

    impl Checker for Passes {
        fn start(&mut self, target: Target, results: &Sender<Done>) {
            let _ = results.send(Done {
                target,
                result: result(true),
            });
        }
    }

    /// The scheduler runs each check at its interval, takes every result, looks at the targets
    /// about once a tick however many results come in (each look takes the list under the
    /// control lock), and stops when told.
    #[test]
    fn the_scheduler_checks_at_the_interval_and_looks_at_the_targets_once_a_tick() {
        let targets: Arc<[Target]> = (0..200)
            .map(|i| Target {
                label: format!("rs{i}"),
                ..target(
                    8088,
                    HealthCheck {
                        interval_ms: 100,
                        ..check(HealthKind::Tcp)
                    },
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let looks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let checked = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
        let scheduler = {
            let (stop, looks, checked) =
                (Arc::clone(&stop), Arc::clone(&looks), Arc::clone(&checked));
            std::thread::spawn(move || {
                run(
                    &stop,
                    Passes,
                    || {
                        looks.fetch_add(1, Ordering::Relaxed);
                        targets.clone()
                    },
                    |target, result| {
                        assert!(result.ok);
                        *checked
                            .lock()
                            .expect("counts")
                            .entry(target.label.clone())
                            .or_default() += 1;
                    },
                )
            })
        };
        let window = Duration::from_secs(1);
        std::thread::sleep(window);
        stop.store(true, Ordering::Relaxed);
        let stopped = Instant::now();
        scheduler.join().expect("scheduler");
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "the scheduler did not stop"
        );
        let checked = checked.lock().expect("counts");
        assert_eq!(checked.len(), 200, "every target checked");
        // 2,000 results a second; at most one look a tick (20 ms), plus the first.
        let looks = looks.load(Ordering::Relaxed);
        assert!(looks <= 60, "{looks} looks at the targets in a second");
        for (label, &count) in checked.iter() {
            assert!(
                (3..=12).contains(&count),
                "{label} checked {count} times in a second"
            );
        }
    }
}
