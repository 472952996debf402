package audit

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestPodUIDFromCgroup(t *testing.T) {
	for in, want := range map[string]string{
		"12:memory:/kubepods/besteffort/pod3f2a1b4c-1111-2222-3333-444455556666/abc\n":                                                          "3f2a1b4c-1111-2222-3333-444455556666",
		"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f2a1b4c_1111_2222_3333_444455556666.slice/cri-containerd-x.scope\n": "3f2a1b4c-1111-2222-3333-444455556666",
		"0::/user.slice/user-0.slice/session-1.scope\n":                                                                                         "",
	} {
		if got := podUIDFromCgroup(in); got != want {
			t.Errorf("podUIDFromCgroup(%q) = %q, want %q", in, got, want)
		}
	}
	if got := PodUID(os.Getpid()); got != "" {
		t.Errorf("test process is not in a pod, got pod UID %q", got)
	}
}

func TestRotateAndQuery(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, 600)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now().UTC()
	for i := range 20 {
		tenant := "acme"
		if i%2 == 1 {
			tenant = "beta"
		}
		l.Log(Event{Event: "open", Tenant: tenant, Key: "openai", Version: uint64(i + 1), PID: 100 + i})
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path + ".1"); err != nil {
		t.Fatalf("no rotation at 600 bytes: %v", err)
	}
	if _, err := os.Stat(path + "." + string(rune('0'+Keep+1))); err == nil {
		t.Fatalf("more than %d rotated files kept", Keep)
	}
	fi, _ := os.Stat(path)
	if fi.Size() > 600 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("audit file size %d mode %v", fi.Size(), fi.Mode().Perm())
	}
	evs, err := Query(path, Filter{Tenant: "beta", Key: "openai", Since: start.Add(-time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) == 0 {
		t.Fatal("no beta events found")
	}
	last := uint64(0)
	for _, e := range evs {
		if e.Tenant != "beta" || e.Version <= last {
			t.Fatalf("event out of filter or order: %+v after version %d", e, last)
		}
		last = e.Version
	}
	if last != 20 {
		t.Fatalf("newest beta event has version %d, want 20", last)
	}
	if evs, _ := Query(path, Filter{Since: time.Now().Add(time.Hour)}); len(evs) != 0 {
		t.Fatalf("future --since matched %d events", len(evs))
	}
	if _, err := Query(filepath.Join(t.TempDir(), "none"), Filter{}); err == nil || !strings.Contains(err.Error(), "no audit log") {
		t.Fatalf("missing log: %v", err)
	}
}
