package fusefs

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/internal/syncbuf"
	"github.com/keyfs/keyfs/keystore"
)

type env struct {
	t     testing.TB
	store *keystore.Dir
	index *keystore.DirIndex // what mounts show
	key   *keystore.MasterKey
	seed  []byte // key's
	audit string // audit log path
	log   *audit.Logger
	logs  syncbuf.Buffer // the mounts' log lines
}

func newEnv(t testing.TB) *env {
	t.Helper()
	fusetest.Require(t)
	seed := make([]byte, keystore.SeedSize)
	rand.Read(seed)
	m, err := keystore.NewMasterKey(seed)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	dir := t.TempDir()
	d, err := keystore.OpenDir(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, store: d, key: m, seed: seed, audit: filepath.Join(dir, "audit.log")}
	if e.index, err = keystore.WatchDir(d, 0, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.index.Close)
	if e.log, err = audit.Open(e.audit, audit.DefaultMaxBytes); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.log.Close() })
	return e
}

func (e *env) put(tenant, name, value string) *keystore.Record {
	e.t.Helper()
	r, err := e.store.Put(tenant, name, func(v uint64) (*keystore.Record, error) {
		return keystore.Seal(e.key.Public(), tenant, name, v, []byte(value))
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

// mount mounts a view and unmounts it when the test ends.
func (e *env) mount(o Options) (*Server, string) {
	e.t.Helper()
	mnt := filepath.Join(e.t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		e.t.Fatal(err)
	}
	if o.Store == nil {
		o.Store = e.index
	}
	o.Key, o.ReadsOwnMount = e.key, true
	if o.Audit == nil {
		o.Audit = e.log
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(&e.logs, nil))
	}
	s, err := Mount(mnt, o)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { unmount(e.t, s, mnt) })
	return s, mnt
}

func unmount(t testing.TB, s *Server, mnt string) {
	var err error
	for range 50 {
		if err = s.Unmount(); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("unmount %s: %v; detaching", mnt, err)
	unix.Unmount(mnt, unix.MNT_DETACH)
}

func readDir(t *testing.T, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, de := range des {
		names = append(names, de.Name())
	}
	return names
}

// TestMountRefusesWritableMode: Mount applies ParseFileMode's rule rather
// than masking what it is given.
func TestMountRefusesWritableMode(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v")
	mnt := t.TempDir()
	for _, mode := range []uint32{0o644, 0o555, 0o1444, 0o10444} {
		s, err := Mount(mnt, Options{Store: e.index, Key: e.key, FileMode: mode, ReadsOwnMount: true})
		if err == nil {
			unmount(t, s, mnt)
			t.Errorf("Mount with mode %#o succeeded", mode)
			continue
		}
		if want, _ := ParseFileMode(fmt.Sprintf("%o", mode)); want != 0 {
			t.Errorf("ParseFileMode accepts %#o that Mount refuses", mode)
		}
	}
	if fusetest.MustMounted(t, mnt) {
		t.Fatalf("refused mounts left a mount at %s", mnt)
	}
}

func TestRead(t *testing.T) {
	e := newEnv(t)
	const value = "sk-test-0123456789abcdef"
	r := e.put("acme", "openai", value)
	e.put("acme", "anthropic", "sk-ant-xyz")
	_, mnt := e.mount(Options{UID: 1234, GID: 5678, FileMode: 0o440})

	got, err := os.ReadFile(filepath.Join(mnt, "acme", "openai"))
	if err != nil || string(got) != value {
		t.Fatalf("read = %q, %v; want %q", got, err, value)
	}
	if names := readDir(t, mnt); !slices.Equal(names, []string{"acme"}) {
		t.Errorf("root lists %q", names)
	}
	if names := readDir(t, filepath.Join(mnt, "acme")); !slices.Equal(names, []string{"anthropic", "openai"}) {
		t.Errorf("acme lists %q", names)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(mnt, "acme", "openai"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != int64(len(value)) || st.Size != int64(r.Size()) || st.Mode != syscall.S_IFREG|0o440 || st.Uid != 1234 || st.Gid != 5678 {
		t.Errorf("stat = size %d mode %o uid %d gid %d; want size %d mode %o 1234:5678", st.Size, st.Mode, st.Uid, st.Gid, len(value), syscall.S_IFREG|0o440)
	}
	if err := syscall.Stat(filepath.Join(mnt, "acme"), &st); err != nil || st.Mode != syscall.S_IFDIR|0o555 {
		t.Errorf("tenant dir mode %o, %v", st.Mode, err)
	}
	// Partial and offset reads see the same bytes.
	f, err := os.Open(filepath.Join(mnt, "acme", "openai"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 5)
	if n, err := f.ReadAt(buf, 3); err != nil || string(buf[:n]) != value[3:8] {
		t.Errorf("ReadAt = %q, %v", buf[:n], err)
	}
	if n, err := f.ReadAt(buf, 0); err != nil || string(buf[:n]) != value[:5] {
		t.Errorf("ReadAt after end delivered = %q, %v", buf[:n], err)
	}
}

func TestNarrowedView(t *testing.T) {
	e := newEnv(t)
	for _, tn := range []string{"acme", "globex"} {
		for _, k := range []string{"openai", "anthropic", "gemini"} {
			e.put(tn, k, tn+"-"+k+"-value")
		}
	}
	_, mnt := e.mount(Options{
		Allow: func(tn string) bool { return tn == "acme" },
		Keys:  []string{"openai", "anthropic"},
	})
	if names := readDir(t, mnt); !slices.Equal(names, []string{"acme"}) {
		t.Errorf("root lists %q, want only acme", names)
	}
	if names := readDir(t, filepath.Join(mnt, "acme")); !slices.Equal(names, []string{"anthropic", "openai"}) {
		t.Errorf("acme lists %q", names)
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "acme", "anthropic")); err != nil || string(got) != "acme-anthropic-value" {
		t.Errorf("read acme/anthropic = %q, %v", got, err)
	}
	for _, p := range []string{
		"globex", "globex/openai", "globex/gemini", "acme/gemini",
		"nosuch", "acme/nosuch", "ACME", "acme/OpenAI", "acme/openai@1.rec", "acme/.lock", ".gen", ".lock",
	} {
		if _, err := os.Stat(filepath.Join(mnt, p)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("stat %s: %v, want ENOENT", p, err)
		}
		if _, err := os.ReadFile(filepath.Join(mnt, p)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("read %s: %v, want ENOENT", p, err)
		}
	}
}

func TestWritesRefused(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	_, mnt := e.mount(Options{})
	f := filepath.Join(mnt, "acme", "openai")
	dir := filepath.Join(mnt, "acme")
	for name, op := range map[string]func() error{
		"open for write":  func() error { _, err := syscall.Open(f, syscall.O_WRONLY, 0); return err },
		"open read-write": func() error { _, err := syscall.Open(f, syscall.O_RDWR, 0); return err },
		"open truncate":   func() error { _, err := syscall.Open(f, syscall.O_RDONLY|syscall.O_TRUNC, 0); return err },
		"write": func() error {
			return os.WriteFile(f, []byte("x"), 0o644)
		},
		"create": func() error {
			_, err := syscall.Open(filepath.Join(dir, "new"), syscall.O_CREAT|syscall.O_WRONLY, 0o644)
			return err
		},
		"mkdir":    func() error { return syscall.Mkdir(filepath.Join(mnt, "newtenant"), 0o755) },
		"mkdir in": func() error { return syscall.Mkdir(filepath.Join(dir, "sub"), 0o755) },
		"unlink":   func() error { return syscall.Unlink(f) },
		"rmdir":    func() error { return syscall.Rmdir(dir) },
		"rename":   func() error { return syscall.Rename(f, filepath.Join(dir, "other")) },
		"chmod":    func() error { return syscall.Chmod(f, 0o666) },
		"chown":    func() error { return syscall.Chown(f, 1, 1) },
		"truncate": func() error { return syscall.Truncate(f, 0) },
		"utimes":   func() error { return os.Chtimes(f, time.Now(), time.Now()) },
		"setxattr": func() error { return unix.Setxattr(f, "user.x", []byte("y"), 0) },
		"rmxattr":  func() error { return unix.Removexattr(f, "user.x") },
		"symlink":  func() error { return syscall.Symlink("openai", filepath.Join(dir, "ln")) },
		"link":     func() error { return syscall.Link(f, filepath.Join(dir, "hard")) },
		"mknod":    func() error { return syscall.Mknod(filepath.Join(dir, "fifo"), syscall.S_IFIFO|0o644, 0) },
	} {
		if err := op(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", name, err)
		}
	}
	if got, err := os.ReadFile(f); err != nil || string(got) != "v1" {
		t.Errorf("after refused writes, read = %q, %v", got, err)
	}
}

// TestMmap: a mapping of a key file passed through maps the open's own
// memory file (never the page cache); with direct I/O keyfs refuses to
// fill the page cache, so mapping is refused or faults.
func TestMmap(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "secret-value")
	for _, directIO := range []bool{false, true} {
		s, mnt := e.mount(Options{directIO: directIO})
		if !directIO {
			requirePassthrough(t, s)
		}
		// In a child: a process faulting on its own FUSE mount can deadlock
		// with its own server (the fault holds a P through garbage collection).
		cmd := exec.Command(os.Args[0], "-test.run=^TestMmapHelper$")
		cmd.Env = append(os.Environ(), "KEYFS_TEST_MMAP="+filepath.Join(mnt, "acme", "openai"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("helper: %v\n%s", err, out)
		}
		if !directIO {
			if !strings.Contains(string(out), "shared: mapped secret-value\n") || !strings.Contains(string(out), "private: readable secret-value\n") {
				t.Errorf("mappings of a file passed through do not read its value:\n%s", out)
			}
			continue
		}
		if !strings.Contains(string(out), "shared: refused") {
			t.Errorf("shared mmap of a direct I/O key file was not refused:\n%s", out)
		}
		// FOPEN_DIRECT_IO still lets a private mapping through to the page
		// cache; keyfs refuses to fill it, so touching the mapping faults.
		if !strings.Contains(string(out), "private: refused") && !strings.Contains(string(out), "private: faults") {
			t.Errorf("private mapping of a direct I/O key file is readable:\n%s", out)
		}
	}
}

// TestMmapHelper is the child of TestMmap.
func TestMmapHelper(t *testing.T) {
	f := os.Getenv("KEYFS_TEST_MMAP")
	if f == "" {
		return // a helper process for TestMmap, not a test
	}
	fd, err := syscall.Open(f, syscall.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if b, err := syscall.Mmap(fd, 0, 4096, syscall.PROT_READ, syscall.MAP_SHARED); err == nil {
		fmt.Println("shared: mapped", string(bytes.TrimRight(b, "\x00")))
		syscall.Munmap(b)
	} else {
		fmt.Println("shared: refused:", err)
	}
	b, err := syscall.Mmap(fd, 0, 4096, syscall.PROT_READ, syscall.MAP_PRIVATE)
	if err != nil {
		fmt.Println("private: refused:", err)
		return
	}
	defer syscall.Munmap(b)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if recover() != nil {
			fmt.Println("private: faults")
		}
	}()
	sink += b[0]
	fmt.Println("private: readable", string(bytes.TrimRight(b, "\x00")))
}

var sink byte

// TestCopyTools checks that the tools people use read key files whole:
// refusing page-cache reads must not break splice or copy_file_range.
func TestCopyTools(t *testing.T) {
	e := newEnv(t)
	const value = "copy-me-please"
	e.put("acme", "openai", value)
	_, mnt := e.mount(Options{})
	f := filepath.Join(mnt, "acme", "openai")
	out := t.TempDir()
	for name, c := range map[string][]string{
		"cat": {"sh", "-c", "cat " + f + " > " + out + "/cat"},
		"cp":  {"cp", f, out + "/cp"},
		"dd":  {"dd", "status=none", "if=" + f, "of=" + out + "/dd"},
	} {
		if b, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Errorf("%s: %v: %s", name, err, b)
		}
	}
	src, err := os.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.Create(out + "/iocopy")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil { // copy_file_range, then sendfile
		t.Error(err)
	}
	dst.Close()
	for _, n := range []string{"cat", "cp", "dd", "iocopy"} {
		if b, err := os.ReadFile(filepath.Join(out, n)); err != nil || string(b) != value {
			t.Errorf("%s copied %q, %v", n, b, err)
		}
	}
}

func TestTamperedRecord(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "good-value")
	r := e.put("acme", "anthropic", "tampered-value")
	e.put("acme", "gemini", "other-value")
	ent, err := e.store.Newest("acme", "anthropic")
	if err != nil || ent.Version != r.Version {
		t.Fatal(ent, err)
	}
	b, err := os.ReadFile(ent.Path)
	if err != nil {
		t.Fatal(err)
	}
	// Flip one base64 character in the last body line (the ciphertext).
	lines := strings.Split(string(b), "\n")
	body := lines[len(lines)-3]
	c := byte('A')
	if body[0] == 'A' {
		c = 'B'
	}
	lines[len(lines)-3] = string(c) + body[1:]
	if err := os.WriteFile(ent.Path, []byte(strings.Join(lines, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	reads := map[string]error{}
	_, mnt := e.mount(Options{OnRead: func(tenant string, d time.Duration, err error) {
		mu.Lock()
		defer mu.Unlock()
		reads[fmt.Sprintf("%s %d", tenant, len(reads))] = err
	}})

	if _, err := os.ReadFile(filepath.Join(mnt, "acme", "anthropic")); !errors.Is(err, syscall.EIO) {
		t.Errorf("read tampered: %v, want EIO", err)
	}
	for k, want := range map[string]string{"openai": "good-value", "gemini": "other-value"} {
		if got, err := os.ReadFile(filepath.Join(mnt, "acme", k)); err != nil || string(got) != want {
			t.Errorf("read %s = %q, %v", k, got, err)
		}
	}
	evs, err := audit.Query(e.audit, audit.Filter{Tenant: "acme", Key: "anthropic"})
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 1 || evs[0].Event != "error" || evs[0].Version != r.Version || !strings.Contains(evs[0].Reason, "tampered") || evs[0].PID != os.Getpid() {
		t.Errorf("audit for tampered key: %+v", evs)
	}
	if l := e.logs.String(); !strings.Contains(l, "cannot open key") || !strings.Contains(l, "key=anthropic") || strings.Contains(l, "tampered-value") {
		t.Errorf("log lines:\n%s", l)
	}
	mu.Lock()
	defer mu.Unlock()
	// The hook gets what really failed, not the errno the reader got.
	if len(reads) != 3 || !errors.Is(reads["acme 0"], keystore.ErrIntegrity) || reads["acme 1"] != nil || reads["acme 2"] != nil {
		t.Errorf("OnRead saw %v, want an integrity error then two successes", reads)
	}
}

// TestOpenAfterPrune: the snapshot names a version that rotations have
// pruned since; open must serve the newest instead of failing.
func TestOpenAfterPrune(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	stale, err := keystore.WatchDir(e.store, time.Hour, nil) // its snapshot stays stale
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stale.Close)
	_, mnt := e.mount(Options{Store: stale})
	for _, v := range []string{"v2", "v3", "v4", "v5"} {
		e.put("acme", "openai", v)
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "acme", "openai")); err != nil || string(got) != "v5" {
		t.Errorf("read = %q, %v; want v5", got, err)
	}
}

// TestMountOptions checks the mount is read-only, named keyfs, open to
// other users, and that Wait returns when it is unmounted from outside.
func TestMountOptions(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v")
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := Mount(mnt, Options{Store: e.index, Key: e.key, ReadsOwnMount: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unmount(t, s, mnt) })
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	var line string
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 3 && f[1] == mnt {
			line = l
		}
	}
	f := strings.Fields(line)
	if len(f) < 4 || f[0] != "keyfs" || !strings.HasPrefix(f[2], "fuse") {
		t.Fatalf("mount line %q", line)
	}
	for _, want := range []string{"ro", "allow_other", "default_permissions", "nosuid", "nodev"} {
		if !slices.Contains(strings.Split(f[3], ","), want) {
			t.Errorf("mount options %s lack %s", f[3], want)
		}
	}
	done := make(chan struct{})
	go func() { s.Wait(); close(done) }()
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Wait did not return after an outside unmount")
	}
	if err := s.Unmount(); err != nil {
		t.Errorf("Unmount after an outside unmount: %v", err)
	}
	s.Refresh() // a no-op now, not a panic
}

func TestRotation(t *testing.T) {
	e := newEnv(t)
	var mu sync.Mutex
	written := map[string]bool{}
	rotate := func(i int) {
		// Vary the length too, so a torn read cannot pass by accident.
		v := fmt.Sprintf("value-%03d-%s", i, strings.Repeat("x", i%17))
		mu.Lock()
		written[v] = true
		mu.Unlock()
		e.put("acme", "openai", v)
	}
	rotate(0)
	_, mnt := e.mount(Options{})
	f := filepath.Join(mnt, "acme", "openai")

	stop := make(chan struct{})
	var reads, bad atomic.Int64
	var firstBad atomic.Value
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				got, err := os.ReadFile(f)
				mu.Lock()
				ok := err == nil && written[string(got)]
				mu.Unlock()
				reads.Add(1)
				if !ok {
					bad.Add(1)
					firstBad.CompareAndSwap(nil, fmt.Sprintf("%q, %v", got, err))
				}
			}
		})
	}
	start := time.Now()
	for i := 1; i <= 100; i++ {
		rotate(i)
		time.Sleep(time.Until(start.Add(time.Duration(i) * 20 * time.Millisecond)))
	}
	close(stop)
	wg.Wait()
	if bad.Load() > 0 {
		t.Errorf("%d of %d reads during rotation were not a written value; first: %v", bad.Load(), reads.Load(), firstBad.Load())
	}
	t.Logf("%d reads during 100 rotations", reads.Load())
	deadline := time.Now().Add(time.Second)
	for {
		got, err := os.ReadFile(f)
		if err == nil && strings.HasPrefix(string(got), "value-100-") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("newest value not served 1s after the last rotation: %q, %v", got, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// within polls cond until it holds or d passes, and returns how long it took.
func within(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func TestLiveChanges(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	e.put("acme", "anthropic", "a1")
	_, mnt := e.mount(Options{})
	f := filepath.Join(mnt, "acme", "openai")
	// Let the kernel cache the entry and attributes first.
	if got, err := os.ReadFile(f); err != nil || string(got) != "v1" {
		t.Fatalf("read = %q, %v", got, err)
	}

	if _, err := e.store.Remove("acme", "openai", true); err != nil {
		t.Fatal(err)
	}
	d := within(t, time.Second, "removed key vanishes", func() bool { return !exists(f) })
	t.Logf("remove visible after %v", d)
	if names := readDir(t, filepath.Join(mnt, "acme")); !slices.Equal(names, []string{"anthropic"}) {
		t.Errorf("after remove, acme lists %q", names)
	}

	g := filepath.Join(mnt, "acme", "gemini")
	os.Stat(g) // a failed lookup must not be cached
	e.put("acme", "gemini", "g1")
	d = within(t, time.Second, "new key appears", func() bool { return exists(g) })
	t.Logf("put visible after %v", d)
	if got, err := os.ReadFile(g); err != nil || string(got) != "g1" {
		t.Errorf("read new key = %q, %v", got, err)
	}

	// A rotation to a longer value changes the size stat reports.
	a := filepath.Join(mnt, "acme", "anthropic")
	e.put("acme", "anthropic", "a2-longer")
	within(t, time.Second, "rotated key's size updates", func() bool {
		fi, err := os.Stat(a)
		return err == nil && fi.Size() == int64(len("a2-longer"))
	})

	nt := filepath.Join(mnt, "initech")
	e.put("initech", "openai", "i1")
	within(t, time.Second, "new tenant appears", func() bool { return exists(filepath.Join(nt, "openai")) })

	// Removing the tenant's last key removes the tenant.
	if _, err := e.store.Remove("initech", "openai", true); err != nil {
		t.Fatal(err)
	}
	within(t, time.Second, "emptied tenant vanishes", func() bool { return !exists(nt) })
}

func TestAllowChanges(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "a")
	e.put("globex", "openai", "g")
	var globex atomic.Bool
	s, mnt := e.mount(Options{Allow: func(tn string) bool { return tn == "acme" || globex.Load() }})
	g := filepath.Join(mnt, "globex", "openai")
	if exists(g) {
		t.Fatal("globex visible before it is allowed")
	}
	globex.Store(true)
	s.Refresh()
	if got, err := os.ReadFile(g); err != nil || string(got) != "g" {
		t.Fatalf("after allowing globex and Refresh, read = %q, %v", got, err)
	}
	if names := readDir(t, mnt); !slices.Equal(names, []string{"acme", "globex"}) {
		t.Errorf("root lists %q", names)
	}
	// Revoked: Refresh hides it at once, though the kernel caches the
	// entry.
	if !exists(g) {
		t.Fatal("globex not visible before the revoke")
	}
	globex.Store(false)
	s.Refresh()
	if exists(g) || exists(filepath.Join(mnt, "globex")) {
		t.Error("revoked tenant still visible after Refresh")
	}
	if names := readDir(t, mnt); !slices.Equal(names, []string{"acme"}) {
		t.Errorf("root lists %q after revoke", names)
	}
	globex.Store(true)
	s.Refresh()
	if !exists(g) {
		t.Error("re-granted tenant not visible after Refresh")
	}
}

func TestAudit(t *testing.T) {
	e := newEnv(t)
	const value = "sk-audit-SECRET-4f9a2c"
	r := e.put("acme", "openai", value)
	pod := audit.Event{PodNamespace: "team-a", PodName: "api-0", PodUID: "3f2a1b4c-1111-2222-3333-444455556666", ServiceAccount: "api", Volume: "keys"}
	_, mnt := e.mount(Options{Pod: pod})
	cmd := exec.Command("cat", filepath.Join(mnt, "acme", "openai"))
	out, err := cmd.Output()
	if err != nil || string(out) != value {
		t.Fatalf("cat = %q, %v", out, err)
	}
	if _, err := os.ReadFile(filepath.Join(mnt, "acme", "openai")); err != nil {
		t.Fatal(err)
	}
	evs, err := audit.Query(e.audit, audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, ev := range evs {
		if ev.Event != "open" || ev.Tenant != "acme" || ev.Key != "openai" || ev.Version != r.Version {
			t.Errorf("unexpected event %+v", ev)
		}
		if ev.PodNamespace != pod.PodNamespace || ev.PodName != pod.PodName || ev.PodUID != pod.PodUID || ev.ServiceAccount != pod.ServiceAccount || ev.Volume != pod.Volume {
			t.Errorf("pod fields not stamped: %+v", ev)
		}
		if ev.UID == nil || *ev.UID != uint32(os.Getuid()) || ev.GID == nil || *ev.GID != uint32(os.Getgid()) {
			t.Errorf("uid/gid missing: %+v", ev)
		}
		pids = append(pids, ev.PID)
	}
	if !slices.Equal(pids, []int{cmd.Process.Pid, os.Getpid()}) {
		t.Errorf("audit pids %v, want cat's %d then ours %d", pids, cmd.Process.Pid, os.Getpid())
	}
	b, err := os.ReadFile(e.audit)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte(value)) || bytes.Contains(b, []byte("SECRET")) {
		t.Errorf("audit log contains the value:\n%s", b)
	}
}

// TestPlaintextWiped checks the handle logic: the plaintext buffer is
// zeroed once the reply holding its end is done, and on release.
func TestPlaintextWiped(t *testing.T) {
	seed := make([]byte, keystore.SeedSize)
	rand.Read(seed)
	m, err := keystore.NewMasterKey(seed)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := keystore.Seal(m.Public(), "acme", "openai", 1, []byte("0123456789"))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := m.Open(rec, "acme", "openai")
	if err != nil {
		t.Fatal(err)
	}
	h := &handle{v: &keystore.Key{Entry: keystore.Entry{Tenant: "acme", Name: "openai", Version: 1}}, rec: rec, key: m, pt: pt}
	head, _ := h.read(0, 4)
	tail, _ := h.read(4, 100)
	tail.Done()
	if string(pt) != "0123456789" {
		t.Fatal("wiped while a reply still refers to it")
	}
	if b, _ := head.(*reply).Slices(); string(b[0]) != "0123" {
		t.Fatalf("head reply = %q", b[0])
	}
	head.Done()
	if !bytes.Equal(pt, make([]byte, 10)) || h.pt != nil {
		t.Fatalf("plaintext not wiped after the last reply: %q", pt)
	}
	// Reading again decrypts again; release wipes.
	r, _ := h.read(0, 3)
	again := h.pt
	if b, _ := r.(*reply).Slices(); string(b[0]) != "012" {
		t.Fatalf("re-read = %q", b[0])
	}
	r.Done()
	h.release()
	if !bytes.Equal(again, make([]byte, 10)) || h.pt != nil {
		t.Fatalf("plaintext not wiped on release: %q", again)
	}
	if eof, _ := h.read(10, 3); eof.Size() != 0 {
		t.Fatal("read at EOF returned data")
	}
}

// TestDetachLeftover kills a process serving a mount and cleans what it
// left, by the mount table alone.
func TestDetachLeftover(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v")
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if n, err := DetachLeftover(mnt); n != 0 || err != nil {
		t.Fatalf("DetachLeftover on a plain dir = %v, %v", n, err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestMountAndHang$")
	cmd.Env = append(os.Environ(), "KEYFS_TEST_MOUNT_AND_HANG="+e.store.Root()+"|"+mnt)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); unix.Unmount(mnt, unix.MNT_DETACH) })
	// Kill only once Mount has returned: a server killed while one of its
	// own threads waits on its mount (go-fuse's mount probe) cannot exit.
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if line != "mounted\n" {
		t.Fatalf("helper: %q, %v", line, err)
	}
	if !exists(filepath.Join(mnt, "acme")) {
		t.Fatal("helper's mount does not serve")
	}
	cmd.Process.Kill()
	cmd.Wait()
	if _, err := os.ReadDir(mnt); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("listing a dead mount: %v, want ENOTCONN", err)
	}
	if n, err := DetachLeftover(mnt); n != 1 || err != nil {
		t.Fatalf("DetachLeftover = %v, %v; want 1", n, err)
	}
	if _, err := os.Stat(mnt); err != nil {
		t.Fatalf("after DetachLeftover, stat: %v", err)
	}
	if n, err := DetachLeftover(mnt); n != 0 || err != nil {
		t.Fatalf("second DetachLeftover = %v, %v", n, err)
	}
}

