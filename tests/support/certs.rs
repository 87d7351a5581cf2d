//! A test PKI standing in for the mesh CA: a root, a server certificate for the sidecar and a
//! client certificate carrying a SPIFFE URI SAN, as PEM strings and as rustls configurations.
//!
//! The configurations use rustls's crypto provider from its crate features (exactly one of
//! `ring` and `aws_lc_rs` must be on), so these tests follow whatever the manifest picks.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The trust domain of the test mesh.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The DNS name in the server certificate; clients verify the server against it.
pub const SERVER_NAME: &str = "web.shop.svc.cluster.local";

/// The SPIFFE identity of the server workload.
pub const SERVER_SPIFFE: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The SPIFFE identity of the test client.
pub const CLIENT_SPIFFE: &str = "spiffe://cluster.local/ns/client/sa/default";

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Identity {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// The test CA with the server and client identities it issued.
pub struct TestPki {
    /// The root certificate, PEM.
    pub ca_pem: String,
    /// The sidecar's serving identity: DNS [`SERVER_NAME`], URI [`SERVER_SPIFFE`].
    pub server: Identity,
    /// A client identity: URI [`CLIENT_SPIFFE`], no DNS name.
    pub client: Identity,
    ca_der: CertificateDer<'static>,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    /// A fresh CA with fresh server and client identities.
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "alpn-xds test root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        let ca_pem = issuer.pem();
        let ca_der = issuer.der().clone();

        let server = issue(&issuer, &[SERVER_NAME], SERVER_SPIFFE);
        let client = issue(&issuer, &[], CLIENT_SPIFFE);
        Self {
            ca_pem,
            server,
            client,
            ca_der,
            issuer,
        }
    }

    /// Another identity from this CA, with the given DNS names and SPIFFE URI.
    pub fn issue(&self, dns_names: &[&str], spiffe: &str) -> Identity {
        issue(&self.issuer, dns_names, spiffe)
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .expect("test CA is a valid root");
        roots
    }

    /// A TLS client trusting this CA, presenting `identity` when given, offering `alpn`.
    pub fn client_config(&self, identity: Option<&Identity>, alpn: &[&str]) -> ClientConfig {
        self.client_config_with_versions(identity, alpn, rustls::DEFAULT_VERSIONS)
    }

    /// [`Self::client_config`] limited to the TLS `versions` given.
    pub fn client_config_with_versions(
        &self,
        identity: Option<&Identity>,
        alpn: &[&str],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ClientConfig {
        let builder = ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(self.roots());
        let mut config = match identity {
            Some(identity) => builder
                .with_client_auth_cert(vec![identity.cert_der.clone()], identity.key())
                .expect("client certificate and key match"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config
    }

    /// A TLS server presenting `identity` and requiring client certificates from this CA.
    pub fn server_config(&self, identity: &Identity, alpn: &[&str]) -> ServerConfig {
        let verifier = WebPkiClientVerifier::builder(Arc::new(self.roots()))
            .build()
            .expect("client verifier");
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![identity.cert_der.clone()], identity.key())
            .expect("server certificate and key match");
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// The server name clients check the sidecar's certificate against.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("valid DNS name")
}

fn issue(issuer: &CertifiedIssuer<'static, KeyPair>, dns_names: &[&str], spiffe: &str) -> Identity {
    let names: Vec<String> = dns_names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf parameters");
    let uri = spiffe.to_owned().try_into().expect("SPIFFE URI is ASCII");
    params.subject_alt_names.push(SanType::URI(uri));
    params.distinguished_name.push(DnType::CommonName, spiffe);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;

    let key = KeyPair::generate().expect("leaf key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("leaf signed by the test CA");
    Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
    }
}
