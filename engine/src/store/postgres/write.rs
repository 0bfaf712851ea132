//! Postgres writes: a whole batch as one statement of data-modifying CTEs, each table's
//! rows bound as column arrays expanded by `UNNEST`; the bind functions say how each record
//! becomes its columns.

use super::*;

// ---- the commit: one statement --------------------------------------------------------------

/// `$n::type[], …` for the next parameters.
pub(super) fn arrays(n: &mut usize, types: &[&str]) -> String {
    let mut out = String::new();
    for (i, ty) in types.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&format!("${}::{ty}[]", *n));
        *n += 1;
    }
    out
}

pub(super) fn upsert_customers(n: &mut usize) -> String {
    format!(
        "INSERT INTO customers (id, attributes, timezone, sends, cooldowns, unsubscribed_at,
                                updated_at)
         SELECT id, a::json, tz, s::json, c::json, x, u
         FROM UNNEST({}) AS t(id, a, tz, s, c, x, u)
         ON CONFLICT (id) DO UPDATE SET attributes = EXCLUDED.attributes,
             timezone = EXCLUDED.timezone, sends = EXCLUDED.sends,
             cooldowns = EXCLUDED.cooldowns, unsubscribed_at = EXCLUDED.unsubscribed_at,
             updated_at = EXCLUDED.updated_at",
        arrays(n, &["text", "text", "text", "text", "text", "int8", "int8"])
    )
}

pub(super) fn upsert_enrolments(n: &mut usize) -> String {
    format!(
        "INSERT INTO enrolments (customer_id, flow, entries, last_entered_at, active_run,
             in_segment)
         SELECT * FROM UNNEST({})
         ON CONFLICT (customer_id, flow) DO UPDATE SET entries = EXCLUDED.entries,
             last_entered_at = EXCLUDED.last_entered_at, active_run = EXCLUDED.active_run,
             in_segment = EXCLUDED.in_segment",
        arrays(n, &["text", "text", "int8", "int8", "text", "bool"])
    )
}

pub(crate) fn insert_history(n: &mut usize) -> String {
    format!(
        "INSERT INTO history (run_id, seq, flow, customer_id, step, at, action, detail)
         SELECT r, s, f, c, st, a, ac, d::json
         FROM UNNEST({}) WITH ORDINALITY AS t(r, s, f, c, st, a, ac, d, n)
         ORDER BY n
         ON CONFLICT DO NOTHING",
        arrays(
            n,
            &[
                "text", "int8", "text", "text", "text", "int8", "text", "text"
            ]
        )
    )
}

pub(crate) fn insert_outbox(n: &mut usize) -> String {
    format!(
        "INSERT INTO outbox (key, kind, run_id, flow, customer_id, step, channel, address,
             template, payload, transactional, created_at, next_attempt_at)
         SELECT k, ki, r, f, c, st, ch, ad, te, p::json, tr, ca, ca
         FROM UNNEST({}) WITH ORDINALITY AS t(k, ki, r, f, c, st, ch, ad, te, p, tr, ca, n)
         ORDER BY n
         ON CONFLICT DO NOTHING",
        arrays(
            n,
            &[
                "text", "text", "text", "text", "text", "text", "text", "text", "text", "text",
                "bool", "int8",
            ]
        )
    )
}

pub(super) fn insert_conversions(n: &mut usize) -> String {
    format!(
        "INSERT INTO conversions (run_id, flow, version, customer_id, arm, last_touch,
             event_id, at)
         SELECT * FROM UNNEST({})
         ON CONFLICT DO NOTHING",
        arrays(
            n,
            &[
                "text", "text", "text", "text", "text", "text", "text", "int8"
            ]
        )
    )
}

pub(super) fn upsert_failures(n: &mut usize) -> String {
    format!(
        "INSERT INTO failures (flow, step, customer_id, count, error, at)
         SELECT * FROM UNNEST({})
         ON CONFLICT (flow, step, customer_id) DO UPDATE SET
             count = failures.count + EXCLUDED.count, error = EXCLUDED.error, at = EXCLUDED.at",
        arrays(n, &["text", "text", "text", "int8", "text", "int8"])
    )
}

