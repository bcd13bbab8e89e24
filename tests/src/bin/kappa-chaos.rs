//! `kappa-chaos`: a fault-seeded soak of simulator → agent → cloud
//! (`kappa_tests::chaos`). Prints every fault as it applies it and a
//! verdict; exits 1 when a promise broke, with the seed to reproduce it.
//!
//!   cargo run --release -p kappa-tests --bin kappa-chaos -- --seed 7 --duration 10m
//!
//! Options: `--seed N` (default: from the clock, printed), `--duration D`
//! (default 60s), `--devices N` (30), `--rate R` readings/s per device (10),
//! `--kafka` (an ingest node and two workers on tansu and PostgreSQL instead
//! of one node on the embedded log), `--kafka-groups` (with `--kafka`: the
//! workers share the partitions by Kafka's group protocol instead of their
//! membership in PostgreSQL), `--dir PATH` (default: a temporary
//! directory, kept when the run fails).

use std::process::ExitCode;
use std::time::Duration;

use kappa_tests::chaos::{self, Backend, Options};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() -> ExitCode {
    let mut raw = std::env::args_os().skip(1).peekable();
    if let Some(role) = raw.peek().map(|a| a.to_string_lossy().into_owned())
        && matches!(role.as_str(), "edge" | "cloud" | "sim")
    {
        raw.next();
        return kappa_tests::run_role(&role, raw).unwrap_or(ExitCode::FAILURE);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |name: &str, default: &str| arg(&args, name).unwrap_or_else(|| default.to_string());
    let seed = match arg(&args, "--seed") {
        Some(s) => match s.parse() {
            Ok(s) => s,
            Err(_) => {
                eprintln!("kappa-chaos: --seed {s:?} is not a number");
                return ExitCode::from(2);
            }
        },
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
    };
    let (Ok(duration), Ok(devices), Ok(rate)) = (
        humantime::parse_duration(&parse("--duration", "60s")),
        parse("--devices", "30").parse::<u32>(),
        parse("--rate", "10").parse::<f64>(),
    ) else {
        eprintln!("kappa-chaos: --duration takes a duration (60s, 10m), --devices and --rate numbers");
        return ExitCode::from(2);
    };
    if args.iter().any(|a| a == "--kafka-groups") && !args.iter().any(|a| a == "--kafka") {
        eprintln!("kappa-chaos: --kafka-groups chooses how the workers of --kafka share the partitions; add --kafka");
        return ExitCode::from(2);
    }
    // The roles (agent, cloud, simulator) run from this very program.
    if let Ok(me) = std::env::current_exe() {
        kappa_tests::harness::set_bin(&me.to_string_lossy());
    }
    let temp = tempfile::Builder::new().prefix("kappa-chaos-").tempdir();
    let (dir, temp) = match (arg(&args, "--dir"), temp) {
        (Some(d), _) => (std::path::PathBuf::from(d), None),
        (None, Ok(t)) => (t.path().to_path_buf(), Some(t)),
        (None, Err(e)) => {
            eprintln!("kappa-chaos: no temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("kappa-chaos: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    println!(
        "kappa-chaos seed {seed}: {devices} devices at {rate}/s, faults for {}",
        humantime::format_duration(duration)
    );
    let backend = if args.iter().any(|a| a == "--kafka") { Backend::Kafka } else { Backend::Embedded };
    let kafka_groups = args.iter().any(|a| a == "--kafka-groups");
    let flags = format!(
        "--seed {seed} --duration {}ms --devices {devices} --rate {rate}{}",
        duration.as_millis(),
        match (backend, kafka_groups) {
            (Backend::Kafka, true) => " --kafka --kafka-groups",
            (Backend::Kafka, false) => " --kafka",
            _ => "",
        }
    );
    let opts = Options { seed, duration, devices, rate, backend, kafka_groups, dir: dir.clone() };
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() else {
        eprintln!("kappa-chaos: no async runtime");
        return ExitCode::FAILURE;
    };
    let outcome = runtime.block_on(async move { tokio::spawn(async move { chaos::run(&opts).await }).await });
    let ok = match outcome {
        Ok(report) => {
            print!("{}", report.summary(seed, backend, &flags));
            report.problems.is_empty()
        }
        Err(e) => {
            println!("kappa-chaos seed {seed}: FAILED: {e}\n  reproduce: kappa-chaos {flags}");
            false
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(5));
    if ok {
        drop(temp);
        ExitCode::SUCCESS
    } else {
        if let Some(t) = temp {
            println!("  the run's data and logs: {}", t.keep().display());
        }
        ExitCode::FAILURE
    }
}
