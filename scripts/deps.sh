#!/usr/bin/env bash
# Installs the Debian packages keyfs's build, tests, demo or bench need, only
# those missing; for the tests also kube-apiserver, built from source by the
# e2e harness and cached (about 5 minutes the first time, then nothing).
# Usage: scripts/deps.sh demo|test|bench
set -euo pipefail
case "${1:-test}" in
  demo)  need=(gcc libssl-dev fuse3) ;;
  test)  need=(gcc libssl-dev fuse3 swtpm swtpm-tools git prometheus etcd-server systemd lintian containerd runc) ;;  # prometheus: promtool; systemd: systemd-analyze
  bench) need=(gcc libssl-dev fuse3 gocryptfs) ;;
  *) echo "usage: $0 demo|test|bench" >&2; exit 2 ;;
esac
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "keyfs needs these Debian packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ "${1:-test}" = test ]; then
  # The cluster-store tests run a real kube-apiserver (internal/kubetest).
  go run ./test/e2e -build-only -no-deps
fi
