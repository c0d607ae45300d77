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

/// The JSON entries and extension headers are small; anything larger is not an image archive.
const MAX_SMALL_BYTES: u64 = 16 * 1024 * 1024;
/// Entry data is copied in blocks this large: few system calls, full pipes.
const COPY_BYTES: usize = 1 << 20;
const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "the output is not a tar archive ({0}); enbi needs a Docker or OCI image archive or a streamLayeredImage script"
    )]
    NotTar(String),
    #[error(
        "the archive's {entry} is not valid JSON ({error}); it is not a Docker or OCI image archive"
    )]
    BadJson { entry: String, error: String },
    #[error(
        "the archive has neither manifest.json nor index.json; it is not a Docker or OCI image archive"
    )]
    NoManifest,
    /// The stream ended early: the image script in the build container failed or was killed.
    #[error(
        "the image stream {0}: the image script failed or was killed; see the build container's log"
    )]
    CutShort(&'static str),
    #[error("the image is over the {0}-byte limit (--max-image-bytes, ENBI_MAX_IMAGE_BYTES)")]
    TooLarge(u64),
    /// Reading the image failed.
    #[error("reading the image failed: {0}")]
    Read(io::Error),
    /// Writing to containerd failed: containerd's own error says why.
    #[error("writing the image to containerd failed: {0}")]
    Write(io::Error),
}

/// Copies the tar stream `input` to `output` without image names; returns the bytes written.
/// The stream comes from the flake's code: it must be a well-formed tar of at most `limit`
/// bytes, every JSON entry small and valid.
///
/// A small tar reader of its own rather than the `tar` crate's entry API: entry data is copied
/// in 1 MiB blocks straight from one pipe to the other (the crate copies in 8 KiB steps
/// through two buffers), so enbi adds no measurable time to a plain `script | ctr` pipe.
/// Extension headers (GNU long names, PAX) pass through with their entry, and are dropped
/// with a rewritten JSON entry, whose new header needs none.
pub fn strip_names(
    input: impl Read,
    mut output: impl Write,
    limit: u64,
) -> Result<u64, ArchiveError> {
    // One byte over the limit is enough to know.
    let mut input = input.take(limit.saturating_add(1));
    let mut written = 0u64;
    let mut buffer = vec![0u8; COPY_BYTES];
    let mut pending: Vec<u8> = Vec::new();
    let mut long_name: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut seen_manifest = false;
    let mut emit = |bytes: &[u8], written: &mut u64| -> Result<(), ArchiveError> {
        output.write_all(bytes).map_err(ArchiveError::Write)?;
        *written += bytes.len() as u64;
        Ok(())
    };
    let mut first = true;
    loop {
        let mut header = [0u8; BLOCK];
        if !read_block(&mut input, &mut header)? {
            if first {
                return Err(ArchiveError::CutShort("is empty"));
            }
            if input.limit() == 0 {
                return Err(ArchiveError::TooLarge(limit));
            }
            return Err(ArchiveError::CutShort("ended before the archive's end"));
        }
        first = false;
        if header.iter().all(|b| *b == 0) {
            break;
        }
        if !checksum_ok(&header) {
            return Err(ArchiveError::NotTar("a header's checksum is wrong".into()));
        }
        let size = pax_size.take().unwrap_or(octal(&header[124..136])?);
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        // GNU long name or link name, PAX extended header: kept for the next entry.
        let kind = header[156];
        if matches!(kind, b'L' | b'K' | b'x') {
            let data = read_small(&mut input, padded)?;
            let body = &data[..size as usize];
            if kind == b'L' {
                long_name = Some(cstr(body));
            } else if kind == b'x' {
                let (path, pax) = pax_records(body);
                long_name = path.or(long_name);
                pax_size = pax;
            }
            pending.extend_from_slice(&header);
            pending.extend_from_slice(&data);
            continue;
        }
        let name = long_name.take().unwrap_or_else(|| header_name(&header));
        let name = name.trim_start_matches("./");
        let regular = matches!(header[156], b'0' | 0);
        if regular && (name == "manifest.json" || name == "index.json") {
            seen_manifest = true;
            let data = read_small(&mut input, padded)?;
            let json = without_names(name, &data[..size as usize])?;
            let mut header = header;
            set_size(&mut header, json.len() as u64);
            pending.clear();
            emit(&header, &mut written)?;
            emit(&json, &mut written)?;
            let pad = (BLOCK - json.len() % BLOCK) % BLOCK;
            emit(&[0u8; BLOCK][..pad], &mut written)?;
            continue;
        }
        emit(&pending, &mut written)?;
        pending.clear();
        emit(&header, &mut written)?;
        let mut left = padded;
        while left > 0 {
            let want = buffer
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match input.read(&mut buffer[..want]) {
                Ok(0) if input.limit() == 0 => return Err(ArchiveError::TooLarge(limit)),
                Ok(0) => return Err(ArchiveError::CutShort("ended inside an entry")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ArchiveError::Read(e)),
            };
            emit(&buffer[..n], &mut written)?;
            left -= n as u64;
        }
    }
    emit(&[0u8; 2 * BLOCK], &mut written)?;
    output.flush().map_err(ArchiveError::Write)?;
    // Read the source to its end (tar pads with zeros) so a producing script is not cut off.
    io::copy(&mut input, &mut io::sink()).map_err(ArchiveError::Read)?;
    if input.limit() == 0 {
        return Err(ArchiveError::TooLarge(limit));
    }
    if !seen_manifest {
        return Err(ArchiveError::NoManifest);
    }
    Ok(written)
}

