//! What a valid NixBuild spec field is, stated once.
//!
//! Each rule is a regular expression written in the common subset of RE2 (the apiserver's CEL
//! `matches`) and Rust's `regex`, plus a message naming the field; where one pattern cannot say it
//! all (RE2 has no lookahead, so no length bound on one part of a value), a few more patterns the
//! value must or must not match, all in the same one CEL rule. The CRD embeds the rules as CEL
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
    /// The pattern and the limits' patterns, compiled.
    regexes: LazyLock<(Regex, Vec<Regex>)>,
    /// The field's name in the API (`spec.<name>`).
    pub field: &'static str,
    /// Anchored pattern the whole value must match.
    pub pattern: &'static str,
    /// What the pattern alone cannot say (RE2 has no lookahead, so no length bound on one part of
    /// a value): further patterns the value must, or must not, match.
    pub limits: &'static [Limit],
    /// Longest accepted value (`maxLength`, which also bounds the CEL cost estimate).
    pub max_len: usize,
    /// What a valid value looks like, for the error message.
    pub expected: &'static str,
}

/// A pattern the whole value must match (`matches: true`) or must not match.
#[derive(Debug)]
pub struct Limit {
    pub pattern: &'static str,
    pub matches: bool,
}

/// `spec.flakeUrl`: a flake reference with an explicit type. No `#`: enbi appends the fragment.
pub static FLAKE_URL: FieldRule = FieldRule {
    regexes: LazyLock::new(|| compile(&FLAKE_URL)),
    field: "flakeUrl",
    pattern: r"^(?:(?:(?:git|hg)\+(?:https|http|ssh|file)|(?:tarball|file)\+(?:https|http|file)|https|http|file)://[^\s#]+|(?:github|gitlab|sourcehut):[A-Za-z0-9_.~-]+/[A-Za-z0-9_.-]+(?:/[^\s#?]+)?(?:\?[^\s#]*)?|path:/[^\s#]*|flake:[A-Za-z][A-Za-z0-9_-]*(?:/[^\s#?]+)?(?:\?[^\s#]*)?)$",
    limits: &[],
    max_len: 2048,
    expected: "a flake reference with a type and no fragment, such as github:owner/repo, \
               git+https://host/repo?rev=<commit>, https://host/flake.tar.gz or path:/abs/dir",
};

/// `spec.packageName`: a Nix attribute path below `packages.<system>`, dots allowed.
pub static PACKAGE_NAME: FieldRule = FieldRule {
    regexes: LazyLock::new(|| compile(&PACKAGE_NAME)),
    field: "packageName",
    pattern: r"^[A-Za-z_][A-Za-z0-9_'-]*(?:\.[A-Za-z_][A-Za-z0-9_'-]*)*$",
    limits: &[],
    max_len: 256,
    expected: "a Nix attribute path such as hello or chog-docker.stream-layered",
};

