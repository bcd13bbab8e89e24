//! `config check` refuses what `run` refuses (docs/operations.md): each
//! config below parses and validates, but names a file that is missing or
//! does not parse, a key that does not match its certificate, a data
//! directory that cannot be created, or an environment variable that is not
//! set. `config check` must exit 2 naming the key, and `run` must exit 2 on
//! its own before it starts, naming the same key. The untouched base config
//! passes `config check`: the failures are the breakages', not the base's.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kappa_tests::harness::*;

/// Runs `role args`, killing it if it has not ended within a minute (a
/// `run` that started); returns its exit code and standard error.
fn run_to_end(role: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(bin())
        .arg(role)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{role} {args:?} did not end on its own: it started\n{}",
                std::fs::read_to_string(&err_path).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), std::fs::read_to_string(&err_path).unwrap())
}

/// A development CA with two server certificates, `a` and `b`: files for
/// the configs to name.
fn pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    let p = pki.to_str().unwrap();
    for args in [
        &["pki", "init", "--dir", p][..],
        &["pki", "issue", "--dir", p, "--kind", "server", "--name", "a", "--san", "127.0.0.1"],
        &["pki", "issue", "--dir", p, "--kind", "server", "--name", "b", "--san", "127.0.0.1"],
    ] {
        let (code, err) = run_to_end("cloud", args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
    std::fs::write(pki.join("garbage.pem"), "this is not a certificate\n").unwrap();
    std::fs::write(dir.join("a-file"), "x").unwrap();
    pki
}

/// Writes `text` as a config and asserts that `config check` and `run`
/// both refuse it with exit 2, naming `key`.
fn both_refuse(role: &str, dir: &Path, name: &str, text: &str, key: &str) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let config = path.to_str().unwrap();
    let (code, err) = run_to_end(role, &["config", "check", "--config", config]);
    assert_eq!(code, Some(2), "{role} config check of {name} should refuse it: {err}");
    assert!(err.contains(key), "{role} config check of {name} should name {key}: {err}");
    let (code, err) = run_to_end(role, &["run", "--config", config]);
    assert_eq!(code, Some(2), "{role} run of {name} should refuse to start: {err}");
    assert!(err.contains(key), "{role} run of {name} should name {key}: {err}");
}

#[test]
fn the_agents_config_check_refuses_what_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (ca, a_pem, b_key) = (pki.join("ca.pem"), pki.join("a.pem"), pki.join("b.key"));
    let data = dir.path().join("edge-data");
    let base = |mqtt: &str, forward: &str, data_dir: &Path| {
        format!(
            "gateway_id = \"gw-1\"\ndata_dir = {data_dir:?}\n[http]\nlisten = \"127.0.0.1:{}\"\n[mqtt]\nlisten = \"127.0.0.1:{}\"\n{mqtt}\n[forward]\n{forward}\n",
            free_port(),
            free_port()
        )
    };
    let http = "cloud_url = \"http://127.0.0.1:1\"";
    let https = |ca: &Path| format!("cloud_url = \"https://127.0.0.1:1\"\nca_file = {ca:?}");

    let ok = dir.path().join("ok.toml");
    std::fs::write(&ok, base("", &https(&ca), &data)).unwrap();
    let (code, err) = run_to_end("edge", &["config", "check", "--config", ok.to_str().unwrap()]);
    assert_eq!(code, Some(0), "the base config passes: {err}");

    let cases: Vec<(&str, String, &str)> = vec![
        ("missing-ca", base("", &https(&dir.path().join("nope.pem")), &data), "forward.ca_file"),
        ("garbage-ca", base("", &https(&pki.join("garbage.pem")), &data), "forward.ca_file"),
        ("data-under-a-file", base("", http, &dir.path().join("a-file/data")), "data_dir"),
        (
            "missing-tls-cert",
            base(
                &format!(
                    "[mqtt.tls]\nlisten = \"127.0.0.1:{}\"\ncert_file = \"/nope.pem\"\nkey_file = {b_key:?}\n[mqtt.access]\nanonymous = true",
                    free_port()
                ),
                http,
                &data,
            ),
            "mqtt.tls",
        ),
        (
            "key-of-another-cert",
            base(
                &format!(
                    "[mqtt.tls]\nlisten = \"127.0.0.1:{}\"\ncert_file = {a_pem:?}\nkey_file = {b_key:?}\n[mqtt.access]\nanonymous = true",
                    free_port()
                ),
                http,
                &data,
            ),
            "mqtt.tls",
        ),
        (
            "missing-password-file",
            base("[mqtt.access]\npassword_file = \"/nope/passwd\"", http, &data),
            "mqtt.access.password_file",
        ),
        (
            "unset-broker-password",
            base(
                "mode = \"external\"\nbroker_url = \"mqtt://127.0.0.1:1\"\nusername = \"agent\"\npassword_env = \"KAPPA_TEST_UNSET_PASSWORD\"",
                http,
                &data,
            ),
            "mqtt.password_env",
        ),
    ];
    for (name, text, key) in &cases {
        both_refuse("edge", dir.path(), name, text, key);
    }
    assert!(!data.exists(), "checking created nothing");
}

#[test]
fn the_clouds_config_check_refuses_what_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (a_pem, a_key, b_key) = (pki.join("a.pem"), pki.join("a.key"), pki.join("b.key"));
    let data = dir.path().join("cloud-data");
    let base = |extra: &str, data_dir: &Path| {
        format!("data_dir = {data_dir:?}\n[http]\nlisten = \"127.0.0.1:{}\"\n{extra}\n", free_port())
    };
    let tls = |cert: &Path, key: &Path| format!("[http.tls]\ncert_file = {cert:?}\nkey_file = {key:?}");

    let ok = dir.path().join("ok.toml");
    std::fs::write(&ok, base(&tls(&a_pem, &a_key), &data)).unwrap();
    let (code, err) = run_to_end("cloud", &["config", "check", "--config", ok.to_str().unwrap()]);
    assert_eq!(code, Some(0), "the base config passes: {err}");

    let cluster = |ca: &Path| {
        format!(
            "[log]\nbackend = \"kafka\"\npartitions = 1\n[log.kafka]\nbrokers = \"127.0.0.1:1\"\ntopic = \"t\"\n\
             [cluster]\npostgres = \"host=127.0.0.1 user=postgres dbname=test\"\npostgres_ca = {ca:?}"
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("missing-tls-cert", base(&tls(&dir.path().join("nope.pem"), &a_key), &data), "http.tls"),
        ("key-of-another-cert", base(&tls(&a_pem, &b_key), &data), "http.tls"),
        ("data-under-a-file", base("", &dir.path().join("a-file/data")), "data_dir"),
        ("missing-postgres-ca", base(&cluster(&dir.path().join("nope.pem")), &data), "cluster.postgres"),
        // No tokens where other machines can connect (docs/security.md).
        (
            "open-on-a-public-address",
            format!("data_dir = {data:?}\n[http]\nlisten = \"0.0.0.0:{}\"\n", free_port()),
            "auth.required",
        ),
    ];
    for (name, text, key) in &cases {
        both_refuse("cloud", dir.path(), name, text, key);
    }
    assert!(!data.exists(), "checking created nothing");
    // A config for another machine (a pod's, with its certificates mounted
    // there) is checked without this machine's files.
    let elsewhere = dir.path().join("missing-tls-cert.toml");
    let (code, err) =
        run_to_end("cloud", &["config", "check", "--no-environment", "--config", elsewhere.to_str().unwrap()]);
    assert_eq!(code, Some(0), "--no-environment checks the file only: {err}");
}
