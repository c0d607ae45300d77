//! What a valid NixBuild spec field is, stated once.
//!
//! Each rule is a regular expression written in the common subset of RE2 (the apiserver's CEL
//! `matches`) and Rust's `regex`, plus a message naming the field. The CRD embeds the rules as CEL
//! (`x-kubernetes-validations`), and the same rules back the `garde` validators used for values
//! that never pass admission (Pod annotations, CLI flags). `tests/validation_table.rs` checks one
//! table of good and bad examples against both.

use std::sync::LazyLock;

use kube::core::Rule;
use regex::Regex;

use crate::system::SYSTEMS;

/// One spec field's admission rule.
#[derive(Debug)]
pub struct FieldRule {
    regex: LazyLock<Regex>,
    /// The field's name in the API (`spec.<name>`).
    pub field: &'static str,
    /// Anchored pattern the whole value must match.
    pub pattern: &'static str,
    /// Longest accepted value (`maxLength`, which also bounds the CEL cost estimate).
    pub max_len: usize,
    /// What a valid value looks like, for the error message.
    pub expected: &'static str,
}

/// `spec.flakeUrl`: a flake reference with an explicit type. No `#`: enbi appends the fragment.
pub static FLAKE_URL: FieldRule = FieldRule {
    regex: LazyLock::new(|| compile(&FLAKE_URL)),
    field: "flakeUrl",
    pattern: r"^(?:(?:(?:git|hg)\+(?:https|http|ssh|file)|(?:tarball|file)\+(?:https|http|file)|https|http|file)://[^\s#]+|(?:github|gitlab|sourcehut):[A-Za-z0-9_.~-]+/[A-Za-z0-9_.-]+(?:/[^\s#?]+)?(?:\?[^\s#]*)?|path:/[^\s#]*|flake:[A-Za-z][A-Za-z0-9_-]*(?:/[^\s#?]+)?(?:\?[^\s#]*)?)$",
    max_len: 2048,
    expected: "a flake reference with a type and no fragment, such as github:owner/repo, \
               git+https://host/repo?rev=<commit>, https://host/flake.tar.gz or path:/abs/dir",
};

/// `spec.packageName`: a Nix attribute path below `packages.<system>`, dots allowed.
pub static PACKAGE_NAME: FieldRule = FieldRule {
    regex: LazyLock::new(|| compile(&PACKAGE_NAME)),
    field: "packageName",
    pattern: r"^[A-Za-z_][A-Za-z0-9_'-]*(?:\.[A-Za-z_][A-Za-z0-9_'-]*)*$",
    max_len: 256,
    expected: "a Nix attribute path such as hello or chog-docker.stream-layered",
};

/// `spec.imageTag`: an image reference (distribution's grammar) with a tag, a digest or both.
pub static IMAGE_TAG: FieldRule = FieldRule {
    regex: LazyLock::new(|| compile(&IMAGE_TAG)),
    field: "imageTag",
    pattern: r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(?:@sha256:[a-f0-9]{64})?|@sha256:[a-f0-9]{64})$",
    max_len: 512,
    expected: "an image reference with a tag or digest, such as registry.example/app:v1 or app@sha256:<64 hex>",
};

impl FieldRule {
    /// The admission message when a value breaks this rule.
    pub fn message(&self) -> String {
        format!("spec.{} must be {}", self.field, self.expected)
    }

    /// The rule as a CEL validation for the CRD schema.
    pub fn cel(&self) -> Rule {
        Rule::new(format!("self.matches(r\"{}\")", self.pattern))
            .message(kube::core::Message::Message(self.message()))
    }

    /// Checks a value outside admission (annotations, flags); the error says what was expected
    /// and the caller names the field as its user knows it.
    pub fn check(&self, value: &str) -> Result<(), String> {
        if value.len() <= self.max_len && self.regex.is_match(value) {
            Ok(())
        } else {
            Err(format!("must be {}", self.expected))
        }
    }
}

/// The patterns are constants covered by tests: one that does not compile is a programming error.
#[allow(clippy::expect_used)]
fn compile(rule: &FieldRule) -> Regex {
    Regex::new(rule.pattern).expect("field patterns are valid regular expressions")
}

/// What a valid system is.
fn system_expected() -> String {
    let known: Vec<&str> = SYSTEMS.iter().map(|s| s.nix).collect();
    format!("must be one of {}", known.join(", "))
}

/// `spec.system` as a CEL validation: one of the systems enbi can place.
pub fn system_cel() -> Rule {
    let known: Vec<String> = SYSTEMS.iter().map(|s| format!("'{}'", s.nix)).collect();
    Rule::new(format!("self in [{}]", known.join(", "))).message(kube::core::Message::Message(
        format!("spec.system {}", system_expected()),
    ))
}

/// Checks a system outside admission.
pub fn check_system(value: &str) -> Result<(), String> {
    crate::system::from_nix(value)
        .map(|_| ())
        .ok_or_else(system_expected)
}

/// `garde` adapters, so `NixBuildSpec::validate()` applies exactly these rules.
pub(crate) mod garde_rules {
    use super::*;

    fn to_garde(r: Result<(), String>) -> garde::Result {
        r.map_err(garde::Error::new)
    }

    pub fn flake_url(value: &str, _: &()) -> garde::Result {
        to_garde(FLAKE_URL.check(value))
    }
    pub fn package_name(value: &str, _: &()) -> garde::Result {
        to_garde(PACKAGE_NAME.check(value))
    }
    pub fn image_tag(value: &str, _: &()) -> garde::Result {
        to_garde(IMAGE_TAG.check(value))
    }
    pub fn system(value: &str, _: &()) -> garde::Result {
        to_garde(check_system(value))
    }
}
