//! The relay's metrics (Prometheus text exposition format, with prometheus-client) and the live
//! figures the admin listener's `/status` and `/readyz` report.
//!
//! Labels are low-cardinality words only (request kind, outcome, item kind, limit): never a device,
//! facility or document id, which would make the metrics a record of who talked to whom.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::relay::Observed;
use crate::store::StoreStats;

/// `kind` and `outcome` of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The request's kind (`push`, `pull`, ...).
    pub kind: &'static str,
    /// `ok`, or the refusal's error code (`not-member`, `rate-limited`, ...).
    pub outcome: &'static str,
}

/// `kind` of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The request's kind.
    pub kind: &'static str,
}

/// `item` of a pushed item (`bundle`, `op`, `grant`, `invite`, `approve`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ItemLabel {
    /// The item's kind.
    pub item: &'static str,
}

/// `limit` that refused (`requests`, `bytes`, `per-address`, `total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// The limit.
    pub limit: &'static str,
}

type DurationFamily = Family<KindLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Every metric of a relay process, registered in one [`Registry`].
pub struct Metrics {
    registry: Registry,
    /// `musubi_relay_requests_total{kind, outcome}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `musubi_relay_request_duration_seconds{kind}`: from arrival to answer, queue included.
    pub request_duration: DurationFamily,
    /// `musubi_relay_queue_depth`: requests waiting for or in the database thread.
    pub queue_depth: Gauge,
    /// `musubi_relay_busy_refusals_total`: requests refused because the queue was full.
    pub busy_refusals: Counter,
    /// `musubi_relay_rate_limited_total{limit}`: requests refused by a device's token bucket.
    pub rate_limited: Family<LimitLabel, Counter>,
    /// `musubi_relay_quota_refusals_total`: bundles refused by their facility's storage quota.
    pub quota_refusals: Counter,
    /// `musubi_relay_pushed_items_total{item}`: items stored (accepted, not duplicates).
    pub pushed_items: Family<ItemLabel, Counter>,
    /// `musubi_relay_pushed_bytes_total`: bundle bytes stored.
    pub pushed_bytes: Counter,
    /// `musubi_relay_notifications_total`: notifications sent to connected devices.
    pub notifications: Counter,
    /// `musubi_relay_commit_duration_seconds`: a push transaction's commit.
    pub commit_duration: Histogram,
    /// `musubi_relay_connected_devices`: devices with at least one connection.
    pub connected_devices: Gauge,
    /// `musubi_relay_stored_bytes`: bundle bytes held.
    pub stored_bytes: Gauge,
    /// `musubi_relay_database_bytes`: the database and its write-ahead log on disk.
    pub database_bytes: Gauge,
    /// `musubi_relay_last_backup_timestamp_seconds` (0: never).
    pub last_backup: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A registry with every metric at zero and `musubi_relay_build_info{version, protocol,
    /// schema}` 1.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("musubi_relay");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by kind and outcome",
            requests.clone(),
        );
        let request_duration: DurationFamily = Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from a request's arrival to its answer, queue included",
            Unit::Seconds,
            request_duration.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting for or in the database thread",
            queue_depth.clone(),
        );
        let busy_refusals = Counter::default();
        registry.register(
            "busy_refusals",
            "Requests refused because the queue was full",
            busy_refusals.clone(),
        );
        let rate_limited = Family::<LimitLabel, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests and connections refused by a limit",
            rate_limited.clone(),
        );
        let quota_refusals = Counter::default();
        registry.register(
            "quota_refusals",
            "Bundles refused because their facility's storage quota is used up",
            quota_refusals.clone(),
        );
        let pushed_items = Family::<ItemLabel, Counter>::default();
        registry.register(
            "pushed_items",
            "Pushed items stored (duplicates and refusals not counted)",
            pushed_items.clone(),
        );
        let pushed_bytes = Counter::default();
        registry.register_with_unit(
            "pushed",
            "Bundle bytes stored",
            Unit::Bytes,
            pushed_bytes.clone(),
        );
        let notifications = Counter::default();
        registry.register(
            "notifications",
            "Notifications sent to connected devices",
            notifications.clone(),
        );
        let commit_duration = duration_histogram();
        registry.register_with_unit(
            "commit_duration",
            "Commit time of a push transaction",
            Unit::Seconds,
            commit_duration.clone(),
        );
        let connected_devices = Gauge::default();
        registry.register(
            "connected_devices",
            "Devices connected now",
            connected_devices.clone(),
        );
        let stored_bytes = Gauge::default();
        registry.register_with_unit(
            "stored",
            "Bundle bytes the relay holds",
            Unit::Bytes,
            stored_bytes.clone(),
        );
        let database_bytes = Gauge::default();
        registry.register_with_unit(
            "database",
            "Size of the database and its write-ahead log",
            Unit::Bytes,
            database_bytes.clone(),
        );
        let last_backup = Gauge::default();
        registry.register(
            "last_backup_timestamp_seconds",
            "When the last backup finished (Unix time; 0 for never)",
            last_backup.clone(),
        );
        registry.register(
            "build",
            "This relay's version, protocol and schema",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("protocol", musubi_crdt::protocol::WIRE_VERSION.to_string()),
                ("schema", crate::store::SCHEMA_VERSION.to_string()),
            ]),
        );
        Self {
            registry,
            requests,
            request_duration,
            queue_depth,
            busy_refusals,
            rate_limited,
            quota_refusals,
            pushed_items,
            pushed_bytes,
            notifications,
            commit_duration,
            connected_devices,
            stored_bytes,
            database_bytes,
            last_backup,
        }
    }

    /// Counts one answered request: its outcome, its time since `arrived`, what it stored.
    pub fn observe(&self, observed: &Observed, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                kind: observed.kind,
                outcome: observed.outcome,
            })
            .inc();
        self.request_duration
            .get_or_create(&KindLabel {
                kind: observed.kind,
            })
            .observe(took.as_secs_f64());
        for (item, n) in &observed.stored {
            self.pushed_items
                .get_or_create(&ItemLabel { item })
                .inc_by(*n);
        }
        self.pushed_bytes.inc_by(observed.stored_bytes);
        self.quota_refusals.inc_by(observed.quota_refusals);
        if let Some(c) = observed.commit {
            self.commit_duration.observe(c.as_secs_f64());
        }
    }

    /// Counts a request refused before the database thread (`outcome` `busy` or `rate-limited`).
    pub fn refused(&self, kind: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { kind, outcome })
            .inc();
    }

    /// Sets the gauges read from the store.
    pub fn set_store(&self, stats: &StoreStats) {
        self.stored_bytes
            .set(i64::try_from(stats.bundle_bytes).unwrap_or(i64::MAX));
        self.database_bytes
            .set(i64::try_from(stats.db_bytes.saturating_add(stats.wal_bytes)).unwrap_or(i64::MAX));
        self.last_backup
            .set(stats.last_backup_at_ms.map_or(0, |ms| ms / 1000));
    }

    /// The metrics in the Prometheus text exposition format (OpenMetrics 1.0 text, as
    /// prometheus-client writes it).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the serving process knows beyond the database, shared by the swarm task, the database
