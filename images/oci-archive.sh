# pack_image, sourced by the scripts that make images without Docker (images/builder/build-image,
# tests/cluster/real-node): a directory tree into a one-layer OCI archive.
# shellcheck shell=bash

# pack_image NAME CONFIG_JSON ROOTFS OUT.tar: a one-layer OCI archive of ROOTFS, with CONFIG_JSON
# as the image's runtime config (Env, Entrypoint, ...).
pack_image() {
  local name="$1" config="$2" rootfs="$3" out="$4" tmp arch
  tmp="$(mktemp -d)"
  arch="$(go env GOARCH 2>/dev/null || dpkg --print-architecture)"
  mkdir -p "$tmp/oci/blobs/sha256"
  tar -C "$rootfs" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$tmp/layer.tar" .
  local layer_sha layer_size cfg cfg_sha man man_sha
  layer_sha="$(sha256sum <"$tmp/layer.tar" | cut -d' ' -f1)"
  layer_size="$(stat -c %s "$tmp/layer.tar")"
  mv "$tmp/layer.tar" "$tmp/oci/blobs/sha256/$layer_sha"
  cfg="{\"architecture\":\"$arch\",\"os\":\"linux\",\"config\":$config,\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$layer_sha\"]}}"
  printf '%s' "$cfg" >"$tmp/cfg"
  cfg_sha="$(sha256sum <"$tmp/cfg" | cut -d' ' -f1)"
  mv "$tmp/cfg" "$tmp/oci/blobs/sha256/$cfg_sha"
  man="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$cfg_sha\",\"size\":${#cfg}},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$layer_sha\",\"size\":$layer_size}]}"
  printf '%s' "$man" >"$tmp/man"
  man_sha="$(sha256sum <"$tmp/man" | cut -d' ' -f1)"
  mv "$tmp/man" "$tmp/oci/blobs/sha256/$man_sha"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$tmp/oci/oci-layout"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$man_sha" "${#man}" "$name" "${name##*:}" >"$tmp/oci/index.json"
  tar -C "$tmp/oci" -cf "$out" .
  rm -rf "$tmp"
}
