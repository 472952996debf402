package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/tpm/tpmtest"
)

// maxExposure is the unit's systemd-analyze security score as measured
// (goal: 2.0 or less): a change that loosens the sandbox fails here.
const maxExposure = 1.6

func need(t *testing.T, bin string) string {
	t.Helper()
	p, err := exec.LookPath(bin)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s not found (CI is set, so not skipping): %v", bin, err)
		}
		t.Skipf("%s not found: %v", bin, err)
	}
	return p
}

// buildKeyfs builds the keyfs binary (with the simulator for tests, or
// the static production one) into dir.
func buildKeyfs(t *testing.T, dir string, simulator bool) string {
	t.Helper()
	out := filepath.Join(dir, "keyfs")
	args := []string{"build", "-o", out}
	if simulator {
		args = append(args, "-tags", "simulator")
	}
	cmd := exec.Command("go", append(args, "../cmd/keyfs")...)
	if !simulator {
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	}
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build keyfs: %v\n%s", err, b)
	}
	return out
}

// unitWith is the unit with its binary at bin, in a file of dir.
func unitWith(t *testing.T, dir, bin string) string {
	t.Helper()
	b, err := os.ReadFile("keyfs-mount.service")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "keyfs-mount.service")
	if err := os.WriteFile(p, []byte(strings.ReplaceAll(string(b), "/usr/bin/keyfs", bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestUnitVerifies(t *testing.T) {
	sa := need(t, "systemd-analyze")
	dir := t.TempDir()
	unit := unitWith(t, dir, buildKeyfs(t, dir, false))
	if out, err := exec.Command(sa, "verify", "--man=no", unit).CombinedOutput(); err != nil || len(out) != 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	out, _ := exec.Command(sa, "security", "--offline=yes", unit).CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for keyfs-mount\.service: ([0-9.]+) (\S+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	score, _ := strconv.ParseFloat(string(m[1]), 64)
	t.Logf("systemd-analyze security: exposure %.1f %s", score, m[2])
	if score > maxExposure {
		t.Errorf("exposure %.1f (%s), worse than %.1f: the sandbox was loosened", score, m[2], maxExposure)
	}
}

// TestUnitCommandRuns runs the unit's ExecStart for real, with its
// environment file's options, against a test state, an swtpm and a
// temporary mount point. (Its sandbox needs systemd as PID 1, which this
// machine lacks; systemd-analyze checks it above.)
func TestUnitCommandRuns(t *testing.T) {
	fusetest.Require(t)
	dir := t.TempDir()
	bin := buildKeyfs(t, dir, false)
	b, err := os.ReadFile("keyfs-mount.service")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ExecStart=(.*)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("no ExecStart")
	}
	def, err := os.ReadFile("keyfs.default")
	if err != nil {
		t.Fatal(err)
	}
	opts := regexp.MustCompile(`(?m)^KEYFS_MOUNT_OPTS="(.*)"$`).FindSubmatch(def)
	if opts == nil {
		t.Fatal("keyfs.default sets no KEYFS_MOUNT_OPTS")
	}
	state, mnt, spec := filepath.Join(dir, "state"), filepath.Join(dir, "run", "keys"), tpmtest.StartSWTPM(t)
	line := strings.NewReplacer("/usr/bin/keyfs", bin, "/var/lib/keyfs", state, "/dev/tpmrm0", spec, "/run/keyfs/keys", mnt,
		"$KEYFS_MOUNT_OPTS", string(opts[1])).Replace(string(m[1]))
	args := strings.Fields(line)
	env := append(os.Environ(), "KEYFS_STATE="+state, "KEYFS_TPM="+spec)
	for _, c := range []struct{ stdin, args string }{{"", "init"}, {"sk-host-1", "put acme/openai"}} {
		cmd := exec.Command(bin, strings.Fields(c.args)...)
		cmd.Env, cmd.Stdin = env, strings.NewReader(c.stdin)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("keyfs %s: %v\n%s", c.args, err, out)
		}
	}
	t.Cleanup(func() {
		if ok, _ := fusetest.Mounted(mnt); ok {
			syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
	})
	cmd := exec.Command(args[0], args[1:]...)
	var logs strings.Builder
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-done
		}
	})
	var got []byte
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if got, err = os.ReadFile(filepath.Join(mnt, "acme", "openai")); err == nil {
			break
		}
	}
	if string(got) != "sk-host-1" {
		t.Fatalf("the unit's command line (%s) serves %q, %v", line, got, err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("keyfs mount on SIGTERM (what systemctl stop sends): %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("keyfs mount did not stop on SIGTERM")
	}
	if ok, _ := fusetest.Mounted(mnt); ok {
		t.Error("still mounted after stop")
	}
}
