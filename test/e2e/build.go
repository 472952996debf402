package main

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/keyfs/keyfs/internal/imagetar"
	"github.com/keyfs/keyfs/internal/k8sbin"
)

// toolsRef is the e2e test image: the pods' program and the sandbox pause.
const toolsRef = "localhost/keyfs-e2e/tools:1"

// buildKubernetes builds the Kubernetes commands from the wrapper module
// test/e2e/k8s, or finds them in the cache: CACHE/bin/HASH, where HASH
// covers the wrapper's go.mod and go.sum and the Go version. The module
// and build caches live in CACHE too, so a changed go.sum rebuilds only
// what changed. A cold build takes about 10 minutes on 2 cores and 2 GB.
func (h *harness) buildKubernetes(ctx context.Context) error {
	wrapper := filepath.Join(h.repo, "test", "e2e", "k8s")
	dir, err := k8sbin.Dir(h.repo, h.cache)
	if err != nil {
		return err
	}
	h.k8sBin = dir
	if k8sbin.Have(dir) {
		h.logf("Kubernetes %s: cached in %s", k8sbin.Version, dir)
		return nil
	}
	h.logf("building Kubernetes %s (%v) from source: about 10 minutes on 2 cores the first time", k8sbin.Version, k8sbin.Commands)
	t := time.Now()
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	ld := "-s -w" +
		" -X k8s.io/component-base/version.gitVersion=" + k8sbin.Version +
		" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=33" +
		" -X k8s.io/component-base/version.gitTreeState=clean" +
		" -X k8s.io/client-go/pkg/version.gitVersion=" + k8sbin.Version
	args := []string{"-n", "19", "go", "build", "-trimpath", "-ldflags", ld, "-o", tmp + "/"}
	for _, c := range k8sbin.Commands {
		args = append(args, "k8s.io/kubernetes/cmd/"+c)
	}
	cmd := exec.CommandContext(ctx, "nice", args...)
	cmd.Dir = wrapper
	cmd.Env = append(os.Environ(),
		"GOMODCACHE="+filepath.Join(h.cache, "gomod"),
		"GOCACHE="+filepath.Join(h.cache, "gocache"),
		"GOFLAGS=-buildvcs=false -mod=readonly",
		"GOWORK=off", "GOTOOLCHAIN=local", "CGO_ENABLED=0",
	)
	logName := filepath.Join(h.cache, "build.log")
	logFile, err := os.Create(logName)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Run(); err != nil {
		out, _ := command("tail", "-n", "40", logName)
		return fmt.Errorf("building Kubernetes in %s: %w; last lines of %s:\n%s", wrapper, err, logName, out)
	}
	// Binaries of an older go.sum are of no more use.
	olds, _ := filepath.Glob(filepath.Join(h.cache, "bin", "*"))
	for _, o := range olds {
		if o != tmp {
			os.RemoveAll(o)
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	h.logf("built Kubernetes in %s, cached in %s", since(t), dir)
	return nil
}

// buildImages gets the keyfs image (the given tarball from `make image`,
// or one built here the same way) and the e2e tools image.
func (h *harness) buildImages(ctx context.Context, image, keyfsBin string) error {
	t := time.Now()
	if image == "" {
		keyfsBin = h.path("bin", "keyfs")
		if err := h.goBuild(ctx, "./cmd/keyfs", keyfsBin); err != nil {
			return err
		}
		image = h.path("bin", "keyfs-image.tar")
		if err := packImage(keyfsBin, "/keyfs", []string{"/keyfs"}, "ghcr.io/keyfs/keyfs:v0.1.0", image); err != nil {
			return err
		}
	}
	ref, err := imageRef(image)
	if err != nil {
		return fmt.Errorf("%s: %w", image, err)
	}
	h.keyfsRef = ref
	if h.keyfsBin, err = filepath.Abs(keyfsBin); err != nil {
		return err
	}
	tool := h.path("bin", "e2etool")
	if err := h.goBuild(ctx, "./test/e2e/e2etool", tool); err != nil {
		return err
	}
	tools := h.path("bin", "tools.tar")
	if err := packImage(tool, "/e2etool", []string{"/e2etool", "pause"}, toolsRef, tools); err != nil {
		return err
	}
	if h.images, err = absAll(image, tools); err != nil {
		return err
	}
	h.logf("images ready (%s): %s from %s, %s", since(t), ref, image, toolsRef)
	return nil
}

func absAll(ps ...string) ([]string, error) {
	var out []string
	for _, p := range ps {
		a, err := filepath.Abs(p)
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, nil
}

// goBuild builds a static binary of the keyfs module.
func (h *harness) goBuild(ctx context.Context, pkg, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out, pkg)
	cmd.Dir = h.repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-buildvcs=false")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

func packImage(bin, inImage string, entrypoint []string, ref, out string) error {
	f, err := imagetar.Binary(bin, inImage)
	if err != nil {
		return err
	}
	img, err := imagetar.Build([]imagetar.File{f}, entrypoint)
	if err != nil {
		return err
	}
	return imagetar.WriteFile(out, ref, img)
}

// imageRef reads the image's name from its tarball: the overlay points
// the DaemonSet at exactly that image.
func imageRef(tarball string) (string, error) {
	f, err := os.Open(tarball)
	if err != nil {
		return "", err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hd, err := tr.Next()
		if err == io.EOF {
			return "", errors.New("no manifest.json: not an image tarball from `make image` or `docker save`")
		}
		if err != nil {
			return "", err
		}
		if hd.Name != "manifest.json" {
			continue
		}
		var m []struct{ RepoTags []string }
		if err := json.NewDecoder(tr).Decode(&m); err != nil {
			return "", fmt.Errorf("manifest.json: %w", err)
		}
		if len(m) != 1 || len(m[0].RepoTags) != 1 {
			return "", fmt.Errorf("manifest.json: want one image with one tag, got %+v", m)
		}
		n, err := imagetar.ParseRef(m[0].RepoTags[0])
		if err != nil {
			return "", err
		}
		return n.Qualified, nil
	}
}
