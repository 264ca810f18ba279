//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4).
//!
//! Every backend gets a permutation of the `M` table slots from two hashes of its identity
//! (`offset` and `skip`, M prime so that every skip walks all slots). Backends take turns
//! claiming their next free preferred slot until the table is full. A lookup is one hash of
//! the flow key modulo `M`.
//!
//! Weights: the paper leaves them open ("changing the relative frequency of backend turns").
//! Here each backend has a quota of `M * weight / total` slots (largest remainder rounding, so
//! the quotas add up to exactly `M`); a backend whose quota is met skips its turn. That keeps
//! every backend within one slot of its weighted share, and a removed backend frees only its
//! own slots plus the few that the changed fill order reshuffles.
//!
//! Determinism: backends are identified by their address and ordered by it before the
//! fill, and every hash is xxh3 with the configured seed. The same set of backends and weights
//! gives the same table in any process on any machine, whatever the order in the config file.

use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Marks a slot that no backend owns (only when no backend has a non-zero weight).
pub const NO_BACKEND: u16 = u16::MAX;

/// The largest number of backends one table can hold (indices are `u16`, minus the marker).
pub const MAX_BACKENDS: usize = NO_BACKEND as usize;

/// One backend's identity and weight, as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// The backend's address: its identity for the permutation.
    pub ip: IpAddr,
    /// Relative share of the table; 0 takes no slot.
    pub weight: u16,
}

/// A filled Maglev lookup table: slot -> index into the backend list it was built from.
///
/// Cloning one is cheap (its slots are shared): a new snapshot takes the tables of the services
/// a change did not touch from the one before ([`MaglevTable::build_reusing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    slots: Arc<[u16]>,
    seed: u64,
    /// The backends it was built from, in their order.
    built_from: Arc<[Backend]>,
}

impl MaglevTable {
    /// Builds the table for `backends` (indices in the result refer to this slice) with `size`
    /// slots. `size` must be prime (the config guarantees it) and larger than the number of
    /// backends.
    pub fn build(backends: &[Backend], size: u32, seed: u64) -> MaglevTable {
        // Filled where it will live: a table filled apart would be copied into the `Arc`.
        let mut slots: Arc<[u16]> = std::iter::repeat_n(NO_BACKEND, size as usize).collect();
        // Not shared yet, so this is the allocation itself, not a copy.
        fill(backends, seed, Arc::make_mut(&mut slots));
        MaglevTable {
            slots,
            seed,
            built_from: backends.into(),
        }
    }

    /// [`MaglevTable::build`], or a copy of one of `earlier` that was built from the same
    /// backends (in the same order), size and seed: the same table, at the cost of a pointer.
    pub fn build_reusing<'a>(
        backends: &[Backend],
        size: u32,
        seed: u64,
        earlier: impl IntoIterator<Item = &'a MaglevTable>,
    ) -> MaglevTable {
        earlier
            .into_iter()
            .find(|table| {
                table.seed == seed
                    && table.slots.len() == size as usize
                    && *table.built_from == *backends
            })
            .cloned()
            .unwrap_or_else(|| MaglevTable::build(backends, size, seed))
    }

    /// The backend index owning the slot for `key`, or `None` when the table is empty.
    #[inline]
    pub fn lookup(&self, key: &[u8]) -> Option<u16> {
        // Multiply-shift range reduction (Lemire): uniform like `%`, without a division.
        let hash = xxh3_64_with_seed(key, self.seed);
        let slot = ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize;
        let backend = *self.slots.get(slot)?;
        (backend != NO_BACKEND).then_some(backend)
    }

    /// The hash seed it was built with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// True when both are the same table in memory (one was taken from the other).
    pub fn is_shared_with(&self, other: &MaglevTable) -> bool {
        Arc::ptr_eq(&self.slots, &other.slots)
    }

    /// All slots (for tests and benchmarks).
    pub fn slots(&self) -> &[u16] {
        &self.slots
    }
}

