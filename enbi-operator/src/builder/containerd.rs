//! The containerd flags of `load` and `release`, and the early check that the socket is there
//! (a gRPC dial to a missing socket only times out). Both talk to containerd through its API
//! (`api`).

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use enbi_core::defaults;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "the containerd socket {0} does not exist: mount the node's containerd socket into the builder at --containerd-address"
    )]
    NoSocket(String),
    #[error("{0} is not a socket: point --containerd-address at containerd's socket")]
    NotSocket(String),
}

/// Where containerd is and which of its namespaces and snapshotters the kubelet's CRI uses.
#[derive(Debug, Clone, clap::Args)]
pub struct ContainerdArgs {
    /// containerd's socket.
    #[arg(
        long = "containerd-address",
        env = "ENBI_CONTAINERD_ADDRESS",
        default_value = defaults::CONTAINERD_SOCKET
    )]
    pub address: PathBuf,
    /// containerd namespace of the kubelet's CRI.
    #[arg(
        long = "containerd-namespace",
        env = "ENBI_CONTAINERD_NAMESPACE",
        default_value = defaults::CONTAINERD_NAMESPACE
    )]
    pub namespace: String,
    /// Snapshotter the CRI unpacks into (where containers' snapshots are too).
    #[arg(long, env = "ENBI_SNAPSHOTTER", default_value = "overlayfs")]
    pub snapshotter: String,
}

impl ContainerdArgs {
    /// Fails early and clearly when the socket is missing.
    pub fn check_socket(&self) -> Result<(), SocketError> {
        let shown = self.address.display().to_string();
        match std::fs::metadata(&self.address) {
            Err(_) => Err(SocketError::NoSocket(shown)),
            Ok(meta) if !meta.file_type().is_socket() => Err(SocketError::NotSocket(shown)),
            Ok(_) => Ok(()),
        }
    }
}
