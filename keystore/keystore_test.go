package keystore

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func newMaster(t testing.TB) *MasterKey {
	t.Helper()
	seed := make([]byte, SeedSize)
	rand.Read(seed)
	m, err := NewMasterKey(seed)
	clear(seed)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

func TestNames(t *testing.T) {
	for _, s := range []string{"a", "acme", "acme-2", "0", strings.Repeat("a", 63)} {
		if err := ValidTenant(s); err != nil {
			t.Errorf("ValidTenant(%q) = %v", s, err)
		}
	}
	for _, s := range []string{"", "-a", "a-", "A", "a_b", "a.b", "a/b", strings.Repeat("a", 64), "é"} {
		err := ValidTenant(s)
		if !errors.Is(err, ErrInvalidName) || !strings.Contains(err.Error(), "1-63 characters") {
			t.Errorf("ValidTenant(%q) = %v, want the rule", s, err)
		}
	}
	for _, s := range []string{"openai", "a", "gpt-4.1_key", "0x", strings.Repeat("k", 63)} {
		if err := ValidKeyName(s); err != nil {
			t.Errorf("ValidKeyName(%q) = %v", s, err)
		}
	}
	for _, s := range []string{"", ".", "..", ".hidden", "-x", "_x", "Open", "a/b", "a b", strings.Repeat("k", 64)} {
		if err := ValidKeyName(s); !errors.Is(err, ErrInvalidName) || !strings.Contains(err.Error(), "starting with a letter or digit") {
			t.Errorf("ValidKeyName(%q) = %v, want the rule", s, err)
		}
	}
	if got, err := SplitNames(" beta,acme,beta ", ValidTenant); err != nil || !slices.Equal(got, []string{"acme", "beta"}) {
		t.Errorf("SplitNames: %v %v, want sorted and deduplicated", got, err)
	}
	if got, err := SplitNames("", ValidTenant); err != nil || got != nil {
		t.Errorf("SplitNames of nothing: %v %v", got, err)
	}
	for _, bad := range []string{"acme,", "acme,,beta", "acme,Beta"} {
		if _, err := SplitNames(bad, ValidTenant); !errors.Is(err, ErrInvalidName) {
			t.Errorf("SplitNames(%q) = %v, want ErrInvalidName", bad, err)
		}
	}
	if _, _, err := ParseRef("acme"); err == nil || !strings.Contains(err.Error(), "TENANT/NAME") {
		t.Errorf("ParseRef without slash: %v", err)
	}
	if tn, n, err := ParseRef("acme/openai"); err != nil || tn != "acme" || n != "openai" {
		t.Errorf("ParseRef: %q %q %v", tn, n, err)
	}
}

func TestSealOpen(t *testing.T) {
	m := newMaster(t)
	val := []byte("sk-test-0123456789")
	r, err := Seal(m.Public(), "acme", "openai", 7, val)
	if err != nil {
		t.Fatal(err)
	}
	text := r.Marshal()
	if bytes.Contains(text, val) {
		t.Fatal("record text contains the value")
	}
	r2, err := ParseRecord(text)
	if err != nil {
		t.Fatal(err)
	}
	if r2.Size() != len(val) || r2.Version != 7 || r2.KID != m.KID() {
		t.Fatalf("parsed record: size %d version %d kid %s", r2.Size(), r2.Version, r2.KID)
	}
	for range 2 { // second open hits the data-key cache
		got, err := m.Open(r2, "acme", "openai")
		if err != nil || !bytes.Equal(got, val) {
			t.Fatalf("open: %q %v", got, err)
		}
	}
	if !bytes.Equal(r2.Marshal(), text) {
		t.Fatal("marshal is not stable across parse")
	}
	// Values: empty and too large are refused.
	if _, err := Seal(m.Public(), "acme", "openai", 1, nil); !errors.Is(err, ErrInvalidValue) {
		t.Fatalf("empty value: %v", err)
	}
	if _, err := Seal(m.Public(), "acme", "openai", 1, make([]byte, MaxValueSize+1)); !errors.Is(err, ErrInvalidValue) {
		t.Fatalf("oversized value: %v", err)
	}
	if r, err := Seal(m.Public(), "acme", "big", 1, bytes.Repeat([]byte{'x'}, MaxValueSize)); err != nil {
		t.Fatal(err)
	} else if _, err := ParseRecord(r.Marshal()); err != nil {
		t.Fatalf("max-size record does not parse: %v", err)
	}
}

func TestPublicKeyArmor(t *testing.T) {
	m := newMaster(t)
	p, err := ParsePublicKey(m.Public().Marshal())
	if err != nil || p.KID != m.KID() || len(p.KID) != 16 {
		t.Fatalf("parse pubkey: %v kid %q", err, p.KID)
	}
	edited := bytes.Replace(m.Public().Marshal(), []byte("kid: "+m.KID()), []byte("kid: 0000000000000000"), 1)
	if _, err := ParsePublicKey(edited); !errors.Is(err, ErrIntegrity) || !strings.Contains(err.Error(), "hashes to") {
		t.Fatalf("edited kid: %v", err)
	}
	if _, err := ParsePublicKey([]byte("sk-secret-pasted-by-mistake")); err == nil || strings.Contains(err.Error(), "sk-secret") {
		t.Fatalf("garbage pubkey: %v", err)
	}
}

// flipBodyBit changes one base64 character of an armored text's body:
// at >= 0 counts from the body's start, at < 0 from its end.
func flipBodyBit(text []byte, at int) []byte {
	out := bytes.Clone(text)
	i := bytes.Index(out, []byte("\n\n")) + 2 + at
	if at < 0 {
		i = bytes.LastIndex(out, []byte("\nend keyfs-")) + at
	}
	c := out[i]
	out[i] = map[bool]byte{true: 'B', false: 'A'}[c == 'A']
	return out
}

// TestBadRecords: each kind of bad record gets its own clear error, and
// Import of it changes nothing in the store.
func TestBadRecords(t *testing.T) {
	m, other := newMaster(t), newMaster(t)
	val := []byte("sk-live-abcdef")
	good, _ := Seal(m.Public(), "acme", "openai", 5, val)
	text := good.Marshal()
	foreign, _ := Seal(other.Public(), "acme", "openai", 9, val)

	d, err := OpenDir(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Import(good); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, d.Root())

	renamed := bytes.Replace(text, []byte("tenant: acme"), []byte("tenant: beta"), 1)
	cases := []struct {
		name, want string
		data       []byte
		is         error
	}{
		{"garbage", "not a keyfs record", []byte("sk-oops-not-a-record\n"), ErrIntegrity},
		{"empty", "not a keyfs record", nil, ErrIntegrity},
		{"truncated", "truncated", text[:len(text)/2], ErrIntegrity},
		{"truncated-body", "too short", append(bytes.Clone(text[:bytes.Index(text, []byte("\n\n"))+2]), []byte("QUJD\nend keyfs-record\n")...), ErrIntegrity},
		{"future-format", "not supported", bytes.Replace(text, []byte("record v1"), []byte("record v2"), 1), ErrIntegrity},
		{"bad-version", "line 5: version must be a positive", bytes.Replace(text, []byte("version: 5"), []byte("version: x"), 1), ErrIntegrity},
		{"signed-version", "line 5: version must be a positive", bytes.Replace(text, []byte("version: 5"), []byte("version: +5"), 1), ErrIntegrity},
		// Not canonical: each would mean the same record in another text.
		{"zero-padded-version", `line 5 version "005" is not canonical: keyfs writes "5"`, bytes.Replace(text, []byte("version: 5"), []byte("version: 005"), 1), ErrNotCanonical},
		{"spaced-version", `line 5 the "version" value is empty or has extra spaces`, bytes.Replace(text, []byte("version: 5"), []byte("version:  5"), 1), ErrNotCanonical},
		{"created-offset", "line 6 created", replaceCreated(text, func(c time.Time) string { return c.Format("2006-01-02T15:04:05+00:00") }), ErrNotCanonical},
		{"created-fraction", "line 6 created", replaceCreated(text, func(c time.Time) string { return c.Format("2006-01-02T15:04:05.000Z") }), ErrNotCanonical},
		{"upper-kid", "line 2: kid must be 16 lowercase hex", bytes.Replace(text, []byte("kid: "+m.KID()), []byte("kid: "+strings.ToUpper(m.KID())), 1), ErrIntegrity},
		{"crlf", "line 1 has a CRLF line end", bytes.ReplaceAll(text, []byte("\n"), []byte("\r\n")), ErrNotCanonical},
		{"crlf-one-line", "line 9 has a CRLF line end", crlfLine(text, 9), ErrNotCanonical},
		{"rewrapped-body", "base64 lines are 64 columns", rewrap(text, 76), ErrNotCanonical},
		{"no-final-newline", "exactly one newline", bytes.TrimSuffix(text, []byte("\n")), ErrNotCanonical},
		{"extra-final-newline", "exactly one newline", append(bytes.Clone(text), '\n'), ErrNotCanonical},
		{"text-after-end", "exactly one newline", append(bytes.Clone(text), "trailing\n"...), ErrNotCanonical},
		{"space-in-body", "not valid base64", spaceInBody(text), ErrIntegrity},
	}
	for _, c := range cases {
		_, err := ParseRecord(c.data)
		if !errors.Is(err, c.is) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
		if err != nil && strings.Contains(err.Error(), "sk-") {
			t.Errorf("%s: error echoes input: %v", c.name, err)
		}
	}

	// Parse fine, fail to open: each with its own message.
	opens := []struct {
		name, want      string
		data            []byte
		tenant, keyName string
		is              error
	}{
		{"moved-tenant", "stored as beta/openai", text, "beta", "openai", ErrIntegrity},
		{"moved-name", "stored as acme/anthropic", text, "acme", "anthropic", ErrIntegrity},
		{"renamed-header", "does not authenticate", renamed, "beta", "openai", ErrIntegrity},
		{"flipped-ciphertext", "does not authenticate", flipBodyBit(text, -5), "acme", "openai", ErrIntegrity},
		{"flipped-encapsulation", "", flipBodyBit(text, 10), "acme", "openai", ErrIntegrity},
		{"other-kid", "sealed to kid " + other.KID() + ", this node holds kid " + m.KID(), foreign.Marshal(), "acme", "openai", ErrKIDMismatch},
	}
	for _, c := range opens {
		r, err := ParseRecord(c.data)
		if err != nil {
			t.Fatalf("%s: parse: %v", c.name, err)
		}
		v, err := m.Open(r, c.tenant, c.keyName)
		if v != nil || !errors.Is(err, c.is) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %q, %v; want %q", c.name, v, err, c.want)
		}
		if err != nil && bytes.Contains([]byte(err.Error()), val) {
			t.Errorf("%s: error contains the value", c.name)
		}
	}
	if after := snapshot(t, d.Root()); !equalSnap(before, after, "acme/openai@5.rec") {
		t.Fatalf("store changed: before %v after %v", keys(before), keys(after))
	}

	// A record file copied to another tenant's directory is caught on read.
	os.MkdirAll(filepath.Join(d.Root(), "beta"), 0o700)
	os.WriteFile(filepath.Join(d.Root(), "beta", "openai@5.rec"), text, 0o600)
	e, err := d.Newest("beta", "openai")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Read(e); !errors.Is(err, ErrIntegrity) || !strings.Contains(err.Error(), "cannot be moved") {
		t.Fatalf("moved file: %v", err)
	}
}

