#!/usr/bin/env bash
# Builds the upstream Kubernetes tools the tests and the demo need, from the Go module proxy only:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm, and Prometheus
# with promtool, kube-proxy and CoreDNS (the local cluster's Service routing and DNS); and, from Debian's
# archive (apt-get download, not installed: unpacked beside the other tools with the libraries they
# need), HAProxy, the serving router's proxy, and nft, which kube-proxy's nftables mode drives.
# Idempotent: every tool lands in a version-keyed cache directory outside the repository and is
# skipped when already there. Prints the tools directory on its last line.
set -euo pipefail

K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
# The Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule), to validate the chart's.
PROMETHEUS_OPERATOR_VERSION=v0.94.0
# Prometheus 3.16.0: its Go module is versioned v0.<major><minor>.<patch>.
PROMETHEUS_VERSION=v0.316.0
PROMETHEUS_RELEASE=3.16.0
# Debian bookworm's HAProxy (2.6 LTS, built with the Prometheus exporter); the libraries it links that
# a base system lacks come with it. A version the archive no longer serves falls back to its current one.
HAPROXY_VERSION=2.6.12-1+deb12u4
HAPROXY_LIBS=(liblua5.3-0 libopentracing-c-wrapper0 libopentracing1)
NFTABLES_VERSION=1.0.6-2+deb12u2
NFTABLES_LIBS=(libnftables1 libjansson4 libnftnl11 libxtables12)
# CoreDNS with the plugins a cluster's DNS needs (hack/coredns/main.go), not its every cloud plugin.
COREDNS_VERSION=v1.15.0

key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}_prometheus-${PROMETHEUS_RELEASE}"
TOOLS_DIR="${LARGO_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/largo/tools/$key}"
BIN="$TOOLS_DIR/bin"
if [ "${1:-}" = "--print-dir" ]; then echo "$TOOLS_DIR"; exit 0; fi
SRC="$TOOLS_DIR/src"
mkdir -p "$BIN" "$SRC"

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:--buildvcs=false} -trimpath"
export GOTOOLCHAIN=local

log() { printf '[build-tools] %s\n' "$*" >&2; }

have() { for tool in "$@"; do [ -x "$BIN/$tool" ] || return 1; done; }

# What the directory's key leaves out (CoreDNS's version and plugins, the Debian packages' versions) is
# recorded per tool once it is built and checked: a stamp that differs, or none (a build cut short, or a
# cache made before stamps), builds that tool again, and only it.
STAMPS="$TOOLS_DIR/stamps"
stamped() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp() { mkdir -p "$STAMPS" && printf '%s' "$2" > "$STAMPS/$1.tmp" && mv "$STAMPS/$1.tmp" "$STAMPS/$1"; }

# Writes a wrapper module in $1 that requires $2@$3 and turns every local `=> ./path` replace of the
# published go.mod into a replace by the published module at $4 (the staging version), while keeping
# the published go.mod's other replace directives as they are.
write_wrapper() {
  local dir="$1" module="$2" version="$3" staging_version="$4"
  rm -rf "$dir" && mkdir -p "$dir"
  local published
  published=$(cd "$dir" && go mod download -json "$module@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    printf 'module largo.dev/hack/%s\n\ngo %s\n\nrequire %s %s\n\n' "$(basename "$dir")" \
      "$(awk '$1=="go"{print $2; exit}' "$published")" "$module" "$version"
    python3 - "$published" "$staging_version" <<'PY'
import re, sys
published, staging_version = sys.argv[1], sys.argv[2]
text = open(published).read()
# Collect replace directives, in block or single-line form.
lines = []
for block in re.findall(r"^replace \((.*?)^\)", text, flags=re.S | re.M):
    lines += [line.strip() for line in block.splitlines() if line.strip()]
lines += [m.strip() for m in re.findall(r"^replace ([^(].*)$", text, flags=re.M)]
# Only modules the published go.mod requires matter; a local replace of anything else (etcd's
# FORBIDDEN_DEPENDENCY guards) has no published counterpart and is dropped.
required = set(re.findall(r"^\s*(\S+) v\S+(?: // indirect)?$", text, flags=re.M))
out = []
for line in lines:
    line = line.split("//")[0].strip()
    if not line:
        continue
    old, new = [part.strip() for part in line.split("=>")]
    target = new.split()
    if target[0].startswith("."):
        if old.split()[0] not in required:
            continue
        out.append(f"\t{old.split()[0]} => {old.split()[0]} {staging_version}")
    else:
        out.append(f"\t{old} => {new}")
if out:
    print("replace (\n" + "\n".join(out) + "\n)")
PY
  } > "$dir/go.mod"
}

