//! `enbi-operator release`: a release Job's container. It releases a deleted NixBuild's image
//! on its node (`enbi_core::release` says when and where): the tag and the digest reference the
//! loader created lose their pin and are removed, with the CRI's image-ID name when no other
//! name is left, so containerd collects the image. A reference that names another image now (a
//! tag overwritten since) is left alone.
//!
//! **Never what a container uses.** A container's root filesystem is an active snapshot whose
//! parent is its image's chain ID. If one exists for this image, any container's (running,
//! stopped or about to restart, Kubernetes' or not), the references stay and only their pins
//! go: the kubelet's image GC takes the image once nothing uses it, and a container that
//! restarts still finds it under its name. Such an image is labelled `enbi.hrzn.ee/released`, and
//! the next release on the node removes it once no container uses it (most often the container
//! of a Pod just deleted, which the kubelet removes within a minute): a node holds at most one
//! such leftover per image, not one per rollout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use enbi_core::keys;
use enbi_core::reference::{chain_id, digest_reference, normalise};
use enbi_core::release::ReleaseReport;
use enbi_core::validation::IMAGE_TAG;
use serde_json::Value;

use super::api::{ApiError, Containerd};
use super::containerd::{ContainerdArgs, SocketError};
use super::import::PINNED_LABEL;
use super::log::LogTail;
use super::report;

/// Release an image enbi loaded into the node's containerd (a release Job's container).
#[derive(Debug, clap::Args)]
pub struct ReleaseArgs {
    /// The image's tag, as the NixBuild names it.
    #[arg(long, env = "ENBI_IMAGE_TAG")]
    pub image_tag: String,
    /// The manifest digest enbi loaded under it on this node: references that name another
    /// image are left alone.
    #[arg(long, env = "ENBI_IMAGE_DIGEST")]
    pub image_digest: String,
    /// Keep `<repository>@<digest>` (another NixBuild's image has it), and only unpin it.
    #[arg(long, env = "ENBI_KEEP_DIGEST_REFERENCE")]
    pub keep_digest_reference: bool,
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    /// Where the JSON report goes (the container's termination message).
    #[arg(
        long,
        env = "ENBI_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
enum ReleaseError {
    #[error("invalid image tag: {0}")]
    Tag(String),
    #[error("invalid image digest {0:?}: expected sha256:<64 hex digits>")]
    Digest(String),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot start the release's runtime: {0}")]
    Runtime(std::io::Error),
}

/// An image record: its name, its target's digest, its labels.
struct Image {
    name: String,
    digest: String,
    labels: BTreeMap<String, String>,
}

/// Releases the image and writes the report; the exit code says whether it worked.
pub fn run(args: ReleaseArgs) -> ExitCode {
    let log = LogTail::stdout();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ReleaseError::Runtime)
        .and_then(|runtime| runtime.block_on(release(&args, &log)));
    match result {
        Ok(done) => {
            report::write(&done.encode(), &args.termination_log, &log);
            ExitCode::SUCCESS
        }
        Err(e) => {
            report::write(&format!("error: {e}"), &args.termination_log, &log);
            ExitCode::FAILURE
        }
    }
}

async fn release(args: &ReleaseArgs, log: &LogTail) -> Result<ReleaseReport, ReleaseError> {
    IMAGE_TAG
        .check(&args.image_tag)
        .map_err(ReleaseError::Tag)?;
    let digest = &args.image_digest;
    if !is_image_id(digest) {
        return Err(ReleaseError::Digest(digest.clone()));
    }
    args.containerd.check_socket()?;
    let api = Containerd::connect(&args.containerd).await?;
    let tag = normalise(&args.image_tag);
    let by_digest = digest_reference(&tag, digest);
    let images: Vec<Image> = api
        .images()
        .await?
        .into_iter()
        .map(|i| Image {
            name: i.name,
            digest: i.target.map(|t| t.digest).unwrap_or_default(),
            labels: i.labels.into_iter().collect(),
        })
        .collect();
    for image in images
        .iter()
        .filter(|i| i.name == tag || i.name == by_digest)
    {
        if &image.digest != digest {
            log.line(
                "enbi",
                &format!(
                    "{} names another image ({}): left alone",
                    image.name, image.digest
                ),
            );
        }
    }
    let ours: Vec<&Image> = images
        .iter()
        .filter(|i| &i.digest == digest && (i.name == tag || i.name == by_digest))
        .collect();
    let mut done = ReleaseReport::default();
    if ours.is_empty() {
        log.line("enbi", &format!("{tag} ({digest}) is not here"));
    } else {
        done.in_use = in_use(&api, digest, log).await?;
        let (keep, remove): (Vec<&Image>, Vec<&Image>) = ours
            .into_iter()
            .partition(|i| done.in_use || (args.keep_digest_reference && i.name == by_digest));
        // Left for the kubelet's image GC, and for the next release on this node, which
        // removes it once no container uses it (`sweep`).
        let mut labels = BTreeMap::from([(PINNED_LABEL.to_owned(), String::new())]);
        if done.in_use {
            labels.insert(keys::RELEASED.to_owned(), "true".to_owned());
        }
        for image in &keep {
            api.label_image(&image.name, &labels).await?;
            if image.labels.contains_key(PINNED_LABEL) {
                done.unpinned.push(image.name.clone());
            }
        }
        let names = remove.into_iter().map(|i| i.name.clone()).collect();
        done.removed = with_ids(&images, digest, names);
        delete(&api, &done.removed).await?;
    }
    done.swept = sweep(&api, &images, digest, log).await?;
    log.line(
        "enbi",
        &format!(
            "released {tag}: removed {:?}, unpinned {:?}{}; removed what earlier releases left: {:?}",
            done.removed,
            done.unpinned,
            if done.in_use {
                " (a container uses it)"
            } else {
                ""
            },
            done.swept,
        ),
    );
    Ok(done)
}

