//! The explanation for people: the decision first, then the workload and its policy, each
//! inbound listener with the chains that change and those that do not, and the warnings last,
//! where they are seen.

use std::fmt::Write;

use super::model::{
    ChainClassCounts, ExplainedChain, Explanation, Http10State, ListenerExplanation,
};
use crate::policy::ALPN_ANNOTATION;
use crate::rewrite::SkipReason;

/// Conversion notes shown per listener besides the grouped ones; the JSON output has them all.
const NOTES_SHOWN: usize = 4;

/// Longest conversion note shown, in characters.
const NOTE_WIDTH: usize = 140;

/// Names of skipped listeners shown before "and N more".
const SKIPPED_SHOWN: usize = 5;

/// The explanation as text, ending with a newline.
pub(super) fn render(explanation: &Explanation) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_all(&mut out, explanation);
    out
}

fn write_all(out: &mut String, e: &Explanation) -> std::fmt::Result {
    writeln!(out, "Decision: {}", e.decision.summary)?;
    writeln!(out)?;
    workload(out, e)?;
    policy(out, e)?;
    for listener in e.listeners.iter().filter(|l| shown(l)) {
        writeln!(out)?;
        self::listener(out, listener)?;
    }
    skipped(out, e)?;
    if let Some(note) = &e.http10 {
        writeln!(out)?;
        let state = match note.state {
            Http10State::On => "served",
            Http10State::Off => "not served",
            Http10State::Unknown => "depends",
        };
        writeln!(out, "HTTP/1.0: {state}: {}", note.message)?;
    }
    if !e.warnings.is_empty() {
        writeln!(out)?;
        writeln!(out, "Warnings ({})", e.warnings.len())?;
        for warning in &e.warnings {
            writeln!(out, "  ! {}", warning.message)?;
        }
    }
    Ok(())
}

/// Listeners that get a section of their own: all but those skipped as not inbound.
fn shown(listener: &ListenerExplanation) -> bool {
    listener.skipped != Some(SkipReason::NotInbound)
}

fn workload(out: &mut String, e: &Explanation) -> std::fmt::Result {
    let w = &e.workload;
    let pod = if w.workload.name.is_empty() {
        "a pod".to_string()
    } else {
        format!("pod {}", w.workload.name)
    };
    let labels = if w.workload.labels.is_empty() {
        "no labels".to_string()
    } else {
        let pairs: Vec<String> = w
            .workload
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("labels {}", pairs.join(", "))
    };
    let from = match w.from.as_str() {
        "flags" => "given by flags",
        "metadata" => "from the node metadata",
        "node id" => "from the node id",
        other => other,
    };
    writeln!(
        out,
        "Workload:   {pod} in namespace {} ({from}), {labels}",
        w.workload.namespace
    )?;
    if let Some(id) = &w.node_id {
        let version = match &w.istio_version {
            Some(version) => format!(", Istio {version}"),
            None => String::new(),
        };
        writeln!(out, "            node {id}{version}")?;
    }
    let p = &e.policies;
    writeln!(
        out,
        "Policies:   {} loaded from {} (root namespace {}){}",
        p.loaded,
        p.path,
        p.root_namespace,
        match p.errors.len() {
            0 => String::new(),
            n => format!(", {n} document(s) not loaded: see warnings"),
        }
    )
}

fn policy(out: &mut String, e: &Explanation) -> std::fmt::Result {
    let policy = &e.policy;
    let state = if policy.alpn.enabled { "on" } else { "off" };
    writeln!(
        out,
        "Annotation: {ALPN_ANNOTATION} {state}: {}",
        policy.alpn.reason
    )?;
    writeln!(
        out,
        "mTLS mode:  {}: {}",
        policy.workload_mode, policy.mode_reason
    )?;

    writeln!(out)?;
    writeln!(out, "Ports")?;
    for port in &e.ports {
        let name = match port.port {
            Some(number) => format!("port {number}"),
            None => "passthrough and other ports".to_string(),
        };
        let mode = if port.port_level {
            format!("{} ({})", port.mode, port.mode_reason)
        } else {
            format!("{} (workload mode)", port.mode)
        };
        let verdict = if port.add {
            "its mTLS HTTP chains get the standard ALPNs"
        } else {
            "its chains stay as they are"
        };
        writeln!(out, "  {name}: {mode}: {verdict}")?;
    }

    if !policy.reports.is_empty() {
        writeln!(out)?;
        writeln!(out, "Reports")?;
        for report in &policy.reports {
            writeln!(out, "  - {}", report.message)?;
        }
    }
    Ok(())
}

