package fusefs

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyfs/keyfs/internal/testenv"
)

// requirePassthrough ends t unless view s passes files through.
func requirePassthrough(t *testing.T, s *Server) {
	t.Helper()
	if s.salt == 0 {
		testenv.Missing(t, "FUSE passthrough (Linux 6.9 or later, as root)")
	}
}

// wiped says whether every memory file no open file reads holds only
// zeros, and how many there are.
func wiped(t *testing.T, s *Server) (bool, int) {
	t.Helper()
	s.backings.mu.Lock()
	defer s.backings.mu.Unlock()
	kept := 0
	for _, b := range s.backings.m {
		if b.refs > 0 {
			continue
		}
		kept++
		buf := make([]byte, len(b.mem))
		if _, err := unix.Pread(b.fd, buf, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, make([]byte, len(buf))) {
			return false, kept
		}
	}
	return true, kept
}

// TestPassthroughShares: concurrent opens of one key share one memory
// file; a file open across a rotation keeps its version while new opens
// read the new one; when every file is closed no memory file is read,
// and those kept hold zeros.
func TestPassthroughShares(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "v1")
	s, mnt := e.mount(Options{})
	requirePassthrough(t, s)
	key := filepath.Join(mnt, "acme", "openai")
	var files []*os.File
	for range 4 {
		f, err := os.Open(key)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	if n := s.backings.inUse(); n != 1 {
		t.Errorf("4 open files of one key use %d memory files, want 1", n)
	}
	var wg sync.WaitGroup
	for _, f := range files {
		wg.Go(func() {
			if got := mustPread(t, f, make([]byte, 16)); got != "v1" {
				t.Errorf("read %q, want v1", got)
			}
		})
	}
	wg.Wait()

	e.put("acme", "openai", "v2")
	within(t, 5*time.Second, "a new open reads v2", func() bool {
		b, err := os.ReadFile(key)
		return err == nil && string(b) == "v2"
	})
	if got := mustPread(t, files[0], make([]byte, 16)); got != "v1" {
		t.Errorf("a file open across the rotation reads %q, want v1", got)
	}
	for _, f := range files {
		f.Close()
	}
	within(t, 5*time.Second, "no memory file read", func() bool { return s.backings.inUse() == 0 })
	// v2's is kept; v1's too until the kernel forgets its inode.
	if ok, kept := wiped(t, s); !ok || kept < 1 || kept > 2 {
		t.Errorf("after the last close: %d memory files kept (want v2's, and v1's or not), all wiped %v", kept, ok)
	}
}

