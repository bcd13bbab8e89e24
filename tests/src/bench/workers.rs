//! Processor workers as a Kafka consumer group (docs/cluster.md): the same
//! pre-loaded log processed by 1, 2, 4 and 8 `kappa-cloud worker` processes
//! (1 and 2 with `--quick`), each count into a fresh PostgreSQL schema
//! under a fresh group, with the default views (both keyed by the device).
//! Each worker runs in a cgroup of its own with the same CPU budget (an
//! eighth of a core: nodes of a fixed size, so that the machine's two cores
//! are not what limits the experiment); the broker (tansu, in memory) and
//! PostgreSQL run outside the budgets, and their CPU is reported. Without
//! root (no cgroups) the workers run unbudgeted, and the report says so.
//!
//! Throughput is readings / wall seconds from spawning the workers until
//! every partition's checkpointed position in PostgreSQL reaches the end of
//! the topic (found by reading it back, untimed). That wall time includes
//! what a real start pays: process start, joining the group, the rebalances
//! while the workers join (and any records re-read after a handover), and
//! up to one checkpoint interval (1 s, the default) plus one poll (200 ms)
//! before the last position is seen. Separately, the rate from the moment
//! the last worker got its share until the last reading was processed: the
//! group's pace once every worker holds its share. Worker CPU is their
//! utime + stime up to the end.
//!
//! How long a handover takes is measured by `cluster_rebalance` (rebalance.rs).
//!
//! It measures; it checks no views (tests/e2e/cluster.rs does, at 1, 2, 4
//! and 8 workers). What it sees of correctness it reports: readings
//! processed against readings loaded, and how often a worker, seeking to a
//! checkpoint, was served records from a later offset and skipped ahead
//! (`log_skips`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kappa_cloud::eventlog::LogSource;
use kappa_cloud::eventlog::kafka::{KafkaLog, KafkaLogConfig, end_offsets};
use kappa_cloud::store::pg::{PgSettings, PgStore};
use kappa_common::record::{self, LogEvent, LogRecord};
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use serde_json::{Value, json};

use super::cgroup::Cgroup;
use super::cluster_procs::{ClusterTarget, PARTITIONS, Reaped, broker_and_postgres, pg_execute};
use super::{cpu_seconds, scrape, wait_port};

/// Each worker's CPU budget: microseconds of CPU per 100 ms period (an
/// eighth of a core; eight such workers use one of this machine's two
/// cores, the other is left to the broker, PostgreSQL and this harness).
/// `KAPPA_BENCH_WORKER_QUOTA_US` overrides it.
const WORKER_QUOTA_US: u64 = 12_500;
pub(super) const TOPIC: &str = "events";
/// As in the cluster e2e tests; librdkafka heartbeats every third of it, which
/// bounds how soon the first worker notices the second joining.
const SESSION_TIMEOUT: &str = "6s";
const POLL: Duration = Duration::from_millis(200);
/// What a worker logs (target `kappa_cloud::cluster`, info) once it has
/// restored a share and processes it.
pub(super) const PROCESSING: &str = "Processing these partitions from their last checkpoint.";
/// What a worker logs (target `kappa_cloud::eventlog::kafka`, warn) when the
/// broker's first record after a seek is past the offset it asked for.
const SKIPPED: &str = "The log no longer holds records this source had not read";
const PROCESSED: &str = "kappa_cloud_readings_processed_total{pipeline=\"main\"}";

/// One `kappa-bench cloud worker` process, its `/metrics` port and its log.
#[derive(Debug)]
pub(super) struct WorkerProc {
    pub(super) child: Reaped,
    port: u16,
    log: PathBuf,
}

