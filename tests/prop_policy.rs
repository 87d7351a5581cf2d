//! Generated bad and odd input for PeerAuthentication parsing, with proptest.
//!
//! Two families of input: arbitrary text, and real-looking policy files (several documents,
//! `kind: List`, block and flow style, comments) with one document mutated: characters, whole
//! lines, indentation and values. Whatever the text, `parse_yaml` returns; every error names the
//! file and the document, a field error names its field; the documents that were not touched
//! load exactly as before; and indexing and resolving whatever loaded never panics.
//!
//! Each property runs 512 cases, about a second in a debug build; `PROPTEST_CASES=20000 cargo
//! test --test prop_policy` searches longer. Inputs that once failed are kept twice: proptest's
//! seeds in `tests/prop_policy.proptest-regressions`, and each as a named test at the end of this
//! file.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::FileFailurePersistence;

use alpn_xds::policy::{
    ALPN_ANNOTATION, ParseOutcome, PathSegment, PeerAuthentication, PolicyError, PolicySet,
    Workload, parse_yaml,
};

const ORIGIN: &str = "policies/x.yaml";

const NAMESPACES: &[&str] = &["shop", "web", "istio-system", "default", "other"];
const LABELS: &[(&str, &str)] = &[
    ("app", "web"),
    ("app", "api"),
    ("version", "v1"),
    ("app.kubernetes.io/name", "web"),
];
const MODES: &[&str] = &["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];
const PORTS: &[u32] = &[80, 8080, 9080, 15006, 65535];
const ANNOTATIONS: &[&str] = &["true", "false", " TRUE ", "False", "yes", ""];
const TIMES: &[&str] = &[
    "2024-05-01T10:00:00Z",
    "2023-01-01T00:00:00Z",
    "2024-05-01T10:00:00.5+02:00",
];

// ---------------------------------------------------------------------------------------------
// A file to write, and what it should give

/// One PeerAuthentication as the generator writes it.
#[derive(Clone, Debug)]
struct Policy {
    beta: bool,
    namespace: Option<&'static str>,
    created: Option<&'static str>,
    annotation: Option<&'static str>,
    labels: Vec<(&'static str, &'static str)>,
    mode: Option<&'static str>,
    ports: Vec<(u32, &'static str)>,
    /// Metadata in flow style (`metadata: {name: x, namespace: y}`).
    flow: bool,
    comment: bool,
}

impl Policy {
    /// The object's lines, unindented; `name` is unique in the file.
    fn lines(&self, name: &str) -> Vec<String> {
        let mut lines = Vec::new();
        let version = if self.beta { "v1beta1" } else { "v1" };
        lines.push(format!("apiVersion: security.istio.io/{version}"));
        lines.push("kind: PeerAuthentication".to_string());
        if self.flow && self.annotation.is_none() && self.created.is_none() {
            let namespace = self.namespace.map(|ns| format!(", namespace: {ns}"));
            lines.push(format!(
                "metadata: {{name: {name}{}}}",
                namespace.unwrap_or_default()
            ));
        } else {
            lines.push("metadata:".to_string());
            lines.push(format!("  name: {name}"));
            if let Some(namespace) = self.namespace {
                lines.push(format!("  namespace: {namespace}"));
            }
            if let Some(created) = self.created {
                lines.push(format!("  creationTimestamp: \"{created}\""));
            }
            if let Some(value) = self.annotation {
                lines.push("  annotations:".to_string());
                lines.push(format!("    {ALPN_ANNOTATION}: \"{value}\""));
                lines.push("    kubectl.kubernetes.io/last-applied-configuration: '{}'".into());
            }
        }
        if self.comment {
            lines.push("# the spec follows".to_string());
        }
        if self.labels.is_empty() && self.mode.is_none() && self.ports.is_empty() {
            return lines;
        }
        lines.push("spec:".to_string());
        if !self.labels.is_empty() {
            lines.push("  selector:".to_string());
            lines.push("    matchLabels:".to_string());
            let mut seen = Vec::new();
            for (key, value) in &self.labels {
                if !seen.contains(key) {
                    seen.push(*key);
                    lines.push(format!("      {key}: {value}"));
                }
            }
        }
        if let Some(mode) = self.mode {
            lines.push("  mtls:".to_string());
            lines.push(format!("    mode: {mode}"));
        }
        if !self.ports.is_empty() {
            lines.push("  portLevelMtls:".to_string());
            let mut seen = Vec::new();
            for (port, mode) in &self.ports {
                if !seen.contains(port) {
                    seen.push(*port);
                    lines.push(format!("    {port}:"));
                    lines.push(format!("      mode: {mode}"));
                }
            }
        }
        lines
    }
}

/// One document of the file.
#[derive(Clone, Debug)]
enum Document {
    Policy(Policy),
    /// `kind: List` (or a typed `PeerAuthenticationList`) of policies and other objects.
    List(bool, Vec<Option<Policy>>),
    /// An object of another kind, skipped without an error.
    Other,
}

/// A file as text, with where each document's lines are and which names each should give.
#[derive(Clone, Debug)]
struct File {
    /// Lines without their newline.
    lines: Vec<String>,
    /// Per document: the range of its lines (0-based, the `---` marker excluded).
    documents: Vec<std::ops::Range<usize>>,
    /// Per document: the names of the policies it holds.
    names: Vec<Vec<String>>,
}

fn write_file(documents: &[Document]) -> File {
    let mut file = File {
        lines: vec!["# PeerAuthentication for the shop".to_string()],
        documents: Vec::new(),
        names: Vec::new(),
    };
    for (d, document) in documents.iter().enumerate() {
        if d > 0 {
            file.lines
                .push(if d % 2 == 0 { "---" } else { "--- # next" }.to_string());
        }
        let start = file.lines.len();
        let mut names = Vec::new();
        match document {
            Document::Policy(policy) => {
                let name = format!("pa-{d}");
                file.lines.extend(policy.lines(&name));
                names.push(name);
            }
            Document::List(typed, items) => {
                if *typed {
                    file.lines.push("apiVersion: security.istio.io/v1".into());
                    file.lines.push("kind: PeerAuthenticationList".into());
                } else {
                    file.lines.push("apiVersion: v1".into());
                    file.lines.push("kind: List".into());
                }
                file.lines.push("items:".into());
                for (i, item) in items.iter().enumerate() {
                    let lines = match item {
                        Some(policy) => {
                            let name = format!("pa-{d}-{i}");
                            let lines = policy.lines(&name);
                            names.push(name);
                            lines
                        }
                        None => vec![
                            "apiVersion: v1".into(),
                            "kind: Service".into(),
                            format!("metadata: {{name: svc-{d}-{i}}}"),
                        ],
                    };
                    for (n, line) in lines.into_iter().enumerate() {
                        let lead = if n == 0 { "- " } else { "  " };
                        file.lines.push(format!("{lead}{line}"));
                    }
                }
            }
            Document::Other => {
                file.lines.push("apiVersion: v1".into());
                file.lines.push("kind: ConfigMap".into());
                file.lines.push(format!("metadata: {{name: config-{d}}}"));
                file.lines.push("data: {mode: STRICT}".into());
            }
        }
        file.documents.push(start..file.lines.len());
        file.names.push(names);
    }
    file
}

impl File {
    fn text(&self) -> String {
        let mut text = self.lines.join("\n");
        text.push('\n');
        text
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations of one document

/// One edit of a document's lines.
#[derive(Clone, Debug)]
enum Edit {
    ReplaceChar(Index, Index, char),
    InsertChar(Index, Index, char),
    DeleteChar(Index, Index),
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    Indent(Index, &'static str),
    Dedent(Index, usize),
    /// Replaces what follows `: ` (or `- `) on a line.
    Value(Index, &'static str),
    /// Cuts the document after a line.
    Truncate(Index),
}

/// Characters YAML gives meaning to, and some it does not like.
const CHARS: &[char] = &[
    ':', '-', '[', ']', '{', '}', '"', '\'', '#', '&', '*', '!', '|', '>', '%', '@', '`', ',', '?',
    ' ', '\t', '\n', '\r', '\\', 'é', '\u{0}', '\u{feff}', '\u{85}', 'x', '7',
];

/// Values that are wrong, odd or surprising where a string or a mapping is expected.
const VALUES: &[&str] = &[
    "~",
    "null",
    "[]",
    "{}",
    "123",
    "-1",
    "0x1F",
    "1e400",
    ".inf",
    ".nan",
    "true",
    "\"\"",
    "''",
    "STRICTT",
    "strict",
    "\"8080\"",
    "65536",
    "0",
    "123456789012345678901234567890",
    "!!binary aGk=",
    "!Custom x",
    "&anchor x",
    "*anchor",
    "|",
    ">-",
    "[a, {b: c}]",
    "{mode: STRICT}",
    "\"2024-13-45T99:00:00Z\"",
    "2024-05-01T10:00:00Z",
    "'unterminated",
    "\"\\u00e9\"",
    "a: b: c",
];

impl Edit {
    /// Applies the edit to `lines[range]`; returns the new end of the range.
    fn apply(&self, lines: &mut Vec<String>, range: std::ops::Range<usize>) -> usize {
        let (start, mut end) = (range.start, range.end);
        if start == end {
            return end;
        }
        let line = |index: &Index| start + index.index(end - start);
        let char_at = |text: &str, index: &Index| {
            let boundaries: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .collect();
            boundaries[index.index(boundaries.len())]
        };
        match self {
            Edit::ReplaceChar(l, c, new) => {
                let i = line(l);
                let at = char_at(&lines[i], c);
                let text = &mut lines[i];
                if at < text.len() {
                    let old = text[at..].chars().next().map_or(0, char::len_utf8);
                    text.replace_range(at..at + old, &new.to_string());
                } else {
                    text.push(*new);
                }
            }
            Edit::InsertChar(l, c, new) => {
                let i = line(l);
                let at = char_at(&lines[i], c);
                lines[i].insert(at, *new);
            }
            Edit::DeleteChar(l, c) => {
                let i = line(l);
                let at = char_at(&lines[i], c);
                if at < lines[i].len() {
                    lines[i].remove(at);
                }
            }
            Edit::DeleteLine(l) => {
                lines.remove(line(l));
                end -= 1;
            }
            Edit::DuplicateLine(l) => {
                let i = line(l);
                lines.insert(i, lines[i].clone());
                end += 1;
            }
            Edit::SwapLines(a, b) => {
                let (a, b) = (line(a), line(b));
                lines.swap(a, b);
            }
            Edit::Indent(l, by) => lines[line(l)].insert_str(0, by),
            Edit::Dedent(l, by) => {
                let i = line(l);
                let spaces = lines[i].len() - lines[i].trim_start_matches(' ').len();
                lines[i].drain(..spaces.min(*by));
            }
            Edit::Value(l, value) => {
                let i = line(l);
                let text = &mut lines[i];
                let at = text
                    .find(": ")
                    .map(|at| at + 2)
                    .or_else(|| text.find("- ").map(|at| at + 2));
                match at {
                    Some(at) => text.replace_range(at.., value),
                    None => text.push_str(&format!(": {value}")),
                }
            }
            Edit::Truncate(l) => {
                let i = line(l) + 1;
                lines.drain(i..end);
                end = i;
            }
        }
        end
    }
}

/// The line breaks the YAML library counts in `lines`, each ended by `\n`: `\r\n` is one, a
/// lone `\r`, NEL, LS and PS are one each.
fn line_breaks(lines: &[String]) -> usize {
    lines
        .iter()
        .map(|line| {
            let line = line.strip_suffix('\r').unwrap_or(line);
            1 + line
                .chars()
                .filter(|c| ['\r', '\u{85}', '\u{2028}', '\u{2029}'].contains(c))
                .count()
        })
        .sum()
}

/// Whether a line is a document marker, as YAML reads it.
fn is_marker(line: &str) -> bool {
    let line = line.trim_end_matches('\r');
    ["---", "..."].iter().any(|marker| {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
    })
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn policy() -> impl Strategy<Value = Policy> {
    (
        any::<bool>(),
        proptest::option::weighted(0.9, select(NAMESPACES)),
        proptest::option::of(select(TIMES)),
        proptest::option::weighted(0.6, select(ANNOTATIONS)),
        proptest::collection::vec(select(LABELS), 0..3),
        proptest::option::of(select(MODES)),
        proptest::collection::vec((select(PORTS), select(MODES)), 0..3),
        any::<bool>(),
        proptest::bool::weighted(0.2),
    )
        .prop_map(
            |(beta, namespace, created, annotation, labels, mode, ports, flow, comment)| Policy {
                beta,
                namespace,
                created,
                annotation,
                labels,
                mode,
                ports,
                flow,
                comment,
            },
        )
}

fn document() -> impl Strategy<Value = Document> {
    prop_oneof![
        5 => policy().prop_map(Document::Policy),
        2 => (
            any::<bool>(),
            proptest::collection::vec(proptest::option::weighted(0.8, policy()), 1..4),
        )
            .prop_map(|(typed, items)| Document::List(typed, items)),
        1 => Just(Document::Other),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    let char = select(CHARS);
    prop_oneof![
        3 => (any::<Index>(), any::<Index>(), char.clone())
            .prop_map(|(l, c, x)| Edit::ReplaceChar(l, c, x)),
        2 => (any::<Index>(), any::<Index>(), char).prop_map(|(l, c, x)| Edit::InsertChar(l, c, x)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(l, c)| Edit::DeleteChar(l, c)),
        1 => any::<Index>().prop_map(Edit::DeleteLine),
        1 => any::<Index>().prop_map(Edit::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        1 => (any::<Index>(), select(&[" ", "  ", "\t", "- "][..]))
            .prop_map(|(l, by)| Edit::Indent(l, by)),
        1 => (any::<Index>(), 1..4usize).prop_map(|(l, by)| Edit::Dedent(l, by)),
        3 => (any::<Index>(), select(VALUES)).prop_map(|(l, v)| Edit::Value(l, v)),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

/// Text that looks a little like YAML, more often than arbitrary text does.
fn yamlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        select(CHARS).prop_map(String::from),
        select(VALUES).prop_map(String::from),
        select(
            &[
                "kind: PeerAuthentication\n",
                "apiVersion: security.istio.io/v1\n",
                "kind: List\nitems:\n",
                "- ",
                "metadata:\n  name: a\n",
                "spec:\n",
                "  portLevelMtls:\n",
                "  mtls: ",
                "---\n",
                "...\n",
                "\n",
                "  ",
            ][..]
        )
        .prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Checks

/// Every error names the file and a document; a field error names its field; a syntax error has
/// a line. Returns each error's document number.
fn check_errors(outcome: &ParseOutcome) -> Result<Vec<usize>, TestCaseError> {
    let mut documents = Vec::new();
    for error in &outcome.errors {
        let text = error.to_string();
        let site = error.site();
        prop_assert_eq!(site.origin.as_str(), ORIGIN);
        let document = site.document;
        prop_assert!(document.is_some_and(|d| d >= 1), "no document: {text}");
        let document = document.unwrap();
        let named = format!("{ORIGIN}, document {document}");
        prop_assert!(
            text.strip_prefix(&named)
                .is_some_and(|rest| rest.starts_with([',', ':'])),
            "does not start with {named:?}: {text}"
        );
        prop_assert!(site.line.is_some_and(|l| l >= 1), "no line: {text}");
        match error {
            PolicyError::InvalidField { field, .. } => {
                prop_assert!(!field.is_root(), "no field: {text}");
                prop_assert!(
                    text.contains(&format!(": {field}: ")),
                    "field {field} not in {text}"
                );
                // Inside a `kind: List`, the item is named too.
                if let [PathSegment::Field(items), PathSegment::Index(i), ..] = &field.segments[..]
                    && items == "items"
                {
                    prop_assert_eq!(site.item, Some(i + 1), "{}", text);
                    prop_assert!(text.contains(&format!(", item {}", i + 1)), "{}", text);
                }
            }
            PolicyError::Syntax { message, .. } => {
                prop_assert!(!message.is_empty(), "empty message: {text}");
            }
        }
        documents.push(document);
    }
    Ok(documents)
}

/// Indexing and resolving whatever loaded never panics, and its answers hang together.
fn check_resolve(policies: &[PeerAuthentication]) -> Result<(), TestCaseError> {
    for root in ["istio-system", "shop"] {
        let set = PolicySet::new(policies.to_vec(), root);
        prop_assert_eq!(set.len(), policies.len());
        let _ = serde_json::to_string(&set).expect("serializes");
        for namespace in NAMESPACES {
            for labels in [&LABELS[..0], &LABELS[..1], &LABELS[1..3], &LABELS[2..]] {
                let workload = Workload {
                    namespace: namespace.to_string(),
                    name: "pod-1".to_string(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                };
                let effective = set.resolve(&workload);
                let _ = serde_json::to_string(&effective).expect("serializes");
                for port in PORTS.iter().copied().map(Some).chain([None, Some(1)]) {
                    let verdict = effective.port_verdict(port);
                    prop_assert_eq!(verdict.add, effective.adds_standard_alpns(port));
                    prop_assert_ne!(effective.mode_for_port(port).as_str(), "UNSET");
                }
            }
        }
    }
    Ok(())
}

/// The file as written loads every policy, without an error.
fn check_clean(file: &File) -> Result<ParseOutcome, TestCaseError> {
    let outcome = parse_yaml(&file.text(), ORIGIN);
    prop_assert_eq!(&outcome.errors, &Vec::new(), "{}", file.text());
    let names: Vec<&str> = outcome.policies.iter().map(|p| p.name.as_str()).collect();
    let expected: Vec<&str> = file.names.iter().flatten().map(String::as_str).collect();
    prop_assert_eq!(names, expected);
    Ok(outcome)
}

/// Writes `documents`, applies `edits` to the lines of one of them, and checks what loads: the
/// other documents exactly as before, and errors only about the edited one, on its lines.
fn check_mutated(
    documents: &[Document],
    target: Index,
    edits: &[Edit],
) -> Result<(), TestCaseError> {
    let file = write_file(documents);
    let clean = check_clean(&file)?;

    let target = target.index(documents.len());
    let mut lines = file.lines.clone();
    let mut range = file.documents[target].clone();
    for edit in edits {
        range.end = edit.apply(&mut lines, range.clone());
    }
    let mut text = lines.join("\n");
    text.push('\n');

    let outcome = parse_yaml(&text, ORIGIN);
    let error_documents = check_errors(&outcome)?;
    check_resolve(&outcome.policies)?;

    // The other documents load as they did.
    for (d, names) in file.names.iter().enumerate() {
        if d == target {
            continue;
        }
        for name in names {
            let before = clean.policies.iter().find(|p| &p.name == name).unwrap();
            prop_assert!(
                outcome.policies.contains(before),
                "document {} ({name}) no longer loads:\n{text}\n{:?}",
                d + 1,
                outcome.errors
            );
        }
    }

    // With the markers where they were, the errors are the edited document's, on its lines (a
    // marker line included, and the line after its last, where the parser meets its end).
    // Lines as the parser counts them: a NEL or a lone `\r` put in by an edit breaks a line too.
    let edited = &lines[range.clone()];
    let marker = if target == 0 { 0 } else { range.start - 1 };
    let first_line = 1 + line_breaks(&lines[..marker]);
    let lines_of_target = first_line..=first_line + line_breaks(&lines[marker..range.end]) + 1;
    let mut parser_lines = edited
        .iter()
        .flat_map(|line| line.split(['\r', '\u{85}', '\u{2028}', '\u{2029}']));
    if !parser_lines.any(is_marker) && !edited.is_empty() {
        for (document, error) in error_documents.into_iter().zip(&outcome.errors) {
            prop_assert_eq!(
                document,
                target + 1,
                "error blames another document:\n{}\n{:?}",
                text,
                outcome.errors
            );
            let line = error.site().line.unwrap_or(0);
            prop_assert!(
                lines_of_target.contains(&line),
                "line {line} is not in {lines_of_target:?}: {error}\n{text}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config(512))]

    /// Any text at all: `parse_yaml` returns, its errors are well placed.
    #[test]
    fn arbitrary_text(text in any::<String>()) {
        let outcome = parse_yaml(&text, ORIGIN);
        check_errors(&outcome)?;
        check_resolve(&outcome.policies)?;
    }

    /// YAML-like soup: more errors of every kind.
    #[test]
    fn yamlish_text(text in yamlish()) {
        let outcome = parse_yaml(&text, ORIGIN);
        check_errors(&outcome)?;
        check_resolve(&outcome.policies)?;
    }

    /// Real-looking files load every policy, without an error.
    #[test]
    fn generated_files_load(documents in proptest::collection::vec(document(), 1..6)) {
        let file = write_file(&documents);
        let outcome = check_clean(&file)?;
        check_resolve(&outcome.policies)?;
    }

    /// One document edited: errors name it, and the others still load.
    #[test]
    fn one_document_mutated(
        documents in proptest::collection::vec(document(), 1..6),
        target in any::<Index>(),
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        check_mutated(&documents, target, &edits)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs that once failed, kept by name

fn check_text(text: &str) -> ParseOutcome {
    let outcome = parse_yaml(text, ORIGIN);
    check_errors(&outcome).unwrap();
    check_resolve(&outcome.policies).unwrap();
    outcome
}

/// Text after the root node ends: the YAML library wants a `---` there, and the document failed
/// with "more than one document is not supported" and no line.
#[test]
fn regression_text_after_the_root_node_has_a_line() {
    for (text, line) in [("''ᾶ", 1), ("  portLevelMtls:\n,", 2)] {
        let outcome = check_text(text);
        let [PolicyError::Syntax { site, message }] = outcome.errors.as_slice() else {
            panic!("one syntax error: {:?}", outcome.errors);
        };
        assert_eq!(site.line, Some(line), "{text:?}");
        assert!(!message.contains("more than one document"), "{message}");
    }

    // A namespace indented less than the name: the document is reported, at the namespace,
    // and the documents around it load.
    let text = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a, namespace: shop}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
    name: b
  namespace: shop
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: c, namespace: shop}
";
    let outcome = check_text(text);
    let names: Vec<_> = outcome.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    let [error] = outcome.errors.as_slice() else {
        panic!("one error: {:?}", outcome.errors);
    };
    assert!(
        error
            .to_string()
            .starts_with("policies/x.yaml, document 2, line 9 column 3: "),
        "{error}"
    );
}

/// A NEL (or a lone `\r`, LS, PS) is a line break for the YAML library, so a `---` after it
/// starts a document; the splitter broke lines only at `\n`, and the whole text failed as "more
/// than one document", without a line.
#[test]
fn regression_documents_after_any_line_break_the_parser_knows() {
    let outcome = check_text("|\u{85}---\n~");
    assert_eq!(outcome.errors, vec![]);

    // A file with old Mac line endings: three policies, three documents.
    let text = [
        "apiVersion: security.istio.io/v1\rkind: PeerAuthentication\rmetadata: {name: a}",
        "apiVersion: security.istio.io/v1\rkind: PeerAuthentication\rmetadata: {name: b}",
        "apiVersion: security.istio.io/v1\rkind: PeerAuthentication\rmetadata: {name: c\r",
    ]
    .join("\r---\r");
    let outcome = check_text(&text);
    let names: Vec<_> = outcome.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let [error] = outcome.errors.as_slice() else {
        panic!("one error: {:?}", outcome.errors);
    };
    assert_eq!(error.site().document, Some(3), "{error}");
    assert!(error.site().line.is_some_and(|line| line >= 9), "{error}");
}
