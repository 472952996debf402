package keystore

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// FuzzParseRecord: any input either fails with ErrIntegrity or is a record
// in its one canonical form: it marshals back to exactly the input, so every
// byte of an accepted record is what Open authenticates.
func FuzzParseRecord(f *testing.F) {
	m := newMaster(f)
	r, _ := Seal(m.Public(), "acme", "openai", 3, []byte("sk-fuzz"))
	text := r.Marshal()
	f.Add(text)
	f.Add([]byte("keyfs-record v1\n"))
	f.Add(bytes.Replace(text, []byte("version: 3"), []byte("version: 03"), 1))
	f.Add(rewrap(text, 76))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseRecord(data)
		if err != nil {
			if !errors.Is(err, ErrIntegrity) {
				t.Fatalf("parse error without ErrIntegrity: %v", err)
			}
			return
		}
		if !bytes.Equal(r.Marshal(), data) {
			t.Fatalf("accepted a record that is not in canonical form:\n%q\nre-encodes as\n%q", data, r.Marshal())
		}
		if ValidTenant(r.Tenant) != nil || ValidKeyName(r.Name) != nil {
			t.Fatalf("parsed record with invalid names %q/%q", r.Tenant, r.Name)
		}
	})
}

// FuzzParsePublicKey: the same one-form rule for the master public key.
func FuzzParsePublicKey(f *testing.F) {
	m := newMaster(f)
	text := m.Public().Marshal()
	f.Add(text)
	f.Add(rewrap(text, 76))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePublicKey(data)
		if err != nil {
			if !errors.Is(err, ErrIntegrity) {
				t.Fatalf("parse error without ErrIntegrity: %v", err)
			}
			return
		}
		if !bytes.Equal(p.Marshal(), data) {
			t.Fatalf("accepted a public key that is not in canonical form: %q", data)
		}
	})
}

// FuzzNames checks the name rules against a plain restatement of them, and
// that no accepted name can escape its directory.
func FuzzNames(f *testing.F) {
	for _, s := range []string{"acme", "a-b", "..", ".", "gpt-4.1_key", "-x", "A", "a/b", "é"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		lowerDigit := func(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' }
		tenantOK := len(s) >= 1 && len(s) <= 63 && lowerDigit(s[0]) && lowerDigit(s[len(s)-1])
		keyOK := len(s) >= 1 && len(s) <= 63 && lowerDigit(s[0])
		for i := 0; i < len(s); i++ {
			c := s[i]
			tenantOK = tenantOK && (lowerDigit(c) || c == '-')
			keyOK = keyOK && (lowerDigit(c) || c == '-' || c == '.' || c == '_')
		}
		if got := ValidTenant(s) == nil; got != tenantOK {
			t.Fatalf("ValidTenant(%q) = %v, rule says %v", s, got, tenantOK)
		}
		if got := ValidKeyName(s) == nil; got != keyOK {
			t.Fatalf("ValidKeyName(%q) = %v, rule says %v", s, got, keyOK)
		}
		if keyOK && (strings.Contains(s, "/") || s == "." || s == ".." || strings.Contains(s, "@")) {
			t.Fatalf("key name %q could escape or confuse the store layout", s)
		}
	})
}
