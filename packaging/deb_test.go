package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyfs/keyfs/internal/testenv"
)

// buildDeb makes the package as make deb does, into dir.
func buildDeb(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "keyfs")
	deb := filepath.Join(dir, "keyfs_0.1.0_amd64.deb")
	for _, args := range [][]string{
		{"build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./cmd/keyfs"},
		{"run", "./internal/cmd/mkdeb", "-binary", bin, "-o", deb},
	} {
		cmd := exec.Command("go", args...)
		cmd.Dir = ".."
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return deb
}

// TestDebianPackage: the package holds what the unit expects where it
// expects it, lintian finds no error, it installs with dpkg -i, and
// dpkg --purge leaves /var/lib/keyfs (the only sealed master key) alone.
func TestDebianPackage(t *testing.T) {
	need(t, "dpkg-deb")
	lintian := need(t, "lintian")
	if os.Geteuid() != 0 {
		testenv.Missing(t, "installing a package needs root")
	}
	if out, _ := exec.Command("dpkg-query", "-W", "-f=${Status}", "keyfs").Output(); strings.Contains(string(out), "installed") {
		t.Fatal("a keyfs package is installed on this machine: this test installs and purges its own, so it will not run here")
	}
	if _, err := os.Stat("/var/lib/keyfs"); err == nil {
		t.Fatal("/var/lib/keyfs exists on this machine (a keyfs state?): this test will not touch it")
	}
	deb := buildDeb(t, t.TempDir())
	fi, err := os.Stat(deb)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("package: %.1f MB", float64(fi.Size())/(1<<20))
	list, err := exec.Command("dpkg-deb", "-c", deb).Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"./usr/bin/keyfs", "./lib/systemd/system/keyfs-mount.service", "./etc/default/keyfs",
		"./usr/share/doc/keyfs/commands.txt", "./usr/share/doc/keyfs/copyright", "./usr/share/doc/keyfs/changelog.gz", "drwx------ root/root         0"} {
		if !strings.Contains(string(list), want) {
			t.Errorf("the package lacks %s:\n%s", want, list)
		}
	}
	lint, _ := exec.Command(lintian, deb).CombinedOutput()
	for _, l := range strings.Split(string(lint), "\n") {
		if strings.HasPrefix(l, "E: ") {
			t.Errorf("lintian: %s", l)
		}
	}

	t.Cleanup(func() {
		exec.Command("dpkg", "--purge", "keyfs").Run()
		os.RemoveAll("/var/lib/keyfs") // made by this test's install
	})
	out, err := exec.Command("dpkg", "-i", deb).CombinedOutput()
	if err != nil {
		t.Fatalf("dpkg -i: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "keyfs init") {
		t.Errorf("postinst does not say how to make a master key:\n%s", out)
	}
	if _, err := os.Stat("/var/lib/keyfs/master.sealed"); err == nil {
		t.Error("the install made a master key on its own")
	}
	unit, err := os.ReadFile("/lib/systemd/system/keyfs-mount.service")
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.Stat("/usr/bin/keyfs")
	if err != nil || bin.Mode().Perm() != 0o755 || !strings.Contains(string(unit), "ExecStart=/usr/bin/keyfs mount") {
		t.Fatalf("installed binary %v %v, unit:\n%s", bin, err, unit)
	}
	if v, err := exec.Command("/usr/bin/keyfs", "--version").CombinedOutput(); err != nil || !strings.Contains(string(v), "keyfs") {
		t.Errorf("installed keyfs --version: %q %v", v, err)
	}
	// A state the purge must keep.
	marker := "/var/lib/keyfs/master.sealed"
	if err := os.WriteFile(marker, []byte("a sealed master key"), 0o600); err != nil {
		t.Fatal(err)
	}
	purge, err := exec.Command("dpkg", "--purge", "keyfs").CombinedOutput()
	if err != nil {
		t.Fatalf("dpkg --purge: %v\n%s", err, purge)
	}
	if b, err := os.ReadFile(marker); err != nil || string(b) != "a sealed master key" {
		t.Fatalf("purge touched /var/lib/keyfs: %v", err)
	}
	if !strings.Contains(string(purge), "kept /var/lib/keyfs") {
		t.Errorf("purge does not say it kept the state:\n%s", purge)
	}
	for _, gone := range []string{"/usr/bin/keyfs", "/lib/systemd/system/keyfs-mount.service", "/etc/default/keyfs"} {
		if _, err := os.Stat(gone); err == nil {
			t.Errorf("%s left after purge", gone)
		}
	}
}