/// The counters in key order (`WITH ORDINALITY`): two daemons whose shards collide lock
/// the rows they share in one order, so they queue instead of deadlocking.
pub(super) fn upsert_counts(n: &mut usize) -> String {
    let cols = arrays(n, &["text", "int8", "text", "text", "text", "int8"]);
    let shard = *n;
    *n += 1;
    format!(
        "INSERT INTO step_counts (flow, day, version, step, metric, shard, n)
         SELECT f, d, v, s, m, ${shard}::int8, k
         FROM UNNEST({cols}) WITH ORDINALITY AS t(f, d, v, s, m, k, o)
         ORDER BY o
         ON CONFLICT (flow, day, version, step, metric, shard) DO UPDATE SET
             n = step_counts.n + EXCLUDED.n"
    )
}

pub(super) fn upsert_waiting(n: &mut usize) -> String {
    let cols = arrays(n, &["text", "text", "text", "int8"]);
    let shard = *n;
    *n += 1;
    format!(
        "INSERT INTO step_waiting (flow, version, step, shard, n)
         SELECT f, v, s, ${shard}::int8, k
         FROM UNNEST({cols}) WITH ORDINALITY AS t(f, v, s, k, o)
         ORDER BY o
         ON CONFLICT (flow, version, step, shard) DO UPDATE SET n = step_waiting.n + EXCLUDED.n"
    )
}

pub(crate) fn upsert_runs(n: &mut usize) -> String {
    format!(
        "INSERT INTO runs (id, flow, version, customer_id, status, step, wake_at, waiting_for,
             vars, event, arm, last_touch, goal_until, converted_at, outcome, seq, entered_at,
             updated_at, splits)
         SELECT id, f, v, c, st, sp, w, wf, va::json, ev::json, a, lt, gu, ca, o, s, ea, ua,
             sl::json
         FROM UNNEST({})
             AS t(id, f, v, c, st, sp, w, wf, va, ev, a, lt, gu, ca, o, s, ea, ua, sl)
         ON CONFLICT (id) DO UPDATE SET flow = EXCLUDED.flow, version = EXCLUDED.version,
             customer_id = EXCLUDED.customer_id, status = EXCLUDED.status,
             step = EXCLUDED.step, wake_at = EXCLUDED.wake_at,
             waiting_for = EXCLUDED.waiting_for, vars = EXCLUDED.vars, event = EXCLUDED.event,
             arm = EXCLUDED.arm, last_touch = EXCLUDED.last_touch,
             goal_until = EXCLUDED.goal_until, converted_at = EXCLUDED.converted_at,
             outcome = EXCLUDED.outcome, seq = EXCLUDED.seq, entered_at = EXCLUDED.entered_at,
             updated_at = EXCLUDED.updated_at, splits = EXCLUDED.splits",
        arrays(
            n,
            &[
                "text", "text", "text", "text", "text", "text", "int8", "text", "text", "text",
                "text", "text", "int8", "int8", "text", "int8", "int8", "int8", "text",
            ]
        )
    )
}

/// The whole batch as ONE statement: a data-modifying CTE per table, each expanding its
/// column arrays with `UNNEST`. One round trip, atomic on its own (no BEGIN/COMMIT round
/// trips), prepared once; a table with no rows gets empty arrays, which cost next to
/// nothing.
pub(super) fn commit_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let mut n = 1;
        let customers = upsert_customers(&mut n);
        let enrolments = upsert_enrolments(&mut n);
        let history = insert_history(&mut n);
        let outbox = insert_outbox(&mut n);
        let conversions = insert_conversions(&mut n);
        let runs = upsert_runs(&mut n);
        let failures = upsert_failures(&mut n);
        let counts = upsert_counts(&mut n);
        let waiting = upsert_waiting(&mut n);
        let (done, applied) = (n, n + 1);
        format!(
            "WITH customers_ AS ({customers}),
             enrolments_ AS ({enrolments}),
             history_ AS ({history}),
             outbox_ AS ({outbox}),
             conversions_ AS ({conversions}),
             runs_ AS ({runs}),
             failures_ AS ({failures}),
             counts_ AS ({counts}),
             waiting_ AS ({waiting}),
             inbox_ AS (UPDATE inbox SET applied_at = ${applied}
                        WHERE seq = ANY(${done}::int8[]) AND applied_at IS NULL)
             SELECT 1"
        )
    })
}

// ---- column vectors, borrowed from the batch ----------------------------------------------

pub(crate) type Q<'a> = sqlx::query::Query<'a, Postgres, sqlx::postgres::PgArguments>;

pub(super) fn cols<T>(n: usize) -> Vec<T> {
    Vec::with_capacity(n)
}