/// `spec.imageTag`: an image reference that the kubelet and containerd's CRI accept, with a tag, a
/// digest or both.
///
/// Both parse it with `ParseNormalizedNamed` of github.com/distribution/reference v0.6.0 (the
/// version Kubernetes and containerd 1.7.19+ and 2.x build with; `regexp.go`, `normalize.go`,
/// `reference.go`), which checks the digest with go-digest. The pattern is that package's
/// `ReferenceRegexp`, production by production:
///
/// ```text
/// reference := name [ ":" tag ] [ "@" digest ]       enbi: a tag or a digest is required
/// name      := [ domain "/" ] path ( "/" path )*
/// domain    := ( label ( "." label )* | "[" [a-fA-F0-9:]+ "]" ) [ ":" [0-9]+ ]    (IPv6 too)
/// label     := [a-zA-Z0-9] | [a-zA-Z0-9] [a-zA-Z0-9-]* [a-zA-Z0-9]           (uppercase too)
/// path      := [a-z0-9]+ ( ( [._] | "__" | "-"+ ) [a-z0-9]+ )*                (lowercase)
/// tag       := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}                           (Go's ASCII \w)
/// digest    := "sha256:" hex{64} | "sha384:" hex{96} | "sha512:" hex{128}   (hex: [a-f0-9])
/// ```
///
/// The grammar's digest is any `algorithm:<32 or more hex digits>`, but go-digest accepts only the
/// algorithms it knows and whose hash is linked in: sha256, sha384 and sha512 (containerd and the
/// kubelet link all three), each with exactly its length in lowercase hex.
///
/// Which component is the registry does not change whether a name parses (one that could be a
/// registry or a path is fine either way; `ParseNormalizedNamed` re-parses it after adding
/// `docker.io/`), but it decides what `RepositoryNameTotalLengthMax` counts: the path after
/// normalising, at most 255 characters, without the registry (v0.6.0: older parsers, such as
/// containerd 1.7.18's own copy, counted the registry too). `splitDockerDomain` takes the first
/// component as the registry when a `/` follows it and it is `localhost` or has a `.`, a `:` or an
/// uppercase letter; else the registry is `docker.io`, and a name of one component gets `library/`
/// (8 more characters), as it does after `docker.io/` or `index.docker.io/`. A first component with
/// a `.` and a `_` is no host, so the grammar reads it as part of the path. The limits say that:
///
/// - must match: the first component is a registry (`localhost`, or a `.`, `:` or uppercase
///   letter and no `_`), or the name (everything before the first `:` or `@`, when no `/` comes
///   after it) has at most 255 characters;
/// - must not match: a Docker Hub name of one component (nothing, `docker.io/` or
///   `index.docker.io/` before it) of 248 characters or more, or 256 characters or more between
///   the first `/` and the first `:` or `@` after it.
///
/// `maxLength` cannot be the grammar's, which leaves the registry unbounded: 780 admits every
/// reference whose registry is a DNS name (253 characters) with a port of up to 5 digits, and
/// whose path, tag and digest are as long as allowed (253 + 6 + 1 + 255 + 1 + 128 + 8 + 128).
pub static IMAGE_TAG: FieldRule = FieldRule {
    regexes: LazyLock::new(|| compile(&IMAGE_TAG)),
    field: "imageTag",
    pattern: r"^(?:(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[(?:[a-fA-F0-9:]+)\])(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(?:@(?:sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}))?|@(?:sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}))$",
    limits: &[
        Limit {
            pattern: r"^(?:(?:[^/_]*[.:A-Z][^/_]*|localhost)/|[^:@]{0,255}(?:[:@][^/]*)?$)",
            matches: true,
        },
        Limit {
            pattern: r"^(?:(?:(?:index\.)?docker\.io/)?[^/:@]{248}[^/]*$|[^/]*/[^:@]{256})",
            matches: false,
        },
    ],
    max_len: 780,
    expected: "an image reference with a tag or a sha256, sha384 or sha512 digest and a repository \
               path of at most 255 characters, such as registry.example/app:v1 or \
               app@sha256:<64 hex>",
};

/// `spec.fetchSecretRef.name`: a Secret's name, a DNS subdomain (RFC 1123).
pub static SECRET_NAME: FieldRule = FieldRule {
    regexes: LazyLock::new(|| compile(&SECRET_NAME)),
    field: "fetchSecretRef.name",
    pattern: r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$",
    limits: &[],
    max_len: 253,
    expected: "a Secret's name: lowercase letters, digits, '-' and '.', such as flake-credentials",
};

impl FieldRule {
    /// The admission message when a value breaks this rule.
    pub fn message(&self) -> String {
        format!("spec.{} must be {}", self.field, self.expected)
    }

    /// The rule as a CEL validation for the CRD schema: the pattern and every limit.
    pub fn cel(&self) -> Rule {
        let limits = self.limits.iter().map(|l| {
            let negation = if l.matches { "" } else { "!" };
            format!(" && {negation}self.matches(r\"{}\")", l.pattern)
        });
        let rule = format!("self.matches(r\"{}\")", self.pattern) + &limits.collect::<String>();
        Rule::new(rule).message(kube::core::Message::Message(self.message()))
    }

    /// Checks a value outside admission (annotations, flags); the error says what was expected
    /// and the caller names the field as its user knows it.
    pub fn check(&self, value: &str) -> Result<(), String> {
        let (pattern, limits) = &*self.regexes;
        let ok = value.len() <= self.max_len
            && pattern.is_match(value)
            && limits
                .iter()
                .zip(self.limits)
                .all(|(regex, limit)| regex.is_match(value) == limit.matches);
        if ok {
            Ok(())
        } else {
            Err(format!("must be {}", self.expected))
        }
    }
}

