//! The filters of both flavours: listener filters with istiod's per-port predicates, network and
//! HTTP filters with the inline route, and the `DownstreamTlsContext` (SDS and Istio's filters in
//! the istio flavour, inline certificates and stock filters in the loadable one).

use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, ApiVersion, ConfigSource, DataSource, GrpcService, HeaderValue,
    HeaderValueOption, TransportSocket, api_config_source::ApiType,
    config_source::ConfigSourceSpecifier, data_source::Specifier, grpc_service, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, ListenerFilter, ListenerFilterChainMatchPredicate, filter, listener_filter,
    listener_filter_chain_match_predicate::{MatchSet, Rule},
};
use envoy_types::pb::envoy::config::route::v3::{
    Decorator, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route,
    route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::{
    cors::v3::Cors, fault::v3::HttpFault, grpc_stats::v3::FilterConfig as GrpcStats,
    router::v3::Router,
};
use envoy_types::pb::envoy::extensions::filters::listener::{
    http_inspector::v3::HttpInspector, original_dst::v3::OriginalDst,
    tls_inspector::v3::TlsInspector,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, RequestIdExtension,
    http_connection_manager::{
        CodecType, ForwardClientCertDetails, PathWithEscapedSlashesAction, RouteSpecifier,
        SetCurrentClientCertDetails, UpgradeConfig,
    },
    http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier,
};
use envoy_types::pb::envoy::extensions::request_id::uuid::v3::UuidRequestIdConfig;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, TlsCertificate, TlsParameters,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::envoy::r#type::v3::Int32Range;
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration};
use prost::{Message, Name};

use super::{
    CHAIN_HEADER, CIPHER_SUITES, Flavour, InboundPort, Layout, Mode, PortProtocol, SPIFFE_PREFIX,
    Transport, Upstream, chain_options,
};

pub(super) fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

pub(super) fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// Istio's `MetadataExchange` network filter config, which envoy-types does not carry.
#[derive(Clone, PartialEq, prost::Message)]
struct MetadataExchange {
    #[prost(string, tag = "1")]
    protocol: String,
}

