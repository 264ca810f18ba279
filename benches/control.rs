//! Criterion benchmarks of a live change (`cargo bench -p lbd-engine --bench control`):
//!
//! - `change_acknowledged_by_N_busy_workers`: the time from publishing a new snapshot (what
//!   every `lbctl` change ends with) until every worker reports using it, which is when lbd
//!   acknowledges the change; one and then two workers over in-memory rings that never sleep,
//!   as workers under load do (a busy worker checks its commands between batches). An idle
//!   worker sleeps in poll() on its socket for at most 10 ms and takes the change when it
//!   wakes, so that is the worst case on an idle balancer.
//! - `set_weight_with_N_services`: a whole `lbctl set-weight` as the control socket hands it
//!   to lbd's control (validation, this host's addresses read over netlink, the snapshot, the
//!   busy worker's acknowledgement), with 1, 100 and 1000 services of 10 real servers each
//!   (table_size 65537), a health result on record for one server in ten. The change touches
//!   one service, so it should cost the same whatever the number of services.
//! - `health_result_with_N_services`: one health check's result that changes nothing (the
//!   server stays up), as the health checker hands nearly every result to lbd's control, on
//!   the same configurations: it should cost the same whatever the number of servers.
//! - `health_schedule_look_with_N_services`: the health scheduler's look at the targets (once
//!   a tick) when every check has ended and none is due yet: the same, whatever the number.
//! - `adopt_replica_with_N_services`: a passive node of a pair adopting the active node's
//!   configuration after a one-server change, parsed from JSON as the sync stream brings it
//!   (not timed: the parse); no worker attached.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use lbd_config::Config;
use lbd_engine::control::health::CheckResult;
use lbd_engine::control::replica::Replica;
use lbd_engine::control::{Control, Doors, Role, SystemClock, WorkerLink, publish};
use lbd_engine::io::doorbell::Doorbell;
use lbd_engine::io::host::SystemHost;
use lbd_engine::io::steer::{SteerError, VipSteering};
use lbd_engine::io::worker::{Rings, Worker, WorkerSettings, worker_channel};
use lbd_engine::l7::Haproxy;
use lbd_engine::packet::dataplane::{Dataplane, TableSizes};
use lbd_engine::packet::snapshot::{AdminState, ServiceIds, Snapshot};
use lbd_proto::{Command, Outcome, Reply, WeightChange};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Rings with no traffic that never block: the worker loop spins like one under load.
#[derive(Debug)]
struct BusyRings;

impl Rings for BusyRings {
    type Frame = usize;
    fn take_frames(&mut self) -> Vec<usize> {
        (0..64).collect()
    }
    fn reclaim(&mut self, _out: &mut Vec<usize>, _max: usize) -> usize {
        0
    }
    fn fill(&mut self, _frames: &mut Vec<usize>, _max: usize) -> usize {
        0
    }
    fn receive(&mut self, _out: &mut Vec<usize>, _max: usize) -> usize {
        0
    }
    fn with_payload<R>(&mut self, _frame: &mut usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        f(&mut [])
    }
    fn write(&mut self, _frame: &mut usize, _bytes: &[u8]) {}
    fn transmit(&mut self, _frames: &mut Vec<usize>) -> usize {
        0
    }
    fn kick(&mut self) {}
    fn wait_for_rx(&mut self, _timeout_ms: i32, _doorbell: &Doorbell) {}
}

fn config() -> Config {
    Config::from_toml_str(
        "[engine]\ninterface = \"eth0\"\nqueues = [0, 1]\n\n[[service]]\nlabel = \"web\"\n\
         vip = \"198.18.0.100\"\nports = 8088\n\n[[service.real_server]]\nlabel = \"a\"\n\
         ip = \"198.18.0.11\"\nmac = \"02:00:00:00:00:11\"\n",
    )
    .expect("bench config is valid")
}

