//! The deployment files checked with the real tools, and the dashboards and rules checked
//! against a running deployment.
//!
//! - `docker-compose config -q` accepts `docker-compose.yml`, which has a service per
//!   stage group; `kubernetes-validate --strict` accepts every manifest of `deploy/k8s/`
//!   (and refuses a broken one, so the check can fail); every Deployment has probes on
//!   the health endpoints and resource requests.
//! - `promtool check config`, `check rules` and `test rules` pass on `deploy/prometheus/`.
//! - On the test broker: a worker process running every stage, another running the SQL
//!   sinks on PostgreSQL, `orderflow api`, the mock gateway and `orderflow load` traffic
//!   (plus records the fraud stage dead-letters and some API requests), scraped by a real
//!   Prometheus that loads the rule files. Every PromQL expression of the operations
//!   dashboard and of the rules (recording rules as they are; alerts by each compared
//!   operand) must return data through Prometheus's HTTP API, every metric name they use
//!   must be one OrderFlow exports, and every SQL query of the business dashboard, its
//!   Grafana macros and `$store` expanded, must return rows with the columns Grafana
//!   needs from the tables the sinks filled.
//!
//! The tools come from the environment that `scripts/test.sh` sets up
//! (`ORDERFLOW_TEST_PROMETHEUS`, `ORDERFLOW_TEST_PROMTOOL`, `ORDERFLOW_TEST_DOCKER_COMPOSE`,
//! `ORDERFLOW_TEST_KUBERNETES_VALIDATE`); without them the tests panic, never skip.

mod common;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pipeline::worker_env;
use common::postgres::TestDatabase;
use common::{Outgoing, TestEnv};
use orderflow::gateway::server::{Gateway, GatewayConfig, serve_gateway};
use orderflow::topics;
use serde_json::Value;
use sqlx::{Column, Row, TypeInfo, ValueRef};
use tokio_util::sync::CancellationToken;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The program a tool variable names. Panics (never skips) when unset.
fn tool(var: &str) -> PathBuf {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => PathBuf::from(v),
        _ => panic!(
            "{var} is not set: the deployment checks run the real tools. Run them with \
             `bash scripts/test.sh`, which installs Prometheus, docker-compose and \
             kubernetes-validate and exports ORDERFLOW_TEST_PROMETHEUS, \
             ORDERFLOW_TEST_PROMTOOL, ORDERFLOW_TEST_DOCKER_COMPOSE and \
             ORDERFLOW_TEST_KUBERNETES_VALIDATE; or export {var}=/path/to/the/program."
        ),
    }
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", program.display()))
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} exited with {}:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

// ---------------------------------------------------------------------------------------
// Static checks

#[test]
fn compose_file_is_valid_and_runs_every_part() {
    let compose = tool("ORDERFLOW_TEST_DOCKER_COMPOSE");
    let out = run(
        &compose,
        &["-f", "docker-compose.yml", "config", "-q"],
        root(),
    );
    assert_ok("docker-compose config -q", &out);
    let out = run(
        &compose,
        &[
            "-f",
            "docker-compose.yml",
            "--profile",
            "load",
            "config",
            "--services",
        ],
        root(),
    );
    assert_ok("docker-compose config --services", &out);
    let services: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    for s in [
        "redpanda",
        "postgres",
        "init",
        "fraud",
        "inventory",
        "payment",
        "fulfillment",
        "delivery",
        "sinks",
        "api",
        "gateway",
        "load",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains(s), "no service {s} in {services:?}");
    }
    // The file Prometheus scrapes names every worker service.
    let prom = std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml"))
        .expect("reading prometheus.yml");
    for s in [
        "fraud",
        "inventory",
        "payment",
        "fulfillment",
        "delivery",
        "sinks",
    ] {
        let names = prom
            .lines()
            .find_map(|l| l.trim().strip_prefix("- names: ["))
            .expect("a DNS discovery of the worker services in prometheus.yml");
        assert!(
            names.trim_end_matches(']').split(", ").any(|n| n == s),
            "prometheus.yml does not scrape the {s} service: {names}"
        );
    }
}

