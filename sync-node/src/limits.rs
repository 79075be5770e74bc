//! Per-device rate limits: token buckets on requests and on request bytes (sans-IO: the caller
//! passes `now`).
//!
//! A device that sends more than its share is answered [`ErrorCode::RateLimited`] with the time to
//! wait, before its request reaches the database thread, so the other facilities' requests keep
//! their place in the queue. The buckets are the classic token bucket (RFC 2697's single-rate
//! meter without colours): `rate` tokens a second flow in, up to `burst`; a request takes one
//! request token and as many byte tokens as its frame has bytes.
//!
//! [`ErrorCode::RateLimited`]: musubi_crdt::protocol::ErrorCode::RateLimited

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use musubi_crdt::limits::FRAME_BYTES_MAX;

/// Per-device limits of one relay (`musubi-node serve --device-requests-per-sec ...`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimits {
    /// Requests a second one device may send on average.
    pub requests_per_sec: f64,
    /// Requests one device may send at once after a quiet time.
    pub requests_burst: f64,
    /// Request bytes a second one device may send on average.
    pub bytes_per_sec: f64,
    /// Request bytes one device may send at once (never below one largest frame,
    /// [`FRAME_BYTES_MAX`], so a full push always gets through in the end).
    pub bytes_burst: f64,
}

impl Default for RateLimits {
    /// 200 requests a second (bursts of 2,000) and 8 MiB a second (bursts of 64 MiB) per device:
    /// HQ's first sync of a city's shelters (a few requests per document) fits in the burst; a
    /// device looping on requests is slowed long before it fills the relay's queue.
    fn default() -> Self {
        Self {
            requests_per_sec: 200.0,
            requests_burst: 2000.0,
            bytes_per_sec: 8.0 * 1024.0 * 1024.0,
            bytes_burst: 64.0 * 1024.0 * 1024.0,
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` held.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate: rate.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
            tokens: burst.max(1.0),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Whether `n` tokens are there at `now`: then they are taken. Otherwise nothing is taken and
    /// the answer is how long until they would be (`n` above the burst waits for a full bucket).
    pub fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let n = n.min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            // A rate near zero (a mistyped limit) waits "forever", never panics.
            Err(Duration::try_from_secs_f64((n - self.tokens) / self.rate).unwrap_or(Duration::MAX))
        }
    }

    /// Whether the bucket has filled up again (it then says nothing about the past).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Why a request was refused: which limit, and how long to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `"requests"` or `"bytes"` (the `limit` label of the rate-limited metric).
    pub limit: &'static str,
    /// Time until the request would pass.
    pub retry_after: Duration,
}

/// Most devices whose buckets are kept; beyond it, full buckets (devices that have been quiet)
/// are forgotten, which gives them nothing they would not have had.
const TRACKED_MAX: usize = 10_000;

/// The buckets of every device that sent requests (keyed by its peer id).
#[derive(Debug)]
pub struct Limiter<K> {
    limits: RateLimits,
    buckets: HashMap<K, (TokenBucket, TokenBucket)>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter with these limits.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            buckets: HashMap::new(),
        }
    }

    /// Admits one request of `bytes` bytes from `device` at `now`, or says why not. A refused
    /// request takes nothing from either bucket.
    pub fn admit(&mut self, device: &K, bytes: usize, now: Instant) -> Result<(), Refusal> {
        if self.buckets.len() >= TRACKED_MAX && !self.buckets.contains_key(device) {
            self.buckets
                .retain(|_, (r, b)| !(r.is_full(now) && b.is_full(now)));
        }
        let l = self.limits;
        let (requests, bytes_bucket) = self.buckets.entry(device.clone()).or_insert_with(|| {
            (
                TokenBucket::new(l.requests_per_sec, l.requests_burst, now),
                TokenBucket::new(
                    l.bytes_per_sec,
                    l.bytes_burst.max(FRAME_BYTES_MAX as f64),
                    now,
                ),
            )
        });
        // Checked before either is taken, so a refusal costs the device nothing.
        let mut r = requests.clone();
        r.take(1.0, now).map_err(|retry_after| Refusal {
            limit: "requests",
            retry_after,
        })?;
        bytes_bucket
            .take(bytes as f64, now)
            .map_err(|retry_after| Refusal {
                limit: "bytes",
                retry_after,
            })?;
        *requests = r;
        Ok(())
    }

    /// Devices whose buckets are kept.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_and_the_wait_is_told() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RateLimits {
            requests_per_sec: 10.0,
            requests_burst: 5.0,
            ..RateLimits::default()
        });
        for _ in 0..5 {
            assert_eq!(l.admit(&"a", 100, t0), Ok(()));
        }
        let refused = l
            .admit(&"a", 100, t0)
            .expect_err("the sixth at once is refused");
        assert_eq!(refused.limit, "requests");
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        // Another device is not affected.
        assert_eq!(l.admit(&"b", 100, t0), Ok(()));
        // After the wait it was told, it passes; a second right after does not.
        let t1 = t0 + refused.retry_after;
        assert_eq!(l.admit(&"a", 100, t1), Ok(()));
        assert!(l.admit(&"a", 100, t1).is_err());
        // Over a second at the rate: 10 more.
        let mut passed = 0;
        for ms in (5..=1005).step_by(10) {
            if l.admit(&"a", 1, t1 + Duration::from_millis(ms)).is_ok() {
                passed += 1;
            }
        }
        assert_eq!(passed, 10);
    }

    #[test]
    fn bytes_are_limited_but_a_largest_frame_always_fits_the_burst() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RateLimits {
            bytes_per_sec: 1000.0,
            bytes_burst: 10.0,
            ..RateLimits::default()
        });
        assert_eq!(l.admit(&1u8, FRAME_BYTES_MAX, t0), Ok(()));
        let r = l.admit(&1u8, 2000, t0).expect_err("the bytes are spent");
        assert_eq!(r.limit, "bytes");
        assert_eq!(r.retry_after, Duration::from_secs(2));
    }

    #[test]
    fn a_refused_request_costs_no_request_token() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RateLimits {
            requests_per_sec: 1.0,
            requests_burst: 2.0,
            bytes_per_sec: 1.0,
            bytes_burst: 1.0,
        });
        assert_eq!(l.admit(&0u8, FRAME_BYTES_MAX, t0), Ok(()));
        for _ in 0..5 {
            assert_eq!(l.admit(&0u8, 10, t0).map_err(|r| r.limit), Err("bytes"));
        }
        // One request token is left, whatever the refusals.
        let t1 = t0 + Duration::from_secs(FRAME_BYTES_MAX as u64);
        assert_eq!(l.admit(&0u8, 0, t0), Ok(()));
        assert_eq!(l.admit(&0u8, 0, t0).map_err(|r| r.limit), Err("requests"));
        assert_eq!(l.admit(&0u8, 0, t1), Ok(()));
    }
}
