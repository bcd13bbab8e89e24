//! The command line's manners (docs/operations.md): every printing command
//! of the three binaries ends quietly when its output pipe closes
//! (`kappa-cloud views dump | head`), one table of exit codes holds in all
//! three, and a refused argument is refused with the reason.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use kappa_runtime::cli::{EXIT_FAILED, FAULT_IGNORE_CLOSED_PIPE};
use kappa_tests::harness::*;

/// Runs `role args` with its standard output a pipe whose reading end is
/// already closed, so its first write meets a closed pipe; returns how it
/// ended and its standard error.
fn into_closed_pipe(role: &str, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(bin())
        .arg(role)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run the command");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs `role args` and returns how it ended, its output and its error.
fn run(role: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin()).arg(role).args(args).stdin(Stdio::null()).output().expect("run the command");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A cloud node with rows, alerts and an archive, and an agent with
/// readings in its log: something for every printing command to print.
struct Printing {
    _dir: tempfile::TempDir,
    cloud: Cloud,
    edge: Edge,
}

async fn printing() -> Printing {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let edge = Edge::start(dir.path(), Mqtt::Embedded(free_port()), &cloud.url()).await;
    let mut sim = Fleet::new(3, 20, 30.0).start(edge.mqtt_port, dir.path());
    Fleet::finish(&mut sim, dir.path()).await;
    wait_for_readings(&cloud.url(), 60, Duration::from_secs(120)).await;
    Printing { _dir: dir, cloud, edge }
}

/// Every command that prints, with its arguments, by binary.
fn printing_commands(p: &Printing, scratch: &Path) -> Vec<(&'static str, Vec<String>)> {
    let cloud = p.cloud.config.to_str().unwrap().to_string();
    let edge = p.edge.config.to_str().unwrap().to_string();
    let pki = scratch.join("pki").to_str().unwrap().to_string();
    let c = |args: &[&str]| {
        ("cloud", args.iter().map(|a| a.to_string()).chain(["--config".into(), cloud.clone()]).collect())
    };
    let e =
        |args: &[&str]| ("edge", args.iter().map(|a| a.to_string()).chain(["--config".into(), edge.clone()]).collect());
    let plain = |role: &'static str, args: &[&str]| (role, args.iter().map(|a| a.to_string()).collect());
    vec![
        c(&["config", "check"]),
        c(&["views", "list"]),
        c(&["views", "list", "--json"]),
        c(&["views", "dump"]),
        c(&["views", "dump", "--alerts"]),
        c(&["views", "dump", "--view", "device_windows@1"]),
        c(&["views", "compare", "device_windows", "1", "1"]),
        c(&["archive", "status"]),
        e(&["config", "check"]),
        e(&["log", "stats"]),
        e(&["log", "check"]),
        e(&["log", "export"]),
        e(&["log", "export", "--format", "csv"]),
        plain("cloud", &["pki", "init", "--dir", &pki]),
        plain("cloud", &["--help"]),
        plain("edge", &["--help"]),
        plain("sim", &["--help"]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_printing_command_ends_quietly_when_its_output_pipe_closes() {
    let p = printing().await;
    let scratch = tempfile::tempdir().unwrap();
    let commands = printing_commands(&p, scratch.path());
    for (role, args) in &commands {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Each prints before it ends, so it meets the closed pipe: the
        // signal ends it, as it ends `cat`, with nothing on standard error
        // about it.
        let (status, stderr) = into_closed_pipe(role, &args, &[]);
        assert_eq!(status.signal(), Some(libc::SIGPIPE), "{role} {args:?} into a closed pipe: {status}\n{stderr}");
        for noise in ["panicked", "Broken pipe", "I/O error"] {
            assert!(!stderr.contains(noise), "{role} {args:?} into a closed pipe says {noise:?}:\n{stderr}");
        }
    }
    assert!(commands.len() >= 15);
}

/// The negative control: with the protection off, the same commands fail
/// loudly into a closed pipe (a panic, exit 101), and the test above sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_without_the_default_sigpipe_a_printing_command_panics_into_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let config = cloud.config.to_str().unwrap();
    let (status, stderr) =
        into_closed_pipe("cloud", &["views", "list", "--config", config], &[(FAULT_IGNORE_CLOSED_PIPE, "1")]);
    assert_eq!(status.signal(), None, "{status}");
    assert!(
        status.code() == Some(101) || stderr.contains("Broken pipe"),
        "without the protection a closed pipe is an error: {status}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_binaries_share_one_table_of_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let missing = missing.to_str().unwrap();
    let failed = Some(i32::from(EXIT_FAILED));

    // A command that cannot run: 2 in every binary.
    for role in ["cloud", "edge"] {
        let (code, _, err) = run(role, &["config", "check", "--config", missing]);
        assert_eq!(code, failed, "{role} config check of a missing file: {err}");
        assert!(err.contains("missing.toml"), "{role} names the file: {err}");
    }
    let (code, _, err) = run("sim", &["--broker", "127.0.0.1:1", "--devices", "1", "--tls-ca", missing]);
    assert_eq!(code, failed, "sim with a CA file that does not exist: {err}");

    // A refused argument: 2, with the values it takes.
    for (role, args) in [
        ("cloud", &["--log-format", "yaml", "config", "check"][..]),
        ("edge", &["--log-format", "yaml", "config", "check"]),
        ("sim", &["--log-format", "yaml"]),
    ] {
        let (code, _, err) = run(role, args);
        assert_eq!(code, failed, "{role} --log-format yaml: {err}");
        assert!(err.contains("yaml") && err.contains("json"), "{role} says what it takes: {err}");
    }

    // A question answered "no" is 1; a view that does not exist cannot be
    // dumped (it printed nothing and exited 0).
    let cloud = Cloud::start(dir.path()).await;
    let config = cloud.config.to_str().unwrap();
    let (code, out, err) = run("cloud", &["views", "dump", "--view", "nope@1", "--config", config]);
    assert_eq!(code, failed, "dump of a view that does not exist: {out}{err}");
    assert!(err.contains("no view nope@1"), "{err}");
    let (code, out, _) = run("cloud", &["views", "dump", "--view", "device_windows@1", "--config", config]);
    assert_eq!((code, out.as_str()), (Some(0), ""), "an existing view with no rows yet dumps nothing");
}

/// String values that are Rust's debug syntax rather than a value: what
/// `?field` records (`None`, `Some(5)`, `{0: 12}`, `[1, 2]`).
fn debug_syntax(v: &serde_json::Value, path: &str, found: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                // Messages and errors are sentences: they may hold anything.
                if !["message", "error", "detail"].contains(&k.as_str()) {
                    debug_syntax(v, &format!("{path}.{k}"), found);
                }
            }
        }
        serde_json::Value::String(s)
            if s == "None" || s.starts_with("Some(") || s.starts_with('{') || s.starts_with('[') =>
        {
            found.push(format!("{path} = {s:?}"));
        }
        _ => {}
    }
}

/// `--log-format json` (here through `KAPPA_LOG_FORMAT`) writes one JSON
/// object per line, and no field is Rust's debug syntax: an absent value is
/// absent, numbers are numbers, lists and maps are plain strings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_values_not_rust_debug_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let json = [("KAPPA_LOG_FORMAT", "json")];
    let mut cloud = Cloud::start_with(dir.path(), "cloud", FLEET_PROCESSOR, &json).await;
    let mqtt = free_port();
    let mut edge = Edge::start_env(dir.path(), "edge", "gw-json", Mqtt::Embedded(mqtt), &cloud.url(), "", &json).await;
    let mut sim = Fleet::new(3, 20, 30.0).start(mqtt, dir.path());
    Fleet::finish(&mut sim, dir.path()).await;
    wait_for_readings(&cloud.url(), 60, Duration::from_secs(120)).await;
    // A restart logs the restore of every pipeline, with its positions.
    cloud.proc.terminate().await;
    cloud.restart().await;
    edge.proc.terminate().await;
    cloud.proc.terminate().await;
    let mut lines = 0;
    for log in [&cloud.proc.log, &edge.proc.log] {
        let text = std::fs::read_to_string(log).unwrap();
        let mut found = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}) in {}: {line}", log.display()));
            assert!(v["fields"]["message"].is_string(), "{line}");
            debug_syntax(&v, "", &mut found);
            lines += 1;
        }
        assert!(found.is_empty(), "Rust debug syntax in {}: {found:#?}", log.display());
    }
    let restored = std::fs::read_to_string(&cloud.proc.log).unwrap();
    assert!(restored.contains("Processor restored its checkpoint"), "{restored}");
    assert!(lines >= 5, "{lines} lines");
}