impl WorkerProc {
    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then up to 30 s for the graceful drain; whether it exited with success.
    pub(super) fn terminate(&mut self) -> bool {
        let child = &mut self.child.0;
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own, not yet reaped child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// CPU seconds the machine spent busy (everything but idle and iowait), all cores.
pub(super) fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
    let (total, idle): (f64, f64) = (f.iter().take(8).sum(), f.get(3).unwrap_or(&0.0) + f.get(4).unwrap_or(&0.0));
    (total - idle) / clock_ticks()
}

/// CPU seconds of PostgreSQL's processes: the live ones' own, plus what the
/// exited ones (backends whose connection closed) left in their parent's
/// children's times.
pub(super) fn postgres_cpu_seconds() -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0.0 };
    let mut ticks = 0.0;
    for entry in procs.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        if !head.ends_with("(postgres") {
            continue;
        }
        // utime, stime, cutime, cstime are fields 14-17: 11-14 after the ")".
        ticks += rest.split_whitespace().skip(11).take(4).map(|x| x.parse().unwrap_or(0.0)).sum::<f64>();
    }
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    tck.max(1) as f64
}

fn log_config(brokers: &str) -> KafkaLogConfig {
    KafkaLogConfig {
        brokers: brokers.into(),
        topic: TOPIC.into(),
        create_topic: true,
        replication_factor: 1,
        delivery_timeout: Duration::from_secs(30),
        properties: Default::default(),
    }
}

pub fn run(dir: &Path, scale: f64) -> Value {
    let (broker, brokers, url) = match broker_and_postgres("cluster workers") {
        Ok(started) => started,
        Err(skipped) => return skipped,
    };

    // 1,000 devices, 4,000 readings each, 1 s apart (50 each with --quick).
    let per_device = if scale >= 1.0 { 4000 } else { ((1000.0 * scale) as u64).max(20) };
    let counts: &[usize] = if scale >= 1.0 { &[1, 2, 4, 8] } else { &[1, 2] };
    let records = log_records(per_device);
    let n = records.len();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let load_per_s = rt.block_on(load(&brokers, &records));
    drop(records);
    drop(rt);
    // Where each partition ends, read back from the topic (untimed): tansu
    // 0.6.0 (memory storage) answers ListOffsets with high watermarks below
    // the last offset, which would stop the clock early; reported beside it.
    let (ends, in_log, read_per_s) = read_back(&brokers, n);
    if in_log != n as u64 {
        println!(
            "  cluster workers: the topic holds {in_log} records for {n} readings produced (the broker stored some twice)"
        );
    }
    let highs = end_offsets(&log_config(&brokers), PARTITIONS).unwrap();
    let broker_end_total: u64 = highs.iter().map(|(_, o)| o).sum();

    let budget = worker_budget("cluster workers");
    let run = Run { dir, brokers: &brokers, url: &url, budget, broker_pid: broker.0.id() };
    let measured: Vec<(usize, Value)> = counts.iter().map(|&w| (w, run.measure(w, &ends, n))).collect();
    drop(broker);

    let rate = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let one = &measured[0].1;
    let mut out = json!({
        "readings": n, "partitions": PARTITIONS, "log_records": in_log, "broker_high_watermarks_total": broker_end_total,
        "broker": "tansu 0.6.0, memory storage", "views": "default (device_windows, device_totals)",
        "checkpoint_interval_s": 1, "session_timeout": SESSION_TIMEOUT,
        // Each worker's CPU budget in cores (its cgroup's quota); null: none (not root).
        "worker_cpu_budget_cores": budget.map(|q| q as f64 / 100_000.0),
        "load_records_per_s": load_per_s,
        // One consumer reading the topic and doing nothing else: what fetching from the broker allows.
        "read_back_records_per_s": read_per_s,
    });
    println!(
        "cluster workers ({n} readings of 1,000 devices, {PARTITIONS} partitions on tansu in memory, default views into \
         PostgreSQL, each worker budgeted {}); a bare consumer reads the topic at {read_per_s:.0} records/s",
        budget.map_or("nothing (no cgroups)".to_string(), |q| format!("{:.3} of a core", q as f64 / 100_000.0)),
    );
    for (w, v) in &measured {
        let speedup = rate(v, "readings_per_second") / rate(one, "readings_per_second");
        let settled = rate(v, "readings_per_second_after_last_assignment")
            / rate(one, "readings_per_second_after_last_assignment");
        println!(
            "  {w} worker(s): {:.0} readings/s from start ({:.1} s; speedup {speedup:.2}), {:.0} readings/s once \
             every worker held its share (at {:.1} s; speedup {settled:.2}); {:.0} per worker CPU-second; \
             tansu {:.1} / PostgreSQL {:.1} CPU-s; checkpoint commit mean {:.1} ms; machine busy {:.2} cores",
            rate(v, "readings_per_second"),
            rate(v, "seconds"),
            rate(v, "readings_per_second_after_last_assignment"),
            rate(v, "last_assignment_s"),
            rate(v, "readings_per_cpu_second"),
            rate(v, "broker_cpu_seconds"),
            rate(v, "postgres_cpu_seconds"),
            rate(v, "checkpoint_commit_mean_ms"),
            rate(v, "machine_busy_cores"),
        );
        out[format!("workers_{w}")] = v.clone();
        if *w > 1 {
            out["speedups"][w.to_string()] = json!(speedup);
            out["speedups_after_last_assignment"][w.to_string()] = json!(settled);
        }
    }
    // The 2-over-1 figures under their old names (the summary's line).
    out["speedup"] = out["speedups"]["2"].clone();
    out["speedup_after_last_assignment"] = out["speedups_after_last_assignment"]["2"].clone();
    out
}

