package fileset

import (
	"os"
	"path/filepath"
	"testing"
)

func read(t *testing.T, dir, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if os.IsNotExist(err) {
		return "<none>"
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestCommit(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a"), []byte("a0"), 0o600)
	os.WriteFile(filepath.Join(dir, "c"), []byte("c0"), 0o600)
	if err := Commit(dir, "j", []File{{Name: "a", Data: []byte("a1"), Perm: 0o600}, {Name: "b", Data: []byte("b1"), Perm: 0o644}, {Name: "c", Remove: true}}); err != nil {
		t.Fatal(err)
	}
	if a, b, c := read(t, dir, "a"), read(t, dir, "b"), read(t, dir, "c"); a != "a1" || b != "b1" || c != "<none>" {
		t.Fatalf("after commit: a=%s b=%s c=%s", a, b, c)
	}
	if fi, _ := os.Stat(filepath.Join(dir, "b")); fi.Mode().Perm() != 0o644 {
		t.Errorf("b mode %v", fi.Mode())
	}
	if _, err := os.Stat(filepath.Join(dir, "j")); !os.IsNotExist(err) {
		t.Errorf("journal left: %v", err)
	}
	if err := Commit(dir, "j", []File{{Name: "../x", Data: nil}}); err == nil {
		t.Error("a name outside the directory was accepted")
	}
}

// TestSettle: the two states a crash can leave.
func TestSettle(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a"), []byte("a0"), 0o600)
	os.WriteFile(filepath.Join(dir, "b"), []byte("b0"), 0o600)
	j := filepath.Join(dir, "j")

	// Crash before the commit point: the old set stays.
	os.Mkdir(j, 0o700)
	os.WriteFile(filepath.Join(j, "a"), []byte("a1"), 0o600)
	if err := Settle(dir, "j"); err != nil {
		t.Fatal(err)
	}
	if a := read(t, dir, "a"); a != "a0" {
		t.Fatalf("incomplete journal applied: a=%s", a)
	}
	if _, err := os.Stat(j); !os.IsNotExist(err) {
		t.Fatalf("incomplete journal kept: %v", err)
	}

	// Crash after the commit point, one file moved already: the rest
	// follows.
	os.Mkdir(j, 0o700)
	os.WriteFile(filepath.Join(j, "b"), []byte("b1"), 0o600)
	os.WriteFile(filepath.Join(j, "c.remove"), nil, 0o600)
	os.WriteFile(filepath.Join(j, complete), nil, 0o600)
	os.WriteFile(filepath.Join(dir, "a"), []byte("a1"), 0o600) // moved before the crash
	os.WriteFile(filepath.Join(dir, "c"), []byte("c0"), 0o600)
	if err := Settle(dir, "j"); err != nil {
		t.Fatal(err)
	}
	if a, b, c := read(t, dir, "a"), read(t, dir, "b"), read(t, dir, "c"); a != "a1" || b != "b1" || c != "<none>" {
		t.Fatalf("after settle: a=%s b=%s c=%s", a, b, c)
	}
	if _, err := os.Stat(j); !os.IsNotExist(err) {
		t.Fatalf("journal kept: %v", err)
	}
}
