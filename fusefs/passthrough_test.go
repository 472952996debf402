package fusefs

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/testenv"
)

// requirePassthrough ends t unless view s passes files through.
func requirePassthrough(t *testing.T, s *Server) {
	t.Helper()
	if s.salt == 0 {
		testenv.Missing(t, "FUSE passthrough (Linux 6.9 or later, as root)")
	}
}

// TestPassthroughShares: concurrent opens of one key share one memory
// file; a file open across a rotation keeps its version while new opens
// read the new one; when every file is closed no memory file is left.
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
	if n := s.backings.len(); n != 1 {
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
	within(t, 5*time.Second, "no memory file left", func() bool { return s.backings.len() == 0 })
}

// TestPassthroughLockedWithSwap: where the host can swap, the memory file
// is mapped (so locked with the rest of keyfs) while open, and unmapped
// when closed.
func TestPassthroughLockedWithSwap(t *testing.T) {
	swaps := hostSwaps
	hostSwaps = func() bool { return true }
	t.Cleanup(func() { hostSwaps = swaps })
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
	if s.backings.len() != 1 || !mapped() {
		t.Errorf("open file: %d memory files, mapped %v; want 1, mapped", s.backings.len(), mapped())
	}
	f.Close()
	within(t, 5*time.Second, "the memory file unmapped", func() bool { return s.backings.len() == 0 && !mapped() })
}
