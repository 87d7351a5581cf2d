//! PeerAuthentication from a folder of YAML files (`--policy-dir`), followed as it changes.
//!
//! Every `.yaml`, `.yml` and `.json` file directly in the folder is read in name order. A file
//! that fails to parse keeps the policies of its last version that parsed cleanly, so that a
//! half-written edit never takes a working policy away; its errors are reported until it is
//! fixed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{PolicySnapshot, PolicyWatch, SourceError};
use crate::metrics::{Metrics, Outcome};
use crate::policy::{PeerAuthentication, PolicyError, PolicySet, parse_yaml};

/// How long the folder must be quiet after a change before it is read again, so that an editor's
/// or a ConfigMap's several writes are read once.
const SETTLE: Duration = Duration::from_millis(150);

/// A full rescan this often, in case the file system does not report changes (some network and
/// overlay file systems do not).
const RESCAN: Duration = Duration::from_secs(10);

/// What one file contributes.
#[derive(Debug, Clone, Default)]
struct FileState {
    /// The policies of the last version that parsed without errors; if it never did, those of
    /// the documents that parsed in the latest version.
    policies: Vec<PeerAuthentication>,
    /// Whether `policies` come from a version without errors.
    clean: bool,
}

/// Reads the folder and keeps the state needed to follow it.
#[derive(Debug)]
pub struct FolderSource {
    dir: PathBuf,
    root_namespace: String,
    files: BTreeMap<PathBuf, FileState>,
    generation: u64,
    last: Option<Vec<PeerAuthentication>>,
}

impl FolderSource {
    /// A source for `dir`; nothing is read yet.
    pub fn new(dir: &Path, root_namespace: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            root_namespace: root_namespace.to_string(),
            files: BTreeMap::new(),
            generation: 0,
            last: None,
        }
    }

    /// Reads the folder. Returns a new snapshot when the policies differ from the last read (or
    /// on the first read), `None` when nothing that matters changed.
    pub fn read(&mut self) -> Result<Option<PolicySnapshot>, SourceError> {
        let mut errors: Vec<PolicyError> = Vec::new();
        let mut seen = BTreeMap::new();

        for path in policy_files(&self.dir)? {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                // A file removed between listing and reading is simply gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(SourceError::ReadFile {
                        path: path.display().to_string(),
                        source,
                    });
                }
            };
            let outcome = parse_yaml(&text, &path.display().to_string());
            let previous = self.files.get(&path);
            let state = if outcome.errors.is_empty() {
                FileState {
                    policies: outcome.policies,
                    clean: true,
                }
            } else if let Some(previous) = previous.filter(|p| p.clean) {
                warn!(
                    file = %path.display(),
                    errors = outcome.errors.len(),
                    "the policy file has errors; keeping its last good version"
                );
                previous.clone()
            } else {
                FileState {
                    policies: outcome.policies,
                    clean: false,
                }
            };
            errors.extend(outcome.errors);
            seen.insert(path, state);
        }
        self.files = seen;

        let policies: Vec<PeerAuthentication> = self
            .files
            .values()
            .flat_map(|f| f.policies.iter().cloned())
            .collect();
        if self.last.as_ref() == Some(&policies) && self.generation > 0 {
            return Ok(None);
        }
        self.last = Some(policies.clone());
        self.generation += 1;

        for error in &errors {
            warn!(%error, "a PeerAuthentication document was not loaded");
        }
        let count = policies.len();
        let set = PolicySet::new(policies, &self.root_namespace);
        for report in set.reports() {
            warn!(policy = %report.policy, kind = ?report.kind, "{}", report.message);
        }
        info!(
            dir = %self.dir.display(),
            policies = count,
            errors = errors.len(),
            generation = self.generation,
            "policies loaded"
        );

        Ok(Some(PolicySnapshot {
            set,
            generation: self.generation,
            synced: true,
            errors,
            origin: format!("folder {}", self.dir.display()),
            pods: Arc::default(),
        }))
    }
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let read_dir = |source| SourceError::ReadDir {
        path: dir.display().to_string(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        // Kubernetes ConfigMap mounts keep their files behind `..data` links; hidden names are
        // that machinery or editors' swap files, not policies.
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if wanted && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the folder once, then follows it in the background; returns the channel the relay
/// reads. The first read must succeed: a relay without its policies must not start.
pub fn watch_dir(
    dir: &Path,
    root_namespace: &str,
    metrics: Arc<Metrics>,
) -> Result<(watch::Sender<Arc<PolicySnapshot>>, PolicyWatch), SourceError> {
    let mut source = FolderSource::new(dir, root_namespace);
    let first = source
        .read()
        .inspect_err(|_| metrics.policy_reload(Outcome::Error))?
        .unwrap_or_else(|| PolicySnapshot::empty(root_namespace, &dir.display().to_string()));
    let (writer, reader) = watch::channel(Arc::new(first));

    let span = info_span!("policy_dir", dir = %dir.display());
    metrics.policy_reload(Outcome::Ok);
    tokio::spawn(follow(source, writer.clone(), metrics).instrument(span));
    Ok((writer, reader))
}

/// Re-reads the folder whenever the file system reports a change in it (and every [`RESCAN`]),
/// until every receiver of `writer` is gone.
async fn follow(
    mut source: FolderSource,
    writer: watch::Sender<Arc<PolicySnapshot>>,
    metrics: Arc<Metrics>,
) {
    let (tx, mut changes) = mpsc::channel::<()>(1);
    let watcher = start_watcher(&source.dir, tx);
    if watcher.is_none() {
        warn!(every = ?RESCAN, "file change notifications are unavailable; rescanning periodically");
    }

    let mut rescan = tokio::time::interval(RESCAN);
    rescan.tick().await;
    loop {
        tokio::select! {
            () = writer.closed() => return,
            Some(()) = changes.recv() => {
                // Let a burst of writes settle, then read once.
                tokio::time::sleep(SETTLE).await;
                while changes.try_recv().is_ok() {}
            }
            _ = rescan.tick() => {}
        }

        match source.read() {
            Ok(Some(snapshot)) => {
                metrics.policy_reload(Outcome::Ok);
                writer.send_replace(Arc::new(snapshot));
            }
            Ok(None) => debug!("policy folder re-read; nothing changed"),
            Err(error) => {
                metrics.policy_reload(Outcome::Error);
                warn!(%error, "cannot re-read the policy folder; keeping the last policies")
            }
        }
    }
}

fn start_watcher(dir: &Path, tx: mpsc::Sender<()>) -> Option<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the folder is an event too; only changes matter.
        let is_change = event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_)));
        if is_change {
            // A full channel already holds a pending change; one is enough.
            let _ = tx.try_send(());
        }
    })
    .inspect_err(|error| warn!(%error, "cannot watch the policy folder"))
    .ok()?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .inspect_err(|error| warn!(%error, "cannot watch the policy folder"))
        .ok()?;
    Some(watcher)
}
