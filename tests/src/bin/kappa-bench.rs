//! `kappa-bench`: baseline throughput and wire-cost figures. It measures and
//! reports; it asserts nothing about speed.
//!
//!   cargo run --release -p kappa-tests --bin kappa-bench            # full run: every section 3 times (medians, min-max)
//!   cargo run --release -p kappa-tests --bin kappa-bench -- --quick # seconds, proves the harness runs
//!
//! Figures: the machine (CPU, cores, memory, fsync latency of the data
//! directory), edge log commit throughput, edge ingest through MQTT per agent
//! CPU-second, cloud processor throughput, bytes per reading on the
//! edge-to-cloud link including HTTP framing, and ingest into the log on
//! Kafka beside rdkafka's own producer, and the views computed from Kafka
//! into PostgreSQL by 1 and then 2 workers in a consumer group; beside the
//! peers, in the same run, Spark Structured Streaming on the same tumbling
//! view (rows compared) and a Mosquitto bridge's bytes per reading; the highest end-to-end rate whose
//! p99 event-to-view latency stays within 1 s; the criterion
//! micro-benchmarks; binary sizes. It first measures the machine's
//! limits (fsync, memory bandwidth, loopback TCP) and writes, next to the
//! JSON, a Markdown summary with each figure bounded by one of them as a
//! ratio to it, and an SVG chart of throughput and p99 latency per stage.
//! JSON goes to `target/bench/baseline.json` (or `--out`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a measuring tool: any failure aborts the run loudly

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if let Some(role) = args.peek().map(|a| a.to_string_lossy().into_owned())
        && matches!(role.as_str(), "edge" | "cloud" | "sim")
    {
        args.next();
        return kappa_tests::run_role(&role, args).unwrap_or(ExitCode::FAILURE);
    }
    kappa_tests::bench::run(std::env::args().skip(1).collect())
}