// TestMountAndHang is the helper process of TestDetachLeftover.
func TestMountAndHang(t *testing.T) {
	arg := os.Getenv("KEYFS_TEST_MOUNT_AND_HANG")
	if arg == "" {
		return // a helper process for TestDetachLeftover, not a test
	}
	root, mnt, _ := strings.Cut(arg, "|")
	d, err := keystore.OpenDir(root)
	if err != nil {
		t.Fatal(err)
	}
	seed := make([]byte, keystore.SeedSize)
	m, _ := keystore.NewMasterKey(seed)
	x, err := keystore.WatchDir(d, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Mount(mnt, Options{Store: x, Key: m}); err != nil {
		t.Fatal(err)
	}
	fmt.Println("mounted")
	select {} // until killed
}

// opLog collects the opcodes of FUSE requests from go-fuse's debug trace.
type opLog struct {
	mu       sync.Mutex
	on       bool
	ops      []string
	releases atomic.Int32 // RELEASEs seen, recording or not
}

func (l *opLog) Write(p []byte) (int, error) {
	// "rx 24: READ n3 {...}". INTERRUPT is the Go runtime's preemption
	// signal hitting this process's read, not a request keyfs causes; node
	// 2^64-1 is the poll probe at mount time, whose RELEASE arrives
	// whenever it does.
	if f := strings.Fields(string(p)); len(f) >= 4 && f[0] == "rx" && f[2] != "INTERRUPT" && f[3] != "n18446744073709551615" {
		if f[2] == "RELEASE" {
			defer l.releases.Add(1)
		}
		l.mu.Lock()
		if l.on {
			l.ops = append(l.ops, f[2])
		}
		l.mu.Unlock()
	}
	return len(p), nil
}

func (l *opLog) record(on bool) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.on = on
	ops := l.ops
	l.ops = nil
	return ops
}

