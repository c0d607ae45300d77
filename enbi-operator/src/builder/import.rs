//! Importing the image stream into containerd under its tag, without a temporary file, without
//! ever changing a tag that names another image (unless overwriting is allowed). This runs in
//! the load container; the stream comes from the build container and is checked on the way
//! ([`archive::strip_names`]).
//!
//! **Knowing the digest.** A `streamLayeredImage` image has no digest until it is streamed, and
//! an archive's manifest digest is only known once containerd has converted it. So:
//!
//! 1. *Fast path.* enbi labels every image it loads with the Nix store path it came from
//!    (`enbi.hrzn.ee/store-path`). A store path names one build of one derivation, and image
//!    builds are reproducible, so if the tag already carries this label (and its blobs are all
//!    there) the image is the one this build would produce: nothing is streamed.
//! 2. Otherwise the image is imported under a temporary digest-only name
//!    (`enbi-import-<time>-<pid>@sha256:…`; the archive's own names are stripped in the stream),
//!    which tells the digest, then compared with the tag: absent, the tag is created; the same
//!    digest, nothing changes; another digest, [`LoadError::TagConflict`] unless
//!    `--allow-overwrite`. The temporary name is removed in every case; containerd's GC then
//!    drops the content of a refused image.
//!
//! **Labels.** Each blob (manifest, config, layers) gets `containerd.io/distribution.source.
//! <registry>=<repository>` (merged with what is there), and the image a digest reference
//! `<registry>/<repository>@<digest>`, as a pull through the CRI would leave them: Spegel only
//! advertises images that have both, and only blobs labelled as they are created (`advertise`).
//! `--pin` adds `io.cri-containerd.pinned=pinned`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use enbi_core::keys;
use enbi_core::reason::FailureReason;
use enbi_core::reference::{digest_reference, registry_and_repository};
use serde_json::Value;

use super::advertise::LabelOnCreate;
use super::archive::{self, ArchiveError};
use super::containerd::{Ctr, CtrError};
use super::log::LogTail;
use super::output;
use super::process::wait_until;

/// Where the image came from, as the OCI annotations name it: the locked flake and its commit.
pub const SOURCE_LABEL: &str = "org.opencontainers.image.source";
pub const REVISION_LABEL: &str = "org.opencontainers.image.revision";
/// The CRI's label for images its garbage collection must keep.
pub const PINNED_LABEL: &str = "io.cri-containerd.pinned";
/// Prefix of temporary image names.
const TEMPORARY_PREFIX: &str = "enbi-import-";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Ctr(#[from] CtrError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("containerd refused the image: {0}")]
    Import(String),
    #[error("loading the image ran past {0:?}; raise --import-timeout (ENBI_IMPORT_TIMEOUT)")]
    Timeout(Duration),
    #[error("the archive holds {0} images; enbi loads exactly one image per build")]
    ImageCount(usize),
    #[error("the image's manifest {digest} cannot be read: {error}")]
    Manifest { digest: String, error: String },
    #[error(
        "{tag} already names another image ({existing}, this build made {built}); the tag was left as it is. Use a new tag, or allow overwriting (--allow-overwrite)"
    )]
    TagConflict {
        tag: String,
        existing: String,
        built: String,
    },
}

impl LoadError {
    pub fn reason(&self) -> FailureReason {
        match self {
            LoadError::ImageCount(_) => FailureReason::NotAnImage,
            // The stream stopped: the build container's image script failed or was killed.
            LoadError::Archive(ArchiveError::Read(_) | ArchiveError::CutShort(_)) => {
                FailureReason::BuildFailed
            }
            LoadError::Archive(ArchiveError::Write(_)) => FailureReason::ImportFailed,
            LoadError::Archive(_) => FailureReason::NotAnImage,
            LoadError::Timeout(_) => FailureReason::DeadlineExceeded,
            LoadError::TagConflict { .. } => FailureReason::TagConflict,
            LoadError::Ctr(_) | LoadError::Import(_) | LoadError::Manifest { .. } => {
                FailureReason::ImportFailed
            }
        }
    }
}

/// What to load and how.
#[derive(Debug)]
pub struct Request<'a> {
    /// The normalised image tag.
    pub tag: &'a str,
    pub store_path: &'a str,
    /// The locked flake and its revision, as `org.opencontainers.image.source`/`.revision`.
    pub source: Option<&'a str>,
    pub revision: Option<&'a str>,
    pub pin: bool,
    pub allow_overwrite: bool,
    pub timeout: Duration,
    /// The most image bytes to read from the stream.
    pub max_bytes: u64,
}

