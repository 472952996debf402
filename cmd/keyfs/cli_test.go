package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/kubetest"
	"github.com/keyfs/keyfs/internal/syncbuf"
	"github.com/keyfs/keyfs/tpm/tpmtest"
)

var keyfsBin string

// TestMain builds the real binary, with the simulator, once: the tests run
// it as a user would.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "keyfs-cli-test-")
	if err != nil {
		panic(err)
	}
	os.Chmod(dir, 0o755) // a test runs the binary as an unprivileged user
	keyfsBin = filepath.Join(dir, "keyfs")
	out, err := exec.Command("go", "build", "-tags", "simulator", "-o", keyfsBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build keyfs: %v\n%s", err, out)
		os.Exit(1)
	}
	code := kubetest.Main(m)
	os.RemoveAll(dir)
	os.Exit(code)
}

type cli struct {
	t     *testing.T
	state string
	tpm   string
	env   []string // more, such as KEYFS_STORE=kubernetes
}

type result struct {
	stdout, stderr string
	code           int
}

func (c *cli) run(stdin string, args ...string) result {
	c.t.Helper()
	cmd := c.keyfsCmd(args...)
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	err := waitOrDump(c.t, cmd, time.Minute, &e)
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatal(err)
	}
	return result{o.String(), e.String(), code}
}

// waitOrDump waits for cmd; past d it sends SIGQUIT, so a Go child prints
// every goroutine to stderr, and fails the test with that dump: a hang is
// a diagnosis, not a silent test timeout.
func waitOrDump(t *testing.T, cmd *exec.Cmd, d time.Duration, stderr fmt.Stringer) error {
	t.Helper()
	cmd.WaitDelay = 5 * time.Second // a grandchild holding our pipes cannot block Wait
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		cmd.Process.Signal(syscall.SIGQUIT)
		select { // a Go child dumps and exits at once; give others 2s
		case <-done:
		case <-time.After(2 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		t.Fatalf("%s did not exit within %v; its stderr:\n%s", strings.Join(cmd.Args, " "), d, stderr.String())
		return nil
	}
}

// keyfsCmd is keyfs with args against this cli's state and TPM.
func (c *cli) keyfsCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(keyfsBin, args...)
	cmd.Env = append(append(os.Environ(), "KEYFS_STATE="+c.state, "KEYFS_TPM="+c.tpm), c.env...)
	return cmd
}

// startChild starts a long-running command (serve, mount) and returns its
// stderr, unless the caller set one. When the test ends the child is
// killed, unless the test waited for it.
func startChild(t *testing.T, cmd *exec.Cmd) *syncbuf.Buffer {
	t.Helper()
	logs := &syncbuf.Buffer{}
	if cmd.Stderr == nil {
		cmd.Stderr = logs
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			waitOrDump(t, cmd, 30*time.Second, logs)
		}
	})
	return logs
}

// poll checks cond every 10 ms until it holds or d passes, and says which.
func poll(d time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(d); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

// writeFile writes s to path, failing t on an error.
func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// logged reports whether a running child's log shows s within a few
// seconds: what the child wrote reaches logs through a pipe, a little later.
func logged(logs *syncbuf.Buffer, s string) bool {
	return poll(5*time.Second, func() bool { return strings.Contains(logs.String(), s) })
}

// metricsText returns serve's /metrics text at addr, "" while it does not answer.
func metricsText(addr string) string {
	r, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return ""
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return string(b)
}

// must runs keyfs and fails the test unless it exits with want.
func (c *cli) must(want int, stdin string, args ...string) result {
	c.t.Helper()
	r := c.run(stdin, args...)
	if r.code != want {
		c.t.Fatalf("keyfs %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, want, r.stdout, r.stderr)
	}
	return r
}

// noValueIn fails if any file under dir contains any of the values.
func noValueIn(t *testing.T, dir string, values ...string) {
	t.Helper()
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return nil
		}
		b, _ := os.ReadFile(p)
		for _, v := range values {
			if bytes.Contains(b, []byte(v)) {
				t.Errorf("%s contains a value", p)
			}
		}
		return nil
	})
}