/// thread and the admin listener.
#[derive(Debug)]
pub struct Live {
    /// When `serve` started.
    pub started: Instant,
    /// When `serve` started (wall clock).
    pub started_at: SystemTime,
    /// Open libp2p listen addresses.
    pub listeners: AtomicUsize,
    /// The queue's limit (its depth is the `queue_depth` gauge) ([`crate::Config::requests_queued_max`]).
    pub queue_max: usize,
    /// When a push last committed (ms since the Unix epoch; 0: not since start).
    pub last_commit_ms: AtomicI64,
    /// When a request last failed to store (a full disk, a locked or damaged database), in ms
    /// since the Unix epoch; 0 when the last request stored.
    pub store_failed_at_ms: AtomicI64,
    /// Bytes of free space the data directory's filesystem must keep for `/readyz`.
    pub min_free_bytes: AtomicU64,
    /// The listen addresses, as recorded.
    pub addrs: Mutex<Vec<String>>,
}

impl Live {
    /// Figures of a process that starts now, with a queue of `queue_max`.
    pub fn new(queue_max: usize, min_free_bytes: u64) -> Self {
        Self {
            started: Instant::now(),
            started_at: SystemTime::now(),
            listeners: AtomicUsize::new(0),
            queue_max,
            last_commit_ms: AtomicI64::new(0),
            store_failed_at_ms: AtomicI64::new(0),
            min_free_bytes: AtomicU64::new(min_free_bytes),
            addrs: Mutex::new(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_are_in_the_text_format_without_ids() {
        let m = Metrics::new();
        let mut o = Observed {
            kind: "push",
            outcome: "ok",
            stored_bytes: 1234,
            commit: Some(Duration::from_millis(3)),
            ..Observed::default()
        };
        o.stored.insert("bundle", 2);
        m.observe(&o, Duration::from_millis(5));
        m.refused("pull", "rate-limited");
        let text = m.encode();
        for line in [
            "musubi_relay_requests_total{kind=\"push\",outcome=\"ok\"} 1",
            "musubi_relay_requests_total{kind=\"pull\",outcome=\"rate-limited\"} 1",
            "musubi_relay_pushed_items_total{item=\"bundle\"} 2",
            "musubi_relay_pushed_bytes_total 1234",
            "musubi_relay_commit_duration_seconds_count 1",
            "musubi_relay_request_duration_seconds_count{kind=\"push\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(text.contains("musubi_relay_build_info{version="), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
