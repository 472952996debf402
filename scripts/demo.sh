#!/usr/bin/env bash
# keyfs demo: a throw-away state sealed to the in-process TPM simulator,
# sample keys for two tenants, a real FUSE mount. Serves until Ctrl-C.
# DEMO_ONESHOT=1 exits after the tour (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
keyfs=${KEYFS_BIN:-$PWD/bin/keyfs}
if [ "$(id -u)" -ne 0 ]; then
  echo "the demo mounts a FUSE filesystem that other users can read: run it as root (sudo make demo)" >&2
  exit 1
fi
demo=$(mktemp -d /tmp/keyfs-demo.XXXXXX)
export KEYFS_STATE=$demo/state KEYFS_TPM=sim
mnt=$demo/keys
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$demo"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "Seal a master key to the TPM (the INSECURE simulator: demo only)"
show "$keyfs" init
step "Store sample keys for two tenants (values come from stdin, never argv)"
printf 'sk-demo-acme-openai-%s' "$RANDOM$RANDOM" | "$keyfs" put acme/openai
printf 'sk-ant-demo-acme-%s' "$RANDOM$RANDOM" | "$keyfs" put acme/anthropic
printf 'sk-demo-beta-openai-%s' "$RANDOM$RANDOM" | "$keyfs" put beta/openai
show "$keyfs" ls

step "Mount them read-only at $mnt"
# --audit-required: an open's audit event is on disk before its bytes are returned.
"$keyfs" mount --audit-required "$mnt" 2>"$demo/mount.log" &
pid=$!
for _ in $(seq 100); do [ -d "$mnt/acme" ] && break; sleep 0.1; done
[ -d "$mnt/acme" ] || { cat "$demo/mount.log" >&2; echo "mount did not come up" >&2; exit 1; }
show find "$mnt"
step "Read a key: decrypted on open, never cached"
show cat "$mnt/acme/openai"; echo
step "Writes are refused"
printf '$ echo x > %s\n' "$mnt/acme/openai"
( echo x > "$mnt/acme/openai" ) 2>&1 | sed 's/^/  /' || true
step "Every open is audited before it returns (pid, uid, tenant, key, version; never a value)"
show "$keyfs" audit --key acme/openai
step "The state directory holds no plaintext"
printf '$ grep -r sk-demo %s\n' "$KEYFS_STATE"
if grep -rq sk-demo "$KEYFS_STATE"; then echo "  FOUND PLAINTEXT" >&2; exit 1; else echo "  (nothing found)"; fi

if [ "${DEMO_ONESHOT:-}" = 1 ]; then exit 0; fi
step "Serving at $mnt until Ctrl-C. Try, in another shell:"
echo "  cat $mnt/beta/openai"
echo "  printf sk-rotated | KEYFS_STATE=$KEYFS_STATE $keyfs put acme/openai   # shows within a second"
echo "  KEYFS_STATE=$KEYFS_STATE $keyfs audit"
wait "$pid"
