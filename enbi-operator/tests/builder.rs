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
use enbi_core::result::{BuildReport, FailureReport, ImageReport};
use enbi_tests::host::{Containerd, Fixture, NIX_CONFIG};

macro_rules! require_tools {
    () => {
        if !enbi_tests::host::tools() {
            return;
        }
    };
}

/// Runs `enbi-operator build` and returns its exit success, report and stdout.
fn build(
    containerd: &Path,
    flake_url: &str,
    package: &str,
    tag: &str,
    extra: &[&str],
) -> (bool, BuildReport, String) {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let termination_log = out_dir.path().join("termination-log");
    let output = Command::new(env!("CARGO_BIN_EXE_enbi-operator"))
        .args(["build", "--flake-url", flake_url, "--package-name", package])
        .args(["--system", &system(), "--image-tag", tag])
        .arg("--containerd-address")
        .arg(containerd)
        .arg("--termination-log")
        .arg(&termination_log)
        .args(extra)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .expect("enbi-operator runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let text = std::fs::read_to_string(&termination_log)
        .unwrap_or_else(|e| panic!("no report ({e}); stdout: {stdout}"));
    assert!(text.len() <= 4096);
    let report = BuildReport::parse(&text).expect("report parses");
    (output.status.success(), report, stdout)
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
        labels.contains(&format!("enbi.hrzn.ee/store-path={}", image.store_path)),
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

    let failure = failed(build(
        &socket,
        "not a flake",
        "stream",
        "enbi-test/f:v1",
        &[],
    ));
    assert!(
        failure
            .message
            .starts_with("invalid build input: flake_url"),
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
    let env = BTreeMap::from([
        ("ENBI_FLAKE_URL", flake.url()),
        ("ENBI_PACKAGE_NAME", "archive".into()),
        ("ENBI_SYSTEM", system()),
        ("ENBI_IMAGE_TAG", "enbi-test/env:v1".into()),
        (
            "ENBI_CONTAINERD_ADDRESS",
            ctd.socket().display().to_string(),
        ),
        ("ENBI_CONTAINERD_NAMESPACE", "k8s.io".into()),
        ("ENBI_STORE", "pod".into()),
        ("ENBI_PIN", "true".into()),
        (
            "ENBI_TERMINATION_LOG",
            termination_log.display().to_string(),
        ),
    ]);
    let status = Command::new(env!("CARGO_BIN_EXE_enbi-operator"))
        .arg("build")
        .envs(env)
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdout(Stdio::null())
        .status()
        .expect("runs");
    assert!(status.success());
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
