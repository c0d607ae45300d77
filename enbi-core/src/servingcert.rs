//! When the admission webhook's serving certificate is made again.
//!
//! The operator keeps a self-signed CA and a serving certificate in a Secret (so that replicas
//! share them), with its expiry and host names as annotations: no certificate is parsed to
//! decide. Both are made together and live [`LIFETIME`]; they are renewed [`RENEW_BEFORE`] the
//! end, or at once when the host names change. The CA bundle keeps the previous CA too, so that
//! replicas still serving the old certificate stay trusted until they load the new one.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

/// How long a CA and serving certificate are valid.
pub const LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long before the end they are renewed.
pub const RENEW_BEFORE: Duration = Duration::from_secs(120 * 24 * 3600);

/// Why the certificate must be made (again) now, or `None` to keep it. `not_after` and `hosts`
/// are what the Secret records (`None`: no Secret, or a Secret enbi did not write).
pub fn renewal(
    now: Timestamp,
    not_after: Option<&str>,
    hosts: Option<&str>,
    wanted_hosts: &str,
) -> Option<&'static str> {
    let (Some(not_after), Some(hosts)) = (not_after, hosts) else {
        return Some("no certificate yet");
    };
    let Ok(not_after) = not_after.parse::<Timestamp>() else {
        return Some("unreadable expiry");
    };
    if hosts != wanted_hosts {
        return Some("the host names changed");
    }
    let renew_at = not_after
        .checked_sub(k8s_openapi::jiff::SignedDuration::try_from(RENEW_BEFORE).ok()?)
        .ok()?;
    (now >= renew_at).then_some("it expires soon")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_table() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let hosts = "enbi-webhook.enbi-system.svc";
        let cases = [
            (None, None, hosts, true),
            (Some("2026-12-31T00:00:00Z"), Some(hosts), hosts, false),
            (Some("2026-05-02T00:00:00Z"), Some(hosts), hosts, false),
            (Some("2026-04-30T00:00:00Z"), Some(hosts), hosts, true),
            (Some("2025-01-01T00:00:00Z"), Some(hosts), hosts, true),
            (Some("2026-12-31T00:00:00Z"), Some(hosts), "other.svc", true),
            (Some("yesterday"), Some(hosts), hosts, true),
            (Some("2026-12-31T00:00:00Z"), None, hosts, true),
        ];
        for (not_after, recorded, wanted, renew) in cases {
            assert_eq!(
                renewal(now, not_after, recorded, wanted).is_some(),
                renew,
                "{not_after:?} {recorded:?} {wanted}"
            );
        }
    }
}
