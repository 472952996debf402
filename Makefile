# keyfs — see README.md. Every target here works; there are no stubs.
GO        ?= go
TAGS      := simulator
FUZZTIME  ?= 10s
BIN       := bin

.PHONY: build build-static test lint fuzz demo bench

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

# Needs root, /dev/fuse, swtpm, fuse3 (see .ci/run for the packages).
test: lint
	$(GO) test -tags $(TAGS) -count=1 ./...
	FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

fuzz:
	FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

demo: build
	scripts/demo.sh

bench: build
	$(GO) run -tags $(TAGS) ./test/bench
