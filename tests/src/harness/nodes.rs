//! The product's processes under test: a cloud node, an edge agent, a
//! private Mosquitto and a simulated fleet.

use super::*;

/// A cloud node process with its own data directory and port.
#[derive(Debug)]
pub struct Cloud {
    pub port: u16,
    pub config: PathBuf,
    pub proc: Proc,
    name: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

/// The processor settings for fleet-driven tests. The simulated fleets run
/// event time 30-40 times faster than the wall clock, so the built-in 10 s
/// bound on out-of-orderness is a third of a second of scheduling jitter
/// between devices: on a loaded 2-core machine a lagging device's readings
/// fell behind the watermark and went to the late log (seen in CI). The
/// reference design's 10 minutes (deploy/cloud/single-node.toml) is about
/// 15 s of wall time here.
pub const FLEET_PROCESSOR: &str = "[processor]\ncheckpoint_interval = \"500ms\"\nmax_out_of_orderness = \"10m\"\n";

impl Cloud {
    pub async fn start(dir: &Path) -> Cloud {
        Self::start_with(dir, "cloud", FLEET_PROCESSOR, &[]).await
    }

    /// A node named `name` (its config, data and log file carry the name),
    /// with `extra` TOML after `data_dir` and `[http]`.
    pub async fn start_with(dir: &Path, name: &str, extra: &str, env: &[(&str, &str)]) -> Cloud {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n{extra}",
                dir.join(format!("{name}-data"))
            ),
        )
        .expect("write cloud config");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let proc = spawn_cloud(name, &config, dir, &env);
        wait_for_port(port).await;
        Cloud { port, config, proc, name: name.into(), dir: dir.into(), env }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Rewrites the node's config with `extra` after `data_dir` and `[http]` (same data, same port).
    pub fn reconfigure(&self, extra: &str) {
        let data = self.dir.join(format!("{}-data", self.name));
        std::fs::write(
            &self.config,
            format!("data_dir = {data:?}\n[http]\nlisten = \"127.0.0.1:{}\"\n{extra}", self.port),
        )
        .expect("write cloud config");
    }

    /// The node's config, as the admin functions take it.
    pub fn config(&self) -> kappa_cloud::config::CloudConfig {
        kappa_cloud::config::CloudConfig::load(&self.config).expect("cloud config")
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(format!("{}-data", self.name))
    }

    /// Starts the same node again (same data, same port).
    pub async fn restart(&mut self) {
        self.proc = spawn_cloud(&self.name, &self.config, &self.dir, &self.env);
        wait_for_port(self.port).await;
    }

    /// `kappa-cloud views dump`: every row and the late log, canonically ordered.
    pub async fn dump(&self) -> String {
        self.dump_with(&[]).await
    }

    /// `views dump` with more arguments (`--alerts`).
    pub async fn dump_with(&self, args: &[&str]) -> String {
        views_dump(&self.config, args).await
    }

    /// Records processed so far, from the checkpoint in the store (readable while the node runs).
    pub fn checkpointed_offsets(&self) -> u64 {
        self.checkpointed_offsets_of(kappa_cloud::store::MAIN_PIPELINE)
    }

    /// Records a pipeline (`main`, `alerts`, `aggregates`) processed so far, from its checkpoint.
    pub fn checkpointed_offsets_of(&self, pipeline: &str) -> u64 {
        let path = self.dir.join(format!("{}-data", self.name)).join("views.sqlite");
        kappa_cloud::store::ViewStore::open_read_only(&path)
            .and_then(|s| s.restore(pipeline))
            .map(|r| r.partitions.values().map(|(o, _)| *o).sum())
            .unwrap_or(0)
    }
}

fn spawn_cloud(name: &str, config: &Path, dir: &Path, env: &[(String, String)]) -> Proc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Proc::spawn_env(name, bin(), &["cloud", "run", "--config", config.to_str().unwrap_or_default()], dir, &env)
}

