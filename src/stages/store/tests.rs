use super::*;

/// The same store in memory and on a file whose cache keeps nothing between batches, so
/// that every read after a commit comes from the file.
fn stores() -> Vec<(&'static str, Store<i32>)> {
    let dir = std::env::temp_dir().join("orderflow-store-tests");
    let disk = Disk::create(&dir, "test").expect("creating a state file");
    vec![
        ("memory", Store::default()),
        ("file", Store::on_disk(disk, "s/", None, 0, 0)),
    ]
}

#[test]
fn rollback_restores_values_and_forgets_changes() {
    for (mode, mut s) in stores() {
        s.insert("a", 1);
        s.insert("b", 2);
        assert_eq!(s.changes().len(), 2, "{mode}");
        s.commit();
        s.insert("a", 10);
        s.remove("b");
        s.insert("c", 3);
        *s.get_mut("a").unwrap() += 1;
        assert_eq!(s.len(), 2, "{mode}");
        s.rollback();
        assert_eq!(s.get("a"), Some(&1), "{mode}");
        assert_eq!(s.get("b"), Some(&2), "{mode}");
        assert_eq!(s.get("c"), None, "{mode}");
        assert_eq!(s.len(), 2, "{mode}");
        assert!(!s.has_changes(), "{mode}");
    }
}

#[test]
fn a_savepoint_undoes_one_inputs_writes_and_keeps_the_batchs() {
    for (mode, mut s) in stores() {
        s.insert("a", 1);
        s.insert("b", 2);
        s.commit();
        s.insert("a", 10); // earlier in the batch
        s.savepoint();
        s.insert("a", 11);
        s.insert("b", 20);
        s.insert("c", 30);
        s.undo_savepoint();
        assert_eq!(s.get("a"), Some(&10), "{mode}");
        assert_eq!(s.get("b"), Some(&2), "{mode}");
        assert_eq!(s.get("c"), None, "{mode}");
        assert_eq!(s.changes(), vec![("a".to_string(), Some(10))], "{mode}");
        s.rollback();
        assert_eq!(s.get("a"), Some(&1), "{mode}");
    }
}

#[test]
fn changes_carry_deletes_as_none() {
    for (mode, mut s) in stores() {
        s.insert("a", 1);
        s.commit();
        assert_eq!(s.remove("a"), Some(1), "{mode}");
        assert_eq!(s.remove("a"), None, "{mode}");
        assert_eq!(s.changes(), vec![("a".to_string(), None)], "{mode}");
        s.commit();
        assert_eq!(s.get("a"), None, "{mode}");
        assert!(s.is_empty(), "{mode}");
    }
}

#[test]
fn committed_values_survive_the_cache_and_uncommitted_ones_never_reach_the_file() {
    let dir = std::env::temp_dir().join("orderflow-store-tests");
    let disk = Disk::create(&dir, "cache").expect("creating a state file");
    let mut s: Store<i32> = Store::on_disk(disk.clone(), "s/", None, 0, 2);
    for i in 0..10 {
        s.insert(format!("k{i}"), i);
    }
    s.commit();
    // The cache was over its bound: trimmed, every value is read back from the file.
    assert_eq!(s.map.len(), 0);
    assert_eq!(s.get("k7"), Some(&7));
    assert_eq!(disk.committed("s/k7"), Some(b"7".to_vec()));
    s.insert("k7", 70);
    s.remove("k8");
    assert_eq!(disk.committed("s/k7"), Some(b"7".to_vec()));
    assert_eq!(disk.committed("s/k8"), Some(b"8".to_vec()));
    // A scan sees the batch's writes over the file's values.
    let keys: Vec<(String, i32)> = s
        .scan("k")
        .into_iter()
        .filter(|(k, _)| k < &"k9".to_string())
        .collect();
    assert_eq!(keys.len(), 8);
    assert!(keys.contains(&("k7".to_string(), 70)));
    assert!(!keys.iter().any(|(k, _)| k == "k8"));
    s.commit();
    // Written back: the file keeps the older values until the cache turns over, and the
    // store reads its own.
    assert_eq!(disk.committed("s/k7"), Some(b"7".to_vec()));
    assert_eq!(s.get("k7"), Some(&70));
    assert_eq!(s.get("k8"), None);
    assert_eq!(s.scan("k8"), vec![]);
    // Reading more keys than the cache holds turns it over at the next commit: then the
    // file holds the committed values, and the store still reads them.
    for i in 0..3 {
        assert_eq!(s.get(&format!("k{i}")), Some(&i));
    }
    s.commit();
    assert_eq!(disk.committed("s/k7"), Some(b"70".to_vec()));
    assert_eq!(disk.committed("s/k8"), None);
    assert_eq!(s.get("k7"), Some(&70));
    assert_eq!(s.len(), 9);
    let path = disk.path().to_owned();
    assert!(path.exists());
    drop(s);
    drop(disk);
    assert!(!path.exists(), "the file goes with the partition");
}