/// Each worker's CPU budget (µs per 100 ms), if cgroups can be made here.
pub(super) fn worker_budget(section: &str) -> Option<u64> {
    let quota =
        std::env::var("KAPPA_BENCH_WORKER_QUOTA_US").ok().and_then(|v| v.parse().ok()).unwrap_or(WORKER_QUOTA_US);
    match Cgroup::new(&format!("kappa-bench-probe-{}", std::process::id()), quota, None) {
        Ok(_) => Some(quota),
        Err(e) => {
            println!("  {section}: no cgroup ({e}); the workers run without a CPU budget (needs root)");
            None
        }
    }
}

/// The fleet's readings as ingest appends them: (device, encoded log record).
pub(super) fn log_records(per_device: u64) -> Vec<(String, Vec<u8>)> {
    super::fleet_readings(1000, per_device)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let device = r.device.clone();
            let value = record::encode(&LogRecord {
                gateway: "gw-bench-01".into(),
                batch_id: (i / 5000) as u64 + 1,
                ingest_ms: 0,
                event: LogEvent::Reading(r),
            });
            (device, value)
        })
        .collect()
}

/// Creates the topic (admin API) and produces every record to
/// `partition_for(device)`, idempotent with `acks=all` as the log's own
/// appender does. Returns records per second.
pub(super) async fn load(brokers: &str, records: &[(String, Vec<u8>)]) -> f64 {
    KafkaLog::connect(log_config(brokers), PARTITIONS).await.unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    super::kafka::produce_all(&producer, TOPIC, PARTITIONS, records).await
}

/// Reads the whole topic once with the log's own source, nothing else done
/// with the records: each partition's end (its last offset + 1), how many
/// records it holds in all, and records read per second.
fn read_back(brokers: &str, n: usize) -> (Vec<(u32, u64)>, u64, f64) {
    let mut source = KafkaLog::existing(log_config(brokers), PARTITIONS).source().unwrap();
    let mut ends = vec![0u64; PARTITIONS as usize];
    let mut records = 0u64;
    let t = Instant::now();
    let mut last_record = Duration::ZERO;
    loop {
        let batch = source.poll(10_000, Duration::from_millis(200)).unwrap();
        if !batch.is_empty() {
            last_record = t.elapsed();
        }
        records += batch.len() as u64;
        for r in &batch {
            ends[r.partition as usize] = ends[r.partition as usize].max(r.offset + 1);
        }
        if batch.is_empty() && records >= n as u64 && (0..PARTITIONS).all(|p| source.caught_up(p)) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "read {records} of {n} records back from the topic in 300 s");
    }
    ((0..PARTITIONS).zip(ends).collect(), records, records as f64 / last_record.as_secs_f64().max(1e-3))
}

