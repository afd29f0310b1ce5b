//! What to do about an infrastructure error — decided here and nowhere else.
//!
//! Business failures are events and bad records are dead letters; what reaches this
//! module is the broker or the network misbehaving.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Transient: call the same operation again after a backoff.
    Retry,
    /// The batch cannot complete: abort it (if transactional), roll state back, seek the
    /// inputs to the last commit and process again.
    AbortAndRewind,
    /// The producer is unusable (fenced, fatal idempotence error): build a new one, then
    /// abort and rewind.
    RebuildProducer,
    /// This record can never be written as it is (too large for the broker): retrying
    /// cannot help, so it is dead-lettered (cut to fit) instead of blocking its partition.
    Permanent,
}

/// A schema registry that could not answer for a batch's schema IDs: the batch is
/// abandoned before anything of it is processed, read again and retried after a backoff —
/// its records are not bad, so never dead-lettered. What the registry did answer (an
/// unknown ID, an unusable schema) is the record's own fault and dead-letters it at
/// decoding.
pub fn of_registry(err: &crate::events::registry::RegistryError) -> Disposition {
    if err.is_transient() {
        Disposition::AbortAndRewind
    } else {
        Disposition::Permanent
    }
}

pub fn classify(err: &KafkaError) -> Disposition {
    match err {
        KafkaError::Transaction(e) => {
            if e.is_fatal() {
                Disposition::RebuildProducer
            } else if e.txn_requires_abort() {
                Disposition::AbortAndRewind
            } else if e.is_retriable() {
                Disposition::Retry
            } else {
                Disposition::AbortAndRewind
            }
        }
        other => match other.rdkafka_error_code() {
            Some(code) if is_fatal_code(code) => Disposition::RebuildProducer,
            Some(code) if is_permanent_code(code) => Disposition::Permanent,
            _ => Disposition::AbortAndRewind,
        },
    }
}

fn is_fatal_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fatal
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
    )
}

/// Errors about one record that no retry can change.
fn is_permanent_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidRecord
    )
}

/// Exponential backoff with full jitter: attempt 0 waits up to `base`, doubling to `cap`.
pub fn backoff(attempt: u32, base_ms: u64, cap_ms: u64) -> std::time::Duration {
    let ceiling = base_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(cap_ms)
        .max(1);
    std::time::Duration::from_millis(rand::random_range(ceiling / 2..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_rebuilds_and_production_errors_rewind() {
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert_eq!(classify(&fenced), Disposition::RebuildProducer);
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(classify(&timeout), Disposition::AbortAndRewind);
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(classify(&too_large), Disposition::Permanent);
    }

    #[test]
    fn an_unreachable_registry_rewinds_and_an_unknown_id_is_permanent() {
        use crate::events::registry::RegistryError;
        let url = "http://registry".to_string();
        let down = RegistryError::Unreachable {
            url: url.clone(),
            message: "connection refused".into(),
        };
        assert_eq!(of_registry(&down), Disposition::AbortAndRewind);
        let failing = RegistryError::Server {
            url: url.clone(),
            status: 503,
            body: String::new(),
        };
        assert_eq!(of_registry(&failing), Disposition::AbortAndRewind);
        let unknown = RegistryError::UnknownId { id: 9, url };
        assert_eq!(of_registry(&unknown), Disposition::Permanent);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..30 {
            let d = backoff(attempt, 100, 5_000).as_millis() as u64;
            let ceiling = (100u64 << attempt.min(20)).min(5_000);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d}");
        }
    }
}
