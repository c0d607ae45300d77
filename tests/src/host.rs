//! The builder's host tools for tests that run it for real: a private containerd per test and
//! the offline fixture flake (`tests/fixtures/images`: no nixpkgs, no network; a static busybox
//! makes the images). Without nix, containerd, ctr, runc or a static busybox, [`tools`] fails
//! in CI (`CI=true`) and elsewhere prints a loud `SKIPPED` line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const NIX_CONFIG: &str = "experimental-features = nix-command flakes\nbuild-users-group =\nsandbox = false\nsubstituters =";
pub const BUSYBOX: &str = "/bin/busybox";

pub fn find(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// Whether the tools are here; fails in CI and says SKIPPED elsewhere when not.
pub fn tools() -> bool {
    let missing: Vec<&str> = [
        "nix",
        "containerd",
        "ctr",
        "runc",
        "containerd-shim-runc-v2",
    ]
    .into_iter()
    .filter(|p| find(p).is_none())
    .chain((!Path::new(BUSYBOX).is_file()).then_some(BUSYBOX))
    .collect();
    if missing.is_empty() {
        return true;
    }
    crate::unavailable(
        "the builder's tools",
        &format!(
            "missing {} (install tests/cluster/debian-packages)",
            missing.join(", ")
        ),
    )
}

/// A containerd of the test's own, stopped when dropped.
#[derive(Debug)]
pub struct Containerd {
    pub dir: TempDir,
    child: Child,
}

impl Containerd {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"{debug}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            debug = d.join("debug.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config).expect("config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd starts");
        let containerd = Containerd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !containerd.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up: {}",
                std::fs::read_to_string(containerd.dir.path().join("containerd.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        containerd
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr runs")
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `(digest, labels)` of the image named exactly `name`.
    pub fn image(&self, name: &str) -> Option<(String, String)> {
        let out = self.ctr_ok(&["images", "ls", &format!("name=={name}")]);
        out.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&name)).then(|| {
                (
                    fields[2].to_owned(),
                    fields.last().copied().unwrap_or_default().to_owned(),
                )
            })
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.ctr_ok(&["images", "ls", "--quiet"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn content_labels(&self, digest: &str) -> String {
        self.ctr_ok(&["content", "ls", &format!("digest=={digest}")])
    }

    /// What the image prints when run.
    pub fn run(&self, image: &str, id: &str) -> String {
        self.ctr_ok(&["run", "--rm", image, id])
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a builder Pod's two containers did, run as local processes.
#[derive(Debug)]
pub struct BuilderRun {
    /// Whether `enbi-operator build` (the build container) exited 0.
    pub built: bool,
    /// Whether `enbi-operator load` (the load container) exited 0.
    pub loaded: bool,
    /// The load container's report (its termination message).
    pub report: String,
    /// Both containers' stdout: the build container's first.
    pub log: String,
}

/// Runs a builder Pod's containers as the Job does, sharing an image pipe in a temp dir:
/// `enbi-operator build ARGS` and `enbi-operator load --containerd-address SOCKET ARGS`.
pub fn run_builder(
    binary: &Path,
    containerd: &Path,
    build_args: &[&str],
    load_args: &[&str],
    env: &[(&str, String)],
) -> BuilderRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipe = dir.path().join("image");
    let report = dir.path().join("report");
    let spawn = |args: &[&str], extra: &[&std::ffi::OsStr]| {
        Command::new(binary)
            .args(args)
            .arg("--image-pipe")
            .arg(&pipe)
            .args(extra)
            .env("NIX_CONFIG", NIX_CONFIG)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .spawn()
            .expect("enbi-operator runs")
    };
    let loader = spawn(
        load_args,
        &[
            "--containerd-address".as_ref(),
            containerd.as_os_str(),
            "--termination-log".as_ref(),
            report.as_os_str(),
        ],
    );
    let build = spawn(build_args, &[]);
    let build = build.wait_with_output().expect("build runs");
    let loader = loader.wait_with_output().expect("load runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&loader.stdout)
    );
    let report =
        std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("no report ({e}); log:\n{log}"));
    BuilderRun {
        built: build.status.success(),
        loaded: loader.status.success(),
        report,
        log,
    }
}

/// The fixture flake, copied (flakes in a git repository only see tracked files) next to a
/// static busybox.
#[derive(Debug)]
pub struct Fixture {
    pub dir: TempDir,
}

impl Fixture {
    /// A fresh copy of `tests/fixtures/images` (a test-only helper: a failed copy panics, so
    /// no `Default`).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self::of("images", &["flake.nix", "parts.sh"])
    }

    /// A fresh copy of `files` of `tests/fixtures/<name>`, next to `bin/busybox`.
    pub fn of(name: &str, files: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name);
        for file in files {
            std::fs::copy(src.join(file), dir.path().join(file)).expect("copy fixture");
        }
        std::fs::create_dir(dir.path().join("bin")).expect("bin");
        std::fs::copy(BUSYBOX, dir.path().join("bin/busybox")).expect("copy busybox");
        Fixture { dir }
    }

    /// [`Fixture::new`] whose images are unlike any other run's (a label in their config), so
    /// their image IDs are new to every node.
    pub fn salted(salt: &str) -> Self {
        let fixture = Self::new();
        std::fs::write(fixture.dir.path().join("salt"), salt).expect("write the salt");
        fixture
    }

    pub fn url(&self) -> String {
        format!("path:{}", self.dir.path().display())
    }
}
