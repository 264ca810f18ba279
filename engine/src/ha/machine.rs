//! Who is active: a state machine that takes the time and events (a heartbeat received, the
//! link going down, an operator's takeover or release) and says what to send and when the
//! node's state changed. It reads no clock and opens no socket (quinn-proto's way), so every
//! partition, loss and restart is a unit test that runs in microseconds.
//!
//! The rules, with lbd's own heartbeat (`mode = "heartbeat"`):
//! - A node whose link is down is `fault` and never active; one that hears its peer is in
//!   fault takes over.
//! - A peer not heard from for `dead_interval` is dead: the node takes over (after the same
//!   grace at start, so that a starting node first learns whether its peer is active).
//! - Both passive: one becomes active, the one that has not released, else the primary.
//! - Both active (a partition has healed, or a takeover is under way): the one with the lower
//!   epoch yields; with equal epochs the secondary yields. Only a takeover raises the epoch,
//!   so after a partition the primary keeps the traffic.
//! - One active, one passive: it stays so, unless the passive is a primary with `preempt`,
//!   which takes over.
//! - `takeover` makes the node active with an epoch above its peer's; `release` makes it
//!   passive and marks it released (it is not chosen while its peer can serve), which the peer
//!   acts on at the first heartbeat: a planned handover takes one heartbeat's trip.
//!
//! With `mode = "external"` the node sends nothing, listens to nothing, and is active only
//! between a `takeover` and a `release` (keepalived's notify scripts call them).

use crate::ha::wire::{HaState, Heartbeat};
use lbd_config::{HaMode, HaRole};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// What the machine is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Time has passed (call at [`Machine::next_wakeup`] at the latest).
    Tick,
    /// An authentic heartbeat, newer than any before from its sender.
    Heartbeat(Heartbeat),
    /// The node's interface is up (true) or down (false).
    Link(bool),
    /// The operator (or a script) makes this node active.
    Takeover,
    /// The operator (or a stopping lbd) hands the traffic to the peer.
    Release,
}

/// What to do after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Actions {
    /// Send this heartbeat to every peer address now.
    pub send: Option<Heartbeat>,
    /// The node's state changed to this.
    pub became: Option<HaState>,
}

/// The settings the machine runs with.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Preferred or not.
    pub role: HaRole,
    /// Own heartbeat, or another program decides.
    pub mode: HaMode,
    /// Whether a primary takes over from an active secondary on its own.
    pub preempt: bool,
    /// Between heartbeats.
    pub interval: Duration,
    /// Silence that means the peer is dead.
    pub dead_interval: Duration,
}

/// What the node knows of its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its last heartbeat.
    pub beat: Heartbeat,
    /// When that arrived.
    pub heard: Instant,
}

/// One node of the pair.
#[derive(Debug, Clone)]
pub struct Machine {
    settings: Settings,
    local: Ipv4Addr,
    boot: u64,
    seq: u64,
    state: HaState,
    epoch: u64,
    released: bool,
    link_up: bool,
    started: Instant,
    next_beat: Instant,
    peer: Option<Peer>,
    generation: u64,
}

impl Machine {
    /// A node at `local`, started at `now` (`boot`: the start as ns since the Unix epoch, so
    /// that the peer can order this run's heartbeats after an earlier run's). It starts
    /// passive.
    pub fn new(settings: Settings, local: Ipv4Addr, boot: u64, now: Instant) -> Machine {
        Machine {
            settings,
            local,
            boot,
            seq: 0,
            state: HaState::Passive,
            epoch: 0,
            released: false,
            link_up: true,
            started: now,
            next_beat: now,
            peer: None,
            generation: 0,
        }
    }

    /// This node's state.
    pub fn state(&self) -> HaState {
        self.state
    }

    /// The takeovers this node has seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether it has handed over.
    pub fn released(&self) -> bool {
        self.released
    }

    /// The peer's last heartbeat, if it has been heard.
    pub fn peer(&self) -> Option<Peer> {
        self.peer
    }

    /// Whether the peer has been heard within the dead interval.
    pub fn peer_alive(&self, now: Instant) -> bool {
        self.peer.is_some_and(|peer| {
            now.saturating_duration_since(peer.heard) < self.settings.dead_interval
        })
    }