/// Section 3.4's fill of `slots`, all [`NO_BACKEND`] before: slot -> index into `backends`.
///
/// The turns are the paper's; what differs is how a turn finds its slot, and a test holds the
/// result to the paper's walk. The turns of a round go in chunks. First every turn of the chunk
/// finds the next slot of its walk that is free at the chunk's start, all walks at once
/// ([`find_free_slots`]). Then the turns claim in order. A turn whose slot an earlier turn of
/// the same chunk took walks on from that slot: every slot its walk passed was taken at the
/// chunk's start, so that is where its own walk would have gone. A round of few backends (a
/// small service, or the last backends under quota) is too short for that: its chunks are
/// several whole rounds, each backend's slots for them listed by its own walk first.
fn fill(backends: &[Backend], seed: u64, slots: &mut [u16]) {
    let size = slots.len() as u32;
    // Fill order is by address so that config order does not matter.
    let mut order: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    // IPv4 addresses first, each family by its octets.
    order.sort_by_key(|&i| backends[i].ip);
    if order.is_empty() || size == 0 {
        return;
    }
    debug_assert!(order.len() <= MAX_BACKENDS);

    let mut filling = Filling {
        slots,
        walks: order
            .iter()
            .map(|&i| Permutation::new(backends[i].ip, size, seed))
            .collect(),
        left: quotas(backends, &order, size as usize),
        owners: order.iter().map(|&i| i as u16).collect(),
    };
    // This round's turns: the backends still under quota, in fill order.
    let mut round: Vec<u32> = (0..order.len() as u32)
        .filter(|&turn| filling.left[turn as usize] > 0)
        .collect();
    let mut free = size as usize;
    let endgame = endgame_slots(size as usize);
    let mut walkers = Vec::new();
    let mut found = Vec::new();
    let mut ahead = Vec::new();
    while !round.is_empty() {
        // A round too short to walk its turns together: each backend's slots for several
        // rounds are found at once instead, its walk on its own.
        let rounds = free / CHUNK_SHARE / round.len();
        if round.len() < FEW_TURNS && rounds >= MANY_ROUNDS && free > endgame {
            free -= filling.claim_rounds(&mut round, rounds, &mut ahead);
            continue;
        }
        let mut next = 0;
        // The next round's turns go to the front of `round` as this round's are taken.
        let mut kept = 0;
        while next < round.len() {
            if free <= endgame {
                filling.claim_last_slots(round[next] as usize);
                return;
            }
            let wanted = free / CHUNK_SHARE;
            let end = (next + wanted.max(1)).min(round.len());
            // With too few turns at once, walking them together gains nothing.
            let found = if wanted >= FEW_TURNS && round.len() >= FEW_TURNS {
                find_free_slots(
                    filling.slots,
                    &filling.walks,
                    &round[next..end],
                    free,
                    &mut walkers,
                    &mut found,
                );
                Some(&found[..])
            } else {
                None
            };
            kept = filling.claim_in_order(&mut round, next..end, found, kept);
            free -= end - next;
            next = end;
        }
        round.truncate(kept);
    }
}

/// A table being filled, and per backend in fill order its walk, how many slots it has still
/// to take, and its index in the caller's list (what its slots hold).
struct Filling<'a> {
    slots: &'a mut [u16],
    walks: Vec<Permutation>,
    left: Vec<usize>,
    owners: Vec<u16>,
}