pub(super) fn bind_customers<'a>(q: Q<'a>, rows: &[&'a Customer]) -> Result<Q<'a>> {
    const T: &str = "customers";
    let n = rows.len();
    let (mut id, mut a, mut tz, mut s, mut c, mut un, mut u) = (
        cols::<&str>(n),
        cols(n),
        cols::<Option<&str>>(n),
        cols(n),
        cols(n),
        cols::<Option<i64>>(n),
        cols(n),
    );
    for x in rows {
        id.push(x.id.as_str());
        a.push(to_json(T, &x.attributes)?);
        tz.push(x.timezone.as_deref());
        s.push(to_json(T, &x.sends)?);
        c.push(to_json(T, &x.cooldowns)?);
        un.push(x.unsubscribed_at.map(ms));
        u.push(ms(x.updated_at));
    }
    Ok(q.bind(id).bind(a).bind(tz).bind(s).bind(c).bind(un).bind(u))
}

pub(super) fn bind_enrolments<'a>(q: Q<'a>, rows: &[&'a Enrolment]) -> Q<'a> {
    let n = rows.len();
    let (mut c, mut f, mut e, mut l, mut a, mut s) = (
        cols::<&str>(n),
        cols::<&str>(n),
        cols(n),
        cols(n),
        cols::<Option<&str>>(n),
        cols(n),
    );
    for x in rows {
        c.push(x.customer_id.as_str());
        f.push(x.flow.as_str());
        e.push(i64::from(x.entries));
        l.push(opt_ms(x.last_entered_at));
        a.push(x.active_run.as_deref());
        s.push(x.in_segment);
    }
    q.bind(c).bind(f).bind(e).bind(l).bind(a).bind(s)
}

pub(crate) fn bind_history<'a>(q: Q<'a>, rows: &[&'a HistoryEntry]) -> Result<Q<'a>> {
    let n = rows.len();
    let (mut r, mut s, mut f, mut c) = (cols::<&str>(n), cols(n), cols::<&str>(n), cols::<&str>(n));
    let (mut st, mut a, mut ac, mut d) = (cols::<&str>(n), cols(n), cols::<&str>(n), cols(n));
    for h in rows {
        r.push(h.run_id.as_str());
        s.push(i64::from(h.seq));
        f.push(h.flow.as_str());
        c.push(h.customer_id.as_str());
        st.push(h.step.as_str());
        a.push(ms(h.at));
        ac.push(h.action.as_str());
        d.push(to_json("history", &h.detail)?);
    }
    Ok(q.bind(r)
        .bind(s)
        .bind(f)
        .bind(c)
        .bind(st)
        .bind(a)
        .bind(ac)
        .bind(d))
}

pub(crate) fn bind_outbox<'a>(q: Q<'a>, rows: &[&'a OutboxRow]) -> Result<Q<'a>> {
    let n = rows.len();
    let (mut k, mut ki, mut r, mut f) = (
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<&str>(n),
    );
    let (mut c, mut st, mut ch, mut ad) = (
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<Option<&str>>(n),
    );
    let (mut te, mut p, mut tr, mut ca) = (cols::<Option<&str>>(n), cols(n), cols(n), cols(n));
    for o in rows {
        k.push(o.key.as_str());
        ki.push(o.kind.as_str());
        r.push(o.run_id.as_str());
        f.push(o.flow.as_str());
        c.push(o.customer_id.as_str());
        st.push(o.step.as_str());
        ch.push(o.channel.as_str());
        ad.push(o.address.as_deref());
        te.push(o.template.as_deref());
        p.push(to_json("outbox", &o.payload)?);
        tr.push(o.transactional);
        ca.push(ms(o.created_at));
    }
    Ok(q.bind(k)
        .bind(ki)
        .bind(r)
        .bind(f)
        .bind(c)
        .bind(st)
        .bind(ch)
        .bind(ad)
        .bind(te)
        .bind(p)
        .bind(tr)
        .bind(ca))
}

pub(super) fn bind_counts<'a>(q: Q<'a>, rows: &'a [Count], shard: i64) -> Q<'a> {
    let n = rows.len();
    let (mut f, mut d, mut v) = (cols::<&str>(n), cols::<i64>(n), cols::<&str>(n));
    let (mut s, mut m, mut k) = (cols::<&str>(n), cols::<&str>(n), cols::<i64>(n));
    for c in rows {
        f.push(c.flow.as_str());
        d.push(i64::from(c.day.unwrap_or_default()));
        v.push(c.version.as_str());
        s.push(c.step.as_str());
        m.push(c.metric.as_str());
        k.push(c.n);
    }
    q.bind(f)
        .bind(d)
        .bind(v)
        .bind(s)
        .bind(m)
        .bind(k)
        .bind(shard)
}

pub(super) fn bind_waiting<'a>(q: Q<'a>, rows: &'a [Count], shard: i64) -> Q<'a> {
    let n = rows.len();
    let (mut f, mut v) = (cols::<&str>(n), cols::<&str>(n));
    let (mut s, mut k) = (cols::<&str>(n), cols::<i64>(n));
    for c in rows {
        f.push(c.flow.as_str());
        v.push(c.version.as_str());
        s.push(c.step.as_str());
        k.push(c.n);
    }
    q.bind(f).bind(v).bind(s).bind(k).bind(shard)
}

pub(super) fn bind_failures<'a>(q: Q<'a>, rows: &[&'a Failure]) -> Q<'a> {
    let n = rows.len();
    let (mut f, mut s, mut c, mut k) = (
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<i64>(n),
    );
    let (mut e, mut t) = (cols::<&str>(n), cols::<i64>(n));
    for r in rows {
        f.push(r.flow.as_str());
        s.push(r.step.as_str());
        c.push(r.customer_id.as_str());
        k.push(i64::try_from(r.count).unwrap_or(i64::MAX));
        e.push(r.error.as_str());
        t.push(ms(r.at));
    }
    q.bind(f).bind(s).bind(c).bind(k).bind(e).bind(t)
}

pub(super) fn bind_conversions<'a>(q: Q<'a>, rows: &[&'a Conversion]) -> Q<'a> {
    let n = rows.len();
    let (mut r, mut f, mut v, mut c) = (
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<&str>(n),
    );
    let (mut a, mut l, mut e, mut t) = (
        cols::<&str>(n),
        cols::<Option<&str>>(n),
        cols::<&str>(n),
        cols(n),
    );
    for x in rows {
        r.push(x.run_id.as_str());
        f.push(x.flow.as_str());
        v.push(x.version.as_str());
        c.push(x.customer_id.as_str());
        a.push(arm_str(x.arm));
        l.push(x.last_touch.as_deref());
        e.push(x.event_id.as_str());
        t.push(ms(x.at));
    }
    q.bind(r)
        .bind(f)
        .bind(v)
        .bind(c)
        .bind(a)
        .bind(l)
        .bind(e)
        .bind(t)
}

pub(crate) fn bind_runs<'a>(q: Q<'a>, rows: &[&'a Run]) -> Result<Q<'a>> {
    const T: &str = "runs";
    let n = rows.len();
    let (mut id, mut f, mut v, mut c) = (
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<&str>(n),
        cols::<&str>(n),
    );
    let (mut st, mut sp, mut w, mut wf) = (
        cols::<&str>(n),
        cols::<Option<&str>>(n),
        cols(n),
        cols::<Option<&str>>(n),
    );
    let (mut va, mut ev, mut a, mut lt) = (
        cols(n),
        cols::<Option<String>>(n),
        cols::<&str>(n),
        cols::<Option<&str>>(n),
    );
    let (mut gu, mut ca, mut o) = (cols(n), cols(n), cols::<Option<&str>>(n));
    let (mut s, mut ea, mut ua, mut sl) = (cols(n), cols(n), cols(n), cols::<Option<String>>(n));
    for r in rows {
        sl.push(codec::splits_json(r)?);
        id.push(r.id.as_str());
        f.push(r.flow.as_str());
        v.push(r.version.as_str());
        c.push(r.customer_id.as_str());
        st.push(r.status.as_str());
        sp.push(r.step.as_deref());
        w.push(opt_ms(r.wake_at));
        wf.push(r.waiting_for.as_deref());
        va.push(to_json(T, &r.vars)?);
        ev.push(r.event.as_ref().map(|e| to_json(T, e)).transpose()?);
        a.push(arm_str(r.arm));
        lt.push(r.last_touch.as_deref());
        gu.push(opt_ms(r.goal_until));
        ca.push(opt_ms(r.converted_at));
        o.push(r.outcome.as_deref());
        s.push(i64::from(r.seq));
        ea.push(ms(r.entered_at));
        ua.push(ms(r.updated_at));
    }
    Ok(q.bind(id)
        .bind(f)
        .bind(v)
        .bind(c)
        .bind(st)
        .bind(sp)
        .bind(w)
        .bind(wf)
        .bind(va)
        .bind(ev)
        .bind(a)
        .bind(lt)
        .bind(gu)
        .bind(ca)
        .bind(o)
        .bind(s)
        .bind(ea)
        .bind(ua)
        .bind(sl))
}