#[test]
fn kubernetes_manifests_validate_offline() {
    let validate = tool("ORDERFLOW_TEST_KUBERNETES_VALIDATE");
    let dir = root().join("deploy/k8s");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("reading deploy/k8s")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "expected the manifests, found {files:?}");
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(String::as_str));
    let out = run(&validate, &args, &dir);
    assert_ok("kubernetes-validate --strict deploy/k8s/*.yaml", &out);

    // The validator does refuse what Kubernetes would refuse.
    let tmp = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(
        tmp.path().join("broken.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replica: 2\n",
    )
    .expect("writing a broken manifest");
    let out = run(&validate, &["--strict", "broken.yaml"], tmp.path());
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted a Deployment with an unknown field"
    );

    // Every workload has probes and resources; every worker Deployment probes the
    // endpoints `orderflow run` serves, and every Deployment has a disruption budget.
    let mut deployments = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(dir.join(f)).expect("reading a manifest");
        for doc in text.split("\n---") {
            if !doc.contains("\nkind: Deployment") {
                continue;
            }
            let name = doc
                .split("\nmetadata:\n  name: ")
                .nth(1)
                .and_then(|r| r.lines().next())
                .unwrap_or_else(|| panic!("a Deployment without a name in {f}"))
                .to_owned();
            for needle in ["readinessProbe:", "livenessProbe:", "requests:", "limits:"] {
                assert!(doc.contains(needle), "{f}: {name} has no {needle}");
            }
            if doc.contains("\"run\", \"--stages\"") {
                assert!(doc.contains("path: /health/ready"), "{name}");
                assert!(doc.contains("path: /health/live"), "{name}");
            }
            deployments.push(name);
        }
    }
    for stage_group in [
        "fraud",
        "inventory",
        "payment",
        "fulfillment",
        "delivery",
        "sinks",
    ] {
        assert!(
            deployments.contains(&format!("orderflow-{stage_group}")),
            "no Deployment for {stage_group} in {deployments:?}"
        );
    }
    let pdb = std::fs::read_to_string(dir.join("pdb.yaml")).expect("reading pdb.yaml");
    for d in deployments.iter().filter(|d| d.starts_with("orderflow-")) {
        assert!(
            pdb.contains(&format!("name: {d}\n")),
            "no PodDisruptionBudget for {d}"
        );
    }
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    let promtool = tool("ORDERFLOW_TEST_PROMTOOL");
    let dir = root().join("deploy/prometheus");
    assert_ok(
        "promtool check config prometheus.yml",
        &run(&promtool, &["check", "config", "prometheus.yml"], &dir),
    );
    let rules = rule_files();
    let mut args = vec!["check", "rules"];
    args.extend(rules.iter().map(String::as_str));
    assert_ok("promtool check rules", &run(&promtool, &args, &dir));
    let tests: Vec<String> = std::fs::read_dir(dir.join("tests"))
        .expect("reading deploy/prometheus/tests")
        .map(|e| {
            format!(
                "tests/{}",
                e.expect("an entry").file_name().to_string_lossy()
            )
        })
        .filter(|n| n.ends_with(".yml"))
        .collect();
    assert!(!tests.is_empty(), "no rule unit tests");
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let out = run(&promtool, &args, &dir);
    assert_ok("promtool test rules", &out);

    // Every alert has a unit test.
    let test_text: String = tests
        .iter()
        .map(|t| std::fs::read_to_string(dir.join(t)).expect("reading a rule test"))
        .collect();
    for rule_file in &rules {
        let text = std::fs::read_to_string(dir.join(rule_file)).expect("reading rules");
        for line in text.lines() {
            if let Some(alert) = line.trim().strip_prefix("- alert: ") {
                assert!(
                    test_text.contains(&format!(
                        "alertname: {alert}\n        exp_alerts:\n          - exp_labels:"
                    )),
                    "alert {alert} has no unit test in which it fires"
                );
            }
        }
    }
}

/// Each dashboard's panels, targets and variables use a data source that Grafana's
/// provisioning file defines, of the dashboard's one kind; and Grafana's provisioning
/// loads dashboards from where docker-compose mounts them.
#[test]
fn dashboards_use_the_provisioned_data_sources() {
    let provisioning = std::fs::read_to_string(
        root().join("deploy/grafana/provisioning/datasources/orderflow.yml"),
    )
    .expect("reading the data source provisioning");
    // (uid, type) of every provisioned data source.
    let mut provisioned = BTreeSet::new();
    let mut uid = None;
    for line in provisioning.lines().map(str::trim) {
        if let Some(u) = line.strip_prefix("uid: ") {
            uid = Some(u.to_owned());
        }
        if let Some(t) = line.strip_prefix("type: ") {
            let u = uid.take().expect("a data source's uid before its type");
            provisioned.insert((u, t.to_owned()));
        }
    }
    assert_eq!(provisioned.len(), 2, "{provisioned:?}");
    for (file, kind) in [
        ("orderflow-operations.json", "prometheus"),
        ("orderflow-business.json", "grafana-postgresql-datasource"),
    ] {
        let dash = dashboard(file);
        let mut refs = vec![dash["templating"]["list"][0]["datasource"].clone()];
        for p in dash["panels"].as_array().expect("panels") {
            refs.push(p["datasource"].clone());
            for t in p["targets"].as_array().expect("targets") {
                refs.push(t["datasource"].clone());
            }
        }
        for r in refs {
            let pair = (
                r["uid"].as_str().unwrap_or_default().to_owned(),
                r["type"].as_str().unwrap_or_default().to_owned(),
            );
            assert_eq!(pair.1, kind, "{file}: a data source of another kind: {r}");
            assert!(
                provisioned.contains(&pair),
                "{file}: data source {r} is not provisioned ({provisioned:?})"
            );
        }
        let uids: BTreeSet<_> = dash["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .map(|p| p["id"].as_i64().expect("a panel id"))
            .collect();
        assert_eq!(
            uids.len(),
            dash["panels"].as_array().map_or(0, Vec::len),
            "{file}: panel ids repeat"
        );
    }
    let providers = std::fs::read_to_string(
        root().join("deploy/grafana/provisioning/dashboards/orderflow.yml"),
    )
    .expect("reading the dashboard provisioning");
    let compose =
        std::fs::read_to_string(root().join("docker-compose.yml")).expect("docker-compose.yml");
    assert!(providers.contains("path: /var/lib/grafana/dashboards"));
    assert!(compose.contains("./deploy/grafana/dashboards:/var/lib/grafana/dashboards"));
    assert!(compose.contains("./deploy/grafana/provisioning:/etc/grafana/provisioning"));
}

/// Every `ORDERFLOW_*` variable the deployment files set is a setting the README
/// documents (a misspelt one would be ignored silently).
#[test]
fn deployment_files_set_documented_settings_only() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let mut checked = 0;
    for file in [
        "docker-compose.yml",
        "Dockerfile",
        "deploy/k8s/configmap.yaml",
        "deploy/k8s/workers.yaml",
        "deploy/k8s/api.yaml",
        "deploy/k8s/init-job.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).expect("a deployment file");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("ORDERFLOW_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            assert!(
                readme.contains(&format!("`{name}`")) || readme.contains(&format!("`{name}=")),
                "{file} sets {name}, which README.md does not document"
            );
            checked += 1;
            rest = &rest[at + name.len()..];
        }
    }
    assert!(checked > 20, "only {checked} settings found");
}

