//! Dead letters: a record that can never be processed goes to `orderflow.dlq` with its
//! original key and bytes, and headers saying where it came from and why.
//!
//! Invariant: a dead letter is always writable — one too large with its headers is cut
//! to fit, and says so.

use rdkafka::message::{Headers, Message, OwnedMessage};

use super::dispatch::Outputs;
use super::outbox::Out;
use super::{Backend, Worker, dlq_headers};

impl<B: Backend> Worker<B> {
    /// Queues `m` for the DLQ, with headers saying where it came from and why. A record
    /// too large to be written with them is cut to fit (a header gives its original
    /// size): a dead letter must always be writable.
    pub(super) fn dead_letter(
        &self,
        m: &OwnedMessage,
        class: &str,
        message: &str,
        outs: &mut Outputs,
    ) {
        use dlq_headers::*;
        self.metrics
            .dead_lettered
            .with_label_values(&[self.name, class])
            .inc();
        tracing::warn!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            error_class = class,
            error = message,
            "dead-lettering record"
        );
        let mut message = message.to_owned();
        if message.len() > 4096 {
            let mut cut = 4096;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let mut headers: Vec<(String, Vec<u8>)> = vec![
            (SOURCE_TOPIC.into(), m.topic().as_bytes().to_vec()),
            (
                SOURCE_PARTITION.into(),
                m.partition().to_string().into_bytes(),
            ),
            (SOURCE_OFFSET.into(), m.offset().to_string().into_bytes()),
            (STAGE.into(), self.name.as_bytes().to_vec()),
            (ERROR_CLASS.into(), class.as_bytes().to_vec()),
            (ERROR_MESSAGE.into(), message.into_bytes()),
        ];
        if let Some(original) = m.headers() {
            for h in original.iter() {
                headers.push((h.key.to_owned(), h.value.unwrap_or_default().to_vec()));
            }
        }
        let dl = Out {
            topic: self.dlq.clone(),
            partition: m.partition(),
            key: m.key().unwrap_or_default().to_vec(),
            payload: Some(m.payload().unwrap_or_default().to_vec()),
            headers,
        };
        outs.entry(m.partition())
            .or_default()
            .push(fit(dl, self.settings.max_record_bytes));
    }
}

/// `out` cut to at most `limit` bytes: first the copied original headers go, then the
/// value is truncated; a header records the original value's size.
pub(super) fn fit(mut out: Out, limit: usize) -> Out {
    if out.size() <= limit {
        return out;
    }
    let original = out.payload.as_ref().map_or(0, Vec::len);
    // The runtime's own headers come first; the record's original headers follow them.
    out.headers.truncate(7.min(out.headers.len()));
    out.headers.push((
        dlq_headers::TRUNCATED.to_owned(),
        original.to_string().into_bytes(),
    ));
    let over = out.size().saturating_sub(limit);
    if let Some(p) = &mut out.payload {
        let keep = p.len().saturating_sub(over);
        p.truncate(keep);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_over_the_limit_is_cut_to_fit_and_says_so() {
        let out = Out {
            topic: "dlq".into(),
            partition: 0,
            key: b"store-1".to_vec(),
            payload: Some(vec![b'x'; 1_000_000]),
            headers: (0..10)
                .map(|i| (format!("h{i}"), vec![b'v'; 1_000]))
                .collect(),
        };
        let cut = fit(out, 900_000);
        assert!(cut.size() <= 900_000, "{}", cut.size());
        assert_eq!(
            cut.headers.last().map(|(k, v)| (k.as_str(), v.as_slice())),
            Some((dlq_headers::TRUNCATED, b"1000000".as_slice()))
        );
        assert!(cut.payload.unwrap().len() > 890_000);
    }

    #[test]
    fn a_dead_letter_within_the_limit_is_untouched() {
        let out = Out {
            topic: "dlq".into(),
            partition: 0,
            key: vec![],
            payload: Some(vec![1; 10]),
            headers: vec![],
        };
        assert_eq!(fit(out.clone(), 1_000), out);
    }
}
