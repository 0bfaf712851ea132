//! `ingest`: `POST /v1/events` in batches from concurrent clients, as fast as the daemon
//! answers; events/s accepted and request latency.

use std::time::Duration;

use anyhow::bail;
use serde_json::json;

use super::load::{drive, event_bodies};
use super::report::{CpuWindow, Dist, number, progress, secs, secs_ms};
use super::setup::{Setup, s_backend_label};
use super::{Ctx, Outcome};

pub(super) async fn ingest(ctx: &Ctx<'_>) -> anyhow::Result<Outcome> {
    let n = ctx.args.events.unwrap_or(200_000);
    let mut s = Setup::start(
        ctx,
        ctx.args.database.as_deref(),
        "ingest",
        ctx.args.concurrency,
        Duration::ZERO,
        1,
        n,
    )
    .await?;
    let bodies = event_bodies(n, ctx.args.batch, &[s.daemons[0].base.clone()]);
    let bar = progress(n as u64, "POST /v1/events");
    let cpu = CpuWindow::start(&s.daemons);
    let started_ms = chrono::Utc::now().timestamp_millis();
    let driven = drive(&ctx.client, bodies, ctx.args.clients, &bar).await?;
    let cpu = cpu.finish(&s.daemons);
    bar.finish_and_clear();
    let rate = driven.accepted as f64 / driven.elapsed.as_secs_f64();
    if driven.accepted != n as u64 {
        bail!(
            "the daemon accepted {} of {n} events ({} duplicates)",
            driven.accepted,
            driven.duplicates
        );
    }
    // Not the target, but what it means: does the engine keep up, or is the inbox a queue?
    let drain = progress(n as u64, "engine + delivery");
    s.wait_delivered(n as u64, &drain).await?;
    drain.finish_and_clear();
    let all_delivered = s.recv.last_ms().unwrap_or(started_ms) - started_ms;
    let lat = Dist::of(driven.latencies_ms.clone());
    let notes = s.finish().await;
    let mut report = vec![
        format!(
            "{n} events (one customer each) in batches of {} from {} clients, {}",
            ctx.args.batch,
            ctx.args.clients,
            s_backend_label(&notes.backend)
        ),
        format!(
            "accepted (HTTP 200)  {} events/s  ({} s; {} requests, {} retried)",
            number(rate, 0),
            secs(driven.elapsed),
            driven.requests,
            driven.retries
        ),
        format!("request latency      {}", lat.text("ms")),
        format!(
            "end to end           all {n} delivered {} s after the first event: {} events/s through engine and dispatcher",
            secs_ms(all_delivered),
            number(n as f64 / (all_delivered.max(1) as f64 / 1000.0), 0)
        ),
        format!("CPU while posting    {}", cpu.text()),
    ];
    report.extend(notes.lines.iter().cloned());
    Ok(Outcome {
        scenario: "ingest",
        backend: notes.backend.clone(),
        measure: "events/s accepted",
        value: rate,
        target: "≥ 20,000/s".into(),
        met: rate >= 20_000.0,
        caveat: None,
        report,
        figures: json!({
            "events": n, "batch": ctx.args.batch, "clients": ctx.args.clients,
            "seconds": driven.elapsed.as_secs_f64(), "events_per_second": rate,
            "request_latency_ms": lat, "retries": driven.retries,
            "all_delivered_after_ms": all_delivered, "cpu": cpu,
        }),
    })
}
