//! The flows a runtime knows (current versions, and older ones runs are pinned to) and the
//! recorded source of each version, so a restarted process can rebuild them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::flow::{CompiledFlow, Trigger};
use crate::registry::Registry;
use crate::state::{FlowVersion, Time};

/// The flows a runtime knows: the current version of each, and every version that runs may
/// still be pinned to.
#[derive(Debug, Default, Clone)]
pub struct FlowSet {
    current: BTreeMap<String, Arc<CompiledFlow>>,
    versions: HashMap<String, Arc<CompiledFlow>>,
    /// The current flows by [`CompiledFlow::precedence`].
    by_precedence: Vec<Arc<CompiledFlow>>,
    /// Event name → flows it starts, by precedence.
    by_event: HashMap<String, Vec<Arc<CompiledFlow>>>,
}

impl FlowSet {
    pub fn new(flows: impl IntoIterator<Item = CompiledFlow>) -> FlowSet {
        let mut set = FlowSet::default();
        for f in flows {
            set.add(f);
        }
        set
    }

    /// Make `flow` the current version of its id; older versions stay for pinned runs.
    pub fn add(&mut self, flow: CompiledFlow) {
        let flow = Arc::new(flow);
        self.versions.insert(flow.hash.0.clone(), flow.clone());
        self.current.insert(flow.id.clone(), flow);
        self.index();
    }

    /// Make `flows` the whole current set (a reload of the flows folder): new and changed
    /// flows become current, flows no longer there stop taking entries. Every version ever
    /// loaded stays, so runs pinned to one carry on. Returns what changed.
    pub fn publish(&mut self, flows: impl IntoIterator<Item = CompiledFlow>) -> Published {
        let mut next: BTreeMap<String, Arc<CompiledFlow>> = BTreeMap::new();
        let mut published = Published::default();
        for flow in flows {
            let flow = Arc::new(flow);
            match self.current.get(&flow.id) {
                None => published.added.push(flow.id.clone()),
                Some(old) if old.hash != flow.hash => published.changed.push(flow.id.clone()),
                Some(_) => {}
            }
            self.versions.insert(flow.hash.0.clone(), flow.clone());
            next.insert(flow.id.clone(), flow);
        }
        published.retired = self
            .current
            .keys()
            .filter(|id| !next.contains_key(*id))
            .cloned()
            .collect();
        self.current = next;
        self.index();
        published
    }

    fn index(&mut self) {
        self.by_event.clear();
        self.by_precedence = self.current.values().cloned().collect();
        self.by_precedence
            .sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        for f in &self.by_precedence {
            if let Trigger::Event { name, .. } = &f.trigger {
                self.by_event
                    .entry(name.clone())
                    .or_default()
                    .push(f.clone());
            }
        }
    }

    /// The current flows, by id.
    pub fn current(&self) -> impl Iterator<Item = &Arc<CompiledFlow>> {
        self.current.values()
    }

    /// The current flows in the order competing flows are decided: higher `priority` first,
    /// then the flow id.
    pub fn by_precedence(&self) -> impl Iterator<Item = &Arc<CompiledFlow>> {
        self.by_precedence.iter()
    }

    /// Know an older version (for the runs pinned to it) without making it current.
    pub fn add_version(&mut self, flow: CompiledFlow) {
        self.versions
            .entry(flow.hash.0.clone())
            .or_insert_with(|| Arc::new(flow));
    }

    pub fn get(&self, id: &str) -> Option<&Arc<CompiledFlow>> {
        self.current.get(id)
    }

    pub fn version(&self, hash: &str) -> Option<&Arc<CompiledFlow>> {
        self.versions.get(hash)
    }

    /// The flows `event` starts, by precedence.
    pub(super) fn started_by(&self, event: &str) -> &[Arc<CompiledFlow>] {
        self.by_event.get(event).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// What a flow version is made of, as recorded in `flow_versions.source`: the flow file's
/// text and the text of every template it uses. A process that restarts after the flows
/// folder changed can rebuild the versions its waiting runs are pinned to from it
/// ([`VersionSource::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionSource {
    /// Where the file was (for messages).
    pub path: String,
    pub text: String,
    /// Template file (relative to `templates/`) → text.
    pub templates: BTreeMap<String, String>,
}

impl VersionSource {
    /// The source of `flow`: its file is read again, so it is checked against the flow's
    /// hash when restored.
    pub fn of(flow: &CompiledFlow) -> std::io::Result<VersionSource> {
        Ok(VersionSource {
            path: flow.source.display().to_string(),
            text: std::fs::read_to_string(&flow.source)?,
            templates: flow
                .templates
                .iter()
                .map(|(file, t)| (file.clone(), t.source.as_str().to_owned()))
                .collect(),
        })
    }

    /// Compile the version again in a scratch folder: the flow file beside a `templates/`
    /// folder holding its templates. `None` (with the reason) when it no longer compiles
    /// to `version` — a different engine release may read it differently.
    pub fn restore(
        &self,
        version: &str,
        registry: &Registry,
    ) -> std::result::Result<CompiledFlow, String> {
        // The version is a hex hash; keep only safe characters for the folder name.
        let tag: String = version
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(16)
            .collect();
        let dir = std::env::temp_dir().join(format!("canvas-version-{}-{tag}", std::process::id()));
        let result = self.restore_in(&dir, version, registry);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn restore_in(
        &self,
        dir: &std::path::Path,
        version: &str,
        registry: &Registry,
    ) -> std::result::Result<CompiledFlow, String> {
        let io = |e: std::io::Error| format!("writing {}: {e}", dir.display());
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("templates")).map_err(io)?;
        let name = std::path::Path::new(&self.path)
            .file_name()
            .map_or_else(|| "flow.yaml".into(), |n| n.to_os_string());
        std::fs::write(dir.join(&name), &self.text).map_err(io)?;
        for (file, text) in &self.templates {
            let rel = std::path::Path::new(file);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(format!(
                    "template path `{file}` leaves the templates folder"
                ));
            }
            let path = dir.join("templates").join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            std::fs::write(&path, text).map_err(io)?;
        }
        let validation = crate::project::validate_paths(&[dir.join(&name)], registry)
            .map_err(|e| e.to_string())?;
        let flow = validation
            .flows()
            .next()
            .cloned()
            .ok_or_else(|| format!("{} no longer compiles", self.path))?;
        if flow.hash.0 != version {
            return Err(format!(
                "{} compiles to version {} now, not {version}",
                self.path, flow.hash.0
            ));
        }
        Ok(flow)
    }
}

/// The `flow_versions` row of `flow`: its source bundle as JSON, or only its path when the
/// file cannot be read any more.
pub fn version_record(flow: &CompiledFlow, now: Time) -> FlowVersion {
    let source = match VersionSource::of(flow) {
        Ok(src) => {
            serde_json::to_string(&src).unwrap_or_else(|_| flow.source.display().to_string())
        }
        Err(e) => {
            tracing::warn!(flow = %flow.id, "cannot read {} to record its version: {e}", flow.source.display());
            flow.source.display().to_string()
        }
    };
    FlowVersion {
        flow: flow.id.clone(),
        version: flow.hash.0.clone(),
        source,
        created_at: now,
    }
}

/// What [`FlowSet::publish`] changed, by flow id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    /// No longer in the folder: no new entries; runs already in them carry on.
    pub retired: Vec<String>,
}

impl Published {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.retired.is_empty()
    }
}
