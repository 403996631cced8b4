//! `usage-lab kafka`: a Kafka mock cluster (librdkafka's, as the tests and
//! the bench use) with the service's topics, hosted until this process is
//! told to stop. Scripts that run `usage-worker` processes without a broker
//! of their own (scripts/schemathesis, scripts/rolling-deploy) start it
//! first; it outlives the workers they start and stop.

use std::io::Write;

use std::time::Duration;

use clap::Args;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use usage_worker::config::Settings;
use usage_worker::embedded::EmbeddedKafka;

#[derive(Args)]
pub struct KafkaArgs {
    /// Brokers of the mock cluster.
    #[arg(long, default_value_t = 1)]
    pub brokers: i32,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Publish a snapshot of an active subscription with this id (a current
    /// period around now, no limits) on the subscriptions topic; repeatable.
    #[arg(long = "subscription")]
    pub subscriptions: Vec<String>,
}

/// Starts the cluster, creates every topic of `settings.topics`, writes
/// its bootstrap servers as the first line on stdout, then waits for
/// SIGTERM or SIGINT.
pub async fn run(settings: Settings, args: KafkaArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let kafka = EmbeddedKafka::start(args.brokers)?;
    for topic in settings.topics.all() {
        kafka.create_topic(topic, args.partitions)?;
    }
    if !args.subscriptions.is_empty() {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .create()?;
        for id in &args.subscriptions {
            let snapshot = test_kit::active_subscription(id, None).to_string();
            producer
                .send(
                    BaseRecord::to(&settings.topics.subscriptions)
                        .key(id)
                        .payload(&snapshot),
                )
                .map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(10))?;
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", kafka.bootstrap_servers())?;
    stdout.flush()?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    drop(kafka);
    Ok(())
}
