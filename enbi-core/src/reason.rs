//! Why a build is waiting or failed: the `reason` vocabulary of status, conditions and Events.

use serde::{Deserialize, Serialize};

/// Why a build attempt failed. The builder reports the first five; the operator observes the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureReason {
    /// The flake or the attribute could not be evaluated (bad URL, missing package, fetch error).
    EvalFailed,
    /// `nix build` failed.
    BuildFailed,
    /// The output is neither a `streamLayeredImage` script nor an image archive.
    NotAnImage,
    /// containerd refused the image or could not be reached.
    ImportFailed,
    /// The tag already names another image and overwriting is not allowed.
    TagConflict,
    /// The builder ran past its deadline.
    DeadlineExceeded,
    /// The builder's Job or Pod went away before reporting (node deleted, Job removed).
    BuilderLost,
    /// The builder ended without a readable report (crash, OOM kill).
    BuilderCrashed,
    /// The builder's report was malformed, oversized or described another image.
    InvalidReport,
    /// The operator's policy does not allow this build.
    PolicyDenied,
    /// The fetch Secret the build names is missing or holds no usable credentials.
    FetchSecretUnusable,
}

impl FailureReason {
    /// The CamelCase reason string used in status, conditions and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EvalFailed => "EvalFailed",
            Self::BuildFailed => "BuildFailed",
            Self::NotAnImage => "NotAnImage",
            Self::ImportFailed => "ImportFailed",
            Self::TagConflict => "TagConflict",
            Self::DeadlineExceeded => "DeadlineExceeded",
            Self::BuilderLost => "BuilderLost",
            Self::BuilderCrashed => "BuilderCrashed",
            Self::InvalidReport => "InvalidReport",
            Self::PolicyDenied => "PolicyDenied",
            Self::FetchSecretUnusable => "FetchSecretUnusable",
        }
    }

    /// Whether another attempt may succeed. Evaluation, build, output-shape, tag and policy
    /// failures are deterministic for an immutable spec, so retrying them only burns nodes.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::ImportFailed | Self::BuilderLost | Self::BuilderCrashed
        )
    }
}

/// Why a build is still Pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// No Ready, schedulable, non-repelled node of the architecture; re-evaluated when Nodes change.
    NoEligibleNode,
    /// A concurrency limit is reached.
    Queued,
    /// A failed attempt will be retried at `status.nextAttemptTime`.
    RetryScheduled,
}

impl WaitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoEligibleNode => "NoEligibleNode",
            Self::Queued => "Queued",
            Self::RetryScheduled => "RetryScheduled",
        }
    }
}