impl Filling<'_> {
    /// The turns `round[turns]` claim in order: the slot `found` for each (in the order of
    /// `turns`) if still free, else the next free one of its walk. Each backend still under
    /// quota is kept for the next round at `round[kept]` on; returns how many are kept now.
    ///
    /// Not inlined into the fill: there the count of kept turns lived on the stack, a store
    /// and a load on every turn's path.
    #[inline(never)]
    fn claim_in_order(
        &mut self,
        round: &mut [u32],
        turns: Range<usize>,
        found: Option<&[u32]>,
        mut kept: usize,
    ) -> usize {
        let first = turns.start;
        for at in turns {
            let turn = round[at] as usize;
            let walk = &mut self.walks[turn];
            let slot = match found {
                Some(found) => {
                    let slot = found[at - first] as usize;
                    walk.jump_to(slot);
                    if self.slots[slot] == NO_BACKEND {
                        slot
                    } else {
                        walk.next_free(self.slots)
                    }
                }
                None => walk.next_free(self.slots),
            };
            self.slots[slot] = self.owners[turn];
            self.left[turn] -= 1;
            // Without a branch: which backends met their quota is a coin toss in the late
            // rounds.
            round[kept] = turn as u32;
            kept += usize::from(self.left[turn] > 0);
        }
        kept
    }

    /// Up to `rounds` whole rounds of `round`'s turns, in order; returns how many slots they
    /// claimed, and `round` keeps the backends still under quota.
    ///
    /// First each backend's walk lists the slots it passes that are free now, a few more than
    /// it has turns ([`FreeAhead`]). Then the turns claim in order, each the first slot of its
    /// list still free, and with none left walk on. A backend's walk goes from slot to slot of
    /// its list, and every slot between two of them was taken before the rounds began: the
    /// list's first slot still free is where its walk would go. Finding the slots needs no
    /// branch on what a slot holds; one at a time, each turn's walk mispredicted once.
    #[inline(never)]
    fn claim_rounds(
        &mut self,
        round: &mut Vec<u32>,
        rounds: usize,
        ahead: &mut Vec<FreeAhead>,
    ) -> usize {
        if ahead.len() < self.walks.len() {
            ahead.resize_with(self.walks.len(), FreeAhead::default);
        }
        // A turn's slot is taken by an earlier turn of these rounds about once in
        // `CHUNK_SHARE`: a list that much longer holds most of those, and a walk past the
        // list's end still finds its slot. A backend near its quota has fewer turns.
        let wanted = rounds + rounds / CHUNK_SHARE;
        for &turn in round.iter() {
            let turn = turn as usize;
            let wanted = wanted.min(self.left[turn]);
            ahead[turn].list(self.slots, &self.walks[turn], wanted);
        }
        let mut claimed = 0;
        for _ in 0..rounds {
            let mut kept = 0;
            for at in 0..round.len() {
                let turn = round[at] as usize;
                let walk = &mut self.walks[turn];
                let slot = ahead[turn]
                    .next_still_free(self.slots)
                    .unwrap_or_else(|| walk.next_free(self.slots));
                // A slot taken from the list was not walked to: a walk on goes from here.
                walk.jump_to(slot);
                self.slots[slot] = self.owners[turn];
                self.left[turn] -= 1;
                claimed += 1;
                round[kept] = turn as u32;
                kept += usize::from(self.left[turn] > 0);
            }
            round.truncate(kept);
            if round.is_empty() {
                break;
            }
        }
        claimed
    }

    /// The last few free slots (`endgame_slots`), from `turn` on: a walk would mostly meet
    /// taken ones (the last 1% of the table costs more than half of all steps). Every slot a
    /// backend's walk has passed is taken, so its next free slot is the free one earliest in
    /// its permutation: the same slot the walk would reach.
    fn claim_last_slots(&mut self, mut turn: usize) {
        let size = self.slots.len();
        let modulus = Modulus::new(size);
        // The free slots, found a block at a time: most blocks have none.
        let mut free: Vec<usize> = Vec::new();
        for (block, block_slots) in self.slots.chunks(64).enumerate() {
            if block_slots.contains(&NO_BACKEND) {
                let free_in_block = block_slots
                    .iter()
                    .enumerate()
                    .filter(|&(_, &s)| s == NO_BACKEND);
                free.extend(free_in_block.map(|(at, _)| block * 64 + at));
            }
        }
        // As many turns are left as free slots (the quotas add up to the table).
        let mut turns_left: usize = self.left.iter().sum();
        while turns_left > 0 {
            if self.left[turn] > 0 {
                let walk = &mut self.walks[turn];
                // Only the few backends with a turn in the end game need the inverse.
                let inverse_skip = inverse_modulo(walk.skip, size as u32);
                let Some((at, &slot)) = free
                    .iter()
                    .enumerate()
                    .min_by_key(|&(_, &s)| walk.position(s, inverse_skip, &modulus))
                else {
                    break; // Not reached: a slot is free for each turn left.
                };
                free.swap_remove(at);
                walk.jump_to(slot);
                self.slots[slot] = self.owners[turn];
                self.left[turn] -= 1;
                turns_left -= 1;
            }
            turn += 1;
            if turn == self.walks.len() {
                turn = 0;
            }
        }
    }
}

/// A chunk has at most `free / CHUNK_SHARE` turns. The k-th turn of a chunk finds its slot
/// taken by an earlier one with a chance of about `k / free`: at most 1 turn in 32 on average
/// (1 in 64 at N = 1000, where a round is shorter than a chunk at first), and each such turn
/// walks on alone.
const CHUNK_SHARE: usize = 16;

