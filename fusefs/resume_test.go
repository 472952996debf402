package fusefs

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/internal/fdpass"
	"github.com/keyfs/keyfs/keystore"
)

// server is a child process serving a view of the env's store: a server
// that can be killed with SIGKILL, as a crashed keyfs is.
type server struct {
	cmd   *exec.Cmd
	lines chan string // its stdout
	done  chan struct{}
}

// startServer runs TestServerHelper in a child. mode "mount" mounts mnt
// and deposits the session with this process, which is its holder; mode
// "resume" takes over sess. The child stalls every READ of key "slow".
func (e *env) startServer(t *testing.T, mode, mnt string, seed []byte, sess *Session) (*server, *Session) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestServerHelper$")
	cmd.Env = append(os.Environ(), "KEYFS_TEST_SERVER="+strings.Join([]string{mode, e.store.Root(), mnt, hex.EncodeToString(seed), e.audit}, "|"))
	cmd.Stderr = os.Stderr
	var holder *net.UnixConn
	switch mode {
	case "mount":
		c, peer, err := fdpass.Pair()
		if err != nil {
			t.Fatal(err)
		}
		defer peer.Close()
		holder = c
		cmd.ExtraFiles = []*os.File{peer}
	case "resume":
		f := os.NewFile(uintptr(dup(t, sess.FD)), "fuse")
		defer f.Close()
		cmd.ExtraFiles = []*os.File{f}
		cmd.Env = append(cmd.Env, "KEYFS_TEST_SESSION="+hex.EncodeToString(sess.MarshalState()))
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, lines: make(chan string, 16), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(s.kill)
	var got *Session
	if holder != nil {
		defer holder.Close()
		msg, fds, err := fdpass.Recv(holder)
		if err != nil || len(fds) != 1 {
			t.Fatalf("no session from the server: %v (%d fds)", err, len(fds))
		}
		sess, err := ParseSession(msg, fds[0])
		if err != nil {
			t.Fatal(err)
		}
		got = &sess
	}
	s.expect(t, mode+"ed")
	return s, got
}

func (s *server) expect(t *testing.T, line string) {
	t.Helper()
	select {
	case l := <-s.lines:
		if l != line {
			t.Fatalf("server said %q, want %q", l, line)
		}
	case <-s.done:
		t.Fatalf("server exited before saying %q", line)
	case <-time.After(10 * time.Second):
		t.Fatalf("server did not say %q within 10s", line)
	}
}

func (s *server) kill() {
	s.cmd.Process.Kill()
	<-s.done
}

