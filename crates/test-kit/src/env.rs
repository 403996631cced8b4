//! One test's world: a PostgreSQL database and a Kafka cluster of its own
//! (librdkafka's embedded mock, or a tansu broker process), both gone when
//! the test ends, passing or failing; the worker and the HTTP API run
//! in-process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use serde_json::Value;
use sqlx::PgPool;
use usage_worker::config::Settings;
use usage_worker::embedded::{drop_database, ScratchDatabase};
use usage_worker::http::{self, Api, ApiConfig};
use usage_worker::kafka::producer::send_with_retry;
use usage_worker::metrics::Metrics;
use usage_worker::{pipeline, store};

use crate::cluster::{BrokerKind, Cluster};
use crate::topics::Reader;

pub const PARTITIONS: i32 = 4;

/// Every topic the worker reads or writes. The mock cluster does not
/// implement CreateTopics, so the harness creates them all.
pub const TOPICS: [&str; 7] = [
    "usage-events",
    "subscriptions",
    "invoice-events",
    "usage-results",
    "usage-alerts",
    "usage-events-dlq",
    "usage-periods",
];

/// The server the tests' databases are made on: `DATABASE_URL`, or the
/// local one.
pub fn base_database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The service's `config/` folder.
pub const CONFIG_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config");

/// One test's world: its own database and its own Kafka cluster.
pub struct TestEnv {
    pub kafka: Cluster,
    pub database_url: String,
    pub pool: PgPool,
    pub producer: ThreadedProducer<DefaultProducerContext>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

async fn drop_test_databases(url: &str) -> anyhow::Result<()> {
    let mut server = url::Url::parse(url)?;
    let name = server.path().trim_start_matches('/').to_owned();
    server.set_path("postgres");
    let admin = PgPool::connect(server.as_str()).await?;
    let beside: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
        .bind(format!("{name}_"))
        .fetch_all(&admin)
        .await?;
    admin.close().await;
    for database in beside.iter().chain([&name]) {
        let mut target = server.clone();
        target.set_path(database);
        drop_database(target.as_str()).await?;
    }
    Ok(())
}

/// A test's database goes with it, passing or failing (its connections,
/// a worker's included, are closed by the drop), and so do the databases a
/// test made beside it (named after it: `<name>_<what>`).
impl Drop for TestEnv {
    fn drop(&mut self) {
        let url = self.database_url.clone();
        // A runtime of its own: the test's may be shutting down.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(drop_test_databases(&url)))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}: {dropped:?}", self.database_url);
        }
    }
}

impl TestEnv {
    pub async fn start() -> Self {
        Self::start_with_partitions(PARTITIONS).await
    }

    pub async fn start_with_partitions(partitions: i32) -> Self {
        Self::start_on(BrokerKind::Mock, partitions).await
    }

    /// On tansu, with every topic of [`PARTITIONS`] partitions.
    pub async fn start_on_tansu() -> Self {
        Self::start_on(BrokerKind::Tansu, PARTITIONS).await
    }

    pub async fn start_on(kind: BrokerKind, partitions: i32) -> Self {
        // RUST_LOG=usage_worker=info shows the worker's logs in a failing test.
        usage_worker::telemetry::init(&usage_worker::config::LogSettings {
            format: usage_worker::config::LogFormat::Text,
            level: "off".into(),
        });
        let kafka = Cluster::start(kind, 1).expect("a Kafka cluster");
        kafka.create_topics(&TOPICS, partitions).await.expect("topics");
        let name = format!(
            "usage_worker_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            chrono::Utc::now().timestamp_micros()
        );
        let database = ScratchDatabase::create_named(&base_database_url(), &name)
            .await
            .expect("create database");
        let database_url = database.url().to_owned();
        let pool = PgPool::connect(&database_url).await.expect("connect");
        store::migrate(&pool).await.expect("migrate");
        let producer = ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .set("linger.ms", "1")
            .create()
            .expect("producer");
        Self {
            kafka,
            database_url,
            pool,
            producer,
        }
    }

    /// A further empty database, named after the test's
    /// (`<name>_<what>`), and dropped with it. Its URL.
    pub async fn database_beside(&self, what: &str) -> String {
        let name = url::Url::parse(&self.database_url).expect("the test's database URL");
        let name = format!("{}_{what}", name.path().trim_start_matches('/'));
        let database = ScratchDatabase::create_named(&base_database_url(), &name)
            .await
            .expect("create database");
        database.url().to_owned()
    }

    /// Settings for a worker of this environment (the `test` profile).
    pub fn settings(&self) -> Settings {
        Settings::load_from(&self.env_vars(CONFIG_DIR)).expect("settings")
    }

