//! The dashboard page in a real browser: headless Chromium, driven over the WebDriver
//! protocol (plain HTTP to chromedriver), against the whole running system as
//! `orderflow dev` runs it — stages, payment gateway, carrier, SQL sinks and the API that
//! serves the page, in one process on the embedded log and SQLite.
//!
//! The scenario: the page loads for a store; an order placed with the page's form shows
//! up in recent orders and its timeline reaches `Delivered`; an order cancelled with its
//! Cancel button shows its compensation (stock released); draining a SKU below its
//! threshold makes a low-stock alert appear, pushed over the page's alert stream.
//! Screenshots of each step go to `target/browser-screenshots/`.
//!
//! Needs `ORDERFLOW_TEST_CHROMEDRIVER` (the chromedriver binary; `scripts/test.sh` installs
//! Debian's `chromium` and `chromium-driver` and sets it); panics without it, never
//! skips. The test starts chromedriver and `orderflow dev` on free ports and stops both
//! by their PIDs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The chromedriver binary to run.
const CHROMEDRIVER_ENV: &str = "ORDERFLOW_TEST_CHROMEDRIVER";

// ---------------------------------------------------------------------------------------
// The system under test.
// ---------------------------------------------------------------------------------------

/// The running system: what the page talks to, and what keeps it running.
struct System {
    /// The API's base URL (`http://127.0.0.1:port`), which serves the page at `/`.
    base: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// Starts everything the page needs and returns its URL: `orderflow dev` — every stage
/// and sink, the mock payment gateway, the simulated carrier and the API in one process,
/// on the embedded log and SQLite — with no simulated traffic, and picking slow enough
/// that a paid order can still be cancelled. The one place that knows how the system
/// is started.
fn start_system(name: &str) -> System {
    use std::io::BufRead;

    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = common::test_log_dir().join(format!("{name}-dev-{}.log", common::unique()));
    std::fs::create_dir_all(common::test_log_dir()).expect("the log directory");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    // Only what this test says: no ORDERFLOW_* leaking in from the caller's shell.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ORDERFLOW_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(["dev", "--port", "0", "--load", "0", "--data-dir"])
        .arg(dir.path())
        .env("ORDERFLOW_FULFILLMENT_PICK_MS", "4000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(&log).expect("the log file"),
        ))
        .spawn()
        .expect("spawning orderflow dev");
    eprintln!("orderflow dev pid {}, log {}", child.id(), log.display());
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(url) = line.trim().strip_prefix("orderflow dev listening on ") {
                    break url.to_owned();
                }
            }
            _ => panic!(
                "orderflow dev ended before printing its address:\n{}",
                common::tail_file(&log, 40)
            ),
        }
    };
    // The rest of the banner, and whatever else it prints, is read and dropped.
    std::thread::spawn(move || for _ in lines {});
    System {
        base,
        child,
        _dir: dir,
    }
}

impl System {
    /// An order ID starting with `prefix` that the system under test's bank authorizes
    /// (not declined) and its carrier delivers (no failed delivery): both decide by a
    /// pure function of the order, so a test can choose its outcome.
    fn order_that_goes_through(&self, store: &str, prefix: &str) -> String {
        let gateway = orderflow::cli::dev::gateway_config();
        let carrier = orderflow::cli::dev::carrier_config();
        (0..)
            .map(|k| {
                format!(
                    "{prefix}{}",
                    if k == 0 {
                        String::new()
                    } else {
                        format!("-{k}")
                    }
                )
            })
            .find(|id| {
                gateway
                    .decline_reason(&orderflow::stages::payment::authorization_key(store, id))
                    .is_none()
                    && !carrier.delivery_fails(store, id)
            })
            .expect("an order ID")
    }
}

