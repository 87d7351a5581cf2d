//! `DownstreamTlsContext` from JSON, v2 (`envoy.api.v2.auth`, or a chain's `tls_context`) or v3:
//! ALPN, client-certificate requirement, TLS parameters, certificates and SDS secret names, and
//! the validation context with its SAN matchers. Session tickets, OCSP and other server-side
//! tuning are left out and noted.

use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiConfigSource, ApiVersion, ConfigSource, DataSource, GrpcService,
    api_config_source::ApiType,
    config_source::ConfigSourceSpecifier,
    data_source::Specifier,
    grpc_service::{EnvoyGrpc, TargetSpecifier},
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, TlsCertificate, TlsParameters,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    downstream_tls_context::OcspStaplePolicy,
    subject_alt_name_matcher::SanType,
    tls_parameters::TlsProtocol,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};

use super::DumpError;
use super::json::{Fields, Node, Notes};

/// Reads a `DownstreamTlsContext` object (its `@type`, if any, already consumed).
pub(super) fn downstream_tls_context(
    mut fields: Fields<'_>,
    notes: &mut Notes,
) -> Result<DownstreamTlsContext, DumpError> {
    let mut context = DownstreamTlsContext::default();
    if let Some(node) = fields.get("common_tls_context")? {
        context.common_tls_context = Some(common_tls_context(&node, notes)?);
    }
    if let Some(node) = fields.get("require_client_certificate")? {
        context.require_client_certificate = Some(node.bool_value()?);
    }
    if let Some(node) = fields.get("require_sni")? {
        context.require_sni = Some(node.bool_value()?);
    }
    if let Some(node) = fields.get("session_timeout")? {
        context.session_timeout = Some(node.duration()?);
    }
    if let Some(node) = fields.get("disable_stateful_session_resumption")? {
        context.disable_stateful_session_resumption = node.bool()?;
    }
    if let Some(node) = fields.get("prefer_client_ciphers")? {
        context.prefer_client_ciphers = node.bool()?;
    }
    if let Some(node) = fields.get("ocsp_staple_policy")? {
        context.ocsp_staple_policy =
            node.enumeration("OcspStaplePolicy", OcspStaplePolicy::from_str_name)?;
    }
    fields.finish(notes);
    Ok(context)
}

fn common_tls_context(node: &Node<'_>, notes: &mut Notes) -> Result<CommonTlsContext, DumpError> {
    let mut fields = node.object("CommonTlsContext")?;
    let mut context = CommonTlsContext::default();
    if let Some(node) = fields.get("tls_params")? {
        context.tls_params = Some(tls_params(&node, notes)?);
    }
    if let Some(node) = fields.get("alpn_protocols")? {
        context.alpn_protocols = node.strings()?;
    }
    if let Some(node) = fields.get("tls_certificates")? {
        context.tls_certificates = node
            .array()?
            .iter()
            .map(|n| tls_certificate(n, notes))
            .collect::<Result<_, _>>()?;
    }
    if let Some(node) = fields.get("tls_certificate_sds_secret_configs")? {
        context.tls_certificate_sds_secret_configs = node
            .array()?
            .iter()
            .map(|n| sds_secret(n, notes))
            .collect::<Result<_, _>>()?;
    }

    // A oneof: at most one of the three forms may be given.
    let mut validation = Vec::new();
    if let Some(node) = fields.get("validation_context")? {
        let context = validation_context(&node, notes)?;
        validation.push((node, ValidationContextType::ValidationContext(context)));
    }
    if let Some(node) = fields.get("validation_context_sds_secret_config")? {
        let secret = sds_secret(&node, notes)?;
        validation.push((
            node,
            ValidationContextType::ValidationContextSdsSecretConfig(secret),
        ));
    }
    if let Some(node) = fields.get("combined_validation_context")? {
        let combined = combined_validation_context(&node, notes)?;
        validation.push((
            node,
            ValidationContextType::CombinedValidationContext(combined),
        ));
    }
    if validation.len() > 1 {
        return Err(validation[1]
            .0
            .error("only one validation context form may be given"));
    }
    context.validation_context_type = validation.pop().map(|(_, v)| v);

    fields.finish(notes);
    Ok(context)
}

fn tls_params(node: &Node<'_>, notes: &mut Notes) -> Result<TlsParameters, DumpError> {
    let mut fields = node.object("TlsParameters")?;
    let mut params = TlsParameters::default();
    if let Some(node) = fields.get("tls_minimum_protocol_version")? {
        params.tls_minimum_protocol_version =
            node.enumeration("TlsProtocol", TlsProtocol::from_str_name)?;
    }
    if let Some(node) = fields.get("tls_maximum_protocol_version")? {
        params.tls_maximum_protocol_version =
            node.enumeration("TlsProtocol", TlsProtocol::from_str_name)?;
    }
    if let Some(node) = fields.get("cipher_suites")? {
        params.cipher_suites = node.strings()?;
    }
    if let Some(node) = fields.get("ecdh_curves")? {
        params.ecdh_curves = node.strings()?;
    }
    if let Some(node) = fields.get("signature_algorithms")? {
        params.signature_algorithms = node.strings()?;
    }
    fields.finish(notes);
    Ok(params)
}