/// The rule files, relative to `deploy/prometheus`.
fn rule_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(root().join("deploy/prometheus/rules"))
        .expect("reading deploy/prometheus/rules")
        .map(|e| {
            format!(
                "rules/{}",
                e.expect("an entry").file_name().to_string_lossy()
            )
        })
        .filter(|n| n.ends_with(".yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no rule files");
    files
}

// ---------------------------------------------------------------------------------------
// Processes of the live check

/// A child process killed (and reaped) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited with {status}; log {}:\n{}",
                self.name,
                self.log.display(),
                common::tail_file(&self.log, 40)
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn log_file(env: &TestEnv, name: &str) -> (PathBuf, std::fs::File) {
    let dir = common::test_log_dir();
    std::fs::create_dir_all(&dir).expect("creating the test log directory");
    let path = dir.join(format!(
        "{}-{name}.log",
        env.settings.topic_prefix.trim_end_matches('.')
    ));
    let f = std::fs::File::create(&path).expect("creating a log file");
    (path, f)
}

/// `orderflow <args>` with only the given `ORDERFLOW_*` variables.
fn orderflow(env: &TestEnv, args: &[&str], vars: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ORDERFLOW_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .env("ORDERFLOW_BROKERS", &env.settings.brokers)
        .env("ORDERFLOW_TOPIC_PREFIX", &env.settings.topic_prefix)
        .env("ORDERFLOW_GUARANTEE", env.settings.guarantee.to_string())
        .env("RUST_LOG", "info,rdkafka=warn,sqlx=warn")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null());
    cmd
}

fn http_get(url: &str, store: Option<&str>) -> (u16, String) {
    common::block_on(async {
        let mut req = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(10));
        if let Some(s) = store {
            req = req.header("X-Store-ID", s);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    })
}

/// Prometheus on a free port, scraping `workers` and `api` every second and evaluating
/// the repository's rule files.
struct Prometheus {
    proc: Proc,
    base: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(env: &TestEnv, workers: &[String], api: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let rules: Vec<String> = rule_files()
            .iter()
            .map(|f| format!("      - {:?}", root().join("deploy/prometheus").join(f)))
            .collect();
        let targets: Vec<String> = workers.iter().map(|w| format!("{w:?}")).collect();
        // The scrape jobs carry the names the rules and dashboards expect.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\n\
             scrape_configs:\n\
             \x20 - job_name: orderflow-workers\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: orderflow-api\n    static_configs:\n      - targets: [{api:?}]\n",
            rules.join("\n").replace("      - ", "  - "),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, &config).expect("writing prometheus.yml");
        let port = free_port();
        let (log, f) = log_file(env, "prometheus");
        let child = Command::new(tool("ORDERFLOW_TEST_PROMETHEUS"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("a log handle"))
            .stderr(f)
            .spawn()
            .expect("spawning prometheus");
        eprintln!(
            "prometheus pid {} on 127.0.0.1:{port}, log {}",
            child.id(),
            log.display()
        );
        let mut proc = Proc {
            name: "prometheus",
            child,
            log,
        };
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            proc.assert_alive();
            if http_get(&format!("{base}/-/ready"), None).0 == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Prometheus {
            proc,
            base,
            _dir: dir,
        }
    }

