//! Runs a fleet of firmware models, each with its own MQTT connection.
//!
//! Every device is two tasks: the rumqttc event loop (which owns the socket
//! and reconnects) and the device loop (which samples on a timer and sends its
//! oldest unacknowledged sample). A device keeps exactly one QoS 1 publish in
//! flight by default, like small firmware does (`--inflight N` for more); a
//! sample leaves the outbox, and enters the ground truth, only when its
//! PUBACK arrives. After a reconnect without a
//! session the in-flight sample is sent again, so the broker may see a reading
//! twice (the edge stores it once) but never loses one it acknowledged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::anomaly::{AnomalyTruth, DevicePlan, Fault, Kind, Scenario};
use crate::firmware::{Encoding, Firmware, Schema};
use crate::security::DeviceSecurity;
use crate::signal::device_seed;
use crate::truth::{DeviceTruth, GroundTruth};

/// What the fleet does.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub broker_host: String,
    pub broker_port: u16,
    pub devices: u32,
    /// Readings per second per device (wall clock).
    pub rate: f64,
    /// Stop sampling after this many readings per device.
    pub readings: Option<u64>,
    /// Stop sampling after this long.
    pub duration: Option<Duration>,
    pub seed: u64,
    /// Event time of every device's first reading, Unix ms.
    pub start_ms: i64,
    /// Boot id of every device in this run (a restarted fleet is a new boot).
    pub boot: u32,
    /// Event time between two readings of a device.
    pub event_interval: Duration,
    /// Stamp each reading with the wall clock at the moment it is sampled,
    /// as a real device does, instead of its scheduled event time
    /// (`start_ms + n × event_interval`): for measuring latency, where a
    /// device sampling late must not look older than it is.
    pub wall_clock: bool,
    pub topic_prefix: String,
    pub id_prefix: String,
    /// Share of devices that send JSON instead of CBOR.
    pub json_share: f64,
    /// Share of devices that run schema-1 firmware.
    pub v1_share: f64,
    /// How long to wait for outstanding acknowledgements after sampling stops.
    pub drain_timeout: Duration,
    /// Anomalies to inject.
    pub scenario: Scenario,
    /// TLS and credentials (default: plain text, anonymous).
    pub security: DeviceSecurity,
    /// QoS 1 publishes each device keeps in flight (1, like small firmware).
    pub inflight: usize,
}

impl FleetConfig {
    /// Device id of device `index`.
    pub fn device_id(&self, index: u32) -> String {
        format!("{}{index:05}", self.id_prefix)
    }
}

