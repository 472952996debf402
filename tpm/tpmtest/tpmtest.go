// Package tpmtest starts throw-away swtpm instances for tests.
package tpmtest

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"
)

// StartSWTPM starts a private swtpm with fresh state on free 127.0.0.1
// ports and returns its spec for tpm.Open ("swtpm:127.0.0.1:PORT"). It is
// stopped when the test ends. Without swtpm installed the test is skipped,
// unless the CI environment variable is set: then it fails.
func StartSWTPM(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("swtpm not found (CI is set, so not skipping): %v; apt-get install swtpm swtpm-tools", err)
		}
		t.Skipf("swtpm not found (%v); apt-get install swtpm swtpm-tools", err)
	}
	dir := t.TempDir()
	var lastErr string
	// A free port can be taken between probing and swtpm binding it: retry.
	for range 3 {
		addr, errText, ok := start(t, bin, dir)
		if ok {
			return "swtpm:" + addr
		}
		lastErr = errText
	}
	t.Fatalf("swtpm did not start: %s", lastErr)
	return ""
}

func start(t testing.TB, bin, dir string) (addr, errText string, ok bool) {
	port, ctrl := freePort(t), freePort(t)
	addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	var out syncBuffer
	cmd := exec.Command(bin, "socket", "--tpm2",
		"--server", "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(port),
		"--ctrl", "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(ctrl),
		"--tpmstate", "dir="+dir,
		"--flags", "not-need-init,startup-clear")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		cmd.Process.Kill()
		<-exited
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return "", out.String(), false
		default:
		}
		// swtpm serves one client at a time; this probe disconnects at once.
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			t.Cleanup(stop)
			return addr, "", true
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	return "", "not listening after 10s: " + out.String(), false
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// syncBuffer collects swtpm's output, written by exec's copying goroutine.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
