package main

import (
	"fmt"

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

// joinCluster makes this node's master the cluster's, when no node has
// yet, or checks that it is.
func (g *globals) joinCluster(m *keystore.MasterKey) error {
	klog.SetSlogLogger(g.log.With("component", "client-go"))
	c, err := g.kube()
	if err != nil {
		return err
	}
	node := g.node
	if node == "" {
		node = kubestore.NodeName()
	}
	o, pub, won, err := c.Bootstrap(m.Public(), node)
	if err != nil {
		return err
	}
	switch {
	case won:
		g.log.Info("bootstrapped the cluster master: KeyfsCluster default now names this node's master key", "kid", pub.KID, "node", node)
	case pub.KID == m.KID():
		g.log.Info("this node holds the cluster master", "kid", pub.KID, "bootstrapped_by", o.Spec.BootstrapNode)
	default:
		return fmt.Errorf("%w: this node's master key is kid %s, the cluster's (KeyfsCluster default, bootstrapped by node %s) is kid %s. "+
			"Enrollment of a node's TPM is not built yet; to give this node the cluster master, copy master.pub and master.recovery from that node's state directory into %s and run keyfs recover --recovery-key FILE here",
			keystore.ErrIntegrity, m.KID(), o.Spec.BootstrapNode, pub.KID, g.state)
	}
	return nil
}
