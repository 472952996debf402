package packaging

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/internal/imagetar"
	"sigs.k8s.io/yaml"
)

const toolsRef = "localhost/keyfs-test/tools:1"

// containerd is a private containerd for one test: its own root, state,
// socket and namespace (CRI off).
type containerd struct {
	t         *testing.T
	sock, ns  string
	cmd       *exec.Cmd
	container string
}

func startContainerd(t *testing.T, dir string) *containerd {
	t.Helper()
	bin := need(t, "containerd")
	need(t, "ctr")
	need(t, "runc")
	root := filepath.Join(dir, "containerd")
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, root+"/root", root+"/state", root+"/c.sock", root+"/c.sock.ttrpc", root+"/opt")
	if err := os.MkdirAll(root, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// containerd 1.6 puts its shims' sockets in /run/containerd/s.
	if _, err := os.Stat("/run/containerd"); os.IsNotExist(err) {
		t.Cleanup(func() { os.RemoveAll("/run/containerd") })
	}
	c := &containerd{t: t, sock: root + "/c.sock", ns: "keyfs-test"}
	c.cmd = exec.Command(bin, "--config", filepath.Join(root, "config.toml"))
	logs, _ := os.Create(filepath.Join(root, "containerd.log"))
	c.cmd.Stdout, c.cmd.Stderr = logs, logs
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c.container != "" {
			c.ctr("task", "kill", "-s", "KILL", c.container)
			for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
				if _, err := c.ctr("task", "delete", c.container); err == nil || strings.Contains(err.Error(), "not found") {
					break
				}
			}
			c.ctr("container", "delete", c.container)
		}
		c.cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { c.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			c.cmd.Process.Kill()
			<-done
		}
		logs.Close()
	})
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if conn, err := net.Dial("unix", c.sock); err == nil {
			conn.Close()
			break
		}
		if time.Now().After(end) {
			b, _ := os.ReadFile(filepath.Join(root, "containerd.log"))
			t.Fatalf("containerd did not answer:\n%s", b)
		}
	}
	return c
}

func (c *containerd) ctr(args ...string) (string, error) {
	b, err := exec.Command("ctr", append([]string{"--address", c.sock, "-n", c.ns}, args...)...).CombinedOutput()
	if err != nil {
		return string(b), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, b)
	}
	return string(b), nil
}

// watchLine is what e2etool watch prints when what it reads changes.
type watchLine struct {
	State, SHA256, Errno string
}

func sum(v string) string {
	s := sha256.Sum256([]byte(v))
	return hex.EncodeToString(s[:])
}

// TestContainerReadsHostMount: a container bind-mounting the host's
// /run/keyfs (recursively, with slave propagation, as
// examples/compose/compose.yaml does) reads /run/keyfs/keys/acme/openai,
// sees a keyfs put, and reads again after keyfs restarts.
func TestContainerReadsHostMount(t *testing.T) {
	fusetest.Require(t)
	dir := t.TempDir()
	// /run is a shared mount on a systemd host; the test's directory is
	// made one, so that mounts under it propagate as they would there.
	run := filepath.Join(dir, "run", "keyfs")
	if err := os.MkdirAll(run, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount(run, run, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(run, syscall.MNT_DETACH) })
	if err := syscall.Mount("", run, "", syscall.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	h := newHostKeyfs(t, dir)
	h.keyfs("sk-compose-1", "put", "acme/openai")
	h.start("acme/openai", "sk-compose-1")

	tool := filepath.Join(dir, "e2etool")
	build := exec.Command("go", "build", "-o", tool, "./test/e2e/e2etool")
	build.Dir, build.Env = "..", append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build e2etool: %v\n%s", err, out)
	}
	f, err := imagetar.Binary(tool, "/e2etool")
	if err != nil {
		t.Fatal(err)
	}
	img, err := imagetar.Build([]imagetar.File{f}, []string{"/e2etool"})
	if err != nil {
		t.Fatal(err)
	}
	tar := filepath.Join(dir, "tools.tar")
	if err := imagetar.WriteFile(tar, toolsRef, img); err != nil {
		t.Fatal(err)
	}
	c := startContainerd(t, dir)
	if _, err := c.ctr("images", "import", tar); err != nil {
		t.Fatal(err)
	}
	c.container = "reader"
	reader := exec.Command("ctr", "--address", c.sock, "-n", c.ns, "run", "--rm",
		"--mount", "type=bind,src="+run+",dst=/run/keyfs,options=rbind:ro:rslave",
		toolsRef, c.container, "/e2etool", "watch", "/run/keyfs/keys/acme/openai")
	out, err := reader.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	reader.Stderr = &stderr
	if err := reader.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan watchLine, 100)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var l watchLine
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				lines <- l
			}
		}
		close(lines)
	}()
	t.Cleanup(func() { reader.Process.Kill(); reader.Wait() })
	wait := func(what string, d time.Duration, ok func(watchLine) bool) time.Duration {
		t.Helper()
		start := time.Now()
		timeout := time.After(d)
		for {
			select {
			case l, open := <-lines:
				if !open {
					t.Fatalf("the container stopped before %s: %s", what, stderr.String())
				}
				if ok(l) {
					return time.Since(start)
				}
			case <-timeout:
				t.Fatalf("the container did not see %s within %s: %s", what, d, stderr.String())
			}
		}
	}
	wait("the key", 30*time.Second, func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum("sk-compose-1") })
	h.keyfs("sk-compose-2", "put", "acme/openai")
	d := wait("the new value", 5*time.Second, func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum("sk-compose-2") })
	t.Logf("the container read the new value %s after keyfs put", d.Round(10*time.Millisecond))
	// keyfs restarts (an upgrade, systemctl restart): the container reads
	// the new mount, with no restart of its own.
	// A value put while keyfs is down shows that the container reads the
	// new mount, not a leftover of the old one.
	if err := h.stop(); err != nil {
		t.Fatal(err)
	}
	h.keyfs("sk-compose-3", "put", "acme/openai")
	h.start("acme/openai", "sk-compose-3")
	d = wait("the key after keyfs restarted", 10*time.Second, func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum("sk-compose-3") })
	t.Logf("the container read the key %s after keyfs was up again", d.Round(10*time.Millisecond))
}

// TestComposeExample: examples/compose/compose.yaml mounts /run/keyfs as
// the container test does: read-only, rslave, and reads the key by file.
func TestComposeExample(t *testing.T) {
	b, err := os.ReadFile("../examples/compose/compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Services map[string]map[string]any
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("compose.yaml: %v", err)
	}
	app, ok := c.Services["app"]
	vols, _ := app["volumes"].([]any)
	if !ok || len(vols) != 1 {
		t.Fatalf("compose.yaml: want service app with one volume: %+v", c)
	}
	v, _ := vols[0].(map[string]any)
	bind, _ := v["bind"].(map[string]any)
	if v["type"] != "bind" || v["source"] != "/run/keyfs" || v["target"] != "/run/keyfs" || v["read_only"] != true || bind["propagation"] != "rslave" {
		t.Errorf("the keyfs bind mount: %v, want /run/keyfs read-only with rslave propagation", v)
	}
	if cmd := fmt.Sprint(app["command"]); !strings.Contains(cmd, "/run/keyfs/keys/acme/openai") || app["environment"] != nil {
		t.Errorf("the app does not read the key from its file, or takes keys in its environment: %v", app)
	}
}
