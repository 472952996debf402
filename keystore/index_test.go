package keystore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func putValue(t *testing.T, d *Dir, m *MasterKey, tenant, name, value string) {
	t.Helper()
	if _, err := d.Put(tenant, name, func(v uint64) (*Record, error) {
		return Seal(m.Public(), tenant, name, v, []byte(value))
	}); err != nil {
		t.Fatal(err)
	}
}

func superseded(s *Snapshot) bool {
	select {
	case <-s.Superseded():
		return true
	default:
		return false
	}
}

// TestDirIndex: one index follows the store, shares what did not change,
// and says when a snapshot is old.
func TestDirIndex(t *testing.T) {
	m := newMaster(t)
	d, err := OpenDir(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	putValue(t, d, m, "acme", "openai", "a1")
	putValue(t, d, m, "beta", "openai", "b1")
	x, err := WatchDir(d, 20*time.Millisecond, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(x.Close)

	s0 := x.Snapshot()
	if got := s0.Tenants(); !slices.Equal(got, []string{"acme", "beta"}) {
		t.Fatalf("tenants %v", got)
	}
	k := s0.Tenant("acme").Key("openai")
	if size, _ := k.Attrs(); size != 2 {
		t.Fatalf("size %d, want 2", size)
	}
	r1, err := k.Record()
	if err != nil {
		t.Fatal(err)
	}
	if r2, _ := k.Record(); r2 != r1 {
		t.Error("record read twice, not cached")
	}
	if v, err := m.Open(r1, "acme", "openai"); err != nil || string(v) != "a1" {
		t.Fatalf("open %q %v", v, err)
	}

	// A change to beta: a new snapshot within a second that keeps acme's
	// tenant object, and the old one says it is superseded.
	putValue(t, d, m, "beta", "anthropic", "b2")
	deadline := time.Now().Add(time.Second)
	for x.Snapshot() == s0 {
		if time.Now().After(deadline) {
			t.Fatal("put not indexed within 1s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	s1 := x.Snapshot()
	if !superseded(s0) || superseded(s1) {
		t.Fatalf("superseded: old %v new %v", superseded(s0), superseded(s1))
	}
	if s1.Tenant("acme") != s0.Tenant("acme") || s1.Tenant("beta") == s0.Tenant("beta") {
		t.Error("unchanged tenant not shared, or changed tenant shared")
	}
	if got := s1.Tenant("beta").Names(); !slices.Equal(got, []string{"anthropic", "openai"}) {
		t.Errorf("beta keys %v", got)
	}

	// Refresh picks a change up at once; a removed tenant is gone.
	if _, err := d.Remove("acme", "openai", true); err != nil {
		t.Fatal(err)
	}
	if err := x.Refresh(); err != nil {
		t.Fatal(err)
	}
	if s2 := x.Snapshot(); s2.Tenant("acme") != nil || !slices.Equal(s2.Tenants(), []string{"beta"}) {
		t.Errorf("after removing acme's last key: %v", s2.Tenants())
	}
	// A snapshot's key whose version is gone (not cached) says so.
	gone := &Key{Entry: k.Entry, load: d.Read}
	if _, err := gone.Record(); !errors.Is(err, ErrNotFound) {
		t.Errorf("record of a removed version: %v, want ErrNotFound", err)
	}

	// An unreadable store is an error, not an empty index; it recovers.
	if err := os.Rename(d.Root(), d.Root()+".moved"); err != nil {
		t.Fatal(err)
	}
	if err := x.Refresh(); err == nil {
		t.Error("refresh of a vanished store succeeded")
	}
	if got := x.Snapshot().Tenants(); !slices.Equal(got, []string{"beta"}) {
		t.Errorf("a failed refresh replaced the snapshot: %v", got)
	}
	if err := os.Rename(d.Root()+".moved", d.Root()); err != nil {
		t.Fatal(err)
	}
	if err := x.Refresh(); err != nil {
		t.Errorf("refresh after the store came back: %v", err)
	}
}

// TestDirIndexManyTenants: a change costs one listing, not a rescan of
// every tenant: the other tenants' objects are reused.
func TestDirIndexManyTenants(t *testing.T) {
	m := newMaster(t)
	d, err := OpenDir(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		putValue(t, d, m, fmt.Sprintf("t%02d", i), "openai", "v")
	}
	// Let every directory's mtime age past the racy window, so unchanged
	// tenants are trusted without listing.
	old := time.Now().Add(-time.Hour)
	for i := range 50 {
		os.Chtimes(filepath.Join(d.Root(), fmt.Sprintf("t%02d", i)), old, old)
	}
	x, err := WatchDir(d, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(x.Close)
	s0 := x.Snapshot()
	putValue(t, d, m, "t07", "anthropic", "w")
	if err := x.Refresh(); err != nil {
		t.Fatal(err)
	}
	s1 := x.Snapshot()
	changed := 0
	for _, n := range s1.Tenants() {
		if s1.Tenant(n) != s0.Tenant(n) {
			changed++
		}
	}
	if changed != 1 || s1.Tenant("t07").Key("anthropic") == nil {
		t.Errorf("%d tenants changed, want 1 (t07)", changed)
	}
}
