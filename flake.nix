{
  description = "enbi: builds container images from Nix flakes into the nodes' containerd";

  # rust-version 1.88 and edition 2024 need a recent nixpkgs.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).workspace.package.version;
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs:
        let
          inherit (pkgs) lib;

          enbi-operator = pkgs.rustPlatform.buildRustPackage {
            pname = "enbi-operator";
            inherit version;
            # The whole workspace (its members must all be present), nothing else.
            src = lib.fileset.toSource {
              root = ./.;
              fileset = lib.fileset.unions [
                ./Cargo.toml
                ./Cargo.lock
                ./clippy.toml
                ./enbi-core
                ./enbi-operator
                ./tests
              ];
            };
            cargoLock.lockFile = ./Cargo.lock;
            cargoBuildFlags = [ "--package" "enbi-operator" ];
            # containerd-client generates its gRPC bindings with protoc at build time.
            nativeBuildInputs = [ pkgs.protobuf ];
            # The unit tests run in CI; the integration tests need root, containerd and nix.
            doCheck = false;
            meta = {
              description = "enbi's operator and in-Job builder";
              license = lib.licenses.asl20;
              mainProgram = "enbi-operator";
            };
          };

          # The operator and builder image. The builder runs `nix build` with the image's own
          # store (`--store pod`, hence the Nix database of the image's paths) or the node's
          # daemon (`--store node-daemon`); load and release talk to the node's containerd
          # socket through containerd's API (no `ctr`).
          image = pkgs.dockerTools.streamLayeredImage {
            name = "localhost/enbi";
            tag = version;
            contents = [
              enbi-operator
              pkgs.nix
              pkgs.git # git+https flake URLs
              pkgs.cacert
              pkgs.bashInteractive
              pkgs.coreutils
              pkgs.dockerTools.fakeNss # root in /etc/passwd, for nix and git
            ];
            includeNixDB = true;
            extraCommands = ''
              mkdir -p tmp root
              chmod 1777 tmp
            '';
            config = {
              Entrypoint = [ "${enbi-operator}/bin/enbi-operator" ];
              Env = [
                "PATH=/bin"
                "HOME=/root"
                "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
                "NIX_SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
                # Single-user root in an unprivileged Pod: no build users, no sandbox.
                "NIX_CONFIG=experimental-features = nix-command flakes\nbuild-users-group =\nsandbox = false"
              ];
              Labels."org.opencontainers.image.source" = "https://github.com/kivikakk/enbi";
            };
          };
        in
        {
          inherit enbi-operator image;
          default = image;
        });
    };
}
