//! Handing records to a producer, and the producer's own errors.

use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, DeliveryFuture, FutureProducer, FutureRecord, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::AsyncRuntime;
use tokio::sync::watch;

use crate::metrics::{KafkaClient, KafkaErrorKind, Metrics};

/// Counts a Kafka client's errors (`kafka_errors_total`) and logs them.
#[derive(Clone)]
pub struct ErrorCounter {
    pub client: KafkaClient,
    pub metrics: Arc<Metrics>,
}

impl ErrorCounter {
    /// An error from the client's error callback, a poll or a delivery.
    pub fn count(&self, error: &KafkaError) {
        let kind = error
            .rdkafka_error_code()
            .map_or(KafkaErrorKind::Other, KafkaErrorKind::of);
        self.metrics.kafka_error(self.client, kind);
    }
}

/// A producer's fatal error, once there is one: the producer can deliver
/// nothing more (librdkafka's idempotent producer has lost its sequence
/// state), and the worker exits so that the orchestrator restarts it.
pub type FatalError = Arc<watch::Sender<Option<String>>>;

/// The outcome producer's context: counts its errors and raises its fatal
/// error.
pub struct ProducerErrors {
    pub errors: ErrorCounter,
    pub fatal: FatalError,
}

impl ClientContext for ProducerErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.count(&error);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(error = %error, reason, "FATAL PRODUCER ERROR");
            self.fatal
                .send_replace(Some(format!("fatal producer error: {error}: {reason}")));
        } else {
            tracing::warn!(error = %error, reason, "producer error");
        }
    }
}

/// A producer's own send of a record `R`, which gives the record back when
/// the producer cannot take it.
pub trait Enqueue<R> {
    /// What a queued record turns into (its delivery, where there is one).
    type Queued;

    fn enqueue(&self, record: R) -> Result<Self::Queued, (KafkaError, R)>;
}

impl<'a, K, P, C> Enqueue<BaseRecord<'a, K, P, C::DeliveryOpaque>> for ThreadedProducer<C>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
    C: ProducerContext + 'static,
{
    type Queued = ();

    fn enqueue(
        &self,
        record: BaseRecord<'a, K, P, C::DeliveryOpaque>,
    ) -> Result<(), (KafkaError, BaseRecord<'a, K, P, C::DeliveryOpaque>)> {
        self.send(record)
    }
}

impl<'a, K, P, C, Rt> Enqueue<FutureRecord<'a, K, P>> for FutureProducer<C, Rt>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
    C: ClientContext + 'static,
    Rt: AsyncRuntime,
{
    type Queued = DeliveryFuture;

    fn enqueue(&self, record: FutureRecord<'a, K, P>) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)> {
        self.send_result(record)
    }
}

/// One attempt: the record is queued (`Ok(Ok)`), given back because the
/// producer's queue is full (`Ok(Err)`), or refused (`Err`).
fn try_enqueue<R, P: Enqueue<R>>(producer: &P, record: R) -> KafkaResult<Result<P::Queued, R>> {
    match producer.enqueue(record) {
        Ok(queued) => Ok(Ok(queued)),
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => Ok(Err(back)),
        Err((e, _)) => Err(e),
    }
}

/// Hands `record` to the producer, and while the producer's queue is full
/// calls `wait_for_room` and tries again: the queue empties as the brokers
/// acknowledge what it holds. Any other failure is returned.
pub fn send_with_retry<R, P: Enqueue<R>>(
    producer: &P,
    mut record: R,
    mut wait_for_room: impl FnMut(),
) -> KafkaResult<P::Queued> {
    loop {
        match try_enqueue(producer, record)? {
            Ok(queued) => return Ok(queued),
            Err(back) => {
                record = back;
                wait_for_room();
            }
        }
    }
}

/// As [`send_with_retry`], pausing without blocking the thread: for a task
/// that must stay cancellable (a shutdown deadline) while it waits for room.
pub async fn send_with_retry_async<R, P: Enqueue<R>>(
    producer: &P,
    mut record: R,
    pause: std::time::Duration,
) -> KafkaResult<P::Queued> {
    loop {
        match try_enqueue(producer, record)? {
            Ok(queued) => return Ok(queued),
            Err(back) => {
                record = back;
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// Full for its first `full` records, then refuses records longer than
    /// `max_len`.
    struct Producer {
        full: Cell<usize>,
        max_len: usize,
    }

    impl Enqueue<&'static str> for Producer {
        type Queued = usize;

        fn enqueue(&self, record: &'static str) -> Result<usize, (KafkaError, &'static str)> {
            if self.full.get() > 0 {
                self.full.set(self.full.get() - 1);
                return Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record));
            }
            if record.len() > self.max_len {
                return Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    record,
                ));
            }
            Ok(record.len())
        }
    }

    #[test]
    fn a_full_queue_is_waited_out() {
        let producer = Producer {
            full: Cell::new(2),
            max_len: 10,
        };
        let mut waits = 0;
        let queued = send_with_retry(&producer, "record", || waits += 1);
        assert_eq!((queued.unwrap(), waits), (6, 2));
    }

    #[test]
    fn other_failures_are_returned_without_waiting() {
        let producer = Producer {
            full: Cell::new(0),
            max_len: 3,
        };
        let failed = send_with_retry(&producer, "record", || panic!("only a full queue is waited out"));
        assert!(failed.is_err());
    }
}
