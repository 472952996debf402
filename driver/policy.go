package driver

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/keyfs/keyfs/keystore"
)

// Default rules.
const (
	// RuleNamespace grants tenant T to every pod in namespace T.
	RuleNamespace = "namespace"
	// RuleNone grants nothing by default: only the policy file does.
	RuleNone = "none"
)

// Policy decides which tenants a pod may see, from the pod's namespace and
// service account as kubelet reports them. A pod is granted tenant T when
//
//   - the default rule is "namespace" and the pod's namespace is T, or
//   - the policy lists the pod's namespace under tenants.T.namespaces
//     (every service account in it), or
//   - the policy lists "namespace/serviceaccount" under
//     tenants.T.serviceAccounts (that service account only; its namespace
//     need not be listed, and listing it grants no other account there).
//
// The policy file is YAML:
//
//	tenants:
//	  acme:
//	    namespaces: [acme-jobs]
//	    serviceAccounts: [gateway/api]
//
// A Policy is safe for concurrent use; Granted reads one atomic pointer.
type Policy struct {
	path string
	rule string

	// Outcomes of reloads that saw new content, for metrics and tests.
	applied, rejected atomic.Uint64

	cur      atomic.Pointer[grants]
	reloadMu sync.Mutex
	last     []byte // the file content last seen, under reloadMu

	mu   sync.Mutex
	subs map[int]func()
	next int
}

// grants is one parsed policy file.
type grants map[string]tenantGrant

type tenantGrant struct {
	namespaces      map[string]bool
	serviceAccounts map[string]bool // "ns/name"
}

type policyFile struct {
	Tenants map[string]struct {
		Namespaces      []string `json:"namespaces"`
		ServiceAccounts []string `json:"serviceAccounts"`
	} `json:"tenants"`
}

// LoadPolicy reads the policy file at path ("" for none: the default rule
// alone) with defaultRule RuleNamespace or RuleNone.
func LoadPolicy(path, defaultRule string) (*Policy, error) {
	switch defaultRule {
	case "":
		defaultRule = RuleNamespace
	case RuleNamespace, RuleNone:
	default:
		return nil, fmt.Errorf("default rule %q: want %q (a pod sees the tenant named like its namespace) or %q (only the policy file grants)", defaultRule, RuleNamespace, RuleNone)
	}
	p := &Policy{path: path, rule: defaultRule, subs: map[int]func(){}}
	g := grants{}
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("policy: %w", err)
		}
		if g, err = parsePolicy(b); err != nil {
			return nil, fmt.Errorf("policy %s: %w", path, err)
		}
		p.last = b
	}
	p.cur.Store(&g)
	return p, nil
}

func parsePolicy(b []byte) (grants, error) {
	var f policyFile
	if err := yaml.UnmarshalStrict(b, &f); err != nil {
		return nil, err
	}
	g := grants{}
	for t, e := range f.Tenants {
		if err := keystore.ValidTenant(t); err != nil {
			return nil, err
		}
		tg := tenantGrant{namespaces: map[string]bool{}, serviceAccounts: map[string]bool{}}
		for _, ns := range e.Namespaces {
			if err := validDNSLabel(ns); err != nil {
				return nil, fmt.Errorf("tenants.%s.namespaces: %q: %v", t, ns, err)
			}
			tg.namespaces[ns] = true
		}
		for _, sa := range e.ServiceAccounts {
			ns, name, ok := strings.Cut(sa, "/")
			if !ok {
				return nil, fmt.Errorf("tenants.%s.serviceAccounts: %q: want NAMESPACE/NAME, for example gateway/api", t, sa)
			}
			if err := validDNSLabel(ns); err != nil {
				return nil, fmt.Errorf("tenants.%s.serviceAccounts: %q: namespace %v", t, sa, err)
			}
			if err := validDNSSubdomain(name); err != nil {
				return nil, fmt.Errorf("tenants.%s.serviceAccounts: %q: name %v", t, sa, err)
			}
			tg.serviceAccounts[sa] = true
		}
		g[t] = tg
	}
	return g, nil
}

