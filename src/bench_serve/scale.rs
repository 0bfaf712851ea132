//! `scale` (Postgres): deliveries with a slow receiver, one daemon and then several on one
//! database; messages/s of each and their ratio; every event's message delivered exactly
//! once (one outbox row per event, no key twice, none missing).

use std::time::Duration;

use serde_json::json;

use super::db::is_postgres;
use super::deliver::measure_delivery;
use super::report::number;
use super::setup::{Setup, s_backend_label};
use super::{Ctx, Outcome};

pub(super) async fn scale(ctx: &Ctx<'_>) -> anyhow::Result<Outcome> {
    let n = ctx.args.events.unwrap_or(20_000);
    let url = match ctx.args.database.as_deref() {
        Some(u) if is_postgres(u) => u.to_owned(),
        _ => std::env::var("CANVAS_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
    };
    let delay = Duration::from_millis(ctx.args.delay_ms);
    let k = ctx.args.daemons.max(2);
    let mut results = Vec::new();
    for daemons in [1, k] {
        let mut s = Setup::start(
            ctx,
            Some(&url),
            &format!("scale{daemons}"),
            ctx.args.scale_concurrency,
            delay,
            daemons,
            n,
        )
        .await?;
        let d = measure_delivery(ctx, &mut s, n).await?;
        let notes = s.finish().await;
        results.push((daemons, d, notes));
    }
    let (one, many) = (&results[0], &results[1]);
    let ratio = many.1.rate / one.1.rate;
    let clean = results.iter().all(|(_, d, _)| d.clean());
    let ceiling = ctx.args.scale_concurrency as f64 * 1000.0 / ctx.args.delay_ms.max(1) as f64;
    let mut report = vec![format!(
        "{n} events, receiver answers after {} ms, `sms` concurrency {} per daemon (ceiling {} messages/s per daemon), {}",
        ctx.args.delay_ms,
        ctx.args.scale_concurrency,
        number(ceiling, 0),
        s_backend_label(&one.2.backend)
    )];
    for (daemons, d, notes) in &results {
        report.push(format!(
            "{daemons} daemon{}:",
            if *daemons == 1 { "" } else { "s" }
        ));
        report.extend(d.lines().into_iter().map(|l| format!("  {l}")));
        report.extend(notes.lines.iter().map(|l| format!("  {l}")));
    }
    report.push(format!(
        "ratio {k} daemons / 1: {}× ({} / {} messages/s); every event's message delivered exactly once: {}",
        number(ratio, 2),
        number(many.1.rate, 0),
        number(one.1.rate, 0),
        if clean { "yes" } else { "NO" }
    ));
    Ok(Outcome {
        scenario: "scale",
        backend: one.2.backend.clone(),
        measure: "× messages/s, N daemons vs 1",
        value: ratio,
        target: "≥ 2.5×".into(),
        met: ratio >= 2.5 && clean,
        caveat: results
            .iter()
            .find(|(_, d, _)| !d.clean())
            .map(|(daemons, d, _)| format!("{daemons} daemons: {}", d.problem())),
        report,
        figures: json!({
            "events": n, "delay_ms": ctx.args.delay_ms, "concurrency_per_daemon": ctx.args.scale_concurrency,
            "one": one.1.json(), "many": many.1.json(), "daemons": k, "ratio": ratio,
            "every_key_once": clean,
        }),
    })
}
