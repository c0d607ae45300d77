# Upstream release sources of tools the Go module proxy refuses (Timoni, Spegel), found outside
# the checkout and checked before use (sourced by tools/install and cluster/build).
# shellcheck shell=bash
#
# The tarball is looked for in, in this order:
#   $ENBI_VENDOR_DIR                                       when set (then nowhere else);
#   shared/vendor in the checkout's parent folder or any folder above it;
#   <origin>/../shared/vendor when `git remote get-url origin` is a local path (CI runs in a
#                                                          fresh clone somewhere else).

VENDOR_ROOT="$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)"

# Prints the directory that holds the vendored release sources, or nothing.
vendor_dir() {
  if [[ -n "${ENBI_VENDOR_DIR:-}" ]]; then
    echo "$ENBI_VENDOR_DIR"
    return
  fi
  # Next to the checkout, or next to a folder it sits in (a CI clone may be nested deeper).
  local dir="$VENDOR_ROOT"
  while [[ "$dir" != / ]]; do
    dir="$(dirname "$dir")"
    if [[ -d "$dir/shared/vendor" ]]; then
      (cd "$dir/shared/vendor" && pwd)
      return
    fi
  done
  local origin
  origin="$(git -C "$VENDOR_ROOT" remote get-url origin 2>/dev/null || true)"
  origin="${origin#file://}"
  # A local path (not host:path, not a URL) whose ../shared/vendor exists.
  if [[ "$origin" == /* && -d "$origin/../shared/vendor" ]]; then
    (cd "$origin/../shared/vendor" && pwd)
  fi
}

# vendored_tarball FILE: prints the path of the vendored FILE after `sha256sum -c` against the
# SHA256SUMS next to it; fails (saying where it looked) when it is missing or does not match.
vendored_tarball() {
  local tarball="$1" vendor
  vendor="$(vendor_dir)"
  if [[ -z "$vendor" ]]; then
    echo "no vendored source for $tarball: set ENBI_VENDOR_DIR to the directory holding it and SHA256SUMS
  (looked in \$ENBI_VENDOR_DIR (unset), shared/vendor next to $VENDOR_ROOT and its parents, and <git origin>/../shared/vendor)" >&2
    return 1
  fi
  local where="(ENBI_VENDOR_DIR=${ENBI_VENDOR_DIR:-unset})"
  [[ -f "$vendor/$tarball" ]] || { echo "$vendor/$tarball not found $where" >&2; return 1; }
  [[ -f "$vendor/SHA256SUMS" ]] || { echo "$vendor/SHA256SUMS not found $where" >&2; return 1; }
  grep -q " \*\?$tarball\$" "$vendor/SHA256SUMS" || { echo "$vendor/SHA256SUMS has no line for $tarball" >&2; return 1; }
  # Only the tarball's own line: the file also lists other tools' sources.
  (cd "$vendor" && grep " \*\?$tarball\$" SHA256SUMS | sha256sum -c --quiet -) >&2 ||
    { echo "$vendor/$tarball does not match its SHA256SUMS" >&2; return 1; }
  echo "$vendor/$tarball"
}
