//! Criterion benchmark of building one Maglev table (the paper's section 3.4, with weights):
//! M = 65537 slots for N = 10, 100 and 1000 weighted backends, what a change of a service's
//! servers costs the control side (`cargo bench -p lbd-engine --bench maglev`).

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lbd_engine::packet::maglev::{Backend, MaglevTable};
use std::hint::black_box;
use std::net::Ipv4Addr;

const SLOTS: u32 = 65537;
const SEED: u64 = 0x1bd5_eed0;

/// `n` backends with weights 50..=149, as a mixed fleet has.
fn backends(n: usize) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend {
            ip: Ipv4Addr::new(198, 18, (i / 250) as u8 + 2, (i % 250) as u8 + 1).into(),
            weight: 50 + (i * 37 % 100) as u16,
        })
        .collect()
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build_65537");
    for n in [10, 100, 1000] {
        let list = backends(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &list, |b, list| {
            b.iter(|| {
                let table = MaglevTable::build(black_box(list), SLOTS, SEED);
                // A table with a free slot would be a broken build, not a fast one. The largest
                // slot value says it in one vectorized pass (a slot-by-slot check took 4% of
                // this bench's time at N = 1000).
                let largest = table.slots().iter().copied().max();
                assert!(largest.is_some_and(|s| usize::from(s) < list.len()));
                table
            })
        });
    }
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
