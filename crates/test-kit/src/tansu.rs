//! tansu, a Kafka-compatible broker, as a child process with in-memory
//! storage on a free local port: the real-broker lane of the tests and of
//! the chaos run. Killed (SIGKILL) when dropped, so a harness that fails
//! half-way leaves no broker behind. What tansu does differently from
//! Apache Kafka and from librdkafka's mock is in docs/brokers.md.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::postgres::free_port;

/// The version the lane is pinned to, and where `.ci/run` installs it.
pub const VERSION: &str = "0.6.0";
pub const DEFAULT_BINARY: &str = "/opt/tansu-0.6.0/bin/tansu";
/// Names another tansu binary.
pub const BINARY_VAR: &str = "TANSU_BIN";

/// The tansu binary: `$TANSU_BIN`, or where `.ci/run` installs it. Fails,
/// saying how to install it, when it is not there: a lane that cannot run
/// must not pass.
pub fn binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(BINARY_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY));
    if !path.is_file() {
        bail!(
            "the tansu broker is not at {} (set {BINARY_VAR}, or install it: \
             cargo install tansu --version {VERSION} --locked --features dynostore --root /opt/tansu-{VERSION})",
            path.display()
        );
    }
    Ok(path)
}

pub struct TansuBroker {
    child: Child,
    bootstrap: String,
    log: PathBuf,
    /// Keep the log when the broker is dropped (the caller's own folder).
    keep_log: bool,
}

impl TansuBroker {
    /// Starts `tansu broker` with in-memory storage on a free port, its
    /// output in `log`, and waits until it answers a metadata request.
    pub fn start(log: &Path) -> anyhow::Result<Self> {
        Self::start_with(&binary()?, log, true)
    }

    /// As [`start`](Self::start), with the log in the temp folder, removed
    /// when the broker is dropped unless the thread is panicking (a test
    /// that fails keeps it, and names it).
    pub fn start_temporary() -> anyhow::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "usage-worker-tansu-{}-{}.log",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        Self::start_with(&binary()?, &log, false)
    }

    fn start_with(binary: &Path, log: &Path, keep_log: bool) -> anyhow::Result<Self> {
        // A port taken by someone else between the probe and the broker's
        // bind makes the broker exit: try another.
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
            let url = format!("tcp://127.0.0.1:{port}");
            let mut cmd = Command::new(binary);
            cmd.arg("broker")
                .args(["--listener-url", &url])
                .args(["--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .args(["--cluster-id", "usage-worker-test"])
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file);
            // Its settings come from the command line only.
            for var in [
                "CLUSTER_ID",
                "LISTENER_URL",
                "ADVERTISED_LISTENER_URL",
                "STORAGE_ENGINE",
                "SCHEMA_REGISTRY",
                "DATA_LAKE",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ] {
                cmd.env_remove(var);
            }
            cmd.env("RUST_LOG", "warn");
            let child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
            let mut broker = Self {
                child,
                bootstrap: format!("127.0.0.1:{port}"),
                log: log.to_owned(),
                keep_log,
            };
            match broker.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return Ok(broker),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("an attempt"))
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let address = self.bootstrap.parse().expect("a socket address");
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("tansu exited at start ({status}): {}", self.log_tail(20));
            }
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("tansu did not listen on {} in {timeout:?}", self.bootstrap);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let client: BaseConsumer = self.client_config().create()?;
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        client
            .fetch_metadata(None, remaining)
            .with_context(|| format!("tansu on {} did not answer a metadata request", self.bootstrap))?;
        Ok(())
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap).set("log_level", "3");
        config
    }

    /// Creates the topics with CreateTopics (tansu has no automatic topic
    /// creation worth relying on); one that exists already is an error.
    pub async fn create_topics(&self, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
            .collect();
        for result in admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .context("creating topics on tansu")?
        {
            if let Err((topic, code)) = result {
                bail!("creating topic {topic} on tansu: {code}");
            }
        }
        // Each topic answers metadata with its partitions before it is used.
        let client: BaseConsumer = self.client_config().create()?;
        for topic in topics {
            let count = tokio::task::block_in_place(|| usage_worker::kafka::topics::partition_count(&client, topic))?;
            if count != Some(partitions) {
                bail!("topic {topic} on tansu has {count:?} partitions, not {partitions}");
            }
        }
        Ok(())
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("tansu broker log: {}", self.log.display());
        } else if !self.keep_log {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