# build_kubernetes DIR TOOL...: the named commands of k8s.io/kubernetes, built in the wrapper module DIR.
build_kubernetes() {
  local dir="$SRC/$1"; shift
  local tools=("$@")
  if have "${tools[@]}"; then log "kubernetes $K8S_VERSION: ${tools[*]} cached"; return; fi
  log "kubernetes $K8S_VERSION: building ${tools[*]} (the first build takes tens of minutes)"
  local staging="v0${K8S_VERSION#v1}"
  write_wrapper "$dir" k8s.io/kubernetes "$K8S_VERSION" "$staging"
  local minor; minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  local date="1970-01-01T00:00:00Z" flags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  local pkgs=()
  for tool in "${tools[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$tool"); done
  (cd "$dir" && go get "${pkgs[@]/%/@$K8S_VERSION}" && go build -ldflags "-s -w $flags" -o "$dir/out/" "${pkgs[@]}")
  for tool in "${tools[@]}"; do mv "$dir/out/$tool" "$BIN/$tool"; done
}

build_etcd() {
  if have etcd; then log "etcd $ETCD_VERSION: cached"; return; fi
  log "etcd $ETCD_VERSION: building"
  local dir="$SRC/etcd"
  write_wrapper "$dir" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION"
  (cd "$dir" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go build -ldflags "-s -w" -o "$dir/etcd" go.etcd.io/etcd/server/v3)
  mv "$dir/etcd" "$BIN/etcd"
}

build_kwok() {
  local stages="$TOOLS_DIR/kwok-stages"
  if have kwok && [ -d "$stages" ]; then log "kwok $KWOK_VERSION: cached"; return; fi
  log "kwok $KWOK_VERSION: building"
  GOBIN="$SRC/kwok-bin" go install -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  # kwok v0.8.0 ships no built-in stages: take the upstream stage YAMLs from its module source.
  local source
  source=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$stages.tmp" && mkdir -p "$stages.tmp"
  cp -r "$source/kustomize/stage/." "$stages.tmp/"
  chmod -R u+w "$stages.tmp"
  rm -rf "$stages" && mv "$stages.tmp" "$stages"
  mv "$SRC/kwok-bin/kwok" "$BIN/kwok"
}