/// An MQTT 3.1.1 CONNECT for client `id` (clean session, keep-alive 30 s),
/// with a login if given: for tests that drive a raw socket.
pub fn connect_packet(id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
    c.keep_alive = 30;
    if let Some((user, password)) = login {
        c.set_login(user, password);
    }
    let mut out = bytes::BytesMut::new();
    c.write(&mut out).expect("encode a CONNECT");
    out.to_vec()
}

/// How the edge agent reaches devices.
#[derive(Debug, Clone)]
pub enum Mqtt {
    /// Its own MQTT listener on this port.
    Embedded(u16),
    /// An external broker on this port.
    External { port: u16, topic_prefix: String, client_id: String },
}

/// An edge agent process.
#[derive(Debug)]
pub struct Edge {
    pub mqtt_port: u16,
    pub http_port: u16,
    pub config: PathBuf,
    pub proc: Proc,
    dir: PathBuf,
    name: String,
    env: Vec<(String, String)>,
}

impl Edge {
    pub async fn start(dir: &Path, mqtt: Mqtt, cloud_url: &str) -> Edge {
        Self::start_named(dir, "edge", "gw-test", mqtt, cloud_url, "").await
    }

    /// An agent named `name` (its config, data and log carry the name) for
    /// gateway `gateway`, with `extra` TOML appended to `[forward]`.
    pub async fn start_named(dir: &Path, name: &str, gateway: &str, mqtt: Mqtt, cloud_url: &str, extra: &str) -> Edge {
        Self::start_env(dir, name, gateway, mqtt, cloud_url, extra, &[]).await
    }

    /// [`Edge::start_named`] with extra environment variables (kept across restarts).
    pub async fn start_env(
        dir: &Path,
        name: &str,
        gateway: &str,
        mqtt: Mqtt,
        cloud_url: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Edge {
        let http_port = free_port();
        let config = dir.join(format!("{name}.toml"));
        let (mqtt_port, mqtt_section) = match &mqtt {
            Mqtt::Embedded(port) => (*port, format!("mode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n")),
            Mqtt::External { port, topic_prefix, client_id } => (
                *port,
                format!(
                    "mode = \"external\"\nbroker_url = \"mqtt://127.0.0.1:{port}\"\ntopic_prefix = {topic_prefix:?}\nclient_id = {client_id:?}\n"
                ),
            ),
        };
        std::fs::write(
            &config,
            format!(
                "gateway_id = {gateway:?}\ndata_dir = {:?}\n[mqtt]\n{mqtt_section}[clock]\nmax_behind = \"{HISTORY_DAYS}d\"\n[forward]\ncloud_url = {cloud_url:?}\nmax_batch_readings = 2000\nmax_batch_age = \"200ms\"\nretry_min = \"100ms\"\nretry_max = \"1s\"\n{extra}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n",
                dir.join(if name == "edge" { "edge-data".to_string() } else { format!("{name}-data") })
            ),
        )
        .expect("write edge config");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let proc = Self::spawn(name, &config, dir, &env);
        let edge = Edge { mqtt_port, http_port, config, proc, dir: dir.to_path_buf(), name: name.to_string(), env };
        edge.wait_ready(matches!(mqtt, Mqtt::Embedded(_))).await;
        edge
    }

    fn spawn(name: &str, config: &Path, dir: &Path, env: &[(String, String)]) -> Proc {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Proc::spawn_env(name, bin(), &["edge", "run", "--config", config.to_str().unwrap_or_default()], dir, &env)
    }

    async fn wait_ready(&self, embedded: bool) {
        wait_for_port(self.http_port).await;
        if embedded {
            wait_for_port(self.mqtt_port).await;
        }
    }

    /// Starts the agent again with the same configuration and data.
    pub async fn restart(&mut self, embedded: bool) {
        self.proc = Self::spawn(&self.name, &self.config, &self.dir, &self.env);
        self.wait_ready(embedded).await;
    }

    /// One counter or gauge from the agent's `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric(&format!("http://127.0.0.1:{}/metrics", self.http_port), name).await
    }
}

