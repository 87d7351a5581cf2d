//! One incremental ADS stream: a sidecar's `DeltaAggregatedResources` call carried to istiod on
//! a stream of its own, in order both ways, with each Listener resource rewritten for the
//! sidecar's workload under a version of the relay's making, and pushes of the relay's own,
//! holding only the listeners that changed, when the sidecar's policy changes.
//!
//! Envoy's answers to the relay's own responses never reach istiod; a subscription change riding
//! on such an answer goes up without a nonce, as a request of its own. Versions of the relay's
//! making that Envoy reports on a reconnect are translated back to istiod's.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::{StreamExt, future};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info};

use super::codec::{Frame, MessageStream, owned};
use super::lds::{Held, Rejections};
use super::listeners::{Envelope, LISTENER_TYPE, RewrittenListener};
use super::registry::{ProxyEntry, PushOrigin, Registration, XdsForm};
use super::stream::{self, Decision, decide};
use super::upstream::{Lease, delta_path};
use super::versions::{is_relay_nonce, relay_nonce, relay_version, upstream_version};
use super::{HEALTH_INFO_TYPE, Relay};
use crate::metrics::{Metrics, PushReason, StreamGauge};
use crate::rewrite::RewritePlan;
use crate::source::PolicySnapshot;
use crate::wire::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

/// Responses waiting for the sidecar beyond the one being written.
const RESPONSE_QUEUE: usize = 1;

/// The stream of responses that goes back to the sidecar.
pub type ResponseStream = ReceiverStream<Result<Frame<DeltaDiscoveryResponse>, Status>>;

/// Serves one `DeltaAggregatedResources` call.
pub async fn serve(
    relay: Arc<Relay>,
    request: Request<MessageStream<DeltaDiscoveryRequest>>,
) -> Result<Response<ResponseStream>, Status> {
    let accepted = stream::accept(&relay, request, XdsForm::Delta, |r| &r.node).await?;
    let entry = accepted.registration.entry().clone();
    let shared = Arc::new(Shared::default());

    let requests = futures::stream::once(future::ready(accepted.first))
        .chain(stream::downstream_requests(accepted.downstream))
        .filter_map({
            let shared = shared.clone();
            let entry = entry.clone();
            let metrics = relay.metrics.clone();
            move |frame| future::ready(on_request(&shared, &entry, &metrics, frame))
        });
    let (upstream, connection) = stream::open_upstream(
        &relay,
        &accepted.span,
        &accepted.metadata,
        requests,
        delta_path(),
    )
    .await?;

    let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
    let forwarder = Forwarder {
        policies: relay.policies.clone(),
        relay,
        registration: accepted.registration,
        shared,
        tx,
        _gauge: accepted.gauge,
        _connection: connection,
    };
    tokio::spawn(forwarder.run(upstream).instrument(accepted.span));
    Ok(Response::new(ReceiverStream::new(rx)))
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    fallback: Notify,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default)]
struct State {
    /// istiod's last nonce per type URL.
    upstream_nonces: HashMap<String, String>,
    lds: Option<Lds>,
    rejections: Rejections,
    held: Option<Held<Frame<DeltaDiscoveryRequest>>>,
    fallback_wanted: bool,
}

#[derive(Debug)]
struct Lds {
    /// istiod's latest LDS response without its resources.
    envelope: DeltaDiscoveryResponse,
    /// istiod's current listeners by resource name, with their rewrite as last sent.
    listeners: BTreeMap<String, Arc<RewrittenListener>>,
    /// What Envoy was last sent for each listener.
    sent: BTreeMap<String, Bytes>,
    /// The last LDS response sent to Envoy.
    last: Sent,
}

#[derive(Debug)]
struct Sent {
    nonce: String,
    origin: PushOrigin,
    plan: RewritePlan,
    /// The listeners that response carried rewritten.
    rewritten: Vec<String>,
}

struct Forwarder {
    relay: Arc<Relay>,
    registration: Registration,
    shared: Arc<Shared>,
    policies: watch::Receiver<Arc<PolicySnapshot>>,
    tx: mpsc::Sender<Result<Frame<DeltaDiscoveryResponse>, Status>>,
    _gauge: StreamGauge,
    /// This stream's share of its connection to istiod.
    _connection: Lease,
}

impl Forwarder {
    fn entry(&self) -> &Arc<ProxyEntry> {
        self.registration.entry()
    }