/// Below this many turns in a chunk, or backends in a round, turns do not walk together: a
/// short round's turns are found several rounds at once ([`Filling::claim_rounds`]), or one
/// at a time.
const FEW_TURNS: usize = 16;

/// Below this many rounds in a chunk, a round short of [`FEW_TURNS`] walks one turn at a
/// time: the free slots are few then, a walk to the next one is long, and its one mispredicted
/// branch is a small part of it.
const MANY_ROUNDS: usize = 8;

/// One walk in [`find_free_slots`]: where it is, its step, and its place in the chunk.
#[derive(Debug, Clone, Copy, Default)]
struct Walker {
    current: u32,
    skip: u32,
    turn: u32,
}

/// For each of `turns`, the first slot after its walk's current one that is free in `slots`,
/// into `found` in the order of `turns`. `free` is how many slots are free, at least one.
///
/// All the walks step together, a few slots a pass, and a walk that met a free slot leaves
/// the next pass. Nothing branches on what a slot holds (a walk one at a time mispredicts once
/// a turn, and the wait for the slot's load comes with it), and the loads of different walks
/// overlap.
fn find_free_slots(
    slots: &[u16],
    walks: &[Permutation],
    turns: &[u32],
    free: usize,
    walkers: &mut Vec<Walker>,
    found: &mut Vec<u32>,
) {
    found.clear();
    found.resize(turns.len(), 0);
    // A walk takes about `slots / free` steps: more steps a pass save passes, and waste the
    // steps after a free slot.
    match slots.len() / free / 2 {
        0..=1 => walk_together::<1>(slots, walks, turns, walkers, found),
        2..=3 => walk_together::<2>(slots, walks, turns, walkers, found),
        4..=7 => walk_together::<4>(slots, walks, turns, walkers, found),
        _ => walk_together::<8>(slots, walks, turns, walkers, found),
    }
}

/// [`find_free_slots`]'s passes, `STEPS` slots of each walk a pass. The first pass reads the
/// walks themselves; only those still walking after it are copied out.
///
/// Not inlined: each pass size as a function of its own ran the N = 1000 fill 3.5% faster with
/// the release profile (one codegen unit, thin LTO), which otherwise inlines all four into
/// the fill.
#[inline(never)]
fn walk_together<const STEPS: usize>(
    slots: &[u16],
    walks: &[Permutation],
    turns: &[u32],
    walkers: &mut Vec<Walker>,
    found: &mut [u32],
) {
    walkers.clear();
    walkers.resize(turns.len(), Walker::default());
    let mut walking = 0;
    for (at, &turn) in turns.iter().enumerate() {
        let walk = &walks[turn as usize];
        let walker = Walker {
            current: walk.current,
            skip: walk.skip,
            turn: at as u32,
        };
        walking += take_steps::<STEPS>(slots, walker, &mut walkers[walking], found);
    }
    while walking > 0 {
        let mut still_walking = 0;
        for at in 0..walking {
            let walker = walkers[at];
            still_walking += take_steps::<STEPS>(slots, walker, &mut walkers[still_walking], found);
        }
        walking = still_walking;
    }
}

/// `STEPS` steps of `walker`: the first free slot among them goes to `found` (or the last
/// slot while none was free: the next pass overwrites it), and the walker, moved on, to
/// `next`. 1 while it walks on, 0 when it found its slot.
#[inline(always)]
fn take_steps<const STEPS: usize>(
    slots: &[u16],
    walker: Walker,
    next: &mut Walker,
    found: &mut [u32],
) -> usize {
    let size = slots.len() as u32;
    let mut steps = [0u32; STEPS];
    let mut free_steps = 0u32;
    let mut slot = walker.current;
    for (step, taken_at) in steps.iter_mut().enumerate() {
        slot = step_on(slot, walker.skip, size);
        *taken_at = slot;
        free_steps |= u32::from(slots[slot as usize] == NO_BACKEND) << step;
    }
    let first = (free_steps | 1 << (STEPS - 1)).trailing_zeros() as usize;
    found[walker.turn as usize] = steps[first];
    *next = Walker {
        current: slot,
        ..walker
    };
    usize::from(free_steps == 0)
}

/// Steps of a walk [`FreeAhead::list`] takes at once.
const LIST_STEPS: usize = 8;

