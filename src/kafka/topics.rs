//! Topic checks at start-up: the outputs need as many partitions as
//! `usage-events`, because what is decided from source partition p is
//! published to partition p.

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Partition count of a topic, or `None` when it does not exist.
pub fn partition_count(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Option<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .with_context(|| format!("fetching metadata of topic {topic}"))?;
    let Some(t) = metadata.topics().first() else {
        return Ok(None);
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Ok(None);
    }
    Ok(Some(t.partitions().len() as i32))
}

/// Makes sure the input exists and every output has its partition count,
/// creating missing outputs. Returns the partition count.
pub async fn ensure_outputs(config: &ClientConfig, input: &str, outputs: &[&str]) -> anyhow::Result<i32> {
    let consumer: BaseConsumer = config.create().context("creating metadata client")?;
    let (input_count, missing, wrong) = {
        let input_count = tokio::task::block_in_place(|| partition_count(&consumer, input))?
            .with_context(|| format!("input topic {input} does not exist"))?;
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        for topic in outputs {
            match tokio::task::block_in_place(|| partition_count(&consumer, topic))? {
                None => missing.push(*topic),
                Some(n) if n != input_count => wrong.push(format!("{topic} has {n}")),
                Some(_) => {}
            }
        }
        (input_count, missing, wrong)
    };
    if !wrong.is_empty() {
        bail!(
            "output topics must have as many partitions as {input} ({input_count}): {}",
            wrong.join(", ")
        );
    }
    if !missing.is_empty() {
        let admin: AdminClient<DefaultClientContext> = config.create().context("creating admin client")?;
        let topics: Vec<NewTopic> = missing
            .iter()
            .map(|t| NewTopic::new(t, input_count, TopicReplication::Fixed(1)))
            .collect();
        for result in admin
            .create_topics(&topics, &AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT)))
            .await
            .context("creating output topics")?
        {
            if let Err((topic, code)) = result {
                if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                    bail!("creating output topic {topic}: {code}");
                }
            }
        }
        tracing::info!(topics = ?missing, partitions = input_count, "created output topics");
    }
    Ok(input_count)
}
