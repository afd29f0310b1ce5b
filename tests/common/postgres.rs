//! The PostgreSQL server that `scripts/test.sh` starts (a throwaway cluster on loopback,
//! trust authentication), and throwaway databases in it.
//!
//! Invariant: every database a test creates has a fresh random name and is dropped with
//! its guard; without `ORDERFLOW_TEST_POSTGRES_URL` a test panics, it never skips.
//!
//! The helpers shell out to `psql`, which the server's package brings along, so that
//! creating and dropping a database needs no async runtime (a guard drops it in `Drop`).

use std::path::PathBuf;
use std::process::Command;

use super::unique;

/// The database server every test that needs one runs against.
pub const POSTGRES_VAR: &str = "ORDERFLOW_TEST_POSTGRES_URL";

/// Where Debian's `postgresql-15` package puts its programs, for when `psql` is not on
/// `PATH`.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The URL of the test database server. Panics (never skips) when unset.
pub fn postgres_url() -> String {
    match std::env::var(POSTGRES_VAR) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{POSTGRES_VAR} is not set: this test needs a PostgreSQL server. Run it with \
             `bash scripts/test.sh`, which starts a throwaway cluster on a free loopback port \
             and exports {POSTGRES_VAR}; or export \
             {POSTGRES_VAR}=postgres://USER@127.0.0.1:PORT/postgres for a server of yours \
             where USER may create databases."
        ),
    }
}

/// `url` with its database (the last path segment) replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_at = base.find("://").map_or(0, |i| i + 3);
    let head = match base[authority_at..].find('/') {
        Some(slash) => &base[..authority_at + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{head}/{database}?{q}"),
        None => format!("{head}/{database}"),
    }
}

fn psql() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("psql").is_file()))
        .unwrap_or(false);
    if on_path {
        PathBuf::from("psql")
    } else {
        PathBuf::from(PG_BIN).join("psql")
    }
}

/// Runs one SQL command through `psql` against `url`; `Err` carries psql's message.
pub fn execute(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(psql())
        .args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("running {}: {e}", psql().display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "psql {sql:?} on {url} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A database of its own for one test, dropped (with any connections left to it) when
/// the guard is dropped.
pub struct TestDatabase {
    pub name: String,
    /// The URL of this database.
    pub url: String,
    server: String,
}

impl TestDatabase {
    /// Creates `<prefix>_<random>` on the test server.
    pub fn create(prefix: &str) -> TestDatabase {
        let server = postgres_url();
        let name = format!("{prefix}_{}", unique());
        execute(&server, &format!("CREATE DATABASE \"{name}\""))
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        let url = with_database(&server, &name);
        eprintln!("created database {name} ({url})");
        TestDatabase { name, url, server }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // `WITH (FORCE)` (PostgreSQL 13+) ends sessions a killed broker may have left.
        if let Err(e) = execute(
            &self.server,
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
        ) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// A PostgreSQL cluster of one test's own, for a test that stops and starts the server
/// (the shared server serves other tests meanwhile). initdb'd in a temporary directory,
/// trust authentication, loopback only, on a free port that it keeps across restarts;
/// stopped (by the postmaster's PID) and its directory deleted when dropped.
///
/// As root (the test machine), the server programs run as the `postgres` user, which
/// they insist on; otherwise as the current user.
pub struct PrivateCluster {
    dir: PathBuf,
    pub port: u16,
    /// The postmaster's PID while the server runs.
    pid: Option<u32>,
}

impl PrivateCluster {
    /// Creates and starts a cluster; its `postgres` database is at [`PrivateCluster::url`].
    pub fn start() -> PrivateCluster {
        let dir = std::env::temp_dir().join(format!("orderflow-pg-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        if as_root() {
            chown_postgres(&dir);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let mut cluster = PrivateCluster {
            dir,
            port,
            pid: None,
        };
        let data = cluster.data();
        let out = cluster
            .pg_command("initdb")
            .args(["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb in {} failed: {}",
            cluster.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.resume();
        cluster
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn pg_command(&self, program: &str) -> Command {
        let path = PathBuf::from(PG_BIN).join(program);
        if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path).current_dir("/");
            c
        } else {
            Command::new(path)
        }
    }

    /// Starts the (stopped) server and waits until it answers a query.
    pub fn resume(&mut self) {
        assert!(self.pid.is_none(), "the private cluster is running already");
        let log = self.dir.join("postgres.log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            self.port,
            self.dir.display()
        );
        let out = self
            .pg_command("pg_ctl")
            .args(["start", "-D", &self.data(), "-l", &log, "-w", "-t", "30"])
            .args(["-o", &options])
            .output()
            .expect("running pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}; log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            super::tail_file(std::path::Path::new(&log), 30)
        );
        let pid_file = self.dir.join("data").join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no PID in {}", pid_file.display()));
        self.pid = Some(pid);
        let deadline = super::deadline(30);
        while execute(&self.url(), "SELECT 1").is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the private cluster on port {} does not answer",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("private PostgreSQL (pid {pid}) on 127.0.0.1:{}", self.port);
    }

    /// Stops the server: SIGINT to the postmaster (fast shutdown: clients are
    /// disconnected, open transactions roll back), then waits until it is gone.
    pub fn stop(&mut self) {
        let Some(pid) = self.pid.take() else {
            return;
        };
        signal(pid, "INT");
        let deadline = super::deadline(30);
        while alive(pid) {
            if std::time::Instant::now() >= deadline {
                signal(pid, "KILL");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("stopped private PostgreSQL (pid {pid})");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_postgres(dir: &std::path::Path) {
    let status = Command::new("chown")
        .arg("postgres:")
        .arg(dir)
        .status()
        .expect("running chown");
    assert!(status.success(), "chown postgres: {}", dir.display());
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

/// Whether process `pid` exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