func dup(t *testing.T, fd int) int {
	t.Helper()
	n, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// startFirst mounts a view in a child server, this process its holder.
func (e *env) startFirst(t *testing.T, seed []byte) (*server, *Session, string) {
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	first, sess := e.startServer(t, "mount", mnt, seed, nil)
	holdSession(t, sess)
	return first, sess, mnt
}

// holdSession keeps the connection alive in this process for the test and
// unmounts and closes it at the end, so nothing is left hanging.
func holdSession(t *testing.T, sess *Session) {
	t.Cleanup(func() {
		unix.Unmount(sess.Mountpoint, unix.MNT_DETACH)
		unix.Close(sess.FD)
	})
}

// TestResumeAfterKill: kill -9 of the server while a READ is in flight; a
// successor takes the connection over. The in-flight read completes, a
// loop of open/read/close sees no failure, an fd opened before reads on,
// and a key changed during the gap reads new, with its new size.
func TestResumeAfterKill(t *testing.T) {
	t.Setenv("KEYFS_TEST_DIRECT", "1") // the stalled READ must reach the server
	e := newEnv(t)
	seed := e.seed
	e.put("acme", "openai", "v1")
	e.put("acme", "slow", "slow-value")
	first, sess, mnt := e.startFirst(t, seed)
	key := filepath.Join(mnt, "acme", "openai")

	held, err := os.Open(key)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if b := make([]byte, 16); mustPread(t, held, b) != "v1" {
		t.Fatal("held fd did not read v1")
	}

	l := startReadLoop(t, key)
	slow := readAsync(filepath.Join(mnt, "acme", "slow"), "slow-value")
	first.expect(t, "stalled")
	within(t, 5*time.Second, "20 reads before the kill", func() bool { return l.reads.Load() >= 20 })
	first.kill()
	killed := time.Now()

	e.put("acme", "openai", "v2-longer") // during the gap
	time.Sleep(300 * time.Millisecond)
	e.startServer(t, "resume", mnt, seed, sess)
	resumed := time.Now()

	select {
	case err := <-slow:
		if err != nil {
			t.Fatalf("the READ in flight at the kill: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the READ in flight at the kill never completed (was it resent?)")
	}
	l.finish(t, "v2-longer")
	if fi, err := os.Stat(key); err != nil || fi.Size() != int64(len("v2-longer")) {
		t.Fatalf("stat after the restart: %v, %v; want the new size %d", fi.Size(), err, len("v2-longer"))
	}
	if got := mustPread(t, held, make([]byte, 16)); got != "v2-longer" {
		t.Fatalf("fd opened before the restart reads %q, want the newest version", got)
	}
	t.Logf("gap %v (kill to successor serving); %d reads, 0 failed", resumed.Sub(killed).Round(time.Millisecond), l.reads.Load())
}

// TestResumePassthrough: kill -9 of a server whose key files are passed
// through to memory files. A file open at the kill reads on while no
// keyfs runs, and keeps the version it opened; the successor serves the
// version put during the gap, and no open or read fails across the
// restart.
func TestResumePassthrough(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	probe, _ := e.mount(Options{})
	requirePassthrough(t, probe)
	first, sess, mnt := e.startFirst(t, e.seed)
	key := filepath.Join(mnt, "acme", "openai")
	held, err := os.Open(key)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if got := mustPread(t, held, make([]byte, 16)); got != "v1" {
		t.Fatalf("held fd reads %q, want v1", got)
	}
	if !holdsMemfd(t, first.cmd.Process.Pid) {
		t.Fatal("the server holds no memory file while a key file is open: not passed through")
	}

	l := startReadLoop(t, key)
	within(t, 5*time.Second, "20 reads before the kill", func() bool { return l.reads.Load() >= 20 })
	first.kill()
	got := make(chan string, 1)
	go func() {
		b := make([]byte, 16)
		n, _ := held.ReadAt(b, 0)
		got <- string(b[:n])
	}()
	select {
	case g := <-got:
		if g != "v1" {
			t.Fatalf("with no keyfs running the held fd reads %q, want v1", g)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("with no keyfs running the held fd does not read: not passed through")
	}
	e.put("acme", "openai", "v2-longer")
	e.startServer(t, "resume", mnt, e.seed, sess)
	l.finish(t, "v2-longer")
	if fi, err := os.Stat(key); err != nil || fi.Size() != int64(len("v2-longer")) {
		t.Fatalf("stat after the restart: %v; want the new size %d", err, len("v2-longer"))
	}
	if got := mustPread(t, held, make([]byte, 16)); got != "v1" {
		t.Fatalf("fd opened before the restart reads %q, want the version it opened", got)
	}
}

// holdsMemfd says whether process pid has a keyfs memory file open.
func holdsMemfd(t *testing.T, pid int) bool {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		if l, err := os.Readlink(filepath.Join(dir, fd.Name())); err == nil && strings.HasPrefix(l, "/memfd:keyfs") {
			return true
		}
	}
	return false
}

// readLoop opens, reads and closes a key every 5 ms across a restart.
type readLoop struct {
	reads, failures atomic.Int64
	last            atomic.Value
	stop            chan struct{}
	stopOnce        sync.Once
	wg              sync.WaitGroup
}

func (l *readLoop) halt() {
	l.stopOnce.Do(func() { close(l.stop) })
	l.wg.Wait()
}

func startReadLoop(t *testing.T, key string) *readLoop {
	l := &readLoop{stop: make(chan struct{})}
	l.wg.Go(func() {
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			b, err := os.ReadFile(key)
			if err != nil {
				l.failures.Add(1)
				t.Errorf("read during the restart: %v", err)
				continue
			}
			l.reads.Add(1)
			l.last.Store(string(b))
		}
	})
	t.Cleanup(l.halt) // a test that stops early must not be failed after it ended
	return l
}

// finish waits for the loop to read want and 20 reads more, stops it and
// fails the test if any read failed.
func (l *readLoop) finish(t *testing.T, want string) {
	t.Helper()
	within(t, 5*time.Second, "the loop reads "+want, func() bool { return l.last.Load() == want })
	after := l.reads.Load()
	within(t, 5*time.Second, "20 reads after the restart", func() bool { return l.reads.Load() >= after+20 })
	l.halt()
	if n := l.failures.Load(); n != 0 {
		t.Fatalf("%d of %d reads failed across the restart", n, l.reads.Load()+n)
	}
}

func mustPread(t *testing.T, f *os.File, b []byte) string {
	t.Helper()
	n, err := f.ReadAt(b, 0)
	if err != nil && n == 0 {
		t.Fatalf("pread %s: %v", f.Name(), err)
	}
	return string(b[:n])
}

// TestResumeAuditsOpenOnce: an OPEN the killed server took is sent again
// to its successor, which records it only if the dead one had not: one
// open event per open, either way.
//
// With direct I/O: on a passthrough connection the successor answers a
// predecessor's inode ESTALE, and the kernel retries the open as a new one.
func TestResumeAuditsOpenOnce(t *testing.T) {
	t.Setenv("KEYFS_TEST_DIRECT", "1")
	e := newEnv(t)
	e.put("acme", "slow-open-before", "b")
	e.put("acme", "slow-open-after", "a")
	first, sess, mnt := e.startFirst(t, e.seed)
	done := make(chan error, 2)
	for _, k := range []string{"slow-open-before", "slow-open-after"} {
		go func() {
			_, err := os.ReadFile(filepath.Join(mnt, "acme", k))
			done <- err
		}()
	}
	first.expect(t, "stalled")
	first.expect(t, "stalled")
	first.kill()
	e.startServer(t, "resume", mnt, e.seed, sess)
	for range 2 {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("open in flight at the kill: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("an open in flight at the kill never completed")
		}
	}
	opens := map[string][]audit.Event{}
	b, err := os.ReadFile(e.audit)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var ev audit.Event
		if json.Unmarshal([]byte(line), &ev) == nil && ev.Event == "open" {
			opens[ev.Key] = append(opens[ev.Key], ev)
		}
	}
	if evs := opens["slow-open-after"]; len(evs) != 1 || evs[0].Reason != "" {
		t.Errorf("open recorded before the kill: %d events %+v, want the one the killed server wrote", len(evs), evs)
	}
	if evs := opens["slow-open-before"]; len(evs) != 1 || !strings.Contains(evs[0].Reason, "sent again") {
		t.Errorf("open not recorded before the kill: %d events %+v, want one by the successor, saying so", len(evs), evs)
	}
}

