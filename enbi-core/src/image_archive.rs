//! What the parts of an image archive (a Docker `manifest.json` archive, as `streamLayeredImage`
//! writes, or an OCI layout) become in containerd's stores, decided as containerd's own importer
//! (`ctr images import`, 1.7 and 2.x) decides: the same manifest bytes, so the same image digest
//! for the same archive, and the same garbage-collection labels.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// containerd's label on a blob naming the snapshot its image unpacks into, per snapshotter.
pub const GC_SNAPSHOT_PREFIX: &str = "containerd.io/gc.ref.snapshot.";
/// containerd's label on a compressed layer naming its uncompressed digest (its diff ID).
pub const UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Spegel's (and a CRI pull's) label on a blob: the repositories of a registry it came from.
pub const DISTRIBUTION_SOURCE_PREFIX: &str = "containerd.io/distribution.source.";

/// A content descriptor, its fields in the order Go's `ocispec.Descriptor` marshals them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveImageError {
    #[error("the archive holds {0} images; enbi loads exactly one image per build")]
    ImageCount(usize),
    #[error("the archive's {0} is not what an image archive has there: {1}")]
    Malformed(&'static str, String),
    #[error("the archive names {0}, which it does not contain")]
    Missing(String),
    #[error("layer {0} is compressed in a way containerd's importer does not take")]
    Compression(String),
}

/// A Docker archive's one image: its config's and layers' entry names (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerImage {
    pub config: String,
    pub layers: Vec<String>,
}

/// Reads `manifest.json`; exactly one image, whatever tags it names (they are ignored).
pub fn docker_image(manifest: &Value) -> Result<DockerImage, ArchiveImageError> {
    let malformed = |why: &str| ArchiveImageError::Malformed("manifest.json", why.to_owned());
    let images = manifest.as_array().ok_or_else(|| malformed("not a list"))?;
    let [image] = images.as_slice() else {
        return Err(ArchiveImageError::ImageCount(images.len()));
    };
    let config = image["Config"]
        .as_str()
        .ok_or_else(|| malformed("no Config"))?;
    let layers = image["Layers"]
        .as_array()
        .ok_or_else(|| malformed("no Layers"))?
        .iter()
        .map(|l| {
            l.as_str()
                .map(clean)
                .ok_or_else(|| malformed("a bad layer"))
        })
        .collect::<Result<_, _>>()?;
    Ok(DockerImage {
        config: clean(config),
        layers,
    })
}

/// An OCI layout's one image: the descriptor `index.json` lists.
pub fn oci_image(index: &Value) -> Result<Descriptor, ArchiveImageError> {
    let manifests = index["manifests"]
        .as_array()
        .ok_or_else(|| ArchiveImageError::Malformed("index.json", "no manifests".into()))?;
    let [one] = manifests.as_slice() else {
        return Err(ArchiveImageError::ImageCount(manifests.len()));
    };
    serde_json::from_value(one.clone())
        .map_err(|e| ArchiveImageError::Malformed("index.json", e.to_string()))
}

/// An entry's name as containerd's importer keys it (`path.Clean`, no leading `./`).
pub fn clean(name: &str) -> String {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    parts.join("/")
}

/// The digest an entry's name claims before its bytes: `blobs/sha256/<hex>` in an OCI layout,
/// `<hex>/layer.tar` or `<hex>.json` in a Docker archive (`streamLayeredImage` names layers by
/// their checksum). Only a claim: whoever skips the bytes must check them.
pub fn named_digest(name: &str) -> Option<String> {
    let name = clean(name);
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix("/layer.tar"))
        .or_else(|| name.strip_suffix(".json"))?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| format!("sha256:{hex}"))
}

