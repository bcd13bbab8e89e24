//! The services a cluster test runs beside the product: the tansu
//! Kafka-protocol broker, PostgreSQL (the machine's, or a private server),
//! cluster workers, and moto's S3.

use super::*;

/// A Kafka-protocol broker process (tansu) on its own port: in memory, or
/// on an S3 store ([`Tansu::start_on_s3`]) so that it can be restarted.
#[derive(Debug)]
pub struct Tansu {
    pub port: u16,
    pub proc: Proc,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Tansu {
    fn binary() -> PathBuf {
        crate::tansu_binary().unwrap_or_else(|| {
            panic!(
                "no tansu broker: build it with `cargo install tansu --locked --version 0.6.0 --features dynostore \
                 --root ~/.cache/kappa-tools/tansu-0.6.0` (about 18 minutes; .ci/run does it) or set KAPPA_TANSU"
            )
        })
    }

    pub async fn start(dir: &Path) -> Tansu {
        let port = free_port();
        Self::start_advertising(dir, port, port).await
    }

    /// A broker on `port` that tells clients to reach it at `advertised`
    /// (a TLS proxy in front of it, say).
    pub async fn start_advertising(dir: &Path, port: u16, advertised: u16) -> Tansu {
        Self::launch(dir, port, advertised, "memory://tansu/", Vec::new()).await
    }

    /// A broker keeping its topics in `moto`'s bucket `tansu`: what it
    /// acknowledged survives [`Tansu::restart`].
    pub async fn start_on_s3(dir: &Path, moto: &Moto) -> Tansu {
        moto.create_bucket("tansu").await;
        let port = free_port();
        Self::launch(dir, port, port, "s3://tansu/", moto.env()).await
    }

    async fn launch(dir: &Path, port: u16, advertised: u16, storage: &str, mut env: Vec<(String, String)>) -> Tansu {
        // Its INFO log is a line per record handled: gigabytes in a soak.
        env.push(("RUST_LOG".into(), "warn".into()));
        let args = vec![
            "broker".to_string(),
            "--listener-url".into(),
            format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url".into(),
            format!("tcp://127.0.0.1:{advertised}"),
            "--storage-engine".into(),
            storage.into(),
        ];
        let proc = Self::spawn(dir, &args, &env);
        wait_for_port(port).await;
        Tansu { port, proc, args, env, dir: dir.to_path_buf() }
    }

    fn spawn(dir: &Path, args: &[String], env: &[(String, String)]) -> Proc {
        let bin = Self::binary();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Proc::spawn_env("tansu", bin.to_str().unwrap_or_default(), &args, dir, &env)
    }

    /// Starts the broker again (after [`Proc::kill9`]), with the same storage.
    pub async fn restart(&mut self) {
        self.proc = Self::spawn(&self.dir, &self.args, &self.env);
        wait_for_port(self.port).await;
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// PostgreSQL on this machine (`.ci/run` starts it): trust auth, database `test`.
pub fn postgres() -> String {
    std::env::var("KAPPA_TEST_POSTGRES").unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

/// A PostgreSQL schema of the test's own, dropped first (a rerun starts clean).
pub fn fresh_schema(name: &str) -> String {
    let schema = format!("kappa_e2e_{name}_{}", std::process::id());
    let drop = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
    // The blocking client runs a runtime of its own: not on the test's.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&postgres(), postgres::NoTls).expect("PostgreSQL at 127.0.0.1:5432");
        client.batch_execute(&drop).expect("drop the test schema");
    })
    .join()
    .expect("the schema is dropped");
    schema
}

/// The node's and the workers' config (without `data_dir` and `[http]`),
/// with `extra` (processor settings, views) at the end.
pub fn cluster_config(broker: &Tansu, schema: &str, extra: &str) -> String {
    cluster_config_on(broker, &postgres(), schema, extra)
}

/// [`cluster_config`] on the PostgreSQL server `conninfo`.
pub fn cluster_config_on(broker: &Tansu, conninfo: &str, schema: &str, extra: &str) -> String {
    format!(
        "[log]\nbackend = \"kafka\"\npartitions = 6\n[log.kafka]\nbrokers = \"{}\"\ntopic = \"events\"\n\
         delivery_timeout = \"3s\"\n[cluster]\npostgres = \"{}\"\nschema = \"{schema}\"\n\
         session_timeout = \"6s\"\n{extra}",
        broker.brokers(),
        conninfo
    )
}

/// A PostgreSQL server of the test's own (initdb into a temporary
/// directory, its own port), so that a test can stop and start it without
/// touching the machine's. Uses the machine's PostgreSQL binaries
/// (`/usr/lib/postgresql/*/bin`); as root, runs them as `postgres`.
#[derive(Debug)]
pub struct PrivatePostgres {
    pub port: u16,
    data: PathBuf,
    bin: PathBuf,
}

impl PrivatePostgres {
    pub fn start(dir: &Path) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path().join("bin")).find(|b| b.join("initdb").exists()))
            .expect("PostgreSQL's server binaries in /usr/lib/postgresql/*/bin");
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data).expect("pgdata");
        let pg = Self { port: free_port(), data, bin };
        if pg.as_root() {
            let chown = std::process::Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status();
            assert!(chown.is_ok_and(|s| s.success()), "chown {} to postgres", dir.display());
        }
        let data = pg.data.display().to_string();
        pg.run("initdb", &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"]);
        pg.start_again();
        pg
    }

    fn as_root(&self) -> bool {
        // SAFETY: geteuid(2) has no preconditions.
        #[allow(unsafe_code)]
        unsafe {
            libc::geteuid() == 0
        }
    }

    fn command(&self, tool: &str) -> std::process::Command {
        let program = self.bin.join(tool);
        if self.as_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            std::process::Command::new(&program)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed:
{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_again(&self) {
        let data = self.data.display().to_string();
        let log = self.data.join("server.log").display().to_string();
        let opts = format!("-p {} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", self.port);
        self.run("pg_ctl", &["-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "60", "start"]);
    }

    /// A fast shutdown: connections are ended, as in a restart.
    pub fn stop(&self) {
        let data = self.data.display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "-t", "60", "stop"]);
    }

    pub fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let _ = self.command("pg_ctl").args(["-D", &data, "-m", "immediate", "stop"]).output();
    }
}