/// Every argument of every command of the three binaries says what it is
/// (`--help`), and where a command writes its output it is `-o/--output`
/// (the older `--out` still works).
#[test]
fn every_argument_has_help_and_outputs_are_named_alike() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: &str, silent: &mut Vec<String>, outs: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if ["help", "version"].contains(&id) {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                silent.push(format!("{path} {id}"));
            }
            if ["out", "output_dir", "output_file"].contains(&id) {
                outs.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), silent, outs);
        }
    }
    let (mut silent, mut outs) = (Vec::new(), Vec::new());
    walk(&kappa_cloud::cli::Args::command(), "kappa-cloud", &mut silent, &mut outs);
    walk(&kappa_edge::cli::Args::command(), "kappa-edge", &mut silent, &mut outs);
    walk(&kappa_sim::cli::Args::command(), "kappa-sim", &mut silent, &mut outs);
    assert!(silent.is_empty(), "arguments without help text: {silent:#?}");
    assert!(outs.is_empty(), "outputs not named --output: {outs:#?}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("creds");
    let (code, _, err) =
        run("edge", &["mosquitto", "credentials", "--out", out.to_str().unwrap(), "--device", "d", "--group", ""]);
    assert_eq!(code, Some(0), "--out is still accepted: {err}");
    assert!(out.is_dir(), "{err}");
}

