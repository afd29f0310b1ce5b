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