fn listener(out: &mut String, l: &ListenerExplanation) -> std::fmt::Result {
    let name = if l.name.is_empty() {
        "(unnamed)".to_string()
    } else {
        format!("{:?}", l.name)
    };
    if let Some(error) = &l.error {
        return writeln!(out, "Listener {name}: could not be read: {error}");
    }
    let version = match &l.version_info {
        Some(version) => format!(" (version {version})"),
        None => String::new(),
    };
    writeln!(
        out,
        "Listener {name}{version}: {} filter chains: {}",
        l.filter_chains,
        classes(&l.chain_classes)
    )?;
    if l.skipped == Some(SkipReason::UsesFilterChainMatcher) {
        writeln!(
            out,
            "  left as it is: {}",
            SkipReason::UsesFilterChainMatcher
        )?;
    }

    let (changed, unchanged): (Vec<&ExplainedChain>, Vec<&ExplainedChain>) =
        l.chains.iter().partition(|c| c.changed);
    if changed.is_empty() {
        writeln!(out, "  changes: none")?;
    } else {
        writeln!(out, "  changes")?;
        for chain in changed {
            writeln!(out, "    chain {}", title(chain))?;
            writeln!(out, "      adds             {}", chain.change.added)?;
            if !chain.change.already_present.is_empty() {
                writeln!(
                    out,
                    "      already present  {}",
                    chain.change.already_present
                )?;
            }
            collisions(out, chain)?;
            writeln!(out, "      why              {}", chain.reason)?;
        }
    }
    if !unchanged.is_empty() {
        writeln!(out, "  unchanged mTLS HTTP chains")?;
        for chain in unchanged {
            writeln!(out, "    chain {}: {}", title(chain), chain.reason)?;
            collisions(out, chain)?;
        }
    }

    if !l.notes.is_empty() {
        writeln!(
            out,
            "  dump conversion notes (all {} in --output json)",
            l.notes.len()
        )?;
        for note in summarize_notes(&l.notes) {
            writeln!(out, "    - {note}")?;
        }
    }
    Ok(())
}

/// The conversion notes in a few lines: payloads kept opaque in one line, v2 renames counted,
/// the first few others as they are.
fn summarize_notes(notes: &[String]) -> Vec<String> {
    let mut opaque = Vec::new();
    let mut partial = Vec::new();
    let mut v2 = 0;
    let mut others = Vec::new();
    for note in notes {
        if let Some((name, _)) = note
            .strip_suffix(" converted, its other settings left out")
            .and_then(|rest| rest.split_once(": only "))
        {
            partial.push(name.rsplit('.').next().unwrap_or(name).to_string());
        } else if let Some(rest) =
            note.strip_suffix(" kept without its payload (type not converted)")
        {
            opaque.push(rest.to_string());
        } else if let Some(rest) = note.strip_suffix(" kept without its payload") {
            let inner = rest.rsplit(" wrapping ").next().unwrap_or(rest);
            opaque.push(inner.rsplit('/').next().unwrap_or(inner).to_string());
        } else if note.starts_with("v2 ") {
            v2 += 1;
        } else {
            others.push(note.clone());
        }
    }
    let mut lines = Vec::new();
    if !opaque.is_empty() {
        lines.push(format!(
            "kept opaque, not needed to classify chains: {}",
            opaque.join(", ")
        ));
    }
    if !partial.is_empty() {
        lines.push(format!(
            "read only in part (what classifies chains): {}",
            partial.join(", ")
        ));
    }
    if v2 > 0 {
        lines.push(format!(
            "{v2} Envoy v2 names, types or configs read as their v3 form"
        ));
    }
    let hidden = others.len().saturating_sub(NOTES_SHOWN);
    lines.extend(others.iter().take(NOTES_SHOWN).map(|note| brief(note)));
    if hidden > 0 {
        lines.push(format!("... and {hidden} more"));
    }
    lines
}

fn collisions(out: &mut String, chain: &ExplainedChain) -> std::fmt::Result {
    for collision in &chain.change.collisions {
        writeln!(
            out,
            "      not added        {}: chain {} {:?} claims it on the same match",
            collision.alpn, collision.other_index, collision.other_name
        )?;
    }
    Ok(())
}

/// `3 "name" (sniffed port, port 8080, PERMISSIVE)`; unnamed chains go without the name.
fn title(chain: &ExplainedChain) -> String {
    let c = &chain.change;
    let port = match c.destination_port {
        Some(port) => format!(", port {port}"),
        None => String::new(),
    };
    let name = if c.name.is_empty() {
        String::new()
    } else {
        format!(" {:?}", c.name)
    };
    format!("{}{name} ({}{port}, {})", c.index, c.kind, chain.mode)
}

fn classes(counts: &ChainClassCounts) -> String {
    let parts: Vec<String> = [
        (counts.mtls_http, "mTLS HTTP"),
        (counts.mtls_tcp, "mTLS TCP"),
        (counts.other_tls, "other TLS"),
        (counts.tls_passthrough, "TLS passthrough"),
        (counts.plaintext, "plaintext"),
        (counts.not_understood, "not understood"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

fn brief(note: &str) -> String {
    if note.chars().count() <= NOTE_WIDTH {
        return note.to_string();
    }
    let cut: String = note.chars().take(NOTE_WIDTH - 3).collect();
    format!("{cut}...")
}

fn skipped(out: &mut String, e: &Explanation) -> std::fmt::Result {
    let names: Vec<String> = e
        .listeners
        .iter()
        .filter(|l| !shown(l))
        .map(|l| format!("{:?}", l.name))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let mut list = names
        .iter()
        .take(SKIPPED_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SKIPPED_SHOWN {
        list.push_str(&format!(" and {} more", names.len() - SKIPPED_SHOWN));
    }
    writeln!(out)?;
    writeln!(
        out,
        "Skipped {} listener(s) that are not INBOUND: {list}",
        names.len()
    )
}