/// The loaded image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub digest: String,
    pub size: u64,
    pub bytes_streamed: u64,
    /// False when the tag already named this image.
    pub imported: bool,
}

/// Loads the image of `request`, read from `stream`, into containerd. When the tag already holds
/// this build's image, the stream is dropped unread (the build container then stops writing).
pub fn load(
    ctr: &Ctr,
    request: &Request,
    stream: Box<dyn Read + Send>,
    log: &LogTail,
) -> Result<Loaded, LoadError> {
    ctr.check_socket()?;
    let deadline = Instant::now() + request.timeout;
    if let Some(existing) = ctr.image(request.tag)?
        && existing
            .labels
            .get(keys::IMAGE_STORE_PATH)
            .map(String::as_str)
            == Some(request.store_path)
    {
        match label(ctr, request, &existing.digest) {
            Ok(size) => {
                log.line(
                    "enbi",
                    &format!(
                        "{} is already {} from {}: nothing to import",
                        request.tag, existing.digest, request.store_path
                    ),
                );
                return Ok(Loaded {
                    digest: existing.digest,
                    size,
                    bytes_streamed: 0,
                    imported: false,
                });
            }
            Err(e) => log.line(
                "enbi",
                &format!("{} is incomplete ({e}); importing again", request.tag),
            ),
        }
    }

    let base = temporary_base();
    let advertiser = LabelOnCreate::start(ctr, request.tag, &base)?;
    let result = import_and_tag(ctr, request, stream, &base, deadline, log);
    // The temporary name goes in every case; on failure containerd's GC drops the content.
    // Its deletion also ends the advertiser's subscription.
    let mut marked = false;
    match ctr.names_with_prefix(&format!("{base}@")) {
        Ok(names) => match ctr.remove(&names) {
            Ok(()) => marked = !names.is_empty(),
            Err(e) => log.line("enbi", &format!("warning: cannot remove {names:?}: {e}")),
        },
        Err(e) => log.line(
            "enbi",
            &format!("warning: cannot list temporary images: {e}"),
        ),
    }
    let labelled = advertiser.stop(marked);
    log.line(
        "enbi",
        &format!("labelled {labelled} blobs as they were created, for registry mirrors"),
    );
    result
}

fn temporary_base() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("{TEMPORARY_PREFIX}{secs}-{}", std::process::id())
}

fn import_and_tag(
    ctr: &Ctr,
    request: &Request,
    stream: Box<dyn Read + Send>,
    base: &str,
    deadline: Instant,
    log: &LogTail,
) -> Result<Loaded, LoadError> {
    let (bytes_streamed, temporary) = import(ctr, request, stream, base, deadline, log)?;
    let digest = temporary
        .split_once('@')
        .map(|(_, d)| d.to_owned())
        .unwrap_or_default();
    log.line(
        "enbi",
        &format!("imported {bytes_streamed} bytes as {digest}"),
    );
    let size = label_content(ctr, request.tag, &digest)?;

    let mut imported = true;
    match ctr.image(request.tag)? {
        None => {
            if let Err(e) = ctr.tag(&temporary, request.tag, false) {
                // Another builder may have tagged it meanwhile: look again.
                match ctr.image(request.tag)? {
                    Some(now) if now.digest == digest => imported = false,
                    Some(now) => return Err(conflict(request, &now.digest, &digest)),
                    None => return Err(e.into()),
                }
            }
        }
        Some(existing) if existing.digest == digest => imported = false,
        Some(existing) if request.allow_overwrite => {
            log.line(
                "enbi",
                &format!(
                    "overwriting {} ({} -> {digest}): --allow-overwrite",
                    request.tag, existing.digest
                ),
            );
            ctr.tag(&temporary, request.tag, true)?;
            let old = digest_reference(request.tag, &existing.digest);
            if let Err(e) = ctr.remove(std::slice::from_ref(&old)) {
                log.line("enbi", &format!("note: {old} not removed: {e}"));
            }
        }
        Some(existing) => return Err(conflict(request, &existing.digest, &digest)),
    }
    // Labelled once tagged: containerd 2.x's `ctr images tag` does not copy labels (1.6 did).
    ctr.label_image(request.tag, &image_labels(request))?;
    ctr.tag(request.tag, &digest_reference(request.tag, &digest), true)?;
    Ok(Loaded {
        digest,
        size,
        bytes_streamed,
        imported,
    })
}

