package fdhold

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/testenv"
)

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
	}
}

// TestHoldCollectDrop: a deposit is held (a copy of the descriptor), a
// collect hands out another copy with the state, a drop closes it; a
// holder with no server connected for the orphan timeout closes all, but
// not while one reconnected.
func TestHoldCollectDrop(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.Missing(t, "the holder serves root only: run the tests as root")
	}
	sock := filepath.Join(t.TempDir(), "h", "holder.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", fi.Mode(), err)
	}
	h := &Holder{}
	const orphan = 300 * time.Millisecond
	go h.ServeListener(l, slog.New(slog.DiscardHandler), orphan)
	t.Cleanup(func() { l.Close(); h.Close() })

	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	r := Dial(sock, slog.New(slog.DiscardHandler))
	if !r.Connected() {
		t.Fatal("not connected to a listening holder")
	}
	for _, name := range []string{"a", "b"} {
		if err := r.Hold(name, []byte("state-"+name), int(pw.Fd())); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "two sessions held", func() bool { return len(h.Sessions()) == 2 })
	got, err := r.Collect()
	if err != nil || len(got) != 2 || got[0].Name != "a" || string(got[1].State) != "state-b" {
		t.Fatalf("Collect = %+v, %v", got, err)
	}
	// The collected descriptor is the same pipe: a write through it reads here.
	f := os.NewFile(uintptr(got[0].FD), "collected")
	f.Write([]byte("x"))
	f.Close()
	closeSessions(got[1:])
	if b := make([]byte, 1); func() bool { n, _ := pr.Read(b); return n != 1 || b[0] != 'x' }() {
		t.Fatal("the collected descriptor is not the deposited one")
	}
	if err := r.Drop("b"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b dropped", func() bool { return len(h.Sessions()) == 1 })

	// A server that goes and comes back within the timeout: kept.
	r.Close()
	time.Sleep(orphan / 3)
	r2 := Dial(sock, slog.New(slog.DiscardHandler))
	time.Sleep(2 * orphan)
	if n := len(h.Sessions()); n != 1 {
		t.Fatalf("%d sessions after the server came back in time, want 1", n)
	}
	// Gone for longer: closed.
	r2.Close()
	waitFor(t, "the orphaned sessions closed", func() bool { return len(h.Sessions()) == 0 })
}
