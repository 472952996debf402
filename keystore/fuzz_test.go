package keystore

import (
	"bytes"
	"strings"
	"testing"
)

// FuzzParseRecord: any input either fails with ErrIntegrity or parses into a
// record that marshals back to a form that parses to the same record.
func FuzzParseRecord(f *testing.F) {
	m := newMaster(f)
	r, _ := Seal(m.Public(), "acme", "openai", 3, []byte("sk-fuzz"))
	f.Add(r.Marshal())
	f.Add([]byte("keyfs-record v1\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseRecord(data)
		if err != nil {
			if !strings.Contains(err.Error(), ErrIntegrity.Error()) {
				t.Fatalf("parse error without ErrIntegrity: %v", err)
			}
			return
		}
		again, err := ParseRecord(r.Marshal())
		if err != nil {
			t.Fatalf("re-parse of marshaled record: %v", err)
		}
		if !bytes.Equal(again.Marshal(), r.Marshal()) || again.Size() != r.Size() {
			t.Fatal("marshal/parse is not a round trip")
		}
		if ValidTenant(r.Tenant) != nil || ValidKeyName(r.Name) != nil {
			t.Fatalf("parsed record with invalid names %q/%q", r.Tenant, r.Name)
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