// TestRoundTrips pins the FUSE requests of a warm open+read+close: no
// LOOKUP or GETATTR (long timeouts, notify invalidation), no FLUSH
// (FOPEN_NOFLUSH); RELEASE is asynchronous. A file passed through to its
// memory file is read by the kernel alone.
func TestRoundTrips(t *testing.T) {
	for _, tc := range []struct {
		name     string
		directIO bool
		want     []string
	}{
		{"passthrough", false, []string{"OPEN", "RELEASE"}},
		{"direct I/O", true, []string{"OPEN", "READ", "READ", "RELEASE"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.put("acme", "openai", "secret-value")
			var ops opLog
			s, mnt := e.mount(Options{directIO: tc.directIO, debugLog: log.New(&ops, "", 0)})
			if !tc.directIO {
				requirePassthrough(t, s)
			}
			f := filepath.Join(mnt, "acme", "openai")
			if _, err := os.ReadFile(f); err != nil {
				t.Fatal(err)
			}
			within(t, 5*time.Second, "the first RELEASE", func() bool { return ops.releases.Load() == 1 })
			ops.record(true)
			if b, err := os.ReadFile(f); err != nil || string(b) != "secret-value" {
				t.Fatal(string(b), err)
			}
			within(t, 5*time.Second, "the second RELEASE", func() bool { return ops.releases.Load() == 2 })
			if got := ops.record(false); !slices.Equal(got, tc.want) {
				t.Errorf("open+read+close sent %v, want %v", got, tc.want)
			}
		})
	}
}