func TestCLIEndToEnd(t *testing.T) {
	c := &cli{t: t, state: filepath.Join(t.TempDir(), "state"), tpm: "sim"}
	work := t.TempDir()

	kid := strings.TrimSpace(c.must(0, "", "init").stdout)
	if len(kid) != 16 {
		t.Fatalf("init printed %q, want a 16-hex-digit kid", kid)
	}
	if r := c.must(exitError, "", "init"); !strings.Contains(r.stderr, "--force") {
		t.Fatalf("second init: %s", r.stderr)
	}
	pub := c.must(0, "", "pubkey").stdout
	if !strings.Contains(pub, "kid: "+kid) {
		t.Fatalf("pubkey does not name kid %s:\n%s", kid, pub)
	}
	pubFile := filepath.Join(work, "master.pub")
	os.WriteFile(pubFile, []byte(pub), 0o644)

	// seal needs no TPM and no state.
	offline := &cli{t: t, state: filepath.Join(work, "no-state"), tpm: "/nonexistent/tpm"}
	recFile := filepath.Join(work, "anthropic.rec")
	writeFile(t, recFile, offline.must(0, "sk-ant-offline-1\n", "seal", "--pubkey", pubFile, "--tenant", "acme", "--name", "anthropic").stdout)
	if _, err := os.Stat(offline.state); err == nil {
		t.Fatal("seal created a state directory")
	}
	c.must(0, "", "import", recFile)

	c.must(0, "sk-test", "put", "acme/openai")
	c.must(0, "sk-beta-1\n", "put", "beta/openai")
	ls := c.must(0, "", "ls").stdout
	for _, want := range []string{"TENANT", "acme  ", "anthropic", "openai", "beta", kid} {
		if !strings.Contains(ls, want) {
			t.Errorf("ls output lacks %q:\n%s", want, ls)
		}
	}
	if lines := strings.Count(ls, "\n"); lines != 4 {
		t.Errorf("ls printed %d lines, want header + 3 keys:\n%s", lines, ls)
	}
	if ls := c.must(0, "", "ls", "beta").stdout; strings.Contains(ls, "acme") {
		t.Errorf("ls beta shows acme:\n%s", ls)
	}
	if v := c.must(0, "", "verify").stdout; strings.Count(v, " ok") != 3 {
		t.Fatalf("verify:\n%s", v)
	}

	// Rotation and rm: the previous version comes back, then nothing.
	c.must(0, "sk-test-2", "put", "acme/openai")
	r := c.must(0, "", "rm", "acme/openai")
	if !strings.Contains(r.stderr, "is now current") {
		t.Errorf("rm of a rotated key does not say what is current: %s", r.stderr)
	}
	c.must(0, "", "rm", "acme/openai", "--all-versions")
	c.must(exitNotFound, "", "rm", "acme/openai")
	if ls := c.must(0, "", "ls", "acme").stdout; strings.Contains(ls, "openai") {
		t.Errorf("acme/openai still listed after rm --all-versions:\n%s", ls)
	}
	noValueIn(t, c.state, "sk-test", "sk-ant-offline-1", "sk-beta-1")
	for _, res := range []result{r} {
		if strings.Contains(res.stderr+res.stdout, "sk-") {
			t.Error("a command printed a value")
		}
	}
}