/// Live counters, shared by all device tasks.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub sampled: AtomicU64,
    pub published: AtomicU64,
    pub acked: AtomicU64,
    pub reconnects: AtomicU64,
    /// Devices connected to the broker now.
    pub connected: AtomicU64,
    /// Devices that have taken every reading of their run (`--readings`).
    pub done_sampling: AtomicU64,
    /// Why the last connection attempt failed, if one did.
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl FleetStats {
    /// The reason the last connection attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// During the drain, no device connected for this long ends it: nothing can
/// be acknowledged while the broker is unreachable.
const UNREACHABLE_DRAIN: Duration = Duration::from_secs(5);

/// Once every device has taken its `--readings`, the fleet waits for their
/// acknowledgements without a deadline (a broker or agent restart is part of
/// many runs), unless no device has been connected for this long.
const UNREACHABLE_AFTER_SAMPLING: Duration = Duration::from_secs(30);

/// What one device reports when it stops.
struct DeviceOutcome {
    id: String,
    truth: DeviceTruth,
    /// Anomalies injected (started before the device stopped).
    anomalies: Vec<AnomalyTruth>,
    sampled: u64,
    dropped: u64,
    undelivered: u64,
}

/// Runs the fleet until every device has sampled its run length (or `stop`
/// fires) and drained its outbox (or the drain timeout passes).
pub async fn run(cfg: FleetConfig, stop: CancellationToken, stats: Arc<FleetStats>) -> GroundTruth {
    let cfg = Arc::new(cfg);
    let abort = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for index in 0..cfg.devices {
        tasks.spawn(run_device(index, cfg.clone(), stop.clone(), abort.clone(), stats.clone()));
    }
    if let Some(d) = cfg.duration {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.cancel();
        });
    }
    let mut truth = GroundTruth::new(cfg.seed, cfg.devices);
    let mut drain_deadline: Option<Instant> = None;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let deadline = drain_deadline;
        tokio::select! {
            _ = check.tick(), if !abort.is_cancelled() => {
                let limit = if deadline.is_some() {
                    UNREACHABLE_DRAIN
                } else if stats.done_sampling.load(Ordering::Relaxed) >= u64::from(cfg.devices) {
                    UNREACHABLE_AFTER_SAMPLING
                } else {
                    unreachable_since = None;
                    continue;
                };
                if stats.connected.load(Ordering::Relaxed) > 0 {
                    unreachable_since = None;
                } else if unreachable_since.get_or_insert_with(Instant::now).elapsed() >= limit {
                    tracing::warn!(
                        broker = %format!("{}:{}", cfg.broker_host, cfg.broker_port),
                        error = stats.last_error().unwrap_or_default(),
                        "No device can reach the broker; stopping without waiting for the drain timeout."
                    );
                    abort.cancel();
                    drain_deadline = Some(Instant::now() + Duration::from_secs(3600));
                }
            }
            joined = tasks.join_next() => match joined {
                Some(Ok(outcome)) => {
                    truth.sampled += outcome.sampled;
                    truth.dropped_on_device += outcome.dropped;
                    truth.undelivered += outcome.undelivered;
                    truth.absorb(&outcome.id, outcome.truth);
                    truth.anomalies.extend(outcome.anomalies);
                }
                Some(Err(e)) => tracing::error!(error = %e, "A device task failed."),
                None => break,
            },
            _ = stop.cancelled(), if drain_deadline.is_none() => {
                drain_deadline = Some(Instant::now() + cfg.drain_timeout);
            }
            _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } }, if deadline.is_some() => {
                tracing::warn!("Drain timeout passed; stopping devices with readings still unacknowledged.");
                abort.cancel();
                drain_deadline = Some(Instant::now() + Duration::from_secs(3600));
            }
        }
    }
    if let Some((at, len)) = cfg.scenario.gateway_offline {
        let interval = cfg.event_interval.as_millis() as i64;
        truth.anomalies.push(AnomalyTruth {
            device: "*".into(),
            kind: Kind::GatewayOffline,
            start_ms: cfg.start_ms + at as i64 * interval,
            end_ms: cfg.start_ms + (at + len) as i64 * interval,
        });
    }
    truth.finish();
    truth
}

/// Events the device loop cares about.
enum NetEvent {
    Connected { session_present: bool },
    Sent(u16),
    Acked(u16),
    Disconnected,
}

