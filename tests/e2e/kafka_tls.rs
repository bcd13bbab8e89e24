//! The event log on a Kafka cluster that only speaks TLS, with kappa-cloud
//! built with librdkafka's OpenSSL (`--features kafka-tls`; `.ci/run` runs
//! this test so).
//!
//! tansu serves plaintext only, so TLS is terminated in front of it by
//! socat (OpenSSL), with a broker certificate from the product's development
//! CA (`kappa-cloud pki`); the broker advertises the TLS port, so every
//! connection the client makes goes through TLS. A node whose
//! `[log.kafka.properties]` name the CA ingests and processes the scenario.
//! The negative control: the same node without the CA cannot verify the
//! broker and refuses to start (librdkafka's handshake error), so the test
//! does depend on the TLS settings reaching librdkafka.

use std::time::Duration;

use kappa_tests::harness::*;

/// `kappa-cloud pki` into `dir/pki`: a CA and a server certificate for 127.0.0.1.
async fn broker_certificate(dir: &std::path::Path) -> std::path::PathBuf {
    let pki = dir.join("pki");
    let pki_arg = pki.to_str().unwrap_or_default();
    for args in [
        vec!["cloud", "pki", "init", "--dir", pki_arg],
        vec!["cloud", "pki", "issue", "--dir", pki_arg, "--kind", "server", "--name", "broker", "--san", "127.0.0.1"],
    ] {
        let out = tokio::process::Command::new(bin()).args(&args).output().await.expect("kappa-cloud pki");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    pki
}

fn tls_config(tls_port: u16, properties: &str) -> String {
    format!(
        "[log]\nbackend = \"kafka\"\npartitions = 3\n[log.kafka]\nbrokers = \"127.0.0.1:{tls_port}\"\n\
         topic = \"tls-events\"\ndelivery_timeout = \"3s\"\n[log.kafka.properties]\n\
         \"security.protocol\" = \"SSL\"\n{properties}[processor]\ncheckpoint_interval = \"200ms\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_log_works_through_a_tls_only_broker() {
    let dir = tempfile::tempdir().unwrap();
    let pki = broker_certificate(dir.path()).await;
    let (tls_port, plain_port) = (free_port(), free_port());
    let _broker = Tansu::start_advertising(dir.path(), plain_port, tls_port).await;
    let (cert, key) = (pki.join("broker.pem"), pki.join("broker.key"));
    let _tls = Proc::spawn_cmd(
        "socat",
        "socat",
        &[
            &format!(
                "OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                cert.display(),
                key.display()
            ),
            &format!("TCP:127.0.0.1:{plain_port}"),
        ],
        dir.path(),
    );
    wait_for_port(tls_port).await;

    // Negative control first: no CA, so the broker's certificate is not trusted.
    let untrusting = dir.path().join("untrusting.toml");
    let data = dir.path().join("untrusting-data");
    std::fs::write(&untrusting, format!("data_dir = {data:?}\n{}", tls_config(tls_port, ""))).unwrap();
    let mut refused =
        Proc::spawn("untrusting", "cloud", &["run", "--config", untrusting.to_str().unwrap_or_default()], dir.path());
    let status = refused.wait(Duration::from_secs(60)).await;
    let log = refused.tail();
    assert!(!status.success(), "a node that cannot verify the broker must not start\n{log}");
    let reason = log.lines().rfind(|l| l.starts_with("kappa-cloud:")).unwrap_or_default();
    assert!(reason.contains("certificate verify failed"), "the error says why: {reason}\n{log}");

    let ca = format!("\"ssl.ca.location\" = {:?}\n", pki.join("ca.pem").to_str().unwrap_or_default());
    let cloud = Cloud::start_with(dir.path(), "tls", &tls_config(tls_port, &ca), &[]).await;
    let records = ingest(&cloud, &scenario(false)).await;
    assert!(records > 0);
    crate::processor::until_processed(&cloud, records).await;
    let dump = cloud.dump().await;
    assert!(dump.lines().count() > 50, "the views were computed from the log read over TLS:\n{dump}");
}