// TestChildrenDoNotInheritFUSE: a child started after a mount must not hold
// the FUSE connection, or a killed server's mount hangs instead of failing.
func TestChildrenDoNotInheritFUSE(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "sk-1")
	e.mount(Options{})
	out, err := exec.Command("sh", "-c", "ls -l /proc/self/fd/").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if strings.Contains(string(out), "/dev/fuse") {
		t.Fatalf("a child process inherited /dev/fuse:\n%s", out)
	}
}

// TestUnmountWithForeignBind: a pod's container holds its own copy of the
// mount. Unmount here must not wait for it (the daemon would hang on
// SIGTERM until kubelet kills it); the server ends when that copy goes.
func TestUnmountWithForeignBind(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "sk-1")
	s, mnt := e.mount(Options{})
	holder := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
		"cat "+mnt+"/acme/openai >/dev/null && echo ready && exec sleep 60")
	out, _ := holder.StdoutPipe()
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	line := make([]byte, 6)
	if _, err := io.ReadFull(out, line); err != nil || string(line) != "ready\n" {
		t.Fatalf("holder not ready: %q %v", line, err)
	}
	start := time.Now()
	if err := s.Unmount(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Unmount waited %v for a mount held in another namespace", d)
	}
	if fusetest.MustMounted(t, mnt) {
		t.Fatal("still mounted here after Unmount")
	}
	holder.Process.Kill()
	holder.Wait()
	done := make(chan struct{})
	go func() { s.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("server still running after the last copy of the mount went away")
	}
}