/// The free slots a backend's walk meets next, in the order it meets them, for
/// [`Filling::claim_rounds`].
#[derive(Debug, Default)]
struct FreeAhead {
    slots: Vec<u32>,
    /// The first of `slots` not looked at yet.
    next: usize,
}

impl FreeAhead {
    /// Lists the next `wanted` free slots of `walk` (or a few more), from its current slot on.
    fn list(&mut self, slots: &[u16], walk: &Permutation, wanted: usize) {
        let size = slots.len() as u32;
        // The walk's next steps are `skip`, `2 skip`, ... on from where it is: each taken from
        // that slot, not from the step before, so that they do not wait on each other.
        let mut strides = [0u32; LIST_STEPS];
        let mut stride = 0;
        for next in &mut strides {
            stride = step_on(stride, walk.skip, size);
            *next = stride;
        }
        let block = strides[LIST_STEPS - 1];
        // Every slot passed is written; only a free one moves the end on.
        self.slots.resize(wanted + LIST_STEPS, 0);
        self.next = 0;
        let mut listed = 0;
        let mut from = walk.current;
        while listed < wanted {
            for &stride in &strides {
                let slot = step_on(from, stride, size);
                self.slots[listed] = slot;
                listed += usize::from(slots[slot as usize] == NO_BACKEND);
            }
            from = step_on(from, block, size);
        }
        self.slots.truncate(listed);
    }

    /// The next listed slot that `slots` still has free, if any is left.
    #[inline]
    fn next_still_free(&mut self, slots: &[u16]) -> Option<usize> {
        while let Some(&slot) = self.slots.get(self.next) {
            self.next += 1;
            if slots[slot as usize] == NO_BACKEND {
                return Some(slot as usize);
            }
        }
        None
    }
}

/// Per-backend slot quotas (in fill order) adding up to exactly `size`: the floor of each
/// weighted share, with the remainder going to the largest fractional parts (ties by order).
fn quotas(backends: &[Backend], order: &[usize], size: usize) -> Vec<usize> {
    let total: u64 = order.iter().map(|&i| u64::from(backends[i].weight)).sum();
    let mut quotas = Vec::with_capacity(order.len());
    let mut remainders = Vec::with_capacity(order.len());
    for (turn, &i) in order.iter().enumerate() {
        let share = size as u64 * u64::from(backends[i].weight);
        quotas.push((share / total) as usize);
        remainders.push((share % total, turn));
    }
    let mut left = size - quotas.iter().sum::<usize>();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, turn) in &remainders {
        if left == 0 {
            break;
        }
        quotas[turn] += 1;
        left -= 1;
    }
    quotas
}

/// Below this many free slots, the fill finds each backend's next free slot by its place in
/// the backend's permutation instead of walking to it: about `sqrt(M / 2)`, where the walk's
/// expected `M / free` steps cost as much as a look at each free slot.
fn endgame_slots(size: usize) -> usize {
    (size / 2).isqrt().max(1)
}

/// A backend's walk through the table: `offset`, `offset + skip`, ... modulo `M`.
///
/// `u32`: table sizes are below 2^24, and the walks of a chunk are read together.
#[derive(Debug)]
struct Permutation {
    current: u32,
    offset: u32,
    skip: u32,
}

impl Permutation {
    fn new(ip: IpAddr, size: u32, seed: u64) -> Permutation {
        let octets = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        // IPv4: its four octets, as before IPv6 servers existed (a pair of mixed versions
        // chooses alike).
        let id = match ip {
            IpAddr::V4(_) => &octets[12..],
            IpAddr::V6(_) => &octets[..],
        };
        // Two independent hashes of the identity, as in the paper (h1 for offset, h2 for skip).
        let offset = (xxh3_64_with_seed(id, seed ^ 0x6f66_6673_6574) % u64::from(size)) as u32;
        let skip = if size > 1 {
            (xxh3_64_with_seed(id, seed ^ 0x736b_6970) % u64::from(size - 1)) as u32 + 1
        } else {
            1
        };
        Permutation {
            // One step before the offset, so that the first step lands on it.
            current: (offset + size - skip % size) % size,
            offset,
            skip,
        }
    }

    /// How many steps from the start of the walk `slot` is, given `skip`'s inverse modulo `M`.
    #[inline]
    fn position(&self, slot: usize, inverse_skip: u64, modulus: &Modulus) -> u64 {
        let mut from_offset = slot + modulus.size - self.offset as usize;
        if from_offset >= modulus.size {
            from_offset -= modulus.size;
        }
        modulus.reduce(from_offset as u64 * inverse_skip)
    }