/// The patterns are constants covered by tests: one that does not compile is a programming error.
#[allow(clippy::expect_used)]
fn compile(rule: &FieldRule) -> (Regex, Vec<Regex>) {
    let compile = |p| Regex::new(p).expect("field patterns are valid regular expressions");
    let limits = rule.limits.iter().map(|l| compile(l.pattern)).collect();
    (compile(rule.pattern), limits)
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
    pub fn secret_name(value: &str, _: &()) -> garde::Result {
        to_garde(SECRET_NAME.check(value))
    }
    pub fn system(value: &str, _: &()) -> garde::Result {
        to_garde(check_system(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `IMAGE_TAG.pattern` is distribution/reference's `ReferenceRegexp`, put together here from
    /// the productions of its `regexp.go` under their names, with go-digest's digests and enbi's
    /// "a tag or a digest". Editing the pattern by hand breaks this test.
    #[test]
    fn image_tag_pattern_is_distributions_reference_regexp() {
        let alphanumeric = "[a-z0-9]+";
        let separator = "(?:[._]|__|[-]+)";
        let domain_name_component = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
        let optional_port = "(?::[0-9]+)?";
        // `[\w][\w.-]{0,127}`, with Go's ASCII `\w` (Rust's is Unicode).
        let tag = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
        let ipv6address = r"\[(?:[a-fA-F0-9:]+)\]";
        let domain_name = format!(r"{domain_name_component}(?:\.{domain_name_component})*");
        let host = format!("(?:{domain_name}|{ipv6address})");
        let domain_and_port = format!("{host}{optional_port}");
        let path_component = format!("{alphanumeric}(?:{separator}{alphanumeric})*");
        let remote_name = format!("{path_component}(?:/{path_component})*");
        let name_pat = format!("(?:{domain_and_port}/)?{remote_name}");
        // `digestPat` narrowed to what go-digest's `Parse` accepts.
        let digest = "(?:sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128})";
        // `(?::tag)?(?:@digest)?`, but not neither.
        let reference = format!("^{name_pat}(?::{tag}(?:@{digest})?|@{digest})$");
        assert_eq!(IMAGE_TAG.pattern, reference);
    }

    #[test]
    fn cel_rule_holds_the_pattern_and_every_limit() {
        let rule = IMAGE_TAG.cel().rule;
        assert_eq!(rule.matches("self.matches(").count(), 3, "{rule}");
        assert_eq!(rule.matches("!self.matches(").count(), 1, "{rule}");
        assert!(FLAKE_URL.cel().rule.starts_with("self.matches(r\""));
        assert!(!FLAKE_URL.cel().rule.contains("&&"));
    }

    /// The apiserver refuses a CRD whose rule's estimated cost is over 10,000,000 and stops a rule
    /// at 1,000,000 when it runs. cel-go estimates `s.matches(re)` as
    /// `⌈size(s) × 0.1⌉ × ⌈len(re) × 0.25⌉`, with `size(s)` four times `maxLength` (bytes per code
    /// point at most); every rule here stays under the runtime limit even so.
    #[test]
    fn cel_cost_estimate_stays_within_the_apiservers_limits() {
        for rule in [&FLAKE_URL, &PACKAGE_NAME, &IMAGE_TAG, &SECRET_NAME] {
            let traversal = (4 * rule.max_len).div_ceil(10);
            let cost: usize = std::iter::once(rule.pattern)
                .chain(rule.limits.iter().map(|l| l.pattern))
                .map(|p| traversal * p.len().div_ceil(4) + 1)
                .sum();
            assert!(cost < 1_000_000, "{}: estimated cost {cost}", rule.field);
        }
    }

    #[test]
    fn limits_bound_the_path_not_the_registry() {
        let path = |n| "a".repeat(n);
        for (value, ok) in [
            (format!("{}:1", path(247)), true),
            (format!("{}:1", path(248)), false),
            (format!("team/{}:1", path(250)), true),
            (format!("team/{}:1", path(251)), false),
            (format!("r.example/{}:1", path(255)), true),
            (format!("r.example/{}:1", path(256)), false),
            (format!("{}.example/app:1", "r".repeat(300)), true),
        ] {
            assert_eq!(IMAGE_TAG.check(&value).is_ok(), ok, "{}", value.len());
        }
    }
}