    pub fn env_vars(&self, config_dir: &str) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = vec![
            ("USAGE_WORKER_ENV".into(), "test".into()),
            ("USAGE_WORKER_CONFIG_DIR".into(), config_dir.into()),
            ("DATABASE_URL".into(), self.database_url.clone()),
            ("KAFKA_BOOTSTRAP_SERVERS".into(), self.kafka.bootstrap_servers().into()),
        ];
        if self.kafka.kind() == BrokerKind::Tansu {
            // tansu under-reports where a partition ends (docs/brokers.md).
            vars.push(("USAGE_WORKER__KAFKA__CONFIRM_PARTITION_ENDS".into(), "true".into()));
        }
        vars
    }

    /// Starts an in-process worker with these settings.
    pub async fn worker_with(&self, settings: Settings) -> Worker {
        let counts = Arc::new(pipeline::DecisionCounts::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let pool = store::connect(&settings.database).await.expect("pool");
        let task = tokio::spawn(pipeline::run(settings, pool, counts.clone(), async {
            let _ = stopped.await;
        }));
        Worker {
            stop: Some(stop),
            task: Some(task),
            counts,
        }
    }

    pub async fn worker(&self) -> Worker {
        self.worker_with(self.settings()).await
    }

    pub fn send(&self, topic: &str, key: Option<&str>, payload: Option<&[u8]>) {
        self.send_at(topic, None, key, payload);
    }

    pub fn send_at(&self, topic: &str, partition: Option<i32>, key: Option<&str>, payload: Option<&[u8]>) {
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = payload {
            record = record.payload(v);
        }
        send_with_retry(&self.producer, record, || std::thread::sleep(Duration::from_millis(5)))
            .unwrap_or_else(|e| panic!("sending to {topic}: {e}"));
    }

    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(10)).expect("flush");
    }

    /// Publishes a subscription snapshot, keyed by its id.
    pub fn subscription(&self, snapshot: Value) {
        let id = snapshot["id"].as_str().unwrap().to_owned();
        self.send("subscriptions", Some(&id), Some(snapshot.to_string().as_bytes()));
        self.flush();
    }

    /// Publishes a usage event keyed by its subscription id.
    pub fn usage(&self, event: Value) {
        let key = event["subscriptionId"].as_str().map(str::to_owned);
        self.send("usage-events", key.as_deref(), Some(event.to_string().as_bytes()));
    }

    pub fn results_reader(&self) -> Reader {
        Reader::new(self.kafka.bootstrap_servers(), "usage-results", PARTITIONS)
    }

    /// Polls a count query until it reaches `at_least` (panics after a minute).
    pub async fn wait_for_count(&self, sql: &str, at_least: i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.scalar_i64(sql).await < at_least {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {sql} to reach {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.expect(sql)
    }
}

/// An active subscription with a current period around now.
pub fn active_subscription(id: &str, hard_limit: Option<&str>) -> Value {
    let now = chrono::Utc::now();
    let mut limits = serde_json::Map::new();
    if let Some(limit) = hard_limit {
        limits.insert("hardLimit".into(), serde_json::from_str(limit).unwrap());
    }
    serde_json::json!({
        "id": id, "status": "active", "version": 1,
        "currentPeriodStartTime": (now - chrono::Duration::days(10)).to_rfc3339(),
        "currentPeriodEndTime": (now + chrono::Duration::days(20)).to_rfc3339(),
        "usageLimits": limits,
    })
}

pub struct Worker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub counts: Arc<pipeline::DecisionCounts>,
}

impl Worker {
    /// Asks the worker to shut down and returns its result.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task.take().unwrap())
            .await
            .expect("worker shut down in time")
            .expect("worker task")
    }

    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Polls `condition` until it holds (panics after a minute, naming `what`).
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The HTTP API on a free local port, served in a task until `shutdown`
/// (aborted when dropped).
pub struct ApiServer {
    pub addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl ApiServer {
    pub async fn start(pool: PgPool, config: ApiConfig, metrics: Arc<Metrics>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let api = Arc::new(Api::new(pool, config, metrics));
        let task = tokio::spawn(http::serve(listener, api, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The API alone (`serve`), with these settings, on [`PARTITIONS`].
    pub async fn serve(settings: &Settings) -> Self {
        let pool = store::connect(&settings.database).await.expect("pool");
        let config = ApiConfig::from_settings(settings, PARTITIONS, false);
        Self::start(pool, config, Arc::new(Metrics::default())).await
    }

    /// Stops it as SIGTERM would, and waits for it.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("the API stopped in time")
            .unwrap()
            .unwrap();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What the store needs to close periods, as a worker of the `test`
/// profile has it: a grace of an hour, records on `usage-periods` of
/// [`PARTITIONS`] partitions.
pub fn period_closing() -> usage_worker::store::PeriodClosing {
    usage_worker::pipeline::periods::PeriodOutput {
        topic: "usage-periods".into(),
        partitions: PARTITIONS,
        partitioner: usage_worker::config::Partitioner::Murmur2,
        grace: chrono::Duration::hours(1),
    }
    .closing()
}