fn conflict(request: &Request, existing: &str, built: &str) -> LoadError {
    LoadError::TagConflict {
        tag: request.tag.to_owned(),
        existing: existing.to_owned(),
        built: built.to_owned(),
    }
}

fn image_labels(request: &Request) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (
            keys::IMAGE_STORE_PATH.to_owned(),
            request.store_path.to_owned(),
        ),
        // Claimed again, if an earlier release left it: an empty value removes the label.
        (keys::RELEASED.to_owned(), String::new()),
    ]);
    if request.pin {
        labels.insert(PINNED_LABEL.to_owned(), "pinned".to_owned());
    }
    let provenance = [
        (SOURCE_LABEL, request.source),
        (REVISION_LABEL, request.revision),
    ];
    for (key, value) in provenance {
        if let Some(value) = value {
            labels.insert(key.to_owned(), value.to_owned());
        }
    }
    labels
}

/// Streams the image into `ctr images import`; returns the bytes streamed and the temporary
/// image name.
fn import(
    ctr: &Ctr,
    request: &Request,
    stream: Box<dyn Read + Send>,
    base: &str,
    deadline: Instant,
    log: &LogTail,
) -> Result<(u64, String), LoadError> {
    let mut child = ctr.spawn_import(base)?;
    let stderr_text = Arc::new(Mutex::new(String::new()));
    let mut forwarders = vec![];
    if let Some(stdout) = child.stdout.take() {
        forwarders.push(log.forward("containerd", stdout, |_| {}));
    }
    if let Some(stderr) = child.stderr.take() {
        let text = stderr_text.clone();
        forwarders.push(log.forward("containerd", stderr, move |line| {
            let mut text = text.lock().unwrap_or_else(PoisonError::into_inner);
            if text.len() < 2048 {
                text.push_str(line.trim_end());
                text.push(' ');
            }
        }));
    }
    let Some(stdin) = child.stdin.take() else {
        let _ = child.kill();
        return Err(LoadError::Import("ctr has no stdin".into()));
    };
    output::widen_pipe(&stdin);
    let max_bytes = request.max_bytes;
    let pump = std::thread::spawn(move || {
        let mut stdin = stdin;
        let result = archive::strip_names(output::decompressed(stream), &mut stdin, max_bytes);
        let _ = stdin.flush();
        result
    });

    let status = wait_until(&mut child, deadline).map_err(|e| LoadError::Import(e.to_string()))?;
    for f in forwarders {
        let _ = f.join();
    }
    // ctr has exited (or was killed), so the pump's writes fail rather than block.
    let pumped = pump
        .join()
        .unwrap_or_else(|_| Err(ArchiveError::Write(std::io::Error::other("pump panicked"))));
    let Some(status) = status else {
        return Err(LoadError::Timeout(request.timeout));
    };
    // A malformed or cut stream explains ctr's failure better than ctr does; a write that
    // failed because ctr stopped does not.
    let bytes = match pumped {
        Ok(bytes) => bytes,
        Err(ArchiveError::Write(_)) if !status.success() => 0,
        Err(e) => return Err(e.into()),
    };
    if !status.success() {
        let stderr = stderr_text
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        return Err(LoadError::Import(format!(
            "ctr images import exited with {status}: {}",
            stderr.trim()
        )));
    }
    let names = ctr.names_with_prefix(&format!("{base}@"))?;
    Ok((bytes, the_image(ctr, names)?))
}

/// The one image among the names an import created. containerd 1.6 names one image per
/// archive; 2.x (the transfer service) also names the index it wraps a Docker archive in, and
/// the manifests of an OCI index. The image is the only manifest (as 1.6 names it, so digests
/// stay the same across containerd versions), else the only index.
fn the_image(ctr: &Ctr, names: Vec<String>) -> Result<String, LoadError> {
    if let [one] = names.as_slice() {
        return Ok(one.clone());
    }
    let (mut manifests, mut indexes) = (vec![], vec![]);
    for name in &names {
        let digest = name.split_once('@').map(|(_, d)| d).unwrap_or_default();
        let json: Value =
            serde_json::from_slice(&ctr.content(digest)?).map_err(|e| LoadError::Manifest {
                digest: digest.to_owned(),
                error: e.to_string(),
            })?;
        if json.get("manifests").is_some() {
            indexes.push(name.clone());
        } else {
            manifests.push(name.clone());
        }
    }
    match (manifests.as_slice(), indexes.as_slice()) {
        ([one], _) | (_, [one]) => Ok(one.clone()),
        _ => Err(LoadError::ImageCount(names.len())),
    }
}