    /// `GET /api/v1/<path>` with query parameters; the `data` of a successful answer.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/{path}", self.base), params)
            .expect("a valid URL");
        let (status, body) = http_get(url.as_str(), None);
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {status}: {} {}", v["errorType"], v["error"]));
        }
        Ok(v["data"].clone())
    }

    /// Evaluates `expr` now: `Ok(samples)` (instant vector or scalar), or the error.
    fn query(&self, expr: &str) -> Result<Vec<(String, String)>, String> {
        let data = self.api("query", &[("query", expr)])?;
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .expect("a result array")
                .iter()
                .map(|s| {
                    (
                        s["metric"].to_string(),
                        s["value"][1].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()),
            Some("scalar") => Ok(vec![(
                "scalar".into(),
                data["result"][1].as_str().unwrap_or("").to_owned(),
            )]),
            other => Err(format!("unexpected result type {other:?}")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// PromQL helpers

/// Dashboard variables as the test expands them (Grafana's built-ins; `$stage` is "All").
fn expand_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("$stage", ".*")
}

/// `expr` split at its top-level `and`, `or` and `unless`, each operand without a
/// vector-matching modifier (`on (...)`, `ignoring (...)`) and without a comparison with
/// a number at its end: the signals an alert compares.
fn alert_signals(expr: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut start = 0;
    let chars: Vec<(usize, char)> = expr.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => quote = Some(c),
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                _ if depth == 0 => {
                    for op in [" and ", " or ", " unless ", "\nand ", "\nor ", "\nunless "] {
                        if expr[at..].starts_with(op) {
                            parts.push(expr[start..at].to_owned());
                            start = at + op.len();
                            i = expr[..start].chars().count() - 1;
                            break;
                        }
                    }
                }
                _ => {}
            },
        }
        i += 1;
    }
    parts.push(expr[start..].to_owned());
    parts
        .into_iter()
        .map(|p| {
            let mut p = p.trim().to_owned();
            for modifier in ["on", "ignoring"] {
                if let Some(rest) = p.strip_prefix(modifier) {
                    let rest = rest.trim_start();
                    if rest.starts_with('(') {
                        let close = rest.find(')').expect("a closing parenthesis");
                        p = rest[close + 1..].trim().to_owned();
                    }
                }
            }
            // A trailing `<op> <number>` at the top level.
            for op in [">=", "<=", "==", "!=", ">", "<"] {
                if let Some(pos) = p.rfind(op) {
                    let (lhs, rhs) = (&p[..pos], p[pos + op.len()..].trim());
                    let balanced = lhs.matches('(').count() == lhs.matches(')').count()
                        && lhs.matches('{').count() == lhs.matches('}').count();
                    if balanced && rhs.parse::<f64>().is_ok() {
                        p = lhs.trim().to_owned();
                        break;
                    }
                }
            }
            p
        })
        .collect()
}

/// Metric names (`orderflow_*`) an expression uses, without histogram suffixes.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("orderflow_") {
        let s = i + pos;
        let preceded = s > 0
            && (bytes[s - 1].is_ascii_alphanumeric()
                || bytes[s - 1] == b'_'
                || bytes[s - 1] == b':');
        let mut e = s;
        while e < bytes.len() && (bytes[e].is_ascii_alphanumeric() || bytes[e] == b'_') {
            e += 1;
        }
        let followed = e < bytes.len() && bytes[e] == b':';
        if !preceded && !followed {
            let mut n = &expr[s..e];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(stripped) = n.strip_suffix(suffix) {
                    n = stripped;
                }
            }
            names.insert(n.to_owned());
        }
        i = e;
    }
    names
}