build_helm() {
  if have helm; then log "helm $HELM_VERSION: cached"; return; fi
  log "helm $HELM_VERSION: building"
  local dir="$SRC/helm"
  write_wrapper "$dir" helm.sh/helm/v3 "$HELM_VERSION" "$HELM_VERSION"
  (cd "$dir" && go get "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" &&
    go build -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$dir/helm" helm.sh/helm/v3/cmd/helm)
  mv "$dir/helm" "$BIN/helm"
}

build_prometheus() {
  if have prometheus promtool; then log "prometheus $PROMETHEUS_RELEASE: cached"; return; fi
  log "prometheus $PROMETHEUS_RELEASE: building prometheus and promtool (without the web UI's assets)"
  GOBIN="$SRC/prometheus-bin" go install \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_RELEASE" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  mv "$SRC/prometheus-bin/prometheus" "$SRC/prometheus-bin/promtool" "$BIN/"
}

fetch_prometheus_operator_crds() {
  local crds="$TOOLS_DIR/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION"
  if [ -d "$crds" ]; then log "prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION: cached"; return; fi
  log "prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION: taking them from the module source"
  local source
  source=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$crds.tmp" && mkdir -p "$crds.tmp"
  for kind in servicemonitors podmonitors prometheusrules; do
    cp "$source/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$crds.tmp/"
  done
  chmod -R u+w "$crds.tmp" && mv "$crds.tmp" "$crds"
}

# fetch_debian PACKAGE VERSION COMMAND LIBRARY...: Debian's PACKAGE (VERSION, or the archive's current
# one when it no longer serves that) and the libraries it links that a base system lacks, downloaded
# with apt-get and unpacked into $TOOLS_DIR/PACKAGE; $BIN/COMMAND runs its usr/sbin/COMMAND with them.
fetch_debian() {
  local package="$1" version="$2" command="$3"; shift 3
  local root="$TOOLS_DIR/$package"
  if stamped "$package" "$version" && have "$command" && [ -x "$root/usr/sbin/$command" ]; then
    log "$package $version: cached"; return
  fi
  log "$package $version: downloading Debian's package and unpacking it"
  local dir="$SRC/$package-debs"
  rm -rf "$dir" "$root.tmp" && mkdir -p "$dir" "$root.tmp"
  (cd "$dir" && apt-get download "$@") >&2
  if ! (cd "$dir" && apt-get download "$package=$version") >&2; then
    # The security archive keeps only its newest build: said, not hidden, and the stamp keeps the pin.
    log "WARNING: Debian no longer serves $package $version; taking the archive's current one"
    (cd "$dir" && apt-get download "$package") >&2
  fi
  for deb in "$dir"/*.deb; do dpkg-deb -x "$deb" "$root.tmp"; done
  # Checked before it is put in place: a binary that cannot load its libraries must not pass for cached.
  local libs
  libs=$(echo "$root.tmp"/usr/lib/*-linux-gnu)
  LD_LIBRARY_PATH="$libs" "$root.tmp/usr/sbin/$command" --version >/dev/null 2>&1 ||
    LD_LIBRARY_PATH="$libs" "$root.tmp/usr/sbin/$command" -v >/dev/null 2>&1 ||
    { log "$package: the unpacked $command does not run"; return 1; }
  rm -rf "$root" && mv "$root.tmp" "$root"
  cat > "$BIN/$command" <<SH
#!/bin/sh
# Debian's $command unpacked beside this directory, with the libraries that came with it.
root="\$(cd "\$(dirname "\$0")/../$package" && pwd)"
libs=\$(echo "\$root"/usr/lib/*-linux-gnu)
LD_LIBRARY_PATH="\$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$root/usr/sbin/$command" "\$@"
SH
  chmod +x "$BIN/$command"
  # Read whole, then its first line shown: `| head -1` closed the pipe on a tool that writes more
  # (haproxy), which then died of SIGPIPE and failed the build under pipefail.
  local said
  said=$("$BIN/$command" --version 2>&1 || "$BIN/$command" -v 2>&1)
  echo "${said%%$'\n'*}" >&2
  stamp "$package" "$version"
}

build_coredns() {
  local recipe
  recipe="$COREDNS_VERSION $(sha256sum "$(dirname "$0")/coredns/main.go" | cut -c1-16)"
  if stamped coredns "$recipe" && have coredns; then log "coredns $COREDNS_VERSION: cached"; return; fi
  log "coredns $COREDNS_VERSION: building with the plugins of hack/coredns/main.go"
  local dir="$SRC/coredns"
  rm -rf "$dir" && mkdir -p "$dir"
  cp "$(dirname "$0")/coredns/main.go" "$dir/"
  (cd "$dir" && go mod init largo.dev/hack/coredns >/dev/null 2>&1 &&
    go get "github.com/coredns/coredns@$COREDNS_VERSION" && go mod tidy &&
    go build -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" -o "$dir/coredns" .)
  mv "$dir/coredns" "$BIN/coredns"
  stamp coredns "$recipe"
}

build_etcd
build_kwok
fetch_debian haproxy "$HAPROXY_VERSION" haproxy "${HAPROXY_LIBS[@]}"
fetch_debian nftables "$NFTABLES_VERSION" nft "${NFTABLES_LIBS[@]}"
build_helm
build_prometheus
fetch_prometheus_operator_crds
build_kubernetes kubernetes kube-apiserver kube-controller-manager kube-scheduler kubectl
# Apart, so that a cache made before it was added keeps the others.
build_kubernetes kubernetes-proxy kube-proxy
build_coredns
log "all tools in $BIN"
echo "$TOOLS_DIR"
