#!/usr/bin/env bash
# Benchmarks the builder's import against plain `ctr images import` of the same image.
#
# Usage: bench/builder-import.sh [runs]        (default 3 runs; needs root, nix, containerd)
#
# Builds the fixture's 200 MiB four-layer `stream-layers` image (layers named by their checksum,
# as streamLayeredImage writes them) and `stream-layers-changed` (its top 10 MiB layer changed)
# once, then, each run on a fresh private containerd (so nothing is deduplicated):
#   - baseline: `ctr images import` of the image from a ready file (written beforehand, untimed),
#     then of the changed image's file (a re-load);
#   - pipe: the stream script piped straight into `ctr images import -` (no enbi);
#   - enbi: a builder Pod's two containers as local processes: `enbi-operator build` runs the
#     stream script into a FIFO, `enbi-operator load` reads it, checks it and loads it into
#     containerd; then the same for the changed image (P1b: a re-load).
# Prints the import times, their ratio (throughput of enbi / baseline, goal >= 1.2), the re-load
# against the full load (goal <= 0.25), the bytes the builder's process tree wrote to storage
# (goal 0; /proc/<pid>/io write_bytes, sampled), and a warm rebuild of the unchanged flake with
# the image present (the loader's importMs, goal <= 0.2 s, and the whole wall time).
# Set ENBI_BIN to use a prebuilt binary; otherwise a release build is made. containerd and ctr
# are the first on PATH (put a containerd 2.x bin dir first to measure 2.x).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
export NIX_CONFIG=$'experimental-features = nix-command flakes\nbuild-users-group =\nsandbox = false\nsubstituters ='
system=$( [[ $(uname -m) == aarch64 ]] && echo aarch64-linux || echo x86_64-linux )

if [[ -z "${ENBI_BIN:-}" ]]; then
  cargo build --release -p enbi-operator >&2
  ENBI_BIN=$PWD/target/release/enbi-operator
fi

work=$(mktemp -d)
ctd_pid=
stop_containerd() {
  if [[ -n "$ctd_pid" ]]; then
    kill "$ctd_pid" 2>/dev/null || true
    wait "$ctd_pid" 2>/dev/null || true
    ctd_pid=
  fi
}
cleanup() { stop_containerd; rm -rf "$work"; }
trap cleanup EXIT

sock=$work/ctd/containerd.sock
ctr() { command ctr --address "$sock" --namespace k8s.io "$@"; }
start_containerd() {
  stop_containerd
  rm -rf "$work/ctd"
  mkdir -p "$work/ctd"
  cat >"$work/ctd/config.toml" <<EOF
version = 2
root = "$work/ctd/root"
state = "$work/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = "$work/ctd/debug.sock"
EOF
  containerd --config "$work/ctd/config.toml" >"$work/ctd/log" 2>&1 &
  ctd_pid=$!
  for _ in $(seq 100); do ctr version >/dev/null 2>&1 && return; sleep 0.1; done
  echo "containerd did not start; see $work/ctd/log" >&2
  exit 1
}

now_ms() { date +%s%3N; }

# Sum of write_bytes over a process and its descendants, sampled until it exits.
declare -A written
sample_tree() {
  local pid
  for pid in "$@"; do
    local io=/proc/$pid/io
    if [[ -r $io ]]; then
      local w
      w=$(awk '/^write_bytes/ {print $2}' "$io" 2>/dev/null || true)
      [[ -n "$w" && "$w" -gt "${written[$pid]:-0}" ]] && written[$pid]=$w
    fi
    # shellcheck disable=SC2046
    sample_tree $(pgrep -P "$pid" || true)
  done
}

fixture=$work/fixture
mkdir -p "$fixture/bin"
cp tests/fixtures/images/flake.nix tests/fixtures/images/parts.sh "$fixture/"
cp /bin/busybox "$fixture/bin/busybox"
flake=path:$fixture
echo "building the fixture images (200 MiB of random layer data in four layers)..." >&2
out() { nix build --json --no-link "$flake#packages.$system.$1" | sed -E 's/.*"out":"([^"]+)".*/\1/'; }
script=$(out stream-layers)
"$script" >"$work/big.tar"
"$(out stream-layers-changed)" >"$work/changed.tar"
size=$(stat -c %s "$work/big.tar")

