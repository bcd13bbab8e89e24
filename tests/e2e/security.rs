//! TLS and tokens end to end: a CA and a server certificate from
//! `kappa-cloud pki`, a cloud that serves only HTTPS and wants a token for
//! everything but health and metrics, and agents with their own, a revoked
//! and a wrong gateway's token. Readings of a device not registered to its
//! gateway are refused; a replayed batch counts once; the API tells read
//! from admin; no token ever reaches a log.

use std::path::Path;
use std::time::Duration;

use kappa_cloud::auth::token_sha256;
use kappa_cloud::pki::{self, Kind};
use kappa_common::batch::{self, EdgeBatch};

use kappa_tests::harness::*;

fn token(name: &str) -> String {
    // A fixed prefix, the name and fresh randomness: unique per run, easy to grep for.
    format!("{}-{name}", kappa_cloud::auth::new_token().expect("token").0)
}

/// The body of `GET url` with `client` (panics on a transport error).
async fn get(client: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

async fn post_batch(client: &reqwest::Client, base: &str, token: &str, b: &EdgeBatch) -> (u16, String) {
    let resp = client
        .post(format!("{base}/v1/ingest"))
        .bearer_auth(token)
        .header("content-encoding", "zstd")
        .body(batch::encode(b, 3))
        .send()
        .await
        .expect("ingest over TLS");
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

/// A client that trusts only the CA in `ca`, sending `token` with every request.
fn trusting(ca: &Path, token: Option<&str>) -> reqwest::Client {
    let pem = std::fs::read(ca).expect("read the CA");
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {t}").parse().expect("header"));
    }
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("CA pem")])
        .default_headers(headers)
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_gateways_with_their_own_valid_token_reach_a_tls_cloud_and_the_api_tells_read_from_admin() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    // The CLI, as an operator runs it.
    for args in [
        vec!["pki", "init", "--dir", pki_dir.to_str().unwrap()],
        vec![
            "pki",
            "issue",
            "--dir",
            pki_dir.to_str().unwrap(),
            "--kind",
            "server",
            "--name",
            "cloud",
            "--san",
            "127.0.0.1",
        ],
    ] {
        let out = std::process::Command::new(bin()).arg("cloud").args(&args).output().expect("run kappa-cloud");
        assert!(out.status.success(), "kappa-cloud {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = std::process::Command::new(bin())
        .args(["cloud", "auth", "token", "--gateway", "gw-a"])
        .output()
        .expect("run kappa-cloud auth token");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let gw_a = printed
        .lines()
        .find_map(|l| l.split_once("it is not stored anywhere): ").map(|(_, t)| t.trim().to_string()))
        .unwrap_or_else(|| panic!("no token in {printed:?}"));
    assert!(printed.contains(&format!("token_sha256 = \"{}\"", token_sha256(&gw_a))), "{printed}");
    assert!(pki::issue(&pki_dir, Kind::Device, "sensor-1", &[]).is_ok());

    let (gw_old, gw_c, viewer, oncall, unknown) =
        (token("old"), token("gwc"), token("viewer"), token("oncall"), token("unknown"));
    // gw-a may send four of its fleet's five devices.
    let registered: Vec<String> = (0..4).map(|i| format!("\"a-{i:05}\"")).collect();
    let config = format!(
        "[processor]\ncheckpoint_interval = \"500ms\"\n[http.tls]\ncert_file = {:?}\nkey_file = {:?}\n\
         [auth]\nrequired = true\n\
         [[auth.gateways]]\nid = \"gw-a\"\ntoken_sha256 = \"{}\"\ndevices = [{}]\n\
         [[auth.gateways]]\nid = \"gw-old\"\ntoken_sha256 = \"{}\"\nrevoked = true\n\
         [[auth.gateways]]\nid = \"gw-c\"\ntoken_sha256 = \"{}\"\n\
         [[auth.tokens]]\nname = \"viewer\"\ntoken_sha256 = \"{}\"\nrole = \"read\"\n\
         [[auth.tokens]]\nname = \"oncall\"\ntoken_sha256 = \"{}\"\nrole = \"admin\"\n",
        pki_dir.join("cloud.pem"),
        pki_dir.join("cloud.key"),
        token_sha256(&gw_a),
        registered.join(", "),
        token_sha256(&gw_old),
        token_sha256(&gw_c),
        token_sha256(&viewer),
        token_sha256(&oncall),
    );
    let cloud = Cloud::start_with(dir.path(), "cloud", &config, &[]).await;
    let base = format!("https://127.0.0.1:{}", cloud.port);
    let client = trusting(&pki_dir.join("ca.pem"), None);
    // /metrics names every gateway: it needs an API token (auth.open_metrics).
    let scraper = trusting(&pki_dir.join("ca.pem"), Some(&viewer));

    // Transport: plain HTTP and a client without the CA get nowhere.
    assert_eq!(get(&client, &format!("{base}/healthz"), None).await.0, 200, "health is open, over TLS");
    assert_eq!(status(&format!("http://127.0.0.1:{}/healthz", cloud.port)).await, 0, "plain HTTP is not served");
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err(), "the system roots do not vouch for the dev CA");
    assert!(series_with(&scraper, &base, "kappa_cloud_tls_handshake_failures_total").await >= 2.0);

    let metrics = format!("{base}/metrics");
    assert_eq!(get(&client, &metrics, None).await.0, 401, "/metrics needs a token");
    assert_eq!(get(&client, &metrics, Some(&gw_a)).await.0, 403, "a gateway token cannot scrape");
    let (code, page) = get(&client, &metrics, Some(&viewer)).await;
    assert!(code == 200 && page.contains("kappa_cloud_ingest_requests_total"), "{code}: {page:.200}");
    assert_eq!(get(&client, &format!("{base}/readyz"), None).await.0, 200, "probes need no token");

    // The API: read tokens query, admin tokens also acknowledge.
    let devices = format!("{base}/v1/devices");
    assert_eq!(get(&client, &devices, None).await.0, 401);
    assert_eq!(get(&client, &devices, Some(&unknown)).await.0, 401);
    assert_eq!(get(&client, &devices, Some(&gw_a)).await.0, 403, "a gateway token cannot query");
    assert_eq!(get(&client, &devices, Some(&viewer)).await.0, 200);
    let ack = |t: &str| {
        let (client, url, t) = (client.clone(), format!("{base}/v1/alerts/no-such-alert/ack"), t.to_string());
        async move { client.post(url).bearer_auth(t).json(&serde_json::json!({"by": "me"})).send().await.unwrap() }
    };
    assert_eq!(ack(&viewer).await.status().as_u16(), 403, "read tokens cannot acknowledge");
    assert_eq!(ack(&oncall).await.status().as_u16(), 404, "an admin token passes (there is no such alert)");
    assert!(series_with(&scraper, &base, "kappa_cloud_api_refused_total{reason=\"forbidden\"}").await >= 2.0);

    // Gateways: the right token over TLS; the revoked one and another
    // gateway's token are refused, and their agents keep their backlogs.
    let ca = pki_dir.join("ca.pem");
    let forward = format!("ca_file = {ca:?}\ntoken_env = \"GW_TOKEN\"\n");
    let port_a = free_port();
    let edge_a =
        Edge::start_env(dir.path(), "edge-a", "gw-a", Mqtt::Embedded(port_a), &base, &forward, &[("GW_TOKEN", &gw_a)])
            .await;
    let port_b = free_port();
    let edge_b = Edge::start_env(
        dir.path(),
        "edge-b",
        "gw-old",
        Mqtt::Embedded(port_b),
        &base,
        &forward,
        &[("GW_TOKEN", &gw_old)],
    )
    .await;
    let port_c = free_port();
    let edge_c =
        Edge::start_env(dir.path(), "edge-c", "gw-x", Mqtt::Embedded(port_c), &base, &forward, &[("GW_TOKEN", &gw_c)])
            .await;
    let mut fleets = Vec::new();
    for (name, port) in [("a", port_a), ("b", port_b), ("c", port_c)] {
        let mut f = Fleet::new(5, 60, 20.0);
        f.name = format!("sim-{name}");
        f.id_prefix = format!("{name}-");
        fleets.push(f.start(port, dir.path()));
    }
    let truth_a = Fleet::finish(&mut fleets[0], dir.path()).await;
    let (truth_b, truth_c) =
        (Fleet::finish(&mut fleets[1], dir.path()).await, Fleet::finish(&mut fleets[2], dir.path()).await);
    let unregistered: u64 = truth_a.rows.iter().filter(|r| r.device == "a-00004").map(|r| r.count).sum();
    assert!(unregistered > 0);

    let api = trusting(&ca, Some(&viewer));
    let expected = truth_a.acked - unregistered;
    let rows = wait_for("gw-a's registered devices to arrive", Duration::from_secs(60), || async {
        let rows = fetch_rows_with(&api, &base, "device_windows").await;
        (total(&rows) >= expected).then_some(rows)
    })
    .await;
    let mut registered_truth = truth_a;
    registered_truth.rows.retain(|r| r.device != "a-00004");
    let problems = diff_against_truth(&registered_truth, &rows);
    assert!(problems.is_empty(), "gw-a's registered devices: {problems:?}\n{}", cloud.proc.tail());
    assert_eq!(
        series_with(&scraper, &base, "kappa_cloud_readings_rejected_total{reason=\"unregistered_device\"}").await,
        unregistered as f64
    );
    let edge_url = |e: &Edge| format!("http://127.0.0.1:{}", e.http_port);
    let unauthorized = "kappa_edge_forward_failures_total{reason=\"unauthorized\"}";
    for (edge, truth, reason) in [(&edge_b, &truth_b, "revoked_credential"), (&edge_c, &truth_c, "wrong_gateway")] {
        wait_for("the refusals to be counted", Duration::from_secs(30), || async {
            (series(&edge_url(edge), unauthorized).await > 0.0
                && series_with(&scraper, &base, &format!("kappa_cloud_ingest_rejected_total{{reason=\"{reason}\"}}"))
                    .await
                    > 0.0)
                .then_some(())
        })
        .await;
        let kept = truth.acked as f64;
        wait_for("a refused gateway to keep every reading for later", Duration::from_secs(30), || async {
            (edge.metric("kappa_edge_backlog_readings").await == Some(kept)).then_some(())
        })
        .await;
    }
    assert!(rows.iter().all(|r| r.key.starts_with("a-")), "nothing from the refused gateways reached the views");

    // A replayed batch with valid credentials: accepted once, counted once.
    // Readings of a registered device from another boot than the fleet's.
    let readings = scenario(false).remove(0).readings.into_iter().take(50).enumerate().map(|(i, mut r)| {
        r.device = "a-00000".into();
        r.boot = 77;
        r.seq = i as u64 + 1;
        r
    });
    let replay = EdgeBatch::new("gw-a", 900_001, readings.collect());
    let first = post_batch(&client, &base, &gw_a, &replay).await;
    let again = post_batch(&client, &base, &gw_a, &replay).await;
    assert_eq!(first.0, 200, "{}", first.1);
    assert!(again.0 == 200 && again.1.contains("\"duplicate\":true"), "{again:?}");
    assert_eq!(post_batch(&client, &base, &unknown, &replay).await.0, 401);
    let replayed = wait_for("the replayed batch to be processed", Duration::from_secs(30), || async {
        let n = total(&fetch_rows_with(&api, &base, "device_totals").await);
        (n >= expected + 50).then_some(n)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(replayed, expected + 50);
    assert_eq!(total(&fetch_rows_with(&api, &base, "device_totals").await), expected + 50, "counted once");

    // The dashboard takes a read token once and keeps it out of the address bar.
    let profile = dir.path().join("chromium-profile");
    let args = ["--ignore-certificate-errors", "--dump-dom"];
    let with = crate::dashboard::browse(&profile, &format!("{base}/dashboard?token={viewer}#/"), &args).await;
    assert!(with.contains("data-device=\"a-00000\""), "the fleet page lists the devices:\n{with}");
    let profile = dir.path().join("chromium-profile-2");
    let without = crate::dashboard::browse(&profile, &format!("{base}/dashboard#/"), &args).await;
    assert!(without.contains("needs an API token"), "without a token the page says what it needs:\n{without}");

    // No token appears in any log.
    let logs = [&cloud.proc, &edge_a.proc, &edge_b.proc, &edge_c.proc]
        .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default());
    for t in [&gw_a, &gw_old, &gw_c, &viewer, &oncall, &unknown] {
        for log in &logs {
            assert!(!log.contains(t.as_str()), "a token is in a log");
        }
    }
    assert!(logs[0].contains("Refused an API request"), "the refusals are logged (without tokens)");
}
