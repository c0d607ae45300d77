//! containerd, through its `ctr` command line, for the release container (`release`); and the
//! containerd flags of `load` and `release`. The load container uses containerd's API (`api`).
//!
//! Every call names the socket and namespace explicitly. Output parsing is limited to
//! `images ls` (name, digest, labels columns), `content get` (JSON) and `snapshots ls`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use enbi_core::defaults;

#[derive(Debug, thiserror::Error)]
pub enum CtrError {
    #[error(
        "the containerd socket {0} does not exist: mount the node's containerd socket into the builder at --containerd-address"
    )]
    NoSocket(String),
    #[error("{0} is not a socket: point --containerd-address at containerd's socket")]
    NotSocket(String),
    #[error("cannot run `ctr` ({0}): the builder image must have containerd's ctr on its PATH")]
    Spawn(io::Error),
    #[error("`ctr {command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// An image record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub digest: String,
    pub labels: BTreeMap<String, String>,
}

/// `ctr` bound to one socket and namespace; also the containerd flags of `load` and
/// `release`.
#[derive(Debug, Clone, clap::Args)]
pub struct Ctr {
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

impl Ctr {
    fn command(&self) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Result<String, CtrError> {
        let output: Output = self
            .command()
            .args(args)
            .output()
            .map_err(CtrError::Spawn)?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(CtrError::Failed {
                command: args.join(" "),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    /// Fails early and clearly when the socket is missing (a ctr dial only times out).
    pub fn check_socket(&self) -> Result<(), CtrError> {
        let shown = self.address.display().to_string();
        match std::fs::metadata(&self.address) {
            Err(_) => Err(CtrError::NoSocket(shown)),
            Ok(meta) if !meta.file_type().is_socket() => Err(CtrError::NotSocket(shown)),
            Ok(_) => Ok(()),
        }
    }

    /// Every image record.
    pub fn images(&self) -> Result<Vec<Image>, CtrError> {
        Ok(parse_images(&self.run(&["images", "ls"])?))
    }

    pub fn label_image(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), CtrError> {
        self.label("images", name, labels)
    }

    pub fn remove(&self, names: &[String]) -> Result<(), CtrError> {
        if names.is_empty() {
            return Ok(());
        }
        let mut args = vec!["images", "rm"];
        args.extend(names.iter().map(String::as_str));
        self.run(&args).map(drop)
    }

    /// A blob's bytes (manifests and configs: small).
    pub fn content(&self, digest: &str) -> Result<Vec<u8>, CtrError> {
        let output = self
            .command()
            .args(["content", "get", digest])
            .output()
            .map_err(CtrError::Spawn)?;
        if output.status.success() {
            Ok(output.stdout)
        } else {
            Err(CtrError::Failed {
                command: format!("content get {digest}"),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    /// The parents of the snapshotter's active snapshots and views: a container's root
    /// filesystem is an active snapshot whose parent is its image's chain ID.
    pub fn active_snapshot_parents(&self) -> Result<BTreeSet<String>, CtrError> {
        let out = self.run(&["snapshots", "--snapshotter", &self.snapshotter, "ls"])?;
        Ok(parse_active_parents(&out))
    }

    /// `ctr <store> label <target> k=v…`, for images and content alike.
    fn label(
        &self,
        store: &str,
        target: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), CtrError> {
        let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec![store, "label", target];
        args.extend(pairs.iter().map(String::as_str));
        self.run(&args).map(drop)
    }
}

/// `ctr snapshots ls`: `KEY PARENT KIND`, the parent empty for a base layer.
fn parse_active_parents(out: &str) -> BTreeSet<String> {
    out.lines()
        .skip(1)
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [_, parent, "Active" | "View"] => Some(parent.to_owned()),
                _ => None,
            },
        )
        .collect()
}

/// `ctr images ls`: `REF TYPE DIGEST SIZE PLATFORMS LABELS`, where SIZE has a space in it
/// ("1.9 MiB"); REF, TYPE and DIGEST come first and LABELS last, none with spaces.
fn parse_images(out: &str) -> Vec<Image> {
    out.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 5 || !fields[2].starts_with("sha256:") {
                return None;
            }
            Some(Image {
                name: fields[0].to_owned(),
                digest: fields[2].to_owned(),
                labels: parse_labels(fields[fields.len() - 1]),
            })
        })
        .collect()
}

/// `k=v,k=v` as ctr prints labels ("-" for none); a value may itself hold commas (the
/// distribution source label lists repositories), so a piece that does not start with
/// `key=` continues the previous value.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut last: Option<String> = None;
    for piece in text.trim().split(',') {
        match piece.split_once('=') {
            Some((k, v)) if is_label_key(k) => {
                labels.insert(k.to_owned(), v.to_owned());
                last = Some(k.to_owned());
            }
            _ => {
                if let Some(v) = last.as_ref().and_then(|k| labels.get_mut(k)) {
                    v.push(',');
                    v.push_str(piece);
                }
            }
        }
    }
    labels
}

fn is_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "./-_".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_images_ls() {
        let out = "REF                   TYPE                                                 DIGEST                                                                  SIZE    PLATFORMS   LABELS                              \n\
docker.io/library/x:1 application/vnd.docker.distribution.manifest.v2+json sha256:dc41587e9cc96035e89766179cf2679fde542f9b22b14f4b1e76be563a501712 1.9 MiB linux/amd64 a=b,io.cri-containerd.pinned=pinned \n\
docker.io/library/y:1 application/vnd.docker.distribution.manifest.v2+json sha256:dc41587e9cc96035e89766179cf2679fde542f9b22b14f4b1e76be563a501712 1.9 MiB linux/amd64 - \n";
        let images = parse_images(out);
        assert_eq!(images.len(), 2);
        assert_eq!(images[0].name, "docker.io/library/x:1");
        assert_eq!(
            images[0].digest,
            "sha256:dc41587e9cc96035e89766179cf2679fde542f9b22b14f4b1e76be563a501712"
        );
        assert_eq!(images[0].labels["io.cri-containerd.pinned"], "pinned");
        assert!(images[1].labels.is_empty());
    }

    #[test]
    fn parses_the_parents_of_active_snapshots() {
        let out = "KEY                                                                     PARENT                                                                  KIND      \n\
sha256:aa sha256:bb Committed \n\
sha256:bb  Committed \n\
5f0c3e1b sha256:aa Active \n\
prepare-x  Active \n\
view-1 sha256:cc View \n";
        assert_eq!(
            parse_active_parents(out),
            BTreeSet::from(["sha256:aa".to_owned(), "sha256:cc".to_owned()])
        );
    }

    #[test]
    fn parses_labels_with_commas_in_values() {
        let labels = parse_labels(
            "containerd.io/gc.ref.content.l.0=sha256:5b,containerd.io/distribution.source.docker.io=library/x,library/y,b=c",
        );
        assert_eq!(
            labels["containerd.io/distribution.source.docker.io"],
            "library/x,library/y"
        );
        assert_eq!(labels["containerd.io/gc.ref.content.l.0"], "sha256:5b");
        assert_eq!(labels["b"], "c");
        assert!(parse_labels("-").is_empty());
    }
}
