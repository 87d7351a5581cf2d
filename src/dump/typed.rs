//! `typed_config` payloads and the names around them: Envoy v2 type URLs and filter names mapped
//! to their v3 spelling, and the few payloads the chain classification looks into encoded for
//! real. Every other type, Istio's own included, keeps its type URL with an empty payload.

use envoy_types::pb::envoy::config::core::v3::Http1ProtocolOptions;
use envoy_types::pb::envoy::extensions::filters::listener::{
    http_inspector::v3::HttpInspector, original_dst::v3::OriginalDst,
    tls_inspector::v3::TlsInspector,
};
use envoy_types::pb::envoy::extensions::filters::network::{
    http_connection_manager::v3::{HttpConnectionManager, http_connection_manager::CodecType},
    tcp_proxy::v3::{TcpProxy, tcp_proxy::ClusterSpecifier},
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use super::DumpError;
use super::json::{Fields, Node, Notes};
use super::tls;

const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// v2 type names whose v3 name does not follow from the `envoy.config.filter.*` pattern.
const V2_TYPES: &[(&str, &str)] = &[
    ("envoy.api.v2.Listener", "envoy.config.listener.v3.Listener"),
    (
        "envoy.api.v2.auth.DownstreamTlsContext",
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
    ),
    (
        "envoy.api.v2.auth.UpstreamTlsContext",
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    ),
    (
        "envoy.api.v2.RouteConfiguration",
        "envoy.config.route.v3.RouteConfiguration",
    ),
    (
        "envoy.config.accesslog.v2.FileAccessLog",
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
    ),
    (
        "envoy.admin.v2alpha.ListenersConfigDump",
        "envoy.admin.v3.ListenersConfigDump",
    ),
];

/// v2 filter and transport socket names and their v3 names.
const V2_NAMES: &[(&str, &str)] = &[
    (
        "envoy.http_connection_manager",
        "envoy.filters.network.http_connection_manager",
    ),
    ("envoy.tcp_proxy", "envoy.filters.network.tcp_proxy"),
    ("envoy.ratelimit", "envoy.filters.network.ratelimit"),
    ("envoy.ext_authz", "envoy.filters.network.ext_authz"),
    ("envoy.mongo_proxy", "envoy.filters.network.mongo_proxy"),
    ("envoy.redis_proxy", "envoy.filters.network.redis_proxy"),
    ("envoy.echo", "envoy.filters.network.echo"),
    (
        "envoy.listener.original_dst",
        "envoy.filters.listener.original_dst",
    ),
    (
        "envoy.listener.original_src",
        "envoy.filters.listener.original_src",
    ),
    (
        "envoy.listener.tls_inspector",
        "envoy.filters.listener.tls_inspector",
    ),
    (
        "envoy.listener.http_inspector",
        "envoy.filters.listener.http_inspector",
    ),
    (
        "envoy.listener.proxy_protocol",
        "envoy.filters.listener.proxy_protocol",
    ),
    ("tls", "envoy.transport_sockets.tls"),
    ("raw_buffer", "envoy.transport_sockets.raw_buffer"),
];

/// The v3 name of a filter or transport socket, noting a rename.
pub(super) fn v3_name(name: &str, notes: &mut Notes) -> String {
    match V2_NAMES.iter().find(|(old, _)| *old == name) {
        Some((old, new)) => {
            notes.add(format!("v2 name {old} renamed {new}"));
            (*new).to_owned()
        }
        None => name.to_owned(),
    }
}

/// The v3 full message name for a v2 one, when there is one.
pub(super) fn v3_type_name(name: &str) -> Option<String> {
    if let Some((_, new)) = V2_TYPES.iter().find(|(old, _)| *old == name) {
        return Some((*new).to_owned());
    }
    // envoy.config.filter.<kind>.<filter>.<v2 | v2alpha | v2alpha1>.<Message>
    let rest = name.strip_prefix("envoy.config.filter.")?;
    let parts: Vec<&str> = rest.split('.').collect();
    match parts.as_slice() {
        [
            kind @ ("network" | "listener" | "http"),
            filter,
            version,
            message,
        ] if version.starts_with("v2") => Some(format!(
            "envoy.extensions.filters.{kind}.{filter}.v3.{message}"
        )),
        _ => None,
    }
}

/// A type URL with any v2 message name replaced by its v3 name (noted).
pub(super) fn v3_type_url(url: &str, notes: &mut Notes) -> String {
    let (prefix, name) = match url.rfind('/') {
        Some(slash) => url.split_at(slash + 1),
        None => ("", url),
    };
    match v3_type_name(name) {
        Some(v3) => {
            notes.add(format!("v2 type {name} mapped to {v3}"));
            format!("{TYPE_URL_PREFIX}{v3}")
        }
        None if prefix.is_empty() => format!("{TYPE_URL_PREFIX}{name}"),
        None => url.to_owned(),
    }
}

/// Reads an `Any` (`{"@type": ..., fields...}`) into a v3 `Any`. Never fails on a type it does
/// not know: such a payload keeps its type URL and loses its content, with a note.
pub(super) fn any(node: &Node<'_>, notes: &mut Notes) -> Result<Any, DumpError> {
    let mut fields = node.object("Any")?;
    let Some(url) = fields.type_url()? else {
        return Err(node.error("typed_config without @type"));
    };
    let url = v3_type_url(&url, notes);
    payload(url, fields, notes)
}

/// Reads a v2 `config` (a `Struct` whose type follows from the filter's v3 name) into an `Any`,
/// or `None` with a note when the name does not say which type it is.
pub(super) fn legacy_config(
    filter: &str,
    node: &Node<'_>,
    notes: &mut Notes,
) -> Result<Option<Any>, DumpError> {
    let url = match filter {
        "envoy.filters.network.http_connection_manager" => HttpConnectionManager::type_url(),
        "envoy.filters.network.tcp_proxy" => TcpProxy::type_url(),
        "envoy.filters.listener.original_dst" => OriginalDst::type_url(),
        "envoy.filters.listener.tls_inspector" => TlsInspector::type_url(),
        "envoy.filters.listener.http_inspector" => HttpInspector::type_url(),
        _ => {
            notes.add(format!(
                "v2 config of filter {filter} dropped: its type is not known here"
            ));
            return Ok(None);
        }
    };
    notes.add(format!(
        "v2 config of filter {filter} converted to typed_config"
    ));
    let fields = node.object("Struct")?;
    payload(url, fields, notes).map(Some)
}

fn payload(url: String, mut fields: Fields<'_>, notes: &mut Notes) -> Result<Any, DumpError> {
    let name = url.rsplit('/').next().unwrap_or(&url).to_owned();
    fields.set_message(name.rsplit('.').next().unwrap_or(&name));
    let value = if name == DownstreamTlsContext::full_name() {
        tls::downstream_tls_context(fields, notes)?.encode_to_vec()
    } else if name == HttpConnectionManager::full_name() {
        http_connection_manager(fields, notes)?.encode_to_vec()
    } else if name == TcpProxy::full_name() {
        tcp_proxy(fields, notes)?.encode_to_vec()
    } else if [
        OriginalDst::full_name(),
        TlsInspector::full_name(),
        HttpInspector::full_name(),
    ]
    .contains(&name)
    {
        // Istio configures these with no settings; any settings a dump shows are left out.
        partial(&name, &fields, &[], notes);
        Vec::new()
    } else if name == "udpa.type.v1.TypedStruct" || name == "xds.type.v3.TypedStruct" {
        let inner = typed_struct_type(fields);
        notes.add(format!("{name} wrapping {inner} kept without its payload"));
        Vec::new()
    } else {
        notes.add(format!(
            "{name} kept without its payload (type not converted)"
        ));
        Vec::new()
    };
    Ok(Any {
        type_url: url,
        value,
    })
}

fn typed_struct_type(mut fields: Fields<'_>) -> String {
    match fields.get("type_url") {
        Ok(Some(node)) => node.str().unwrap_or("an unnamed type").to_owned(),
        _ => "an unnamed type".to_owned(),
    }
}

/// Notes the settings of a payload that the conversion leaves out.
fn partial(name: &str, fields: &Fields<'_>, converted: &[&str], notes: &mut Notes) {
    if fields.unread().is_empty() {
        return;
    }
    let kept = if converted.is_empty() {
        "nothing".to_owned()
    } else {
        converted.join(", ")
    };
    notes.add(format!(
        "{name}: only {kept} converted, its other settings left out"
    ));
}

fn http_connection_manager(
    mut fields: Fields<'_>,
    notes: &mut Notes,
) -> Result<HttpConnectionManager, DumpError> {
    let mut hcm = HttpConnectionManager::default();
    if let Some(node) = fields.get("stat_prefix")? {
        hcm.stat_prefix = node.string()?;
    }
    if let Some(node) = fields.get("codec_type")? {
        hcm.codec_type = node.enumeration("CodecType", CodecType::from_str_name)?;
    }
    // Whether HTTP/1.0 is served decides what a client gets on an added `http/1.0`.
    if let Some(node) = fields.get("http_protocol_options")? {
        let mut options = node.object("Http1ProtocolOptions")?;
        let mut http1 = Http1ProtocolOptions::default();
        if let Some(node) = options.get("accept_http_10")? {
            http1.accept_http_10 = node.bool()?;
        }
        options.finish(notes);
        hcm.http_protocol_options = Some(http1);
    }
    partial(
        &HttpConnectionManager::full_name(),
        &fields,
        &[
            "stat_prefix",
            "codec_type",
            "http_protocol_options.accept_http_10",
        ],
        notes,
    );
    Ok(hcm)
}

fn tcp_proxy(mut fields: Fields<'_>, notes: &mut Notes) -> Result<TcpProxy, DumpError> {
    let mut proxy = TcpProxy::default();
    if let Some(node) = fields.get("stat_prefix")? {
        proxy.stat_prefix = node.string()?;
    }
    if let Some(node) = fields.get("cluster")? {
        proxy.cluster_specifier = Some(ClusterSpecifier::Cluster(node.string()?));
    }
    partial(
        &TcpProxy::full_name(),
        &fields,
        &["stat_prefix", "cluster"],
        notes,
    );
    Ok(proxy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_filter_types_map_to_v3() {
        assert_eq!(
            v3_type_name(
                "envoy.config.filter.network.http_connection_manager.v2.HttpConnectionManager"
            )
            .as_deref(),
            Some(
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
            )
        );
        assert_eq!(
            v3_type_name("envoy.config.filter.listener.original_src.v2alpha1.OriginalSrc")
                .as_deref(),
            Some("envoy.extensions.filters.listener.original_src.v3.OriginalSrc")
        );
        assert_eq!(
            v3_type_name("envoy.api.v2.auth.DownstreamTlsContext").as_deref(),
            Some(DownstreamTlsContext::full_name().as_str())
        );
        assert_eq!(
            v3_type_name("istio.mixer.v1.config.client.HttpClientConfig"),
            None
        );
        assert_eq!(v3_type_name("envoy.config.filter.network.x.v3.Y"), None);
    }

    #[test]
    fn unknown_types_keep_their_url_and_are_noted() {
        let doc = serde_json::json!({"@type": "type.googleapis.com/stats.PluginConfig", "a": 1});
        let mut notes = Notes::default();
        let any = any(&Node::root(&doc), &mut notes).unwrap();
        assert_eq!(any.type_url, "type.googleapis.com/stats.PluginConfig");
        assert!(any.value.is_empty());
        assert!(
            notes
                .finish()
                .iter()
                .any(|n| n.contains("stats.PluginConfig"))
        );
    }

    #[test]
    fn a_typed_config_needs_a_type() {
        let doc = serde_json::json!({"stat_prefix": "x"});
        let err = any(&Node::root(&doc), &mut Notes::default()).unwrap_err();
        assert!(err.to_string().contains("without @type"), "{err}");
    }

    #[test]
    fn tcp_proxy_and_hcm_keep_what_classification_needs() {
        let doc = serde_json::json!({
            "@type": "type.googleapis.com/envoy.config.filter.network.tcp_proxy.v2.TcpProxy",
            "statPrefix": "inbound|9080||", "cluster": "inbound|9080||"
        });
        let any = any(&Node::root(&doc), &mut Notes::default()).unwrap();
        assert_eq!(any.type_url, TcpProxy::type_url());
        let proxy = TcpProxy::decode(any.value.as_slice()).unwrap();
        assert_eq!(proxy.stat_prefix, "inbound|9080||");
        assert_eq!(
            proxy.cluster_specifier,
            Some(ClusterSpecifier::Cluster("inbound|9080||".into()))
        );

        let doc = serde_json::json!({"codec_type": "HTTP2", "stat_prefix": "s", "route_config": {},
            "httpProtocolOptions": {"acceptHttp10": true, "defaultHostForHttp10": "h"}});
        let mut notes = Notes::default();
        let any = legacy_config(
            "envoy.filters.network.http_connection_manager",
            &Node::root(&doc),
            &mut notes,
        )
        .unwrap()
        .unwrap();
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        assert_eq!(hcm.codec_type, CodecType::Http2 as i32);
        assert_eq!(
            hcm.http_protocol_options.map(|o| o.accept_http_10),
            Some(true)
        );
        assert!(
            notes
                .finish()
                .iter()
                .any(|n| n.contains("other settings left out"))
        );
    }
}
