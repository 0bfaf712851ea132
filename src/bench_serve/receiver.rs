//! The receiver: answers every delivery (after `delay`), counts idempotency keys.

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

pub(super) struct RecvState {
    pub(super) delay: Duration,
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
}

impl Receiver {
    pub(super) async fn start(delay: Duration) -> anyhow::Result<Receiver> {
        let state = Arc::new(RecvState {
            delay,
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
    _body: Bytes,
) -> StatusCode {
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
