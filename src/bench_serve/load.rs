//! Load: prepared request bodies, sent by concurrent clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use axum::body::Bytes;
use indicatif::ProgressBar;
use serde_json::Value as Json;

use super::{EVENT, TOKEN, WRITE_KEY};

#[derive(Clone, Copy)]
pub(super) enum Auth {
    Bearer,
    WriteKey,
}

pub(super) struct Post {
    pub(super) url: String,
    pub(super) auth: Auth,
    pub(super) body: Bytes,
    /// Events (or profiles) in the body: what the progress bar counts.
    pub(super) events: u64,
}

/// `{"events":[…]}` for customers `range`; `occurred_at` omitted means "when received".
pub(super) fn events_json(range: std::ops::Range<usize>, occurred_at: Option<&str>) -> String {
    let mut s = String::with_capacity(range.len() * 140 + 16);
    s.push_str("{\"events\":[");
    let from = range.start;
    for i in range {
        if i > from {
            s.push(',');
        }
        s.push_str(&format!(
            "{{\"id\":\"e{i}\",\"customer_id\":\"c{i:08}\",\"name\":\"{EVENT}\",\"data\":{{\"source\":\"bench\",\"amount\":{}}}",
            i % 500
        ));
        if let Some(t) = occurred_at {
            s.push_str(&format!(",\"occurred_at\":\"{t}\""));
        }
        s.push('}');
    }
    s.push_str("]}");
    s
}

/// The bodies of `n` events in batches, built before the clock starts; batch `b` goes to
/// daemon `b % bases.len()`.
pub(super) fn event_bodies(n: usize, batch: usize, bases: &[String]) -> Vec<Post> {
    let batch = batch.max(1);
    (0..n)
        .step_by(batch)
        .enumerate()
        .map(|(b, from)| {
            let to = (from + batch).min(n);
            Post {
                url: format!("{}/v1/events", bases[b % bases.len()]),
                auth: Auth::Bearer,
                body: Bytes::from(events_json(from..to, None)),
                events: (to - from) as u64,
            }
        })
        .collect()
}

pub(super) struct Answer {
    pub(super) latency_ms: f64,
    /// Unix ms when the 200 came back.
    pub(super) answered_ms: i64,
    pub(super) accepted: u64,
    pub(super) duplicates: u64,
    pub(super) retries: u64,
}

/// POST one body; a failure (not 200, or no answer) is retried up to 10 times — ids make a
/// repeat harmless — and reported as an error after that. The latency is the last attempt's.
pub(super) async fn post(
    client: &reqwest::Client,
    url: &str,
    auth: Auth,
    body: Bytes,
) -> anyhow::Result<Answer> {
    let mut retries = 0;
    loop {
        let req = client
            .post(url)
            .header("content-type", "application/json")
            .body(body.clone());
        let req = match auth {
            Auth::Bearer => req.bearer_auth(TOKEN),
            Auth::WriteKey => req.basic_auth(WRITE_KEY, None::<&str>),
        };
        let t = Instant::now();
        let problem = match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let bytes = resp.bytes().await;
                let latency_ms = t.elapsed().as_secs_f64() * 1e3;
                match bytes {
                    Ok(b) if status == reqwest::StatusCode::OK => {
                        let v: Json = serde_json::from_slice(&b).context("the daemon's answer")?;
                        return Ok(Answer {
                            latency_ms,
                            answered_ms: chrono::Utc::now().timestamp_millis(),
                            accepted: v["accepted"].as_u64().unwrap_or(0),
                            duplicates: v["duplicates"].as_u64().unwrap_or(0),
                            retries,
                        });
                    }
                    Ok(b) => format!("HTTP {status}: {}", String::from_utf8_lossy(&b)),
                    Err(e) => format!("HTTP {status}, reading the body: {e}"),
                }
            }
            Err(e) => format!("{e}"),
        };
        retries += 1;
        if retries > 10 {
            bail!("POST {url} failed 10 times; last: {problem}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(super) struct Driven {
    pub(super) started: Instant,
    pub(super) elapsed: Duration,
    pub(super) requests: usize,
    pub(super) latencies_ms: Vec<f64>,
    /// Per post, in order: Unix ms when it was answered.
    pub(super) answered_ms: Vec<i64>,
    pub(super) accepted: u64,
    pub(super) duplicates: u64,
    pub(super) retries: u64,
}

/// Send every post, `clients` at a time, as fast as they are answered.
pub(super) async fn drive(
    client: &reqwest::Client,
    posts: Vec<Post>,
    clients: usize,
    bar: &ProgressBar,
) -> anyhow::Result<Driven> {
    let posts = Arc::new(posts);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..clients.max(1) {
        let (posts, next, client, bar) = (posts.clone(), next.clone(), client.clone(), bar.clone());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = posts.get(i) else {
                    return Ok::<_, anyhow::Error>(answers);
                };
                let a = post(&client, &p.url, p.auth, p.body.clone()).await?;
                bar.inc(p.events);
                answers.push((i, a));
            }
        });
    }
    let mut all = Vec::with_capacity(posts.len());
    while let Some(r) = tasks.join_next().await {
        all.extend(r.context("a client task")??);
    }
    let elapsed = started.elapsed();
    all.sort_by_key(|(i, _)| *i);
    Ok(Driven {
        started,
        elapsed,
        requests: all.len(),
        latencies_ms: all.iter().map(|(_, a)| a.latency_ms).collect(),
        answered_ms: all.iter().map(|(_, a)| a.answered_ms).collect(),
        accepted: all.iter().map(|(_, a)| a.accepted).sum(),
        duplicates: all.iter().map(|(_, a)| a.duplicates).sum(),
        retries: all.iter().map(|(_, a)| a.retries).sum(),
    })
}

pub(super) fn customer_index(id: &str) -> anyhow::Result<usize> {
    id.strip_prefix('c')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("unexpected customer id `{id}` in the outbox"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_bodies_are_json() {
        let posts = event_bodies(5, 2, &["http://a".into(), "http://b".into()]);
        assert_eq!(posts.len(), 3);
        assert_eq!(posts[1].url, "http://b/v1/events");
        let v: Json = serde_json::from_slice(&posts[2].body).expect("json");
        assert_eq!(v["events"][0]["customer_id"], json!("c00000004"));
        let v: Json = serde_json::from_str(&events_json(0..1, Some("2026-01-01T00:00:00.000Z")))
            .expect("json");
        assert_eq!(
            v["events"][0]["occurred_at"],
            json!("2026-01-01T00:00:00.000Z")
        );
    }
}
