//! The build's fetch credentials (`build --fetch-credentials`, the copy of the Secret a NixBuild
//! names): copied into a private directory, since ssh refuses a key that others can read, and
//! turned into what nix and git read. Nix fetches flakes in this process, also with the node's
//! daemon, so the settings reach every fetch of the flake and its inputs:
//! - `access-tokens`: nix's setting of that name (GitHub, GitLab, Gitea APIs);
//! - `netrc`: nix's `netrc-file`, and `$HOME/.netrc` for git over HTTP(S) (curl reads it there);
//! - `ssh-privatekey` and `known_hosts`: git's `GIT_SSH_COMMAND`, with host keys checked.
//!
//! Only key names are ever logged.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use enbi_core::fetch::{ACCESS_TOKENS, KEYS, KNOWN_HOSTS, NETRC, SSH_PRIVATE_KEY};

/// The private copy (removed on drop), and what nix runs with.
#[derive(Debug)]
pub struct Credentials {
    _dir: tempfile::TempDir,
    /// Lines of nix's configuration (`NIX_CONFIG`).
    pub settings: Vec<String>,
    /// More environment of nix (and the git and ssh it runs).
    pub env: Vec<(String, String)>,
    /// The keys found, for the log.
    pub keys: Vec<&'static str>,
}

/// Reads the credentials mounted in `mounted`.
pub fn prepare(mounted: &Path) -> io::Result<Credentials> {
    let dir = tempfile::Builder::new().prefix("enbi-fetch-").tempdir()?;
    let home = dir.path().join("home");
    std::fs::create_dir(&home)?;
    let mut keys = vec![];
    for key in KEYS {
        match std::fs::read(mounted.join(key)) {
            Ok(bytes) => {
                private_file(&dir.path().join(key), &bytes)?;
                if key == NETRC {
                    private_file(&home.join(".netrc"), &bytes)?;
                }
                keys.push(key);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let path = |key: &str| dir.path().join(key).display().to_string();
    let mut settings = vec![];
    if keys.contains(&ACCESS_TOKENS) {
        let tokens = std::fs::read_to_string(dir.path().join(ACCESS_TOKENS))?;
        let tokens: Vec<&str> = tokens.split_whitespace().collect();
        settings.push(format!("access-tokens = {}", tokens.join(" ")));
    }
    let mut env = vec![];
    if keys.contains(&NETRC) {
        settings.push(format!("netrc-file = {}", path(NETRC)));
        env.push(("HOME".to_owned(), home.display().to_string()));
    }
    if keys.contains(&SSH_PRIVATE_KEY) {
        env.push((
            "GIT_SSH_COMMAND".to_owned(),
            format!(
                "ssh -F none -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} \
                 -o StrictHostKeyChecking=yes -o BatchMode=yes",
                path(SSH_PRIVATE_KEY),
                path(KNOWN_HOSTS)
            ),
        ));
    }
    Ok(Credentials {
        _dir: dir,
        settings,
        env,
        keys,
    })
}

/// A file only this user can read (ssh insists on it for keys).
fn private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn each_key_becomes_what_nix_and_git_read() {
        let mounted = tempfile::tempdir().unwrap();
        let write = |k: &str, v: &str| std::fs::write(mounted.path().join(k), v).unwrap();
        write(
            ACCESS_TOKENS,
            "github.com=ghp_x\ngitlab.example=PAT:glpat-y\n",
        );
        write(NETRC, "machine git.example login u password p\n");
        write(SSH_PRIVATE_KEY, "KEY");
        write(KNOWN_HOSTS, "[git.example]:2222 ssh-ed25519 AAAA\n");
        let credentials = prepare(mounted.path()).unwrap();
        assert_eq!(credentials.keys, KEYS);
        let env: std::collections::BTreeMap<_, _> = credentials.env.iter().cloned().collect();
        let config = &credentials.settings.join("\n");
        assert!(
            config.contains("access-tokens = github.com=ghp_x gitlab.example=PAT:glpat-y"),
            "{config}"
        );
        let netrc = config
            .lines()
            .find_map(|l| l.strip_prefix("netrc-file = "))
            .unwrap();
        let home_netrc = Path::new(&env["HOME"]).join(".netrc");
        for file in [Path::new(netrc), &home_netrc] {
            assert_eq!(
                std::fs::read_to_string(file).unwrap(),
                "machine git.example login u password p\n"
            );
            let mode = std::fs::metadata(file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
        let ssh = &env["GIT_SSH_COMMAND"];
        assert!(ssh.contains("StrictHostKeyChecking=yes"), "{ssh}");
        assert!(!ssh.contains("KEY") && !config.contains("KEY"));
    }

    #[test]
    fn without_keys_nothing_changes() {
        let mounted = tempfile::tempdir().unwrap();
        let credentials = prepare(mounted.path()).unwrap();
        assert!(credentials.keys.is_empty());
        assert!(credentials.settings.is_empty() && credentials.env.is_empty());
    }
}