    async fn run(mut self, mut upstream: MessageStream<DeltaDiscoveryResponse>) {
        let mut policies_open = true;
        let mut clock = self.relay.stream_clock(self.entry().stream_id);
        loop {
            let sent = tokio::select! {
                biased;
                () = self.tx.closed() => {
                    debug!("the sidecar went away; closing its istiod stream");
                    return;
                }
                // Ending the response stream closes the sidecar's stream with status OK, and
                // dropping istiod's stream cancels it.
                _ = clock.wait() => return,
                () = self.shared.fallback.notified() => self.send_fallback().await,
                changed = self.policies.changed(), if policies_open => {
                    if changed.is_err() {
                        policies_open = false;
                        continue;
                    }
                    self.on_policy_change().await
                }
                next = upstream.message() => match next {
                    Ok(Some(frame)) => self.on_upstream(frame).await,
                    Ok(None) => {
                        debug!("istiod ended the stream");
                        return;
                    }
                    Err(status) => {
                        info!(code = ?status.code(), message = status.message(), "istiod's stream failed; ending the sidecar's");
                        let _ = self.tx.send(Err(status)).await;
                        return;
                    }
                },
            };
            if !sent {
                debug!("the sidecar went away; closing its istiod stream");
                return;
            }
        }
    }

    async fn on_upstream(&mut self, mut frame: Frame<DeltaDiscoveryResponse>) -> bool {
        let type_url = frame.msg().type_url.clone();
        if type_url == LISTENER_TYPE {
            let decision = decide(&self.registration.entry().clone(), &mut self.policies);
            let mut state = self.shared.state();
            state.held = None;

            let listeners: Vec<_> = frame
                .msg()
                .resources
                .iter()
                .map(|r| self.rewrite(&state.rejections, &decision.plan, r))
                .collect();
            let rewritten: Vec<String> = listeners
                .iter()
                .filter(|l| l.changed())
                .map(|l| l.name.clone())
                .collect();
            if !rewritten.is_empty() {
                if frame.has_unknown_fields() {
                    info!(
                        nonce = %frame.msg().nonce,
                        "istiod's LDS response has fields this build does not know; the rewritten response goes without them"
                    );
                }
                frame.msg_mut().resources = listeners.iter().map(|l| l.sent().clone()).collect();
            }
            log_lds(&self.relay.metrics, &frame, &listeners, PushOrigin::Istiod);

            let mut envelope = frame.msg().clone();
            envelope.resources = Vec::new();
            envelope.removed_resources = Vec::new();
            envelope.removed_resource_names = Vec::new();
            let last = Sent {
                nonce: frame.msg().nonce.clone(),
                origin: PushOrigin::Istiod,
                plan: decision.plan.clone(),
                rewritten,
            };
            let lds = state.lds.get_or_insert_with(|| Lds {
                envelope: DeltaDiscoveryResponse::default(),
                listeners: BTreeMap::new(),
                sent: BTreeMap::new(),
                last: Sent {
                    nonce: String::new(),
                    origin: PushOrigin::Istiod,
                    plan: RewritePlan::default(),
                    rewritten: Vec::new(),
                },
            });
            lds.envelope = owned(&envelope);
            lds.last = last;
            for name in &frame.msg().removed_resources {
                lds.listeners.remove(name);
                lds.sent.remove(name);
            }
            for listener in listeners {
                lds.sent
                    .insert(listener.name.clone(), listener.sent().clone());
                lds.listeners.insert(listener.name.clone(), listener);
            }
            let all: Vec<_> = lds.listeners.values().cloned().collect();
            drop(state);
            self.record_decision(decision, all);
        }

        let msg = frame.msg();
        self.shared
            .state()
            .upstream_nonces
            .insert(type_url, msg.nonce.clone());
        self.relay
            .metrics
            .response(XdsForm::Delta, &msg.type_url, PushOrigin::Istiod);
        self.entry().record_push(
            &msg.type_url,
            PushOrigin::Istiod,
            &msg.nonce,
            &msg.system_version_info,
            msg.resources.len(),
        );
        self.tx.send(Ok(frame)).await.is_ok()
    }

    /// Sends the listeners whose rewrite a policy change alters, and only those.
    async fn on_policy_change(&mut self) -> bool {
        match self.render_policy_change() {
            Some(frame) => self.send_own(frame, PushReason::Policy).await,
            None => true,
        }
    }

