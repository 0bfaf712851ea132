//! Plugin node kinds, used from flows with `use: KIND`.

use canvas_engine::duration::Duration;
use canvas_engine::registry::{NodeKind, PluginCx};
use serde::Deserialize;

/// Random sampling per entry (not per customer, unlike `split`): a customer who enters many
/// times is picked about `percent`% of the times. Picked runs continue to `next`; the rest
/// take the `skipped` output.
#[derive(Debug)]
pub struct Sample;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    pub percent: f64,
}

impl NodeKind for Sample {
    fn name(&self) -> &str {
        "sample"
    }
    fn description(&self) -> &str {
        "pick about `percent`% of entries at random; the rest take `skipped`"
    }
    fn outputs(&self) -> &[&str] {
        &["skipped"]
    }
    fn check(&self, with: &serde_json::Value) -> Result<(), String> {
        let c: SampleConfig = parse(with, "`with: { percent: 2 }`")?;
        if c.percent > 0.0 && c.percent < 100.0 {
            Ok(())
        } else {
            Err(format!(
                "percent must be above 0 and below 100, got {}",
                c.percent
            ))
        }
    }
    fn run(
        &self,
        with: &serde_json::Value,
        cx: &mut PluginCx<'_>,
    ) -> Result<Option<String>, String> {
        let c: SampleConfig = parse(with, "`with: { percent: 2 }`")?;
        // Keyed by the run, not the customer: each entry is a fresh draw, and a replay of
        // the same run after a crash draws the same.
        let point = canvas_engine::executor::split_point(cx.flow, cx.step, cx.run_id);
        Ok(if point < c.percent {
            None
        } else {
            Some("skipped".to_owned())
        })
    }
}

/// At most once per period per customer for a key, across runs and flows: "surprise must stay
/// rare". Runs pass to `next` when the customer has not passed this key within `every`;
/// otherwise they take `cooling`.
#[derive(Debug)]
pub struct Cooldown;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CooldownConfig {
    pub key: String,
    pub every: String,
}

impl CooldownConfig {
    pub fn every(&self) -> Result<Duration, String> {
        Duration::parse(&self.every).map_err(|e| format!("every: {e}"))
    }
}

impl NodeKind for Cooldown {
    fn name(&self) -> &str {
        "cooldown"
    }
    fn description(&self) -> &str {
        "pass at most once per `every` per customer for `key`; otherwise take `cooling`"
    }
    fn outputs(&self) -> &[&str] {
        &["cooling"]
    }
    fn check(&self, with: &serde_json::Value) -> Result<(), String> {
        let c: CooldownConfig = parse(with, "`with: { key: surprise, every: 365d }`")?;
        let key_ok = !c.key.is_empty()
            && c.key
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
        if !key_ok {
            return Err(format!(
                "key `{}` must use letters, digits, `-` and `_`",
                c.key
            ));
        }
        c.every().map(|_| ())
    }
    fn run(
        &self,
        with: &serde_json::Value,
        cx: &mut PluginCx<'_>,
    ) -> Result<Option<String>, String> {
        let c: CooldownConfig = parse(with, "`with: { key: surprise, every: 365d }`")?;
        let every = c.every()?;
        let last = cx
            .customer
            .cooldowns
            .get(&c.key)
            .and_then(|v| v.as_str())
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&chrono::Utc));
        let period =
            chrono::Duration::seconds(i64::try_from(every.as_secs()).unwrap_or(i64::MAX / 1000));
        if last.is_some_and(|t| cx.now < t + period) {
            return Ok(Some("cooling".to_owned()));
        }
        cx.customer
            .cooldowns
            .insert(c.key, serde_json::Value::String(cx.now.to_rfc3339()));
        Ok(None)
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    with: &serde_json::Value,
    example: &str,
) -> Result<T, String> {
    if with.is_null() {
        return Err(format!("needs settings: {example}"));
    }
    serde_json::from_value(with.clone()).map_err(|e| format!("{e}; e.g. {example}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sample_checks_its_percent() {
        assert!(Sample.check(&json!({"percent": 2})).is_ok());
        assert!(Sample.check(&json!({"percent": 0})).is_err());
        assert!(Sample.check(&json!({"percent": 100})).is_err());
        assert!(
            Sample
                .check(&json!({"pct": 2}))
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(
            Sample
                .check(&serde_json::Value::Null)
                .unwrap_err()
                .contains("needs settings")
        );
    }

    #[test]
    fn cooldown_passes_once_per_period() {
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let mut customer = canvas_engine::state::Customer::new("c1", t0);
        let with = json!({"key": "surprise", "every": "365d"});
        let mut at = |now| {
            let mut cx = PluginCx {
                flow: "f",
                step: "s",
                run_id: "f/c1/1",
                customer: &mut customer,
                now,
            };
            Cooldown.run(&with, &mut cx).unwrap()
        };
        assert_eq!(at(t0), None);
        assert_eq!(
            at(t0 + chrono::Duration::days(364)),
            Some("cooling".to_owned())
        );
        assert_eq!(at(t0 + chrono::Duration::days(365)), None);
    }

    #[test]
    fn sample_draws_about_the_percent_per_entry() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let mut customer = canvas_engine::state::Customer::new("c1", now);
        let with = json!({"percent": 10});
        let picked = (0..5000)
            .filter(|i| {
                let run_id = format!("f/c1/{i}");
                let mut cx = PluginCx {
                    flow: "f",
                    step: "s",
                    run_id: &run_id,
                    customer: &mut customer,
                    now,
                };
                Sample.run(&with, &mut cx).unwrap().is_none()
            })
            .count();
        assert!((400..600).contains(&picked), "{picked}");
    }

    #[test]
    fn cooldown_checks_key_and_period() {
        assert!(
            Cooldown
                .check(&json!({"key": "surprise", "every": "365d"}))
                .is_ok()
        );
        assert!(
            Cooldown
                .check(&json!({"key": "surprise", "every": "soon"}))
                .is_err()
        );
        assert!(
            Cooldown
                .check(&json!({"key": "a b", "every": "1d"}))
                .is_err()
        );
    }
}