/// Puts Spegel's distribution source label on every blob of the image and returns its size
/// (manifest, config and layers, as containerd counts it). Fails if a blob is missing.
fn label_content(ctr: &Ctr, tag: &str, digest: &str) -> Result<u64, LoadError> {
    let (registry, repository) = registry_and_repository(tag);
    let key = format!("containerd.io/distribution.source.{registry}");
    let blobs = blobs(ctr, digest)?;
    let digests: Vec<String> = blobs.iter().map(|b| b.0.clone()).collect();
    let mut labels = ctr.contents_labels(&digests)?;
    for digest in &digests {
        let mut value = labels
            .get_mut(digest)
            .and_then(|l| l.remove(&key))
            .unwrap_or_default();
        if !value.split(',').any(|r| r == repository) {
            if !value.is_empty() {
                value.push(',');
            }
            value.push_str(&repository);
            ctr.label_content(digest, &BTreeMap::from([(key.clone(), value)]))?;
        }
    }
    let size = blobs.iter().map(|b| b.1).sum();
    Ok(size)
}

/// Labels an image that is already there (fast path): content, digest reference, image labels.
fn label(ctr: &Ctr, request: &Request, digest: &str) -> Result<u64, LoadError> {
    let size = label_content(ctr, request.tag, digest)?;
    ctr.label_image(request.tag, &image_labels(request))?;
    ctr.tag(request.tag, &digest_reference(request.tag, digest), true)?;
    Ok(size)
}

/// Digest and size of the image's blobs: the manifest (or index and the manifests of it that
/// are present), configs and layers.
fn blobs(ctr: &Ctr, digest: &str) -> Result<Vec<(String, u64)>, LoadError> {
    let manifest_error = |error: String| LoadError::Manifest {
        digest: digest.to_owned(),
        error,
    };
    let bytes = ctr.content(digest)?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|e| manifest_error(e.to_string()))?;
    let mut blobs = vec![(digest.to_owned(), bytes.len() as u64)];
    if let Some(manifests) = json.get("manifests").and_then(Value::as_array) {
        for m in manifests {
            let Some(d) = m.get("digest").and_then(Value::as_str) else {
                continue;
            };
            // Other platforms' manifests are not imported; skip what is absent.
            if ctr.content_labels(d).is_ok() {
                blobs.extend(blobs_of_manifest(ctr, d)?);
            }
        }
        return Ok(blobs);
    }
    blobs.extend(descriptors(&json).map_err(manifest_error)?);
    Ok(blobs)
}

fn blobs_of_manifest(ctr: &Ctr, digest: &str) -> Result<Vec<(String, u64)>, LoadError> {
    let bytes = ctr.content(digest)?;
    let error = |error: String| LoadError::Manifest {
        digest: digest.to_owned(),
        error,
    };
    let json: Value = serde_json::from_slice(&bytes).map_err(|e| error(e.to_string()))?;
    let mut blobs = vec![(digest.to_owned(), bytes.len() as u64)];
    blobs.extend(descriptors(&json).map_err(error)?);
    Ok(blobs)
}

/// The config and layer descriptors of a manifest.
fn descriptors(manifest: &Value) -> Result<Vec<(String, u64)>, String> {
    let config = manifest.get("config").ok_or("no config")?;
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or("no layers")?;
    std::iter::once(config)
        .chain(layers)
        .map(|d| {
            let digest = d.get("digest").and_then(Value::as_str);
            let size = d.get("size").and_then(Value::as_u64);
            digest
                .zip(size)
                .map(|(d, s)| (d.to_owned(), s))
                .ok_or_else(|| format!("a descriptor without digest or size: {d}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_manifest_descriptors() {
        let manifest = serde_json::json!({
            "config": {"digest": "sha256:c", "size": 206},
            "layers": [{"digest": "sha256:l", "size": 1985536}],
        });
        assert_eq!(
            descriptors(&manifest),
            Ok(vec![("sha256:c".into(), 206), ("sha256:l".into(), 1985536)])
        );
        assert!(descriptors(&serde_json::json!({})).is_err());
    }
}
