#!/usr/bin/env bash
# Installs the Debian packages keyfs's build, tests, demo or bench need, only
# those missing. Usage: scripts/deps.sh demo|test|bench
set -euo pipefail
case "${1:-test}" in
  demo)  need=(gcc libssl-dev fuse3) ;;
  test)  need=(gcc libssl-dev fuse3 swtpm swtpm-tools git prometheus) ;;  # prometheus: promtool
  bench) need=(gcc libssl-dev fuse3 gocryptfs) ;;
  *) echo "usage: $0 demo|test|bench" >&2; exit 2 ;;
esac
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "keyfs needs these Debian packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
