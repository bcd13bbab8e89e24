//! From device message to durable log entry.
//!
//! Sources (the embedded broker or an external one) decode each message into
//! an [`Incoming`] and hand it to the [`writer`], which group-commits and then
//! releases the acknowledgements.

pub mod config;
pub mod writer;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kappa_common::{Reading, device};
use kappa_runtime::rate::{KeyedRate, Refused};

use self::config::{ClockConfig, ClockPolicy};
use crate::log::{Entry, Rejected};
use crate::metrics::EdgeMetrics;

/// What must happen once a message's entry is committed.
#[derive(Debug, Clone)]
pub enum Ack {
    /// Nothing: QoS 0, or a device's will.
    None,
    /// Send the QoS 1 PUBACK for this message to the external broker.
    External(rumqttc::Publish),
    /// Hand the device's PUBACK (or PUBREC) to its connection.
    Device(Arc<dyn ReplyTo>, Reply),
}

/// A reply a device connection owes for a message once it is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub pkid: u16,
    /// QoS 2: PUBREC instead of PUBACK.
    pub exactly_once: bool,
    /// MQTT 5.0 reason code (a quarantined payload is acknowledged with the
    /// reason it was refused).
    pub code: u8,
}

/// Where the writer hands a device connection's replies, after the commit
/// that earned them (the agent's listener implements it per connection).
pub trait ReplyTo: std::fmt::Debug + Send + Sync {
    fn reply(&self, reply: Reply);
}

/// A decoded device message on its way to the log.
#[derive(Debug)]
pub struct Incoming {
    pub entry: Entry,
    pub ack: Ack,
    /// When the message reached the agent (for the arrival-to-durable latency).
    pub received: std::time::Instant,
}

/// Turns telemetry messages into log entries: a reading, or a rejection with its reason.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub topic_prefix: String,
    pub limits: device::Limits,
    pub clock: ClockConfig,
    pub metrics: Arc<EdgeMetrics>,
    /// Per-device message rate (`mqtt.max_device_rate`), keyed by the
    /// device id in the topic; `None`: unlimited, or checked by the caller
    /// (the agent's own listener keeps a bucket per connection).
    pub rate: Option<Arc<KeyedRate>>,
}

impl Decoder {
    /// Decodes, validates and clock-checks one message received at `now_ms`
    /// (gateway clock), admitting it first through the per-device rate
    /// limiter if the decoder has one.
    pub fn decode(&self, topic: &str, payload: Bytes, now_ms: i64) -> Entry {
        let admitted = match (device::device_from_topic(topic, &self.topic_prefix), &self.rate) {
            (Some(id), Some(rate)) => rate.admit(id, 1.0, Instant::now()),
            _ => Ok(()),
        };
        self.decode_admitted(topic, payload, now_ms, admitted)
    }

    /// [`Decoder::decode`] for a message whose rate was checked by the
    /// caller (a connection's own token bucket): `Err` quarantines it as
    /// `rate_limited`.
    pub fn decode_admitted(&self, topic: &str, payload: Bytes, now_ms: i64, admitted: Result<(), Refused>) -> Entry {
        self.metrics.messages_received.inc();
        let prefix = self.topic_prefix.as_str();
        let mut quiet = false;
        let result = match (device::device_from_topic(topic, prefix), admitted) {
            (Some(id), Ok(())) => device::decode(id, &payload, &self.limits).map_err(|e| (e.reason(), e.to_string())),
            (Some(id), Err(Refused { in_a_row: refused, .. })) => {
                // One log line per spell (and every 10,000th message), not one per message of a flood.
                quiet = refused > 1 && refused % 10_000 != 0;
                Err((
                    "rate_limited",
                    format!(
                        "device {id} publishes faster than mqtt.max_device_rate ({refused} messages refused in this spell)"
                    ),
                ))
            }
            (None, _) => Err(("bad_topic", format!("topic {topic:?} is not {prefix}devices/{{id}}/telemetry"))),
        };
        let result = result.and_then(|mut reading| match self.check_clock(&mut reading, now_ms) {
            Ok(None) => Ok(Entry::Reading(reading)),
            Ok(Some(device_ts)) => Ok(Entry::Corrected { reading, device_ts }),
            Err(detail) => Err(("clock_skew", detail)),
        });
        match result {
            Ok(entry) => entry,
            Err((reason, detail)) => {
                self.metrics.rejected(reason);
                if !quiet {
                    tracing::warn!(topic, reason, detail = %detail, "Rejected a device payload; quarantined it.");
                }
                Entry::Rejected(Rejected { topic: topic.to_string(), reason, detail, payload })
            }
        }
    }