/// A `kappa-cloud worker` process with `/metrics` on a port of its own.
#[derive(Debug)]
pub struct Worker {
    pub port: u16,
    pub proc: Proc,
    path: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Worker {
    pub async fn start(dir: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> Worker {
        let port = free_port();
        let path = dir.join(format!("{name}.toml"));
        let data = dir.join(format!("{name}-data"));
        std::fs::write(&path, format!("data_dir = {data:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n{config}"))
            .expect("write the worker config");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let proc = Self::spawn(dir, &path, &env);
        wait_for_port(port).await;
        Worker { port, proc, path, env, dir: dir.to_path_buf() }
    }

    fn spawn(dir: &Path, path: &Path, env: &[(String, String)]) -> Proc {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Proc::spawn_env(&name, bin(), &["cloud", "worker", "--config", path.to_str().unwrap_or_default()], dir, &env)
    }

    /// Starts the worker again (after [`Proc::kill9`]), with the same config.
    pub async fn restart(&mut self) {
        self.proc = Self::spawn(&self.dir, &self.path, &self.env);
        wait_for_port(self.port).await;
    }

    /// Readings this worker has processed so far.
    pub async fn processed(&self) -> f64 {
        series(&format!("http://127.0.0.1:{}", self.port), r#"kappa_cloud_readings_processed_total{pipeline="main"}"#)
            .await
    }
}

/// moto's S3 server (a real process speaking the S3 protocol) on its own port.
#[derive(Debug)]
pub struct Moto {
    pub port: u16,
    pub proc: Proc,
}

impl Moto {
    pub async fn start(dir: &Path) -> Moto {
        let port = free_port();
        let proc = Proc::spawn_cmd("moto", "moto_server", &["-H", "127.0.0.1", "-p", &port.to_string()], dir);
        wait_for_port(port).await;
        Moto { port, proc }
    }

    pub async fn create_bucket(&self, bucket: &str) {
        let url = format!("http://127.0.0.1:{}/{bucket}", self.port);
        let created = reqwest::Client::new().put(url).send().await.expect("moto answers");
        assert!(created.status().is_success(), "create the bucket {bucket}: {}", created.status());
    }

    /// The environment an S3 client (object_store) needs to reach it.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "kappa-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "kappa-test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
