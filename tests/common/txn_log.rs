//! What a partition's log says about transactions, read straight off the wire: every
//! record batch with its producer ID and transactional flag, and every transaction marker
//! (commit or abort) with the producer it ends, from a `Fetch` at `read_uncommitted`.
//!
//! A broker that hands aborted records to read_committed readers (the transactional test
//! broker, see [`super::txn_broker`]) still writes the markers that decide them, so a test
//! can tell, record by record, what a correct broker would have shown a read_committed
//! reader: a transactional record is committed when the next marker of its producer on
//! its partition is a commit, aborted when it is an abort, and still open when there is
//! none yet. That is Kafka's own rule (KIP-98); librdkafka applies it only with the
//! aborted-transaction list the broker sends in its fetch answer, which this broker leaves
//! empty. Tests use it to check their assertions on the records a correct broker would
//! deliver, and to count the leaked ones instead of letting them pass unnoticed.
//!
//! Only what the test brokers send is decoded: `Fetch` v4 (record batches of magic 2,
//! uncompressed — the workers do not compress).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// What became of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Written outside any transaction.
    Plain,
    Committed,
    Aborted,
    /// Its producer has written no marker on this partition since.
    Open,
}

/// The fate of every record of some partitions of one topic, by (partition, offset).
#[derive(Debug, Default)]
pub struct TxnLog {
    pub fates: HashMap<(i32, i64), Fate>,
    /// Transaction markers read, per kind.
    pub commits: usize,
    pub aborts: usize,
    /// Per committed record, the timestamp of the commit marker that decided it (its
    /// batch's max timestamp, as the broker wrote it; ms since the epoch).
    pub commit_ts: HashMap<(i32, i64), i64>,
}

impl TxnLog {
    pub fn fate(&self, partition: i32, offset: i64) -> Option<Fate> {
        self.fates.get(&(partition, offset)).copied()
    }

