//! The receiver: answers every delivery (after `delay`), counts idempotency keys; given a
//! secret, it checks `X-Canvas-Signature` as docs/channels.md tells receivers to (refusing a
//! bad or stale one with 401) and records how old each signature's `t` is on arrival.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

pub(super) struct Receiver {
    pub(super) addr: SocketAddr,
    pub(super) state: Arc<RecvState>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

/// A receiver following docs/channels.md refuses signatures older than this.
pub(super) const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);

pub(super) struct RecvState {
    pub(super) delay: Duration,
    pub(super) secret: Option<Vec<u8>>,
    pub(super) unique: AtomicU64,
    pub(super) requests: AtomicU64,
    pub(super) seen: Mutex<Seen>,
}

#[derive(Default)]
pub(super) struct Seen {
    /// Key → (times received, Unix ms of the first).
    pub(super) keys: HashMap<String, (u32, i64)>,
    pub(super) first: Option<Instant>,
    pub(super) last: Option<Instant>,
    pub(super) last_ms: Option<i64>,
    /// The last request, repeats included.
    pub(super) last_request: Option<Instant>,
    /// Per signed request: arrival minus its `t`, in ms (`t` is whole seconds, so a fresh
    /// signature is 0–999 ms old).
    pub(super) signature_ages_ms: Vec<i64>,
    /// Requests refused: no signature, a wrong one, or one past the tolerance.
    pub(super) refused: u64,
}

impl Receiver {
    pub(super) async fn start(
        delay: Duration,
        secret: Option<Vec<u8>>,
    ) -> anyhow::Result<Receiver> {
        let state = Arc::new(RecvState {
            delay,
            secret,
            unique: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            seen: Mutex::new(Seen::default()),
        });
        let app = axum::Router::new()
            .route("/sms", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("starting the receiver")?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver { addr, state, task })
    }

    pub(super) fn unique(&self) -> u64 {
        self.state.unique.load(Ordering::Relaxed)
    }

    pub(super) fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub(super) fn window(&self) -> Option<(Instant, Instant)> {
        let s = self.state.seen.lock().ok()?;
        Some((s.first?, s.last?))
    }

    /// From the first request to the last, repeats included.
    pub(super) fn requests_window(&self) -> Option<(Instant, Instant)> {
        let s = self.state.seen.lock().ok()?;
        Some((s.first?, s.last_request?))
    }

    pub(super) fn last_ms(&self) -> Option<i64> {
        self.state.seen.lock().ok()?.last_ms
    }

    pub(super) fn seen(&self) -> HashMap<String, (u32, i64)> {
        self.state
            .seen
            .lock()
            .map(|s| s.keys.clone())
            .unwrap_or_default()
    }

    /// (signature ages in ms, requests refused).
    pub(super) fn signatures(&self) -> (Vec<i64>, u64) {
        self.state
            .seen
            .lock()
            .map(|s| (s.signature_ages_ms.clone(), s.refused))
            .unwrap_or_default()
    }

    pub(super) fn first_seen(&self) -> HashMap<String, i64> {
        self.state
            .seen
            .lock()
            .map(|s| s.keys.iter().map(|(k, (_, at))| (k.clone(), *at)).collect())
            .unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) async fn receive(
    State(state): State<Arc<RecvState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if let Some(secret) = &state.secret
        && !signature_ok(&state, secret, &headers, &body)
    {
        return StatusCode::UNAUTHORIZED;
    }
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) else {
        return StatusCode::BAD_REQUEST;
    };
    state.requests.fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let Ok(mut seen) = state.seen.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    seen.last_request = Some(now);
    let entry = seen.keys.entry(key.to_owned()).or_insert((0, now_ms));
    entry.0 += 1;
    if entry.0 == 1 {
        state.unique.fetch_add(1, Ordering::Relaxed);
        seen.first.get_or_insert(now);
        seen.last = Some(now);
        seen.last_ms = Some(now_ms);
    }
    StatusCode::OK
}

/// Check the signature on arrival and record its age; false (and counted) when a receiver
/// following docs/channels.md would refuse the request.
fn signature_ok(state: &RecvState, secret: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    use canvas_channels::signature::{SIGNATURE_HEADER, verify};
    let now_ms = chrono::Utc::now().timestamp_millis();
    let header = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let t = header
        .split(',')
        .find_map(|p| p.trim().strip_prefix("t="))
        .and_then(|t| t.parse::<i64>().ok());
    let ok = verify(
        header,
        secret,
        body,
        now_ms.div_euclid(1000),
        SIGNATURE_TOLERANCE,
    )
    .is_ok();
    let Ok(mut seen) = state.seen.lock() else {
        return false;
    };
    if let Some(t) = t {
        seen.signature_ages_ms.push(now_ms - t.saturating_mul(1000));
    }
    if !ok {
        seen.refused += 1;
    }
    ok
}