pub(super) fn network_filter(name: &str, config: Any) -> Filter {
    Filter {
        name: name.to_owned(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

pub(super) fn metadata_exchange() -> Filter {
    let config = MetadataExchange {
        protocol: "istio-peer-exchange".to_owned(),
    };
    network_filter(
        "istio.metadata_exchange",
        Any {
            type_url: "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"
                .to_owned(),
            value: config.encode_to_vec(),
        },
    )
}

pub(super) fn istio_stats() -> Filter {
    let config = Any {
        type_url: "type.googleapis.com/stats.PluginConfig".to_owned(),
        value: vec![],
    };
    network_filter("istio.stats", config)
}

pub(super) fn tcp_proxy(cluster: &str) -> Filter {
    let proxy = TcpProxy {
        stat_prefix: cluster.to_owned(),
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_owned())),
        ..Default::default()
    };
    network_filter("envoy.filters.network.tcp_proxy", any(&proxy))
}

pub(super) fn http_filter(name: &str, config: Any) -> HttpFilter {
    HttpFilter {
        name: name.to_owned(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

pub(super) fn route_config(
    upstream: &Upstream,
    cluster: &str,
    tag: Option<&str>,
) -> RouteConfiguration {
    let zero = Duration::default();
    let route = Route {
        name: "default".to_owned(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_owned())),
            timeout: Some(zero),
            max_stream_duration: Some(route_action::MaxStreamDuration {
                max_stream_duration: Some(zero),
                grpc_timeout_header_max: Some(zero),
                ..Default::default()
            }),
            ..Default::default()
        })),
        decorator: Some(Decorator {
            operation: upstream.operation.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let response_headers_to_add = tag
        .map(|tag| HeaderValueOption {
            header: Some(HeaderValue {
                key: CHAIN_HEADER.to_owned(),
                value: tag.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .into_iter()
        .collect();
    RouteConfiguration {
        name: upstream.route_name.clone(),
        virtual_hosts: vec![VirtualHost {
            name: upstream.virtual_host.clone(),
            domains: vec!["*".to_owned()],
            routes: vec![route],
            response_headers_to_add,
            ..Default::default()
        }],
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

pub(super) fn istio_hcm(layout: Layout, upstream: &Upstream) -> Filter {
    let peer_metadata = match layout {
        Layout::Istio111 => "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        Layout::Current => "type.googleapis.com/io.istio.http.peer_metadata.Config",
    };
    let opaque = |url: &str| Any {
        type_url: url.to_owned(),
        value: vec![],
    };
    let hcm = HttpConnectionManager {
        stat_prefix: upstream.http_stat_prefix.clone(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::RouteConfig(route_config(
            upstream,
            &upstream.cluster,
            None,
        ))),
        http_filters: vec![
            http_filter("istio.metadata_exchange", opaque(peer_metadata)),
            http_filter("envoy.filters.http.grpc_stats", any(&GrpcStats::default())),
            http_filter("envoy.filters.http.fault", any(&HttpFault::default())),
            http_filter("envoy.filters.http.cors", any(&Cors::default())),
            http_filter(
                "istio.stats",
                opaque("type.googleapis.com/stats.PluginConfig"),
            ),
            http_filter("envoy.filters.http.router", any(&Router::default())),
        ],
        server_name: "istio-envoy".to_owned(),
        use_remote_address: Some(BoolValue { value: false }),
        forward_client_cert_details: ForwardClientCertDetails::AppendForward as i32,
        set_current_client_cert_details: Some(SetCurrentClientCertDetails {
            subject: Some(BoolValue { value: true }),
            dns: true,
            uri: true,
            ..Default::default()
        }),
        upgrade_configs: vec![UpgradeConfig {
            upgrade_type: "websocket".to_owned(),
            ..Default::default()
        }],
        stream_idle_timeout: Some(Duration::default()),
        normalize_path: Some(BoolValue { value: true }),
        request_id_extension: Some(RequestIdExtension {
            typed_config: Some(any(&UuidRequestIdConfig {
                use_request_id_for_trace_sampling: Some(BoolValue { value: true }),
                ..Default::default()
            })),
        }),
        path_with_escaped_slashes_action: PathWithEscapedSlashesAction::KeepUnchanged as i32,
        ..Default::default()
    };
    network_filter("envoy.filters.network.http_connection_manager", any(&hcm))
}

pub(super) fn loadable_hcm(upstream: &Upstream, cluster: &str, tag: &str) -> Filter {
    let hcm = HttpConnectionManager {
        stat_prefix: upstream.http_stat_prefix.clone(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::RouteConfig(route_config(
            upstream,
            cluster,
            Some(tag),
        ))),
        http_filters: vec![http_filter(
            "envoy.filters.http.router",
            any(&Router::default()),
        )],
        ..Default::default()
    };
    network_filter("envoy.filters.network.http_connection_manager", any(&hcm))
}

pub(super) fn tls_params(layout: Layout) -> TlsParameters {
    TlsParameters {
        tls_minimum_protocol_version: TlsProtocol::TlSv12 as i32,
        tls_maximum_protocol_version: match layout {
            Layout::Istio111 => TlsProtocol::TlsAuto as i32,
            Layout::Current => TlsProtocol::TlSv13 as i32,
        },
        cipher_suites: strings(CIPHER_SUITES),
        ..Default::default()
    }
}

/// Istio's SDS source: pilot-agent's local SDS server behind cluster `sds-grpc`.
pub(super) fn sds_secret(name: &str) -> SdsSecretConfig {
    let api = ApiConfigSource {
        api_type: ApiType::Grpc as i32,
        transport_api_version: ApiVersion::V3 as i32,
        set_node_on_first_message_only: true,
        grpc_services: vec![GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                grpc_service::EnvoyGrpc {
                    cluster_name: "sds-grpc".to_owned(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }],
        ..Default::default()
    };
    SdsSecretConfig {
        name: name.to_owned(),
        sds_config: Some(ConfigSource {
            config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(api)),
            initial_fetch_timeout: Some(Duration::default()),
            resource_api_version: ApiVersion::V3 as i32,
            ..Default::default()
        }),
    }
}

pub(super) fn inline(pem: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineString(pem.to_owned())),
        ..Default::default()
    })
}

pub(super) fn spiffe_prefix() -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Prefix(SPIFFE_PREFIX.to_owned())),
        ..Default::default()
    }
}

// istiod still writes the deprecated `match_subject_alt_names`; the istio flavour copies it.
#[allow(deprecated)]
pub(super) fn tls_socket(flavour: &Flavour<'_>, layout: Layout, alpns: &[&str]) -> TransportSocket {
    let mut common = CommonTlsContext {
        tls_params: Some(tls_params(layout)),
        alpn_protocols: strings(alpns),
        ..Default::default()
    };
    match flavour {
        Flavour::Istio => {
            common.tls_certificate_sds_secret_configs = vec![sds_secret("default")];
            common.validation_context_type =
                Some(ValidationContextType::CombinedValidationContext(
                    CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_subject_alt_names: vec![spiffe_prefix()],
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds_secret("ROOTCA")),
                        ..Default::default()
                    },
                ));
        }
        Flavour::Loadable(spec) => {
            common.tls_certificates = vec![TlsCertificate {
                certificate_chain: inline(spec.cert_pem),
                private_key: inline(spec.key_pem),
                ..Default::default()
            }];
            common.validation_context_type = Some(ValidationContextType::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(spec.ca_pem),
                    match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                        san_type: SanType::Uri as i32,
                        matcher: Some(spiffe_prefix()),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ));
        }
    }
    let context = DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_owned(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&context))),
    }
}

