//! The status page's graphs: packets per second of every service and real server over the last
//! 15 minutes, one sample a second, kept in memory (about 7 KB per series).

use lbd_proto::StatsReport;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept: 15 minutes.
pub const SAMPLES: usize = 900;

/// One series: the last total seen and the rates since.
#[derive(Debug, Default)]
struct Series {
    last_total: Option<u64>,
    rates: VecDeque<u64>,
}

impl Series {
    /// A new total: its increase since the last one is the last second's rate (a counter that
    /// went down, reset by a change, counts as 0).
    fn record(&mut self, total: u64) {
        if let Some(last) = self.last_total {
            if self.rates.len() == SAMPLES {
                self.rates.pop_front();
            }
            self.rates.push_back(total.saturating_sub(last));
        }
        self.last_total = Some(total);
    }
}

/// Every service's and real server's series, by label.
#[derive(Debug, Default)]
pub struct History {
    services: BTreeMap<String, Series>,
    real_servers: BTreeMap<(String, String), Series>,
}

/// What `/api/history` returns: packets per second, oldest first, one per second.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct HistoryReport {
    /// Seconds between samples.
    pub interval_s: u64,
    /// Per service label.
    pub services: BTreeMap<String, ServiceHistory>,
}

/// One service's series and its real servers'.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ServiceHistory {
    /// The service's packets per second.
    pub pps: Vec<u64>,
    /// Per real server label.
    pub real_servers: BTreeMap<String, Vec<u64>>,
}

impl History {
    /// Records the totals of one moment; services and servers no longer there are forgotten.
    pub fn record(&mut self, stats: &StatsReport) {
        let services = &stats.total.services;
        self.services
            .retain(|label, _| services.iter().any(|s| &s.label == label));
        self.real_servers.retain(|(service, rs), _| {
            services
                .iter()
                .any(|s| &s.label == service && s.real_servers.iter().any(|r| &r.label == rs))
        });
        for service in services {
            self.services
                .entry(service.label.clone())
                .or_default()
                .record(service.packets);
            for rs in &service.real_servers {
                self.real_servers
                    .entry((service.label.clone(), rs.label.clone()))
                    .or_default()
                    .record(rs.packets);
            }
        }
    }

    /// The series as the page reads them.
    pub fn report(&self) -> HistoryReport {
        let services = self
            .services
            .iter()
            .map(|(label, series)| {
                let real_servers = self
                    .real_servers
                    .iter()
                    .filter(|((service, _), _)| service == label)
                    .map(|((_, rs), series)| (rs.clone(), series.rates.iter().copied().collect()))
                    .collect();
                let pps = series.rates.iter().copied().collect();
                (label.clone(), ServiceHistory { pps, real_servers })
            })
            .collect();
        HistoryReport {
            interval_s: INTERVAL.as_secs(),
            services,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lbd_proto::{RealServerStats, ServiceStats, WorkerStats};

    fn stats(packets: u64) -> StatsReport {
        StatsReport {
            total: WorkerStats {
                services: vec![ServiceStats {
                    label: "s".into(),
                    packets,
                    bytes: 0,
                    real_servers: vec![RealServerStats {
                        label: "a".into(),
                        packets,
                        bytes: 0,
                    }],
                }],
                ..WorkerStats::default()
            },
            ..StatsReport::default()
        }
    }

    #[test]
    fn rates_are_the_increases_kept_for_fifteen_minutes() {
        let mut history = History::default();
        for second in 0..1000u64 {
            history.record(&stats(second * 10));
        }
        let report = history.report();
        let service = &report.services["s"];
        assert_eq!(service.pps.len(), SAMPLES);
        assert!(service.pps.iter().all(|&pps| pps == 10));
        assert_eq!(service.real_servers["a"].len(), SAMPLES);
        // A counter reset (a change) is no negative rate.
        history.record(&stats(5));
        assert_eq!(history.report().services["s"].pps.last(), Some(&0));
        // A service that is gone is forgotten.
        history.record(&StatsReport::default());
        assert!(history.report().services.is_empty());
    }
}
