{
  description = "enbi example: a tiny HTTP server image, built by enbi on a real cluster";

  # Needs nixpkgs (and so the network) at build time. Commit a flake.lock in your copy
  # (`nix flake lock`) so that every build of one revision gets the same nixpkgs.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # enbi builds `<flakeUrl>#packages.<system>.<packageName>`: here packageName is `hello-image`.
      packages = forAllSystems (pkgs:
        let
          site = pkgs.writeTextDir "index.html" "<p>hello from enbi</p>\n";
        in
        {
          # A script that writes the image to stdout; enbi runs it and streams its output into
          # the node's containerd, with no image file on disk. enbi stores the image under the
          # NixBuild's imageTag whatever name and tag it has here; they match the manifests
          # (registry.example/hello:v1) only to keep `nix build` and `docker load` users unsurprised.
          hello-image = pkgs.dockerTools.streamLayeredImage {
            name = "registry.example/hello";
            tag = "v1";
            contents = [ pkgs.busybox ]; # /bin/sh and friends, for `kubectl exec`
            config = {
              Cmd = [ "${pkgs.busybox}/bin/httpd" "-f" "-v" "-p" "8080" "-h" "${site}" ];
              ExposedPorts."8080/tcp" = { };
              User = "65534:65534";
            };
          };
          default = self.packages.${pkgs.stdenv.hostPlatform.system}.hello-image;
        });
    };
}
