//! Importing the image stream into containerd under its tag, through containerd's API
//! (`api`), without a temporary file, without ever changing a tag that names another image
//! (unless overwriting is allowed). This runs in the load container; the stream comes from the
//! build container and is checked on the way (`archive`).
//!
//! **Fast path.** enbi labels every image it loads with the Nix store path it came from
//! (`enbi.hrzn.ee/store-path`). A store path names one build of one derivation, and image
//! builds are reproducible, so if the tag already carries this label (and its blobs are all
//! there) the image is the one this build would produce: nothing is streamed.
//!
//! **Otherwise**, everything happens under a lease (so a failed load leaves nothing behind once
//! it ends, and containerd's garbage collection cannot take a blob while the load runs):
//!
//! 1. Each file of the archive is written into the content store as it streams in, with the
//!    labels a CRI pull would give it. A file whose name claims a digest the store has
//!    (`streamLayeredImage` names layers by their checksum before their bytes) is read and
//!    checked, not written.
//! 2. Each layer is unpacked into the snapshotter as soon as it is written, on top of the layers
//!    before it, while the next one streams in (`streamLayeredImage` writes base layers first).
//!    A chain the snapshotter has is not unpacked again.
//! 3. At the end, the image's manifest is the one containerd's importer would write for the
//!    archive (`enbi_core::image_archive`), so the digest is what `ctr images import` gives;
//!    what was unpacked out of order is unpacked again in the manifest's order.
//! 4. The tag is created, or compared: the same digest, nothing changes; another digest,
//!    [`LoadError::TagConflict`] unless `--allow-overwrite`.
//!
//! **Labels.** Each blob gets `containerd.io/distribution.source.<registry>=<repository>` as it
//! is created (merged with what is there on blobs the store had), and the image a digest
//! reference `<registry>/<repository>@<digest>`, as a pull through the CRI leaves them: Spegel
//! only advertises images that have both, and only blobs labelled as they are created.
//! `--pin` adds `io.cri-containerd.pinned=pinned`. Image records are created and updated with
//! all their labels in one call each.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::Image;
use enbi_core::image_archive::{
    self, ArchiveImageError, DISTRIBUTION_SOURCE_PREFIX, DOCKER_LAYER, DOCKER_MANIFEST, Descriptor,
    GC_SNAPSHOT_PREFIX, UNCOMPRESSED,
};
use enbi_core::keys;
use enbi_core::reason::FailureReason;
use enbi_core::reference::{chain_id, digest_reference, registry_and_repository, sha256_digest};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::api::{ApiError, Containerd, Written, descriptor};
use super::archive::{self, ArchiveError, Entry};
use super::containerd::{ContainerdArgs, SocketError};
use super::log::LogTail;
use super::output;

/// Where the image came from, as the OCI annotations name it: the locked flake and its commit.
pub const SOURCE_LABEL: &str = "org.opencontainers.image.source";
pub const REVISION_LABEL: &str = "org.opencontainers.image.revision";
/// The CRI's label for images its garbage collection must keep.
pub const PINNED_LABEL: &str = "io.cri-containerd.pinned";
/// Queued image data between the archive reader and containerd, in blocks of up to 1 MiB.
const QUEUED_BLOCKS: usize = 8;
/// How long a lease outlives the import timeout, should the loader die holding it.
const LEASE_MARGIN: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Image(#[from] ArchiveImageError),
    #[error("containerd refused the image: {0}")]
    Import(String),
    #[error("loading the image ran past {0:?}; raise --import-timeout (ENBI_IMPORT_TIMEOUT)")]
    Timeout(Duration),
    #[error("the archive's {name} is {actual}, not {claimed} as its name says")]
    Misnamed {
        name: String,
        claimed: String,
        actual: String,
    },
    #[error("layer {layer} unpacks to {actual}, but the image's config says {expected}")]
    DiffId {
        layer: String,
        expected: String,
        actual: String,
    },
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
            // The stream stopped: the build container's image script failed or was killed.
            LoadError::Archive(ArchiveError::Read(_) | ArchiveError::CutShort(_)) => {
                FailureReason::BuildFailed
            }
            LoadError::Archive(ArchiveError::Stopped) => FailureReason::ImportFailed,
            LoadError::Archive(_)
            | LoadError::Image(_)
            | LoadError::Misnamed { .. }
            | LoadError::DiffId { .. } => FailureReason::NotAnImage,
            LoadError::Timeout(_) => FailureReason::DeadlineExceeded,
            LoadError::TagConflict { .. } => FailureReason::TagConflict,
            LoadError::Socket(_)
            | LoadError::Api(_)
            | LoadError::Import(_)
            | LoadError::Manifest { .. } => FailureReason::ImportFailed,
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
    containerd: &ContainerdArgs,
    request: &Request,
    stream: Box<dyn Read + Send>,
    log: &LogTail,
) -> Result<Loaded, LoadError> {
    containerd.check_socket()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LoadError::Import(format!("cannot start the loader's runtime: {e}")))?;
    runtime.block_on(async {
        tokio::time::timeout(
            request.timeout,
            load_with_lease(containerd, request, stream, log),
        )
        .await
        .unwrap_or(Err(LoadError::Timeout(request.timeout)))
    })
}