    /// The records a correct broker hides from read_committed readers: aborted ones and
    /// those of transactions still open.
    pub fn hidden(&self) -> HashSet<(i32, i64)> {
        self.fates
            .iter()
            .filter(|(_, f)| matches!(f, Fate::Aborted | Fate::Open))
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn count(&self, fate: Fate) -> usize {
        self.fates.values().filter(|f| **f == fate).count()
    }
}

/// Reads partitions `0..partitions` of `topic` from the beginning to their end on the
/// broker at `brokers` (`host:port`, its only broker) and decides every record's fate.
pub fn scan(brokers: &str, topic: &str, partitions: i32) -> TxnLog {
    let addr = brokers.split(',').next().unwrap_or(brokers).trim();
    let mut conn = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut log = TxnLog::default();
    let mut correlation = 0;
    for p in 0..partitions {
        // Transactional records not yet decided, per producer ID.
        let mut pending: HashMap<i64, Vec<i64>> = HashMap::new();
        let mut batches: BTreeMap<i64, Batch> = BTreeMap::new();
        let mut next = 0;
        loop {
            correlation += 1;
            let got = fetch(&mut conn, correlation, topic, p, next)
                .unwrap_or_else(|e| panic!("fetching {topic}[{p}] at {next} from {addr}: {e}"));
            let Some(last) = got.iter().map(|b| b.last_offset).max() else {
                break;
            };
            for b in got {
                batches.insert(b.base_offset, b);
            }
            if last < next {
                break;
            }
            next = last + 1;
        }
        for b in batches.into_values() {
            if b.control {
                // A control record's key: version (i16), then type: 0 abort, 1 commit.
                let commit = match b.control_type {
                    Some(1) => true,
                    Some(0) => false,
                    other => panic!("{topic}[{p}]: unknown control record type {other:?}"),
                };
                if commit {
                    log.commits += 1;
                } else {
                    log.aborts += 1;
                }
                for o in pending.remove(&b.producer_id).unwrap_or_default() {
                    if commit {
                        log.commit_ts.insert((p, o), b.max_timestamp);
                    }
                    log.fates.insert(
                        (p, o),
                        if commit {
                            Fate::Committed
                        } else {
                            Fate::Aborted
                        },
                    );
                }
            } else if b.transactional {
                pending
                    .entry(b.producer_id)
                    .or_default()
                    .extend(b.offsets.iter().copied());
            } else {
                for o in b.offsets {
                    log.fates.insert((p, o), Fate::Plain);
                }
            }
        }
        for o in pending.into_values().flatten() {
            log.fates.insert((p, o), Fate::Open);
        }
    }
    log
}

/// One record batch as far as transactions go.
#[derive(Debug)]
struct Batch {
    base_offset: i64,
    last_offset: i64,
    producer_id: i64,
    /// The batch's max timestamp (a control batch's: when the marker was written).
    max_timestamp: i64,
    transactional: bool,
    control: bool,
    /// The type of a control batch's record.
    control_type: Option<i16>,
    offsets: Vec<i64>,
}

const FETCH: i16 = 1;
const FETCH_VERSION: i16 = 4;
const READ_UNCOMMITTED: i8 = 0;

fn fetch(
    conn: &mut TcpStream,
    correlation: i32,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Vec<Batch>, String> {
    let mut body = Vec::new();
    body.extend(FETCH.to_be_bytes());
    body.extend(FETCH_VERSION.to_be_bytes());
    body.extend(correlation.to_be_bytes());
    put_str(&mut body, "orderflow-test-txn-log");
    body.extend((-1i32).to_be_bytes()); // replica ID: a consumer
    body.extend(100i32.to_be_bytes()); // max wait (ms)
    body.extend(0i32.to_be_bytes()); // min bytes: answer at once
    body.extend((16 * 1024 * 1024i32).to_be_bytes()); // max bytes
    body.push(READ_UNCOMMITTED as u8);
    body.extend(1i32.to_be_bytes()); // one topic
    put_str(&mut body, topic);
    body.extend(1i32.to_be_bytes()); // one partition
    body.extend(partition.to_be_bytes());
    body.extend(offset.to_be_bytes());
    body.extend((8 * 1024 * 1024i32).to_be_bytes());
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend(body);
    conn.write_all(&frame).map_err(|e| e.to_string())?;

    let mut len = [0u8; 4];
    conn.read_exact(&mut len).map_err(|e| e.to_string())?;
    let mut resp = vec![0u8; i32::from_be_bytes(len) as usize];
    conn.read_exact(&mut resp).map_err(|e| e.to_string())?;
    let mut r = Reader { b: &resp, at: 0 };
    let got = r.i32()?;
    if got != correlation {
        return Err(format!("answer to request {got}, expected {correlation}"));
    }
    r.i32()?; // throttle time
    let mut batches = Vec::new();
    for _ in 0..r.i32()? {
        r.string()?;
        for _ in 0..r.i32()? {
            r.i32()?; // partition
            let error = r.i16()?;
            if error != 0 {
                return Err(format!("error code {error}"));
            }
            r.i64()?; // high watermark
            r.i64()?; // last stable offset
            let aborted = r.i32()?;
            for _ in 0..aborted.max(0) {
                r.i64()?;
                r.i64()?;
            }
            let size = r.i32()?;
            if size <= 0 {
                continue;
            }
            let records = r.take(size as usize)?;
            batches.extend(batches_in(records)?);
        }
    }
    Ok(batches)
}

/// The complete record batches in a fetch answer's records (the last one may be cut).
fn batches_in(mut b: &[u8]) -> Result<Vec<Batch>, String> {
    let mut out = Vec::new();
    while b.len() >= 12 {
        let base_offset = i64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        let length = i32::from_be_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
        if b.len() < 12 + length {
            break;
        }
        let mut r = Reader {
            b: &b[12..12 + length],
            at: 0,
        };
        r.i32()?; // partition leader epoch
        let magic = r.take(1)?[0];
        if magic != 2 {
            return Err(format!("record batch of magic {magic}"));
        }
        r.i32()?; // CRC
        let attributes = r.i16()?;
        if attributes & 0x07 != 0 {
            return Err("a compressed record batch".into());
        }
        let last_delta = r.i32()?;
        r.i64()?; // base timestamp
        let max_timestamp = r.i64()?;
        let producer_id = r.i64()?;
        r.i16()?; // producer epoch
        r.i32()?; // base sequence
        let count = r.i32()?;
        let control = attributes & 0x20 != 0;
        let mut offsets = Vec::with_capacity(count.max(0) as usize);
        let mut control_type = None;
        for _ in 0..count {
            let len = r.varint()?;
            let mut rec = Reader {
                b: r.take(len as usize)?,
                at: 0,
            };
            rec.take(1)?; // attributes
            rec.varint()?; // timestamp delta
            let delta = rec.varint()?;
            offsets.push(base_offset + delta);
            let key_len = rec.varint()?;
            if control && key_len >= 4 {
                let key = rec.take(key_len as usize)?;
                control_type = Some(i16::from_be_bytes([key[2], key[3]]));
            }
        }
        out.push(Batch {
            base_offset,
            last_offset: base_offset + i64::from(last_delta),
            producer_id,
            max_timestamp,
            transactional: attributes & 0x10 != 0,
            control,
            control_type,
            offsets,
        });
        b = &b[12 + length..];
    }
    Ok(out)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as i16).to_be_bytes());
    out.extend(s.as_bytes());
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or_else(|| format!("answer cut short at byte {}", self.at))?;
        self.at += n;
        Ok(s)
    }

    fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<&'a [u8], String> {
        let n = self.i16()?;
        self.take(n.max(0) as usize)
    }

    /// A zigzag varint, as record fields are encoded.
    fn varint(&mut self) -> Result<i64, String> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
            }
        }
        Err("varint too long".into())
    }
}
