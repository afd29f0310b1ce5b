//! Server-Sent Events that follow the read side: both live streams (an order's events,
//! a store's alert changes) poll their table for rows after the last one sent.
//!
//! Invariant: a row is sent once, in its table's order, and its position is the stream's
//! event ID, so a client that reconnects with `Last-Event-ID` resumes right after it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;

use super::ApiState;
use crate::sql::SqlError;

/// Streams what `read(state, after)` returns — rows after position `after`, each with its
/// position and the event to send — until the API shuts down. When a read returns `full`
/// rows more are waiting and the next read follows at once; otherwise the stream waits the
/// options' `stream_poll` first. A failed read is logged as `what` and tried again.
pub(crate) fn follow<F, Fut>(
    state: ApiState,
    after: i64,
    full: Option<usize>,
    what: &'static str,
    read: F,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>>
where
    F: Fn(ApiState, i64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<(i64, SseEvent)>, SqlError>> + Send,
{
    struct Cursor<F> {
        state: ApiState,
        read: F,
        after: i64,
        pending: VecDeque<SseEvent>,
        wait: bool,
    }
    let cursor = Cursor {
        state,
        read,
        after,
        pending: VecDeque::new(),
        wait: false,
    };
    let stream = futures::stream::unfold(cursor, move |mut c| async move {
        loop {
            if let Some(event) = c.pending.pop_front() {
                return Some((Ok(event), c));
            }
            if c.wait {
                let shutdown = c.state.inner.shutdown.clone();
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(c.state.options().stream_poll) => {}
                }
            }
            match (c.read)(c.state.clone(), c.after).await {
                Ok(rows) => {
                    c.wait = full.is_none_or(|n| rows.len() < n);
                    for (at, event) in rows {
                        c.after = c.after.max(at);
                        c.pending.push_back(event);
                    }
                }
                Err(e) => {
                    c.wait = true;
                    tracing::warn!(error = %e, "reading {what} for an event stream");
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