func TestCLIBadInput(t *testing.T) {
	c := &cli{t: t, state: filepath.Join(t.TempDir(), "state"), tpm: "sim"}
	work := t.TempDir()
	c.must(0, "", "init")
	c.must(0, "sk-keep", "put", "acme/openai")
	snapshot := func() string {
		var b strings.Builder
		filepath.Walk(filepath.Join(c.state, "store"), func(p string, fi os.FileInfo, err error) error {
			if err == nil && !fi.IsDir() && !strings.HasPrefix(fi.Name(), ".lock") {
				data, _ := os.ReadFile(p)
				fmt.Fprintf(&b, "%s %x\n", p, data)
			}
			return nil
		})
		return b.String()
	}
	before := snapshot()

	usage := []struct {
		stdin string
		args  []string
		want  string
	}{
		{"", []string{"put", "acme/openai"}, "empty"},
		{"\n", []string{"put", "acme/openai"}, "empty"},
		{strings.Repeat("x", 64<<10+1), []string{"put", "acme/openai"}, "over 65536 bytes"},
		{"v", []string{"put", "Acme/openai"}, "a tenant is 1-63 characters"},
		{"v", []string{"put", "acme/../x"}, "a key name is 1-63 characters"},
		{"v", []string{"put", "acme"}, "TENANT/NAME"},
		{"v", []string{"put", "acme/openai", "sk-in-argv"}, "accepts 1 arg"},
		{"", []string{"init", "--pcrs", "7,99"}, "PCR"},
		{"", []string{"ls", "--nope"}, "unknown flag"},
		{"", []string{"audit", "-o", "xml"}, "want table or json"},
	}
	for _, u := range usage {
		r := c.must(exitUsage, u.stdin, u.args...)
		if !strings.Contains(r.stderr, u.want) {
			t.Errorf("keyfs %v: stderr %q lacks %q", u.args, r.stderr, u.want)
		}
		if strings.Contains(r.stderr, "sk-in-argv") {
			t.Errorf("keyfs %v echoed an argument value", u.args)
		}
	}

	// Records that must not be imported, each with its own message.
	other := &cli{t: t, state: filepath.Join(t.TempDir(), "other"), tpm: "sim"}
	otherKid := strings.TrimSpace(other.must(0, "", "init", "--force").stdout)
	os.WriteFile(filepath.Join(work, "other.pub"), []byte(other.must(0, "", "pubkey").stdout), 0o644)
	os.WriteFile(filepath.Join(work, "mine.pub"), []byte(c.must(0, "", "pubkey").stdout), 0o644)
	seal := func(pub, tenant string) string {
		return c.must(0, "sk-bad-import", "seal", "--pubkey", filepath.Join(work, pub), "--tenant", tenant, "--name", "openai").stdout
	}
	good := seal("mine.pub", "acme")
	flip := []byte(good)
	i := strings.LastIndex(good, "\nend ") - 3
	flip[i] ^= 1
	cases := map[string]struct {
		text, want string
		code       int
	}{
		"other-kid": {seal("other.pub", "acme"), "sealed to kid " + otherKid, exitIntegrity},
		"renamed":   {strings.Replace(good, "tenant: acme", "tenant: beta", 1), "does not authenticate", exitIntegrity},
		"flipped":   {string(flip), "", exitIntegrity},
		"truncated": {good[:len(good)/2], "truncated", exitIntegrity},
		"garbage":   {"sk-pasted-by-mistake\n", "not a keyfs record", exitIntegrity},
	}
	for name, cs := range cases {
		f := filepath.Join(work, name+".rec")
		os.WriteFile(f, []byte(cs.text), 0o644)
		r := c.must(cs.code, "", "import", f)
		if !strings.Contains(r.stderr, cs.want) || strings.Contains(r.stderr, "sk-") {
			t.Errorf("import %s: %q, want %q and no value", name, r.stderr, cs.want)
		}
	}
	// One bad record among good ones stores nothing.
	okFile := filepath.Join(work, "ok.rec")
	os.WriteFile(okFile, []byte(seal("mine.pub", "gamma")), 0o644)
	c.must(exitIntegrity, "", "import", okFile, filepath.Join(work, "garbage.rec"))
	if after := snapshot(); after != before {
		t.Fatalf("a refused command changed the store")
	}
	c.must(exitNotFound, "", "--state", filepath.Join(work, "missing"), "ls")
}