// replaceCreated rewrites a record's created header with format(created).
func replaceCreated(text []byte, format func(time.Time) string) []byte {
	lines := strings.Split(string(text), "\n")
	c, err := time.Parse(time.RFC3339, strings.TrimPrefix(lines[5], "created: "))
	if err != nil {
		panic(err)
	}
	lines[5] = "created: " + format(c)
	return []byte(strings.Join(lines, "\n"))
}

// crlfLine gives line n (1-based) of text a CRLF end.
func crlfLine(text []byte, n int) []byte {
	lines := strings.Split(string(text), "\n")
	lines[n-1] += "\r"
	return []byte(strings.Join(lines, "\n"))
}

// rewrap re-flows an armor's base64 body to cols columns.
func rewrap(text []byte, cols int) []byte {
	s := string(text)
	head := strings.Index(s, "\n\n") + 2
	tail := strings.LastIndex(s, "end keyfs-")
	b64 := strings.ReplaceAll(s[head:tail], "\n", "")
	var out strings.Builder
	out.WriteString(s[:head])
	for len(b64) > cols {
		out.WriteString(b64[:cols] + "\n")
		b64 = b64[cols:]
	}
	out.WriteString(b64 + "\n" + s[tail:])
	return []byte(out.String())
}

// spaceInBody puts a space into the first body line, keeping it 64 columns.
func spaceInBody(text []byte) []byte {
	out := bytes.Clone(text)
	out[bytes.Index(out, []byte("\n\n"))+2+10] = ' '
	return out
}

