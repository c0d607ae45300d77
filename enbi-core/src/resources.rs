//! What a builder may use: the operator's default requests, limits and deadline, a NixBuild's
//! own (`spec.resources`) over them, and the policy's maximum for them.
//!
//! Quantities are compared as numbers (`500m` < `1`, `1Gi` > `1G`); the apiserver keeps them as
//! written, so the Job carries the text the user or the operator gave.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::{BuildResources, ResourceAmounts};

/// The resources a NixBuild may ask for, as the container's resource names.
pub const NAMES: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];
/// The name of the deadline in a maximum (`--max-build-resources deadline-seconds=...`).
pub const DEADLINE: &str = "deadline-seconds";

impl ResourceAmounts {
    /// The amounts given, by resource name.
    pub fn by_name(&self) -> BTreeMap<&'static str, &str> {
        let values = [&self.cpu, &self.memory, &self.ephemeral_storage];
        NAMES
            .into_iter()
            .zip(values)
            .filter_map(|(name, value)| Some((name, value.as_deref()?)))
            .collect()
    }
}

/// A quantity's value (`2`, `500m`, `4Gi`, `1.5G`, `1e3`), or `None` if it is none.
pub fn parse_quantity(text: &str) -> Option<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let binary = |power: i32| 1024f64.powi(power);
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        exponent => 10f64.powi(exponent.strip_prefix(['e', 'E'])?.parse().ok()?),
    };
    let value = number * factor;
    (value.is_finite() && value >= 0.0).then_some(value)
}

/// The build container's requirements: the operator's `defaults`, each amount `spec` gives in
/// place of the default's; a limit below its request is raised to it, so that a build asking
/// for more than the default limit gets it rather than an invalid Pod.
pub fn requirements(
    defaults: Option<&ResourceRequirements>,
    spec: Option<&BuildResources>,
) -> Option<ResourceRequirements> {
    let Some(spec) = spec else {
        return defaults.cloned();
    };
    let merge = |default: Option<&BTreeMap<String, Quantity>>, given: &ResourceAmounts| {
        let mut merged = default.cloned().unwrap_or_default();
        for (name, value) in given.by_name() {
            merged.insert(name.to_owned(), Quantity(value.to_owned()));
        }
        merged
    };
    let requests = merge(defaults.and_then(|d| d.requests.as_ref()), &spec.requests);
    let mut limits = merge(defaults.and_then(|d| d.limits.as_ref()), &spec.limits);
    for (name, request) in &requests {
        if let Some(limit) = limits.get_mut(name)
            && parse_quantity(&request.0) > parse_quantity(&limit.0)
        {
            *limit = request.clone();
        }
    }
    let nonempty = |m: BTreeMap<String, Quantity>| (!m.is_empty()).then_some(m);
    Some(ResourceRequirements {
        requests: nonempty(requests),
        limits: nonempty(limits),
        ..defaults.cloned().unwrap_or_default()
    })
}

/// The builder Job's deadline: the NixBuild's own, else the operator's.
pub fn deadline_seconds(default: i64, spec: Option<&BuildResources>) -> i64 {
    spec.and_then(|r| r.deadline_seconds).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amounts(cpu: Option<&str>, memory: Option<&str>) -> ResourceAmounts {
        ResourceAmounts {
            cpu: cpu.map(Into::into),
            memory: memory.map(Into::into),
            ephemeral_storage: None,
        }
    }

    #[test]
    fn quantities_compare_as_numbers() {
        for (text, value) in [
            ("2", 2.0),
            ("500m", 0.5),
            ("1Ki", 1024.0),
            ("4Gi", 4.0 * 1024f64.powi(3)),
            ("1.5G", 1.5e9),
            ("1e3", 1000.0),
        ] {
            assert_eq!(parse_quantity(text), Some(value), "{text}");
        }
        for bad in ["", "a", "1x", "-1", "1Gb", "Gi"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
        assert!(parse_quantity("1Gi") > parse_quantity("1G"));
    }

    #[test]
    fn a_builds_amounts_replace_the_defaults_and_raise_a_lower_limit() {
        let q = |s: &str| Quantity(s.into());
        let defaults = ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), q("250m")),
                ("memory".into(), q("512Mi")),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), q("8Gi"))])),
            ..Default::default()
        };
        assert_eq!(
            requirements(Some(&defaults), None),
            Some(defaults.clone()),
            "no spec.resources: the defaults"
        );
        let spec = BuildResources {
            requests: amounts(Some("2"), Some("16Gi")),
            limits: amounts(Some("4"), None),
            deadline_seconds: Some(600),
        };
        let merged = requirements(Some(&defaults), Some(&spec)).expect("requirements");
        assert_eq!(
            merged.requests,
            Some(BTreeMap::from([
                ("cpu".into(), q("2")),
                ("memory".into(), q("16Gi"))
            ]))
        );
        assert_eq!(
            merged.limits,
            Some(BTreeMap::from([
                ("cpu".into(), q("4")),
                ("memory".into(), q("16Gi"))
            ])),
            "the default memory limit is raised to the request"
        );
        assert_eq!(deadline_seconds(3600, Some(&spec)), 600);
        assert_eq!(deadline_seconds(3600, None), 3600);
    }
}
