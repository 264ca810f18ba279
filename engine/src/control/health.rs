//! Health checks: from the host's own stack to each real server's own IP, off the packet path.
//!
//! One scheduler thread keeps every target's next due time and hands due checks to a small
//! pool of threads ([`POOL_SIZE`]), so hundreds of servers are checked without one slow server
//! delaying the others; a check never takes longer than its `timeout_ms`. Results go through
//! [`Tracker`], the rise/fall state machine (keepalived's and HAProxy's semantics): `fall`
//! consecutive failures take an up server down, `rise` consecutive successes bring it back. A
//! change of state is reported to the caller, which republishes the configuration.

use crossbeam::channel::{Receiver, Sender, unbounded};
use hashbrown::Equivalent;
use lbd_config::{HealthCheck, HealthKind};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Threads running checks.
pub const POOL_SIZE: usize = 4;

/// How long a new real server waits for its first check at most, and lbd's stop for the
/// health checker.
pub const LOOK_FOR_NEW_TARGETS: Duration = Duration::from_millis(200);

/// The scheduler looks at the targets at most this often: a check starts at most this late.
const TICK: Duration = Duration::from_millis(20);
/// The most of an HTTP response a check reads.
const MAX_HTTP_RESPONSE: u64 = 64 * 1024;

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
        }
    }

    /// Forgets servers that are no longer checked.
    pub fn retain(&mut self, keep: impl Fn(&(String, String)) -> bool) {
        self.health.retain(|key, _| keep(key));
    }

    /// Whether no server has a result yet.
    pub fn is_empty(&self) -> bool {
        self.health.is_empty()
    }
}

/// Runs one check now.
pub fn run_check(target: &Target) -> CheckResult {
    let started = Instant::now();
    let timeout = Duration::from_millis(u64::from(target.check.timeout_ms));
    let address = SocketAddr::from((target.ip, target.port));
    let outcome = match target.check.kind {
        HealthKind::None => Ok("not checked".to_owned()),
        HealthKind::Tcp => TcpStream::connect_timeout(&address, timeout)
            .map(|_| "connected".to_owned())
            .map_err(|e| format!("connect: {e}")),
        HealthKind::Http => http_check(target, address, timeout),
        HealthKind::External => external_check(target, timeout),
    };
    let took = started.elapsed();
    match outcome {
        Ok(detail) => CheckResult {
            ok: true,
            detail,
            took,
        },
        Err(detail) => CheckResult {
            ok: false,
            detail,
            took,
        },
    }
}

fn http_check(target: &Target, address: SocketAddr, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&address, timeout).map_err(|e| format!("connect: {e}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream
        .set_write_timeout(Some(left()))
        .and_then(|()| stream.set_read_timeout(Some(left())))
        .map_err(|e| format!("socket: {e}"))?;
    let host = target
        .check
        .host
        .clone()
        .unwrap_or_else(|| match target.ip {
            IpAddr::V4(v4) => v4.to_string(),
            // RFC 9110 7.2: an IPv6 literal in brackets.
            IpAddr::V6(v6) => format!("[{v6}]"),
        });
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\nConnection: close\r\n\r\n",
        target.check.path
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_HTTP_RESPONSE)
        .read_to_end(&mut response)
        .map_err(|e| format!("receive: {e}"))?;
    let text = String::from_utf8_lossy(&response);
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

/// Runs the external check's command with `sh -c` in a process group of its own, so that on
/// a timeout the whole group (a pipeline, whatever it started) is killed, not just the shell.
fn external_check(target: &Target, timeout: Duration) -> Result<String, String> {
    use std::os::unix::process::CommandExt;
    let command = target.check.command.as_deref().unwrap_or("false");
    let mut child = Command::new("sh")
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
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok("exit 0".to_owned()),
            Ok(Some(status)) => return Err(format!("{status}")),
            Ok(None) if Instant::now() >= deadline => {
                // The shell is not reaped yet, so its pid still names its group.
                if let Ok(group) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(group),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {} ms", timeout.as_millis()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for {command:?}: {e}")),
        }
    }
}

/// Runs checks: the door to the network that the scheduler goes through (a fake in tests).
pub trait Checker: Send + Sync {
    /// Runs one check now.
    fn check(&self, target: &Target) -> CheckResult;
}