    /// Continues the walk from `slot`, as if it had stepped there.
    fn jump_to(&mut self, slot: usize) {
        self.current = slot as u32;
    }

    /// Walks on to the next slot that `slots` has free (the paper's Pseudocode 1).
    fn next_free(&mut self, slots: &[u16]) -> usize {
        loop {
            let slot = self.next(slots.len());
            if slots[slot] == NO_BACKEND {
                return slot;
            }
        }
    }

    #[inline]
    fn next(&mut self, size: usize) -> usize {
        self.current = step_on(self.current, self.skip, size as u32);
        self.current as usize
    }
}

/// The slot `skip` on from `slot`, modulo `size`. Without a branch: whether a step wraps is a
/// coin toss the CPU would mispredict (`step - size` underflows unless the step wrapped).
#[inline]
fn step_on(slot: u32, skip: u32, size: u32) -> u32 {
    let step = slot + skip;
    step.min(step.wrapping_sub(size))
}

/// Reduction modulo the table size without a division (Barrett): a 64-bit `div` costs tens of
/// cycles on the CPUs lbd runs on, and the end game reduces once per free slot per turn.
#[derive(Debug)]
struct Modulus {
    size: usize,
    /// `floor((2^64 - 1) / size)`.
    reciprocal: u64,
}

impl Modulus {
    fn new(size: usize) -> Modulus {
        Modulus {
            size,
            reciprocal: u64::MAX / size as u64,
        }
    }

    /// `value % size`, for `value` below `2^64 / 2` (the quotient estimate is short by at most
    /// one then).
    #[inline]
    fn reduce(&self, value: u64) -> u64 {
        let size = self.size as u64;
        let quotient = ((u128::from(value) * u128::from(self.reciprocal)) >> 64) as u64;
        let mut rest = value - quotient * size;
        while rest >= size {
            rest -= size;
        }
        rest
    }
}

