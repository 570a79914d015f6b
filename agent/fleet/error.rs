//! What can go wrong in the fleet channel and the operator's fleet tools, each with the file,
//! the broker or the document it concerns.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file that exists but is not what it should be (a key, a state file, a document).
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("broker {address}: {why}")]
    Broker { address: String, why: String },
    /// The operator asked for something a gateway would refuse.
    #[error("{0}")]
    Refused(String),
    #[error("generating a key failed")]
    KeyGeneration,
    #[error("the pipeline has stopped")]
    PipelineStopped,
    #[error(transparent)]
    Apply(#[from] crate::pipeline::PipelineError),
    /// What the health check found wrong, every item.
    #[error("{}", .0.join("; "))]
    Unhealthy(Vec<String>),
}

impl FleetError {
    pub(crate) fn invalid(path: &std::path::Path, why: impl ToString) -> FleetError {
        FleetError::Invalid {
            path: path.to_path_buf(),
            why: why.to_string(),
        }
    }
}
