//! A small Chrome DevTools Protocol client for the browser test: a headless `chromium`
//! started on a fresh profile, one page target spoken to over its websocket, and a timeout
//! on every step so a test can never hang.

#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any one step (a call, a page load, an event) may take.
pub const STEP: Duration = Duration::from_secs(30);

pub type Result<T> = std::result::Result<T, String>;

/// The browser to drive: `CANVAS_TEST_CHROMIUM`, else `chromium` (or `chromium-browser`)
/// on `PATH`. `None` when there is none.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CANVAS_TEST_CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
}

/// A headless chromium on a profile of its own, killed (with its helper processes) when
/// dropped — on a panic too.
pub struct Chromium {
    child: Child,
    /// `ws://127.0.0.1:PORT/devtools/browser/…`, as it printed it.
    pub browser_ws: String,
    /// `127.0.0.1:PORT`.
    pub devtools: String,
    _profile: tempfile::TempDir,
}

impl Chromium {
    pub fn start(binary: &Path) -> Result<Chromium> {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so the renderers go with it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut seen = Vec::new();
            // Read to the end so chromium never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(url) = line.trim().strip_prefix("DevTools listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(Ok(url.to_owned()));
                } else if tx.is_some() {
                    seen.push(line);
                }
            }
            if let Some(tx) = tx {
                let _ = tx.send(Err(seen.join("\n")));
            }
        });
        let mut browser = Chromium {
            child,
            browser_ws: String::new(),
            devtools: String::new(),
            _profile: profile,
        };
        browser.browser_ws = match rx.recv_timeout(STEP) {
            Ok(Ok(url)) => url,
            Ok(Err(log)) => return Err(format!("chromium exited before listening:\n{log}")),
            Err(_) => return Err("chromium printed no DevTools address within 30 s".into()),
        };
        browser.devtools = browser
            .browser_ws
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .ok_or_else(|| format!("a DevTools address without a host: {}", browser.browser_ws))?
            .to_owned();
        Ok(browser)
    }

    /// The page target it opened on `about:blank`, connected.
    pub async fn page(&self) -> Result<Cdp> {
        let url = format!("http://{}/json/list", self.devtools);
        let targets: Value = tokio::time::timeout(STEP, async {
            reqwest::get(&url).await?.json::<Value>().await
        })
        .await
        .map_err(|_| format!("{url}: no answer in 30 s"))?
        .map_err(|e| format!("{url}: {e}"))?;
        let ws = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .ok_or_else(|| format!("no page target in {targets}"))?;
        Cdp::connect(ws).await
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One DevTools session: commands with ids, and the events that arrived meanwhile, kept
/// until asked for.
pub struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Cdp {
    pub async fn connect(url: &str) -> Result<Cdp> {
        let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| format!("{url}: no websocket in 30 s"))?
            .map_err(|e| format!("{url}: {e}"))?;
        Ok(Cdp {
            ws,
            next_id: 1,
            events: VecDeque::new(),
        })
    }

    /// The next message from the browser, as JSON.
    async fn read(&mut self) -> Result<Value> {
        loop {
            let message = self
                .ws
                .next()
                .await
                .ok_or("the browser closed the DevTools connection")?
                .map_err(|e| e.to_string())?;
            if let Message::Text(text) = message {
                return serde_json::from_str(text.as_str()).map_err(|e| e.to_string());
            }
        }
    }

    /// Send `method` with `params`; its `result`, or the protocol's error.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({ "id": id, "method": method, "params": params });
        let answer = tokio::time::timeout(STEP, async {
            self.ws
                .send(Message::text(request.to_string()))
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let m = self.read().await?;
                if m["id"] == id {
                    return Ok::<Value, String>(m);
                }
                if m.get("method").is_some() {
                    self.events.push_back(m);
                }
            }
        })
        .await
        .map_err(|_| format!("{method}: no answer in 30 s"))??;
        if let Some(error) = answer.get("error") {
            return Err(format!("{method}: {error}"));
        }
        Ok(answer["result"].clone())
    }

    /// Forget the events of that name received so far.
    pub fn forget(&mut self, name: &str) {
        self.events.retain(|e| e["method"] != name);
    }

    /// The first event of that name (kept from earlier, or the next to come).
    pub async fn event(&mut self, name: &str) -> Result<Value> {
        if let Some(at) = self.events.iter().position(|e| e["method"] == name) {
            return Ok(self.events.remove(at).unwrap()["params"].clone());
        }
        tokio::time::timeout(STEP, async {
            loop {
                let m = self.read().await?;
                if m["method"] == name {
                    return Ok::<Value, String>(m["params"].clone());
                }
                if m.get("method").is_some() {
                    self.events.push_back(m);
                }
            }
        })
        .await
        .map_err(|_| format!("no {name} in 30 s"))?
    }

    /// `Page.enable` and a fixed viewport of `width`×`height` CSS pixels.
    pub async fn setup(&mut self, width: u32, height: u32) -> Result<()> {
        self.call("Page.enable", json!({})).await?;
        self.call("Runtime.enable", json!({})).await?;
        self.viewport(width, height).await
    }

    pub async fn viewport(&mut self, width: u32, height: u32) -> Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await
        .map(drop)
    }

    /// Open `url` and wait for its load event.
    pub async fn navigate(&mut self, url: &str) -> Result<()> {
        self.forget("Page.loadEventFired");
        let answer = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = answer.get("errorText") {
            return Err(format!("{url}: {error}"));
        }
        self.event("Page.loadEventFired").await.map(drop)
    }

    /// Evaluate `expression` in the page; its value (JSON). A thrown exception is an error.
    pub async fn eval(&mut self, expression: &str) -> Result<Value> {
        let answer = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = answer.get("exceptionDetails") {
            return Err(format!("{expression}: {e}"));
        }
        Ok(answer["result"]["value"].clone())
    }

    /// [`Cdp::eval`] of an expression that yields a string.
    pub async fn text(&mut self, expression: &str) -> Result<String> {
        let v = self.eval(expression).await?;
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{expression}: not a string but {v}"))
    }

    /// Run `action` (a click, a submit) and wait for the page it loads.
    pub async fn and_wait(&mut self, action: &str) -> Result<()> {
        self.forget("Page.loadEventFired");
        self.eval(action).await?;
        self.event("Page.loadEventFired").await.map(drop)
    }

    /// The whole page (beyond the viewport, down to `max_height` CSS pixels) as a PNG at
    /// `path`; its size in bytes.
    pub async fn screenshot(&mut self, path: &Path, max_height: f64) -> Result<usize> {
        let metrics = self.call("Page.getLayoutMetrics", json!({})).await?;
        let size = &metrics["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(1400.0).max(1.0);
        let height = size["height"]
            .as_f64()
            .unwrap_or(1000.0)
            .clamp(1.0, max_height);
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": { "x": 0, "y": 0, "width": width, "height": height, "scale": 1 },
                }),
            )
            .await?;
        let data = shot["data"].as_str().ok_or("a screenshot without data")?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| e.to_string())?;
        std::fs::write(path, &png).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(png.len())
    }
}
