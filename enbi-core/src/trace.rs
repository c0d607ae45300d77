//! One trace per build: its W3C trace context, stored on the NixBuild so every reconcile (by any
//! operator replica, before or after a restart) and the builder Job add spans to the same trace.
//!
//! The context names the build's root span: the operator emits that span, with exactly these
//! ids, when the build reaches `Succeeded` or `Failed`; every other span of the build is its
//! descendant. Ids are random and made at the edge; here they are only parsed and written.

use std::collections::HashMap;
use std::fmt;

use kube::ResourceExt;

use crate::crd::NixBuild;
use crate::keys;

/// The ids of a build's root span (W3C trace context, version 00, always sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

impl TraceContext {
    /// Parses a `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`); all-zero ids are invalid.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" || flags.len() != 2 {
            return None;
        }
        u8::from_str_radix(flags, 16).ok()?;
        let context = Self {
            trace_id: hex(trace)?,
            span_id: hex(span)?,
        };
        let valid = context.trace_id != [0; 16] && context.span_id != [0; 8];
        valid.then_some(context)
    }

    /// The build's context, if its annotation holds a valid one.
    pub fn of(build: &NixBuild) -> Option<Self> {
        build
            .annotations()
            .get(keys::TRACEPARENT)
            .and_then(|v| Self::parse(v))
    }

    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

/// `traceparent` form, sampled.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-01",
            to_hex(&self.trace_id),
            to_hex(&self.span_id)
        )
    }
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The OpenTelemetry settings a builder inherits from the operator: where and how to export.
/// `OTEL_SERVICE_NAME` is not passed (the builder names itself), nor are headers, which may hold
/// credentials and would be readable in the Job's spec.
pub fn builder_env(operator_env: &HashMap<String, String>) -> Vec<(String, String)> {
    const PASSED: &[&str] = &[
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_RESOURCE_ATTRIBUTES",
    ];
    PASSED
        .iter()
        .filter_map(|name| {
            operator_env
                .get(*name)
                .map(|value| ((*name).to_owned(), value.clone()))
        })
        .collect()
}

/// Whether these settings say to export spans: an endpoint is set and the SDK is not disabled.
pub fn export_enabled(env: &HashMap<String, String>) -> bool {
    let set = |name: &str| env.get(name).is_some_and(|v| !v.trim().is_empty());
    let disabled = env
        .get("OTEL_SDK_DISABLED")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || env
            .get("OTEL_TRACES_EXPORTER")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_w3c_example_and_writes_it_back() {
        let cx = TraceContext::parse(EXAMPLE).expect("valid");
        assert_eq!(cx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.to_string(), EXAMPLE);
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
            "00-4bf92f3577b34da6a3ce929d0e0e47é6-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn builder_inherits_only_export_settings() {
        let env: HashMap<String, String> = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=secret"),
            ("OTEL_SERVICE_NAME", "enbi-operator"),
            ("HOME", "/root"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let names: Vec<String> = builder_env(&env).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"]
        );
    }

    #[test]
    fn export_needs_an_endpoint_and_no_opt_out() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(!export_enabled(&env(&[])));
        assert!(!export_enabled(&env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            " "
        )])));
        assert!(export_enabled(&env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces"
        )])));
        assert!(!export_enabled(&env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "TRUE")
        ])));
        assert!(!export_enabled(&env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_TRACES_EXPORTER", "none")
        ])));
    }

    proptest! {
        #[test]
        fn any_valid_context_round_trips(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>()) {
            prop_assume!(trace != [0; 16] && span != [0; 8]);
            let cx = TraceContext { trace_id: trace, span_id: span };
            prop_assert_eq!(TraceContext::parse(&cx.to_string()), Some(cx));
        }

        #[test]
        fn arbitrary_annotations_never_panic(value in ".{0,80}") {
            let _ = TraceContext::parse(&value);
        }
    }
}