/// The media type containerd's importer gives a Docker archive's layer, from its first bytes.
pub fn layer_media_type(digest: &str, head: &[u8]) -> Result<&'static str, ArchiveImageError> {
    match head {
        [0x1f, 0x8b, 0x08, ..] => Ok(DOCKER_LAYER_GZIP),
        [0x28, 0xb5, 0x2f, 0xfd, ..] | [0x42, 0x5a, 0x68, ..] | [0xfd, b'7', b'z', b'X', ..] => {
            Err(ArchiveImageError::Compression(digest.to_owned()))
        }
        _ => Ok(DOCKER_LAYER),
    }
}

/// The manifest containerd's importer writes for a Docker archive's image, byte for byte
/// (Go's `json.Marshal` of schema version, media type, config, layers).
pub fn docker_manifest(config: &Descriptor, layers: &[Descriptor]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Manifest<'a> {
        #[serde(rename = "schemaVersion")]
        schema_version: u32,
        #[serde(rename = "mediaType")]
        media_type: &'a str,
        config: Descriptor,
        layers: &'a [Descriptor],
    }
    let config = Descriptor {
        media_type: DOCKER_CONFIG.to_owned(),
        ..config.clone()
    };
    serde_json::to_vec(&Manifest {
        schema_version: 2,
        media_type: DOCKER_MANIFEST,
        config,
        layers,
    })
    .unwrap_or_default()
}

/// Whether a manifest blob is an index (a list of manifests) rather than one image's manifest.
pub fn is_index(media_type: &str, json: &Value) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST || json.get("manifests").is_some()
}

/// A manifest's config and layers.
pub fn manifest_parts(
    manifest: &Value,
) -> Result<(Descriptor, Vec<Descriptor>), ArchiveImageError> {
    let malformed = |e: String| ArchiveImageError::Malformed("manifest", e);
    let config = serde_json::from_value(manifest["config"].clone())
        .map_err(|e| malformed(format!("config: {e}")))?;
    let layers = serde_json::from_value(manifest["layers"].clone())
        .map_err(|e| malformed(format!("layers: {e}")))?;
    Ok((config, layers))
}

/// The manifest of an index for `arch` on Linux (the first, when none names a platform).
pub fn platform_manifest(index: &Value, arch: &str) -> Option<Descriptor> {
    let manifests = index["manifests"].as_array()?;
    let matches = |m: &&Value| {
        m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch
            || m.get("platform").is_none()
    };
    serde_json::from_value(manifests.iter().find(matches)?.clone()).ok()
}

/// The diff IDs (uncompressed layer digests) an image config lists.
pub fn diff_ids(config: &Value) -> Result<Vec<String>, ArchiveImageError> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .and_then(|ids| ids.iter().map(|d| d.as_str().map(str::to_owned)).collect())
        .ok_or_else(|| ArchiveImageError::Malformed("config", "no rootfs.diff_ids".into()))
}

/// The labels that keep a manifest's (or an index's) children from containerd's garbage
/// collection, as its importer sets them.
pub fn gc_labels(manifest: &Value) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let digest = |d: &Value| d["digest"].as_str().map(str::to_owned);
    if let Some(config) = digest(&manifest["config"]) {
        labels.insert("containerd.io/gc.ref.content.config".to_owned(), config);
    }
    for (key, list) in [("l", "layers"), ("m", "manifests")] {
        for (i, d) in manifest[list].as_array().into_iter().flatten().enumerate() {
            if let Some(d) = digest(d) {
                labels.insert(format!("containerd.io/gc.ref.content.{key}.{i}"), d);
            }
        }
    }
    labels
}