/// Reads one block; false at a clean end of input.
fn read_block(input: &mut impl Read, block: &mut [u8; BLOCK]) -> Result<bool, ArchiveError> {
    let mut got = 0;
    while got < BLOCK {
        match input.read(&mut block[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ArchiveError::CutShort("ended inside a header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ArchiveError::Read(e)),
        }
    }
    Ok(true)
}

fn read_small(input: &mut impl Read, padded: u64) -> Result<Vec<u8>, ArchiveError> {
    if padded > MAX_SMALL_BYTES {
        return Err(ArchiveError::NotTar(format!(
            "a metadata entry of {padded} bytes"
        )));
    }
    let mut data = vec![0u8; padded as usize];
    input.read_exact(&mut data).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ArchiveError::CutShort("ended inside a metadata entry"),
        _ => ArchiveError::Read(e),
    })?;
    Ok(data)
}

/// Whether a 512-byte tar header's checksum field matches its contents (the checksum field
/// itself counted as spaces). Also how the output detector recognises an old-style tar.
pub(super) fn checksum_ok(header: &[u8; BLOCK]) -> bool {
    let stored = octal(&header[148..156]).ok();
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(*b)
            }
        })
        .sum();
    stored == Some(sum)
}

/// A numeric header field: octal text, or GNU base-256 for large values.
fn octal(field: &[u8]) -> Result<u64, ArchiveError> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        return Ok(field[1..]
            .iter()
            .fold(0u64, |n, b| (n << 8) | u64::from(*b)));
    }
    let text =
        std::str::from_utf8(field).map_err(|_| ArchiveError::NotTar("a bad number".into()))?;
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| ArchiveError::NotTar(format!("a bad number {text:?}")))
}

fn set_size(header: &mut [u8; BLOCK], size: u64) {
    header[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    header[148..156].copy_from_slice(b"        ");
    let sum: u64 = header.iter().map(|b| u64::from(*b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// ustar prefix and name.
fn header_name(header: &[u8; BLOCK]) -> String {
    let name = cstr(&header[0..100]);
    let prefix = if &header[257..262] == b"ustar" {
        cstr(&header[345..500])
    } else {
        String::new()
    };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// `path` and `size` of PAX records (`<len> <key>=<value>\n`).
fn pax_records(body: &[u8]) -> (Option<String>, Option<u64>) {
    let (mut path, mut size) = (None, None);
    for record in String::from_utf8_lossy(body).split('\n') {
        if let Some((_, kv)) = record.split_once(' ')
            && let Some((k, v)) = kv.split_once('=')
        {
            match k {
                "path" => path = Some(v.to_owned()),
                "size" => size = v.parse().ok(),
                _ => {}
            }
        }
    }
    (path, size)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = if path.len() > 100 {
                tar::Header::new_gnu()
            } else {
                tar::Header::new_ustar()
            };
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
        let written = strip_names(input.as_slice(), &mut out, u64::MAX).expect("rewrites");
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
        strip_names(tar(&[("index.json", index)]).as_slice(), &mut out, u64::MAX)
            .expect("rewrites");
        let index: Value = serde_json::from_slice(&entries(&out)[0].1).expect("json");
        assert_eq!(
            index["manifests"][0]["annotations"],
            serde_json::json!({"keep": "me"})
        );
    }

    #[test]
    fn refuses_what_is_not_an_image_archive() {
        let strip = |bytes: &[u8]| strip_names(bytes, Vec::new(), u64::MAX);
        assert!(matches!(
            strip(&b"#!/bin/sh\necho hello\n"[..]),
            Err(ArchiveError::CutShort(_))
        ));
        assert!(matches!(strip(&[b'x'; 1024]), Err(ArchiveError::NotTar(_))));
        assert!(matches!(
            strip(&tar(&[("hello.txt", b"hi")])),
            Err(ArchiveError::NoManifest)
        ));
        assert!(matches!(
            strip(&tar(&[("manifest.json", b"nope")])),
            Err(ArchiveError::BadJson { .. })
        ));
        assert!(matches!(
            strip(&[]),
            Err(ArchiveError::CutShort("is empty"))
        ));
        let whole = tar(&[("config.json", &[1u8; 4096]), ("manifest.json", b"[]")]);
        assert!(matches!(
            strip(&whole[..3000]),
            Err(ArchiveError::CutShort(_))
        ));
    }

    #[test]
    fn refuses_images_over_the_limit() {
        let input = tar(&[("layer.tar", &[7u8; 10_000]), ("manifest.json", b"[]")]);
        let size = input.len() as u64;
        assert!(strip_names(input.as_slice(), Vec::new(), size).is_ok());
        assert!(matches!(
            strip_names(input.as_slice(), Vec::new(), 5000),
            Err(ArchiveError::TooLarge(5000))
        ));
        // Padding past the end counts too: an endless stream of zeros is refused.
        assert!(matches!(
            strip_names(input.as_slice(), Vec::new(), size - 1),
            Err(ArchiveError::TooLarge(_))
        ));
    }
}
