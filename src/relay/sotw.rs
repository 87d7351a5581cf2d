//! One state-of-the-world ADS stream: a sidecar's `StreamAggregatedResources` call carried to
//! istiod on a stream of its own, in order both ways, with the Listener responses rewritten for
//! the sidecar's workload, and pushes of the relay's own when the sidecar's policy changes.
//!
//! The relay's own responses carry its own nonces and versions. Envoy's answers to them never
//! reach istiod; a subscription change riding on such an answer goes up under istiod's last
//! nonce. When Envoy rejects a rewritten response, it gets istiod's listeners unchanged, and
//! istiod hears Envoy's answer to those.

use std::collections::HashMap;
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
use super::upstream::{Lease, sotw_path};
use super::versions::{is_relay_nonce, relay_nonce, relay_version, upstream_version};
use super::{HEALTH_INFO_TYPE, Relay};
use crate::metrics::{Metrics, PushReason, StreamGauge};
use crate::rewrite::RewritePlan;
use crate::source::PolicySnapshot;
use crate::wire::{DiscoveryRequest, DiscoveryResponse};

/// Responses waiting for the sidecar beyond the one being written: a slow sidecar holds back its
/// own istiod stream instead of filling the relay's memory.
const RESPONSE_QUEUE: usize = 1;

/// The stream of responses that goes back to the sidecar.
pub type ResponseStream = ReceiverStream<Result<Frame<DiscoveryResponse>, Status>>;

/// Serves one `StreamAggregatedResources` call.
pub async fn serve(
    relay: Arc<Relay>,
    request: Request<MessageStream<DiscoveryRequest>>,
) -> Result<Response<ResponseStream>, Status> {
    let accepted = stream::accept(&relay, request, XdsForm::StateOfTheWorld, |r| &r.node).await?;
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
        sotw_path(),
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

/// State shared by the stream's two directions.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the response side when the request side wants istiod's listeners sent unchanged.
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
    /// The resource names of the last request sent to istiod, per type URL.
    forwarded_names: HashMap<String, Vec<String>>,
    /// Listeners, once istiod has sent some.
    lds: Option<Lds>,
    rejections: Rejections,
    held: Option<Held<Frame<DiscoveryRequest>>>,
    fallback_wanted: bool,
}

#[derive(Debug)]
struct Lds {
    /// istiod's latest LDS response without its resources.
    envelope: DiscoveryResponse,
    /// istiod's listeners in that response, with their rewrite as last sent.
    listeners: Vec<Arc<RewrittenListener>>,
    /// The last LDS response sent to Envoy.
    sent: Sent,
}

#[derive(Debug)]
struct Sent {
    nonce: String,
    origin: PushOrigin,
    plan: RewritePlan,
    resources: Vec<Bytes>,
}

impl Lds {
    fn rewritten(&self) -> impl Iterator<Item = &Arc<RewrittenListener>> {
        self.listeners.iter().filter(|l| l.changed())
    }
}

/// The response side of one stream: the single writer to the sidecar.
struct Forwarder {
    relay: Arc<Relay>,
    registration: Registration,
    shared: Arc<Shared>,
    policies: watch::Receiver<Arc<PolicySnapshot>>,
    tx: mpsc::Sender<Result<Frame<DiscoveryResponse>, Status>>,
    _gauge: StreamGauge,
    /// This stream's share of its connection to istiod.
    _connection: Lease,
}

impl Forwarder {
    fn entry(&self) -> &Arc<ProxyEntry> {
        self.registration.entry()
    }