/// What every measurement shares: where the broker and PostgreSQL are, the
/// workers' CPU budget (`None`: no cgroups here), the broker's pid.
pub(super) struct Run<'a> {
    pub(super) dir: &'a Path,
    pub(super) brokers: &'a str,
    pub(super) url: &'a str,
    pub(super) budget: Option<u64>,
    pub(super) broker_pid: u32,
}

/// A worker process and the cgroup that holds it (dropped after it).
pub(super) struct Budgeted {
    pub(super) proc: WorkerProc,
    cgroup: Option<Cgroup>,
}

impl Run<'_> {
    /// Spawns worker `name` into `schema` and `group` (with `extra` lines in
    /// its `[cluster]` section), in a cgroup of its own when budgeted.
    pub(super) fn spawn(&self, name: &str, schema: &str, group: &str, extra: &str) -> Budgeted {
        let cluster = format!("group = \"{group}\"\n{extra}");
        let target = ClusterTarget { brokers: self.brokers, topic: TOPIC, url: self.url, schema };
        let (child, port, cgroup) =
            target.spawn(self.dir, name, "worker", &cluster, "warn,kappa_cloud::cluster=info", self.budget);
        Budgeted { proc: WorkerProc { child, port, log: self.dir.join(format!("{name}.log")) }, cgroup }
    }

    /// `workers` worker processes over the whole topic, from spawn until every
    /// partition's checkpointed position reaches `ends`.
    fn measure(&self, workers: usize, ends: &[(u32, u64)], n: usize) -> Value {
        let (url, broker_pid) = (self.url, self.broker_pid);
        let pid = std::process::id();
        let schema = format!("kappa_bench_w{workers}_{pid}");
        let group = format!("bench-w{workers}-{pid}");
        pg_execute(url, &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).unwrap();
        // Creates the schema's tables before the workers start; then only reads positions.
        let store =
            PgStore::connect(&PgSettings { url: url.into(), schema: schema.clone(), ca_file: None }, PARTITIONS)
                .unwrap();
        let timeout = Duration::from_secs(120 + n as u64 / 1000);
        let (broker_cpu0, pg_cpu0, busy0) = (cpu_seconds(broker_pid), postgres_cpu_seconds(), machine_busy_seconds());
        let t0 = Instant::now();
        let mut budgeted: Vec<Budgeted> = (0..workers)
            .map(|i| {
                self.spawn(
                    &format!("worker-{workers}-{i}"),
                    &schema,
                    &group,
                    &format!("session_timeout = \"{SESSION_TIMEOUT}\"\n"),
                )
            })
            .collect();
        let mut procs: Vec<&mut WorkerProc> = budgeted.iter_mut().map(|b| &mut b.proc).collect();
        for w in &procs {
            wait_port(w.port); // inside the timing: /metrics opens once the worker has joined
        }
        let (mut assignments, mut last_assignment, mut at_last_assignment) = (0, 0.0, 0.0);
        // (seconds since the start, readings processed by then), every poll.
        let mut history: Vec<(f64, f64)> = Vec::new();
        loop {
            std::thread::sleep(POLL);
            let positions = store.positions(kappa_cloud::store::MAIN_PIPELINE).unwrap();
            let done = ends.iter().all(|(p, end)| positions.get(p).is_some_and(|o| o >= end));
            let now = t0.elapsed().as_secs_f64();
            let processed_now: f64 = procs.iter().map(|w| scrape(w.port, PROCESSED)).sum();
            history.push((now, processed_now));
            let seen: usize = procs.iter().map(|w| w.log_text().matches(PROCESSING).count()).sum();
            if seen != assignments {
                (assignments, last_assignment, at_last_assignment) = (seen, now, processed_now);
            }
            if done {
                break;
            }
            let exited = procs.iter_mut().find_map(|w| w.child.0.try_wait().ok().flatten());
            let logs = || procs.iter().map(|w| w.log_text()).collect::<Vec<_>>().join("\n");
            if let Some(status) = exited {
                panic!("a worker exited ({status}) before the views caught up:\n{}", logs());
            }
            assert!(
                t0.elapsed() < timeout,
                "{workers} worker(s) did not reach the end offsets within {timeout:?}: positions {positions:?}, ends {ends:?}\n{}",
                logs()
            );
        }
        let seconds = t0.elapsed().as_secs_f64();
        let cpu: f64 = procs.iter().map(|w| cpu_seconds(w.child.0.id())).sum();
        let broker_cpu = cpu_seconds(broker_pid) - broker_cpu0;
        let pg_cpu = postgres_cpu_seconds() - pg_cpu0;
        let busy_cores = (machine_busy_seconds() - busy0) / seconds;
        let processed: Vec<f64> = procs.iter().map(|w| scrape(w.port, PROCESSED)).collect();
        let sum = |name: &str| procs.iter().map(|w| scrape(w.port, name)).sum::<f64>();
        let (checkpoints, commit_s) =
            (sum("kappa_cloud_checkpoints_total"), sum("kappa_cloud_checkpoint_commit_seconds_sum"));
        let skips: usize = procs.iter().map(|w| w.log_text().matches(SKIPPED).count()).sum();
        let duplicates: f64 = procs.iter().map(|w| scrape(w.port, "kappa_cloud_readings_duplicate_total")).sum();
        let throttled: u64 = budgeted.iter().filter_map(|b| b.cgroup.as_ref()).map(Cgroup::throttled_periods).sum();
        for w in budgeted.iter_mut().map(|b| &mut b.proc) {
            if !w.terminate() {
                println!("  cluster workers: a worker did not exit cleanly after SIGTERM; its log:\n{}", w.log_text());
            }
        }
        drop(budgeted);
        drop(store);
        pg_execute(url, &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).unwrap();
        let total: f64 = processed.iter().sum();
        // When the last reading was processed (not yet checkpointed), to a poll;
        // and the rate from the last assignment until then: the workers' steady
        // pace once the group settled, without start-up, rebalance or the wait
        // for the last checkpoint.
        let processing_s = history.iter().find(|(_, p)| *p >= total).map_or(seconds, |(t, _)| *t);
        let settled_per_s = if processing_s > last_assignment {
            (total - at_last_assignment) / (processing_s - last_assignment)
        } else {
            f64::NAN
        };
        if total < n as f64 || skips > 0 {
            println!(
                "  cluster workers: {workers} worker(s) processed {total} of {n} readings; {skips} time(s) a worker found \
             the log starting past its checkpoint (\"{SKIPPED}\") and skipped ahead: those readings are missing from the views"
            );
        }
        json!({
            "seconds": seconds,
            "readings_per_second": n as f64 / seconds,
            "worker_cpu_seconds": cpu,
            "readings_per_cpu_second": n as f64 / cpu.max(0.01),
            "broker_cpu_seconds": broker_cpu,
            "postgres_cpu_seconds": pg_cpu,
            // The whole machine, this harness's polling included: how close to all cores busy.
            "machine_busy_cores": busy_cores,
            // Checkpoints and the time their commits to PostgreSQL took, all
            // workers: a checkpoint waits for the previous one's commit.
            "checkpoints": checkpoints,
            "checkpoint_commit_seconds": commit_s,
            "checkpoint_commit_mean_ms": 1000.0 * commit_s / checkpoints.max(1.0),
            // 100 ms periods in which a worker had used its budget and waited (all workers).
            "throttled_periods": throttled,
            "assignments": assignments,
            "last_assignment_s": last_assignment,
            "processing_seconds": processing_s,
            "readings_per_second_after_last_assignment": settled_per_s,
            // Above `readings` when a worker re-read what it had not checkpointed
            // before a move; below when a worker skipped records (`log_skips`).
            "readings_processed": total,
            // Times a worker, seeking to a checkpoint, got records from a later
            // offset (the broker skipped the rest of a producer batch) and went on from there.
            "log_skips": skips,
            // Readings found in the log twice (a producer retry the broker did not deduplicate).
            "readings_duplicate": duplicates,
            "busiest_worker_share": processed.iter().copied().fold(0.0, f64::max) / total.max(1.0),
        })
    }
}