fn tls_certificate(node: &Node<'_>, notes: &mut Notes) -> Result<TlsCertificate, DumpError> {
    let mut fields = node.object("TlsCertificate")?;
    let mut certificate = TlsCertificate::default();
    if let Some(node) = fields.get("certificate_chain")? {
        certificate.certificate_chain = data_source(&node, notes)?;
    }
    if let Some(node) = fields.get("private_key")? {
        certificate.private_key = data_source(&node, notes)?;
    }
    fields.finish(notes);
    Ok(certificate)
}

/// A file name, an inline string or an environment variable. Inline bytes (base64 in JSON)
/// are left out: a dump's secrets are of no use to the rewrite, and Envoy redacts them anyway.
fn data_source(node: &Node<'_>, notes: &mut Notes) -> Result<Option<DataSource>, DumpError> {
    let mut fields = node.object("DataSource")?;
    let mut specifier = None;
    if let Some(node) = fields.get("filename")? {
        specifier = Some(Specifier::Filename(node.string()?));
    }
    if let Some(node) = fields.get("inline_string")? {
        specifier = Some(Specifier::InlineString(node.string()?));
    }
    if let Some(node) = fields.get("environment_variable")? {
        specifier = Some(Specifier::EnvironmentVariable(node.string()?));
    }
    fields.finish(notes);
    Ok(specifier.map(|specifier| DataSource {
        specifier: Some(specifier),
        ..Default::default()
    }))
}

fn sds_secret(node: &Node<'_>, notes: &mut Notes) -> Result<SdsSecretConfig, DumpError> {
    let mut fields = node.object("SdsSecretConfig")?;
    let mut secret = SdsSecretConfig::default();
    if let Some(node) = fields.get("name")? {
        secret.name = node.string()?;
    }
    if let Some(node) = fields.get("sds_config")? {
        secret.sds_config = Some(config_source(&node, notes)?);
    }
    fields.finish(notes);
    Ok(secret)
}

fn config_source(node: &Node<'_>, notes: &mut Notes) -> Result<ConfigSource, DumpError> {
    let mut fields = node.object("ConfigSource")?;
    let mut source = ConfigSource::default();
    if let Some(node) = fields.get("api_config_source")? {
        source.config_source_specifier = Some(ConfigSourceSpecifier::ApiConfigSource(
            api_config_source(&node, notes)?,
        ));
    }
    if fields.get("ads")?.is_some() {
        source.config_source_specifier =
            Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {}));
    }
    if let Some(node) = fields.get("initial_fetch_timeout")? {
        source.initial_fetch_timeout = Some(node.duration()?);
    }
    if let Some(node) = fields.get("resource_api_version")? {
        source.resource_api_version = node.enumeration("ApiVersion", ApiVersion::from_str_name)?;
    }
    fields.finish(notes);
    Ok(source)
}

fn api_config_source(node: &Node<'_>, notes: &mut Notes) -> Result<ApiConfigSource, DumpError> {
    let mut fields = node.object("ApiConfigSource")?;
    let mut source = ApiConfigSource::default();
    if let Some(node) = fields.get("api_type")? {
        source.api_type = node.enumeration("ApiType", ApiType::from_str_name)?;
    }
    if let Some(node) = fields.get("transport_api_version")? {
        source.transport_api_version = node.enumeration("ApiVersion", ApiVersion::from_str_name)?;
    }
    if let Some(node) = fields.get("cluster_names")? {
        source.cluster_names = node.strings()?;
    }
    if let Some(node) = fields.get("grpc_services")? {
        source.grpc_services = node
            .array()?
            .iter()
            .map(|n| grpc_service(n, notes))
            .collect::<Result<_, _>>()?;
    }
    if let Some(node) = fields.get("set_node_on_first_message_only")? {
        source.set_node_on_first_message_only = node.bool()?;
    }
    if let Some(node) = fields.get("refresh_delay")? {
        source.refresh_delay = Some(node.duration()?);
    }
    if let Some(node) = fields.get("request_timeout")? {
        source.request_timeout = Some(node.duration()?);
    }
    fields.finish(notes);
    Ok(source)
}

fn grpc_service(node: &Node<'_>, notes: &mut Notes) -> Result<GrpcService, DumpError> {
    let mut fields = node.object("GrpcService")?;
    let mut service = GrpcService::default();
    if let Some(node) = fields.get("envoy_grpc")? {
        let mut envoy = node.object("GrpcService.EnvoyGrpc")?;
        let mut target = EnvoyGrpc::default();
        if let Some(node) = envoy.get("cluster_name")? {
            target.cluster_name = node.string()?;
        }
        if let Some(node) = envoy.get("authority")? {
            target.authority = node.string()?;
        }
        envoy.finish(notes);
        service.target_specifier = Some(TargetSpecifier::EnvoyGrpc(target));
    }
    if let Some(node) = fields.get("timeout")? {
        service.timeout = Some(node.duration()?);
    }
    fields.finish(notes);
    Ok(service)
}

