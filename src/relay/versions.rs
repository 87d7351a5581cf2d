//! Nonces and versions of the relay's own making, and how they are told from istiod's.
//!
//! The relay's nonces start with [`NONCE_PREFIX`], which istiod's (a push version and a UUID)
//! never do. Its versions are istiod's version with [`VERSION_MARK`] and a tag appended, so that
//! istiod's version is recovered from them by cutting at the mark, on any replica and after any
//! reconnect.

/// Every nonce the relay makes starts with this.
pub const NONCE_PREFIX: &str = "alpn-xds-";

/// What separates istiod's version from the relay's tag in a version the relay made.
pub const VERSION_MARK: &str = "+alpn-xds.";

/// The nonce of the relay's `seq`-th own response on stream `stream_id`.
pub fn relay_nonce(stream_id: u64, seq: u64) -> String {
    format!("{NONCE_PREFIX}{stream_id}-{seq}")
}

/// Whether `nonce` is one of the relay's own.
pub fn is_relay_nonce(nonce: &str) -> bool {
    nonce.starts_with(NONCE_PREFIX)
}

/// A version of the relay's making, derived from istiod's `upstream` version.
pub fn relay_version(upstream: &str, tag: &str) -> String {
    format!("{upstream}{VERSION_MARK}{tag}")
}

/// istiod's version inside `version`: `version` itself when the relay did not make it.
pub fn upstream_version(version: &str) -> &str {
    version
        .split_once(VERSION_MARK)
        .map_or(version, |(upstream, _)| upstream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip() {
        let upstream = "2026-12-03T16:00:00Z/42";
        let made = relay_version(upstream, "g7");
        assert_ne!(made, upstream);
        assert_eq!(upstream_version(&made), upstream);
        assert_eq!(upstream_version(upstream), upstream);
        assert_eq!(upstream_version(&relay_version(&made, "g8")), upstream);
    }

    #[test]
    fn nonces_are_told_apart() {
        assert!(is_relay_nonce(&relay_nonce(3, 9)));
        assert!(!is_relay_nonce("2026-12-03T16:00:00Z/42a1b2c3d4-uuid"));
        assert!(!is_relay_nonce(""));
    }
}
