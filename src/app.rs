//! What the long-running commands start. `run`: the worker, with the HTTP
//! API beside it unless `http.enabled` is false. `serve`: the HTTP API alone,
//! without consuming `usage-events`; its creates and deletes still reach
//! `usage-results`, published from the outbox by the workers that own the
//! partitions. Both sample the gauges of `/metrics`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::BaseConsumer;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::config::Settings;
use crate::http::{self, Api, ApiConfig};
use crate::metrics::Metrics;
use crate::pipeline::sampler::Sampler;
use crate::{kafka, pipeline, store};

/// The worker and, when enabled, the HTTP API, until `shutdown` resolves or
/// either of them fails (which stops the other).
pub async fn run(
    settings: Settings,
    pool: PgPool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let counts = Arc::new(pipeline::DecisionCounts::default());
    let stop = Stop::on(shutdown);
    let metadata = metadata_client(&settings)?;
    let partitions = input_partitions(&settings, &metadata).await?;
    let mut pools = vec![("worker", pool.clone())];
    let mut api_task = None;
    let mut api_drain = Duration::ZERO;
    if settings.http.enabled {
        let listener = http::bind(&settings).await?;
        let api_pool = store::connect(&settings.database).await?;
        pools.push(("http", api_pool.clone()));
        let config = ApiConfig::from_settings(&settings, partitions, true);
        api_drain = config.limits.drain();
        let api = Arc::new(Api::new(api_pool, config, counts.metrics.clone()));
        api_task = Some(tokio::spawn(http::serve(listener, api, stop.wait())));
    }
    tokio::spawn(sampler(&settings, &counts.metrics, pools, partitions, metadata).run(stop.wait()));
    let worker = pipeline::run(settings, pool, counts, stop.wait());
    let Some(mut api_task) = api_task else {
        return worker.await;
    };
    tokio::pin!(worker);
    let (worker_result, api_result) = tokio::select! {
        result = &mut worker => {
            // Stopped by the signal, or failed: the API stops with it. It
            // bounds its own drain; the second more only guards against a
            // drain that does not end.
            stop.trigger();
            let api = tokio::time::timeout(api_drain + Duration::from_secs(1), &mut api_task)
                .await
                .context("the HTTP API did not stop in time");
            (result, api.and_then(joined))
        }
        api = &mut api_task => {
            // The API only ends on its own by failing: stop the worker too.
            stop.trigger();
            (worker.await, joined(api))
        }
    };
    worker_result.and(api_result)
}

/// The HTTP API alone, until `shutdown` resolves.
pub async fn serve(
    settings: Settings,
    pool: PgPool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let stop = Stop::on(shutdown);
    let listener = http::bind(&settings).await?;
    let metadata = metadata_client(&settings)?;
    let partitions = input_partitions(&settings, &metadata).await?;
    let metrics = Arc::new(Metrics::default());
    let pools = vec![("http", pool.clone())];
    tokio::spawn(sampler(&settings, &metrics, pools, partitions, metadata).run(stop.wait()));
    let api = Arc::new(Api::new(
        pool,
        ApiConfig::from_settings(&settings, partitions, false),
        metrics,
    ));
    http::serve(listener, api, stop.wait()).await
}

fn joined(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    result.context("the HTTP API task panicked")?
}

fn metadata_client(settings: &Settings) -> anyhow::Result<Arc<BaseConsumer>> {
    let client = kafka::reader_config(&settings.kafka, "metadata")
        .create()
        .context("creating the Kafka metadata client")?;
    Ok(Arc::new(client))
}

/// The partition count of `usage-events`: HTTP records go to one of as many
/// output partitions.
async fn input_partitions(settings: &Settings, metadata: &Arc<BaseConsumer>) -> anyhow::Result<i32> {
    let topic = settings.topics.usage_events.clone();
    let metadata = metadata.clone();
    tokio::task::spawn_blocking(move || {
        kafka::topics::partition_count(&metadata, &topic)?
            .with_context(|| format!("input topic {topic} does not exist"))
    })
    .await
    .context("reading the partition count")?
}

fn sampler(
    settings: &Settings,
    metrics: &Arc<Metrics>,
    pools: Vec<(&'static str, PgPool)>,
    partitions: i32,
    metadata: Arc<BaseConsumer>,
) -> Sampler {
    Sampler {
        metrics: metrics.clone(),
        pools,
        group: settings.kafka.group_id.clone(),
        topic: settings.topics.usage_events.clone(),
        partitions,
        metadata,
    }
}

/// One stop signal for every part of the process: the shutdown future, or
/// a part that failed.
#[derive(Clone)]
struct Stop(Arc<watch::Sender<bool>>);

impl Stop {
    fn on(shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        let stop = Self(Arc::new(watch::channel(false).0));
        let trigger = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            trigger.trigger();
        });
        stop
    }

    fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once the stop is triggered.
    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.0.subscribe();
        async move {
            let _ = receiver.wait_for(|stopped| *stopped).await;
        }
    }
}