impl Drop for System {
    /// Stops `orderflow dev` by its PID, as Ctrl-C would.
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let until = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// chromedriver and a minimal WebDriver client.
// ---------------------------------------------------------------------------------------

/// A chromedriver process on a free loopback port, stopped by its PID when dropped.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    fn start() -> Chromedriver {
        let binary = std::env::var(CHROMEDRIVER_ENV).unwrap_or_else(|_| {
            panic!(
                "{CHROMEDRIVER_ENV} is not set: it names the chromedriver binary \
                 (Debian: apt-get install chromium chromium-driver; scripts/test.sh does it)"
            )
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = common::test_log_dir().join(format!("chromedriver-{port}.log"));
        std::fs::create_dir_all(common::test_log_dir()).expect("the log directory");
        let child = Command::new(&binary)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        eprintln!(
            "chromedriver pid {} on port {port}, log {}",
            child.id(),
            log.display()
        );
        Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let until = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One WebDriver session.
struct Browser {
    http: reqwest::Client,
    session: String,
    shots: PathBuf,
}

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn open(driver: &Chromedriver, shots: PathBuf) -> Browser {
        let http = reqwest::Client::new();
        // chromedriver answers /status once it listens.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(Instant::now() < until, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1200"
            ]}
        }}});
        let r: Value = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("a JSON answer");
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {r}"));
        std::fs::create_dir_all(&shots).expect("the screenshot directory");
        Browser {
            http,
            session: format!("{}/session/{id}", driver.url),
            shots,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        match self.try_call(method.clone(), path, body).await {
            Ok(v) => v,
            Err((status, v)) => panic!("{method} {path}: {status} {v}"),
        }
    }

    /// Like [`Browser::call`], returning a refusal (status, answer) instead of failing.
    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, (reqwest::StatusCode, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("chromedriver answers");
        let status = r.status();
        let v: Value = r.json().await.expect("a JSON answer");
        if status.is_success() {
            Ok(v["value"].clone())
        } else {
            Err((status, v))
        }
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    async fn js(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    /// Clicks the element at `css`. The page redraws its lists as data arrives, so an
    /// element found may be replaced before the click lands: then it is found again.
    async fn click(&self, css: &str) {
        for attempt in 0.. {
            let id = self.element(css).await;
            match self
                .try_call(
                    reqwest::Method::POST,
                    &format!("/element/{id}/click"),
                    Some(json!({})),
                )
                .await
            {
                Ok(_) => return,
                Err((_, v)) if attempt < 5 && v["value"]["error"] == "stale element reference" => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err((status, v)) => panic!("clicking {css}: {status} {v}"),
            }
        }
    }

    /// Replaces the value of the input at `css` by typing `text`.
    async fn fill(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            Some(json!({})),
        )
        .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The text of the first element matching `css`, or null.
    async fn text(&self, css: &str) -> Value {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        )
        .await
    }

    /// Waits until `script` returns something truthy in the page, and returns it.
    async fn until(&self, what: &str, secs: u64, script: &str, args: Value) -> Value {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.js(script, args.clone()).await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return v;
            }
            if Instant::now() >= until {
                self.screenshot(&format!("failed-{}", what.replace(' ', "-")))
                    .await;
                let page = self
                    .js(
                        "return document.querySelector('main').innerText;",
                        json!([]),
                    )
                    .await;
                panic!(
                    "{what}: not within {secs}s; the page shows:\n{}",
                    page.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = decode_base64(v.as_str().expect("a base64 screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("screenshot {}", path.display());
        path
    }

    /// Ends the session, which quits the browser.
    async fn close(&self) {
        match self.http.delete(&self.session).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => eprintln!("ending the browser session: {}", r.status()),
            Err(e) => eprintln!("ending the browser session: {e}"),
        }
    }
}

/// Standard base64 (what WebDriver screenshots are in).
fn decode_base64(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..chunk.len()]);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The scenario.
// ---------------------------------------------------------------------------------------

/// Calls the API directly (for setting up stock, which the page does not do).
async fn api(base: &str, method: &str, path: &str, store: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).expect("a method"),
            format!("{base}{path}"),
        )
        .header("X-Store-ID", store)
        .json(&body)
        .send()
        .await
        .expect("the API answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(base: &str, path: &str, store: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .header("X-Store-ID", store)
        .send()
        .await
        .expect("the API answers")
        .json()
        .await
        .expect("JSON")
}