    /// The configuration generation the heartbeats carry.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Sets the configuration generation the heartbeats carry.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// When to call again with [`Event::Tick`] at the latest, seen at `now`: the next
    /// heartbeat, or the moment the peer would count as dead if that comes first.
    pub fn next_wakeup(&self, now: Instant) -> Instant {
        if self.settings.mode == HaMode::External {
            return now + Duration::from_secs(1);
        }
        let mut next = self.next_beat;
        if let Some(peer) = self.peer {
            let dead_at = peer.heard + self.settings.dead_interval;
            if dead_at > now {
                next = next.min(dead_at);
            }
        }
        next
    }

    /// Takes `event` at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) -> Actions {
        let before = self.state;
        match event {
            Event::Tick => {}
            Event::Heartbeat(beat) => {
                if beat.sender != self.local {
                    self.peer = Some(Peer { beat, heard: now });
                }
            }
            Event::Link(up) => self.link_up = up,
            Event::Takeover => {
                self.released = false;
                let peer_epoch = self.peer.map_or(0, |p| p.beat.epoch);
                self.epoch = self.epoch.max(peer_epoch) + 1;
                if self.link_up {
                    self.state = HaState::Active;
                }
            }
            Event::Release => {
                self.released = true;
                if self.state == HaState::Active {
                    self.state = HaState::Passive;
                }
            }
        }
        self.decide(now);
        let became = (self.state != before).then_some(self.state);
        // A heartbeat at its time, and at once when something changed that the peer acts on.
        let urgent = became.is_some() || matches!(event, Event::Takeover | Event::Release);
        let send = (self.settings.mode == HaMode::Heartbeat && (urgent || now >= self.next_beat))
            .then(|| self.heartbeat(now));
        Actions { send, became }
    }

    fn heartbeat(&mut self, now: Instant) -> Heartbeat {
        self.seq += 1;
        self.next_beat = now + self.settings.interval;
        Heartbeat {
            sender: self.local,
            role: self.settings.role,
            state: self.state,
            released: self.released,
            epoch: self.epoch,
            boot: self.boot,
            seq: self.seq,
            generation: self.generation,
        }
    }

    /// The state the rules give at `now`.
    fn decide(&mut self, now: Instant) {
        if !self.link_up {
            self.state = HaState::Fault;
            return;
        }
        if self.state == HaState::Fault {
            self.state = HaState::Passive;
        }
        if self.settings.mode == HaMode::External {
            return;
        }
        let alive_peer = self.peer.filter(|_| self.peer_alive(now)).map(|p| p.beat);
        let Some(peer) = alive_peer else {
            // Alone: take over, once the start's grace has let a living peer be heard.
            if now >= self.started + self.settings.dead_interval {
                if self.peer.is_some() {
                    // The peer died: what it released or claimed no longer counts.
                    self.released = false;
                }
                self.state = HaState::Active;
            }
            return;
        };
        let me_primary = self.settings.role == HaRole::Primary;
        self.state = match (self.state, peer.state) {
            (_, HaState::Fault) => HaState::Active,
            (HaState::Active, HaState::Active) => {
                let i_win = self.epoch > peer.epoch || (self.epoch == peer.epoch && me_primary);
                if i_win {
                    HaState::Active
                } else {
                    HaState::Passive
                }
            }
            (HaState::Passive, HaState::Passive) => {
                let chosen = if self.released != peer.released {
                    !self.released
                } else {
                    me_primary
                };
                if chosen {
                    HaState::Active
                } else {
                    HaState::Passive
                }
            }
            (HaState::Passive, HaState::Active) => {
                if self.settings.preempt && me_primary && !self.released && !peer.released {
                    self.epoch = peer.epoch + 1;
                    HaState::Active
                } else {
                    HaState::Passive
                }
            }
            (state, _) => state,
        };
        // Whatever the outcome, a later takeover must outbid both.
        self.epoch = self.epoch.max(peer.epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::wire::ReplayGuard;

    const INTERVAL: Duration = Duration::from_millis(100);
    const DEAD: Duration = Duration::from_millis(500);

    fn settings(role: HaRole, preempt: bool) -> Settings {
        Settings {
            role,
            mode: HaMode::Heartbeat,
            preempt,
            interval: INTERVAL,
            dead_interval: DEAD,
        }
    }

    /// Two nodes on a simulated wire that can lose everything (a partition) and a clock that
    /// moves in small steps.
    struct Pair {
        nodes: [Machine; 2],
        guards: [ReplayGuard; 2],
        now: Instant,
        connected: bool,
        /// Whether each node runs (a killed one neither sends nor receives).
        running: [bool; 2],
        /// (when, node, state) of every change.
        log: Vec<(Instant, usize, HaState)>,
    }

    impl Pair {
        fn new(preempt: bool) -> Pair {
            let now = Instant::now();
            let node = |i: usize, role| {
                Machine::new(
                    settings(role, preempt),
                    Ipv4Addr::new(198, 18, 0, 2 + i as u8),
                    1_000 + i as u64,
                    now,
                )
            };
            Pair {
                nodes: [node(0, HaRole::Primary), node(1, HaRole::Secondary)],
                guards: [ReplayGuard::default(), ReplayGuard::default()],
                now,
                connected: true,
                running: [true, true],
                log: Vec::new(),
            }
        }

        fn handle(&mut self, i: usize, event: Event) {
            if !self.running[i] {
                return;
            }
            let actions = self.nodes[i].handle(event, self.now);
            if let Some(state) = actions.became {
                self.log.push((self.now, i, state));
            }
            if let Some(beat) = actions.send
                && self.connected
                && self.running[1 - i]
            {
                // Through the wire format and the replay guard, as the real thing goes.
                let received = Heartbeat::decode(&beat.encode(b"key"), b"key").expect("authentic");
                if self.guards[1 - i].accept(&received).is_ok() {
                    self.handle(1 - i, Event::Heartbeat(received));
                }
            }
        }

        /// Runs both nodes for `span`, in 10 ms steps.
        fn run(&mut self, span: Duration) {
            let end = self.now + span;
            while self.now < end {
                self.now += Duration::from_millis(10);
                for i in 0..2 {
                    if self.nodes[i].next_wakeup(self.now) <= self.now {
                        self.handle(i, Event::Tick);
                    }
                }
            }
        }

        fn states(&self) -> [HaState; 2] {
            [self.nodes[0].state(), self.nodes[1].state()]
        }

        /// When node `i` last became `state`.
        fn became(&self, i: usize, state: HaState) -> Option<Instant> {
            self.log
                .iter()
                .rev()
                .find(|(_, n, s)| *n == i && *s == state)
                .map(|(at, _, _)| *at)
        }
    }

    use HaState::{Active, Fault, Passive};

    #[test]
    fn the_primary_becomes_active_and_the_secondary_stays_passive() {
        let mut pair = Pair::new(false);
        pair.run(Duration::from_secs(2));
        assert_eq!(pair.states(), [Active, Passive]);
    }

    #[test]
    fn a_node_alone_takes_over_after_the_dead_interval() {
        let mut pair = Pair::new(false);
        pair.running[0] = false;
        pair.run(Duration::from_millis(400));
        assert_eq!(pair.nodes[1].state(), Passive, "still in its start's grace");
        pair.run(Duration::from_millis(200));
        assert_eq!(pair.nodes[1].state(), Active);
    }

    #[test]
    fn when_the_active_node_dies_the_other_takes_over_within_the_dead_interval() {
        let mut pair = Pair::new(false);
        pair.run(Duration::from_secs(2));
        let killed = pair.now;
        pair.running[0] = false;
        pair.run(Duration::from_secs(2));
        assert_eq!(pair.nodes[1].state(), Active);
        let took = pair.became(1, Active).expect("took over") - killed;
        assert!(took <= DEAD + INTERVAL, "{took:?}");
    }

    #[test]
    fn a_returning_primary_waits_without_preempt_and_takes_over_with_it() {
        for preempt in [false, true] {
            let mut pair = Pair::new(preempt);
            pair.run(Duration::from_secs(1));
            pair.running[0] = false;
            pair.run(Duration::from_secs(1));
            assert_eq!(pair.nodes[1].state(), Active);
            // The primary comes back: a new run of it, with a later boot.
            pair.nodes[0] = Machine::new(
                settings(HaRole::Primary, preempt),
                Ipv4Addr::new(198, 18, 0, 2),
                5_000,
                pair.now,
            );
            pair.running[0] = true;
            pair.run(Duration::from_secs(2));
            if preempt {
                assert_eq!(pair.states(), [Active, Passive], "preempt");
            } else {
                assert_eq!(
                    pair.states(),
                    [Passive, Active],
                    "no preempt: no second switch"
                );
                // Until the operator asks for it.
                pair.handle(0, Event::Takeover);
                pair.run(Duration::from_millis(300));
                assert_eq!(pair.states(), [Active, Passive], "after takeover");
            }
        }
    }

    #[test]
    fn after_a_partition_heals_exactly_one_stays_active_within_one_interval() {
        let mut pair = Pair::new(false);
        pair.run(Duration::from_secs(1));
        pair.connected = false;
        pair.run(Duration::from_secs(2));
        assert_eq!(
            pair.states(),
            [Active, Active],
            "each thinks the other dead"
        );
        let healed = pair.now;
        pair.connected = true;
        pair.run(Duration::from_secs(1));
        assert_eq!(pair.states(), [Active, Passive], "the secondary yields");
        let yielded = pair.became(1, Passive).expect("yielded") - healed;
        assert!(
            yielded <= INTERVAL + Duration::from_millis(10),
            "{yielded:?}"
        );
    }

    #[test]
    fn a_release_hands_over_at_the_next_heartbeat_and_a_takeover_takes_back() {
        let mut pair = Pair::new(false);
        pair.run(Duration::from_secs(1));
        let released = pair.now;
        pair.handle(0, Event::Release);
        assert_eq!(
            pair.states(),
            [Passive, Active],
            "in the same heartbeat's trip"
        );
        assert_eq!(pair.became(1, Active), Some(released));
        pair.run(Duration::from_secs(2));
        assert_eq!(
            pair.states(),
            [Passive, Active],
            "the released primary stays out"
        );
        pair.handle(0, Event::Takeover);
        pair.run(Duration::from_millis(300));
        assert_eq!(pair.states(), [Active, Passive]);
        // A takeover by the secondary works the same way.
        pair.handle(1, Event::Takeover);
        pair.run(Duration::from_millis(300));
        assert_eq!(pair.states(), [Passive, Active]);
        pair.run(Duration::from_secs(2));
        assert_eq!(pair.states(), [Passive, Active], "and sticks");
    }

    #[test]
    fn a_node_whose_link_is_down_never_takes_over_and_its_peer_does() {
        let mut pair = Pair::new(false);
        pair.run(Duration::from_secs(1));
        pair.handle(0, Event::Link(false));
        pair.run(Duration::from_millis(50));
        assert_eq!(pair.states(), [Fault, Active]);
        // With its link up again it comes back passive (no preempt).
        pair.handle(0, Event::Link(true));
        pair.run(Duration::from_secs(1));
        assert_eq!(pair.states(), [Passive, Active]);
        // A lone node with its link down stays in fault.
        let mut alone = Machine::new(
            settings(HaRole::Primary, false),
            Ipv4Addr::new(198, 18, 0, 2),
            1,
            pair.now,
        );
        alone.handle(Event::Link(false), pair.now);
        alone.handle(Event::Tick, pair.now + Duration::from_secs(5));
        assert_eq!(alone.state(), Fault);
        alone.handle(Event::Takeover, pair.now + Duration::from_secs(5));
        assert_eq!(alone.state(), Fault, "no takeover without a link");
    }

    #[test]
    fn lost_heartbeats_short_of_the_dead_interval_change_nothing() {
        let mut pair = Pair::new(false);
        pair.run(Duration::from_secs(1));
        for _ in 0..5 {
            pair.connected = false;
            pair.run(DEAD - INTERVAL);
            pair.connected = true;
            pair.run(INTERVAL * 2);
        }
        assert_eq!(pair.states(), [Active, Passive]);
        assert_eq!(
            pair.became(1, Active),
            None,
            "the secondary never took over"
        );
    }

    #[test]
    fn in_external_mode_only_takeover_and_release_decide() {
        let now = Instant::now();
        let mut node = Machine::new(
            Settings {
                mode: HaMode::External,
                ..settings(HaRole::Primary, false)
            },
            Ipv4Addr::new(198, 18, 0, 2),
            1,
            now,
        );
        assert_eq!(
            node.handle(Event::Tick, now + Duration::from_secs(10)).send,
            None
        );
        assert_eq!(node.state(), Passive, "alone for 10 s and still passive");
        let later = now + Duration::from_secs(11);
        assert_eq!(node.handle(Event::Takeover, later).became, Some(Active));
        assert_eq!(node.handle(Event::Release, later).became, Some(Passive));
    }
}
