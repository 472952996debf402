// Command mkdeb builds keyfs's Debian package (make deb) from
// packaging/nfpm.yaml with nfpm: the static binary, the systemd unit, its
// default configuration, and a command reference generated from --help.
package main

import (
	"bytes"
	"compress/gzip"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/goreleaser/nfpm/v2"
	_ "github.com/goreleaser/nfpm/v2/deb"
)

func main() {
	bin := flag.String("binary", "bin/keyfs-static", "the static keyfs binary")
	version := flag.String("version", "0.1.0", "package version")
	out := flag.String("o", "", "package file (default bin/keyfs_VERSION_amd64.deb)")
	flag.Parse()
	if *out == "" {
		*out = filepath.Join("bin", "keyfs_"+*version+"_amd64.deb")
	}
	if err := run(*bin, *version, *out); err != nil {
		fmt.Fprintln(os.Stderr, "mkdeb:", err)
		os.Exit(1)
	}
	fmt.Println(*out)
}

func run(bin, version, out string) error {
	docs, err := os.MkdirTemp("", "keyfs-deb-docs-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(docs)
	ref, err := commandReference(bin)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(docs, "commands.txt"), ref, 0o644); err != nil {
		return err
	}
	if err := writeChangelog(filepath.Join(docs, "changelog.gz"), version); err != nil {
		return err
	}
	y, err := os.ReadFile("packaging/nfpm.yaml")
	if err != nil {
		return err
	}
	vars := map[string]string{"VERSION": version, "BIN": bin, "DOCS": docs}
	cfg, err := nfpm.Parse(strings.NewReader(os.Expand(string(y), func(k string) string { return vars[k] })))
	if err != nil {
		return fmt.Errorf("packaging/nfpm.yaml: %w", err)
	}
	info, err := cfg.Get("deb")
	if err != nil {
		return err
	}
	info = nfpm.WithDefaults(info)
	if err := nfpm.PrepareForPackager(info, "deb"); err != nil {
		return err
	}
	pkg, err := nfpm.Get("deb")
	if err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if err := pkg.Package(info, f); err != nil {
		f.Close()
		os.Remove(out)
		return fmt.Errorf("package: %w", err)
	}
	return f.Close()
}

// writeChangelog writes the Debian changelog entry of this version,
// compressed as Debian wants (gzip -9n: no name, no time).
func writeChangelog(path, version string) error {
	var b bytes.Buffer
	z, err := gzip.NewWriterLevel(&b, gzip.BestCompression)
	if err != nil {
		return err
	}
	fmt.Fprintf(z, "keyfs (%s) unstable; urgency=medium\n\n  * Release %s: see /usr/share/doc/keyfs/README.md.\n\n -- keyfs developers <keyfs@example.org>  %s\n",
		version, version, time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC).Format(time.RFC1123Z))
	if err := z.Close(); err != nil {
		return err
	}
	return os.WriteFile(path, b.Bytes(), 0o644)
}

var commandRE = regexp.MustCompile(`(?m)^  ([a-z][a-z-]*) `)

// commandReference is the --help of keyfs and of each of its commands
// and subcommands: the package's documentation, always current.
func commandReference(bin string) ([]byte, error) {
	var b bytes.Buffer
	var walk func(path []string) error
	walk = func(path []string) error {
		help, err := exec.Command(bin, append(path, "--help")...).Output()
		if err != nil {
			return fmt.Errorf("%s %s --help: %w", bin, strings.Join(path, " "), err)
		}
		fmt.Fprintf(&b, "%s\n$ keyfs %s --help\n\n%s\n", strings.Repeat("=", 72), strings.Join(path, " "), help)
		_, cmds, ok := bytes.Cut(help, []byte("Available Commands:\n"))
		if !ok {
			return nil
		}
		cmds, _, _ = bytes.Cut(cmds, []byte("\n\n"))
		for _, m := range commandRE.FindAllSubmatch(append(cmds, '\n'), -1) {
			if c := string(m[1]); c != "help" && c != "completion" {
				if err := walk(append(append([]string(nil), path...), c)); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk(nil); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}