/// `value`'s inverse modulo the prime `modulus` (extended Euclid); 0 for a modulus of 1.
///
/// Both are table sizes (`u32`), so every remainder and coefficient fits an `i64`, whose
/// division costs a fraction of an `i128`'s.
fn inverse_modulo(value: u32, modulus: u32) -> u64 {
    let (mut old_r, mut r) = (i64::from(value), i64::from(modulus));
    let (mut old_s, mut s) = (1i64, 0i64);
    while r != 0 {
        let quotient = old_r / r;
        (old_r, r) = (r, old_r - quotient * r);
        (old_s, s) = (s, old_s - quotient * s);
    }
    old_s.rem_euclid(i64::from(modulus)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: u32 = 65537;
    const SEED: u64 = 0x1bd5_eed0;

    fn backends(n: usize, weight: impl Fn(usize) -> u16) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                ip: std::net::Ipv4Addr::new(198, 18, (i / 250) as u8 + 2, (i % 250) as u8 + 1)
                    .into(),
                weight: weight(i),
            })
            .collect()
    }

    /// The paper's fill as it reads, one step at a time to each backend's next free slot.
    fn plain_walk(backends: &[Backend], size: u32, seed: u64) -> Vec<u16> {
        let size = size as usize;
        let mut slots = vec![NO_BACKEND; size];
        let mut order: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect();
        order.sort_by_key(|&i| backends[i].ip);
        if order.is_empty() {
            return slots;
        }
        let quotas = quotas(backends, &order, size);
        let mut walks: Vec<Permutation> = order
            .iter()
            .map(|&i| Permutation::new(backends[i].ip, size as u32, seed))
            .collect();
        let mut taken = vec![0usize; order.len()];
        let mut filled = 0;
        while filled < size {
            for (turn, &backend) in order.iter().enumerate() {
                if taken[turn] == quotas[turn] || filled == size {
                    continue;
                }
                let mut slot = walks[turn].next(size);
                while slots[slot] != NO_BACKEND {
                    slot = walks[turn].next(size);
                }
                slots[slot] = backend as u16;
                taken[turn] += 1;
                filled += 1;
            }
        }
        slots
    }

    fn counts(table: &MaglevTable, n: usize) -> Vec<usize> {
        let mut counts = vec![0usize; n];
        for &slot in table.slots() {
            counts[slot as usize] += 1;
        }
        counts
    }

    /// Every backend's slot count is within 1% of the table of its weighted share.
    fn assert_balanced(list: &[Backend], table: &MaglevTable) {
        let total: f64 = list.iter().map(|b| f64::from(b.weight)).sum();
        for (i, count) in counts(table, list.len()).into_iter().enumerate() {
            let expected = f64::from(M) * f64::from(list[i].weight) / total;
            let tolerance = f64::from(M) * 0.01;
            assert!(
                (count as f64 - expected).abs() <= tolerance,
                "backend {i} has {count} slots, expected {expected:.1}"
            );
        }
    }

    #[test]
    fn every_slot_is_owned_when_any_backend_has_weight() {
        let list = backends(3, |_| 1);
        let table = MaglevTable::build(&list, 7, SEED);
        assert!(table.slots().iter().all(|&s| (s as usize) < list.len()));
    }

    #[test]
    fn empty_or_all_drained_gives_no_backend() {
        let table = MaglevTable::build(&[], 7, SEED);
        assert_eq!(table.lookup(b"abcd"), None);
        let drained = backends(2, |_| 0);
        let table = MaglevTable::build(&drained, 7, SEED);
        assert_eq!(table.lookup(b"abcd"), None);
    }

    #[test]
    fn drained_backend_gets_no_slot() {
        let list = backends(4, |i| if i == 2 { 0 } else { 100 });
        let table = MaglevTable::build(&list, M, SEED);
        assert_eq!(counts(&table, 4)[2], 0);
    }

    #[test]
    fn config_order_does_not_change_the_table() {
        let list = backends(10, |i| 1 + i as u16);
        let mut reversed = list.clone();
        reversed.reverse();
        let a = MaglevTable::build(&list, M, SEED);
        let b = MaglevTable::build(&reversed, M, SEED);
        for key in 0u32..10_000 {
            let key = key.to_be_bytes();
            let ia = a.lookup(&key).map(|i| list[i as usize].ip);
            let ib = b.lookup(&key).map(|i| reversed[i as usize].ip);
            assert_eq!(ia, ib);
        }
    }

    #[test]
    fn both_families_fill_in_address_order() {
        let mut list = backends(40, |i| 10 + i as u16);
        // Some IPv6 addresses are below every IPv4 one as numbers: still after them.
        for (i, backend) in list.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
            let prefix = if i % 2 == 0 { "" } else { "2001:db8" };
            let address = format!("{prefix}::{:x}", 0xff00 - i);
            backend.ip = address.parse().expect("an IPv6 address");
        }
        for size in [251, 65537] {
            let table = MaglevTable::build(&list, size, SEED);
            assert_eq!(table.slots(), &plain_walk(&list, size, SEED)[..]);
        }
    }

    #[test]
    fn the_inverse_undoes_the_skip() {
        for modulus in [2u32, 7, 251, 65537, 16_777_213] {
            for value in [1, 2, modulus / 3 + 1, modulus - 1]
                .into_iter()
                .filter(|&v| v < modulus)
            {
                let inverse = inverse_modulo(value, modulus);
                assert!(inverse < u64::from(modulus));
                assert_eq!(
                    u64::from(value) * inverse % u64::from(modulus),
                    1,
                    "{value} mod {modulus}"
                );
            }
        }
    }

    #[test]
    fn seed_changes_the_table() {
        let list = backends(10, |_| 1);
        assert_ne!(
            MaglevTable::build(&list, M, 1).slots(),
            MaglevTable::build(&list, M, 2).slots()
        );
    }

    #[test]
    fn balance_for_up_to_100_equal_servers() {
        for n in [1, 2, 3, 7, 10, 33, 64, 100] {
            let list = backends(n, |_| 100);
            assert_balanced(&list, &MaglevTable::build(&list, M, SEED));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn balance_holds_for_any_weights(weights in prop::collection::vec(1u16..=1000, 1..=100)) {
            let list = backends(weights.len(), |i| weights[i]);
            assert_balanced(&list, &MaglevTable::build(&list, M, SEED));
        }

        /// Removing one of N backends moves that backend's slots plus at most 1% of the table.
        #[test]
        fn minimal_disruption_on_removal(n in 2usize..=100, removed_pick in 0usize..100) {
            let list = backends(n, |_| 100);
            let removed = removed_pick % n;
            let before = MaglevTable::build(&list, M, SEED);
            let rest: Vec<Backend> = list.iter().enumerate()
                .filter(|&(i, _)| i != removed).map(|(_, b)| *b).collect();
            let after = MaglevTable::build(&rest, M, SEED);
            let mut moved_elsewhere = 0usize;
            for (slot_before, slot_after) in before.slots().iter().zip(after.slots()) {
                let was = list[*slot_before as usize].ip;
                let now = rest[*slot_after as usize].ip;
                if was != list[removed].ip && was != now {
                    moved_elsewhere += 1;
                }
            }
            prop_assert!(moved_elsewhere as f64 <= f64::from(M) * 0.01,
                "{moved_elsewhere} slots of surviving backends moved (n = {n})");
        }

        /// The end game (free slots found by their place in each permutation) gives exactly
        /// the table of the plain walk, for tables of any size and any weights.
        #[test]
        fn the_fill_is_the_plain_walk(
            size in prop::sample::select(vec![2u32, 3, 7, 13, 251, 1021, 4093, 65537]),
            weights in prop::collection::vec(0u16..=300, 1..=60),
            seed in any::<u64>(),
        ) {
            let n = weights.len().min(size as usize - 1);
            let list = backends(n, |i| weights[i]);
            let table = MaglevTable::build(&list, size, seed);
            prop_assert_eq!(table.slots(), &plain_walk(&list, size, seed)[..]);
        }

        /// The same with enough backends that the turns of a round walk together, in chunks.
        #[test]
        fn the_fill_is_the_plain_walk_with_many_backends(
            size in prop::sample::select(vec![4093u32, 16381, 65537]),
            weights in prop::collection::vec(0u16..=300, 16..=1000),
            seed in any::<u64>(),
        ) {
            let list = backends(weights.len(), |i| weights[i]);
            let table = MaglevTable::build(&list, size, seed);
            prop_assert_eq!(table.slots(), &plain_walk(&list, size, seed)[..]);
        }

        #[test]
        fn deterministic_across_builds(n in 1usize..=100, seed in any::<u64>()) {
            let list = backends(n, |i| (i % 7) as u16 + 1);
            prop_assert_eq!(MaglevTable::build(&list, 251, seed), MaglevTable::build(&list, 251, seed));
        }
    }
}

