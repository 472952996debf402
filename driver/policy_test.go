package driver

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestPolicyParse(t *testing.T) {
	for _, c := range []struct{ name, yaml, want string }{
		{"bad tenant", "tenants:\n  Acme:\n    namespaces: [a]\n", "a tenant is"},
		{"bad namespace", "tenants:\n  acme:\n    namespaces: [Not_A_Label]\n", "tenants.acme.namespaces"},
		{"sa without namespace", "tenants:\n  acme:\n    serviceAccounts: [gateway]\n", "NAMESPACE/NAME"},
		{"bad sa name", "tenants:\n  acme:\n    serviceAccounts: [gateway/Bad_SA]\n", "name not a DNS-1123 subdomain"},
		{"unknown field", "tenants:\n  acme:\n    namespace: [a]\n", "unknown field"},
		{"not yaml", "tenants: [", "yaml"},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "p.yaml")
			writePolicy(t, path, c.yaml)
			_, err := LoadPolicy(path, "")
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("LoadPolicy = %v, want an error mentioning %q", err, c.want)
			}
		})
	}
	if _, err := LoadPolicy("", "everyone"); err == nil || !strings.Contains(err.Error(), `"namespace"`) {
		t.Errorf("bad default rule: %v", err)
	}
}

func TestPolicyReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.yaml")
	writePolicy(t, path, "tenants:\n  acme:\n    serviceAccounts: [gw/api]\n")
	p, err := LoadPolicy(path, RuleNamespace)
	if err != nil {
		t.Fatal(err)
	}
	notified := 0
	unsub := p.subscribe(func() { notified++ })
	defer unsub()
	if !p.Granted("gw", "api", "acme") || p.Granted("gw", "other", "acme") || !p.Granted("acme", "x", "acme") {
		t.Fatal("initial grants wrong")
	}
	if changed, err := p.Reload(); changed || err != nil {
		t.Errorf("unchanged file: Reload = %v, %v", changed, err)
	}
	writePolicy(t, path, "tenants:\n  acme:\n    namespaces: [gw]\n")
	if changed, err := p.Reload(); !changed || err != nil {
		t.Fatalf("Reload = %v, %v", changed, err)
	}
	if !p.Granted("gw", "other", "acme") || notified != 1 {
		t.Errorf("after reload: granted %v, notified %d", p.Granted("gw", "other", "acme"), notified)
	}
	writePolicy(t, path, "tenants:\n  acme:\n    namespaces: [BAD]\n")
	if changed, err := p.Reload(); changed || err == nil || !strings.Contains(err.Error(), "keeping the last good policy") {
		t.Errorf("malformed: Reload = %v, %v", changed, err)
	}
	if !p.Granted("gw", "other", "acme") || notified != 1 {
		t.Error("malformed policy replaced the last good one")
	}
}