fn snapshot(config: &Config, generation: u64) -> Arc<Snapshot> {
    Arc::new(Snapshot::build(
        config,
        &mut ServiceIds::default(),
        [2, 0, 0, 0, 0, 2],
        generation,
        |_| None,
        |_, _| AdminState::Online,
    ))
}

fn change_to_workers(c: &mut Criterion) {
    // One worker leaves the control thread a core of its own; two busy workers plus the
    // control thread on this 2-core machine measure the scheduler as much as the mechanism.
    for workers in [1u32, 2] {
        change_to(c, workers);
    }
}

fn change_to(c: &mut Criterion, workers: u32) {
    let config = config();
    let stop = Arc::new(AtomicBool::new(false));
    let mut links = Vec::new();
    let mut threads = Vec::new();
    for queue in 0..workers {
        let (commands, inbox) = worker_channel().expect("eventfd");
        let applied = Arc::new(AtomicU64::new(0));
        let dataplane = Dataplane::new(snapshot(&config, 1), TableSizes::default());
        let (stop, seen) = (Arc::clone(&stop), Arc::clone(&applied));
        threads.push(std::thread::spawn(move || {
            let mut worker = Worker::new(BusyRings, dataplane, WorkerSettings::default());
            worker.run(&stop, &inbox, &seen);
        }));
        links.push(WorkerLink {
            queue,
            commands,
            applied,
        });
    }
    let mut generation = 1;
    c.bench_function(
        &format!("change_acknowledged_by_{workers}_busy_workers"),
        |b| {
            b.iter_batched(
                || {
                    generation += 1;
                    snapshot(&config, generation)
                },
                |next| assert!(publish(&links, next, Duration::from_secs(5)).is_empty()),
                criterion::BatchSize::SmallInput,
            )
        },
    );
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }
}

/// The steering map's part: nothing to steer outside a real interface (the daemon's map
/// update is one BPF syscall per VIP that arrives or leaves, and this change moves none).
#[derive(Debug)]
struct NoSteering;

impl VipSteering for NoSteering {
    fn add_vip(&mut self, _vip: IpAddr, _answer_arp: bool) -> Result<(), SteerError> {
        Ok(())
    }
    fn remove_vip(&mut self, _vip: IpAddr) -> Result<(), SteerError> {
        Ok(())
    }
    fn set_probe_sources(&mut self, _sources: &[IpAddr]) -> Result<(), SteerError> {
        Ok(())
    }
}

/// `services` services of 10 real servers each (the same pool behind every VIP, MACs pinned
/// so that every server takes clients), on 1000 ports of each of as many VIPs as it takes.
fn large_config(services: usize) -> Config {
    let mut text = String::from("[engine]\ninterface = \"lo\"\nqueues = [0]\n");
    for service in 0..services {
        text += &format!(
            "\n[[service]]\nlabel = \"s{service}\"\nvip = \"198.18.{}.100\"\nports = {}\n\
             table_size = 65537\n",
            service / 1000,
            1000 + service % 1000
        );
        for rs in 0..10 {
            text += &format!(
                "[[service.real_server]]\nlabel = \"r{rs}\"\nip = \"198.19.0.{}\"\n\
                 mac = \"02:00:00:00:01:{rs:02x}\"\n",
                11 + rs
            );
        }
    }
    Config::from_toml_str(&text).expect("bench config is valid")
}

fn change_latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("change_latency");
    for services in [1, 100, 1000] {
        set_weight_with(&mut group, services);
    }
    group.finish();
}

/// A control of `config` on the loopback interface, as `node` of a pair.
fn control_of(config: &Config, node: &str) -> Control {
    let path = std::env::temp_dir().join(format!(
        "lbd-bench-control-{node}-{}.toml",
        std::process::id()
    ));
    Control::new(
        config.clone(),
        path,
        [2, 0, 0, 0, 0, 2],
        Default::default(),
        Doors {
            steering: Box::new(NoSteering),
            host: Box::new(SystemHost {
                interface: "lo".into(),
            }),
            clock: Box::new(SystemClock),
            // No SNAT service: HAProxy is never started.
            layer7: Box::new(Haproxy::new(config)),
        },
    )
}

