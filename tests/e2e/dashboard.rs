//! The dashboard in a real browser (Debian's headless Chromium) while a
//! fleet publishes through an edge agent: every page renders real numbers
//! from the running node, they update, and screenshots are kept under
//! `target/e2e-artifacts/dashboard/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kappa_tests::harness::*;

fn chromium() -> PathBuf {
    let path = std::env::var_os("KAPPA_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "no Chromium at {}: install Debian's `chromium` package (.ci/run does) or set KAPPA_CHROMIUM",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `args`; its standard output.
pub(crate) async fn browse(profile: &Path, url: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=6000")
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed on {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's DOM after its scripts ran and fetched.
async fn dom(profile: &Path, url: &str) -> String {
    let html = browse(profile, url, &["--dump-dom"]).await;
    assert!(!html.contains("id=\"page\"><p class=\"err\">"), "the page shows an error:\n{html}");
    html
}

async fn screenshot(profile: &Path, url: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-artifacts/dashboard");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    let path = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&path);
    browse(profile, url, &["--hide-scrollbars", "--window-size=1366,900", &format!("--screenshot={}", path.display())])
        .await;
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot {} is {size} bytes", path.display());
    path
}

/// The number in the element with `id` (thousands separators allowed).
fn number_by_id(html: &str, id: &str) -> Option<f64> {
    let start = html.find(&format!("id=\"{id}\">"))? + id.len() + 6;
    let text: String = html[start..].chars().take_while(|c| *c != '<').filter(|c| *c != ',').collect();
    text.trim().parse().ok()
}

/// The `data-k="{key}"` cell of device `device`'s row in the fleet table.
fn fleet_cell(html: &str, device: &str, key: &str) -> Option<f64> {
    let row = &html[html.find(&format!("data-device=\"{device}\""))?..];
    let row = &row[..row.find("</tr>")?];
    let start = row.find(&format!("data-k=\"{key}\">"))? + key.len() + 10;
    let text: String = row[start..].chars().take_while(|c| *c != '<').filter(|c| *c != ',').collect();
    text.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_numbers_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("chromium-profile");
    let rules = "[processor]\ncheckpoint_interval = \"300ms\"\n[[rules]]\nname = \"warm\"\nkind = \"threshold\"\n\
                 when = \"temperature > 0\"\nseverity = \"warning\"\n";
    let cloud = Cloud::start_with(dir.path(), "cloud", rules, &[]).await;
    let mqtt_port = free_port();
    let edge = Edge::start(dir.path(), Mqtt::Embedded(mqtt_port), &cloud.url()).await;
    let devices = 12;
    // 15 s of event time per reading: a new one-minute window every second, so charts have a line.
    let mut fleet = Fleet::new(devices, 240, 4.0);
    fleet.event_interval = "15s".into();
    let mut sim = fleet.start(mqtt_port, dir.path());
    let url = format!("{}/dashboard", cloud.url());

    wait_for("every device in the view", Duration::from_secs(60), || async {
        (fetch_rows(&cloud.url(), "device_totals").await.len() == devices as usize).then_some(())
    })
    .await;
    let device = fetch_rows(&cloud.url(), "device_totals").await[0].key.clone();

    // Fleet: every device with its numbers and status; the numbers move.
    let first = dom(&profile, &format!("{url}#/")).await;
    assert_eq!(number_by_id(&first, "device-count"), Some(f64::from(devices)), "{first}");
    assert!(
        number_by_id(&first, "open-alerts").unwrap_or(0.0) >= 1.0,
        "the warm rule fires for every device:\n{first}"
    );
    let before = fleet_cell(&first, &device, "count").unwrap_or_else(|| panic!("no count for {device}:\n{first}"));
    assert!(before > 0.0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = dom(&profile, &format!("{url}#/")).await;
    let after = fleet_cell(&later, &device, "count").unwrap_or_else(|| panic!("no count for {device}:\n{later}"));
    assert!(after > before, "the fleet page should show the count growing: {before} then {after}");

    // A device: one chart per numeric window value, each a drawn line.
    let windows = format!("{}/v1/devices/{device}/windows", cloud.url());
    wait_for("a few windows of the device", Duration::from_secs(60), || async {
        let body = reqwest::get(&windows).await.ok()?.text().await.ok()?;
        (body.matches("window_start_ms").count() >= 3).then_some(())
    })
    .await;
    let page = dom(&profile, &format!("{url}#/device/{device}")).await;
    assert!(page.contains(&format!("id=\"device-id\">{device}<")), "{page}");
    for metric in ["count", "temperature_avg", "humidity_max"] {
        assert!(page.contains(&format!("data-metric=\"{metric}\"")), "no chart of {metric}:\n{page}");
    }
    let points = page.split("points=\"").nth(1).and_then(|p| p.split('"').next()).unwrap_or_default();
    assert!(points.split(' ').count() >= 2, "a chart with at least two windows: {points:?}");
    assert!(page.contains("data-alert=\""), "the device's alerts are listed:\n{page}");
    // Axes with the range and the unit, and a mark where each alert started.
    let temp = page.split("data-metric=\"temperature_avg\"").nth(1).unwrap_or_default();
    let temp = &temp[..temp.find("</svg>").unwrap_or(temp.len())];
    for part in
        ["(°C)", "class=\"y-max\"", "class=\"y-min\"", "class=\"x-from\"", "class=\"x-to\"", "data-alert-mark=\""]
    {
        assert!(temp.contains(part), "the temperature chart has no {part}:\n{temp}");
    }

    // Values at the precision the sensors measured them (temperature in
    // hundredths, sent as 32-bit floats), in the API and in alert messages.
    let body: serde_json::Value = reqwest::get(&windows).await.unwrap().json().await.unwrap();
    let decimals = |v: f64| v.to_string().split('.').nth(1).map_or(0, str::len);
    let maxima: Vec<f64> =
        body["rows"].as_array().unwrap().iter().filter_map(|r| r["values"]["temperature_max"].as_f64()).collect();
    assert!(!maxima.is_empty() && maxima.iter().all(|v| decimals(*v) <= 2), "temperature_max as measured: {maxima:?}");

    // Alerts: the lifecycle table.
    let page = dom(&profile, &format!("{url}#/alerts")).await;
    assert!(number_by_id(&page, "alerts-firing").unwrap_or(0.0) >= 1.0, "{page}");
    assert!(page.contains(">warm<") && page.contains("pill firing"), "{page}");
    let value = page
        .split("condition holds (value ")
        .nth(1)
        .and_then(|v| v.split(')').next())
        .unwrap_or_else(|| panic!("no alert message:\n{page}"));
    assert!(value.parse::<f64>().is_ok() && decimals(value.parse().unwrap_or(0.0)) <= 2, "message value {value:?}");

    // Pipeline health: totals from /metrics and the gateway's own report.
    let page = dom(&profile, &format!("{url}#/health")).await;
    assert!(number_by_id(&page, "total-ingested").unwrap_or(0.0) > 0.0, "{page}");
    assert!(number_by_id(&page, "lag").is_some() && number_by_id(&page, "late").is_some(), "{page}");
    assert!(page.contains("data-gateway=\"gw-test\""), "the edge reports its backlog with each batch:\n{page}");

    for (route, name) in
        [("#/", "fleet"), (&format!("#/device/{device}"), "device"), ("#/alerts", "alerts"), ("#/health", "health")]
    {
        screenshot(&profile, &format!("{url}{route}"), name).await;
    }
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!(truth.acked, u64::from(devices) * 240);
    drop(edge);
}
