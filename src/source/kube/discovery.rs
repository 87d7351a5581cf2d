//! Which version of PeerAuthentication the API server serves: `security.istio.io/v1` where it
//! does (Istio 1.22 and later), `v1beta1` otherwise (Istio 1.11 to 1.21). Both carry the same
//! spec, so the choice only decides which URL is watched.

use kube::Client;
use kube::core::ApiResource;
use tracing::debug;

use crate::source::SourceError;

/// The API group of Istio's security resources.
pub const GROUP: &str = "security.istio.io";

/// The versions tried, most preferred first.
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// The resource's kind and plural name.
const KIND: &str = "PeerAuthentication";
const PLURAL: &str = "peerauthentications";

/// Asks the API server (`/apis`, then `/apis/security.istio.io/<version>`) which version of
/// PeerAuthentication it serves and returns the first of [`VERSIONS`] that it does.
pub async fn peer_authentication(client: &Client) -> Result<ApiResource, SourceError> {
    let kube_error = |source| SourceError::KubeRequest {
        what: format!("discovery of {GROUP}"),
        source: Box::new(source),
    };
    let groups = client.list_api_groups().await.map_err(kube_error)?;
    let Some(group) = groups.groups.iter().find(|g| g.name == GROUP) else {
        return Err(SourceError::NotServed {
            resource: format!("{PLURAL}.{GROUP}"),
            reason: format!("the API server does not serve the group {GROUP}: is Istio installed?"),
        });
    };
    let served: Vec<&str> = group.versions.iter().map(|v| v.version.as_str()).collect();
    debug!(group = GROUP, versions = ?served, "API group found");

    for version in VERSIONS.iter().filter(|v| served.contains(v)) {
        let group_version = format!("{GROUP}/{version}");
        let resources = client
            .list_api_group_resources(&group_version)
            .await
            .map_err(kube_error)?;
        if resources.resources.iter().any(|r| r.name == PLURAL) {
            return Ok(ApiResource {
                group: GROUP.to_string(),
                version: (*version).to_string(),
                api_version: group_version,
                kind: KIND.to_string(),
                plural: PLURAL.to_string(),
            });
        }
    }
    Err(SourceError::NotServed {
        resource: format!("{PLURAL}.{GROUP}"),
        reason: format!(
            "none of the versions {} serves {PLURAL} (the group serves {})",
            VERSIONS.join(", "),
            served.join(", ")
        ),
    })
}