async fn load_with_lease(
    containerd: &ContainerdArgs,
    request: &Request<'_>,
    stream: Box<dyn Read + Send>,
    log: &LogTail,
) -> Result<Loaded, LoadError> {
    let api = Containerd::connect(containerd).await?;
    let api = api
        .with_lease(&lease_id(), request.timeout + LEASE_MARGIN)
        .await?;
    let result = load_leased(&api, request, stream, log).await;
    // What the image references stays; the rest (a failed load's blobs) is collected.
    if let Err(e) = api.drop_lease().await {
        log.line("enbi", &format!("warning: {e}"));
    }
    result
}

/// Unique on the node: the time in nanoseconds (a container's process ID alone is not).
fn lease_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("enbi-load-{nanos}-{}", std::process::id())
}

async fn load_leased(
    api: &Containerd,
    request: &Request<'_>,
    stream: Box<dyn Read + Send>,
    log: &LogTail,
) -> Result<Loaded, LoadError> {
    if let Some(existing) = api.image(request.tag).await?
        && existing
            .labels
            .get(keys::IMAGE_STORE_PATH)
            .map(String::as_str)
            == Some(request.store_path)
        && let Some(target) = existing.target.as_ref().map(from_api)
    {
        match tag(api, request, &target, log).await {
            Ok(tagged) => {
                log.line(
                    "enbi",
                    &format!(
                        "{} is already {} from {}: nothing to import",
                        request.tag, target.digest, request.store_path
                    ),
                );
                return Ok(Loaded {
                    digest: target.digest,
                    size: tagged.size,
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
    let (bytes_streamed, target) = ingest(api, request, stream, log).await?;
    log.line(
        "enbi",
        &format!("imported {bytes_streamed} bytes as {}", target.digest),
    );
    let tagged = tag(api, request, &target, log).await?;
    Ok(Loaded {
        digest: target.digest,
        size: tagged.size,
        bytes_streamed,
        imported: tagged.imported,
    })
}

fn from_api(d: &containerd_client::types::Descriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: u64::try_from(d.size).unwrap_or_default(),
    }
}

/// What happened to the archive's files, for the log.
#[derive(Debug, Default)]
struct Counts {
    written: usize,
    /// Files the content store had: their bytes were checked and dropped.
    had: usize,
    /// Of those, files not even sent to containerd (their names claimed their digests).
    not_sent: usize,
}

/// A blob of the archive, written (or found) in the content store.
struct Blob {
    digest: String,
    size: u64,
    /// Its first bytes: what kind of blob it is.
    head: Vec<u8>,
}

/// Streams the archive into the content store, unpacking layers as they come; returns the
/// bytes read and the image's descriptor (its manifest, or the index of an OCI layout).
async fn ingest(
    api: &Containerd,
    request: &Request<'_>,
    stream: Box<dyn Read + Send>,
    log: &LogTail,
) -> Result<(u64, Descriptor), LoadError> {
    let (send, mut entries) = mpsc::channel(QUEUED_BLOCKS);
    let max_bytes = request.max_bytes;
    let reader = std::thread::spawn(move || {
        archive::read_entries(output::decompressed(stream), max_bytes, |entry| {
            send.blocking_send(entry).map_err(|_| ArchiveError::Stopped)
        })
    });
    let (layers, unpacked) = mpsc::unbounded_channel();
    let unpacker = tokio::spawn(unpack_as_they_come(api.clone(), unpacked));
    let mut counts = Counts::default();
    let written = write_entries(api, request, &mut entries, layers, &mut counts).await;
    // The reader has ended (its channel closed), or stops at its next block now.
    drop(entries);
    let read = reader
        .join()
        .unwrap_or(Err(ArchiveError::Read(std::io::Error::other(
            "the reader panicked",
        ))));
    // A malformed or cut stream explains a failure better than containerd does; a reader
    // stopped because the writing failed does not.
    let (blobs, index) = match (read, written) {
        (Err(ArchiveError::Stopped), Err(e)) => return Err(e),
        (Err(e), _) => return Err(e.into()),
        (Ok(_), Err(e)) => return Err(e),
        (Ok(bytes), Ok((blobs, index))) => (blobs, index.map(|i| (bytes, i))),
    };
    let unpacked = match unpacker.await {
        Ok(Ok(n)) => n.to_string(),
        Ok(Err(e)) => format!("stopped ({e})"),
        Err(e) => format!("stopped ({e})"),
    };
    log.line(
        "enbi",
        &format!(
            "files: {} written, {} already in the content store ({} of them not sent); layers unpacked while streaming: {unpacked}",
            counts.written, counts.had, counts.not_sent
        ),
    );
    let Some((bytes, (name, index))) = index else {
        return Err(ArchiveError::NoManifest.into());
    };
    let target = if name == "index.json" {
        image_archive::oci_image(&index)?
    } else {
        write_docker_manifest(api, request, &blobs, &index).await?
    };
    Ok((bytes, target))
}

/// Writes each file of the archive as it streams in; layers go to the unpacker once written.
/// Returns the blobs by entry name, and the archive's `manifest.json` or `index.json`.
async fn write_entries(
    api: &Containerd,
    request: &Request<'_>,
    entries: &mut mpsc::Receiver<Entry>,
    layers: mpsc::UnboundedSender<Descriptor>,
    counts: &mut Counts,
) -> Result<(HashMap<String, Blob>, Option<(String, Value)>), LoadError> {
    let labels = source_labels(request.tag);
    let mut blobs = HashMap::new();
    let mut index = None;
    let mut written = 0usize;
    while let Some(entry) = entries.recv().await {
        let (name, size) = match entry {
            Entry::Index { name, json } => {
                // An OCI layout's index.json names the image, whatever manifest.json says (an
                // exported image has both), as with containerd's importer.
                if name == "index.json" || index.is_none() {
                    index = Some((name, json));
                }
                continue;
            }
            Entry::File { name, size } => (name, size),
            Entry::Data(_) | Entry::End => continue,
        };
        let claimed = image_archive::named_digest(&name);
        let have = match &claimed {
            Some(digest) => api.info(digest).await?.is_some(),
            None => false,
        };
        let mut writer = (!have).then(|| {
            written += 1;
            api.write(&api.unique(&written.to_string()), size)
        });
        let mut head = Vec::new();
        // Hashed here, not by the reader: the two threads share the work.
        let mut hash = Sha256::new();
        let digest = loop {
            match entries.recv().await {
                Some(Entry::Data(data)) => {
                    hash.update(&data);
                    if head.len() < 512 {
                        head.extend_from_slice(&data[..data.len().min(512 - head.len())]);
                    }
                    if let Some(w) = writer.as_mut() {
                        w.data(data).await?;
                    }
                }
                Some(Entry::End) => break sha256_digest(&hash.finalize()),
                // The reader stopped: its error says why.
                _ => return Err(ArchiveError::Stopped.into()),
            }
        };
        match (writer, claimed) {
            (Some(w), _) => {
                // A blob the store had gets its label in `tag`: it makes no creation event.
                if w.commit(&digest, labels.clone()).await? == Written::Existed {
                    counts.had += 1;
                } else {
                    counts.written += 1;
                }
            }
            (None, Some(claimed)) if claimed != digest => {
                return Err(LoadError::Misnamed {
                    name,
                    claimed,
                    actual: digest,
                });
            }
            (None, _) => {
                counts.had += 1;
                counts.not_sent += 1;
            }
        }
        if looks_like_a_layer(&head) {
            let layer = Descriptor {
                media_type: image_archive::layer_media_type(&digest, &head)?.to_owned(),
                digest: digest.clone(),
                size,
            };
            // The unpacker may have stopped; the layer is then unpacked at the end.
            let _ = layers.send(layer);
        }
        blobs.insert(image_archive::clean(&name), Blob { digest, size, head });
    }
    Ok((blobs, index))
}

/// A tar (its first header's checksum holds) or a gzip stream.
fn looks_like_a_layer(head: &[u8]) -> bool {
    head.starts_with(&[0x1f, 0x8b]) || <&[u8; 512]>::try_from(head).is_ok_and(archive::checksum_ok)
}

/// The distribution source label of blobs created for `tag`.
fn source_labels(tag: &str) -> BTreeMap<String, String> {
    let (registry, repository) = registry_and_repository(tag);
    BTreeMap::from([(
        format!("{DISTRIBUTION_SOURCE_PREFIX}{registry}"),
        repository,
    )])
}

/// Unpacks uncompressed layers in the order they are written, each on the chain of those
/// before it, while the next streams in. Only a head start: the manifest's order is checked
/// at the end ([`unpack`]), and a layer whose diff ID is not its digest (compressed) ends it.
async fn unpack_as_they_come(
    api: Containerd,
    mut layers: mpsc::UnboundedReceiver<Descriptor>,
) -> Result<usize, ApiError> {
    let mut unpacked = 0;
    let mut diff_ids: Vec<String> = vec![];
    while let Some(layer) = layers.recv().await {
        if layer.media_type != DOCKER_LAYER {
            break;
        }
        let parent = chain_id(&diff_ids);
        diff_ids.push(layer.digest.clone());
        let chain = chain_id(&diff_ids).unwrap_or_default();
        if !api.snapshot_exists(&chain).await? {
            api.unpack(&layer, parent.as_deref(), &chain).await?;
            unpacked += 1;
        }
    }
    Ok(unpacked)
}

/// Writes the manifest containerd's importer makes for a Docker archive's image.
async fn write_docker_manifest(
    api: &Containerd,
    request: &Request<'_>,
    blobs: &HashMap<String, Blob>,
    manifest: &Value,
) -> Result<Descriptor, LoadError> {
    let image = image_archive::docker_image(manifest)?;
    let blob = |name: &str| {
        blobs
            .get(name)
            .ok_or_else(|| ArchiveImageError::Missing(name.to_owned()))
    };
    let config = blob(&image.config)?;
    let config = Descriptor {
        media_type: String::new(),
        digest: config.digest.clone(),
        size: config.size,
    };
    let layers = image
        .layers
        .iter()
        .map(|name| {
            let layer = blob(name)?;
            Ok(Descriptor {
                media_type: image_archive::layer_media_type(&layer.digest, &layer.head)?.to_owned(),
                digest: layer.digest.clone(),
                size: layer.size,
            })
        })
        .collect::<Result<Vec<_>, ArchiveImageError>>()?;
    let bytes = image_archive::docker_manifest(&config, &layers);
    let digest = sha256_digest(&Sha256::digest(&bytes));
    let json: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let mut labels = image_archive::gc_labels(&json);
    labels.extend(source_labels(request.tag));
    let size = bytes.len() as u64;
    let mut writer = api.write(&api.unique("manifest"), size);
    writer.data(bytes).await?;
    writer.commit(&digest, labels).await?;
    Ok(Descriptor {
        media_type: DOCKER_MANIFEST.to_owned(),
        digest,
        size,
    })
}

/// An image's parts as the content store has them.
struct Parts {
    /// Every blob: the target, the platform's manifest of an index, config, layers.
    blobs: Vec<(Descriptor, Role)>,
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
}

/// What a blob is to its image, for its labels.
enum Role {
    /// An index or manifest, with the labels that keep its children.
    Parent(BTreeMap<String, String>),
    Config,
    Layer(String),
}

async fn read_json(api: &Containerd, digest: &str) -> Result<Value, LoadError> {
    let error = |error: String| LoadError::Manifest {
        digest: digest.to_owned(),
        error,
    };
    if api.info(digest).await?.is_none() {
        return Err(error("not in the content store".into()));
    }
    let bytes = api.read(digest).await?;
    serde_json::from_slice(&bytes).map_err(|e| error(e.to_string()))
}

async fn parts(api: &Containerd, target: &Descriptor) -> Result<Parts, LoadError> {
    let json = read_json(api, &target.digest).await?;
    let mut blobs = vec![(
        target.clone(),
        Role::Parent(image_archive::gc_labels(&json)),
    )];
    let manifest = if image_archive::is_index(&target.media_type, &json) {
        let arch = enbi_core::system::from_nix(&format!("{}-linux", std::env::consts::ARCH))
            .map_or("amd64", |s| s.arch);
        let manifest =
            image_archive::platform_manifest(&json, arch).ok_or_else(|| LoadError::Manifest {
                digest: target.digest.clone(),
                error: format!("no manifest for linux/{arch}"),
            })?;
        let json = read_json(api, &manifest.digest).await?;
        blobs.push((manifest, Role::Parent(image_archive::gc_labels(&json))));
        json
    } else {
        json
    };
    let (config, layers) = image_archive::manifest_parts(&manifest)?;
    let diff_ids = image_archive::diff_ids(&read_json(api, &config.digest).await?)?;
    if diff_ids.len() != layers.len() {
        return Err(ArchiveImageError::Malformed(
            "config",
            format!("{} diff IDs for {} layers", diff_ids.len(), layers.len()),
        )
        .into());
    }
    blobs.push((config, Role::Config));
    for (layer, diff_id) in layers.iter().zip(&diff_ids) {
        blobs.push((layer.clone(), Role::Layer(diff_id.clone())));
    }
    Ok(Parts {
        blobs,
        layers,
        diff_ids,
    })
}

/// Unpacks what the snapshotter lacks of the image's chain, in the manifest's order; returns
/// the chain ID of its top layer.
async fn unpack(api: &Containerd, parts: &Parts) -> Result<String, LoadError> {
    let mut parent: Option<String> = None;
    for (i, layer) in parts.layers.iter().enumerate() {
        let chain = chain_id(&parts.diff_ids[..=i]).unwrap_or_default();
        if !api.snapshot_exists(&chain).await? {
            let diff_id = api.unpack(layer, parent.as_deref(), &chain).await?;
            if diff_id != parts.diff_ids[i] {
                return Err(LoadError::DiffId {
                    layer: layer.digest.clone(),
                    expected: parts.diff_ids[i].clone(),
                    actual: diff_id,
                });
            }
        }
        parent = Some(chain);
    }
    Ok(parent.unwrap_or_default())
}

/// The image's tag and digest reference set.
struct Tagged {
    size: u64,
    imported: bool,
}

/// Checks that the image is whole and unpacked, labels its blobs and names it under the tag
/// and its digest reference.
async fn tag(
    api: &Containerd,
    request: &Request<'_>,
    target: &Descriptor,
    log: &LogTail,
) -> Result<Tagged, LoadError> {
    let parts = parts(api, target).await?;
    let chain = unpack(api, &parts).await?;
    let mut size = 0;
    let repository = source_labels(request.tag);
    for (blob, role) in &parts.blobs {
        size += blob.size;
        let Some(info) = api.info(&blob.digest).await? else {
            return Err(LoadError::Manifest {
                digest: target.digest.clone(),
                error: format!("{} is not in the content store", blob.digest),
            });
        };
        let mut wanted = match role {
            Role::Parent(labels) => labels.clone(),
            Role::Config => BTreeMap::from([(
                format!("{GC_SNAPSHOT_PREFIX}{}", api.snapshotter),
                chain.clone(),
            )]),
            Role::Layer(diff_id) => BTreeMap::from([(UNCOMPRESSED.to_owned(), diff_id.clone())]),
        };
        for (key, repository) in &repository {
            if let Some(value) =
                image_archive::with_repository(info.labels.get(key).map(String::as_str), repository)
            {
                wanted.insert(key.clone(), value);
            }
        }
        wanted.retain(|k, v| info.labels.get(k) != Some(v));
        api.label_blob(&blob.digest, wanted).await?;
    }

    let labels: HashMap<String, String> = image_labels(request).into_iter().collect();
    let record = |name: &str| Image {
        name: name.to_owned(),
        labels: labels.clone(),
        target: Some(descriptor(target)),
        created_at: None,
        updated_at: None,
    };
    let digest = &target.digest;
    let mut imported = true;
    if !api.create_image(record(request.tag)).await? {
        let existing = api
            .image(request.tag)
            .await?
            .and_then(|i| i.target)
            .map(|t| t.digest)
            .unwrap_or_default();
        if &existing == digest {
            imported = false;
            api.update_image(record(request.tag), false).await?;
        } else if request.allow_overwrite {
            log.line(
                "enbi",
                &format!(
                    "overwriting {} ({existing} -> {digest}): --allow-overwrite",
                    request.tag
                ),
            );
            api.update_image(record(request.tag), true).await?;
            let old = digest_reference(request.tag, &existing);
            if let Err(e) = api.delete_image(&old).await {
                log.line("enbi", &format!("note: {old} not removed: {e}"));
            }
        } else {
            return Err(conflict(request, &existing, digest));
        }
    }
    let by_digest = digest_reference(request.tag, digest);
    if !api.create_image(record(&by_digest)).await? {
        api.update_image(record(&by_digest), true).await?;
    }
    Ok(Tagged { size, imported })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_layers_from_other_blobs() {
        let mut tar = vec![0u8; 512];
        tar[..4].copy_from_slice(b"bin/");
        tar[148..156].copy_from_slice(b"        ");
        let sum: u32 = tar.iter().map(|b| u32::from(*b)).sum();
        tar[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert!(looks_like_a_layer(&tar));
        assert!(looks_like_a_layer(b"\x1f\x8b\x08"));
        assert!(!looks_like_a_layer(br#"{"architecture":"amd64"}"#));
        assert!(!looks_like_a_layer(&tar[..100]));
    }
}
