//! `recovery` (issue 9, item 3): a burst of events fills the outbox; while the daemon
//! delivers, the bench SIGKILLs it `--kills` times, `--kill-every-ms` apart, starting it
//! again on the same database each time. Judged: seconds from the last kill until every
//! outbox key has reached the receiver. Keys that arrive twice are counted; a kill between
//! a send and its record makes one expected (the same key again, for the receiver to drop).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use canvas_engine::store::Store;
use serde_json::json;

use super::load::{drive, event_bodies};
use super::report::{number, progress};
use super::setup::{Plan, Setup, s_backend_label};
use super::{Ctx, Outcome};

/// "Within seconds": the target for the outbox to be empty after the last kill.
const TARGET: Duration = Duration::from_secs(10);
/// Fail only after this long without a new key: before the fix the restarted daemon waits
/// out the dead daemon's claims (2 minutes by default) in silence.
const STALL: Duration = Duration::from_secs(300);

pub(super) async fn recovery(ctx: &Ctx<'_>) -> anyhow::Result<Outcome> {
    let n = ctx.args.events.unwrap_or(60_000);
    let kills = ctx.args.kills;
    if kills == 0 {
        bail!("--kills must be at least 1");
    }
    let every = Duration::from_millis(ctx.args.kill_every_ms.max(1));
    let plan = Plan {
        concurrency: ctx.args.concurrency,
        delay: Duration::from_millis(ctx.args.delay_ms),
        customers: n,
        ..Plan::new("recovery", ctx.args.database.as_deref())
    };
    let mut s = Setup::with(ctx, &plan).await?;
    let bodies = event_bodies(n, ctx.args.batch, &[s.daemons[0].base.clone()]);
    let bar = progress(n as u64, "POST /v1/events");
    let driven = drive(&ctx.client, bodies, ctx.args.clients, &bar).await?;
    bar.finish_and_clear();
    if driven.accepted != n as u64 {
        bail!("the daemon accepted {} of {n} events", driven.accepted);
    }
    // The first kill comes `every` after delivery began.
    let waiting = Instant::now();
    while s.recv.unique() == 0 {
        if waiting.elapsed() > Duration::from_secs(60) {
            bail!(
                "nothing was delivered within 60 s{}",
                s.daemons[0].log_tail()
            );
        }
        s.check_alive()?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bar = progress(kills as u64, "SIGKILL and restart");
    let mut log: Vec<Kill> = Vec::with_capacity(kills);
    for _ in 0..kills {
        tokio::time::sleep(every).await;
        let delivered = s.recv.unique();
        let (killed, up) = s.kill_and_restart(0).await?;
        log.push(Kill {
            delivered,
            killed,
            up,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let last = log.last().ok_or_else(|| anyhow!("no kill happened"))?;
    let (last_killed, last_up, at_last_kill) = (last.killed, last.up, last.delivered);
    let bar = progress(n as u64, "delivered after the kills");
    s.wait_delivered_within(n as u64, &bar, STALL).await?;
    // An event applied twice makes a second row under a key of its own: deliver those too.
    let rows = s.store.outbox(None).await?;
    if rows.len() > n {
        bar.set_length(rows.len() as u64);
        s.wait_delivered_within(rows.len() as u64, &bar, STALL)
            .await?;
    }
    bar.finish_and_clear();
    let (_, done) = s
        .recv
        .window()
        .ok_or_else(|| anyhow!("nothing was delivered"))?;
    let seen = s.recv.seen();
    let keys: HashSet<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let missing = rows.iter().filter(|r| !seen.contains_key(&r.key)).count();
    let unexpected = seen.keys().filter(|k| !keys.contains(k.as_str())).count();
    let duplicates = seen.values().filter(|(c, _)| *c > 1).count();
    let mut per_customer: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *per_customer.entry(r.customer_id.as_str()).or_default() += 1;
    }
    let twice = per_customer.values().filter(|c| **c > 1).count();
    let requests = s.recv.requests();
    let notes = s.finish().await;

    let after_kill = done.saturating_duration_since(last_killed).as_secs_f64();
    let after_up = done.saturating_duration_since(last_up).as_secs_f64();
    let restarts: Vec<f64> = log
        .iter()
        .map(|k| k.up.duration_since(k.killed).as_secs_f64())
        .collect();
    let while_delivering = log.iter().filter(|k| k.delivered < n as u64).count();
    let late = at_last_kill >= n as u64;
    let met = after_kill <= TARGET.as_secs_f64() && missing == 0 && twice == 0 && !late;
    let mut misses = Vec::new();
    if after_kill > TARGET.as_secs_f64() {
        misses.push(format!("{} s after the last kill", number(after_kill, 1)));
    }
    if late {
        misses.push("every key arrived before the last kill".to_owned());
    }
    if missing > 0 {
        misses.push(format!("{missing} keys never received"));
    }
    if twice > 0 {
        misses.push(format!("{twice} events applied twice"));
    }
    let mut report = vec![
        format!(
            "{n} messages, `sms` concurrency {}, receiver answers after {} ms; {kills} SIGKILLs {} s apart, each followed by a restart on the same database; {}",
            ctx.args.concurrency,
            ctx.args.delay_ms,
            number(every.as_secs_f64(), 1),
            s_backend_label(&notes.backend)
        ),
        format!(
            "kills                {while_delivering} of {kills} while messages were still undelivered; keys received by each kill: {}",
            log.iter()
                .map(|k| number(k.delivered as f64, 0))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "restart              {} s from SIGKILL to listening (max over the kills)",
            number(restarts.iter().copied().fold(0.0, f64::max), 2)
        ),
        format!(
            "recovery             {} s from the last kill until every outbox key was received ({} s after the restart; {} keys were still to come at the kill)   target ≤ {} s: {}",
            number(after_kill, 1),
            number(after_up, 1),
            number(rows.len().saturating_sub(at_last_kill as usize) as f64, 0),
            TARGET.as_secs(),
            if after_kill <= TARGET.as_secs_f64() && !late {
                "met"
            } else {
                "MISSED"
            }
        ),
        format!(
            "receiver             {requests} requests, {duplicates} keys twice or more (expected only across a kill), {missing} outbox keys never received, {unexpected} unknown keys"
        ),
        if twice == 0 {
            "engine               one outbox row per event, as the flow says".to_owned()
        } else {
            format!("ENGINE               {twice} customers' one event was applied twice")
        },
    ];
    if late {
        report.push(
            "note: every key had arrived before the last kill; use more --events or a shorter --kill-every-ms"
                .to_owned(),
        );
    }
    report.extend(notes.lines.iter().cloned());
    Ok(Outcome {
        scenario: "recovery",
        backend: notes.backend.clone(),
        measure: "s from last kill to outbox empty",
        value: after_kill,
        target: format!("≤ {} s", TARGET.as_secs()),
        met,
        caveat: (!met).then(|| misses.join(", ")),
        report,
        figures: json!({
            "messages": n, "kills": kills, "kill_every_ms": every.as_millis() as u64,
            "kills_while_delivering": while_delivering,
            "delivered_at_each_kill": log.iter().map(|k| k.delivered).collect::<Vec<_>>(),
            "restart_seconds": restarts, "seconds_after_last_kill": after_kill,
            "seconds_after_last_restart": after_up, "requests": requests,
            "duplicates": duplicates, "missing": missing, "unexpected": unexpected,
            "customers_with_two_runs": twice, "outbox_rows": rows.len(),
        }),
    })
}

struct Kill {
    /// Distinct keys the receiver had when the kill came.
    delivered: u64,
    killed: Instant,
    /// The new daemon listening.
    up: Instant,
}
