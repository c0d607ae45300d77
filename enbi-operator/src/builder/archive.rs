//! Reads an image archive (Docker `manifest.json` or OCI `index.json` layout) as it streams
//! from the build container, entry by entry, for the import to write into containerd.
//!
//! The stream comes from the flake's code: it must be a well-formed tar of bounded size, its
//! `manifest.json`/`index.json` small and valid JSON. The archive's own image names are never
//! used (the import names the image itself), so an archive cannot overwrite a tag.

use std::io::{self, Read};

use serde_json::Value;

/// The JSON entries and extension headers are small; anything larger is not an image archive.
const MAX_SMALL_BYTES: u64 = 16 * 1024 * 1024;
/// Entry data is read in blocks this large: few system calls, full pipes.
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
    /// Whoever took the entries stopped (its own error says why).
    #[error("the import stopped taking the image")]
    Stopped,
}

/// What the archive holds, in stream order.
#[derive(Debug)]
pub enum Entry {
    /// A regular file begins (its data follows, then [`Entry::End`]).
    File {
        name: String,
        size: u64,
    },
    Data(Vec<u8>),
    End,
    /// `manifest.json` or `index.json`, parsed (instead of `File`).
    Index {
        name: String,
        json: Value,
    },
}

/// Reads the tar stream `input` (at most `limit` bytes) and hands each entry to `take`;
/// returns the bytes read. Errors of `take` stop the reading ([`ArchiveError::Stopped`]).
///
/// A small tar reader of its own rather than the `tar` crate's entry API: entry data moves in
/// 1 MiB blocks (the crate copies in 8 KiB steps through two buffers). GNU long names and PAX
/// headers are understood.
pub fn read_entries(
    input: impl Read,
    limit: u64,
    mut take: impl FnMut(Entry) -> Result<(), ArchiveError>,
) -> Result<u64, ArchiveError> {
    // One byte over the limit is enough to know.
    let mut input = input.take(limit.saturating_add(1));
    let mut long_name: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut seen_manifest = false;
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
            continue;
        }
        let name = long_name.take().unwrap_or_else(|| header_name(&header));
        let name = name.trim_start_matches("./").to_owned();
        let regular = matches!(kind, b'0' | 0);
        if regular && (name == "manifest.json" || name == "index.json") {
            seen_manifest = true;
            let data = read_small(&mut input, padded)?;
            let json = serde_json::from_slice(&data[..size as usize]).map_err(|e| {
                ArchiveError::BadJson {
                    entry: name.clone(),
                    error: e.to_string(),
                }
            })?;
            take(Entry::Index { name, json })?;
            continue;
        }
        if regular {
            take(Entry::File { name, size })?;
        }
        let mut left = size;
        while left > 0 {
            let want = COPY_BYTES.min(usize::try_from(left).unwrap_or(usize::MAX));
            let mut buffer = vec![0u8; want];
            let n = match input.read(&mut buffer) {
                Ok(0) if input.limit() == 0 => return Err(ArchiveError::TooLarge(limit)),
                Ok(0) => return Err(ArchiveError::CutShort("ended inside an entry")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ArchiveError::Read(e)),
            };
            buffer.truncate(n);
            left -= n as u64;
            if regular {
                take(Entry::Data(buffer))?;
            }
        }
        skip(&mut input, padded - size, limit)?;
        if regular {
            take(Entry::End)?;
        }
    }
    // Read the source to its end (tar pads with zeros) so a producing script is not cut off.
    io::copy(&mut input, &mut io::sink()).map_err(ArchiveError::Read)?;
    if input.limit() == 0 {
        return Err(ArchiveError::TooLarge(limit));
    }
    if !seen_manifest {
        return Err(ArchiveError::NoManifest);
    }
    Ok(limit.saturating_add(1) - input.limit())
}

/// Skips an entry's padding.
fn skip(input: &mut io::Take<impl Read>, bytes: u64, limit: u64) -> Result<(), ArchiveError> {
    let mut pad = [0u8; BLOCK];
    let bytes = bytes as usize;
    input
        .read_exact(&mut pad[..bytes])
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof if input.limit() == 0 => ArchiveError::TooLarge(limit),
            io::ErrorKind::UnexpectedEof => ArchiveError::CutShort("ended inside an entry"),
            _ => ArchiveError::Read(e),
        })
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

    /// The files and JSON entries `read_entries` hands over.
    fn read(bytes: &[u8], limit: u64) -> Result<Vec<(String, Vec<u8>)>, ArchiveError> {
        let mut got: Vec<(String, Vec<u8>)> = vec![];
        read_entries(bytes, limit, |entry| {
            match entry {
                Entry::File { name, size } => got.push((name, Vec::with_capacity(size as usize))),
                Entry::Data(data) => got.last_mut().expect("a file").1.extend(data),
                Entry::End => {}
                Entry::Index { name, json } => got.push((name, json.to_string().into_bytes())),
            }
            Ok(())
        })?;
        Ok(got)
    }

    #[test]
    fn reads_files_and_the_manifest() {
        let long = format!("{}/layer.tar", "a".repeat(120));
        let manifest = format!(r#"[{{"Config":"config.json","Layers":["{long}"]}}]"#);
        let layer = vec![7u8; 3_000_000];
        let input = tar(&[
            (long.as_str(), &layer),
            ("./config.json", b"{}"),
            ("manifest.json", manifest.as_bytes()),
        ]);
        let got = read(&input, u64::MAX).expect("reads");
        assert_eq!(got[0], (long.clone(), layer));
        assert_eq!(got[1], ("config.json".into(), b"{}".to_vec()));
        let json: Value = serde_json::from_slice(&got[2].1).expect("json");
        assert_eq!(json[0]["Layers"][0], long.as_str());
        let mut stopped = 0;
        let result = read_entries(input.as_slice(), u64::MAX, |_| {
            stopped += 1;
            Err(ArchiveError::Stopped)
        });
        assert!(matches!(result, Err(ArchiveError::Stopped)));
        assert_eq!(stopped, 1);
    }

    #[test]
    fn refuses_what_is_not_an_image_archive() {
        let strip = |bytes: &[u8]| read(bytes, u64::MAX);
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
        assert!(read(&input, size).is_ok());
        assert!(matches!(
            read(&input, 5000),
            Err(ArchiveError::TooLarge(5000))
        ));
        // Padding past the end counts too: an endless stream of zeros is refused.
        assert!(matches!(
            read(&input, size - 1),
            Err(ArchiveError::TooLarge(_))
        ));
    }
}
