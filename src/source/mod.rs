//! Where PeerAuthentication objects come from, and the snapshot of them that the relay reads.
//!
//! A source is the single writer of a `watch` channel of [`PolicySnapshot`]s; every stream reads
//! the latest snapshot when it needs a decision.

pub mod files;

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::policy::{PolicyError, PolicySet};

/// Errors of the policy sources.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The policy folder could not be listed.
    #[error("cannot read the policy folder {path}: {source}")]
    ReadDir {
        /// The folder.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A policy file could not be read.
    #[error("cannot read the policy file {path}: {source}")]
    ReadFile {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// All PeerAuthentication objects known at one moment, indexed for resolution.
#[derive(Debug, Serialize)]
pub struct PolicySnapshot {
    /// The policies, indexed.
    pub set: PolicySet,
    /// Counts up with every change, starting at 1 for the first complete read.
    pub generation: u64,
    /// Whether the source has completed its first full read.
    pub synced: bool,
    /// Documents that could not be used, with their file, position and field.
    pub errors: Vec<PolicyError>,
    /// Where the policies come from, for humans.
    pub origin: String,
}

impl PolicySnapshot {
    /// The snapshot before anything was read: no policies, not synced.
    pub fn empty(root_namespace: &str, origin: &str) -> Self {
        Self {
            set: PolicySet::new(Vec::new(), root_namespace),
            generation: 0,
            synced: false,
            errors: Vec::new(),
            origin: origin.to_string(),
        }
    }
}

/// The receiving end that streams and the admin endpoints read.
pub type PolicyWatch = watch::Receiver<Arc<PolicySnapshot>>;