    /// Applies the clock policy: `Err` (quarantine), or the timestamp
    /// corrected in place and the device's own returned.
    fn check_clock(&self, reading: &mut Reading, now_ms: i64) -> Result<Option<i64>, String> {
        let skew = reading.ts_ms - now_ms;
        let (direction, limit) =
            if skew > 0 { ("ahead", self.clock.max_ahead) } else { ("behind", self.clock.max_behind) };
        if skew.unsigned_abs() <= limit.as_millis() as u64 {
            return Ok(None);
        }
        let policy = match self.clock.policy {
            ClockPolicy::Quarantine => "quarantine",
            ClockPolicy::Correct => "correct",
        };
        self.metrics.clock_skew.get_or_create(&[("direction", direction), ("policy", policy)]).inc();
        let detail = format!(
            "device clock is {} ms {direction} of the gateway's, beyond the {} ms allowed",
            skew.unsigned_abs(),
            limit.as_millis()
        );
        match self.clock.policy {
            ClockPolicy::Quarantine => Err(detail),
            ClockPolicy::Correct => {
                tracing::debug!(device = %reading.device, seq = reading.seq, %detail, "Corrected a reading's timestamp to the gateway clock.");
                let device_ts = reading.ts_ms;
                reading.ts_ms = now_ms;
                Ok(Some(device_ts))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::*;

    const NOW: i64 = 1_767_225_600_000;

    fn decoder(policy: ClockPolicy) -> Decoder {
        Decoder {
            topic_prefix: String::new(),
            limits: device::Limits::default(),
            clock: ClockConfig { max_ahead: Duration::from_secs(60), max_behind: Duration::from_secs(3600), policy },
            metrics: Arc::new(EdgeMetrics::new(&mut Registry::default())),
            rate: None,
        }
    }

    fn payload(ts_ms: i64) -> Bytes {
        Bytes::from(format!(r#"{{"v":2,"boot":1,"seq":1,"ts":{ts_ms},"data":{{"t":1.5}}}}"#))
    }

    fn ts_of(entry: &Entry) -> Option<i64> {
        match entry {
            Entry::Reading(r) | Entry::Corrected { reading: r, .. } => Some(r.ts_ms),
            Entry::Rejected(_) => None,
        }
    }

    #[test]
    fn readings_within_the_allowed_skew_keep_their_timestamp() {
        let d = decoder(ClockPolicy::Quarantine);
        for ts in [NOW, NOW + 60_000, NOW - 3_600_000] {
            assert_eq!(ts_of(&d.decode("devices/a/telemetry", payload(ts), NOW)), Some(ts));
        }
    }

    #[test]
    fn a_skewed_clock_is_quarantined_with_its_reason() {
        let d = decoder(ClockPolicy::Quarantine);
        // 2099 is inside the model's valid range, but not a plausible clock.
        for ts in [NOW + 60_001, 4_070_908_800_000, NOW - 3_600_001] {
            match d.decode("devices/a/telemetry", payload(ts), NOW) {
                Entry::Rejected(r) => assert_eq!(r.reason, "clock_skew"),
                Entry::Reading(r) | Entry::Corrected { reading: r, .. } => panic!("accepted a reading at {}", r.ts_ms),
            }
        }
        assert_eq!(d.metrics.readings_rejected.get_or_create(&[("reason", "clock_skew")]).get(), 3);
    }

    #[test]
    fn the_correct_policy_moves_the_reading_to_gateway_time() {
        let d = decoder(ClockPolicy::Correct);
        assert_eq!(ts_of(&d.decode("devices/a/telemetry", payload(4_070_908_800_000), NOW)), Some(NOW));
        assert_eq!(d.metrics.clock_skew.get_or_create(&[("direction", "ahead"), ("policy", "correct")]).get(), 1);
    }

    #[test]
    fn a_device_over_its_rate_is_quarantined_and_counted_while_others_pass() {
        let mut d = decoder(ClockPolicy::Quarantine);
        d.rate = Some(Arc::new(KeyedRate::new(10.0, 5.0)));
        let reason = |e: &Entry| match e {
            Entry::Rejected(r) => r.reason,
            _ => "ok",
        };
        // A burst of 5, then one token per 100 ms.
        let flood: Vec<_> = (0..8).map(|_| reason(&d.decode("devices/a/telemetry", payload(NOW), NOW))).collect();
        assert_eq!(flood, ["ok", "ok", "ok", "ok", "ok", "rate_limited", "rate_limited", "rate_limited"]);
        assert_eq!(reason(&d.decode("devices/b/telemetry", payload(NOW), NOW)), "ok", "another device is not limited");
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(reason(&d.decode("devices/a/telemetry", payload(NOW), NOW)), "ok", "the bucket refills");
        assert_eq!(d.metrics.readings_rejected.get_or_create(&[("reason", "rate_limited")]).get(), 3);
    }

    /// Issue 22: device ids come from outside (an external broker's topics).
    /// A million distinct ones leave the limiter at its bound, and a device
    /// that floods all along stays held to its rate.
    #[test]
    fn a_million_device_ids_leave_the_limiter_bounded_and_a_flooder_limited() {
        let mut d = decoder(ClockPolicy::Quarantine);
        let rate = Arc::new(KeyedRate::new(10.0, 5.0));
        d.rate = Some(rate.clone());
        let (one, started) = (payload(NOW), std::time::Instant::now());
        let mut flooder_passed = 0u64;
        for i in 0..1_000_000u32 {
            assert!(!matches!(d.decode(&format!("devices/x{i}/telemetry"), one.clone(), NOW), Entry::Rejected(_)));
            if i % 100 == 0 && !matches!(d.decode("devices/flood/telemetry", one.clone(), NOW), Entry::Rejected(_)) {
                flooder_passed += 1;
            }
        }
        assert!(rate.keys() <= kappa_runtime::rate::MAX_KEYS, "{} keys held", rate.keys());
        // A burst of 5, then 10 a second of however long the flood took.
        let allowed = 5 + 10 * started.elapsed().as_secs() + 10;
        assert!(flooder_passed <= allowed, "the flooder passed {flooder_passed} of 10,000 (at most {allowed})");
        assert!(flooder_passed < 10_000 / 2, "the flooder was held to its rate: {flooder_passed} passed");
    }

    #[test]
    fn a_year_1970_timestamp_is_refused_whatever_the_policy() {
        let d = decoder(ClockPolicy::Correct);
        assert_eq!(ts_of(&d.decode("devices/a/telemetry", payload(1000), NOW)), None);
    }
}