func snapshot(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() && !strings.HasPrefix(fi.Name(), ".") {
			b, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(root, p)
			out[rel] = string(b)
		}
		return nil
	})
	return out
}

func keys(m map[string]string) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

func equalSnap(a, b map[string]string, mustHave string) bool {
	if _, ok := a[mustHave]; !ok || len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestStoreVersions(t *testing.T) {
	m := newMaster(t)
	d, err := OpenDir(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	gen0, _ := d.Gen()
	var last uint64
	for i := range 5 {
		r, err := d.Put("acme", "openai", func(v uint64) (*Record, error) {
			return Seal(m.Public(), "acme", "openai", v, fmt.Appendf(nil, "value-%d", i))
		})
		if err != nil {
			t.Fatal(err)
		}
		if r.Version <= last {
			t.Fatalf("version %d not above %d", r.Version, last)
		}
		last = r.Version
	}
	if g, _ := d.Gen(); g == gen0 {
		t.Fatal("gen did not change after put")
	}
	vs, err := d.Versions("acme", "openai")
	if err != nil || len(vs) != DefaultKeep || vs[0].Version != last {
		t.Fatalf("versions: %v %v", vs, err)
	}
	fi, _ := os.Stat(vs[0].Path)
	di, _ := os.Stat(filepath.Dir(vs[0].Path))
	ri, _ := os.Stat(d.Root())
	if fi.Mode().Perm() != 0o600 || di.Mode().Perm() != 0o700 || ri.Mode().Perm() != 0o700 {
		t.Fatalf("modes: file %v dir %v root %v", fi.Mode(), di.Mode(), ri.Mode())
	}
	r, err := d.Read(vs[0])
	if err != nil {
		t.Fatal(err)
	}
	if v, err := m.Open(r, "acme", "openai"); err != nil || string(v) != "value-4" {
		t.Fatalf("newest: %q %v", v, err)
	}
	// Import of an older version is refused and changes nothing.
	old, _ := Seal(m.Public(), "acme", "openai", last, []byte("stale"))
	if err := d.Import(old); !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "already has version") {
		t.Fatalf("import old: %v", err)
	}
	// rm: newest goes, previous becomes current; --all-versions empties.
	removed, err := d.Remove("acme", "openai", false)
	if err != nil || len(removed) != 1 || removed[0] != last {
		t.Fatalf("remove newest: %v %v", removed, err)
	}
	if e, _ := d.Newest("acme", "openai"); e.Version != vs[1].Version {
		t.Fatalf("after rm newest is %d, want %d", e.Version, vs[1].Version)
	}
	if removed, err := d.Remove("acme", "openai", true); err != nil || len(removed) != 2 {
		t.Fatalf("remove all: %v %v", removed, err)
	}
	if _, err := d.Newest("acme", "openai"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after rm --all-versions: %v", err)
	}
	// The tenant's last key went, and with it the tenant.
	if ts, err := d.Tenants(); err != nil || len(ts) != 0 {
		t.Fatalf("tenants after its last key was removed: %v %v", ts, err)
	}
	if _, err := os.Stat(filepath.Join(d.Root(), "acme")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("empty tenant directory left: %v", err)
	}
	if _, err := d.Remove("acme", "openai", true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("rm missing: %v", err)
	}
	if _, err := d.Keys("../etc"); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("traversal tenant: %v", err)
	}
}

