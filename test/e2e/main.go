// Command e2e proves, on a real single-node Kubernetes, that kubelet — not
// a test client — calls the keyfs CSI driver correctly, with keyfs
// deployed as users deploy it: its image and its kustomize manifests.
//
//	go run ./test/e2e [-image bin/keyfs-image.tar -keyfs bin/keyfs-static]
//
// From a fresh Debian machine, as root, it installs the Debian packages it
// needs, builds Kubernetes from source (cached under -cache, keyed by
// k8s/go.sum), starts etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler, containerd and kubelet on 127.0.0.1 with all state under
// one temporary root, deploys keyfs through overlay/ (a kustomize overlay
// of manifests/), runs the scenarios, prints `N passed, N failed` and
// tears everything down, whatever happened. See README.md here.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/keyfs/keyfs/internal/k8sbin"
)

type options struct {
	root      string // temporary root; made when empty
	cache     string // persistent cache for the Kubernetes build
	image     string // keyfs image tarball; built when empty
	keyfs     string // keyfs binary for `keyfs put`; built when empty
	noDeps    bool
	keep      bool
	down      string
	buildOnly bool
}

func main() {
	var o options
	flag.StringVar(&o.root, "root", "", "temporary root for all cluster state (default: a new directory under $TMPDIR)")
	flag.StringVar(&o.cache, "cache", k8sbin.DefaultCache(), "persistent cache: Kubernetes binaries, Go module and build caches (env KEYFS_E2E_CACHE)")
	flag.StringVar(&o.image, "image", "", "keyfs image tarball from `make image` (default: build one)")
	flag.StringVar(&o.keyfs, "keyfs", "", "the static keyfs binary in that image, used on the host for keyfs put/rm (default: build one)")
	flag.BoolVar(&o.noDeps, "no-deps", false, "do not apt-get install missing Debian packages")
	flag.BoolVar(&o.keep, "keep", false, "leave the cluster running after the scenarios (stop it with -down ROOT)")
	flag.StringVar(&o.down, "down", "", "tear down a cluster left by -keep or by a killed run, given its root, and exit")
	flag.BoolVar(&o.buildOnly, "build-only", false, "only build Kubernetes (into the cache) and exit")
	flag.Parse()
	if flag.NArg() != 0 || (o.image == "") != (o.keyfs == "") {
		fmt.Fprintln(os.Stderr, "usage: e2e [-image keyfs-image.tar -keyfs keyfs-static] [-root DIR] [-cache DIR] [-keep] [-no-deps] | e2e -down ROOT")
		os.Exit(2)
	}
	os.Exit(run(o))
}

func run(o options) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "e2e: needs root (it runs kubelet, containerd and FUSE mounts)")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if o.down != "" {
		h, err := loadHarness(o.down)
		if err != nil {
			fmt.Fprintln(os.Stderr, "e2e:", err)
			return 1
		}
		if err := h.teardown(false); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: teardown:", err)
			return 1
		}
		return 0
	}

	repo, err := repoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 2
	}
	h := &harness{repo: repo, cache: o.cache, start: time.Now()}
	h.logf("keyfs e2e: repository %s, cache %s", repo, o.cache)
	if err := refuseRealCluster(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: refusing to run:", err)
		return 2
	}
	if !o.noDeps {
		t := time.Now()
		if err := installDeps(); err != nil {
			fmt.Fprintln(os.Stderr, "e2e:", err)
			return 1
		}
		h.logf("Debian packages ready (%s)", since(t))
	}
	if o.buildOnly {
		if err := h.buildKubernetes(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: build:", err)
			return 1
		}
		return 0
	}

	if err := h.makeRoot(o.root); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	// Teardown always runs: deferred for early returns, and explicitly
	// before the summary, as a check of its own, so that the closing line
	// is the verdict.
	tornDown := false
	down := func(failed bool) {
		if tornDown {
			return
		}
		tornDown = true
		if o.keep && ctx.Err() == nil {
			h.logf("cluster kept running under %s", h.root)
			h.logf("  client: KUBECONFIG=%s", filepath.Join(h.root, "pki", "admin.kubeconfig"))
			h.logf("  stop it: go run ./test/e2e -down %s", h.root)
			return
		}
		t := time.Now()
		err := h.teardown(failed)
		r := result{name: "teardown leaves no process, mount, cgroup, sysctl or file of the run", ok: err == nil, took: time.Since(t)}
		if err != nil {
			r.detail = "TEARDOWN INCOMPLETE: " + err.Error()
		}
		h.results = append(h.results, r)
	}
	defer down(true)

	if err := h.buildKubernetes(ctx); err != nil {
		h.logf("build: %v", err)
		return 1
	}
	if err := h.buildImages(ctx, o.image, o.keyfs); err != nil {
		h.logf("build: %v", err)
		return 1
	}

	t := time.Now()
	if err := h.clusterUp(ctx); err != nil {
		h.results = append(h.results, result{name: "the cluster starts", detail: err.Error(), took: time.Since(t)})
		h.logf("FAIL  the cluster starts: %v", err)
		h.dumpDiagnostics()
		down(true)
		h.summary()
		return 1
	}
	h.clusterStart = time.Since(t)
	h.logf("cluster up in %s", h.clusterStart.Round(100*time.Millisecond))

	h.runScenarios(ctx)
	h.runClusterScenarios(ctx)
	failed := false
	for _, r := range h.results {
		failed = failed || !r.ok
	}
	if failed {
		h.dumpDiagnostics()
	}
	down(failed)
	if h.summary() {
		return 1
	}
	return 0
}

// repoRoot finds the keyfs module root from the working directory.
func repoRoot() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && strings.HasPrefix(string(b), "module github.com/keyfs/keyfs\n") {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", errors.New("run from inside the keyfs repository (no go.mod of github.com/keyfs/keyfs above the working directory)")
		}
		d = parent
	}
}

func since(t time.Time) string { return time.Since(t).Round(100 * time.Millisecond).String() }
