//! Keyed state of one partition: in memory, or on a local file with a bounded cache.
//!
//! A worker that holds every customer's velocity window and every open reservation in
//! its heap grows with traffic. So, as Kafka Streams keeps its stores in RocksDB, a
//! worker keeps the stage state and timers of each partition it owns in a local file
//! ([`Disk`], one per partition, deleted when the partition goes), and in memory only
//! what the current batch touched plus a bounded cache of recently used keys. The file
//! is a copy of the changelog, never a source of truth: it is filled by the restore,
//! written at each commit once the changelog batch is durable, and thrown away with the
//! partition. A crash loses nothing the changelog does not have.
//!
//! Invariant: the file holds exactly the committed values (the values of the last
//! durable changelog batch); everything a batch wrote and has not committed lives in
//! memory, in the cache, with its undo entry, so a rollback needs no file access.
//!
//! Without a file (the stages' unit tests, small partitions' side stores) the same type
//! keeps everything in memory.

use std::collections::BTreeSet;

// Keys are the stage's own (store, customer, SKU, order IDs), hashed on every access: a
// fast hasher, as they are not chosen by an adversary who could profit from collisions.
use foldhash::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

/// Changelog key (with its prefix) → the value as the changelog holds it (JSON).
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// Timers by due time: (due_at, changelog key) → nothing.
const DUE: TableDefinition<(i64, &str), ()> = TableDefinition::new("due");

/// Memory the file's page cache may take, per partition.
const PAGE_CACHE_BYTES: usize = 2 << 20;
/// Writes gathered before they go to the file in one transaction, while restoring.
const RESTORE_FLUSH_EVERY: usize = 20_000;
/// Commits between two that sync the file: the file is a cache of the changelog, so
/// syncing only bounds the bookkeeping the database keeps for unsynced commits.
const SYNC_EVERY: u32 = 256;

/// A local file failed. The file is a copy of the changelog, so nothing is lost, but the
/// worker cannot go on with a state it cannot read: it stops, and the partitions are
/// restored from their changelogs where it (or another worker) starts again.
fn fatal(path: &Path, what: &str, e: impl std::fmt::Display) -> ! {
    panic!(
        "local state file {}: {what} failed: {e}; the worker stops, and its partitions are \
         restored from their changelogs (check `state_dir` / ORDERFLOW_STATE_DIR: free \
         space, permissions)",
        path.display()
    )
}