/// `original_dst` (istio flavour only), then the TLS and HTTP inspectors, each disabled on the
/// ports that do not need it the way istiod writes it: by excluding those ports when the
/// passthrough needs the inspector, else by including only the ports that do.
pub(super) fn listener_filters(
    flavour: &Flavour<'_>,
    layout: Layout,
    workload_mode: Mode,
    ports: &[InboundPort],
    blackhole_port: u32,
) -> Vec<ListenerFilter> {
    let mut filters = Vec::new();
    if matches!(flavour, Flavour::Istio) {
        filters.push(listener_filter(
            "envoy.filters.listener.original_dst",
            any(&OriginalDst::default()),
            None,
        ));
    }
    for inspector in [Inspector::Tls, Inspector::Http] {
        let needs = |mode, protocol| inspector.needed(layout, mode, protocol);
        let passthrough = needs(workload_mode, PortProtocol::Auto);
        // The blackhole port never needs an inspector.
        let mut differing: Vec<u32> = ports
            .iter()
            .filter(|p| needs(p.mode, p.protocol) != passthrough)
            .map(|p| p.port)
            .chain(passthrough.then_some(blackhole_port))
            .collect();
        differing.sort_unstable();
        differing.dedup();
        let disabled = match (passthrough, differing.is_empty()) {
            (true, true) => None,
            (true, false) => Some(port_predicate(&differing)),
            (false, true) => continue,
            (false, false) => Some(ListenerFilterChainMatchPredicate {
                rule: Some(Rule::NotMatch(Box::new(port_predicate(&differing)))),
            }),
        };
        filters.push(listener_filter(
            inspector.name(),
            inspector.config(),
            disabled,
        ));
    }
    filters
}

#[derive(Clone, Copy)]
enum Inspector {
    Tls,
    Http,
}

impl Inspector {
    fn name(self) -> &'static str {
        match self {
            Inspector::Tls => "envoy.filters.listener.tls_inspector",
            Inspector::Http => "envoy.filters.listener.http_inspector",
        }
    }

    fn config(self) -> Any {
        match self {
            Inspector::Tls => any(&TlsInspector::default()),
            Inspector::Http => any(&HttpInspector::default()),
        }
    }

    /// Whether a port's chains need this inspector: TLS when a chain matches `tls`; HTTP
    /// sniffing for undeclared ports in 1.11, for ports whose chains match plaintext HTTP ALPNs
    /// in current istiod.
    fn needed(self, layout: Layout, mode: Mode, protocol: PortProtocol) -> bool {
        let options = chain_options(layout, mode, protocol);
        match (self, layout) {
            (Inspector::Tls, _) => options.iter().any(|o| o.transport == Transport::Tls),
            (Inspector::Http, Layout::Istio111) => protocol == PortProtocol::Auto,
            (Inspector::Http, Layout::Current) => options.iter().any(|o| {
                o.application_protocols
                    .iter()
                    .any(|a| *a == "http/1.1" || *a == "h2c")
            }),
        }
    }
}

fn port_predicate(ports: &[u32]) -> ListenerFilterChainMatchPredicate {
    let range = |port: u32| {
        let start = i32::try_from(port).unwrap_or(i32::MAX - 1);
        ListenerFilterChainMatchPredicate {
            rule: Some(Rule::DestinationPortRange(Int32Range {
                start,
                end: start + 1,
            })),
        }
    };
    match ports {
        [port] => range(*port),
        _ => ListenerFilterChainMatchPredicate {
            rule: Some(Rule::OrMatch(MatchSet {
                rules: ports.iter().map(|p| range(*p)).collect(),
            })),
        },
    }
}

fn listener_filter(
    name: &str,
    config: Any,
    filter_disabled: Option<ListenerFilterChainMatchPredicate>,
) -> ListenerFilter {
    ListenerFilter {
        name: name.to_owned(),
        filter_disabled,
        config_type: Some(listener_filter::ConfigType::TypedConfig(config)),
    }
}
