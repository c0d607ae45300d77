//! Whether Nix's sandbox is in effect for a build in the Pod's own store, said in the build log
//! before the build.
//!
//! The builder image asks for the sandbox with a fallback (`sandbox = true`,
//! `sandbox-fallback = true`): Nix sandboxes a build in user, mount and PID namespaces of its
//! own, with a fresh `/proc`, where the container lets it make them, and otherwise builds
//! without the sandbox, saying so only at debug level. So the builder finds out the way Nix
//! does (Nix's `mountAndPidNamespacesSupported`): with `unshare`, a user namespace if one can be
//! made (else none, as Nix does) with the container's root mapped in it, as Nix maps it, then
//! mount and PID namespaces and a new `/proc` in them. The kernel refuses that `/proc` where
//! the container runtime masks paths of the container's `/proc` (any Pod but `procMount:
//! Unmasked`), and the mapping to a container without `CAP_SETFCAP`; the runtime's default
//! seccomp profile refuses the namespaces to a container without `CAP_SYS_ADMIN`. enbi's
//! `pod`-mode Jobs give the build container all that inside a user namespace of its own
//! (`enbi_core::job`), where it is not root on the node.
//!
//! In `node-daemon` mode the node's Nix daemon builds, and its own settings decide.

use std::process::{Command, Stdio};

use enbi_core::job::StoreMode;

use super::log::LogTail;

/// The sandbox setting as Nix reads it (`nix config show`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    /// `true`, `false` or `relaxed`.
    sandbox: String,
    fallback: bool,
}

/// What `unshare` found: `Ok` if Nix can make its namespaces here, else why not.
type Probe = Result<(), String>;

/// Where a build runs, as far as the sandbox goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sandbox {
    On,
    Off(String),
    /// Asked for without a fallback, and impossible here: Nix refuses to build.
    Impossible(String),
    /// The node's daemon decides, or Nix's settings could not be read.
    Unknown(String),
}

impl Sandbox {
    /// The value of the span attribute `enbi.sandbox`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Sandbox::On => "on",
            Sandbox::Off(_) => "off",
            Sandbox::Impossible(_) => "impossible",
            Sandbox::Unknown(_) => "unknown",
        }
    }

    /// The build log's line (after `enbi: `).
    pub fn describe(&self) -> String {
        match self {
            Sandbox::On => {
                "sandbox: on (Nix builds in user, mount and PID namespaces of its own)".into()
            }
            Sandbox::Off(why) => format!("sandbox: off ({why})"),
            Sandbox::Impossible(why) => format!(
                "sandbox: required (sandbox-fallback = false) but impossible in this container ({why}): Nix will refuse to build"
            ),
            Sandbox::Unknown(why) => format!("sandbox: {why}"),
        }
    }
}

/// Finds out and logs whether builds in `store` run in Nix's sandbox.
pub fn report(store: StoreMode, log: &LogTail) -> Sandbox {
    let sandbox = match store {
        StoreMode::NodeDaemon => Sandbox::Unknown("the node's Nix daemon decides".into()),
        StoreMode::Pod => match setting() {
            Some(setting) => decide(&setting, probe),
            None => Sandbox::Unknown("unknown (nix printed no readable configuration)".into()),
        },
    };
    log.line("enbi", &sandbox.describe());
    sandbox
}

/// The sandbox in effect, from Nix's settings and, only when they ask for it, the probe.
fn decide(setting: &Setting, probe: impl FnOnce() -> Probe) -> Sandbox {
    if setting.sandbox == "false" {
        return Sandbox::Off("sandbox = false in Nix's configuration".into());
    }
    match probe() {
        Ok(()) => Sandbox::On,
        Err(why) if setting.fallback => Sandbox::Off(format!(
            "this container does not let Nix make its namespaces: {why}; sandbox-fallback = true, so Nix builds without it"
        )),
        Err(why) => Sandbox::Impossible(why),
    }
}

/// Nix's `sandbox` and `sandbox-fallback` (`nix config show --json`; before Nix 2.20,
/// `nix show-config --json`).
fn setting() -> Option<Setting> {
    let json = [
        &["config", "show", "--json"][..],
        &["show-config", "--json"],
    ]
    .iter()
    .find_map(|args| {
        let out = Command::new("nix")
            .args(*args)
            .env_remove("NIX_REMOTE")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    })?;
    parse_setting(&json)
}

fn parse_setting(json: &[u8]) -> Option<Setting> {
    let config: serde_json::Value = serde_json::from_slice(json).ok()?;
    let sandbox = match config.get("sandbox")?.get("value")? {
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::String(s) => s.clone(),
        _ => return None,
    };
    let fallback = config
        .get("sandbox-fallback")
        .and_then(|s| s.get("value"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true);
    Some(Setting { sandbox, fallback })
}

/// Makes the namespaces Nix's sandbox needs, as Nix checks them: a user namespace if the
/// container allows one, then mount and PID namespaces with a new `/proc`. In the user namespace
/// it maps uid 0 of the container, as Nix does when it builds (its sandbox's uid is the builder's
/// root outside): the kernel allows that only with `CAP_SETFCAP`, and Nix fails the build
/// ("writing file '/proc/N/uid_map'") without falling back.
fn probe() -> Probe {
    let user = unshare(&["--user", "true"]).is_ok();
    let namespaces = ["--mount", "--pid", "--fork", "--mount-proc", "true"];
    if user {
        unshare(&[&["--user", "--map-root-user"][..], &namespaces].concat())
    } else {
        unshare(&namespaces).map_err(|why| format!("no user namespace, and {why}"))
    }
}

fn unshare(args: &[&str]) -> Probe {
    let out = Command::new("unshare")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run unshare ({e})"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default().trim();
    let why = last.strip_prefix("unshare: ").unwrap_or(last);
    Err(if why.is_empty() {
        format!("unshare {} exited with {}", args.join(" "), out.status)
    } else {
        why.to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(sandbox: &str, fallback: bool) -> Setting {
        Setting {
            sandbox: sandbox.into(),
            fallback,
        }
    }

    #[test]
    fn the_sandbox_is_on_where_nix_can_make_its_namespaces() {
        assert_eq!(decide(&setting("true", true), || Ok(())), Sandbox::On);
        assert_eq!(decide(&setting("relaxed", false), || Ok(())), Sandbox::On);
    }

    #[test]
    fn elsewhere_the_fallback_builds_without_it_or_nix_refuses() {
        let denied = || Err("unshare failed: Operation not permitted".to_owned());
        let off = decide(&setting("true", true), denied);
        assert_eq!(off.as_str(), "off");
        assert!(
            off.describe().contains("Operation not permitted"),
            "{off:?}"
        );
        assert_eq!(
            decide(&setting("true", false), denied).as_str(),
            "impossible"
        );
    }

    #[test]
    fn sandbox_false_needs_no_probe() {
        let off = decide(&setting("false", true), || panic!("probed"));
        assert_eq!(
            off.describe(),
            "sandbox: off (sandbox = false in Nix's configuration)"
        );
    }

    #[test]
    fn reads_nix_config_show() {
        let json =
            br#"{"sandbox":{"value":true,"defaultValue":true},"sandbox-fallback":{"value":false}}"#;
        assert_eq!(parse_setting(json), Some(setting("true", false)));
        let relaxed = br#"{"sandbox":{"value":"relaxed"}}"#;
        assert_eq!(parse_setting(relaxed), Some(setting("relaxed", true)));
        assert_eq!(parse_setting(b"{}"), None);
    }
}
