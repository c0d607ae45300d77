//! Nix system strings and the Kubernetes node labels they run on.
//!
//! One table maps both ways, so admission (the CRD's allowed systems), placement
//! (`kubernetes.io/arch`) and the Pod watcher (a node's arch back to a system) can never disagree.

/// A Linux Nix system a Kubernetes node can run, with its `kubernetes.io/arch` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct System {
    pub nix: &'static str,
    pub arch: &'static str,
}

/// Every Nix system enbi can place on a node. Kubernetes nodes are Linux, so only `*-linux`.
pub const SYSTEMS: &[System] = &[
    System {
        nix: "x86_64-linux",
        arch: "amd64",
    },
    System {
        nix: "aarch64-linux",
        arch: "arm64",
    },
    System {
        nix: "i686-linux",
        arch: "386",
    },
    System {
        nix: "armv7l-linux",
        arch: "arm",
    },
    System {
        nix: "riscv64-linux",
        arch: "riscv64",
    },
    System {
        nix: "powerpc64le-linux",
        arch: "ppc64le",
    },
    System {
        nix: "s390x-linux",
        arch: "s390x",
    },
    System {
        nix: "mips64el-linux",
        arch: "mips64le",
    },
    System {
        nix: "loongarch64-linux",
        arch: "loong64",
    },
];

/// The operating system every system in [`SYSTEMS`] needs (`kubernetes.io/os`).
pub const OS: &str = "linux";

/// The system named by a Nix system string, if enbi knows it.
pub fn from_nix(nix: &str) -> Option<System> {
    SYSTEMS.iter().copied().find(|s| s.nix == nix)
}

/// The Nix system for a node's `kubernetes.io/arch`, if there is one.
pub fn from_arch(arch: &str) -> Option<System> {
    SYSTEMS.iter().copied().find(|s| s.arch == arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways() {
        for (nix, arch) in [
            ("x86_64-linux", "amd64"),
            ("aarch64-linux", "arm64"),
            ("armv7l-linux", "arm"),
        ] {
            assert_eq!(from_nix(nix).map(|s| s.arch), Some(arch));
            assert_eq!(from_arch(arch).map(|s| s.nix), Some(nix));
        }
    }

    #[test]
    fn unknown_and_non_linux_are_none() {
        assert_eq!(from_nix("aarch64-darwin"), None);
        assert_eq!(from_nix("x86_64-Linux"), None);
        assert_eq!(from_arch("sparc"), None);
    }

    #[test]
    fn table_is_a_bijection() {
        for s in SYSTEMS {
            assert_eq!(from_nix(s.nix), Some(*s));
            assert_eq!(from_arch(s.arch), Some(*s));
        }
    }
}