/// Places an order with the page's form.
async fn place_from_form(b: &Browser, order_id: &str, sku: &str, quantity: u32) {
    b.fill("#f-order-id", order_id).await;
    b.fill("#f-sku", sku).await;
    b.fill("#f-quantity", &quantity.to_string()).await;
    b.click("[data-testid=form-submit]").await;
    b.until(
        &format!("{order_id} accepted"),
        30,
        "return document.getElementById('form-message').textContent.includes('Accepted ' + arguments[0]);",
        json!([order_id]),
    )
    .await;
}

/// Whether the order's timeline on the page lists an event of this type.
const TIMELINE_HAS: &str = "const t = document.querySelector('[data-testid=\"timeline-' + arguments[0] + '\"]'); \
     return !!t && !!t.querySelector('li[data-event-type=\"' + arguments[1] + '\"]');";

#[test]
fn the_dashboard_in_a_browser() {
    let driver = Chromedriver::start();
    let system = start_system("browser");
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let b = rt.block_on(Browser::open(&driver, shots));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(scenario(&b, &system))
    }));
    // Whatever happened, the browser goes (chromedriver leaves it running otherwise).
    rt.block_on(b.close());
    drop(system);
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario(b: &Browser, system: &System) {
    let base = system.base.clone();
    let store = "browser-a";
    // Stock: plenty of SKU-2; three units of SKU-1 with a threshold of 2.
    for (method, path, body) in [
        ("POST", "/inventory/SKU-2/restock", json!({"quantity": 50})),
        ("POST", "/inventory/SKU-1/restock", json!({"quantity": 3})),
        ("PUT", "/inventory/SKU-1/threshold", json!({"threshold": 2})),
    ] {
        let (status, body) = api(&base, method, path, store, body).await;
        assert_eq!(status, 202, "{method} {path}: {body}");
    }
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let levels = get(&base, "/inventory", store).await;
        let level = |sku: &str| {
            levels["items"]
                .as_array()
                .and_then(|i| i.iter().find(|l| l["sku"] == sku))
                .map(|l| (l["available"].clone(), l["threshold"].clone()))
        };
        if level("SKU-1") == Some((json!(3), json!(2))) && level("SKU-2").is_some() {
            break;
        }
        assert!(Instant::now() < until, "stock not reported: {levels}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Orders the system will see through: the bank authorizes them and the carrier
    // delivers them.
    let [o1, o2, o3] =
        ["web-1", "web-2", "web-3"].map(|p| system.order_that_goes_through(store, p));

    // 1. The page loads for the store.
    b.goto(&format!("{base}/#store={store}")).await;
    b.until(
        "the page is ready",
        30,
        "return document.body.dataset.ready === 'true' && \
         document.getElementById('connection').textContent.startsWith('store ' + arguments[0]);",
        json!([store]),
    )
    .await;
    assert_eq!(
        b.js(
            "return document.getElementById('store-picker').value;",
            json!([])
        )
        .await,
        json!(store)
    );
    assert_eq!(b.text("title").await, json!("OrderFlow dashboard"));
    b.until(
        "the workflow is drawn",
        30,
        "return document.querySelectorAll('#workflow-svg [data-testid^=\"node-count-\"]').length;",
        json!([]),
    )
    .await;
    b.screenshot("01-loaded").await;

    // 2. An order placed from the form appears and its timeline reaches Delivered.
    place_from_form(b, &o1, "SKU-2", 1).await;
    b.until(
        "the first order in recent orders",
        60,
        "return !!document.querySelector('[data-testid=\"order-' + arguments[0] + '\"]');",
        json!([o1]),
    )
    .await;
    b.screenshot("02-placed").await;
    b.until(
        "the first order delivered",
        120,
        TIMELINE_HAS,
        json!([o1, "Delivered"]),
    )
    .await;
    b.until(
        "the first order's status delivered",
        30,
        "const s = document.querySelector('[data-testid=\"status-' + arguments[0] + '\"]'); return s && s.textContent === 'delivered';",
        json!([o1]),
    )
    .await;
    let steps = b
        .js(
            "return Array.from(document.querySelectorAll('[data-testid=\"timeline-' + arguments[0] + '\"] li')).map(l => l.dataset.eventType);",
            json!([o1]),
        )
        .await;
    for step in [
        "OrderCreated",
        "OrderScreened",
        "StockReserved",
        "PaymentAuthorized",
        "Shipped",
        "Delivered",
    ] {
        assert!(
            steps.as_array().is_some_and(|s| s.contains(&json!(step))),
            "{step} missing from {steps}"
        );
    }
    // The workflow counts it as delivered, with a latency on the last hop.
    b.until(
        "the workflow shows the delivery",
        30,
        "const n = document.querySelector('[data-testid=\"node-count-delivered\"]'); \
         const l = document.querySelector('[data-testid=\"hop-shipped-delivered-latency\"]'); \
         return n && n.textContent === '1' && l && !l.textContent.startsWith('–');",
        json!([]),
    )
    .await;
    b.screenshot("03-delivered").await;

    // 3. A cancelled order shows its compensation.
    place_from_form(b, &o2, "SKU-2", 1).await;
    b.until(
        "the second order paid",
        60,
        TIMELINE_HAS,
        json!([o2, "PaymentAuthorized"]),
    )
    .await;
    b.click(&format!("[data-testid=\"cancel-{o2}\"]")).await;
    b.until(
        "the second order's cancellation requested",
        30,
        "return document.getElementById('order-message').textContent.includes('Cancellation of ' + arguments[0] + ' requested');",
        json!([o2]),
    )
    .await;
    // Paid and then cancelled: the charge refunded and the stock given back.
    for step in ["StockReleased", "PaymentRefunded"] {
        b.until(
            &format!("the second order's {step}"),
            60,
            TIMELINE_HAS,
            json!([o2, step]),
        )
        .await;
    }
    b.until(
        "the second order cancelled",
        30,
        "const s = document.querySelector('[data-testid=\"status-' + arguments[0] + '\"]'); return s && s.textContent === 'cancelled';",
        json!([o2]),
    )
    .await;
    let compensation = b
        .js(
            "return Array.from(document.querySelectorAll('[data-testid=\"timeline-' + arguments[0] + '\"] li.compensation')).map(l => l.dataset.eventType);",
            json!([o2]),
        )
        .await;
    for step in ["StockReleased", "PaymentRefunded"] {
        assert!(
            compensation
                .as_array()
                .is_some_and(|c| c.contains(&json!(step))),
            "{step} is not shown as compensation: {compensation}"
        );
    }
    b.screenshot("04-cancelled").await;

    // 4. Draining SKU-1 below its threshold: a low-stock alert arrives over the stream.
    assert_eq!(
        b.js(
            "return document.querySelectorAll('#alerts li').length;",
            json!([])
        )
        .await,
        json!(0)
    );
    place_from_form(b, &o3, "SKU-1", 2).await;
    let alert = b
        .until(
            "a low-stock alert",
            60,
            "const a = document.querySelector('#alerts li[data-kind=\"low_stock\"]'); return a && a.textContent;",
            json!([]),
        )
        .await;
    assert!(
        alert
            .as_str()
            .is_some_and(|t| t.starts_with("Low stock: SKU-1")),
        "{alert}"
    );
    b.screenshot("05-low-stock").await;
    // Acknowledging it from the page changes it on the page.
    let id = b
        .js(
            "return document.querySelector('#alerts li[data-kind=\"low_stock\"]').dataset.testid.slice(6);",
            json!([]),
        )
        .await;
    let id = id.as_str().expect("an alert ID").to_owned();
    b.click(&format!("[data-testid=\"ack-{id}\"]")).await;
    b.until(
        "the alert acknowledged",
        30,
        "const a = document.querySelector('[data-testid=\"alert-' + arguments[0] + '\"]'); return a && a.dataset.status === 'acknowledged';",
        json!([id]),
    )
    .await;
    b.screenshot("06-acknowledged").await;
}