// TestKilledWriter kills a writer at random points of put, 50 times: the
// store always holds only whole records.
func TestKilledWriter(t *testing.T) {
	if dir := os.Getenv("KEYFS_TEST_PUT_LOOP"); dir != "" {
		putLoop(dir)
		return
	}
	seed := make([]byte, SeedSize)
	rand.Read(seed)
	m, _ := NewMasterKey(seed)
	defer m.Close()
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "seed"), seed, 0o600)
	killedMidway := 0
	for i := range 50 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestKilledWriter$")
		cmd.Env = append(os.Environ(), "KEYFS_TEST_PUT_LOOP="+root)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		n, _ := rand.Int(rand.Reader, big.NewInt(40))
		time.Sleep(time.Duration(20+n.Int64()) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		if err := cmd.Wait(); err != nil {
			killedMidway++
		}
		d, _ := OpenDir(filepath.Join(root, "store"))
		tenants, _ := d.Tenants()
		for _, tn := range tenants {
			vs, err := d.versions(tn)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range vs {
				r, err := d.Read(e)
				if err != nil {
					t.Fatalf("run %d: partial record %s: %v", i, e.Path, err)
				}
				if _, err := m.Open(r, e.Tenant, e.Name); err != nil {
					t.Fatalf("run %d: record %s does not open: %v", i, e.Path, err)
				}
			}
		}
	}
	if killedMidway < 40 {
		t.Fatalf("only %d of 50 writers were killed while writing; the test did not exercise crashes", killedMidway)
	}
}

