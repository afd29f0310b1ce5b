//! A nisshi broker that one test owns, so that it can kill the broker and start it again
//! on the same address with the same storage (the shared broker of `scripts/test.sh`
//! must never go away under other tests).
//!
//! Invariant: the broker process is stopped by its PID when the guard is dropped, also
//! when the test panics; every start waits until the broker answers a metadata request
//! and fails loudly, with the broker's log, when it does not.
//!
//! With a `postgres://` storage engine nisshi keeps every record, group and offset across
//! a restart, and creates its schema in an empty database itself.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::{plain_config, tail_file, test_log_dir};

/// How long a start may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A nisshi broker process on a loopback port of its own.
pub struct OwnedBroker {
    pub port: u16,
    /// The `--storage-engine` URL; the same on every start, so records survive restarts.
    pub storage: String,
    pub log_path: PathBuf,
    child: Option<Child>,
    /// How many times the broker was started.
    pub starts: u32,
}

impl OwnedBroker {
    /// Starts `nisshi broker` on a free loopback port with `storage`, logging to
    /// `target/test-logs/<name>-broker.log`.
    pub fn start(name: &str, storage: &str) -> OwnedBroker {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port");
            l.local_addr().expect("local address").port()
        };
        let dir = test_log_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let log_path = dir.join(format!("{name}-broker.log"));
        File::create(&log_path).unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let mut broker = OwnedBroker {
            port,
            storage: storage.to_owned(),
            log_path,
            child: None,
            starts: 0,
        };
        broker.spawn();
        broker
    }

    /// Bootstrap servers for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown, whatever the broker had not written to its storage is lost.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "killed broker (pid {pid}) on port {} with SIGKILL",
                self.port
            );
        }
    }

    /// Starts the broker again on the same port with the same storage (after a
    /// [`kill9`](Self::kill9); a running broker is killed first).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Panics with the log tail if the broker exited on its own.
    pub fn assert_alive(&mut self) {
        let Some(child) = self.child.as_mut() else {
            panic!("the broker is not running (killed and not restarted)");
        };
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the broker exited unexpectedly with {status}; log {}:\n{}",
                self.log_path.display(),
                tail_file(&self.log_path, 40)
            );
        }
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log_path.display()));
        let _ = writeln!(log, "---- start {} of the broker ----", self.starts);
        let log2 = log.try_clone().expect("clone log file handle");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let started = Instant::now();
        let child = Command::new("nisshi")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &self.storage])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting `nisshi broker`: {e}. Is nisshi installed and on PATH? \
                     `bash scripts/test.sh` installs it (cargo install nisshi)."
                )
            });
        eprintln!(
            "started broker (pid {}) on {url}, storage {}, log {}",
            child.id(),
            self.storage,
            self.log_path.display()
        );
        self.child = Some(child);
        self.wait_ready(started);
    }

    /// Waits until the broker answers a metadata request.
    fn wait_ready(&mut self, started: Instant) {
        let client: BaseConsumer = plain_config(&self.brokers())
            .create()
            .expect("metadata client");
        loop {
            self.assert_alive();
            if client.fetch_metadata(None, Duration::from_secs(1)).is_ok() {
                eprintln!(
                    "broker on port {} ready after {:.1}s",
                    self.port,
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "the broker did not answer on port {} within {START_TIMEOUT:?}; log {}:\n{}",
                self.port,
                self.log_path.display(),
                tail_file(&self.log_path, 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for OwnedBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