// Granted says whether a pod in namespace with serviceAccount may see tenant.
func (p *Policy) Granted(namespace, serviceAccount, tenant string) bool {
	if p.rule == RuleNamespace && namespace == tenant {
		return true
	}
	tg, ok := (*p.cur.Load())[tenant]
	return ok && (tg.namespaces[namespace] || tg.serviceAccounts[namespace+"/"+serviceAccount])
}

// DeniedError is a refused grant; its message says who, what and how to
// grant it.
type DeniedError struct {
	Namespace, Pod, ServiceAccount, Tenant string
	hint                                   string
}

func (e *DeniedError) Error() string {
	return fmt.Sprintf("pod %s/%s (service account %q) may not read tenant %q: %s", e.Namespace, e.Pod, e.ServiceAccount, e.Tenant, e.hint)
}

// check returns a *DeniedError for the first tenant the pod is not granted.
func (p *Policy) check(pod podIdentity, tenants []string) error {
	for _, t := range tenants {
		if p.Granted(pod.Namespace, pod.ServiceAccount, t) {
			continue
		}
		var b strings.Builder
		if p.rule == RuleNamespace {
			fmt.Fprintf(&b, "by default only pods in namespace %q see it; ", t)
		} else {
			b.WriteString("the default rule is off, so only the policy grants tenants; ")
		}
		fmt.Fprintf(&b, "grant it with tenants.%s.namespaces: [%s] or tenants.%s.serviceAccounts: [%s/%s] in the keyfs policy",
			t, pod.Namespace, t, pod.Namespace, pod.ServiceAccount)
		if p.path != "" {
			fmt.Fprintf(&b, " (%s)", p.path)
		}
		return &DeniedError{Namespace: pod.Namespace, Pod: pod.Name, ServiceAccount: pod.ServiceAccount, Tenant: t, hint: b.String()}
	}
	return nil
}

// Reload re-reads the policy file. A file that cannot be read or parsed
// leaves the last good policy in force and returns why.
func (p *Policy) Reload() (changed bool, err error) {
	if p.path == "" {
		return false, nil
	}
	p.reloadMu.Lock()
	defer p.reloadMu.Unlock()
	b, err := os.ReadFile(p.path)
	if err != nil {
		return false, fmt.Errorf("policy: %w; keeping the last good policy", err)
	}
	if bytes.Equal(b, p.last) {
		return false, nil
	}
	g, err := parsePolicy(b)
	if err != nil {
		p.last = b // report a bad file once, not every tick
		p.rejected.Add(1)
		return false, fmt.Errorf("policy %s: %w; keeping the last good policy", p.path, err)
	}
	p.last = b
	p.cur.Store(&g)
	p.notify()
	p.applied.Add(1)
	return true, nil
}

// Watch polls the policy file every interval (1s when 0) until ctx ends,
// reloading it when its content changes and then calling onChange (may be
// nil) after the drivers using p have refreshed their mounts; log gets one
// line per reload or per new problem. Polling content rather than watching
// inotify follows ConfigMap symlink swaps. Run one Watch per Policy.
func (p *Policy) Watch(ctx context.Context, interval time.Duration, log *slog.Logger, onChange func()) {
	if p.path == "" {
		return
	}
	if interval <= 0 {
		interval = time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	lastErr := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		changed, err := p.Reload()
		if err != nil {
			if err.Error() != lastErr { // once per problem, not per tick
				log.Error("policy not reloaded", "path", p.path, "err", err)
			}
			lastErr = err.Error()
			continue
		}
		lastErr = ""
		if changed {
			log.Info("policy reloaded", "path", p.path, "tenants", p.tenants())
			if onChange != nil {
				onChange()
			}
		}
	}
}

func (p *Policy) tenants() []string {
	var ts []string
	for t := range *p.cur.Load() {
		ts = append(ts, t)
	}
	slices.Sort(ts)
	return ts
}

// subscribe calls f after every change; the returned func unsubscribes.
func (p *Policy) subscribe(f func()) func() {
	p.mu.Lock()
	defer p.mu.Unlock()
	id := p.next
	p.next++
	p.subs[id] = f
	return func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		delete(p.subs, id)
	}
}

func (p *Policy) notify() {
	p.mu.Lock()
	fs := make([]func(), 0, len(p.subs))
	for _, f := range p.subs {
		fs = append(fs, f)
	}
	p.mu.Unlock()
	for _, f := range fs {
		f()
	}
}
