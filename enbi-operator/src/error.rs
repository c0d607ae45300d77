//! The operator's errors, each with a category for metrics and logs.

use kube::core::Status;
use kube::runtime::finalizer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("creating the builder Job failed: {0}")]
    Job(#[source] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("the NixBuild has no namespace")]
    NoNamespace,
}

impl Error {
    /// A bounded label for metrics: what kind of thing went wrong.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(e) | Error::Job(e) => match e {
                kube::Error::Api(s) if s.code == 409 => "conflict",
                kube::Error::Api(s) if s.code == 403 => "forbidden",
                kube::Error::Api(_) => "api",
                _ => "transport",
            },
            Error::Finalizer(_) => "finalizer",
            Error::NoNamespace => "invalid",
        }
    }

    /// The apiserver's answer, if the API refused a request (also inside the finalizer helper).
    pub fn api_status(&self) -> Option<&Status> {
        use finalizer::Error as F;
        match self {
            Error::Kube(kube::Error::Api(s)) | Error::Job(kube::Error::Api(s)) => Some(s),
            Error::Finalizer(e) => match e.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.api_status(),
                F::AddFinalizer(kube::Error::Api(s)) | F::RemoveFinalizer(kube::Error::Api(s)) => {
                    Some(s)
                }
                _ => None,
            },
            _ => None,
        }
    }
}
