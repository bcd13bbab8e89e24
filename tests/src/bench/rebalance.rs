//! How long the cluster takes to have every partition processed again when
//! a worker joins a running group, and when one is killed (issue 23,
//! docs/cluster.md), at the default settings (session timeout 10 s,
//! checkpoint every 1 s), with each `cluster.assignment`.
//!
//! Per mode, on a fresh schema and group over the same pre-loaded topic
//! (16 partitions): two workers start and process; once every partition is
//! processed, a third joins; once every partition is processed again, the
//! third is killed with SIGKILL. Each worker runs in a cgroup of an eighth of
//! a core, as in `cluster_workers`.
//!
//! "Processed again" is read from the workers' logs, by their own clocks
//! (the timestamp of each line): the moment the last worker whose share
//! changed logged that it restored that share and processes it, with every
//! partition in exactly one worker's current share and no worker waiting
//! on a share it was given. A join is timed from the new worker's spawn and,
//! with `postgres`, also from its registration in the group (its log says
//! when); a kill from just before the SIGKILL. `KAPPA_BENCH_KEEP_LOGS=DIR`
//! keeps the workers' logs there, to see where a handover's time went.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::cluster_procs::{PARTITIONS, broker_and_postgres, pg_execute};
use super::workers::{Budgeted, PROCESSING, Run, WorkerProc, load, log_records, worker_budget};

/// What a worker logs when it is given a share (target `kappa_cloud::cluster`).
const GIVEN: &str = "The group gave this worker its partitions.";
/// What a worker with `assignment = "postgres"` logs once registered.
const JOINED: &str = "Joined the group in PostgreSQL.";
/// Modes measured, the default first.
const MODES: [&str; 2] = ["postgres", "kafka"];

pub fn run(dir: &Path, scale: f64) -> Value {
    let (broker, brokers, url) = match broker_and_postgres("cluster rebalance") {
        Ok(started) => started,
        Err(skipped) => return skipped,
    };
    // 1,000 devices × 2,000 readings: two workers of an eighth of a core
    // each are still processing when the join and the kill come.
    let per_device = if scale >= 1.0 { 2000 } else { 50 };
    let records = log_records(per_device);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(load(&brokers, &records));
    drop(rt);
    let budget = worker_budget("cluster rebalance");
    let run = Run { dir, brokers: &brokers, url: &url, budget, broker_pid: broker.0.id() };
    // tansu 0.6.0 may never hand a dead member's partitions on with Kafka's protocol.
    let deadline = Duration::from_secs(if scale >= 1.0 { 60 } else { 20 });
    let mut out = json!({
        "readings": records.len(), "partitions": PARTITIONS, "checkpoint_interval_s": 1, "session_timeout_s": 10,
        "worker_cpu_budget_cores": budget.map(|q| q as f64 / 100_000.0),
    });
    println!(
        "cluster rebalance (2 workers, a third joins, then it is killed; {PARTITIONS} partitions, each worker budgeted {})",
        budget.map_or("nothing (no cgroups)".to_string(), |q| format!("{:.3} of a core", q as f64 / 100_000.0)),
    );
    for mode in MODES {
        let v = handovers(&run, mode, deadline);
        println!(
            "  assignment = {mode}: join → every partition processed again {:.2} s after the spawn ({:.2} s after it \
             registered); kill → {:.2} s",
            num(&v, "join_s"),
            num(&v, "join_from_registration_s"),
            num(&v, "kill_s"),
        );
        out[mode] = v;
    }
    drop(broker);
    out
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// Two workers, a third joining, the third killed, with `assignment = mode`.
fn handovers(run: &Run<'_>, mode: &str, deadline: Duration) -> Value {
    let pid = std::process::id();
    let (schema, group) = (format!("kappa_bench_rebalance_{mode}_{pid}"), format!("bench-rebalance-{mode}-{pid}"));
    pg_execute(run.url, &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).unwrap();
    let extra = format!("assignment = \"{mode}\"\n");
    let spawned = now();
    let mut workers: Vec<Budgeted> =
        (0..2).map(|i| run.spawn(&format!("rebalance-{mode}-{i}"), &schema, &group, &extra)).collect();
    let start_s = settled(&procs(&workers), spawned, deadline);

    let spawned = now();
    workers.push(run.spawn(&format!("rebalance-{mode}-2"), &schema, &group, &extra));
    let join_s = settled(&procs(&workers), spawned, deadline);
    let registered = lines(&workers[2].proc.log_text(), JOINED).first().map(|(t, _)| *t);
    let join_from_registration_s = registered.map_or(f64::NAN, |r| join_s + spawned - r);

    let mut killed = workers.pop().map(|b| b.proc);
    let at = now();
    if let Some(k) = killed.as_mut() {
        let _ = k.child.0.kill();
    }
    let kill_s = settled(&procs(&workers), at, deadline);
    if let Some(keep) = std::env::var_os("KAPPA_BENCH_KEEP_LOGS") {
        // To see where a handover's time went: every worker's log, killed one included.
        let all = workers.iter().map(|b| &b.proc).chain(killed.as_ref());
        for (i, w) in all.enumerate() {
            let _ = std::fs::write(Path::new(&keep).join(format!("rebalance-{mode}-{i}.log")), w.log_text());
        }
    }
    drop(killed);
    for b in &mut workers {
        b.proc.terminate();
    }
    drop(workers);
    pg_execute(run.url, &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).unwrap();
    json!({
        "first_two_processing_s": start_s,
        "join_s": join_s,
        "join_from_registration_s": join_from_registration_s,
        "kill_s": kill_s,
    })
}

fn procs(workers: &[Budgeted]) -> Vec<&WorkerProc> {
    workers.iter().map(|b| &b.proc).collect()
}

/// Seconds since the epoch, by the clock the workers' log lines use.
fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The lines of a log that contain `what`: (their time, the partitions they list).
fn lines(log: &str, what: &str) -> Vec<(f64, Vec<u32>)> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let stamp = humantime::parse_rfc3339(l.split_whitespace().next()?).ok()?;
            let t = stamp.duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
            let listed = l.split("partitions=").nth(1).unwrap_or_default();
            Some((t, listed.split_whitespace().filter_map(|p| p.trim_matches('"').parse().ok()).collect()))
        })
        .collect()
}

/// Seconds from `since` until every partition is processed again (see the
/// module docs); NaN if that is not seen within `deadline`.
fn settled(workers: &[&WorkerProc], since: f64, deadline: Duration) -> f64 {
    let t0 = Instant::now();
    while t0.elapsed() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let mut held = Vec::new();
        let mut latest = f64::NEG_INFINITY;
        let mut waiting = false;
        for w in workers {
            let log = w.log_text();
            let given = lines(&log, GIVEN).pop();
            let processing = lines(&log, PROCESSING).pop();
            match (given, processing) {
                // Given a share it has not restored yet.
                (Some((g, share)), p) if !share.is_empty() && p.as_ref().is_none_or(|(t, s)| *t < g || *s != share) => {
                    waiting = true;
                }
                (Some((_, share)), _) if share.is_empty() => {}
                (_, Some((t, share))) => {
                    held.extend(share);
                    if t >= since {
                        latest = latest.max(t);
                    }
                }
                _ => waiting = true,
            }
        }
        let n = held.len();
        held.sort_unstable();
        held.dedup();
        if !waiting && n == PARTITIONS as usize && held.len() == n && latest.is_finite() {
            return latest - since;
        }
    }
    f64::NAN
}