// TestPassthroughReuses: the next open of a key finds its wiped memory
// file and fills it again (one file made for many opens, each reading the
// value); the views keep idleBudget wiped files in all, shared out among
// them, and none once the kernel forgot their inodes.
func TestPassthroughReuses(t *testing.T) {
	budget := idleBudget
	idleBudget = 2*minIdle + 8
	t.Cleanup(func() { idleBudget = budget })
	e := newEnv(t)
	keys := idleBudget + 4
	for i := range keys {
		e.put("acme", fmt.Sprintf("k%02d", i), fmt.Sprintf("value-%02d", i))
	}
	s, mnt := e.mount(Options{})
	requirePassthrough(t, s)
	key := filepath.Join(mnt, "acme", "k00")
	var ids []int32
	for range 3 {
		f, err := os.Open(key)
		if err != nil {
			t.Fatal(err)
		}
		if got := mustPread(t, f, make([]byte, 16)); got != "value-00" {
			t.Errorf("read %q, want value-00", got)
		}
		s.backings.mu.Lock()
		for _, b := range s.backings.m {
			ids = append(ids, b.id)
		}
		s.backings.mu.Unlock()
		f.Close()
		within(t, 5*time.Second, "no memory file read", func() bool { return s.backings.inUse() == 0 })
	}
	if len(ids) != 3 || ids[0] != ids[1] || ids[1] != ids[2] {
		t.Errorf("3 opens of one key read memory files %v, want one and the same", ids)
	}
	readAll := func(mnt string) {
		for i := range keys {
			name := fmt.Sprintf("k%02d", i)
			b, err := os.ReadFile(filepath.Join(mnt, "acme", name))
			if want := fmt.Sprintf("value-%02d", i); err != nil || string(b) != want {
				t.Fatalf("read %s: %q, %v; want %q", name, b, err, want)
			}
		}
	}
	readAll(mnt)
	within(t, 5*time.Second, "no memory file read", func() bool { return s.backings.inUse() == 0 })
	if ok, kept := wiped(t, s); !ok || kept != idleBudget {
		t.Errorf("one view, after reading %d keys: %d memory files kept (want %d), all wiped %v", keys, kept, idleBudget, ok)
	}
	// A second view that keeps files halves the first one's share.
	s2, mnt2 := e.mount(Options{})
	readAll(mnt2)
	readAll(mnt)
	within(t, 5*time.Second, "no memory file read", func() bool { return s.backings.inUse()+s2.backings.inUse() == 0 })
	for i, v := range []*Server{s, s2} {
		if ok, kept := wiped(t, v); !ok || kept != idleBudget/2 {
			t.Errorf("view %d of 2: %d memory files kept (want %d), all wiped %v", i+1, kept, idleBudget/2, ok)
		}
	}
	// Dropping the dentry cache makes the kernel forget the inodes.
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("2"), 0); err != nil {
		t.Fatal(err)
	}
	within(t, 5*time.Second, "no memory file kept once forgotten", func() bool {
		_, kept := wiped(t, s)
		return kept == 0
	})
}

// TestPassthroughMapped: the memory file is mapped into keyfs (so locked
// with the rest of keyfs), and wiped when closed.
func TestPassthroughMapped(t *testing.T) {
	e := newEnv(t)
	e.put("acme", "openai", "locked-value")
	s, mnt := e.mount(Options{})
	requirePassthrough(t, s)
	mapped := func() bool {
		b, err := os.ReadFile("/proc/self/maps")
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(string(b), "/memfd:keyfs")
	}
	if mapped() {
		t.Fatal("a memory file is mapped before any open")
	}
	f, err := os.Open(filepath.Join(mnt, "acme", "openai"))
	if err != nil {
		t.Fatal(err)
	}
	if got := mustPread(t, f, make([]byte, 32)); got != "locked-value" {
		t.Errorf("read %q, want locked-value", got)
	}
	if s.backings.inUse() != 1 || !mapped() {
		t.Errorf("open file: %d memory files, mapped %v; want 1, mapped", s.backings.inUse(), mapped())
	}
	f.Close()
	within(t, 5*time.Second, "no memory file read", func() bool { return s.backings.inUse() == 0 })
	if ok, kept := wiped(t, s); !ok || kept != 1 {
		t.Errorf("after close: %d memory files kept (want 1), all wiped %v", kept, ok)
	}
}

// TestPassthroughSameVersionOtherValue: a version number can come back
// with another value (cluster mode applies a manifest again under its
// number): a kept memory file of another size is not filled again, since
// a write does not shorten it, and the file read holds the value alone.
func TestPassthroughSameVersionOtherValue(t *testing.T) {
	e := newEnv(t)
	s, _ := e.mount(Options{})
	requirePassthrough(t, s)
	const node = 42
	for _, v := range []string{"a-longer-value", "short", "short", "a-longer-value"} {
		b, err := s.backings.get(s.conn, node, []byte(v), true)
		if err != nil {
			t.Fatal(err)
		}
		var st unix.Stat_t
		buf := make([]byte, 64)
		n, err := unix.Pread(b.fd, buf, 0)
		if err != nil || unix.Fstat(b.fd, &st) != nil {
			t.Fatal(err)
		}
		if string(buf[:n]) != v || st.Size != int64(len(v)) {
			t.Errorf("memory file for %q holds %q (%d bytes)", v, buf[:n], st.Size)
		}
		s.backings.put(s.conn, node, b)
	}
}