/// Checks over the host's own network stack ([`run_check`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NetworkChecker;

impl Checker for NetworkChecker {
    fn check(&self, target: &Target) -> CheckResult {
        run_check(target)
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

/// A finished check, from the pool to the scheduler.
#[derive(Debug)]
struct Done {
    target: Target,
    result: CheckResult,
}

/// Runs the checks of `targets()` through `checker` until `stop`, each at its interval (see
/// [`Schedule`]), calling `on_result(target, result)` for every result. The scheduler sleeps
/// until a result comes in or a check is due, and asks `targets` again at least every
/// [`LOOK_FOR_NEW_TARGETS`], so added, removed and edited servers are picked up.
pub fn run(
    stop: &AtomicBool,
    checker: Arc<dyn Checker>,
    targets: impl Fn() -> Arc<[Target]>,
    mut on_result: impl FnMut(&Target, CheckResult),
) {
    let (jobs, job_queue) = unbounded::<Target>();
    let (results, done) = unbounded::<Done>();
    let pool_stop = Arc::new(AtomicBool::new(false));
    let pool: Vec<_> = (0..POOL_SIZE)
        .filter_map(|i| {
            let (queue, results, stop) =
                (job_queue.clone(), results.clone(), Arc::clone(&pool_stop));
            let checker = Arc::clone(&checker);
            std::thread::Builder::new()
                .name(format!("lbd-check-{i}"))
                .spawn(move || check_worker(&*checker, &queue, &results, &stop))
                .ok()
        })
        .collect();
    let mut schedule = Schedule::default();
    while !stop.load(Ordering::Relaxed) {
        let looked = Instant::now();
        for target in schedule.due(looked, &targets()) {
            let _ = jobs.send(target);
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
    pool_stop.store(true, Ordering::Relaxed);
    drop(jobs);
    for thread in pool {
        let _ = thread.join();
    }
}

fn check_worker(
    checker: &dyn Checker,
    queue: &Receiver<Target>,
    results: &Sender<Done>,
    stop: &AtomicBool,
) {
    // Asleep until a check comes; the scheduler's end closes the queue. Checks still queued
    // then are not run.
    while let Ok(target) = queue.recv() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let result = checker.check(&target);
        if results.send(Done { target, result }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

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
        assert!(run_check(&target(port, check(HealthKind::Tcp))).ok);
        let http = HealthCheck {
            path: "/health".into(),
            ..check(HealthKind::Http)
        };
        assert_eq!(run_check(&target(port, http.clone())).detail, "HTTP 200");
        let wrong_body = HealthCheck {
            expect_body: Some("healthy".into()),
            ..http.clone()
        };
        assert!(
            run_check(&target(port, wrong_body))
                .detail
                .contains("body lacks")
        );
        let failing = run_check(&target(port, http));
        assert!(
            !failing.ok && failing.detail.contains("HTTP 503"),
            "{failing:?}"
        );
        server.join().expect("server");
        // Nothing listens there any more.
        let refused = run_check(&target(port, check(HealthKind::Tcp)));
        assert!(
            !refused.ok && refused.detail.starts_with("connect"),
            "{refused:?}"
        );
    }

    #[test]
    fn external_checks_see_the_server_and_are_bounded() {
        let with = |command: &str| HealthCheck {
            command: Some(command.into()),
            ..check(HealthKind::External)
        };
        assert!(
            run_check(&target(
                8088,
                with("test \"$LBD_RS_IP:$LBD_RS_PORT\" = 127.0.0.1:8088")
            ))
            .ok
        );
        assert!(!run_check(&target(8088, with("exit 3"))).ok);
        let slow = run_check(&target(8088, with("sleep 5")));
        assert!(!slow.ok && slow.detail.contains("timed out"), "{slow:?}");
        // A pipeline that outlives its timeout leaves nothing behind: the whole group goes.
        let marker = format!("7.{}", std::process::id());
        let piped = run_check(&target(8088, with(&format!("sleep {marker} | cat"))));
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
        assert!(run_check(&target(1, check(HealthKind::None))).ok);
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
        fn check(&self, _: &Target) -> CheckResult {
            result(true)
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
                    Arc::new(Passes),
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