async fn run_device(
    index: u32,
    cfg: Arc<FleetConfig>,
    stop: CancellationToken,
    abort: CancellationToken,
    stats: Arc<FleetStats>,
) -> DeviceOutcome {
    let id = cfg.device_id(index);
    let seed = device_seed(cfg.seed, index);
    let schema = if pick(seed, 1, cfg.v1_share) { Schema::V1 } else { Schema::V2 };
    let encoding = if pick(seed, 2, cfg.json_share) { Encoding::Json } else { Encoding::Cbor };
    let user = format!("u-{:05}", index / 4);
    let mut outcome = DeviceOutcome {
        id: id.clone(),
        truth: DeviceTruth::default(),
        anomalies: Vec::new(),
        sampled: 0,
        dropped: 0,
        undelivered: 0,
    };
    let mut plan = DevicePlan::new(cfg.scenario.clone(), cfg.seed, index, cfg.readings);
    let mut fw = match Firmware::new(&id, &user, cfg.boot, seed, schema, encoding) {
        Ok(fw) => fw,
        Err(e) => {
            tracing::error!(device = %id, error = %e, "Device cannot start.");
            return outcome;
        }
    };

    let mut opts = MqttOptions::new(&id, &cfg.broker_host, cfg.broker_port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    let window = cfg.inflight.max(1);
    fw.set_window(window);
    opts.set_inflight(u16::try_from(window + 2).unwrap_or(u16::MAX));
    if let Err(e) = cfg.security.apply(&id, &mut opts) {
        tracing::error!(device = %id, error = %e, "Device cannot start.");
        return outcome;
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    let (tx, mut rx) = mpsc::channel(16);
    let net_abort = abort.child_token();
    let net_stats = stats.clone();
    let net = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        let mut up = false;
        loop {
            let ev = tokio::select! {
                _ = net_abort.cancelled() => break,
                ev = eventloop.poll() => ev,
            };
            let msg = match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(50);
                    if !up {
                        up = true;
                        net_stats.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    NetEvent::Connected { session_present: ack.session_present }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => NetEvent::Acked(ack.pkid),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => NetEvent::Sent(pkid),
                Ok(_) => continue,
                Err(e) => {
                    if up {
                        up = false;
                        net_stats.connected.fetch_sub(1, Ordering::Relaxed);
                    }
                    *net_stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    net_stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    if tx.send(NetEvent::Disconnected).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
        if up {
            net_stats.connected.fetch_sub(1, Ordering::Relaxed);
        }
    });

    let topic = format!("{}devices/{id}/telemetry", cfg.topic_prefix);
    let period = Duration::from_secs_f64(1.0 / cfg.rate.max(1e-6));
    // Spread devices over the first period so they do not all sample at once.
    let offset = period.mul_f64(f64::from(index % 1000) / 1000.0);
    let mut ticker = tokio::time::interval_at(Instant::now() + offset, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let interval_ms = cfg.event_interval.as_millis() as i64;
    let limit = cfg.readings.unwrap_or(u64::MAX);

    let mut sampling = !stop.is_cancelled();
    // Reading intervals so far (event time advances even while the device is off).
    let mut ticks: u64 = 0;
    let mut connected = false;
    // The in-flight samples' sequence numbers, oldest first, each with its
    // packet id once the client sent it.
    let mut inflight: VecDeque<(u64, Option<u16>)> = VecDeque::with_capacity(window);
    loop {
        while connected && inflight.len() < window && !cfg.scenario.gateway_down(ticks) {
            match fw.next_to_send() {
                Ok(Some((seq, bytes))) => {
                    if client.try_publish(topic.as_str(), QoS::AtLeastOnce, false, bytes.to_vec()).is_ok() {
                        inflight.push_back((seq, None));
                        stats.published.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // The client's queue is full: this one goes next time.
                        fw.unsend();
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(device = %id, error = %e, "Cannot encode a sample; dropped it.");
                    break;
                }
            }
        }
        if !sampling && fw.pending() == 0 {
            break;
        }
        tokio::select! {
            _ = abort.cancelled() => break,
            _ = stop.cancelled(), if sampling => sampling = false,
            _ = ticker.tick(), if sampling => {
                let fault = plan.fault(ticks);
                if fault != Fault::Off {
                    let ts = if cfg.wall_clock {
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as i64)
                    } else {
                        cfg.start_ms + ticks as i64 * interval_ms
                    };
                    fw.sample_with(ts, fault);
                    outcome.sampled += 1;
                    stats.sampled.fetch_add(1, Ordering::Relaxed);
                }
                ticks += 1;
                if ticks >= limit {
                    sampling = false;
                    stats.done_sampling.fetch_add(1, Ordering::Relaxed);
                }
            }
            ev = rx.recv() => match ev {
                Some(NetEvent::Connected { session_present }) => {
                    connected = true;
                    // Without a session the client dropped what was in flight: send it again.
                    if !session_present && !inflight.is_empty() {
                        inflight.clear();
                        fw.resend();
                    }
                }
                Some(NetEvent::Sent(pkid)) => {
                    if let Some((_, p)) = inflight.iter_mut().find(|(_, p)| p.is_none()) {
                        *p = Some(pkid);
                    }
                }
                Some(NetEvent::Acked(pkid)) => {
                    if let Some(&(seq, Some(p))) = inflight.front()
                        && p == pkid
                    {
                        if let Some(sample) = fw.acknowledge(seq) {
                            outcome.truth.record(&sample, encoding);
                            stats.acked.fetch_add(1, Ordering::Relaxed);
                        }
                        inflight.pop_front();
                    }
                }
                Some(NetEvent::Disconnected) => connected = false,
                None => break,
            },
        }
    }
    outcome.anomalies =
        plan.started_before(ticks).iter().map(|p| AnomalyTruth::of(&id, p, cfg.start_ms, interval_ms)).collect();
    outcome.dropped = fw.dropped();
    outcome.undelivered = fw.pending() as u64;
    let _ = client.try_disconnect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    net.abort();
    outcome
}

/// Deterministically picks a `share` of devices, independently per `salt`.
fn pick(seed: u64, salt: u64, share: f64) -> bool {
    let h = crate::signal::Rng::new(seed ^ salt.wrapping_mul(0xA24B_AED4_963E_E407)).unit();
    h < share
}