/// The distribution source label's value with `repository` added (a comma-separated list), or
/// `None` when it is there already.
pub fn with_repository(existing: Option<&str>, repository: &str) -> Option<String> {
    match existing {
        Some(value) if value.split(',').any(|r| r == repository) => None,
        Some(value) if !value.is_empty() => Some(format!("{value},{repository}")),
        _ => Some(repository.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_docker_manifest_is_what_containerds_importer_writes() {
        // As Go marshals containerd's manifest struct: field order, no spaces, the config's
        // media type set; the builder tests compare whole images with `ctr images import`.
        let config = Descriptor {
            media_type: String::new(),
            digest: "sha256:c".into(),
            size: 206,
        };
        let layer = Descriptor {
            media_type: DOCKER_LAYER.into(),
            digest: "sha256:l".into(),
            size: 1985536,
        };
        assert_eq!(
            String::from_utf8(docker_manifest(&config, &[layer])).expect("utf-8"),
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:c","size":206},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar","digest":"sha256:l","size":1985536}]}"#
        );
    }

    #[test]
    fn reads_one_image_of_a_docker_archive() {
        let manifest =
            json!([{"Config": "./c.json", "RepoTags": ["x:1"], "Layers": ["a/layer.tar"]}]);
        assert_eq!(
            docker_image(&manifest),
            Ok(DockerImage {
                config: "c.json".into(),
                layers: vec!["a/layer.tar".into()]
            })
        );
        assert_eq!(
            docker_image(&json!([manifest[0], manifest[0]])),
            Err(ArchiveImageError::ImageCount(2))
        );
        assert!(docker_image(&json!({})).is_err());
        assert!(docker_image(&json!([{"Layers": []}])).is_err());
    }

    #[test]
    fn names_claim_digests_only_in_known_shapes() {
        let hex = "ab".repeat(32);
        for name in [
            format!("blobs/sha256/{hex}"),
            format!("./{hex}/layer.tar"),
            format!("{hex}.json"),
        ] {
            assert_eq!(named_digest(&name), Some(format!("sha256:{hex}")), "{name}");
        }
        for name in [
            "layer.tar",
            "config.json",
            "blobs/sha256/AB",
            "manifest.json",
        ] {
            assert_eq!(named_digest(name), None, "{name}");
        }
    }

    #[test]
    fn detects_layer_compression_as_containerd_does() {
        assert_eq!(
            layer_media_type("d", b"\x1f\x8b\x08\0"),
            Ok(DOCKER_LAYER_GZIP)
        );
        assert_eq!(layer_media_type("d", b"bin/\0\0"), Ok(DOCKER_LAYER));
        assert_eq!(layer_media_type("d", b""), Ok(DOCKER_LAYER));
        assert!(layer_media_type("d", b"\x28\xb5\x2f\xfd").is_err());
    }

    #[test]
    fn gc_labels_reference_config_layers_and_manifests() {
        let manifest = json!({"config": {"digest": "sha256:c"}, "layers": [{"digest": "sha256:a"}, {"digest": "sha256:b"}]});
        assert_eq!(
            gc_labels(&manifest),
            BTreeMap::from([
                (
                    "containerd.io/gc.ref.content.config".into(),
                    "sha256:c".into()
                ),
                ("containerd.io/gc.ref.content.l.0".into(), "sha256:a".into()),
                ("containerd.io/gc.ref.content.l.1".into(), "sha256:b".into()),
            ])
        );
        let index = json!({"manifests": [{"digest": "sha256:m"}]});
        assert_eq!(
            gc_labels(&index),
            BTreeMap::from([("containerd.io/gc.ref.content.m.0".into(), "sha256:m".into())])
        );
    }

    #[test]
    fn picks_the_platforms_manifest() {
        let index = json!({"manifests": [
            {"digest": "sha256:a", "size": 1, "mediaType": "m", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:b", "size": 2, "mediaType": "m", "platform": {"os": "linux", "architecture": "amd64"}},
        ]});
        assert_eq!(
            platform_manifest(&index, "amd64").map(|d| d.digest),
            Some("sha256:b".into())
        );
        assert_eq!(platform_manifest(&index, "s390x"), None);
    }

    #[test]
    fn adds_a_repository_to_the_distribution_source() {
        assert_eq!(with_repository(None, "a/b"), Some("a/b".into()));
        assert_eq!(with_repository(Some("x/y"), "a/b"), Some("x/y,a/b".into()));
        assert_eq!(with_repository(Some("x/y,a/b"), "a/b"), None);
    }
}
