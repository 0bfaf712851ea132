//! `rate-limit` (issue 9, item 2): an `sms` channel with `rate_limit` and more messages than
//! it can send within its outbox lease (`server.leases.outbox`, short here so the run takes
//! seconds, not minutes). The receiver checks every signature as docs/channels.md tells
//! receivers to and counts keys that arrive more than once; every message should arrive
//! once, signed with the time of its attempt.

use std::time::{Duration, Instant};

use anyhow::bail;
use canvas_engine::store::Store;
use serde_json::json;

use super::db::{Bind, Peek};
use super::load::{drive, event_bodies};
use super::receiver::SIGNATURE_TOLERANCE;
use super::report::{Dist, number, progress};
use super::setup::{Plan, Setup, s_backend_label};
use super::{Ctx, Outcome};

/// The `sms` channel's signing secret in this scenario.
const SECRET: &str = "canvas-bench-signing-secret";
/// `t` is whole seconds: a signature made at the attempt is under a second old on arrival,
/// plus the time in transit.
const FRESH: Duration = Duration::from_secs(2);
/// After the last pending row is settled, copies may still wait for a rate token: the run
/// ends when nothing arrived for this long.
const QUIET: Duration = Duration::from_secs(3);

pub(super) async fn rate_limit(ctx: &Ctx<'_>) -> anyhow::Result<Outcome> {
    let n = ctx.args.events.unwrap_or(150);
    let rate = ctx.args.rate_limit;
    if !rate.is_finite() || rate <= 0.0 {
        bail!("--rate-limit must be positive");
    }
    let lease = ctx.args.outbox_lease.trim();
    if lease.is_empty() || lease.contains(['\n', ':', '#']) {
        bail!("--outbox-lease must be a duration such as 5s");
    }
    let channel = [format!("rate_limit: {rate}")];
    let server = format!("server:\n  leases:\n    outbox: {lease}\n");
    let plan = Plan {
        concurrency: ctx.args.concurrency,
        customers: n,
        channel: &channel,
        server: &server,
        secret: Some(SECRET),
        ..Plan::new("rate-limit", ctx.args.database.as_deref())
    };
    let mut s = Setup::with(ctx, &plan).await?;
    let peek = Peek::connect(&s.db.url).await?;
    let bodies = event_bodies(n, ctx.args.batch, &[s.daemons[0].base.clone()]);
    let bar = progress(n as u64, "POST /v1/events");
    let driven = drive(&ctx.client, bodies, ctx.args.clients, &bar).await?;
    bar.finish_and_clear();
    if driven.accepted != n as u64 {
        bail!("the daemon accepted {} of {n} events", driven.accepted);
    }
    // Until every message is settled (sent or dead) and no copy is still on its way.
    let bar = progress(n as u64, &format!("delivering at {rate}/s"));
    let limit = Duration::from_secs_f64(n as f64 / rate * 3.0 + 120.0);
    let started = Instant::now();
    let mut activity = (0u64, Instant::now());
    let total = loop {
        let (_, refused) = s.recv.signatures();
        let seen = s.recv.requests() + refused;
        if seen != activity.0 {
            activity = (seen, Instant::now());
        }
        bar.set_position(s.recv.unique());
        let rows = peek.number("SELECT count(*) FROM outbox", &[]).await?;
        let pending = peek
            .number(
                "SELECT count(*) FROM outbox WHERE status = $1",
                &[Bind::Text("pending")],
            )
            .await?;
        if rows >= n as i64 && pending == 0 && activity.1.elapsed() >= QUIET {
            break rows;
        }
        if started.elapsed() > limit {
            bail!(
                "after {} s, {rows} of {n} outbox rows were written and {pending} are still pending{}",
                limit.as_secs(),
                s.daemons[0].log_tail()
            );
        }
        s.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish_and_clear();
    let dead = peek
        .number(
            "SELECT count(*) FROM outbox WHERE status = $1",
            &[Bind::Text("dead")],
        )
        .await?;
    peek.close().await;
    let rows = s.store.outbox(None).await?;
    let seen = s.recv.seen();
    let missing = rows.iter().filter(|r| !seen.contains_key(&r.key)).count();
    let duplicates = seen.values().filter(|(c, _)| *c > 1).count();
    let requests = s.recv.requests();
    let (ages, refused) = s.recv.signatures();
    let ages = Dist::of(ages.iter().map(|a| *a as f64 / 1000.0).collect());
    let window = s
        .recv
        .requests_window()
        .map_or(0.0, |(a, b)| b.duration_since(a).as_secs_f64());
    let notes = s.finish().await;

    let fresh = ages.n > 0 && ages.max <= FRESH.as_secs_f64();
    let met = duplicates == 0 && fresh && missing == 0 && refused == 0;
    let mut misses = Vec::new();
    if duplicates > 0 {
        misses.push(format!("{duplicates} keys twice"));
    }
    if !fresh {
        misses.push(format!("signature {} s old", number(ages.max, 1)));
    }
    if missing > 0 {
        misses.push(format!("{missing} never received"));
    }
    if refused > 0 {
        misses.push(format!("{refused} refused"));
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let mut report = vec![
        format!(
            "{n} messages through an `sms` webhook with rate_limit {rate}/s (≥ {} s of sending), outbox lease {lease}, signed; {}",
            number(n as f64 / rate, 1),
            s_backend_label(&notes.backend)
        ),
        format!(
            "receiver             {requests} requests for {} outbox rows in {} s ({} a second); {} refused (signature bad or older than {} s)",
            total,
            number(window, 1),
            number(
                if window > 0.0 {
                    requests as f64 / window
                } else {
                    0.0
                },
                2
            ),
            refused,
            SIGNATURE_TOLERANCE.as_secs()
        ),
        format!(
            "duplicate keys       {duplicates} keys arrived more than once ({} extra requests)   target 0: {}",
            requests.saturating_sub(seen.len() as u64),
            verdict(duplicates == 0)
        ),
        format!(
            "signature age        {} (arrival − t)   target ≤ {} s (t is the attempt's time): {}",
            ages.text("s"),
            FRESH.as_secs(),
            verdict(fresh)
        ),
        format!(
            "outcome              {} of {} keys received, {missing} never; {dead} rows dead-lettered",
            seen.len(),
            rows.len()
        ),
    ];
    report.extend(notes.lines.iter().cloned());
    Ok(Outcome {
        scenario: "rate-limit",
        backend: notes.backend.clone(),
        measure: "keys received twice",
        value: duplicates as f64,
        target: format!("0, signature ≤ {} s", FRESH.as_secs()),
        met,
        caveat: (!met).then(|| misses.join(", ")),
        report,
        figures: json!({
            "messages": n, "rate_limit": rate, "outbox_lease": lease,
            "outbox_rows": total, "requests": requests, "duplicates": duplicates,
            "missing": missing, "dead": dead, "refused": refused,
            "signature_age_s": ages, "signature_fresh": fresh, "window_seconds": window,
        }),
    })
}
