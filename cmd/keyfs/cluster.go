package main

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/kubestore"
	"k8s.io/klog/v2"
)

// keyStore is what the key commands need of a store: the local directory
// (--store local) or SealedKey objects in the Kubernetes API (--store
// kubernetes).
type keyStore interface {
	Tenants() ([]string, error)
	Keys(tenant string) ([]keystore.Entry, error)
	Read(keystore.Entry) (*keystore.Record, error)
	Put(tenant, name string, seal func(version uint64) (*keystore.Record, error)) (*keystore.Record, error)
	Import(*keystore.Record) error
	Remove(tenant, name string, all bool) ([]uint64, error)
	Newest(tenant, name string) (keystore.Entry, error)
}

const (
	storeLocal      = "local"
	storeKubernetes = "kubernetes"
)

func (g *globals) cluster() bool { return g.storeKind == storeKubernetes }

// checkStore refuses a --store that is neither.
func (g *globals) checkStore() error {
	if g.storeKind != storeLocal && g.storeKind != storeKubernetes {
		return usagef("--store %q: want local or kubernetes", g.storeKind)
	}
	return nil
}

// kube is the API client of --kubeconfig and --namespace.
func (g *globals) kube() (*kubestore.Client, error) {
	if g.kubeClient != nil {
		return g.kubeClient, nil
	}
	cfg, err := kubestore.Config(g.kubeconfig)
	if err != nil {
		return nil, err
	}
	c, err := kubestore.New(cfg, g.namespace)
	if err != nil {
		return nil, err
	}
	g.kubeClient = c
	return c, nil
}

// keys opens the store of --store.
func (g *globals) keys() (keyStore, error) {
	if g.cluster() {
		return g.kube()
	}
	return g.store()
}

// sealingKey is the public key new records are sealed to, and the kids
// of older masters whose records are still accepted (local store only).
func (g *globals) sealingKey() (*keystore.PublicKey, map[string]*keystore.PublicKey, error) {
	if g.cluster() {
		c, err := g.kube()
		if err != nil {
			return nil, nil, err
		}
		_, pub, err := c.Cluster()
		return pub, nil, err
	}
	pub, err := g.publicKey()
	if err != nil {
		return nil, nil, err
	}
	ring, err := g.ringPublicKeys()
	return pub, ring, err
}

// localOnly refuses a command that works on this node's state alone.
func (g *globals) localOnly(what string) error {
	if g.cluster() {
		return usagef("%s works on this node's state directory only; run it without --store kubernetes", what)
	}
	return nil
}

// joinCluster makes this node's master the cluster's when no node has
// yet, and says which master of the cluster's ring this node holds: the
// current one, an older one (it was away during a rotation), or none ("").
func (g *globals) joinCluster(m *keystore.MasterKey) (*kubestore.KeyfsCluster, *keystore.PublicKey, string, error) {
	klog.SetSlogLogger(g.log.With("component", "client-go"))
	c, err := g.kube()
	if err != nil {
		return nil, nil, "", err
	}
	node := g.nodeName()
	o, pub, won, err := c.Bootstrap(m.Public(), node)
	if err != nil {
		return nil, nil, "", err
	}
	held := ""
	if i := slices.IndexFunc(o.KIDs(), func(k string) bool { return slices.Contains(m.KIDs(), k) }); i >= 0 {
		held = o.KIDs()[i]
	}
	switch {
	case won:
		g.log.Info("bootstrapped the cluster master: KeyfsCluster default now names this node's master key", "kid", pub.KID, "node", node)
	case held == pub.KID:
		g.log.Info("this node holds the cluster master", "kid", pub.KID, "bootstrapped_by", o.Spec.BootstrapNode)
	case held != "":
		g.log.Warn("this node holds an older master of the cluster, not the current one: it serves records of the older, and waits for the current to be issued to it", "held", held, "current", pub.KID)
	}
	return o, pub, held, nil
}

// nodeName is this node's name in the cluster: serve --node-id, else
// NODE_NAME, else the host name.
func (g *globals) nodeName() string {
	if g.node != "" {
		return g.node
	}
	return kubestore.NodeName()
}

// newEnroller registers this node's KeyfsNode; run starts its roles.
func (g *globals) newEnroller(dm *daemon, o *kubestore.KeyfsCluster, cluster *keystore.PublicKey, held string) (*enroller, error) {
	allow := map[string]bool{}
	for _, h := range g.autoApprove {
		allow[h] = true
	}
	e := &enroller{g: g, c: g.kubeClient, node: g.nodeName(), cluster: cluster, kids: o.KIDs(), fetched: time.Now(),
		key: dm.key, audit: dm.audit, log: g.log, allow: allow, ready: make(chan struct{}), warned: map[string]string{}}
	if g.autoApproveCA != "" {
		b, err := os.ReadFile(g.autoApproveCA)
		if err != nil {
			return nil, fmt.Errorf("--auto-approve-ek-ca: %w", err)
		}
		e.roots = x509.NewCertPool()
		if !e.roots.AppendCertsFromPEM(b) {
			return nil, usagef("--auto-approve-ek-ca %s holds no PEM certificate", g.autoApproveCA)
		}
	}
	if held != "" {
		e.enrolled = true
		close(e.ready)
	}
	if err := e.register(held); err != nil {
		return nil, err
	}
	return e, nil
}

// checkKID refuses a record sealed to a master that is not the cluster's.
func (e *enroller) checkKID(r *keystore.Record) error {
	if e.knows(r.KID) {
		return nil
	}
	kids := e.clusterKIDs()
	return &keystore.KIDMismatchError{Record: r.KID, Have: kids[0], Older: kids[1:]}
}

// start runs the enrollment roles until the daemon closes.
func (e *enroller) start(dm *daemon) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); e.run(ctx) }()
	dm.ready, dm.enrolled = e.check, e.ready
	dm.stopEnroll = func() { cancel(); <-done }
}
