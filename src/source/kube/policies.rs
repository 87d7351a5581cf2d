//! The PeerAuthentication watch: discovery of the served version, then kube-runtime's watcher
//! on every namespace, feeding the [`Publisher`].
//!
//! The watcher lists, then watches from the list's resourceVersion, resumes a dropped watch
//! where it stopped, and relists after a `410 Gone` event. Two cases it does not cover are
//! handled here: a `410` that arrives as the HTTP status of the watch request (the watcher
//! would retry the same expired resourceVersion forever), and a `404`, which means the
//! version found by discovery is no longer served (an Istio upgrade or downgrade), so
//! discovery runs again. Errors wait a backoff before the next try; until the next complete
//! list, the policies known last stay in force.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Error as KubeError};
use tracing::{debug, info, warn};

use super::backoff::{Backoff, BackoffPolicy};
use super::discovery;
use super::state::{ObjectKey, Publisher};
use crate::metrics::{Metrics, Outcome};

/// A relist sooner than this after the previous one waits a backoff first.
pub(super) const RELIST_QUIET: Duration = Duration::from_secs(60);

/// Runs discovery and the watch until the task is aborted.
pub(super) async fn follow(
    client: Client,
    publisher: Arc<Publisher>,
    policy: BackoffPolicy,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::new(policy);
    loop {
        let resource = match discovery::peer_authentication(&client).await {
            Ok(resource) => resource,
            Err(error) => {
                metrics.policy_reload(Outcome::Error);
                let delay = backoff.next_delay();
                warn!(%error, retry_in = ?delay, "cannot find PeerAuthentication in the API");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        info!(api_version = %resource.api_version, "watching PeerAuthentication in all namespaces");
        publisher.set_api_version(&resource.api_version);
        watch(&client, &resource, &publisher, &mut backoff, &metrics).await;
        // Not served any more: look again, after a pause so that a server that keeps
        // answering 404 is not asked in a tight loop.
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// What the watch loop saw that needs a fresh start.
enum Restart {
    /// Relist (a `410 Gone` the watcher does not recover from by itself).
    Relist,
    /// Run discovery again (`404`: the version is not served any more).
    Rediscover,
}

/// Watches `resource` until it is no longer served.
async fn watch(
    client: &Client,
    resource: &ApiResource,
    publisher: &Publisher,
    backoff: &mut Backoff,
    metrics: &Metrics,
) {
    let mut last_relist: Option<Instant> = None;
    loop {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
        let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
        // Objects of a list in progress; they replace the known ones once it is complete.
        let mut listing: Option<BTreeMap<ObjectKey, DynamicObject>> = None;

        let restart = loop {
            let Some(event) = events.next().await else {
                // The watcher's stream does not end; should it, start over.
                break Restart::Relist;
            };
            match event {
                Ok(event) => {
                    backoff.reset();
                    if matches!(event, Event::InitDone) {
                        metrics.policy_reload(Outcome::Ok);
                    }
                    apply(event, &mut listing, publisher);
                }
                Err(error) => match restart_for(&error) {
                    Some(restart) => {
                        info!(%error, "the PeerAuthentication watch starts over");
                        break restart;
                    }
                    None => {
                        metrics.policy_reload(Outcome::Error);
                        let delay = backoff.next_delay();
                        warn!(
                            %error,
                            retry_in = ?delay,
                            "the PeerAuthentication watch failed; keeping the last known policies"
                        );
                        tokio::time::sleep(delay).await;
                    }
                },
            }
        };
        match restart {
            Restart::Rediscover => return,
            // A server that expires every fresh list at once would make this a tight loop.
            Restart::Relist if last_relist.is_some_and(|t| t.elapsed() < RELIST_QUIET) => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Restart::Relist => {}
        }
        last_relist = Some(Instant::now());
    }
}

fn apply(
    event: Event<DynamicObject>,
    listing: &mut Option<BTreeMap<ObjectKey, DynamicObject>>,
    publisher: &Publisher,
) {
    match event {
        Event::Init => {
            debug!("listing PeerAuthentication");
            *listing = Some(BTreeMap::new());
        }
        Event::InitApply(object) => {
            let key = (
                object.metadata.namespace.clone().unwrap_or_default(),
                object.metadata.name.clone().unwrap_or_default(),
            );
            listing.get_or_insert_default().insert(key, object);
        }
        Event::InitDone => {
            let objects = listing.take().unwrap_or_default();
            debug!(objects = objects.len(), "PeerAuthentication listed");
            publisher.replace(objects.into_values().collect());
        }
        Event::Apply(object) => publisher.apply(&object),
        Event::Delete(object) => publisher.delete(&object),
    }
}

/// Whether `error` needs a fresh start rather than the watcher's own retry.
fn restart_for(error: &watcher::Error) -> Option<Restart> {
    match error {
        // After a 410 event the watcher relists by itself; starting over does the same.
        watcher::Error::WatchError(status) if status.code == 410 => Some(Restart::Relist),
        watcher::Error::WatchStartFailed(KubeError::Api(status))
        | watcher::Error::WatchFailed(KubeError::Api(status)) => match status.code {
            410 => Some(Restart::Relist),
            404 => Some(Restart::Rediscover),
            _ => None,
        },
        // A failed list is retried by the watcher after the backoff; a list is never
        // expired, so only a 404 needs more.
        watcher::Error::InitialListFailed(KubeError::Api(status)) if status.code == 404 => {
            Some(Restart::Rediscover)
        }
        _ => None,
    }
}