// TestResumeRefusesOtherSettings: a successor that would answer INIT
// differently refuses to serve the connection and says why.
func TestResumeRefusesOtherSettings(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	s, _ := e.mount(Options{})
	sess := s.Session()
	sess.Reply = append([]byte(nil), sess.Reply...)
	sess.Reply[len(sess.Reply)-1] ^= 1 // as if negotiated otherwise
	sess.FD = dup(t, sess.FD)
	defer unix.Close(sess.FD)
	_, err := Resume(sess, Options{Store: e.index, Key: e.key})
	if err == nil || !strings.Contains(err.Error(), "would negotiate") {
		t.Fatalf("Resume with other settings: %v", err)
	}
}

func TestSessionState(t *testing.T) {
	in := Session{Mountpoint: "/a/b", Dev: "0:42", Init: []byte{1, 2, 3}, Reply: []byte{4}}
	got, err := ParseSession(in.MarshalState(), 7)
	if err != nil || got.Mountpoint != "/a/b" || got.Dev != "0:42" || string(got.Init) != "\x01\x02\x03" || string(got.Reply) != "\x04" || got.FD != 7 {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	st := in.MarshalState()
	for _, bad := range [][]byte{nil, []byte("junk"), st[:len(st)-1]} {
		if _, err := ParseSession(bad, 0); err == nil {
			t.Errorf("ParseSession(%q) accepted", bad)
		}
	}
}

// TestServerHelper is the child process of startServer, not a test.
func TestServerHelper(t *testing.T) {
	arg := os.Getenv("KEYFS_TEST_SERVER")
	if arg == "" {
		return
	}
	f := strings.Split(arg, "|")
	mode, root, mnt := f[0], f[1], f[2]
	seed, _ := hex.DecodeString(f[3])
	d, err := keystore.OpenDir(root)
	if err != nil {
		t.Fatal(err)
	}
	m, err := keystore.NewMasterKey(seed)
	if err != nil {
		t.Fatal(err)
	}
	x, err := keystore.WatchDir(d, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	al, err := audit.Open(f[4], audit.DefaultMaxBytes)
	if err != nil {
		t.Fatal(err)
	}
	o := Options{Store: x, Key: m, Audit: al, AuditRequired: true, directIO: os.Getenv("KEYFS_TEST_DIRECT") != ""}
	if mode == "mount" {
		o.onRead = func(key string) {
			if key == "slow" {
				fmt.Println("stalled")
				select {} // until killed
			}
		}
		o.onOpen = func(key, stage string) {
			if key == "slow-open-"+strings.Fields(stage)[0] {
				fmt.Println("stalled")
				select {}
			}
		}
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	var s *Server
	switch mode {
	case "mount":
		if s, err = Mount(mnt, o); err != nil {
			t.Fatal(err)
		}
		c, err := fdpass.FileConn(os.NewFile(3, "holder"))
		if err != nil {
			t.Fatal(err)
		}
		sess := s.Session()
		if err := fdpass.Send(c, sess.MarshalState(), sess.FD); err != nil {
			t.Fatal(err)
		}
	case "resume":
		state, _ := hex.DecodeString(os.Getenv("KEYFS_TEST_SESSION"))
		sess, err := ParseSession(state, 3)
		if err != nil {
			t.Fatal(err)
		}
		if s, err = Resume(sess, o); err != nil {
			t.Fatal(err)
		}
	}
	fmt.Println(mode + "ed")
	done := make(chan struct{})
	go func() { s.Wait(); close(done) }()
	select {
	case <-term:
		if err := s.Unmount(); err != nil && !errors.Is(err, unix.EBUSY) {
			t.Fatal(err)
		}
	case <-done:
	}
}
