//! `deliver`: a burst of events, then outbox rows delivered per second at the receiver; the
//! measurement `scale` repeats with one daemon and with several.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use canvas_engine::store::Store;
use serde_json::{Value as Json, json};

use super::load::{customer_index, drive, event_bodies};
use super::report::{CpuUse, CpuWindow, Dist, number, progress};
use super::setup::{Setup, s_backend_label};
use super::{Ctx, Outcome};

pub(super) async fn deliver(ctx: &Ctx<'_>) -> anyhow::Result<Outcome> {
    let n = ctx.args.events.unwrap_or(100_000);
    let mut s = Setup::start(
        ctx,
        ctx.args.database.as_deref(),
        "deliver",
        ctx.args.concurrency,
        Duration::ZERO,
        1,
        n,
    )
    .await?;
    let d = measure_delivery(ctx, &mut s, n).await?;
    let notes = s.finish().await;
    let mut report = vec![format!(
        "{n} events posted at once ({} s), `sms` concurrency {}, receiver answers at once, {}",
        number(d.post_secs, 2),
        ctx.args.concurrency,
        s_backend_label(&notes.backend)
    )];
    report.extend(d.lines());
    report.extend(notes.lines.iter().cloned());
    Ok(Outcome {
        scenario: "deliver",
        backend: notes.backend.clone(),
        measure: "messages/s delivered",
        value: d.rate,
        target: "≥ 5,000/s".into(),
        met: d.rate >= 5_000.0 && d.clean(),
        caveat: (!d.clean()).then(|| d.problem()),
        report,
        figures: d.json(),
    })
}

/// Deliveries of a burst of `n` events: the rate at the receiver and the checks.
pub(super) struct Delivery {
    pub(super) post_secs: f64,
    pub(super) posted_per_second: f64,
    pub(super) rate: f64,
    pub(super) window_secs: f64,
    pub(super) requests: u64,
    pub(super) duplicates: usize,
    pub(super) missing: usize,
    pub(super) unexpected: usize,
    /// Customers with more than one outbox row: their one event was applied twice.
    pub(super) twice: usize,
    pub(super) extra_rows: usize,
    pub(super) first_delivery_secs: f64,
    pub(super) latency: Dist,
    pub(super) cpu: CpuUse,
    pub(super) daemons: usize,
}

impl Delivery {
    /// Every message delivered, once, and one per event.
    pub(super) fn clean(&self) -> bool {
        self.duplicates == 0 && self.missing == 0 && self.unexpected == 0 && self.twice == 0
    }

    /// What is wrong when not [`Delivery::clean`], in a few words.
    pub(super) fn problem(&self) -> String {
        let mut p = Vec::new();
        if self.twice > 0 {
            p.push(format!(
                "{} events applied twice",
                number(self.twice as f64, 0)
            ));
        }
        if self.duplicates > 0 {
            p.push(format!("{} keys received twice", self.duplicates));
        }
        if self.missing > 0 {
            p.push(format!("{} keys never received", self.missing));
        }
        if self.unexpected > 0 {
            p.push(format!("{} unknown keys", self.unexpected));
        }
        p.join(", ")
    }

    pub(super) fn lines(&self) -> Vec<String> {
        vec![
            format!(
                "delivered            {} messages/s at the receiver (first to last delivery: {} s)",
                number(self.rate, 0),
                number(self.window_secs, 2)
            ),
            format!(
                "posted               in {} s ({} events/s); the first delivery came {} s after the first POST",
                number(self.post_secs, 2),
                number(self.posted_per_second, 0),
                number(self.first_delivery_secs, 2)
            ),
            format!("event → delivered    {}", self.latency.text("ms")),
            format!(
                "receiver             {} requests, {} keys twice or more, {} outbox keys never received, {} unknown keys",
                self.requests, self.duplicates, self.missing, self.unexpected
            ),
            if self.twice == 0 {
                "engine               one outbox row per event, as the flow says".to_owned()
            } else {
                format!(
                    "ENGINE               {} customers' one event was applied twice: {} extra runs, {} extra messages delivered",
                    number(self.twice as f64, 0),
                    number(self.extra_rows as f64, 0),
                    number(self.extra_rows as f64, 0)
                )
            },
            format!("CPU over the window  {}", self.cpu.text()),
        ]
    }

