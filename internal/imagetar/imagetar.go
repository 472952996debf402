// Package imagetar builds single-layer container images from static
// binaries, without Docker or a registry, and writes them as one tarball
// that both `docker load` and `ctr images import` accept.
//
// The tarball is an OCI image layout (oci-layout, index.json, blobs/sha256/)
// that also carries a Docker manifest.json pointing at the same blobs, the
// format `docker save` writes since Docker 25. containerd reads index.json
// and names the image from its io.containerd.image.name annotation; older
// Docker reads manifest.json and its RepoTags.
package imagetar

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// epoch stamps every time in the image, so the same binaries give the same
// image digest.
var epoch = time.Unix(0, 0).UTC()

// File is one file of the image's only layer.
type File struct {
	Path string // absolute path in the image, e.g. /keyfs
	Mode int64  // e.g. 0o755
	Data []byte
}

// Binary reads a static binary for an image, at path inImage.
func Binary(src, inImage string) (File, error) {
	b, err := os.ReadFile(src)
	if err != nil {
		return File{}, err
	}
	return File{Path: inImage, Mode: 0o755, Data: b}, nil
}

// Build makes an image of files (one layer, nothing else: no shell, no
// libc) that runs entrypoint. The architecture is read from the first
// file, which must be an ELF executable.
func Build(files []File, entrypoint []string) (v1.Image, error) {
	if len(files) == 0 {
		return nil, fmt.Errorf("an image needs at least one file")
	}
	arch, err := elfArch(files[0].Data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", files[0].Path, err)
	}
	gz, err := layerTarGz(files)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(gz)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	var names []string
	for _, f := range files {
		names = append(names, f.Path)
	}
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:   layer,
		History: v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "keyfs mkimage: " + strings.Join(names, " ")},
	})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = arch, "linux"
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = entrypoint
	cf.Config.Env = []string{"PATH=/"}
	cf.Config.WorkingDir = "/"
	return mutate.ConfigFile(img, cf)
}

func elfArch(b []byte) (string, error) {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return "", fmt.Errorf("not an ELF executable: %w", err)
	}
	switch f.Machine {
	case elf.EM_X86_64:
		return "amd64", nil
	case elf.EM_AARCH64:
		return "arm64", nil
	case elf.EM_RISCV:
		return "riscv64", nil
	case elf.EM_PPC64:
		return "ppc64le", nil
	case elf.EM_S390:
		return "s390x", nil
	}
	return "", fmt.Errorf("unsupported ELF machine %v", f.Machine)
}

// layerTarGz packs files, with their parent directories, owned by root,
// dated epoch.
func layerTarGz(files []File) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(zw)
	dirs := map[string]bool{}
	for _, f := range files {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path || f.Path == "/" {
			return nil, fmt.Errorf("file path %q: want an absolute, clean path", f.Path)
		}
		rel := strings.TrimPrefix(f.Path, "/")
		for d := path.Dir(rel); d != "."; d = path.Dir(d) {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch, Format: tar.FormatUSTAR}); err != nil {
				return nil, err
			}
		}
		h := &tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: f.Mode, Size: int64(len(f.Data)), ModTime: epoch, Format: tar.FormatUSTAR}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.Data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Names are the two spellings of an image reference: as written (Docker's
// RepoTags) and fully qualified (containerd's image name, what kubelet
// asks the CRI for: docker.io/library/x:y for x:y).
type Names struct{ Given, Qualified string }

// ParseRef checks a tagged reference such as ghcr.io/keyfs/keyfs:v0.1.0.
func ParseRef(ref string) (Names, error) {
	t, err := name.NewTag(ref)
	if err == nil && !strings.Contains(ref[strings.LastIndex(ref, "/")+1:], ":") {
		err = fmt.Errorf("no tag")
	}
	if err != nil {
		return Names{}, fmt.Errorf("image reference %q: %w (want [REGISTRY/]REPO:TAG)", ref, err)
	}
	reg := t.Context().RegistryStr()
	if reg == name.DefaultRegistry {
		reg = "docker.io"
	}
	return Names{Given: ref, Qualified: reg + "/" + t.Context().RepositoryStr() + ":" + t.TagStr()}, nil
}

// WriteFile writes img tagged ref to path (through a temporary file, so a
// failed write leaves no half tarball).
func WriteFile(filename, ref string, img v1.Image) error {
	tmp, err := os.CreateTemp(path.Dir(filename), ".imagetar-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := Write(tmp, ref, img); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), filename)
}

// Write writes img tagged ref as one tarball (see the package comment).
func Write(w io.Writer, ref string, img v1.Image) error {
	n, err := ParseRef(ref)
	if err != nil {
		return err
	}
	manifest, err := img.RawManifest()
	if err != nil {
		return err
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	config, err := img.RawConfigFile()
	if err != nil {
		return err
	}
	configName, err := img.ConfigName()
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	mt, err := img.MediaType()
	if err != nil {
		return err
	}

	tw := tar.NewWriter(w)
	put := func(name string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: epoch, Format: tar.FormatUSTAR}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	blob := func(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }
	if err := put("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return err
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch, Format: tar.FormatUSTAR}); err != nil {
			return err
		}
	}
	var layerNames []string
	for _, l := range layers {
		h, err := l.Digest()
		if err != nil {
			return err
		}
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return err
		}
		if err := put(blob(h), b); err != nil {
			return err
		}
		layerNames = append(layerNames, blob(h))
	}
	if err := put(blob(configName), config); err != nil {
		return err
	}
	if err := put(blob(digest), manifest); err != nil {
		return err
	}
	index := v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Manifests: []v1.Descriptor{{
			MediaType: mt,
			Size:      int64(len(manifest)),
			Digest:    digest,
			Platform:  &v1.Platform{OS: cf.OS, Architecture: cf.Architecture},
			Annotations: map[string]string{
				"io.containerd.image.name":          n.Qualified,
				"org.opencontainers.image.ref.name": ref[strings.LastIndex(ref, ":")+1:],
			},
		}},
	}
	ib, err := json.Marshal(index)
	if err != nil {
		return err
	}
	if err := put("index.json", ib); err != nil {
		return err
	}
	mb, err := json.Marshal([]struct {
		Config   string
		RepoTags []string
		Layers   []string
	}{{Config: blob(configName), RepoTags: []string{n.Given}, Layers: layerNames}})
	if err != nil {
		return err
	}
	if err := put("manifest.json", mb); err != nil {
		return err
	}
	return tw.Close()
}
