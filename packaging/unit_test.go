package packaging

import (
	"errors"
	"fmt"
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
	"github.com/keyfs/keyfs/internal/testenv"
	"github.com/keyfs/keyfs/tpm/tpmtest"
)

// maxExposure is the unit's systemd-analyze security score as measured
// (goal: 2.0 or less): a change that loosens the sandbox fails here.
const maxExposure = 1.6

func need(t *testing.T, bin string) string {
	t.Helper()
	p, err := exec.LookPath(bin)
	if err != nil {
		testenv.Missing(t, fmt.Sprintf("%s not found: %v", bin, err))
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

// hostKeyfs is keyfs run as the unit runs it, on a test state and swtpm.
type hostKeyfs struct {
	t          *testing.T
	bin, state string
	mnt, spec  string
	line       string // the unit's command line, paths replaced
	cmd        *exec.Cmd
	done       chan error
	logs       *strings.Builder
}

// newHostKeyfs prepares the unit's ExecStart, with its environment file's
// options, against a test state in a new master key, an swtpm and a mount
// point under dir/run/keyfs/keys.
func newHostKeyfs(t *testing.T, dir string) *hostKeyfs {
	t.Helper()
	h := &hostKeyfs{t: t, bin: buildKeyfs(t, dir, false), state: filepath.Join(dir, "state"), mnt: filepath.Join(dir, "run", "keyfs", "keys"), spec: tpmtest.StartSWTPM(t)}
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
	h.line = strings.NewReplacer("/usr/bin/keyfs", h.bin, "/var/lib/keyfs", h.state, "/dev/tpmrm0", h.spec, "/run/keyfs/keys", h.mnt,
		"$KEYFS_MOUNT_OPTS", string(opts[1])).Replace(string(m[1]))
	h.keyfs("", "init")
	t.Cleanup(func() {
		h.stop()
		if ok, _ := fusetest.Mounted(h.mnt); ok {
			syscall.Unmount(h.mnt, syscall.MNT_DETACH)
		}
	})
	return h
}

// keyfs runs a keyfs command on the state.
func (h *hostKeyfs) keyfs(stdin string, args ...string) {
	h.t.Helper()
	cmd := exec.Command(h.bin, args...)
	cmd.Env, cmd.Stdin = append(os.Environ(), "KEYFS_STATE="+h.state, "KEYFS_TPM="+h.spec), strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		h.t.Fatalf("keyfs %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// start runs the unit's command line and waits until file reads want.
func (h *hostKeyfs) start(file, want string) {
	h.t.Helper()
	args := strings.Fields(h.line)
	h.cmd, h.logs, h.done = exec.Command(args[0], args[1:]...), &strings.Builder{}, make(chan error, 1)
	h.cmd.Stderr = h.logs
	if err := h.cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	go func(c *exec.Cmd, done chan error) { done <- c.Wait() }(h.cmd, h.done)
	var got []byte
	var err error
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if got, err = os.ReadFile(filepath.Join(h.mnt, file)); err == nil && string(got) == want {
			return
		}
	}
	h.t.Fatalf("the unit's command line (%s) serves %q, %v:\n%s", h.line, got, err, h.logs)
}

// stop sends SIGTERM, as systemctl stop does, and returns how it exited.
func (h *hostKeyfs) stop() error {
	if h.cmd == nil || h.cmd.ProcessState != nil {
		return nil
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-h.done:
		return err
	case <-time.After(30 * time.Second):
		h.cmd.Process.Kill()
		<-h.done
		return errors.New("keyfs mount did not stop on SIGTERM")
	}
}

// TestUnitCommandRuns runs the unit's ExecStart for real, with its
// environment file's options, against a test state, an swtpm and a
// temporary mount point. (Its sandbox needs systemd as PID 1, which this
// machine lacks; systemd-analyze checks it above.)
func TestUnitCommandRuns(t *testing.T) {
	fusetest.Require(t)
	h := newHostKeyfs(t, t.TempDir())
	h.keyfs("sk-host-1", "put", "acme/openai")
	h.start("acme/openai", "sk-host-1")
	if err := h.stop(); err != nil {
		t.Fatalf("keyfs mount on SIGTERM (what systemctl stop sends): %v", err)
	}
	if ok, _ := fusetest.Mounted(h.mnt); ok {
		t.Error("still mounted after stop")
	}
}