    async fn run(mut self, mut upstream: MessageStream<DiscoveryResponse>) {
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

    /// Relays one response from istiod, rewriting its listeners. Returns false when the sidecar
    /// is gone.
    async fn on_upstream(&mut self, mut frame: Frame<DiscoveryResponse>) -> bool {
        let type_url = frame.msg().type_url.clone();
        if type_url == LISTENER_TYPE {
            let decision = decide(&self.registration.entry().clone(), &mut self.policies);
            let mut state = self.shared.state();
            // A newer response supersedes any answer held back for an older one.
            state.held = None;

            let listeners: Vec<_> = frame
                .msg()
                .resources
                .iter()
                .map(|r| self.rewrite(&state.rejections, &decision.plan, r))
                .collect();
            let resources: Vec<Bytes> = listeners.iter().map(|l| l.sent().clone()).collect();
            if listeners.iter().any(|l| l.changed()) {
                if frame.has_unknown_fields() {
                    info!(
                        nonce = %frame.msg().nonce,
                        "istiod's LDS response has fields this build does not know; the rewritten response goes without them"
                    );
                }
                frame.msg_mut().resources = resources.clone();
            }
            log_lds(&self.relay.metrics, &frame, &listeners, PushOrigin::Istiod);

            let mut envelope = frame.msg().clone();
            envelope.resources = Vec::new();
            state.lds = Some(Lds {
                envelope: owned(&envelope),
                sent: Sent {
                    nonce: frame.msg().nonce.clone(),
                    origin: PushOrigin::Istiod,
                    plan: decision.plan.clone(),
                    resources,
                },
                listeners: listeners.clone(),
            });
            drop(state);
            self.record_decision(decision, listeners);
        }

        let msg = frame.msg();
        self.shared
            .state()
            .upstream_nonces
            .insert(type_url, msg.nonce.clone());
        let form = XdsForm::StateOfTheWorld;
        self.relay
            .metrics
            .response(form, &msg.type_url, PushOrigin::Istiod);
        self.entry().record_push(
            &msg.type_url,
            PushOrigin::Istiod,
            &msg.nonce,
            &msg.version_info,
            msg.resources.len(),
        );
        self.tx.send(Ok(frame)).await.is_ok()
    }

    /// Re-renders the last listeners from istiod when a policy change alters them for this
    /// proxy, and sends them under the relay's own nonce and version.
    async fn on_policy_change(&mut self) -> bool {
        match self.render_policy_change() {
            Some(frame) => self.send_own(frame, PushReason::Policy).await,
            None => true,
        }
    }

    fn render_policy_change(&mut self) -> Option<Frame<DiscoveryResponse>> {
        let decision = decide(&self.registration.entry().clone(), &mut self.policies);
        let mut state = self.shared.state();
        let Some(lds) = state.lds.as_ref() else {
            // Nothing was sent yet: istiod's first response will carry the new decision.
            return None;
        };

        let listeners: Vec<_> = lds
            .listeners
            .iter()
            .map(|l| match l.plan_independent() {
                true => l.clone(),
                false => self.rewrite(&state.rejections, &decision.plan, &l.input),
            })
            .collect();
        let resources: Vec<Bytes> = listeners.iter().map(|l| l.sent().clone()).collect();
        if resources == lds.sent.resources {
            debug!(
                generation = decision.generation,
                "the policy change does not alter this proxy's listeners"
            );
            drop(state);
            self.record_decision(decision, listeners);
            return None;
        }

        let nonce = relay_nonce(self.entry().stream_id, self.entry().next_seq());
        let mut response = lds.envelope.clone();
        response.version_info = relay_version(
            upstream_version(&lds.envelope.version_info),
            &format!("g{}", decision.generation),
        );
        response.nonce = nonce.clone();
        response.resources = resources.clone();
        let lds = state.lds.as_mut().expect("checked above");
        lds.listeners = listeners.clone();
        lds.sent = Sent {
            nonce,
            origin: PushOrigin::Relay,
            plan: decision.plan.clone(),
            resources,
        };
        drop(state);

        let frame = Frame::new(response);
        log_lds(&self.relay.metrics, &frame, &listeners, PushOrigin::Relay);
        self.record_decision(decision, listeners);
        Some(frame)
    }

    /// Sends istiod's latest listeners unchanged, after Envoy rejected a rewrite of them.
    async fn send_fallback(&mut self) -> bool {
        match self.render_fallback() {
            Some(frame) => self.send_own(frame, PushReason::Fallback).await,
            None => true,
        }
    }

    fn render_fallback(&mut self) -> Option<Frame<DiscoveryResponse>> {
        let mut state = self.shared.state();
        if !std::mem::take(&mut state.fallback_wanted) {
            return None;
        }
        let lds = state.lds.as_ref()?;

        let nonce = relay_nonce(self.entry().stream_id, self.entry().next_seq());
        let resources: Vec<Bytes> = lds.listeners.iter().map(|l| l.input.clone()).collect();
        let mut response = lds.envelope.clone();
        response.version_info = upstream_version(&lds.envelope.version_info).to_string();
        response.nonce = nonce.clone();
        response.resources = resources.clone();

        let lds = state.lds.as_mut().expect("checked above");
        lds.sent = Sent {
            nonce: nonce.clone(),
            origin: PushOrigin::Relay,
            plan: RewritePlan::default(),
            resources,
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

    async fn send_own(&self, frame: Frame<DiscoveryResponse>, reason: PushReason) -> bool {
        let msg = frame.msg();
        self.relay
            .metrics
            .response(XdsForm::StateOfTheWorld, &msg.type_url, PushOrigin::Relay);
        self.relay
            .metrics
            .relay_push(XdsForm::StateOfTheWorld, reason);
        self.entry().record_push(
            &msg.type_url,
            PushOrigin::Relay,
            &msg.nonce,
            &msg.version_info,
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
        rejections.rewrite(&self.relay.cache, Envelope::Any, plan, resource)
    }

    fn record_decision(&self, decision: Decision, listeners: Vec<Arc<RewrittenListener>>) {
        let mut status = self.entry().status();
        status.policy = decision.policy;
        status.plan = decision.plan;
        status.listeners = listeners;
    }
}

/// Who made the response that `nonce` answers.
pub(super) fn origin_of(nonce: &str) -> PushOrigin {
    if is_relay_nonce(nonce) {
        PushOrigin::Relay
    } else {
        PushOrigin::Istiod
    }
}

fn log_lds(
    metrics: &Metrics,
    frame: &Frame<DiscoveryResponse>,
    listeners: &[Arc<RewrittenListener>],
    origin: PushOrigin,
) {
    let rewritten: Vec<&str> = listeners
        .iter()
        .filter(|l| l.changed())
        .map(|l| l.name.as_str())
        .collect();
    metrics.listeners_rewritten(XdsForm::StateOfTheWorld, rewritten.len());
    info!(
        ?origin,
        nonce = %frame.msg().nonce,
        version = %frame.msg().version_info,
        listeners = listeners.len(),
        ?rewritten,
        "sending LDS"
    );
}

/// Looks at one request from the sidecar and decides what istiod gets of it: the request itself
/// (with a version of the relay's translated back), a request of the relay's making, or nothing.
fn on_request(
    shared: &Shared,
    entry: &ProxyEntry,
    metrics: &Metrics,
    mut frame: Frame<DiscoveryRequest>,
) -> Option<Frame<DiscoveryRequest>> {
    let msg = frame.msg();
    // Istio's health reports carry `error_detail` without being rejections.
    if msg.type_url == HEALTH_INFO_TYPE {
        debug!(type_url = %msg.type_url, "relaying a health report");
        return Some(frame);
    }
    entry.record_answer(
        &msg.type_url,
        &msg.response_nonce,
        &msg.version_info,
        &msg.error_detail,
    );
    if !msg.error_detail.is_empty() {
        let origin = origin_of(&msg.response_nonce);
        metrics.rejection(XdsForm::StateOfTheWorld, &msg.type_url, origin);
    }

    let mut state = shared.state();
    let nack = !msg.error_detail.is_empty();
    let is_lds = msg.type_url == LISTENER_TYPE;

    if is_relay_nonce(&msg.response_nonce) {
        if is_lds {
            // Envoy's answer to istiod's listeners sent unchanged: now istiod hears it.
            let fallback_answered = state
                .held
                .as_ref()
                .is_some_and(|h| h.fallback_nonce.as_deref() == Some(msg.response_nonce.as_str()));
            if fallback_answered {
                let held = state.held.take().expect("checked above");
                let names = msg.resource_names.clone();
                state
                    .forwarded_names
                    .insert(LISTENER_TYPE.to_string(), names.clone());
                if nack {
                    info!("Envoy rejected istiod's listeners too; istiod gets the rejection");
                    return Some(held.nack);
                }
                debug!(nonce = %held.upstream_nonce, "Envoy took istiod's listeners; acknowledging istiod's response");
                return Some(Frame::new(DiscoveryRequest {
                    version_info: held.upstream_version,
                    resource_names: names,
                    type_url: LISTENER_TYPE.to_string(),
                    response_nonce: held.upstream_nonce,
                    ..Default::default()
                }));
            }
            if nack && reject_last_rewrite(&mut state, msg, &shared.fallback) {
                return None;
            }
        }

        // An answer to the relay's own response: istiod never sent that nonce. Only a change of
        // subscription goes on, under istiod's last nonce for the type.
        let names_changed = state.forwarded_names.get(&msg.type_url) != Some(&msg.resource_names);
        if !names_changed {
            return None;
        }
        let nonce = state
            .upstream_nonces
            .get(&msg.type_url)
            .cloned()
            .unwrap_or_default();
        state
            .forwarded_names
            .insert(msg.type_url.clone(), msg.resource_names.clone());
        drop(state);
        let request = frame.msg_mut();
        request.response_nonce = nonce;
        request.error_detail = Bytes::new();
        request.version_info = upstream_version(&request.version_info).to_string();
        return Some(frame);
    }

    if is_lds && nack && !msg.response_nonce.is_empty() {
        let rejected_ours = state.lds.as_ref().is_some_and(|lds| {
            lds.sent.nonce == msg.response_nonce
                && lds.sent.origin == PushOrigin::Istiod
                && lds.rewritten().next().is_some()
        });
        if rejected_ours && reject_last_rewrite(&mut state, msg, &shared.fallback) {
            let version = state
                .lds
                .as_ref()
                .map(|l| l.envelope.version_info.clone())
                .unwrap_or_default();
            state.held = Some(Held {
                upstream_nonce: msg.response_nonce.clone(),
                upstream_version: version,
                nack: frame,
                fallback_nonce: None,
            });
            return None;
        }
    }

    state
        .forwarded_names
        .insert(msg.type_url.clone(), msg.resource_names.clone());
    drop(state);
    let upstream = upstream_version(&frame.msg().version_info);
    if upstream.len() != frame.msg().version_info.len() {
        let upstream = upstream.to_string();
        frame.msg_mut().version_info = upstream;
    }
    Some(frame)
}

/// Marks the rewrites of the last LDS response as rejected and asks for istiod's listeners to be
/// sent unchanged. Returns false when the last response held no rewrite, so the rejection is
/// not the relay's to handle.
fn reject_last_rewrite(state: &mut State, msg: &DiscoveryRequest, fallback: &Notify) -> bool {
    let Some(lds) = state.lds.as_ref() else {
        return false;
    };
    if lds.sent.nonce != msg.response_nonce || lds.rewritten().next().is_none() {
        return false;
    }
    let error = stream::rejection_message(&msg.error_detail);
    let plan = lds.sent.plan.clone();
    let rewritten: Vec<_> = lds.rewritten().cloned().collect();
    state.rejections.reject(&rewritten, &plan, error);
    state.fallback_wanted = true;
    fallback.notify_one();
    true
}
