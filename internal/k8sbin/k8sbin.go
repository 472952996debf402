// Package k8sbin locates the Kubernetes binaries the tests run: built from
// source by the e2e harness (test/e2e) and cached, keyed by what built them.
package k8sbin

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
)

// Version is what test/e2e/k8s/go.mod pins; the binaries report it.
const Version = "v1.33.13"

// Commands are the binaries built, all in one directory.
var Commands = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"}

// DefaultCache is the build cache: KEYFS_E2E_CACHE, or /var/cache/keyfs-e2e.
func DefaultCache() string {
	if v := os.Getenv("KEYFS_E2E_CACHE"); v != "" {
		return v
	}
	return "/var/cache/keyfs-e2e"
}

// Dir is where the binaries of repo's wrapper module test/e2e/k8s live:
// CACHE/bin/HASH, HASH covering its go.mod and go.sum and the Go version,
// so a changed go.sum or toolchain builds anew.
func Dir(repo, cache string) (string, error) {
	wrapper := filepath.Join(repo, "test", "e2e", "k8s")
	hash := sha256.New()
	for _, f := range []string{"go.mod", "go.sum"} {
		b, err := os.ReadFile(filepath.Join(wrapper, f))
		if err != nil {
			return "", err
		}
		fmt.Fprintf(hash, "%s %d\n", f, len(b))
		hash.Write(b)
	}
	fmt.Fprintf(hash, "%s %s %s/%s\n", runtime.Version(), Version, runtime.GOOS, runtime.GOARCH)
	return filepath.Join(cache, "bin", hex.EncodeToString(hash.Sum(nil))[:16]), nil
}

// Have reports whether dir holds every one of Commands, executable.
func Have(dir string) bool {
	for _, n := range Commands {
		if fi, err := os.Stat(filepath.Join(dir, n)); err != nil || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}