fn dashboard(name: &str) -> Value {
    let path = root().join("deploy/grafana/dashboards").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// `(panel title, target)` of every target of every panel.
fn targets(dash: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap_or("?").to_owned();
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "panel {title} has no targets");
        for t in targets {
            out.push((title.clone(), t.clone()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// SQL helpers

/// The dashboard's time range, as Grafana hands it to macros.
struct Range {
    from_ms: i64,
    to_ms: i64,
}

fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("a valid time")
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// Grafana's PostgreSQL macros and variables, expanded as its data source does:
/// `$__timeFilter(c)`, `$__timeFrom()`, `$__timeTo()`, `$__unixEpochFrom()`,
/// `$__unixEpochTo()`, `$__timeGroup(c, i)`, `$__timeGroupAlias(c, i)`, `$__interval`,
/// `$__interval_ms` (one minute here) and `$store`.
fn expand_sql(sql: &str, range: &Range, store: &str) -> String {
    let interval_secs = 60;
    let mut s = sql
        .replace("$__interval_ms", &(interval_secs * 1000).to_string())
        .replace("$__interval", &format!("{interval_secs}s"))
        .replace("$__timeFrom()", &format!("'{}'", rfc3339_ms(range.from_ms)))
        .replace("$__timeTo()", &format!("'{}'", rfc3339_ms(range.to_ms)))
        .replace("$__unixEpochFrom()", &(range.from_ms / 1000).to_string())
        .replace("$__unixEpochTo()", &(range.to_ms / 1000).to_string())
        .replace("$store", store);
    // Macros with arguments.
    for (name, alias) in [
        ("$__timeGroupAlias(", true),
        ("$__timeGroup(", false),
        ("$__timeFilter(", false),
    ] {
        while let Some(at) = s.find(name) {
            let args_at = at + name.len();
            let close = args_at
                + s[args_at..]
                    .find(')')
                    .expect("a macro's closing parenthesis");
            let args: Vec<String> = s[args_at..close]
                .split(',')
                .map(|a| a.trim().to_owned())
                .collect();
            let expansion = if name == "$__timeFilter(" {
                format!(
                    "{} BETWEEN '{}' AND '{}'",
                    args[0],
                    rfc3339_ms(range.from_ms),
                    rfc3339_ms(range.to_ms)
                )
            } else {
                let secs: i64 = args
                    .get(1)
                    .and_then(|a| a.trim_matches('\'').strip_suffix('s'))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("an interval in seconds in {}", &s[at..=close]));
                let group = format!("floor(extract(epoch from {})/{secs})*{secs}", args[0]);
                if alias {
                    format!("{group} AS \"time\"")
                } else {
                    group
                }
            };
            s.replace_range(at..=close, &expansion);
        }
    }
    assert!(
        !s.contains('$'),
        "a macro or variable left unexpanded in:\n{s}"
    );
    s
}

fn is_numeric(type_name: &str) -> bool {
    matches!(
        type_name,
        "INT2" | "INT4" | "INT8" | "FLOAT4" | "FLOAT8" | "NUMERIC"
    )
}

/// Runs a business-dashboard query and checks its result is what its panel format
/// needs; `Err` says what is missing.
async fn check_sql(pool: &sqlx::PgPool, format: &str, sql: &str) -> Result<usize, String> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(pool)
        .await
        .map_err(|e| format!("the query fails: {e}"))?;
    let Some(first) = rows.first() else {
        return Err("no rows".into());
    };
    let columns: Vec<(String, String)> = first
        .columns()
        .iter()
        .map(|c| (c.name().to_owned(), c.type_info().name().to_owned()))
        .collect();
    let names: BTreeSet<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    if names.len() != columns.len() || names.contains("?column?") {
        return Err(format!("unnamed or repeated columns: {columns:?}"));
    }
    if format == "time_series" {
        let (_, time_type) = columns
            .iter()
            .find(|(n, _)| n == "time")
            .ok_or_else(|| format!("no `time` column: {columns:?}"))?;
        if !(time_type == "TIMESTAMPTZ" || time_type == "TIMESTAMP" || is_numeric(time_type)) {
            return Err(format!("`time` is {time_type}, not a time or epoch"));
        }
        let values: Vec<usize> = columns
            .iter()
            .enumerate()
            .filter(|(_, (n, t))| n != "time" && is_numeric(t))
            .map(|(i, _)| i)
            .collect();
        if values.is_empty() {
            return Err(format!("no numeric value column: {columns:?}"));
        }
        for (n, t) in &columns {
            if n != "time" && !is_numeric(t) && n != "metric" {
                return Err(format!(
                    "column {n} ({t}) is neither time, a value nor `metric`: Grafana cannot plot it"
                ));
            }
        }
        let any_value = rows.iter().any(|r| {
            values
                .iter()
                .any(|&i| r.try_get_raw(i).map(|v| !v.is_null()).unwrap_or(false))
        });
        if !any_value {
            return Err("every value is NULL".into());
        }
    }
    if format == "table" {
        // A table of nothing but NULLs (an aggregate over no rows) shows nothing.
        let complete = rows.iter().any(|r| {
            (0..columns.len()).all(|i| r.try_get_raw(i).map(|v| !v.is_null()).unwrap_or(false))
        });
        if !complete {
            return Err(format!("no row without NULLs: {columns:?}"));
        }
    }
    Ok(rows.len())
}

// ---------------------------------------------------------------------------------------
// The live check

#[test]
fn dashboards_and_rules_return_data_on_a_running_deployment() {
    // Fail early, before starting anything, when a tool is missing.
    tool("ORDERFLOW_TEST_PROMETHEUS");
    let started_ms = common::now_ms();
    let env = TestEnv::new("deploy", 3);
    for base in [
        topics::INVENTORY_COMMANDS,
        topics::INVENTORY_UPDATED,
        topics::PAYMENT_PROCESSED,
        topics::FULFILLMENT_UPDATED,
        topics::CARRIER_UPDATES,
        topics::DELIVERY_UPDATED,
    ] {
        common::wait_for_partitions(&env.topic(base), 3);
    }
    let db = TestDatabase::create("deploy");
    // Grafana's read-only role, as the postgres image's init script creates it (before
    // the tables exist); the business dashboard's queries run as that role.
    let reader = format!("grafana_{}", common::unique());
    let reader_url = grafana_reader(&db, &reader);
    let _drop_reader = DropRole {
        server: common::postgres::postgres_url(),
        database: db.url.clone(),
        role: reader.clone(),
    };

    // The mock gateway: transient errors (retries) and declines (failures).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime for the gateway");
    let stop = CancellationToken::new();
    let gateway = Gateway::new(GatewayConfig {
        latency_ms: 2,
        jitter_ms: 5,
        decline_rate: 0.05,
        transient_error_rate: 0.3,
        seed: 9,
        ..GatewayConfig::default()
    })
    .expect("a valid gateway config");
    let (gateway_addr, _gateway_task) = rt
        .block_on(serve_gateway("127.0.0.1:0", gateway, stop.clone()))
        .expect("the gateway listens");

    // Two worker processes: the stages, and the SQL sinks.
    let stages_addr = format!("127.0.0.1:{}", free_port());
    let sinks_addr = format!("127.0.0.1:{}", free_port());
    let mut stage_env = worker_env(&gateway_addr.to_string());
    stage_env.push(("ORDERFLOW_HTTP_ADDR", stages_addr.clone()));
    // The low-stock watchdog every 2 s, so that the SKU made low below is reported soon.
    stage_env.push(("ORDERFLOW_INVENTORY_WATCHDOG_INTERVAL_SECS", "2".to_owned()));
    let stages = env.spawn_worker(
        &["fraud", "inventory", "payment", "fulfillment", "delivery"],
        &stage_env,
    );
    let sinks = env.spawn_worker(
        &["projector", "stats", "alerts"],
        &[
            ("ORDERFLOW_HTTP_ADDR", sinks_addr.clone()),
            ("ORDERFLOW_DATABASE_URL", db.url.clone()),
        ],
    );

    // The API, on a free port it prints.
    let (api_log, f) = log_file(&env, "api");
    let mut api_child = orderflow(
        &env,
        &["api"],
        &[
            ("ORDERFLOW_API_ADDR", "127.0.0.1:0".into()),
            ("ORDERFLOW_DATABASE_URL", db.url.clone()),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(f)
    .spawn()
    .expect("spawning orderflow api");
    let stdout = api_child.stdout.take().expect("piped stdout");
    let mut api = Proc {
        name: "orderflow api",
        child: api_child,
        log: api_log,
    };
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the API's first line");
    let api_base = line
        .trim()
        .strip_prefix("orderflow api listening on ")
        .unwrap_or_else(|| {
            api.assert_alive();
            panic!("unexpected first line of orderflow api: {line:?}")
        })
        .trim_start_matches("http://")
        .to_owned();

    // Workers serve their metrics before Prometheus starts scraping them.
    let deadline = Instant::now() + Duration::from_secs(60);
    for addr in [&stages_addr, &sinks_addr] {
        while http_get(&format!("http://{addr}/health/ready"), None).0 != 200 {
            stages.assert_alive();
            sinks.assert_alive();
            assert!(
                Instant::now() < deadline,
                "worker at {addr} not ready within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut prometheus =
        Prometheus::start(&env, &[stages_addr.clone(), sinks_addr.clone()], &api_base);

    // Traffic: stock, orders (fraud bursts, huge orders, best sellers running low) and the
    // carrier's scans, from `orderflow load`, for two minutes, longer than the checks may
    // take: they run meanwhile, so that rates over the last minute always see it.
    let (load_log, f) = log_file(&env, "load");
    let load_child = orderflow(
        &env,
        &[
            "load",
            "--orders",
            "1200",
            "--stores",
            "2",
            "--skus",
            "10",
            "--rate",
            "10",
            "--timeout",
            "60",
            "--quiet",
        ],
        &[],
    )
    .stdout(f.try_clone().expect("a log handle"))
    .stderr(f)
    .spawn()
    .expect("spawning orderflow load");
    let mut load = Proc {
        name: "orderflow load",
        child: load_child,
        log: load_log,
    };

    // Records the fraud stage dead-letters, and requests to the API.
    let producer = env.producer();
    let garbage: Vec<Outgoing> = (0..5)
        .map(|i| Outgoing::new("store-001", format!("not an order {i}")))
        .collect();
    producer.send_all(&env.topic(topics::ORDER_CREATED), &garbage);
    // One SKU of store-001 certainly low, whatever the orders happen to drain: a threshold
    // above any stock it gets, which the watchdog reports (a threshold alone never alerts).
    let threshold = Outgoing::new(
        "store-001",
        serde_json::to_vec(&serde_json::json!({
            "event_type": "ThresholdSet", "store_id": "store-001",
            "sku": "SKU-00003", "threshold": 1_000_000,
        }))
        .expect("JSON"),
    );
    producer.send_all(&env.topic(topics::INVENTORY_COMMANDS), &[threshold]);

    // Every query must return data; the pipeline and Prometheus need a moment, so the
    // checks are repeated until they all pass or the deadline comes.
    let operations = dashboard("orderflow-operations.json");
    let business = dashboard("orderflow-business.json");
    let exported = std::fs::read_to_string(root().join("src/metrics.rs")).expect("src/metrics.rs");
    // One runtime for the pool's connections and every query on them.
    let pool = rt
        .block_on(sqlx::PgPool::connect(&reader_url))
        .expect("connecting to the test database as Grafana's role");

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut passes = 0;
    let (prom_report, sql_report) = loop {
        stages.assert_alive();
        sinks.assert_alive();
        api.assert_alive();
        prometheus.proc.assert_alive();
        if let Ok(Some(status)) = load.child.try_wait() {
            assert!(
                status.success(),
                "orderflow load exited with {status}; log {}:\n{}",
                load.log.display(),
                common::tail_file(&load.log, 40)
            );
        }
        for route in ["/stats", "/alerts", "/orders", "/inventory"] {
            http_get(&format!("http://{api_base}{route}"), Some("store-001"));
        }
        let prom = check_prometheus(&prometheus, &operations, &exported);
        let sql = check_business(&rt, &pool, &business, started_ms);
        passes += 1;
        let failing = prom
            .iter()
            .chain(sql.iter())
            .filter(|(_, r)| r.is_err())
            .count();
        eprintln!("round {passes}: {failing} queries without data yet");
        let done = failing == 0;
        if done || Instant::now() > deadline {
            break (prom, sql);
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let failures: Vec<String> = prom_report
        .iter()
        .chain(sql_report.iter())
        .filter_map(|(what, r)| r.as_ref().err().map(|e| format!("- {what}\n    {e}")))
        .collect();
    if !failures.is_empty() {
        // What the sinks hold, to tell missing traffic from a wrong query.
        let levels: Vec<(String, String, Option<i64>, Option<i64>)> = rt
            .block_on(
                sqlx::query_as(
                    "SELECT store_id, sku, available, threshold FROM stock_levels ORDER BY 1, 2",
                )
                .fetch_all(&pool),
            )
            .unwrap_or_default();
        eprintln!("stock_levels: {levels:?}");
        eprintln!(
            "orderflow load's log:\n{}",
            common::tail_file(&load.log, 20)
        );
    }
    for (what, r) in prom_report.iter().chain(sql_report.iter()) {
        if let Ok(n) = r {
            eprintln!(
                "ok ({n} rows/samples): {}",
                what.lines().next().unwrap_or("")
            );
        }
    }
    assert!(
        failures.is_empty(),
        "after {passes} rounds, {} of {} dashboard and rule queries returned no data or failed \
         (worker logs {} and {}, prometheus log {}):\n{}",
        failures.len(),
        prom_report.len() + sql_report.len(),
        stages.log_path.display(),
        sinks.log_path.display(),
        prometheus.proc.log.display(),
        failures.join("\n")
    );
    eprintln!(
        "{} PromQL and {} SQL queries returned data (after {passes} rounds)",
        prom_report.len(),
        sql_report.len()
    );
    stop.cancel();
    rt.block_on(pool.close());
}

/// Runs `deploy/postgres/grafana-reader.sh` against `db` (as the postgres image runs it,
/// with psql) for the role `reader`; the URL that connects as that role.
fn grafana_reader(db: &TestDatabase, reader: &str) -> String {
    let pg_bin = "/usr/lib/postgresql/15/bin";
    let path = format!("{}:{pg_bin}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new("sh")
        .arg(root().join("deploy/postgres/grafana-reader.sh"))
        .env("PATH", path)
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_DB", &db.url)
        .env("GRAFANA_DB_USER", reader)
        .env("GRAFANA_DB_PASSWORD", "reader-secret")
        .output()
        .expect("running grafana-reader.sh");
    assert_ok("deploy/postgres/grafana-reader.sh", &out);
    let rest = db
        .url
        .split_once('@')
        .map(|(_, r)| r)
        .expect("a user in the test database URL");
    format!("postgres://{reader}:reader-secret@{rest}")
}

/// Drops the reader role (and what it was granted in the test database) when the test
/// ends, before the database itself goes.
struct DropRole {
    server: String,
    database: String,
    role: String,
}

impl Drop for DropRole {
    fn drop(&mut self) {
        let _ =
            common::postgres::execute(&self.database, &format!("DROP OWNED BY \"{}\"", self.role));
        let _ = common::postgres::execute(
            &self.server,
            &format!("DROP ROLE IF EXISTS \"{}\"", self.role),
        );
    }
}

type Report = Vec<(String, Result<usize, String>)>;

/// Every PromQL expression of the operations dashboard and of the rules Prometheus
/// loaded, evaluated now.
fn check_prometheus(prometheus: &Prometheus, operations: &Value, exported: &str) -> Report {
    let mut report: Report = Vec::new();
    let nonempty = |what: String, expr: &str, report: &mut Report| {
        let r = prometheus.query(expr).and_then(|samples| {
            if samples.is_empty() {
                Err(format!("no data for {expr}"))
            } else if samples.iter().all(|(_, v)| v == "NaN") {
                Err(format!("only NaN for {expr}: {samples:?}"))
            } else {
                Ok(samples.len())
            }
        });
        report.push((what, r));
    };
    let known = |name: &str| exported.contains(&format!("\"{name}\""));

    // The stage variable's values.
    let var = &operations["templating"]["list"][0];
    let def = var["definition"]
        .as_str()
        .expect("the variable's definition");
    let metric = def
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(", stage)"))
        .expect("label_values(<metric>, stage)");
    let values = prometheus.api("label/stage/values", &[("match[]", metric)]);
    report.push((
        format!("variable stage: {def}"),
        values.and_then(|v| {
            let names: Vec<&str> = v
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if [
                "fraud",
                "inventory",
                "payment",
                "fulfillment",
                "delivery",
                "projector",
            ]
            .iter()
            .all(|s| names.contains(s))
            {
                Ok(names.len())
            } else {
                Err(format!("stages listed: {names:?}"))
            }
        }),
    ));

    for (title, target) in targets(operations) {
        let expr = target["expr"]
            .as_str()
            .unwrap_or_else(|| panic!("panel {title}: a target without expr"));
        for name in metric_names(expr) {
            if !known(&name) {
                report.push((
                    format!("operations/{title}: {expr}"),
                    Err(format!("{name} is not a metric of src/metrics.rs")),
                ));
            }
        }
        nonempty(
            format!("operations/{title}: {expr}"),
            &expand_promql(expr),
            &mut report,
        );
    }

    let rules = match prometheus.api("rules", &[]) {
        Ok(r) => r,
        Err(e) => {
            report.push(("GET /api/v1/rules".into(), Err(e)));
            return report;
        }
    };
    let mut loaded = 0;
    for group in rules["groups"].as_array().expect("rule groups") {
        for rule in group["rules"].as_array().expect("rules") {
            loaded += 1;
            let expr = rule["query"].as_str().expect("a rule's query");
            let name = rule["name"].as_str().expect("a rule's name");
            if rule["health"] != "ok" && rule["health"] != "unknown" {
                report.push((
                    format!("rule {name}"),
                    Err(format!("health {}: {}", rule["health"], rule["lastError"])),
                ));
            }
            for m in metric_names(expr) {
                if !known(&m) {
                    report.push((
                        format!("rule {name}: {expr}"),
                        Err(format!("{m} is not a metric of src/metrics.rs")),
                    ));
                }
            }
            if rule["type"] == "recording" {
                nonempty(format!("recording rule {name}: {expr}"), expr, &mut report);
                nonempty(format!("recorded series {name}"), name, &mut report);
            } else {
                // The alert's own expression evaluates (it may or may not fire)...
                report.push((
                    format!("alert {name}: {expr}"),
                    prometheus.query(expr).map(|s| s.len()),
                ));
                // ...and every signal it compares has data.
                for signal in alert_signals(expr) {
                    nonempty(
                        format!("alert {name}, signal {signal}"),
                        &signal,
                        &mut report,
                    );
                }
            }
        }
    }
    if loaded == 0 {
        report.push(("rules".into(), Err("Prometheus loaded no rules".into())));
    }
    report
}

/// Every SQL query of the business dashboard (and its store variable), expanded and run.
fn check_business(
    rt: &tokio::runtime::Runtime,
    pool: &sqlx::PgPool,
    business: &Value,
    started_ms: i64,
) -> Report {
    let range = Range {
        from_ms: started_ms - 10 * 60 * 1000,
        to_ms: common::now_ms() + 2 * 60 * 1000,
    };
    let mut report: Report = Vec::new();
    let var = &business["templating"]["list"][0];
    assert_eq!(var["name"], "store", "the business dashboard's variable");
    let var_sql = var["query"].as_str().expect("the store variable's query");
    // Grafana's default for a single-value variable: its first value.
    let stores: Result<Vec<String>, String> = rt
        .block_on(async {
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(var_sql.to_owned()))
                .fetch_all(pool)
                .await
        })
        .map_err(|e| e.to_string());
    let store = match stores {
        Ok(s) if !s.is_empty() => {
            report.push((format!("variable store: {var_sql}"), Ok(s.len())));
            s[0].clone()
        }
        Ok(_) => {
            report.push((
                format!("variable store: {var_sql}"),
                Err("no stores".into()),
            ));
            return report;
        }
        Err(e) => {
            report.push((format!("variable store: {var_sql}"), Err(e)));
            return report;
        }
    };
    for (title, target) in targets(business) {
        let raw = target["rawSql"]
            .as_str()
            .unwrap_or_else(|| panic!("panel {title}: a target without rawSql"));
        let format = target["format"].as_str().unwrap_or("time_series");
        let sql = expand_sql(raw, &range, &store);
        let r = rt.block_on(check_sql(pool, format, &sql));
        report.push((
            format!("business/{title} ({format}, store {store}):\n{sql}"),
            r,
        ));
    }
    report
}

#[test]
fn alert_signals_split_at_set_operators_and_drop_thresholds() {
    assert_eq!(
        alert_signals("a:b{stage=~\"x|y\"} > 0\n  and on (stage) c:d == 0"),
        vec!["a:b{stage=~\"x|y\"}", "c:d"]
    );
    assert_eq!(
        alert_signals(
            "histogram_quantile(0.5, sum by (le) (rate(x[5m]))) > 10 and on (stage) delta(y[15m]) >= 0"
        ),
        vec![
            "histogram_quantile(0.5, sum by (le) (rate(x[5m])))",
            "delta(y[15m])"
        ]
    );
    assert_eq!(
        alert_signals("up{job=~\"orderflow-.*\"} == 0"),
        vec!["up{job=~\"orderflow-.*\"}"]
    );
    assert_eq!(
        metric_names(
            "sum(rate(orderflow_commit_seconds_bucket[1m])) / stage:orderflow_records_in:rate5m"
        ),
        BTreeSet::from(["orderflow_commit_seconds".to_owned()])
    );
    let range = Range {
        from_ms: 0,
        to_ms: 60_000,
    };
    assert_eq!(
        expand_sql(
            "SELECT $__timeGroupAlias(time, $__interval), 1 AS v FROM t WHERE s = '$store' AND $__timeFilter(time)",
            &range,
            "s1"
        ),
        "SELECT floor(extract(epoch from time)/60)*60 AS \"time\", 1 AS v FROM t WHERE s = 's1' AND time BETWEEN '1970-01-01T00:00:00.000Z' AND '1970-01-01T00:01:00.000Z'"
    );
}
