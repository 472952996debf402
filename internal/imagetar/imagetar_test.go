package imagetar

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// testBinary is an ELF executable to pack: the test binary itself.
func testBinary(t *testing.T) File {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f, err := Binary(exe, "/keyfs")
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestTarballLoadsBothWays(t *testing.T) {
	bin := testBinary(t)
	img, err := Build([]File{bin}, []string{"/keyfs"})
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "image.tar")
	if err := WriteFile(out, "ghcr.io/keyfs/keyfs:v0.1.0", img); err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()

	// docker load reads manifest.json.
	dimg, err := tarball.ImageFromPath(out, nil)
	if err != nil {
		t.Fatalf("manifest.json (docker load): %v", err)
	}
	cf, err := dimg.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cf.Config.Entrypoint, []string{"/keyfs"}) || cf.OS != "linux" || cf.Architecture == "" {
		t.Errorf("config: entrypoint %v, platform %s/%s", cf.Config.Entrypoint, cf.OS, cf.Architecture)
	}
	layers, err := dimg.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	h, err := tr.Next()
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(tr)
	if h.Name != "keyfs" || h.Mode != 0o755 || h.Uid != 0 || !bytes.Equal(got, bin.Data) {
		t.Errorf("layer file %q mode %o uid %d, %d bytes (want keyfs 755 0, %d bytes)", h.Name, h.Mode, h.Uid, len(got), len(bin.Data))
	}
	if _, err := tr.Next(); err != io.EOF {
		t.Errorf("the layer holds more than the binary: %v", err)
	}

	// ctr images import reads the OCI layout and names the image from
	// io.containerd.image.name.
	dir := t.TempDir()
	untar(t, out, dir)
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatalf("OCI layout: %v", err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("index: %+v, %v", im, err)
	}
	d := im.Manifests[0]
	if d.Digest != want || d.Annotations["io.containerd.image.name"] != "ghcr.io/keyfs/keyfs:v0.1.0" || d.Platform == nil || d.Platform.OS != "linux" {
		t.Errorf("index descriptor: %+v (want digest %s)", d, want)
	}
	oimg, err := idx.Image(d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if dd, _ := oimg.Digest(); dd != want {
		t.Errorf("OCI image digest %s, want %s", dd, want)
	}
	ddig, _ := dimg.Digest()
	if ddig != want {
		// tarball.ImageFromPath recomputes a manifest from manifest.json; the
		// layer and config must still be the same blobs.
		dcfg, _ := dimg.ConfigName()
		ocfg, _ := oimg.ConfigName()
		if dcfg != ocfg {
			t.Errorf("docker and OCI views disagree on the config: %s vs %s", dcfg, ocfg)
		}
	}
}

func TestReproducible(t *testing.T) {
	bin := testBinary(t)
	var digests []string
	for range 2 {
		img, err := Build([]File{bin}, []string{"/keyfs"})
		if err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		if err := Write(&b, "ghcr.io/keyfs/keyfs:v0.1.0", img); err != nil {
			t.Fatal(err)
		}
		d, _ := img.Digest()
		digests = append(digests, d.String())
	}
	if digests[0] != digests[1] {
		t.Errorf("same binary, different digests: %v", digests)
	}
}

func TestNames(t *testing.T) {
	for ref, want := range map[string]string{
		"ghcr.io/keyfs/keyfs:v0.1.0":   "ghcr.io/keyfs/keyfs:v0.1.0",
		"keyfs:dev":                    "docker.io/library/keyfs:dev",
		"localhost/keyfs-e2e/tools:1":  "localhost/keyfs-e2e/tools:1",
		"example.com:5000/a/b/c:1.2.3": "example.com:5000/a/b/c:1.2.3",
	} {
		n, err := ParseRef(ref)
		if err != nil || n.Qualified != want {
			t.Errorf("%s: %q, %v; want %q", ref, n.Qualified, err, want)
		}
	}
	for _, bad := range []string{"", "ghcr.io/keyfs/keyfs", "UPPER/case:1", "a:b:c"} {
		if _, err := ParseRef(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if _, err := Build([]File{{Path: "/x", Mode: 0o755, Data: []byte("#!/bin/sh\n")}}, []string{"/x"}); err == nil {
		t.Error("a non-ELF first file was accepted")
	}
}

func untar(t *testing.T, file, dir string) {
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, h.Name)
		if h.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		b, _ := io.ReadAll(tr)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