/// `names` of the image of `digest`, and its ID names (the CRI names every image
/// `sha256:<config digest>` too) when no other name would be left: containerd collects an image
/// only once it has no name at all.
fn with_ids(images: &[Image], digest: &str, mut names: Vec<String>) -> Vec<String> {
    let of_image = || images.iter().filter(|i| i.digest == digest);
    let others = of_image().any(|i| !names.contains(&i.name) && !is_image_id(&i.name));
    if !names.is_empty() && !others {
        names.extend(
            of_image()
                .filter(|i| is_image_id(&i.name))
                .map(|i| i.name.clone()),
        );
    }
    names
}

/// Removes the images earlier releases left because a container used them (labelled
/// `enbi.hrzn.ee/released`), now that none does; an image with any other name (a load that
/// claimed it again clears the label) is not touched. `skip` is the image released now.
async fn sweep(
    api: &Containerd,
    images: &[Image],
    skip: &str,
    log: &LogTail,
) -> Result<Vec<String>, ApiError> {
    let mut left: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for image in images
        .iter()
        .filter(|i| i.digest != skip && !is_image_id(&i.name))
    {
        let names = left.entry(image.digest.as_str()).or_default();
        if image.labels.contains_key(keys::RELEASED) {
            names.push(image.name.clone());
        } else {
            // Claimed: never swept.
            names.push(String::new());
        }
    }
    let mut swept = vec![];
    for (digest, names) in left {
        if names.iter().any(String::is_empty) || in_use(api, digest, log).await? {
            continue;
        }
        let names = with_ids(images, digest, names);
        delete(api, &names).await?;
        swept.extend(names);
    }
    Ok(swept)
}

/// Whether `name` is an image ID as the CRI names images: `sha256:<64 hex digits>`.
fn is_image_id(name: &str) -> bool {
    name.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether a container on the node uses the image of manifest `digest`. Unsure (an index, an
/// unreadable manifest or config) counts as in use: a release never removes what it cannot
/// rule out.
async fn in_use(api: &Containerd, digest: &str, log: &LogTail) -> Result<bool, ApiError> {
    let Some(chain) = chain_of(api, digest).await else {
        log.line(
            "enbi",
            &format!("cannot read the layers of {digest}; treating it as in use"),
        );
        return Ok(true);
    };
    Ok(api.active_snapshot_parents().await?.contains(&chain))
}

/// The chain ID of the image of manifest `digest`, from its config's `rootfs.diff_ids`.
async fn chain_of(api: &Containerd, digest: &str) -> Option<String> {
    let manifest: Value = serde_json::from_slice(&api.read(digest).await.ok()?).ok()?;
    let config = manifest.pointer("/config/digest")?.as_str()?;
    let config: Value = serde_json::from_slice(&api.read(config).await.ok()?).ok()?;
    let diff_ids: Vec<&str> = config
        .pointer("/rootfs/diff_ids")?
        .as_array()?
        .iter()
        .map(Value::as_str)
        .collect::<Option<_>>()?;
    chain_id(&diff_ids)
}

async fn delete(api: &Containerd, names: &[String]) -> Result<(), ApiError> {
    for name in names {
        api.delete_image(name).await?;
    }
    Ok(())
}