// TestCLISWTPM: PCR binding, a foreign TPM, and recovery onto a new TPM,
// with swtpm instances the test starts.
func TestCLISWTPM(t *testing.T) {
	nodeA, nodeB := tpmtest.StartSWTPM(t), tpmtest.StartSWTPM(t)
	work := t.TempDir()
	c := &cli{t: t, state: filepath.Join(work, "state"), tpm: nodeA}
	recKey := filepath.Join(work, "recovery.key")
	c.must(0, "", "recovery-keygen", "-o", recKey)
	c.must(exitError, "", "recovery-keygen", "-o", recKey) // never overwrites
	kid := strings.TrimSpace(c.must(0, "", "init", "--pcrs", "16", "--recovery-pub", recKey+".pub").stdout)
	c.must(0, "sk-swtpm", "put", "acme/openai")
	c.must(0, "", "verify")

	// PCR 16 moves: unseal is refused, naming the PCR.
	tr := tpmtest.Dial(t, nodeA)
	tpmtest.ExtendPCR(t, tr, 16, []byte("boot changed"))
	tr.Close()
	if r := c.must(exitTPM, "", "verify"); !strings.Contains(r.stderr, "PCRs 16") {
		t.Fatalf("PCR failure does not name PCR 16: %s", r.stderr)
	}

	// The node's state on a new TPM: refused at its storage key (pinned),
	// then recovered.
	c.tpm = nodeB
	if r := c.must(exitTPM, "", "verify"); !strings.Contains(r.stderr, "another TPM") || !strings.Contains(r.stderr, "this TPM presents SRK") {
		t.Fatalf("foreign TPM: %s", r.stderr)
	}
	wrong := filepath.Join(work, "wrong.key")
	c.must(0, "", "recovery-keygen", "-o", wrong)
	if r := c.must(exitIntegrity, "", "recover", "--recovery-key", wrong); !strings.Contains(r.stderr, "sealed to kid") {
		t.Fatalf("recover with the wrong key: %s", r.stderr)
	}
	if got := strings.TrimSpace(c.must(0, "", "recover", "--recovery-key", recKey).stdout); got != kid {
		t.Fatalf("recover restored kid %s, want %s", got, kid)
	}
	if v := c.must(0, "", "verify").stdout; !strings.Contains(v, "openai") || !strings.Contains(v, " ok") {
		t.Fatalf("after recover:\n%s", v)
	}
	noValueIn(t, c.state, "sk-swtpm")
}

func TestCLINoTPM(t *testing.T) {
	c := &cli{t: t, state: t.TempDir(), tpm: "/nonexistent/tpmrm0"}
	if r := c.must(exitTPM, "", "init"); !strings.Contains(r.stderr, "/nonexistent/tpmrm0") {
		t.Fatalf("no TPM: %s", r.stderr)
	}
	if _, err := os.Stat(filepath.Join(c.state, "master.pub")); err == nil {
		t.Fatal("failed init wrote master.pub")
	}
}

// TestCLIPinsLegacyBlob: master.sealed written before SRK pinning unseals
// once, is upgraded with the pin (and says so), and is checked from then on.
func TestCLIPinsLegacyBlob(t *testing.T) {
	c := &cli{t: t, state: filepath.Join(t.TempDir(), "state"), tpm: tpmtest.StartSWTPM(t)}
	c.must(0, "", "init")
	c.must(0, "sk-legacy", "put", "acme/openai")
	sealed := filepath.Join(c.state, "master.sealed")
	b, err := os.ReadFile(sealed)
	if err != nil {
		t.Fatal(err)
	}
	pin := regexp.MustCompile(`(?m)^srk: [0-9a-f]{68}\n`)
	if !pin.Match(b) {
		t.Fatalf("init wrote no SRK pin:\n%s", b)
	}
	if err := os.WriteFile(sealed, pin.ReplaceAll(b, nil), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := c.must(0, "", "verify"); !strings.Contains(r.stderr, "predated SRK pinning: it now pins") {
		t.Fatalf("legacy blob not upgraded, or silently: %s", r.stderr)
	}
	if after, _ := os.ReadFile(sealed); !bytes.Equal(after, b) {
		t.Errorf("upgraded blob differs from what init wrote:\n%s\nwant\n%s", after, b)
	}
	if r := c.must(0, "", "verify"); strings.Contains(r.stderr, "pinning") {
		t.Errorf("upgraded twice: %s", r.stderr)
	}
}
