//! What the language can name beyond its own keys: channels and plugin node kinds.
//! The `canvas-nodes` crate fills a registry with the built-in catalogue; embedders add their own.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A channel flows can `send` through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSpec {
    pub name: String,
    /// The profile attribute that holds the customer's address on this channel, if any;
    /// a customer without it cannot receive on this channel and the send falls back.
    pub address: Option<String>,
    pub description: String,
}

/// A node kind used with `use: KIND`.
pub trait NodeKind: Send + Sync + fmt::Debug {
    /// The name flows use.
    fn name(&self) -> &str;
    /// One line for docs and `canvas graph`.
    fn description(&self) -> &str;
    /// Named outputs besides the default `next`, mapped in a flow with `on: { OUTPUT: STEP }`.
    fn outputs(&self) -> &[&str] {
        &[]
    }
    /// Check the step's `with:` settings; the error says what is wrong in a sentence.
    fn check(&self, with: &serde_json::Value) -> Result<(), String>;
    /// Run the step for one customer: `Ok(None)` continues to `next`, `Ok(Some(output))`
    /// takes that output. Must be pure: everything it may read or change is in `cx`.
    /// An error ends nothing: the run records it and continues to `next`.
    fn run(
        &self,
        with: &serde_json::Value,
        cx: &mut PluginCx<'_>,
    ) -> Result<Option<String>, String> {
        let _ = (with, cx);
        Err(format!(
            "node kind `{}` cannot run: it only validates",
            self.name()
        ))
    }
}

/// What a plugin step sees and may change when it runs.
#[derive(Debug)]
pub struct PluginCx<'a> {
    pub flow: &'a str,
    pub step: &'a str,
    pub run_id: &'a str,
    /// The customer; a kind may keep per-customer state in `cooldowns`.
    pub customer: &'a mut crate::state::Customer,
    pub now: crate::state::Time,
}

/// Channels and node kinds known to a validation or a run.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    channels: BTreeMap<String, ChannelSpec>,
    kinds: BTreeMap<String, Arc<dyn NodeKind>>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    pub fn add_channel(&mut self, spec: ChannelSpec) -> &mut Self {
        self.channels.insert(spec.name.clone(), spec);
        self
    }

    pub fn add_kind(&mut self, kind: Arc<dyn NodeKind>) -> &mut Self {
        self.kinds.insert(kind.name().to_owned(), kind);
        self
    }

    pub fn channel(&self, name: &str) -> Option<&ChannelSpec> {
        self.channels.get(name)
    }

    pub fn channels(&self) -> impl Iterator<Item = &ChannelSpec> {
        self.channels.values()
    }

    pub fn kind(&self, name: &str) -> Option<&Arc<dyn NodeKind>> {
        self.kinds.get(name)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn NodeKind>> {
        self.kinds.values()
    }
}