    fn render_policy_change(&mut self) -> Option<Frame<DeltaDiscoveryResponse>> {
        let decision = decide(&self.registration.entry().clone(), &mut self.policies);
        let mut state = self.shared.state();
        let lds = state.lds.as_ref()?;

        let changed: Vec<Arc<RewrittenListener>> = lds
            .listeners
            .values()
            .map(|l| match l.plan_independent() {
                true => l.clone(),
                false => self.rewrite(&state.rejections, &decision.plan, &l.input),
            })
            .filter(|l| lds.sent.get(&l.name) != Some(l.sent()))
            .collect();
        if changed.is_empty() {
            debug!(
                generation = decision.generation,
                "the policy change does not alter this proxy's listeners"
            );
            let all: Vec<_> = lds.listeners.values().cloned().collect();
            drop(state);
            self.record_decision(decision, all);
            return None;
        }

        let nonce = relay_nonce(self.entry().stream_id, self.entry().next_seq());
        let mut response = lds.envelope.clone();
        response.system_version_info = relay_version(
            upstream_version(&lds.envelope.system_version_info),
            &format!("g{}", decision.generation),
        );
        response.nonce = nonce.clone();
        response.resources = changed.iter().map(|l| l.sent().clone()).collect();

        let lds = state.lds.as_mut().expect("checked above");
        for listener in &changed {
            lds.sent
                .insert(listener.name.clone(), listener.sent().clone());
            lds.listeners
                .insert(listener.name.clone(), listener.clone());
        }
        lds.last = Sent {
            nonce,
            origin: PushOrigin::Relay,
            plan: decision.plan.clone(),
            rewritten: changed
                .iter()
                .filter(|l| l.changed())
                .map(|l| l.name.clone())
                .collect(),
        };
        let all: Vec<_> = lds.listeners.values().cloned().collect();
        drop(state);

        let frame = Frame::new(response);
        log_lds(&self.relay.metrics, &frame, &changed, PushOrigin::Relay);
        self.record_decision(decision, all);
        Some(frame)
    }

    /// Sends istiod's own version of the listeners whose rewrite Envoy rejected.
    async fn send_fallback(&mut self) -> bool {
        match self.render_fallback() {
            Some(frame) => self.send_own(frame, PushReason::Fallback).await,
            None => true,
        }
    }

    fn render_fallback(&mut self) -> Option<Frame<DeltaDiscoveryResponse>> {
        let mut state = self.shared.state();
        if !std::mem::take(&mut state.fallback_wanted) {
            return None;
        }
        let lds = state.lds.as_mut()?;

        let nonce = relay_nonce(self.entry().stream_id, self.entry().next_seq());
        let mut resources = Vec::new();
        for name in &lds.last.rewritten {
            if let Some(listener) = lds.listeners.get(name) {
                resources.push(listener.input.clone());
                lds.sent.insert(name.clone(), listener.input.clone());
            }
        }
        let mut response = lds.envelope.clone();
        response.system_version_info = upstream_version(&lds.envelope.system_version_info).into();
        response.nonce = nonce.clone();
        response.resources = resources;
        lds.last = Sent {
            nonce: nonce.clone(),
            origin: PushOrigin::Relay,
            plan: RewritePlan::default(),
            rewritten: Vec::new(),
        };
        if let Some(held) = state.held.as_mut() {
            held.fallback_nonce = Some(nonce.clone());
        }
        let error = state.rejections.last_error.clone();
        drop(state);

        info!(%nonce, "sending istiod's listeners unchanged after Envoy rejected the rewrite");
        self.entry().status().rewrite_rejected = error;
        Some(Frame::new(response))
    }

    async fn send_own(&self, frame: Frame<DeltaDiscoveryResponse>, reason: PushReason) -> bool {
        let msg = frame.msg();
        self.relay
            .metrics
            .response(XdsForm::Delta, &msg.type_url, PushOrigin::Relay);
        self.relay.metrics.relay_push(XdsForm::Delta, reason);
        self.entry().record_push(
            &msg.type_url,
            PushOrigin::Relay,
            &msg.nonce,
            &msg.system_version_info,
            msg.resources.len(),
        );
        self.tx.send(Ok(frame)).await.is_ok()
    }

    fn rewrite(
        &self,
        rejections: &Rejections,
        plan: &RewritePlan,
        resource: &Bytes,
    ) -> Arc<RewrittenListener> {
        rejections.rewrite(&self.relay.cache, Envelope::Resource, plan, resource)
    }

    fn record_decision(&self, decision: Decision, listeners: Vec<Arc<RewrittenListener>>) {
        let mut status = self.entry().status();
        status.policy = decision.policy;
        status.plan = decision.plan;
        status.listeners = listeners;
    }
}

