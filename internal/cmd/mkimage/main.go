// Command mkimage packs a static binary into a container image tarball
// that `docker load` and `ctr -n k8s.io images import` both accept, with
// no Docker and no registry (`make image`):
//
//	go run ./internal/cmd/mkimage -binary bin/keyfs-static -tag ghcr.io/keyfs/keyfs:v0.1.0 -o bin/keyfs-image.tar
//
// The image holds the binary and nothing else (FROM scratch), at /keyfs
// unless -path says otherwise, and runs it as its entrypoint.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/keyfs/keyfs/internal/imagetar"
)

func main() {
	binary := flag.String("binary", "", "static binary to pack (required)")
	inImage := flag.String("path", "/keyfs", "where the binary goes in the image; also the entrypoint")
	tag := flag.String("tag", "", "image reference, REGISTRY/REPO:TAG (required)")
	out := flag.String("o", "", "output tarball (required)")
	flag.Parse()
	if *binary == "" || *tag == "" || *out == "" || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: mkimage -binary FILE -tag REGISTRY/REPO:TAG -o OUT.tar [-path /keyfs]")
		os.Exit(2)
	}
	if err := run(*binary, *inImage, *tag, *out); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(binary, inImage, tag, out string) error {
	if _, err := imagetar.ParseRef(tag); err != nil {
		return err
	}
	f, err := imagetar.Binary(binary, inImage)
	if err != nil {
		return err
	}
	img, err := imagetar.Build([]imagetar.File{f}, []string{inImage})
	if err != nil {
		return err
	}
	if err := imagetar.WriteFile(out, tag, img); err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	fi, err := os.Stat(out)
	if err != nil {
		return err
	}
	fmt.Printf("%s: %s %s (%.1f MB); load with: ctr -n k8s.io images import %s, or: docker load -i %s\n",
		out, tag, d, float64(fi.Size())/1e6, out, out)
	return nil
}