fn set_weight_with(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    services: usize,
) {
    let config = large_config(services);
    let mut control = control_of(&config, "active");
    let stop = Arc::new(AtomicBool::new(false));
    let (commands, inbox) = worker_channel().expect("eventfd");
    let applied = Arc::new(AtomicU64::new(0));
    let dataplane = Dataplane::new(Arc::clone(control.snapshot()), TableSizes::default());
    let worker = {
        let (stop, seen) = (Arc::clone(&stop), Arc::clone(&applied));
        std::thread::spawn(move || {
            let mut worker = Worker::new(BusyRings, dataplane, WorkerSettings::default());
            worker.run(&stop, &inbox, &seen);
        })
    };
    control.attach_workers(vec![WorkerLink {
        queue: 0,
        commands,
        applied,
    }]);
    // Health results on record, as a running balancer has them: every server's state is
    // looked up in a map that is not empty.
    let passed = || CheckResult {
        ok: true,
        detail: "connected".into(),
        took: Duration::from_micros(100),
    };
    for target in control.health_targets().iter().step_by(10) {
        control.record_health(target, passed());
    }
    // A result that changes nothing (the server is up and stays up), as nearly every result
    // is: what each of the health checker's results costs under the control lock.
    let checked = control.health_targets()[0].clone();
    for _ in 0..checked.check.rise {
        control.record_health(&checked, passed());
    }
    group.bench_function(format!("health_result_with_{services}_services"), |b| {
        b.iter(|| control.record_health(&checked, passed()))
    });
    // The health scheduler's look at the targets, once a tick, when every check has ended
    // and none is due yet.
    let mut schedule = lbd_engine::control::health::Schedule::default();
    let targets = control.health_targets();
    let start = std::time::Instant::now();
    for started in schedule.due(start, &targets) {
        schedule.done(&started);
    }
    group.bench_function(
        format!("health_schedule_look_with_{services}_services"),
        |b| b.iter(|| schedule.due(start, &targets).len()),
    );
    let mut weight = 100;
    group.bench_function(format!("set_weight_with_{services}_services"), |b| {
        b.iter(|| {
            // The first service's first server, 100 <-> 101: one table to build.
            weight = 201 - weight;
            let change = Command::SetWeight(WeightChange {
                service: "s0".into(),
                label: "r0".into(),
                weight,
            });
            let response = control.handle(change, Role::Root);
            assert!(
                matches!(response.outcome, Outcome::Ok(Reply::Done { .. })),
                "{response:?}"
            );
        })
    });
    // A passive node adopting the active's replica after a one-server change, as the sync
    // stream delivers it: JSON, so every service in it is new.
    let replicas = [100, 101].map(|weight| {
        let change = Command::SetWeight(WeightChange {
            service: "s0".into(),
            label: "r0".into(),
            weight,
        });
        let response = control.handle(change, Role::Root);
        assert!(matches!(response.outcome, Outcome::Ok(_)), "{response:?}");
        serde_json::to_string(&control.replica()).expect("replica as JSON")
    });
    let mut passive = control_of(&config, "passive");
    passive.set_active(false).expect("passive");
    let active = std::net::Ipv4Addr::new(198, 18, 0, 3);
    let mut turn = 0;
    group.bench_function(format!("adopt_replica_with_{services}_services"), |b| {
        b.iter_batched(
            || {
                turn = 1 - turn;
                serde_json::from_str::<Replica>(&replicas[turn]).expect("replica")
            },
            |replica| {
                let adopted = passive.adopt(active, replica).expect("adopted");
                assert!(adopted, "a replica that changed something");
            },
            BatchSize::LargeInput,
        )
    });
    stop.store(true, Ordering::Relaxed);
    let _ = worker.join();
}

criterion_group!(benches, change_to_workers, change_latency);
criterion_main!(benches);
