//! Local clock readings as instants, with one policy for daylight saving time, shared by
//! cron schedules, `at()` and `wait: { until }`:
//!
//! - a local time in a **gap** (the clock jumps forward and the reading never happens) moves
//!   to the first minute after the gap: 02:30 on a spring-forward night in New York is 03:00;
//! - a local time in an **overlap** (the clock is set back and the reading happens twice)
//!   happens once, at the earlier instant: 01:30 on a fall-back night is 01:30 EDT, and a cron
//!   tick at 01:30 does not fire again at 01:30 EST.
//!
//! The `croner` library moves a gap tick only for a cron of one fixed time (`30 2 * * *`);
//! with a list or range of hours (`30 1,2 * * *`) it drops the tick, and it fires such a cron
//! twice in an overlap. So schedules are searched on the local clock alone (the library sees a
//! zone without daylight saving) and each local reading is resolved here.

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The longest gap searched past: gaps are an hour or so; the longest ever (Samoa, 2011)
/// was a day.
const MAX_GAP_MINUTES: i64 = 48 * 60;

/// A local clock reading in `tz` as an instant: the earlier one in an overlap, the first
/// minute after the gap in a gap.
pub fn resolve(naive: NaiveDateTime, tz: Tz) -> DateTime<Tz> {
    if let Some(t) = tz.from_local_datetime(&naive).earliest() {
        return t;
    }
    for minutes in 1..=MAX_GAP_MINUTES {
        if let Some(t) = tz
            .from_local_datetime(&(naive + Duration::minutes(minutes)))
            .earliest()
        {
            return t;
        }
    }
    tz.from_utc_datetime(&naive)
}

/// The first tick of `cron` (read on the clock of `tz`) strictly after `after`, under the
/// policy above: each local reading that matches fires once — a reading in a gap at the
/// first minute after the gap, a reading in an overlap at its earlier instant — and readings
/// that resolve to an instant already past (several gap readings moved to the same minute)
/// do not fire again. `None` when the cron has no further tick.
pub fn next_tick(cron: &croner::Cron, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // Readings at or before the local reading of `after` have had their turn: in an overlap
    // the clock reads the same time twice, and the second reading must not fire again. (A
    // reading in a gap is never behind: before the jump the clock reads less than the gap,
    // and after it every gap reading resolves to the jump itself, which is not after `after`.)
    let mut cursor = after.with_timezone(&tz).naive_local();
    // Readings that resolve to an instant already past: at most the readings of one overlap
    // (or of one long gap) of a cron that ticks every second.
    for _ in 0..(2 * MAX_GAP_MINUTES * 60) {
        cursor = cron
            .find_next_occurrence(&Utc.from_utc_datetime(&cursor), false)
            .ok()?
            .naive_utc();
        let at = resolve(cursor, tz).with_timezone(&Utc);
        if at > after {
            return Some(at);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    const NEW_YORK: Tz = chrono_tz::America::New_York;

    fn ticks(cron: &str, tz: Tz, from: &str, n: usize) -> Vec<String> {
        let cron = croner::Cron::from_str(cron).expect("cron");
        let mut t = DateTime::parse_from_rfc3339(from).expect("time").to_utc();
        let mut out = Vec::new();
        for _ in 0..n {
            t = next_tick(&cron, tz, t).expect("a tick");
            out.push(t.with_timezone(&tz).format("%F %H:%M %:z").to_string());
        }
        out
    }

    #[test]
    fn a_cron_with_a_list_of_hours_lost_the_tick_in_a_dst_gap() {
        assert_eq!(
            ticks("30 1,2 * * *", NEW_YORK, "2027-03-13T12:00:00-05:00", 5),
            [
                "2027-03-14 01:30 -05:00",
                "2027-03-14 03:00 -04:00",
                "2027-03-15 01:30 -04:00",
                "2027-03-15 02:30 -04:00",
                "2027-03-16 01:30 -04:00",
            ]
        );
        // A single fixed time moves the same way.
        assert_eq!(
            ticks("30 2 * * *", NEW_YORK, "2027-03-13T12:00:00-05:00", 2),
            ["2027-03-14 03:00 -04:00", "2027-03-15 02:30 -04:00"]
        );
        // A range, and every quarter hour: the gap's readings all move to 03:00, once.
        assert_eq!(
            ticks("0 1-3 * * *", NEW_YORK, "2027-03-14T00:30:00-05:00", 3),
            [
                "2027-03-14 01:00 -05:00",
                "2027-03-14 03:00 -04:00",
                "2027-03-15 01:00 -04:00"
            ]
        );
        assert_eq!(
            ticks("*/15 * * * *", NEW_YORK, "2027-03-14T01:40:00-05:00", 3),
            [
                "2027-03-14 01:45 -05:00",
                "2027-03-14 03:00 -04:00",
                "2027-03-14 03:15 -04:00"
            ]
        );
    }

    #[test]
    fn a_cron_in_a_dst_overlap_fires_once_at_the_earlier_instant() {
        assert_eq!(
            ticks("30 1 * * *", NEW_YORK, "2027-11-06T12:00:00-04:00", 2),
            ["2027-11-07 01:30 -04:00", "2027-11-08 01:30 -05:00"]
        );
        assert_eq!(
            ticks("30 1,2 * * *", NEW_YORK, "2027-11-06T12:00:00-04:00", 3),
            [
                "2027-11-07 01:30 -04:00",
                "2027-11-07 02:30 -05:00",
                "2027-11-08 01:30 -05:00"
            ]
        );
        // Asked during the repeated hour, after the first 01:30 fired: no second one.
        assert_eq!(
            ticks("30 1 * * *", NEW_YORK, "2027-11-07T01:10:00-05:00", 1),
            ["2027-11-08 01:30 -05:00"]
        );
    }

    #[test]
    fn readings_resolve_by_the_policy() {
        let naive = |s: &str| NaiveDateTime::parse_from_str(s, "%F %H:%M").expect("naive");
        let show = |t: DateTime<Tz>| t.format("%F %H:%M %:z").to_string();
        assert_eq!(
            show(resolve(naive("2027-03-14 02:30"), NEW_YORK)),
            "2027-03-14 03:00 -04:00"
        );
        assert_eq!(
            show(resolve(naive("2027-11-07 01:30"), NEW_YORK)),
            "2027-11-07 01:30 -04:00"
        );
    }
}
