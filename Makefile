# keyfs — see README.md. Every target here works; there are no stubs.
export PATH := $(PATH):/usr/local/go/bin
GO        ?= go
TAGS      := simulator
FUZZTIME  ?= 10s
BIN       := bin

.PHONY: build build-static test lint fuzz demo bench deps-demo deps-test deps-bench

# The development binary: includes the in-process TPM simulator (--tpm sim).
build:
	$(GO) build -tags $(TAGS) -o $(BIN)/keyfs ./cmd/keyfs

# The production binary: static, no simulator.
build-static:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/keyfs-static ./cmd/keyfs

lint:
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

fuzz:
	FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

demo: deps-demo build
	scripts/demo.sh

# Figures, never pass/fail: keyfs vs tmpfs vs gocryptfs reads, tenant
# scale, then CSI publish and many-mount figures.
bench: deps-bench
	$(GO) run -tags $(TAGS) ./test/bench
	$(GO) run -tags $(TAGS) ./test/benchcsi