    pub(super) fn json(&self) -> Json {
        json!({
            "daemons": self.daemons,
            "messages_per_second": self.rate, "window_seconds": self.window_secs,
            "post_seconds": self.post_secs, "first_delivery_after_seconds": self.first_delivery_secs,
            "event_to_delivered_ms": self.latency, "requests": self.requests,
            "duplicates": self.duplicates, "missing": self.missing, "unexpected": self.unexpected,
            "customers_with_two_runs": self.twice, "extra_outbox_rows": self.extra_rows,
            "cpu": self.cpu,
        })
    }
}

pub(super) async fn measure_delivery(
    ctx: &Ctx<'_>,
    s: &mut Setup,
    n: usize,
) -> anyhow::Result<Delivery> {
    let bases: Vec<String> = s.daemons.iter().map(|d| d.base.clone()).collect();
    let bodies = event_bodies(n, ctx.args.batch, &bases);
    let bar = progress(n as u64, "POST /v1/events");
    let cpu = CpuWindow::start(&s.daemons);
    let driven = drive(&ctx.client, bodies, ctx.args.clients, &bar).await?;
    bar.finish_and_clear();
    if driven.accepted != n as u64 {
        bail!("the daemons accepted {} of {n} events", driven.accepted);
    }
    let done = progress(n as u64, "delivered");
    s.wait_delivered(n as u64, &done).await?;
    // Every event applied, then every outbox row delivered: an event applied twice makes a
    // second run, with a key of its own, that must be counted too.
    // A round that read its items before another daemon applied them may still be
    // committing when the inbox is empty: wait for the outbox to stay the same for a second.
    let mut last = (u64::MAX, Instant::now());
    let rows = loop {
        let counts = s.store.counts().await?;
        if counts.inbox_pending > 0 || counts.outbox != last.0 {
            last = (counts.outbox, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) {
            break s.store.outbox(None).await?;
        }
        s.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    done.set_length(rows.len() as u64);
    s.wait_delivered(rows.len() as u64, &done).await?;
    done.finish_and_clear();
    let cpu = cpu.finish(&s.daemons);
    let mut per_customer: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *per_customer.entry(r.customer_id.as_str()).or_default() += 1;
    }
    let twice = per_customer.values().filter(|c| **c > 1).count();
    if per_customer.len() != n {
        bail!(
            "{} of {n} customers got an outbox row ({} rows)",
            per_customer.len(),
            rows.len()
        );
    }
    let (first, last) = s
        .recv
        .window()
        .ok_or_else(|| anyhow!("nothing was delivered"))?;
    let window = last.duration_since(first).as_secs_f64();
    let seen = s.recv.seen();
    let mut missing = 0;
    let mut latency = Vec::with_capacity(n);
    for row in &rows {
        match seen.get(&row.key) {
            Some(&(_, at)) => {
                let i = customer_index(&row.customer_id)?;
                let batch = i / ctx.args.batch.max(1);
                latency.push((at - driven.answered_ms[batch]) as f64);
            }
            None => missing += 1,
        }
    }
    let keys: std::collections::HashSet<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let unexpected = seen.keys().filter(|k| !keys.contains(k.as_str())).count();
    let duplicates = seen.values().filter(|(c, _)| *c > 1).count();
    Ok(Delivery {
        post_secs: driven.elapsed.as_secs_f64(),
        posted_per_second: n as f64 / driven.elapsed.as_secs_f64(),
        rate: if window > 0.0 {
            s.recv.unique() as f64 / window
        } else {
            0.0
        },
        window_secs: window,
        requests: s.recv.requests(),
        duplicates,
        missing,
        unexpected,
        twice,
        extra_rows: rows.len() - n,
        first_delivery_secs: first
            .saturating_duration_since(driven.started)
            .as_secs_f64(),
        latency: Dist::of(latency),
        cpu,
        daemons: s.daemons.len(),
    })
}
