//! Records to produce, and their compact binary form in the changelog's outbox.
//!
//! Under `at_least_once` a batch's outputs are written into the changelog with its state
//! and sent only once that is durable (see [`super::changelog`]). The outbox stores them
//! byte for byte — a re-send after a crash must be identical to the first send — in
//! chunks of at most [`CHUNK_BYTES`] (a larger record takes a chunk of its own), so no
//! changelog record is much larger than the largest output, which `max_record_bytes`
//! bounds.
//!
//! Format of a chunk: a sequence of records, each `topic`, `key`, `payload` (absent:
//! length `u32::MAX`), a `u16` header count and each header's name and value; strings
//! and byte strings are a big-endian `u32` length and the bytes.

/// One record to produce, to the partition of the input that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub topic: String,
    pub partition: i32,
    pub key: Vec<u8>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Out {
    /// Bytes the record takes on the wire, near enough to compare with the broker's limit.
    pub fn size(&self) -> usize {
        self.key.len()
            + self.payload.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + 64
    }
}

/// Records are packed into chunks of at most this size.
pub const CHUNK_BYTES: usize = 256 * 1024;

const ABSENT: u32 = u32::MAX;

fn put(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    buf.extend_from_slice(bytes);
}

fn encode_one(buf: &mut Vec<u8>, o: &Out) {
    put(buf, o.topic.as_bytes());
    put(buf, &o.key);
    match &o.payload {
        Some(p) => put(buf, p),
        None => buf.extend_from_slice(&ABSENT.to_be_bytes()),
    }
    buf.extend_from_slice(&(o.headers.len() as u16).to_be_bytes());
    for (k, v) in &o.headers {
        put(buf, k.as_bytes());
        put(buf, v);
    }
}

/// `outs` (all of one partition) as outbox chunks, in order.
pub fn chunks(outs: &[Out]) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut buf = Vec::new();
    for o in outs {
        // A record that would take the chunk past the limit starts a new one: a chunk is
        // never larger than the limit or its one record.
        if !buf.is_empty() && buf.len() + o.size() > CHUNK_BYTES {
            chunks.push(std::mem::take(&mut buf));
        }
        encode_one(&mut buf, o);
    }
    if !buf.is_empty() {
        chunks.push(buf);
    }
    chunks
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!(
                "outbox chunk ends early: {n} bytes wanted, {} left",
                self.bytes.len()
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn bytes(&mut self) -> Result<Option<&'a [u8]>, String> {
        match self.u32()? {
            ABSENT => Ok(None),
            n => self.take(n as usize).map(Some),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let b = self.bytes()?.ok_or("outbox string is absent")?;
        String::from_utf8(b.to_vec()).map_err(|e| format!("outbox string is not UTF-8: {e}"))
    }
}

/// The records of one chunk; `partition` is the changelog partition they belong to.
pub fn decode(chunk: &[u8], partition: i32) -> Result<Vec<Out>, String> {
    let mut r = Reader { bytes: chunk };
    let mut outs = Vec::new();
    while !r.bytes.is_empty() {
        let topic = r.string()?;
        let key = r.bytes()?.unwrap_or_default().to_vec();
        let payload = r.bytes()?.map(<[u8]>::to_vec);
        let n = r.u16()?;
        let mut headers = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let k = r.string()?;
            let v = r.bytes()?.unwrap_or_default().to_vec();
            headers.push((k, v));
        }
        outs.push(Out {
            topic,
            partition,
            key,
            payload,
            headers,
        });
    }
    Ok(outs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(i: usize, size: usize) -> Out {
        Out {
            topic: format!("t{i}"),
            partition: 3,
            key: format!("store-{i}").into_bytes(),
            payload: (!i.is_multiple_of(3)).then(|| vec![i as u8; size]),
            headers: vec![("event-type".into(), b"OrderScreened".to_vec())],
        }
    }

    #[test]
    fn chunks_decode_to_the_same_records_in_order() -> Result<(), String> {
        let outs: Vec<Out> = (0..50).map(|i| out(i, 20_000 + i)).collect();
        let chunks = chunks(&outs);
        assert!(chunks.len() > 1, "50 × 20 kB should need several chunks");
        assert!(
            chunks.iter().all(|c| c.len() <= CHUNK_BYTES),
            "no chunk passes the limit"
        );
        let mut back = Vec::new();
        for c in &chunks {
            back.extend(decode(c, 3)?);
        }
        assert_eq!(back, outs);
        Ok(())
    }

    #[test]
    fn a_record_larger_than_a_chunk_takes_one_of_its_own() -> Result<(), String> {
        let outs = vec![out(1, 1_000), out(2, 900_000), out(4, 1_000)];
        let chunks = chunks(&outs);
        assert_eq!(chunks.len(), 3);
        assert_eq!(decode(&chunks[1], 3)?, vec![outs[1].clone()]);
        Ok(())
    }

    #[test]
    fn a_truncated_chunk_is_an_error_not_a_short_read() {
        let c = chunks(&[out(1, 100)]).remove(0);
        assert!(decode(&c[..c.len() - 1], 3).is_err());
    }
}