/// This process's directory under `base`, created (with a held lock) on first use.
///
/// A worker killed outright never deletes its state files; the lock, which the system
/// releases when the process dies, tells the next worker on the machine that the
/// directory is an orphan, and it is removed then.
pub fn worker_dir(base: &Path) -> std::io::Result<PathBuf> {
    static DIRS: Mutex<Vec<(PathBuf, PathBuf, std::fs::File)>> = Mutex::new(Vec::new());
    let mut dirs = DIRS.lock().expect("state directory lock");
    if let Some((_, dir, _)) = dirs.iter().find(|(b, _, _)| b == base) {
        return Ok(dir.clone());
    }
    std::fs::create_dir_all(base)?;
    for entry in std::fs::read_dir(base)?.flatten() {
        let lock = entry.path().join("lock");
        if let Ok(file) = std::fs::File::open(&lock)
            && file.try_lock().is_ok()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = base.join(format!(
        "worker-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    let file = std::fs::File::create(dir.join("lock"))?;
    file.lock()?;
    dirs.push((base.to_owned(), dir.clone(), file));
    Ok(dir)
}

/// The state file of one partition. Deleted when dropped.
pub struct Disk {
    db: Database,
    path: PathBuf,
    /// Writes not yet in the file.
    pending: Mutex<Vec<Write>>,
    commits: Mutex<u32>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk").field("path", &self.path).finish()
    }
}

#[derive(Debug)]
struct Write {
    key: String,
    value: Option<Vec<u8>>,
    /// Due-index entries to remove and to add (timers only).
    old_due: Option<i64>,
    new_due: Option<i64>,
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Disk {
    /// Creates a fresh, empty state file in this process's directory under `base`
    /// ([`worker_dir`]), named after
    /// `name` and a random suffix so that two owners of one partition in one directory
    /// (a worker restoring a partition it still parks) never share a file.
    pub fn create(base: &Path, name: &str) -> std::io::Result<Arc<Disk>> {
        let dir = worker_dir(base)?;
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{safe}-{:016x}.redb", rand::random::<u64>()));
        let db = Database::builder()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(&path)
            .map_err(std::io::Error::other)?;
        let disk = Disk {
            db,
            path,
            pending: Mutex::new(Vec::new()),
            commits: Mutex::new(0),
        };
        let mut tx = disk.begin_write();
        {
            tx.open_table(KV)
                .unwrap_or_else(|e| fatal(&disk.path, "creating a table", e));
            tx.open_table(DUE)
                .unwrap_or_else(|e| fatal(&disk.path, "creating a table", e));
        }
        tx.set_durability(Durability::Immediate)
            .unwrap_or_else(|e| fatal(&disk.path, "a commit", e));
        tx.commit()
            .unwrap_or_else(|e| fatal(&disk.path, "a commit", e));
        Ok(Arc::new(disk))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn begin_write(&self) -> redb::WriteTransaction {
        self.db
            .begin_write()
            .unwrap_or_else(|e| fatal(&self.path, "starting a write", e))
    }

    /// Opens `table` for reading, queued writes included.
    fn read<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        table: TableDefinition<K, V>,
    ) -> redb::ReadOnlyTable<K, V> {
        self.flush();
        self.db
            .begin_read()
            .unwrap_or_else(|e| fatal(&self.path, "starting a read", e))
            .open_table(table)
            .unwrap_or_else(|e| fatal(&self.path, "opening a table", e))
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.read(KV)
            .get(key)
            .unwrap_or_else(|e| fatal(&self.path, "a read", e))
            .map(|v| v.value().to_vec())
    }

    /// Every committed entry whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in self
            .read(KV)
            .range(prefix..)
            .unwrap_or_else(|e| fatal(&self.path, "a read", e))
        {
            let (k, v) = entry.unwrap_or_else(|e| fatal(&self.path, "a read", e));
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        out
    }

    /// Keys (with their prefix) of committed timers due at or before `now`.
    fn due(&self, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        for entry in self
            .read(DUE)
            .range::<(i64, &str)>(..)
            .unwrap_or_else(|e| fatal(&self.path, "a read", e))
        {
            let (k, _) = entry.unwrap_or_else(|e| fatal(&self.path, "a read", e));
            let (due_at, key) = k.value();
            if due_at > now {
                break;
            }
            out.push(key.to_owned());
        }
        out
    }

    /// Queues a committed value (restore); written by the next [`Disk::flush`], or
    /// sooner when many are queued.
    pub fn put(&self, key: &str, value: Option<&[u8]>) {
        let full = {
            let mut pending = self.pending.lock().expect("state file lock");
            pending.push(Write {
                key: key.to_owned(),
                value: value.map(<[u8]>::to_vec),
                old_due: None,
                new_due: None,
            });
            pending.len() >= RESTORE_FLUSH_EVERY
        };
        if full {
            self.flush();
        }
    }

    /// The committed value of `key` as the changelog holds it, queued writes included.
    pub fn committed(&self, key: &str) -> Option<Vec<u8>> {
        self.get(key)
    }

    /// Checks every committed entry under `prefix` with `check` (after a restore wrote
    /// them with [`Disk::put`]) and returns how many there are.
    pub fn check_each<E>(
        &self,
        prefix: &str,
        mut check: impl FnMut(&str, &[u8]) -> Result<(), E>,
    ) -> Result<usize, E> {
        let entries = self.scan(prefix);
        for (k, v) in &entries {
            check(k, v)?;
        }
        Ok(entries.len())
    }

    /// Builds the due index of the timers under `prefix` (after a restore wrote them with
    /// [`Disk::put`]) and returns how many there are.
    pub fn index_timers<E>(
        &self,
        prefix: &str,
        mut due_at: impl FnMut(&str, &[u8]) -> Result<i64, E>,
    ) -> Result<usize, E> {
        let timers = self.scan(prefix);
        let mut index = Vec::with_capacity(timers.len());
        for (k, v) in &timers {
            index.push((due_at(k, v)?, k.as_str()));
        }
        let tx = self.begin_write();
        {
            let mut due = tx
                .open_table(DUE)
                .unwrap_or_else(|e| fatal(&self.path, "opening a table", e));
            for (at, k) in index {
                due.insert((at, k), ())
                    .unwrap_or_else(|e| fatal(&self.path, "a write", e));
            }
        }
        tx.commit()
            .unwrap_or_else(|e| fatal(&self.path, "a commit", e));
        Ok(timers.len())
    }

    /// Writes every queued write in one transaction.
    pub fn flush(&self) {
        let writes = std::mem::take(&mut *self.pending.lock().expect("state file lock"));
        if writes.is_empty() {
            return;
        }
        let mut tx = self.begin_write();
        {
            let mut kv = tx
                .open_table(KV)
                .unwrap_or_else(|e| fatal(&self.path, "opening a table", e));
            let mut due = tx
                .open_table(DUE)
                .unwrap_or_else(|e| fatal(&self.path, "opening a table", e));
            for w in &writes {
                match &w.value {
                    Some(v) => kv.insert(w.key.as_str(), v.as_slice()).map(drop),
                    None => kv.remove(w.key.as_str()).map(drop),
                }
                .unwrap_or_else(|e| fatal(&self.path, "a write", e));
                if let Some(at) = w.old_due {
                    due.remove((at, w.key.as_str()))
                        .unwrap_or_else(|e| fatal(&self.path, "a write", e));
                }
                if let Some(at) = w.new_due {
                    due.insert((at, w.key.as_str()), ())
                        .unwrap_or_else(|e| fatal(&self.path, "a write", e));
                }
            }
        }
        let sync = {
            let mut n = self.commits.lock().expect("state file lock");
            *n += 1;
            n.is_multiple_of(SYNC_EVERY)
        };
        let durability = if sync {
            Durability::Immediate
        } else {
            Durability::None
        };
        tx.set_durability(durability)
            .unwrap_or_else(|e| fatal(&self.path, "a commit", e));
        tx.commit()
            .unwrap_or_else(|e| fatal(&self.path, "a commit", e));
    }

    fn queue(&self, write: Write) {
        self.pending.lock().expect("state file lock").push(write);
    }
}

/// Where a store keeps what is not in memory.
#[derive(Debug, Clone)]
struct Backing<V> {
    disk: Arc<Disk>,
    /// The store's key prefix in the file (its changelog prefix).
    prefix: &'static str,
    /// A timer store's due time, for the due index.
    due: Option<fn(&V) -> i64>,
    /// Cached entries kept after a commit, at most.
    cache_entries: usize,
}

/// Keyed state of one partition. Every write is remembered twice: as a change for the
/// runtime to persist at commit, and as an undo entry so an aborted batch can be rolled
/// back without re-reading the changelog.
#[derive(Debug, Clone)]
pub struct Store<V> {
    /// In memory mode, every entry. With a file, the entries read or written recently:
    /// `None` is a key known to be absent (removed in this batch, or not in the file).
    map: HashMap<String, Option<V>>,
    /// Original values of keys written since the last commit (None: key was absent).
    undo: HashMap<String, Option<V>>,
    /// With a file: entries of the cache's previous generation, all of them committed and
    /// in the file. A key read again moves back into `map`; the rest go at the next turn.
    previous: HashMap<String, Option<V>>,
    /// With a file: keys whose committed value is in `map` only (the file is written back
    /// when the cache turns over, not at every commit), with the due time of the value the
    /// file holds (timers), to move its index entry.
    unwritten: HashMap<String, Option<i64>>,
    /// Keys to write to the changelog at the next commit.
    dirty: BTreeSet<String>,
    /// While one input is handled: each key it wrote, with its value before and whether
    /// it had been written earlier in the batch, so that input alone can be undone.
    savepoint: Option<Vec<(String, Option<V>, bool)>>,
    backing: Option<Backing<V>>,
    /// Entries in the store (in memory mode, `map` holds no `None`).
    len: usize,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Store {
            map: HashMap::default(),
            undo: HashMap::default(),
            previous: HashMap::default(),
            unwritten: HashMap::default(),
            dirty: BTreeSet::new(),
            savepoint: None,
            backing: None,
            len: 0,
        }
    }
}

impl<V: Clone + Serialize + DeserializeOwned> Store<V> {
    /// A store whose committed entries live in `disk` under `prefix` (already filled by
    /// the restore: `len` entries), with at most `cache_entries` kept in memory between
    /// batches.
    pub fn on_disk(
        disk: Arc<Disk>,
        prefix: &'static str,
        due: Option<fn(&V) -> i64>,
        len: usize,
        cache_entries: usize,
    ) -> Self {
        Store {
            backing: Some(Backing {
                disk,
                prefix,
                due,
                cache_entries,
            }),
            len,
            ..Store::default()
        }
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> V {
        serde_json::from_slice(bytes).unwrap_or_else(|e| {
            let b = self
                .backing
                .as_ref()
                .expect("only file entries are decoded");
            fatal(
                b.disk.path(),
                &format!("decoding {}{key}", b.prefix),
                format!("{e} (the file holds what the changelog held)"),
            )
        })
    }

    /// Makes sure `key` is in `map` when the store has a file.
    fn load(&mut self, key: &str) {
        let Some(b) = &self.backing else { return };
        if self.map.contains_key(key) {
            return;
        }
        if let Some((k, v)) = self.previous.remove_entry(key) {
            self.map.insert(k, v);
            return;
        }
        let value = b
            .disk
            .get(&format!("{}{key}", b.prefix))
            .map(|bytes| self.decode(key, &bytes));
        self.map.insert(key.to_owned(), value);
    }

    pub fn get(&mut self, key: &str) -> Option<&V> {
        self.load(key);
        self.map.get(key).and_then(Option::as_ref)
    }

    /// Reads a store kept wholly in memory without `&mut` (the runtime's small side
    /// stores: positions, recorded outcomes). Panics on a store with a file.
    pub fn peek(&self, key: &str) -> Option<&V> {
        assert!(
            self.backing.is_none(),
            "peek is for stores kept in memory; a store with a file is read with get"
        );
        self.map.get(key).and_then(Option::as_ref)
    }

    pub fn contains(&mut self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn current(&mut self, key: &str) -> Option<V> {
        self.get(key).cloned()
    }

    fn touch(&mut self, key: &str) {
        let before = self.current(key);
        if let Some(sp) = &mut self.savepoint
            && !sp.iter().any(|(k, _, _)| k == key)
        {
            sp.push((key.to_owned(), before.clone(), self.dirty.contains(key)));
        }
        if !self.undo.contains_key(key) {
            self.undo.insert(key.to_owned(), before);
        }
        self.dirty.insert(key.to_owned());
    }

    /// Sets `key` without recording anything (undo and restore paths).
    fn set(&mut self, key: String, value: Option<V>) {
        self.load(&key);
        let was = matches!(self.map.get(&key), Some(Some(_)));
        let is = value.is_some();
        if self.backing.is_none() && value.is_none() {
            self.map.remove(&key);
        } else {
            self.map.insert(key, value);
        }
        self.len = self.len + usize::from(is) - usize::from(was);
    }

    /// Mutable access; the key counts as written.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        if !self.contains(key) {
            return None;
        }
        self.touch(key);
        self.map.get_mut(key).and_then(Option::as_mut)
    }

    pub fn insert(&mut self, key: impl Into<String>, value: V) {
        let key = key.into();
        self.touch(&key);
        self.set(key, Some(value));
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let old = self.current(key)?;
        self.touch(key);
        self.set(key.to_owned(), None);
        Some(old)
    }

    /// Every entry whose key starts with `prefix`, in key order. With a file this reads
    /// every such committed entry: for periodic sweeps, not for each input.
    pub fn scan(&self, prefix: &str) -> Vec<(String, V)> {
        let mut out: std::collections::BTreeMap<String, V> = std::collections::BTreeMap::new();
        if let Some(b) = &self.backing {
            for (k, bytes) in b.disk.scan(&format!("{}{prefix}", b.prefix)) {
                let key = k[b.prefix.len()..].to_owned();
                if self.map.contains_key(&key) {
                    continue;
                }
                let v = self.decode(&key, &bytes);
                out.insert(key, v);
            }
        }
        for (k, v) in &self.map {
            if let Some(v) = v
                && k.starts_with(prefix)
            {
                out.insert(k.clone(), v.clone());
            }
        }
        out.into_iter().collect()
    }

    /// The entries due at or before `now` by `due_at`, in (due, key) order. With a file
    /// this reads the due index (kept by the same `due_at`), not every entry.
    pub fn due(&self, now: i64, due_at: fn(&V) -> i64) -> Vec<V> {
        let mut out: Vec<(i64, String, V)> = Vec::new();
        if let Some(b) = &self.backing {
            for full in b.disk.due(now) {
                let key = &full[b.prefix.len()..];
                if self.map.contains_key(key) {
                    continue;
                }
                if let Some(bytes) = b.disk.get(&full) {
                    let v = self.decode(key, &bytes);
                    out.push((due_at(&v), key.to_owned(), v));
                }
            }
        }
        for (k, v) in &self.map {
            if let Some(v) = v
                && due_at(v) <= now
            {
                out.push((due_at(v), k.clone(), v.clone()));
            }
        }
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        out.into_iter().map(|(_, _, v)| v).collect()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The writes since the last commit, as the changelog should record them. Nothing is
    /// forgotten until [`Store::commit`], so a batch whose write fails can still roll back.
    pub fn changes(&self) -> Vec<(String, Option<V>)> {
        self.dirty
            .iter()
            .map(|k| (k.clone(), self.map.get(k).cloned().flatten()))
            .collect()
    }

    /// The changes are durable: they become the values a rollback returns to. With a
    /// file, they are queued for it (written by [`Disk::flush`]) and the cache is
    /// trimmed.
    ///
    /// The file is written back: a committed value stays in memory only until the cache
    /// turns over (more than `cache_entries` entries), when every such value is queued
    /// for the file at once and the entries become the previous generation. Readers
    /// ([`Store::get`], [`Store::scan`], [`Store::due`]) always look in memory first, so
    /// they see the committed value either way; a crash loses only the file, which the
    /// changelog rebuilds.
    pub fn commit(&mut self) {
        if let Some(b) = &self.backing {
            for k in &self.dirty {
                if !self.unwritten.contains_key(k) {
                    // The value before this batch is the one the file holds.
                    let filed = self
                        .undo
                        .get(k)
                        .and_then(|v| v.as_ref())
                        .and_then(|v| b.due.map(|f| f(v)));
                    self.unwritten.insert(k.clone(), filed);
                }
            }
            if self.map.len() > b.cache_entries {
                for (k, old_due) in self.unwritten.drain() {
                    let new = self.map.get(&k).and_then(Option::as_ref);
                    b.disk.queue(Write {
                        key: format!("{}{k}", b.prefix),
                        value: new.map(|v| {
                            serde_json::to_vec(v).expect("state values serialize to JSON")
                        }),
                        old_due,
                        new_due: new.and_then(|v| b.due.map(|f| f(v))),
                    });
                }
                self.previous = std::mem::take(&mut self.map);
            }
        }
        self.undo.clear();
        self.dirty.clear();
    }

    /// Whether anything was written since the last commit.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Forgets every write since the last commit.
    pub fn rollback(&mut self) {
        let undo: Vec<(String, Option<V>)> = self.undo.drain().collect();
        for (k, v) in undo {
            self.set(k, v);
        }
        self.dirty.clear();
    }

    /// Starts remembering writes so that they can be undone by [`Store::undo_savepoint`]
    /// (one input's writes, when its outputs turn out unwritable).
    pub fn savepoint(&mut self) {
        self.savepoint = Some(Vec::new());
    }

    /// Keeps the writes since [`Store::savepoint`].
    pub fn release_savepoint(&mut self) {
        self.savepoint = None;
    }

    /// Undoes the writes since [`Store::savepoint`]; earlier writes of the batch stay.
    pub fn undo_savepoint(&mut self) {
        for (k, v, was_dirty) in self.savepoint.take().unwrap_or_default() {
            if !was_dirty {
                self.dirty.remove(&k);
                self.undo.remove(&k);
            }
            self.set(k, v);
        }
    }

    /// Loads a committed value (restore, in memory mode); not a change.
    pub fn load_committed(&mut self, key: String, value: Option<V>) {
        self.set(key, value);
    }

    /// Every entry, in key order (tests).
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (String, V)> {
        self.scan("").into_iter()
    }
}

#[cfg(test)]
mod tests;
