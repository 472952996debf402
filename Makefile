# keyfs — see README.md. Every target here works; there are no stubs.
export PATH := $(PATH):/usr/local/go/bin
GO        ?= go
TAGS      := simulator
FUZZTIME  ?= 200000x
BIN       := bin
IMAGE     ?= ghcr.io/keyfs/keyfs:v0.1.0

.PHONY: build build-static image deb test e2e lint fuzz demo bench deps-demo deps-test deps-bench

# The development binary: includes the in-process TPM simulator (--tpm sim).
build:
	$(GO) build -tags $(TAGS) -o $(BIN)/keyfs ./cmd/keyfs

# The production binary: static, no simulator.
build-static:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/keyfs-static ./cmd/keyfs

# The image users run (FROM scratch + the static binary) as one tarball
# that `ctr -n k8s.io images import` and `docker load` accept; no Docker.
image: build-static
	$(GO) run ./internal/cmd/mkimage -binary $(BIN)/keyfs-static -tag $(IMAGE) -o $(BIN)/keyfs-image.tar

# The Debian package for hosts (packaging/): a stripped static binary, the
# systemd unit, /etc/default/keyfs, docs generated from --help.
deb:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags="-s -w" -o $(BIN)/keyfs-deb ./cmd/keyfs
	$(GO) run ./internal/cmd/mkdeb -binary $(BIN)/keyfs-deb

# go mod tidy -diff fails, printing the change, when go.mod or go.sum is
# not what tidy would write (a direct dependency marked indirect, say).
lint:
	$(GO) mod tidy -diff
	$(GO) vet -tags $(TAGS) ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) tool staticcheck -tags $(TAGS) ./...

deps-demo deps-test deps-bench:
	scripts/deps.sh $(@:deps-%=%)

# Needs root and /dev/fuse; installs swtpm, fuse3 and libssl-dev if missing.
test: deps-test lint
	$(GO) test -tags $(TAGS) -count=1 ./...
	FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

# Root only. A real single-node Kubernetes on 127.0.0.1 runs keyfs from its
# image and manifests/ (test/e2e/README.md). The first run builds Kubernetes
# (about 9 minutes, cached in /var/cache/keyfs-e2e).
e2e: image
	$(GO) run ./test/e2e -image $(BIN)/keyfs-image.tar -keyfs $(BIN)/keyfs-static

fuzz:
	FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

demo: deps-demo build
	scripts/demo.sh

# Figures, never pass/fail: keyfs vs tmpfs vs gocryptfs reads, tenant
# scale, CSI publish and many-mount figures, then cluster mode (enrollment,
# put → read on two nodes, a daemon starting on 30,000 SealedKeys).
bench: deps-bench deps-test
	$(GO) run -tags $(TAGS) ./test/bench
	$(GO) run -tags $(TAGS) ./test/benchcsi
	$(GO) run ./test/benchcluster