/// The WARN and ERROR messages the product code logs: the last string
/// literal of each `tracing::warn!`/`tracing::error!` call outside
/// the tests.
fn logged_warnings_and_errors(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            logged_warnings_and_errors(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for call in ["tracing::warn!(", "tracing::error!("] {
            for (at, _) in text.match_indices(call) {
                let body = &text[at + call.len()..];
                let (mut depth, mut in_str, mut escaped) = (1, false, false);
                let mut literals = Vec::new();
                let mut current = String::new();
                for c in body.chars() {
                    if in_str {
                        match (escaped, c) {
                            (true, _) => escaped = false,
                            (false, '\\') => escaped = true,
                            (false, '"') => {
                                in_str = false;
                                literals.push(std::mem::take(&mut current));
                                continue;
                            }
                            _ => {}
                        }
                        current.push(c);
                        continue;
                    }
                    match c {
                        '"' => in_str = true,
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                // The message is the call's last argument.
                if let Some(msg) = literals.last() {
                    out.push((path.display().to_string(), msg.clone()));
                }
            }
        }
    }
}

#[test]
fn every_warn_and_error_line_is_explained() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(repo.join("docs/operations.md")).unwrap();
    let mut logged = Vec::new();
    for krate in ["edge", "cloud", "runtime"] {
        logged_warnings_and_errors(&repo.join(krate).join("src"), &mut logged);
    }
    assert!(logged.len() >= 50, "{logged:#?}");
    let missing: Vec<_> = logged.iter().filter(|(_, msg)| !doc.contains(&format!("`{msg}`"))).collect();
    assert!(missing.is_empty(), "WARN/ERROR lines docs/operations.md does not explain: {missing:#?}");
}