// TestViewsShareOneIndex: many mounts of one daemon follow one index of
// the store; a change reaches each within a second, and all of them serve
// the same record objects (one record cache, not one per mount).
func TestViewsShareOneIndex(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	const n = 20
	servers := make([]*Server, n)
	mnts := make([]string, n)
	for i := range n {
		servers[i], mnts[i] = e.mount(Options{})
		if got, err := os.ReadFile(filepath.Join(mnts[i], "acme", "openai")); err != nil || string(got) != "v1" {
			t.Fatalf("mount %d: %q %v", i, got, err)
		}
	}
	e.put("acme", "openai", "v2")
	for i := range n {
		within(t, time.Second, fmt.Sprintf("mount %d serves v2", i), func() bool {
			got, err := os.ReadFile(filepath.Join(mnts[i], "acme", "openai"))
			return err == nil && string(got) == "v2"
		})
	}
	want := e.index.Snapshot().Tenant("acme").Key("openai")
	for i, s := range servers {
		if got := s.snap.Load().Tenant("acme").Key("openai"); got != want {
			t.Errorf("mount %d serves its own copy of the key, not the index's", i)
		}
	}
}

// TestUnmountLeavesNewerMount: a view whose mount was detached (a killed
// daemon's leftover cleaned up) and replaced by a newer one at the same
// path must not unmount the newer one when it is finally stopped.
func TestUnmountLeavesNewerMount(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	old, mnt := e.mount(Options{})
	// An open file keeps the detached mount, and its server, alive.
	f, err := os.Open(filepath.Join(mnt, "acme", "openai"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, err := DetachLeftover(mnt); n != 1 || err != nil {
		t.Fatalf("DetachLeftover = %d, %v", n, err)
	}
	newer, err := Mount(mnt, Options{Store: e.index, Key: e.key, ReadsOwnMount: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unmount(t, newer, mnt) })
	select {
	case <-old.served:
		t.Fatal("the detached view ended while a file on it is open")
	default:
	}
	if err := old.Unmount(); err != nil {
		t.Fatalf("Unmount of the detached view: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "acme", "openai")); err != nil || string(b) != "v1" {
		t.Fatalf("the newer mount after the old view's Unmount: %q, %v", b, err)
	}
}

// TestMountsShareReaders: the mounts of a process are served by one pool
// of readers, so a hundred mounts do not cost a hundred waiting threads;
// an unmounted view leaves the pool's epoll set.
func TestMountsShareReaders(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	threads := func() int {
		ts, err := os.ReadDir("/proc/self/task")
		if err != nil {
			t.Fatal(err)
		}
		return len(ts)
	}
	const n = 40
	before := threads()
	var servers []*Server
	var mnts []string
	for range n {
		s, mnt := e.mount(Options{})
		servers, mnts = append(servers, s), append(mnts, mnt)
	}
	for round := range 3 {
		for i, mnt := range mnts {
			if got, err := os.ReadFile(filepath.Join(mnt, "acme", "openai")); err != nil || string(got) != "v1" {
				t.Fatalf("round %d, mount %d: %q %v", round, i, got, err)
			}
		}
	}
	if grew := threads() - before; grew >= n/2 {
		t.Errorf("%d mounts added %d threads: readers are not shared", n, grew)
	}
	p, err := sharedPoller()
	if err != nil {
		t.Fatal(err)
	}
	served := func() int {
		k := 0
		p.conns.Range(func(_, v any) bool {
			for _, s := range servers {
				if s.conn == v.(*conn) {
					k++
				}
			}
			return true
		})
		return k
	}
	if got := served(); got != n {
		t.Fatalf("the poller serves %d of the %d mounts", got, n)
	}
	for i, s := range servers {
		unmount(t, s, mnts[i])
	}
	if got := served(); got != 0 {
		t.Errorf("%d unmounted views are still in the poller", got)
	}
}

// TestSlowRequestStallsNoOther: while a READ is stuck in its handler, the
// same mount and another mount both keep answering.
func TestSlowRequestStallsNoOther(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	e.put("acme", "slow", "slow-value")
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	stalled := make(chan struct{}, 1)
	_, slowMnt := e.mount(Options{directIO: true, onRead: func(key string) {
		if key == "slow" {
			stalled <- struct{}{}
			<-release
		}
	}})
	_, other := e.mount(Options{})
	slow := readAsync(filepath.Join(slowMnt, "acme", "slow"), "slow-value")
	select {
	case <-stalled:
	case <-time.After(5 * time.Second):
		t.Fatal("the slow read never reached its handler")
	}
	for _, mnt := range []string{slowMnt, other} {
		select {
		case err := <-readAsync(filepath.Join(mnt, "acme", "openai"), "v1"):
			if err != nil {
				t.Fatalf("%s: %v", mnt, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s does not answer while another read is stuck", mnt)
		}
	}
	releaseOnce.Do(func() { close(release) })
	if err := <-slow; err != nil {
		t.Fatalf("slow read: %v", err)
	}
}

// readAsync reads path in a goroutine and sends why it did not read want.
func readAsync(path, want string) <-chan error {
	done := make(chan error, 1)
	go func() {
		b, err := os.ReadFile(path)
		if err == nil && string(b) != want {
			err = fmt.Errorf("read %q, want %q", b, want)
		}
		done <- err
	}()
	return done
}

// TestOneReaderWaits: after a burst of concurrent reads over two mounts
// (which starts readers), the pool settles to one reader, waiting: a
// second waiting reader would be woken, on another CPU, by requests the
// busy one takes microseconds later.
func TestOneReaderWaits(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	_, a := e.mount(Options{directIO: true})
	_, b := e.mount(Options{})
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Go(func() {
			for range 200 {
				if err := <-readAsync(filepath.Join([]string{a, b}[i%2], "acme", "openai"), "v1"); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	p, err := sharedPoller()
	if err != nil {
		t.Fatal(err)
	}
	within(t, 5*time.Second, "one reader, waiting", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.readers == 1 && p.idle.Load() == 1
	})
}

// TestGoingRoundMounts: a reader going round two mounts (the RELEASE of
// one and the OPEN of the next on two connections at once, now and then)
// is served by the one waiting reader: a reader started for the second
// connection would be woken on the other CPU for a request the first
// answers microseconds later. The RELEASE of the file just closed is put
// aside for the OPEN on the other mount, which its caller waits for, and
// every RELEASE is still answered.
func TestGoingRoundMounts(t *testing.T) {
	e := newEnv(t)
	e.log.StartQueue(4096) // as keyfs runs: no audit write before a reply
	e.put("acme", "openai", "v1")
	sa, a := e.mount(Options{})
	sb, b := e.mount(Options{})
	p, err := sharedPoller()
	if err != nil {
		t.Fatal(err)
	}
	aside := p.putAside.Load()
	started := func() int {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.started
	}
	var before int
	for i := range 4002 {
		if i == 2 {
			before = started() // the first opens load the record: a slow path
		}
		got, err := os.ReadFile(filepath.Join([]string{a, b}[i%2], "acme", "openai"))
		if err != nil || string(got) != "v1" {
			t.Fatalf("read %d: %q, %v", i, got, err)
		}
	}
	if n := started() - before; n != 0 {
		t.Errorf("going round two mounts started %d readers, want none", n)
	}
	aside = p.putAside.Load() - aside
	t.Logf("%d of 4002 RELEASEs put aside", aside)
	if aside == 0 {
		t.Error("no RELEASE was put aside for the next mount's OPEN")
	}
	within(t, 5*time.Second, "every file handle released", func() bool {
		open := 0
		for _, s := range []*Server{sa, sb} {
			s.handles.mu.Lock()
			open += len(s.handles.m)
			s.handles.mu.Unlock()
		}
		return open == 0
	})
}
