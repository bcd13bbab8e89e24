//! Subscribing to an external broker with a persistent session and
//! acknowledging each message only after its commit.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ingest::{Ack, Decoder, Incoming};
use crate::now_ms;

/// Largest MQTT packet the client accepts. Bigger than any valid payload so
/// an oversized one is quarantined with a reason instead of breaking the
/// connection (which would make the broker redeliver it forever).
const MAX_INCOMING_PACKET: usize = 1 << 20;

/// The agent's login at the external broker. The password never appears in
/// logs or `Debug` output.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// Settings for the external source.
#[derive(Debug, Clone)]
pub struct ExternalSource {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub credentials: Option<Credentials>,
    pub filter: String,
    pub decoder: Decoder,
    /// Fault injection for tests (`KAPPA_EDGE_FAULT_ACK_ON_RECEIPT=1`):
    /// acknowledge each message as it arrives, before its commit. This
    /// breaks the agent's promise on purpose, so the kill test can show it
    /// would notice. Never set it on a gateway.
    pub ack_on_receipt: bool,
}

/// Runs until `cancel` fires or the writer is gone.
pub async fn run(
    src: ExternalSource,
    tx: mpsc::Sender<Incoming>,
    mut acks: mpsc::UnboundedReceiver<Vec<rumqttc::Publish>>,
    cancel: CancellationToken,
) {
    let mut opts = MqttOptions::new(&src.client_id, &src.host, src.port);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(MAX_INCOMING_PACKET, 64 * 1024);
    if let Some(c) = &src.credentials {
        opts.set_credentials(c.username.clone(), c.password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);

    let acker = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(batch) = acks.recv().await {
                for p in batch {
                    if client.ack(&p).await.is_err() {
                        return;
                    }
                }
            }
        })
    };

    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                src.decoder.metrics.mqtt_connected.set(1);
                tracing::info!(host = %src.host, port = src.port, session_present = ack.session_present, "Connected to the external MQTT broker.");
                if let Err(e) = client.try_subscribe(src.filter.as_str(), QoS::AtLeastOnce) {
                    tracing::error!(error = %e, "Cannot queue the telemetry subscription.");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    tracing::error!(filter = %src.filter, "The broker refused the telemetry subscription.");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let received = std::time::Instant::now();
                let entry = src.decoder.decode(&p.topic, p.payload.clone(), now_ms());
                let ack = if src.ack_on_receipt {
                    // Fault injection only: the acknowledgement no longer waits for the commit.
                    if client.ack(&p).await.is_err() {
                        break;
                    }
                    Ack::None
                } else {
                    Ack::External(p)
                };
                let incoming = Incoming { entry, ack, received };
                tokio::select! {
                    sent = tx.send(incoming) => if sent.is_err() { break },
                    _ = cancel.cancelled() => break,
                }
            }
            Ok(_) => {}
            Err(e) => {
                src.decoder.metrics.mqtt_connected.set(0);
                tracing::warn!(error = %e, retry_in = ?backoff, "Lost the external MQTT broker; reconnecting.");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    src.decoder.metrics.mqtt_connected.set(0);
    acker.abort();
}
