//! Criterion benchmark of a live change reaching the packet path: the time from publishing a new
//! snapshot (what every `lbctl` change ends with) until every worker reports using it, which is
//! when lbd acknowledges the change.
//!
//! `cargo bench -p lbd-engine --bench control` runs one and then two workers over in-memory
//! rings that never sleep, as workers under load do: a busy worker checks its commands between
//! batches. An idle worker sleeps in poll() on its socket for at most 10 ms and
//! takes the change when it wakes, so that is the worst case on an idle balancer.

use criterion::{Criterion, criterion_group, criterion_main};
use crossbeam::channel::unbounded;
use lbd_config::Config;
use lbd_engine::control::{WorkerLink, publish};
use lbd_engine::io::worker::{Rings, Worker, WorkerSettings};
use lbd_engine::packet::dataplane::{Dataplane, TableSizes};
use lbd_engine::packet::snapshot::{AdminState, ServiceIds, Snapshot};
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
    fn wait_for_rx(&mut self, _timeout_ms: i32) {}
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
        let (commands, receiver) = unbounded();
        let applied = Arc::new(AtomicU64::new(0));
        let dataplane = Dataplane::new(snapshot(&config, 1), TableSizes::default());
        let (stop, seen) = (Arc::clone(&stop), Arc::clone(&applied));
        threads.push(std::thread::spawn(move || {
            let mut worker = Worker::new(BusyRings, dataplane, WorkerSettings::default());
            worker.run(&stop, &receiver, &seen);
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

criterion_group!(benches, change_to_workers);
criterion_main!(benches);