fn log_lds(
    metrics: &Metrics,
    frame: &Frame<DeltaDiscoveryResponse>,
    listeners: &[Arc<RewrittenListener>],
    origin: PushOrigin,
) {
    let rewritten: Vec<&str> = listeners
        .iter()
        .filter(|l| l.changed())
        .map(|l| l.name.as_str())
        .collect();
    metrics.listeners_rewritten(XdsForm::Delta, rewritten.len());
    info!(
        ?origin,
        nonce = %frame.msg().nonce,
        version = %frame.msg().system_version_info,
        listeners = listeners.len(),
        removed = frame.msg().removed_resources.len(),
        ?rewritten,
        "sending LDS"
    );
}

/// Looks at one request from the sidecar and decides what istiod gets of it.
fn on_request(
    shared: &Shared,
    entry: &ProxyEntry,
    metrics: &Metrics,
    mut frame: Frame<DeltaDiscoveryRequest>,
) -> Option<Frame<DeltaDiscoveryRequest>> {
    if frame.msg().type_url == HEALTH_INFO_TYPE {
        debug!("relaying a health report");
        return Some(frame);
    }

    // On a reconnect Envoy reports the versions it holds, the relay's among them.
    let marked = frame
        .msg()
        .initial_resource_versions
        .values()
        .any(|v| upstream_version(v).len() != v.len());
    if marked {
        for version in frame.msg_mut().initial_resource_versions.values_mut() {
            *version = upstream_version(version).to_string();
        }
    }

    let msg = frame.msg();
    let nonce = msg.response_nonce.clone();
    let nack = !msg.error_detail.is_empty();
    let is_lds = msg.type_url == LISTENER_TYPE;
    let subscription_change =
        !msg.resource_names_subscribe.is_empty() || !msg.resource_names_unsubscribe.is_empty();
    entry.record_answer(&msg.type_url, &nonce, "", &msg.error_detail);
    if nack {
        metrics.rejection(
            XdsForm::Delta,
            &msg.type_url,
            super::sotw::origin_of(&nonce),
        );
    }

    let mut state = shared.state();
    if is_relay_nonce(&nonce) {
        if is_lds {
            let fallback_answered = state
                .held
                .as_ref()
                .is_some_and(|h| h.fallback_nonce.as_deref() == Some(nonce.as_str()));
            if fallback_answered {
                let held = state.held.take().expect("checked above");
                if nack {
                    info!("Envoy rejected istiod's listeners too; istiod gets the rejection");
                    return Some(held.nack);
                }
                debug!(nonce = %held.upstream_nonce, "Envoy took istiod's listeners; acknowledging istiod's response");
                return Some(Frame::new(DeltaDiscoveryRequest {
                    type_url: LISTENER_TYPE.to_string(),
                    response_nonce: held.upstream_nonce,
                    ..Default::default()
                }));
            }
            if nack && reject_last_rewrite(&mut state, &nonce, &msg.error_detail, &shared.fallback)
            {
                return None;
            }
        }
        if !subscription_change {
            return None;
        }
        // istiod never sent this nonce: the subscription change goes up as a request of its own.
        drop(state);
        let request = frame.msg_mut();
        request.response_nonce = String::new();
        request.error_detail = Bytes::new();
        return Some(frame);
    }

    if is_lds && nack && !nonce.is_empty() {
        let rejected_ours = state.lds.as_ref().is_some_and(|lds| {
            lds.last.nonce == nonce
                && lds.last.origin == PushOrigin::Istiod
                && !lds.last.rewritten.is_empty()
        });
        if rejected_ours
            && reject_last_rewrite(&mut state, &nonce, &msg.error_detail, &shared.fallback)
        {
            state.held = Some(Held {
                upstream_nonce: nonce,
                upstream_version: String::new(),
                nack: frame,
                fallback_nonce: None,
            });
            return None;
        }
    }
    Some(frame)
}

/// Marks the rewrites of the last LDS response as rejected and asks for istiod's listeners to be
/// sent in their place. Returns false when that response held no rewrite.
fn reject_last_rewrite(
    state: &mut State,
    nonce: &str,
    error_detail: &Bytes,
    fallback: &Notify,
) -> bool {
    let Some(lds) = state.lds.as_ref() else {
        return false;
    };
    if lds.last.nonce != nonce || lds.last.rewritten.is_empty() {
        return false;
    }
    let rewritten: Vec<_> = lds
        .last
        .rewritten
        .iter()
        .filter_map(|name| lds.listeners.get(name).cloned())
        .collect();
    let plan = lds.last.plan.clone();
    let error = stream::rejection_message(error_detail);
    state.rejections.reject(&rewritten, &plan, error);
    state.fallback_wanted = true;
    fallback.notify_one();
    true
}