#[cfg(test)]
mod golden {
    //! The table this version builds, pinned: two balancers (an HA pair, or one restarted on a
    //! newer build) send a client to the same server only while every version builds the same
    //! table from the same servers, weights and seed. A change that fails this test changes
    //! where clients go: it needs a new seed default and a note for operators, not a new pin.
    use super::*;

    fn reference() -> MaglevTable {
        let backends: Vec<Backend> = [(11, 100), (12, 100), (13, 50), (14, 200)]
            .into_iter()
            .map(|(host, weight)| Backend {
                ip: std::net::Ipv4Addr::new(198, 18, 0, host).into(),
                weight,
            })
            .collect();
        MaglevTable::build(&backends, 251, lbd_config::DEFAULT_HASH_SEED)
    }

    #[test]
    fn the_table_is_the_one_every_version_builds() {
        let table = reference();
        assert_eq!(
            table.slots()[..40],
            [
                2, 1, 3, 3, 3, 3, 0, 1, 0, 0, 2, 3, 1, 3, 1, 2, 3, 1, 3, 0, 2, 0, 0, 0, 1, 3, 3, 1,
                3, 3, 1, 3, 1, 2, 0, 1, 3, 0, 2, 3
            ]
        );
        let all: Vec<u8> = table.slots().iter().flat_map(|s| s.to_le_bytes()).collect();
        assert_eq!(
            xxh3_64_with_seed(&all, 0),
            0xa25b_fc5d_0219_77a1,
            "all 251 slots"
        );
        // And clients of 198.19.0.0/24 land where they always have.
        let clients: Vec<Option<u16>> =
            (1..=16u8).map(|c| table.lookup(&[198, 19, 0, c])).collect();
        let expected = [3, 0, 3, 3, 3, 0, 3, 0, 2, 3, 3, 3, 0, 2, 3, 2].map(Some);
        assert_eq!(clients, expected);
    }
}
