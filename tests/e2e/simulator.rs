//! The simulator as a user runs it: against a broker that is not there, it
//! says so and stops at its `--duration` instead of draining for a minute
//! (or, with `--readings`, 30 s after its last reading instead of never),
//! and its log file carries no terminal colour codes.

use std::time::Duration;

use kappa_tests::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_whose_broker_refuses_says_so_and_stops_at_its_duration() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port.
    let port = free_port();
    let args = ["--broker", &format!("127.0.0.1:{port}"), "--devices", "50", "--duration", "2s"];
    let mut sim = Proc::spawn("sim", "sim", &args, dir.path());
    // The default drain timeout is 60 s; with no device connected the fleet does not wait for it.
    let status = sim.wait(Duration::from_secs(45)).await;
    let log = std::fs::read_to_string(&sim.log).unwrap();
    assert_eq!(status.code(), Some(3), "readings were left undelivered: exit 3\n{log}");
    assert!(log.contains("No device can connect to the broker") && log.contains("Connection refused"), "{log}");
    assert!(log.contains("No device can reach the broker; stopping"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file:\n{log}");
}

/// With a run length (`--readings`) instead of a duration, the same: once
/// every device has taken its readings and none has been connected for 30 s,
/// the fleet stops and says why instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_with_a_run_length_whose_broker_refuses_stops_once_sampling_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = ["--broker", &format!("127.0.0.1:{port}"), "--devices", "5", "--readings", "3", "--rate", "10"];
    let mut sim = Proc::spawn("sim", "sim", &args, dir.path());
    let status = sim.wait(Duration::from_secs(120)).await;
    let log = std::fs::read_to_string(&sim.log).unwrap();
    assert_eq!(status.code(), Some(3), "readings were left undelivered: exit 3\n{log}");
    assert!(log.contains("No device can reach the broker; stopping"), "{log}");
}