# enbi REPORT [PACKAGE]: the build and load containers, sharing an image pipe, as in a builder
# Pod (PACKAGE: stream-layers).
enbi() {
  rm -f "$work/image" "$work/image.loader-exited"
  "$ENBI_BIN" load --image-pipe "$work/image" --image-tag bench/big:v1 --allow-overwrite \
    --containerd-address "$sock" --termination-log "$1" >/dev/null &
  local loader=$!
  "$ENBI_BIN" build --image-pipe "$work/image" --flake-url "$flake" \
    --package-name "${2:-stream-layers}" --system "$system" >/dev/null
  wait "$loader"
}
import_ms() { sed -E 's/.*"importMs":([0-9]+).*/\1/' "$1"; }

# Timed runs, alternating which goes first; nothing else runs meanwhile.
base_ms=() rebase_ms=() pipe_ms=() enbi_ms=() reload_ms=()
for run in $(seq "$runs"); do
  for which in $( (( run % 2 )) && echo "base pipe enbi" || echo "enbi pipe base"); do
    start_containerd
    if [[ $which == base ]]; then
      t0=$(now_ms)
      ctr images import --base-name bench --digests "$work/big.tar" >/dev/null
      base_ms+=($(( $(now_ms) - t0 )))
      t0=$(now_ms)
      ctr images import --base-name bench --digests "$work/changed.tar" >/dev/null
      rebase_ms+=($(( $(now_ms) - t0 )))
    elif [[ $which == pipe ]]; then
      t0=$(now_ms)
      "$script" | ctr images import --base-name bench --digests - >/dev/null
      pipe_ms+=($(( $(now_ms) - t0 )))
    else
      enbi "$work/report.json"
      enbi_ms+=("$(import_ms "$work/report.json")")
      enbi "$work/reload.json" stream-layers-changed
      reload_ms+=("$(import_ms "$work/reload.json")")
    fi
  done
  echo "run $run: ctr import from file ${base_ms[-1]} ms (re-load ${rebase_ms[-1]} ms), script | ctr import ${pipe_ms[-1]} ms, enbi ${enbi_ms[-1]} ms (re-load ${reload_ms[-1]} ms)" >&2
done

# Bytes written to storage by enbi's process tree (sampled, so not timed).
start_containerd
written=()
enbi "$work/report.json" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do sample_tree "$pid"; sleep 0.05; done
wait "$pid"
enbi_written=0; for w in "${written[@]}"; do enbi_written=$((enbi_written + w)); done

t0=$(now_ms)
enbi "$work/warm.json"
warm_ms=$(( $(now_ms) - t0 ))

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
b=$(median "${base_ms[@]}") p=$(median "${pipe_ms[@]}") e=$(median "${enbi_ms[@]}")
rb=$(median "${rebase_ms[@]}") re=$(median "${reload_ms[@]}")
echo
echo "image archive:                       $size bytes"
echo "ctr images import from a file:       ${b} ms (median of $runs), plus writing the $size-byte file first"
echo "script | ctr images import - :       ${p} ms (median of $runs; streaming without enbi)"
echo "containerd:                          $(containerd --version | awk '{print $3}')"
echo "enbi build | load (FIFO, API, tag):  ${e} ms (median of $runs; importMs of the report)"
echo "throughput enbi / file import (P1):  $(awk -v b="$b" -v e="$e" 'BEGIN {printf "%.2fx", b / e}')"
echo "throughput enbi / plain pipe:        $(awk -v p="$p" -v e="$e" 'BEGIN {printf "%.2fx", p / e}')"
echo "re-load, top 10 MiB layer changed:   enbi ${re} ms, $(awk -v r="$re" -v e="$e" 'BEGIN {printf "%.2fx", r / e}') of its full load (P1b); ctr import of the file ${rb} ms, $(awk -v r="$rb" -v b="$b" 'BEGIN {printf "%.2fx", r / b}') of its full import"
echo "bytes written by enbi's processes:   $enbi_written (the file import first writes $size)"
echo "warm rebuild, image present:         loader importMs $(import_ms "$work/warm.json") ms; ${warm_ms} ms wall incl. lock, eval and build ($(sed -E 's/.*"imported":(true|false).*/imported: \1/' "$work/warm.json"))"