func putLoop(root string) {
	seed, _ := os.ReadFile(filepath.Join(root, "seed"))
	m, _ := NewMasterKey(seed)
	d, _ := OpenDir(filepath.Join(root, "store"))
	val := bytes.Repeat([]byte("v"), 4096)
	for i := 0; ; i++ {
		d.Put("acme", fmt.Sprintf("k%d", i%4), func(v uint64) (*Record, error) {
			return Seal(m.Public(), "acme", fmt.Sprintf("k%d", i%4), v, val)
		})
	}
}

func TestRecovery(t *testing.T) {
	seed := make([]byte, SeedSize)
	rand.Read(seed)
	m, _ := NewMasterKey(seed)
	defer m.Close()
	rk, _ := GenerateRecoveryKey()
	priv, err := rk.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ParseRecoveryPublicKey(rk.MarshalPublic())
	if err != nil {
		t.Fatal(err)
	}
	esc, err := Escrow(pub, seed)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(esc, seed) {
		t.Fatal("escrow contains the seed")
	}
	rk2, err := ParseRecoveryKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	got, err := rk2.OpenEscrow(esc)
	if err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("open escrow: %v", err)
	}
	other, _ := GenerateRecoveryKey()
	if _, err := other.OpenEscrow(esc); !errors.Is(err, ErrKIDMismatch) {
		t.Fatalf("other recovery key: %v", err)
	}
	if _, err := rk2.OpenEscrow(flipBodyBit(esc, -5)); !errors.Is(err, ErrIntegrity) {
		t.Fatalf("tampered escrow: %v", err)
	}
	// The recovery public key is not a master public key.
	if _, err := ParsePublicKey(rk.MarshalPublic()); err == nil {
		t.Fatal("recovery-pub accepted as a master public key")
	}
}

func BenchmarkOpenCached(b *testing.B) {
	m := newMaster(b)
	r, _ := Seal(m.Public(), "acme", "openai", 1, bytes.Repeat([]byte("k"), 64))
	v, _ := m.Open(r, "acme", "openai")
	clear(v)
	b.ResetTimer()
	for b.Loop() {
		v, err := m.Open(r, "acme", "openai")
		if err != nil {
			b.Fatal(err)
		}
		clear(v)
	}
}

func BenchmarkOpenUncached(b *testing.B) {
	m := newMaster(b)
	r, _ := Seal(m.Public(), "acme", "openai", 1, bytes.Repeat([]byte("k"), 64))
	for b.Loop() {
		m.mu.Lock()
		clear(m.deks)
		clear(m.ciphers)
		m.mu.Unlock()
		v, err := m.Open(r, "acme", "openai")
		if err != nil {
			b.Fatal(err)
		}
		clear(v)
	}
}
