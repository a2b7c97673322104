//! A claimed message's bytes read back from `relay_body` while it is sent, never all at once.
//!
//! The chunks are rows of exactly [`CHUNK`] bytes (the last one shorter), so the rows holding
//! any range are known from its offsets. Delivery reads a message in order, in pieces that
//! need not fall on row boundaries: the last row fetched is kept, so each row crosses the
//! network once per pass (the 8-bit scan at claim, then the send) and at most two rows of a
//! message are in memory at a time.
//!
//! Rows never change once committed; rows that are gone (an operator deleted the message while
//! it was being sent) or of the wrong length are an error of that read, which ends the attempt
//! as a temporary failure, never a message cut short.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{CHUNK, PgError, PgStore, col, db};
use crate::spool::SpoolError;
use crate::spool::{BodySource, PieceFuture};

/// The rows of one committed message.
pub(super) struct PgBody {
    store: PgStore,
    id: String,
    /// The message's length in bytes (the rows hold exactly this many).
    size: u64,
    /// The last row fetched: its number and bytes.
    last: Mutex<Option<(i64, Bytes)>>,
}

impl PgBody {
    pub(super) fn new(store: PgStore, id: String, size: u64) -> PgBody {
        PgBody {
            store,
            id,
            size,
            last: Mutex::new(None),
        }
    }

    fn unreadable(&self, error: PgError) -> SpoolError {
        SpoolError::Unreadable {
            id: self.id.clone(),
            store: "the PostgreSQL queue",
            source: Box::new(error),
        }
    }

    fn corrupt(&self, problem: String) -> SpoolError {
        self.unreadable(PgError::Corrupt {
            id: self.id.clone(),
            problem,
        })
    }

    /// How long row `seq` must be.
    fn row_len(&self, seq: i64) -> u64 {
        let start = seq as u64 * CHUNK as u64;
        self.size.saturating_sub(start).min(CHUNK as u64)
    }

    /// Rows `first..=last`, checked; the one kept from the last read is not fetched again.
    async fn rows(&self, first: i64, last: i64) -> Result<Vec<(i64, Bytes)>, SpoolError> {
        let cached = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|(seq, _)| (first..=last).contains(seq));
        let skip = cached.as_ref().map_or(-1, |(seq, _)| *seq);
        let mut rows = if cached.is_some() && first == last {
            Vec::new()
        } else {
            self.fetch(first, last, skip).await?
        };
        rows.extend(cached);
        rows.sort_by_key(|(seq, _)| *seq);
        if rows.len() as i64 != last - first + 1 {
            return Err(self.corrupt(format!(
                "chunks {first}..={last} wanted, {} found (deleted while it was being sent?)",
                rows.len()
            )));
        }
        for (seq, bytes) in &rows {
            if bytes.len() as u64 != self.row_len(*seq) {
                return Err(self.corrupt(format!(
                    "chunk {seq} holds {} bytes, {} expected",
                    bytes.len(),
                    self.row_len(*seq)
                )));
            }
        }
        if let Some(row) = rows.last() {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(row.clone());
        }
        Ok(rows)
    }

    /// Rows `from..=to` but `skip`, in order.
    async fn fetch(&self, from: i64, to: i64, skip: i64) -> Result<Vec<(i64, Bytes)>, SpoolError> {
        let client = self.store.client().await.map_err(|e| self.unreadable(e))?;
        let found = client
            .query(
                "SELECT seq, chunk FROM relay_body
                  WHERE id = $1 AND seq BETWEEN $2 AND $3 AND seq <> $4 ORDER BY seq",
                &[&self.id, &(from as i32), &(to as i32), &(skip as i32)],
            )
            .await
            .map_err(|e| self.unreadable(db("read a message")(e)))?;
        let mut rows = Vec::with_capacity(found.len());
        for row in &found {
            let seq: i32 = col(row, 0).map_err(|e| self.unreadable(e))?;
            let bytes: &[u8] = col(row, 1).map_err(|e| self.unreadable(e))?;
            rows.push((i64::from(seq), Bytes::copy_from_slice(bytes)));
        }
        Ok(rows)
    }

    async fn read_range(&self, at: u64, n: usize) -> Result<Vec<u8>, SpoolError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let end = at + n as u64;
        if end > self.size {
            return Err(self.corrupt(format!(
                "bytes {at}..{end} asked of a message of {} bytes",
                self.size
            )));
        }
        let chunk = CHUNK as u64;
        let (first, last) = ((at / chunk) as i64, ((end - 1) / chunk) as i64);
        let mut out = Vec::with_capacity(n);
        for (seq, bytes) in self.rows(first, last).await? {
            let row_start = seq as u64 * chunk;
            let from = at.max(row_start) - row_start;
            let to = end.min(row_start + bytes.len() as u64) - row_start;
            out.extend_from_slice(&bytes[from as usize..to as usize]);
        }
        Ok(out)
    }
}

impl BodySource for PgBody {
    fn read(self: Arc<Self>, at: u64, n: usize) -> PieceFuture {
        Box::pin(async move { self.read_range(at, n).await })
    }

    fn describe(&self) -> String {
        format!("relay_body {}", self.id)
    }
}
