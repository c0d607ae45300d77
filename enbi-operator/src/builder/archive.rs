//! Passes an image archive (Docker `manifest.json` or OCI `index.json` layout) through on its
//! way to containerd, with its image names removed.
//!
//! `ctr images import` (1.6) always creates the names a Docker archive's `RepoTags` carries,
//! whatever `--base-name` says, and would so overwrite an existing tag before enbi could check
//! for a conflict. Stripping the names in the stream leaves containerd only the digest
//! reference enbi asks for (`--base-name <temporary> --digests`); enbi then tags the image
//! itself. Only the two small JSON entries are rewritten; the layers stream through unchanged,
//! so the image's digests are those of the original archive.

use std::io::{self, Read, Write};

use serde_json::Value;

/// The JSON entries are small; anything larger is not an image archive.
const MAX_JSON_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "the output is not a tar archive ({0}); enbi needs a Docker or OCI image archive or a streamLayeredImage script"
    )]
    NotTar(io::Error),
    #[error(
        "the archive's {entry} is not valid JSON ({error}); it is not a Docker or OCI image archive"
    )]
    BadJson { entry: String, error: String },
    #[error(
        "the archive has neither manifest.json nor index.json; it is not a Docker or OCI image archive"
    )]
    NoManifest,
    /// Writing to containerd failed: containerd's own error says why.
    #[error("writing the image to containerd failed: {0}")]
    Write(io::Error),
}

/// Copies the tar stream `input` to `output` without image names; returns the bytes written.
pub fn strip_names(input: impl Read, output: impl Write) -> Result<u64, ArchiveError> {
    let mut input = input;
    let mut counted = Counting {
        inner: io::BufWriter::with_capacity(1 << 20, output),
        bytes: 0,
    };
    let mut seen_manifest = false;
    {
        let mut archive = tar::Archive::new(&mut input);
        let mut builder = tar::Builder::new(&mut counted);
        for entry in archive.entries().map_err(ArchiveError::NotTar)? {
            let mut entry = entry.map_err(ArchiveError::NotTar)?;
            let path = entry.path().map_err(ArchiveError::NotTar)?.into_owned();
            let mut header = entry.header().clone();
            let name = path.to_string_lossy();
            let name = name.trim_start_matches("./");
            if name == "manifest.json" || name == "index.json" {
                seen_manifest = true;
                let mut json = Vec::new();
                (&mut entry)
                    .take(MAX_JSON_BYTES)
                    .read_to_end(&mut json)
                    .map_err(ArchiveError::NotTar)?;
                let json = without_names(name, &json)?;
                header.set_size(json.len() as u64);
                builder
                    .append_data(&mut header, &path, json.as_slice())
                    .map_err(ArchiveError::Write)?;
            } else {
                builder
                    .append_data(&mut header, &path, &mut entry)
                    .map_err(|e| match e.kind() {
                        // A short entry is a broken archive; anything else is the pipe.
                        io::ErrorKind::UnexpectedEof => ArchiveError::NotTar(e),
                        _ => ArchiveError::Write(e),
                    })?;
            }
        }
        builder.finish().map_err(ArchiveError::Write)?;
    }
    // Read the source to its end (tar pads with zeros) so a producing script is not cut off.
    io::copy(&mut input, &mut io::sink()).map_err(ArchiveError::NotTar)?;
    counted.inner.flush().map_err(ArchiveError::Write)?;
    if !seen_manifest {
        return Err(ArchiveError::NoManifest);
    }
    Ok(counted.bytes)
}

/// `manifest.json` without `RepoTags`, or `index.json` without name annotations.
fn without_names(entry: &str, json: &[u8]) -> Result<Vec<u8>, ArchiveError> {
    let bad = |error: String| ArchiveError::BadJson {
        entry: entry.to_owned(),
        error,
    };
    let mut value: Value = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    if entry == "manifest.json" {
        for image in value
            .as_array_mut()
            .ok_or_else(|| bad("not a list".into()))?
        {
            if let Some(image) = image.as_object_mut() {
                image.insert("RepoTags".into(), Value::Array(vec![]));
            }
        }
    } else if let Some(manifests) = value.get_mut("manifests").and_then(Value::as_array_mut) {
        for manifest in manifests {
            if let Some(annotations) = manifest
                .get_mut("annotations")
                .and_then(Value::as_object_mut)
            {
                annotations.remove("io.containerd.image.name");
                annotations.remove("org.opencontainers.image.ref.name");
            }
        }
    }
    serde_json::to_vec(&value).map_err(|e| bad(e.to_string()))
}

struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o444);
            builder
                .append_data(&mut header, path, *data)
                .expect("append");
        }
        let mut bytes = builder.into_inner().expect("tar");
        bytes.extend([0u8; 10240]); // trailing padding, as `tar -b 20` writes
        bytes
    }

    fn entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut archive = tar::Archive::new(bytes);
        archive
            .entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("read");
                (e.path().expect("path").to_string_lossy().into_owned(), data)
            })
            .collect()
    }

    #[test]
    fn strips_repo_tags_and_keeps_layers() {
        let long = format!("{}/layer.tar", "a".repeat(120));
        let manifest = format!(
            r#"[{{"Config":"config.json","RepoTags":["docker.io/library/x:1"],"Layers":["{long}"]}}]"#
        );
        let layer = vec![7u8; 100_000];
        let input = tar(&[
            (long.as_str(), &layer),
            ("config.json", b"{}"),
            ("manifest.json", manifest.as_bytes()),
        ]);
        let mut out = Vec::new();
        let written = strip_names(input.as_slice(), &mut out).expect("rewrites");
        assert_eq!(written, out.len() as u64);
        let got = entries(&out);
        assert_eq!(got[0], (long.clone(), layer));
        assert_eq!(got[1], ("config.json".into(), b"{}".to_vec()));
        let manifest: Value = serde_json::from_slice(&got[2].1).expect("json");
        assert_eq!(manifest[0]["RepoTags"], serde_json::json!([]));
        assert_eq!(manifest[0]["Layers"][0], long.as_str());
    }

    #[test]
    fn strips_oci_name_annotations() {
        let index = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:ab","annotations":{"io.containerd.image.name":"docker.io/library/x:1","org.opencontainers.image.ref.name":"1","keep":"me"}}]}"#;
        let mut out = Vec::new();
        strip_names(tar(&[("index.json", index)]).as_slice(), &mut out).expect("rewrites");
        let index: Value = serde_json::from_slice(&entries(&out)[0].1).expect("json");
        assert_eq!(
            index["manifests"][0]["annotations"],
            serde_json::json!({"keep": "me"})
        );
    }

    #[test]
    fn refuses_what_is_not_an_image_archive() {
        let mut out = Vec::new();
        assert!(matches!(
            strip_names(&b"#!/bin/sh\necho hello\n"[..], &mut out),
            Err(ArchiveError::NotTar(_) | ArchiveError::NoManifest)
        ));
        assert!(matches!(
            strip_names(tar(&[("hello.txt", b"hi")]).as_slice(), &mut out),
            Err(ArchiveError::NoManifest)
        ));
        assert!(matches!(
            strip_names(tar(&[("manifest.json", b"nope")]).as_slice(), &mut out),
            Err(ArchiveError::BadJson { .. })
        ));
    }
}