/// A private Mosquitto on its own port, configured as a gateway should be
/// for the agent's external mode (queues deep enough to hold a backlog while
/// the agent restarts).
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
    conf: PathBuf,
}

impl Mosquitto {
    pub async fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 1000\n"
            ),
        )
        .expect("write mosquitto config");
        let proc = Proc::spawn_cmd("mosquitto", "mosquitto", &["-c", conf.to_str().unwrap_or_default()], dir);
        wait_for_port(port).await;
        Mosquitto { port, proc, conf }
    }

    /// Starts it again on the same port (after `proc.kill9()`).
    pub async fn restart(&mut self, dir: &Path) {
        self.proc = Proc::spawn_cmd("mosquitto", "mosquitto", &["-c", self.conf.to_str().unwrap_or_default()], dir);
        wait_for_port(self.port).await;
    }
}

/// A fleet run.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub devices: u32,
    pub readings: u64,
    pub rate: f64,
    pub seed: u64,
    pub topic_prefix: String,
    pub id_prefix: String,
    /// Share of devices on schema-1 firmware.
    pub v1_share: f64,
    /// Share of devices sending JSON.
    pub json_share: f64,
    /// The process name; the ground truth goes to `{name}-truth.json`.
    pub name: String,
    /// More simulator arguments (anomaly scenarios).
    pub extra: Vec<String>,
    /// Event time of the first reading.
    pub start_ms: i64,
    /// Event time between two readings of a device.
    pub event_interval: String,
}

impl Fleet {
    pub fn new(devices: u32, readings: u64, rate: f64) -> Fleet {
        Fleet {
            devices,
            readings,
            rate,
            seed: 7,
            topic_prefix: String::new(),
            id_prefix: "sim-".into(),
            v1_share: 0.0,
            json_share: 0.0,
            name: "sim".into(),
            extra: Vec::new(),
            start_ms: T0,
            event_interval: "1s".into(),
        }
    }

    /// Starts the simulator against a broker on `port`; [`Fleet::finish`] waits for its truth.
    pub fn start(&self, port: u16, dir: &Path) -> Proc {
        let truth = dir.join(format!("{}-truth.json", self.name));
        let args = [
            "--broker".to_string(),
            format!("127.0.0.1:{port}"),
            "--devices".into(),
            self.devices.to_string(),
            "--readings".into(),
            self.readings.to_string(),
            "--rate".into(),
            self.rate.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--event-interval".into(),
            self.event_interval.clone(),
            "--start-ms".into(),
            self.start_ms.to_string(),
            "--topic-prefix".into(),
            self.topic_prefix.clone(),
            "--id-prefix".into(),
            self.id_prefix.clone(),
            "--drain-timeout".into(),
            "90s".into(),
            "--v1-share".into(),
            self.v1_share.to_string(),
            "--json-share".into(),
            self.json_share.to_string(),
            "--truth".into(),
            truth.to_str().unwrap_or_default().to_string(),
        ];
        let args: Vec<&str> = args.iter().chain(&self.extra).map(String::as_str).collect();
        Proc::spawn(&self.name, "sim", &args, dir)
    }

    /// Waits for the simulator to finish and reads its ground truth.
    pub async fn finish(sim: &mut Proc, dir: &Path) -> GroundTruth {
        let status = sim.wait(Duration::from_secs(240)).await;
        assert!(status.success(), "the simulator failed: {status}\n{}", sim.tail());
        let truth = GroundTruth::read(&dir.join(format!("{}-truth.json", sim.name))).expect("ground truth");
        assert_eq!(truth.undelivered, 0, "the simulator ended with unacknowledged readings");
        truth
    }
}

/// `kappa-cloud views dump --config <config> <args>`: the views (embedded or
/// in PostgreSQL, as the config says), canonically ordered.
pub async fn views_dump(config: &Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new(bin())
        .args(["cloud", "views", "dump", "--config", config.to_str().unwrap_or_default()])
        .args(args)
        .output()
        .await
        .expect("views dump");
    assert!(out.status.success(), "views dump failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 dump")
}