#[test]
fn due_entries_come_from_the_index_and_the_batch_in_due_order() {
    let due_at: fn(&i32) -> i64 = |v| i64::from(*v);
    let dir = std::env::temp_dir().join("orderflow-store-tests");
    // A restore writes raw values, then indexes them.
    let restored = |name: &str, cache_entries: usize| {
        let disk = Disk::create(&dir, name).expect("creating a state file");
        disk.put("t/r1", Some(b"5"));
        disk.put("t/r2", Some(b"50"));
        disk.put("s/other", Some(b"1"));
        let n = disk
            .index_timers("t/", |_, b| {
                std::str::from_utf8(b).map_err(drop)?.parse().map_err(drop)
            })
            .expect("timer values are numbers");
        assert_eq!(n, 2);
        Store::<i32>::on_disk(disk, "t/", Some(due_at), n, cache_entries)
    };
    // Turned over at every commit, and written back only when four entries are cached.
    let mut file = restored("due", 0);
    let mut written_back = restored("due-lazy", 3);
    let mut memory: Store<i32> = Store::default();
    memory.insert("r1", 5);
    memory.insert("r2", 50);
    memory.commit();
    for (mode, s) in [
        ("file", &mut file),
        ("written back", &mut written_back),
        ("memory", &mut memory),
    ] {
        assert_eq!(s.due(10, due_at), vec![5], "{mode}");
        // Rescheduled in this batch: the index's old entry no longer counts.
        s.insert("r1", 20);
        s.insert("r3", 7);
        assert_eq!(s.due(10, due_at), vec![7], "{mode}");
        s.commit();
        assert_eq!(s.due(10, due_at), vec![7], "{mode}");
        assert_eq!(s.due(30, due_at), vec![7, 20], "{mode}");
        s.remove("r3");
        assert_eq!(s.due(30, due_at), vec![20], "{mode}");
        s.rollback();
        assert_eq!(s.due(100, due_at), vec![7, 20, 50], "{mode}");
        assert_eq!(s.len(), 3, "{mode}");
        // A fourth cached entry turns the cache over: the index entries move with the
        // values written back (r1 from 5 to 20, r3 new), and nothing is due twice.
        s.insert("r4", 60);
        assert_eq!(s.get("r2"), Some(&50), "{mode}");
        s.commit();
        assert_eq!(s.due(100, due_at), vec![7, 20, 50, 60], "{mode}");
        assert_eq!(s.due(10, due_at), vec![7], "{mode}");
        assert_eq!(s.len(), 4, "{mode}");
    }
    assert!(written_back.map.is_empty(), "the cache turned over");
}

#[test]
fn an_orphaned_worker_directory_is_removed_and_a_live_one_kept() {
    let base = std::env::temp_dir().join(format!("orderflow-worker-dirs-{}", std::process::id()));
    let orphan = base.join("worker-1-dead");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::File::create(orphan.join("lock")).unwrap();
    std::fs::write(orphan.join("x.redb"), b"left by a killed worker").unwrap();
    let live = base.join("worker-2-live");
    std::fs::create_dir_all(&live).unwrap();
    let held = std::fs::File::create(live.join("lock")).unwrap();
    held.lock().unwrap();
    let mine = worker_dir(&base).unwrap();
    assert!(!orphan.exists(), "an unlocked directory's owner is gone");
    assert!(
        live.exists(),
        "a locked directory belongs to a running worker"
    );
    assert_eq!(
        worker_dir(&base).unwrap(),
        mine,
        "one directory per process"
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&base);
}