fn combined_validation_context(
    node: &Node<'_>,
    notes: &mut Notes,
) -> Result<CombinedCertificateValidationContext, DumpError> {
    let mut fields = node.object("CombinedCertificateValidationContext")?;
    let mut combined = CombinedCertificateValidationContext::default();
    if let Some(node) = fields.get("default_validation_context")? {
        combined.default_validation_context = Some(validation_context(&node, notes)?);
    }
    if let Some(node) = fields.get("validation_context_sds_secret_config")? {
        combined.validation_context_sds_secret_config = Some(sds_secret(&node, notes)?);
    }
    fields.finish(notes);
    Ok(combined)
}

// Istio still sends `match_subject_alt_names`, deprecated in favour of the typed matchers; a
// faithful copy has to write it.
#[allow(deprecated)]
fn validation_context(
    node: &Node<'_>,
    notes: &mut Notes,
) -> Result<CertificateValidationContext, DumpError> {
    let mut fields = node.object("CertificateValidationContext")?;
    let mut context = CertificateValidationContext::default();
    if let Some(node) = fields.get("trusted_ca")? {
        context.trusted_ca = data_source(&node, notes)?;
    }
    if let Some(node) = fields.get("match_subject_alt_names")? {
        context.match_subject_alt_names = node
            .array()?
            .iter()
            .map(|n| string_matcher(n, notes))
            .collect::<Result<_, _>>()?;
    }
    // v2 listed plain names, matched exactly; v3 spells that as exact matchers.
    if let Some(node) = fields.get("verify_subject_alt_name")? {
        for name in node.strings()? {
            context.match_subject_alt_names.push(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(name)),
                ..Default::default()
            });
        }
        notes.add("v2 verify_subject_alt_name converted to exact match_subject_alt_names");
    }
    if let Some(node) = fields.get("match_typed_subject_alt_names")? {
        context.match_typed_subject_alt_names = node
            .array()?
            .iter()
            .map(|n| san_matcher(n, notes))
            .collect::<Result<_, _>>()?;
    }
    if let Some(node) = fields.get("verify_certificate_spki")? {
        context.verify_certificate_spki = node.strings()?;
    }
    if let Some(node) = fields.get("verify_certificate_hash")? {
        context.verify_certificate_hash = node.strings()?;
    }
    if let Some(node) = fields.get("allow_expired_certificate")? {
        context.allow_expired_certificate = node.bool()?;
    }
    fields.finish(notes);
    Ok(context)
}

fn san_matcher(node: &Node<'_>, notes: &mut Notes) -> Result<SubjectAltNameMatcher, DumpError> {
    let mut fields = node.object("SubjectAltNameMatcher")?;
    let mut matcher = SubjectAltNameMatcher::default();
    if let Some(node) = fields.get("san_type")? {
        matcher.san_type = node.enumeration("SanType", SanType::from_str_name)?;
    }
    if let Some(node) = fields.get("matcher")? {
        matcher.matcher = Some(string_matcher(&node, notes)?);
    }
    if let Some(node) = fields.get("oid")? {
        matcher.oid = node.string()?;
    }
    fields.finish(notes);
    Ok(matcher)
}

fn string_matcher(node: &Node<'_>, notes: &mut Notes) -> Result<StringMatcher, DumpError> {
    let mut fields = node.object("StringMatcher")?;
    let mut matcher = StringMatcher::default();
    let mut patterns = Vec::new();
    for name in ["exact", "prefix", "suffix", "contains"] {
        if let Some(node) = fields.get(name)? {
            let text = node.string()?;
            let pattern = match name {
                "exact" => MatchPattern::Exact(text),
                "prefix" => MatchPattern::Prefix(text),
                "suffix" => MatchPattern::Suffix(text),
                _ => MatchPattern::Contains(text),
            };
            patterns.push((node, pattern));
        }
    }
    if let Some(node) = fields.get("safe_regex")? {
        let mut regex_fields = node.object("RegexMatcher")?;
        let regex = regex_fields.require("regex")?.string()?;
        // The engine (google_re2) has no settings that matter here.
        regex_fields.get("google_re2")?;
        regex_fields.finish(notes);
        let pattern = MatchPattern::SafeRegex(RegexMatcher {
            regex,
            ..Default::default()
        });
        patterns.push((node, pattern));
    }
    if patterns.len() > 1 {
        return Err(patterns[1]
            .0
            .error("a StringMatcher takes only one pattern"));
    }
    matcher.match_pattern = patterns.pop().map(|(_, p)| p);
    if let Some(node) = fields.get("ignore_case")? {
        matcher.ignore_case = node.bool()?;
    }
    fields.finish(notes);
    Ok(matcher)
}
