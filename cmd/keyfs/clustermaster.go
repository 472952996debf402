package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/keystore"
)

// The cluster master's rotation runs on a node holding it: the new master
// is made and sealed here as in a local rotation, KeyfsCluster names it
// (the previous one moves to spec.older), and every daemon holding it
// issues it to each approved KeyfsNode through the enrollment channel. A
// node whose KeyfsNode was deleted never receives it.

// checkHoldsCluster refuses a change of the cluster's masters on a node
// whose current master is not the cluster's; it returns the cluster's.
func (g *globals) checkHoldsCluster(pub *keystore.PublicKey) (*keystore.PublicKey, error) {
	c, err := g.kube()
	if err != nil {
		return nil, err
	}
	_, cur, err := c.Cluster()
	if err != nil {
		return nil, err
	}
	if cur.KID != pub.KID {
		return nil, fmt.Errorf("%w: this node's current master is %s, the cluster's is %s: run this on a node that holds the cluster master (keyfs node ls)",
			keystore.ErrConflict, pub.KID, cur.KID)
	}
	return cur, nil
}

// publishRotation makes m the cluster master, old an older one.
func (g *globals) publishRotation(old *keystore.PublicKey, m *keystore.MasterKey) error {
	c, err := g.kube()
	if err != nil {
		return err
	}
	if _, err := c.Rotate(old, m.Public()); err != nil {
		return fmt.Errorf("%w; this node's state holds the new master %s already, the cluster still names %s: fix what the error says, then run keyfs master rotate --store kubernetes again on a node holding %s",
			err, m.KID(), old.KID, old.KID)
	}
	fmt.Fprintf(os.Stderr, "keyfs: KeyfsCluster default names master %s now; nodes holding it issue it to every approved node within seconds (keyfs node ls)\n", m.KID())
	return nil
}

// resealCluster re-encrypts every SealedKey sealed to an older master of
// the cluster to the current one, in place (same version, same value).
func (g *globals) resealCluster() error {
	ring, err := g.unseal()
	if err != nil {
		return err
	}
	defer ring.Close()
	cur, err := g.checkHoldsCluster(ring.Public())
	if err != nil {
		return err
	}
	l, err := g.kubeClient.ListSealedKeys(metav1.ListOptions{})
	if err != nil {
		return err
	}
	var evs []audit.Event
	defer func() { g.auditLifecycle(ring, evs...) }()
	n, failed := 0, 0
	for i := range l.Items {
		o := &l.Items[i]
		r, err := keystore.ParseRecord([]byte(o.Spec.Record))
		if err != nil || r.KID == cur.KID {
			continue
		}
		nr, err := keystore.Reseal(ring, cur, r)
		if err == nil {
			err = g.kubeClient.Replace(nr)
		}
		if err != nil {
			failed++
			fmt.Fprintf(os.Stderr, "keyfs: %s/%s version %d: %v\n", r.Tenant, r.Name, r.Version, err)
			continue
		}
		n++
		evs = append(evs, audit.Event{Time: time.Now().UTC(), Event: "reseal", Tenant: r.Tenant, Key: r.Name, Version: r.Version, KID: cur.KID, Reason: "from kid " + r.KID})
	}
	fmt.Fprintf(os.Stderr, "keyfs: resealed %d SealedKeys to master %s\n", n, cur.KID)
	if failed > 0 {
		return fmt.Errorf("%d SealedKeys not resealed (listed above): run keyfs master reseal again", failed)
	}
	return nil
}

// retireCluster drops kid from the cluster's ring, refusing while a
// SealedKey is sealed to it.
func (g *globals) retireCluster(kid string) error {
	c, err := g.kube()
	if err != nil {
		return err
	}
	l, err := c.ListSealedKeys(metav1.ListOptions{})
	if err != nil {
		return err
	}
	var still []string
	for _, o := range l.Items {
		if r, err := keystore.ParseRecord([]byte(o.Spec.Record)); err == nil && r.KID == kid {
			still = append(still, r.Tenant+"/"+r.Name)
		}
	}
	if len(still) > 0 {
		shown := still[:min(len(still), 5)]
		more := ""
		if len(still) > len(shown) {
			more = ", …"
		}
		return fmt.Errorf("%w: %d SealedKeys are sealed to %s (%s%s): run keyfs master reseal --store kubernetes first",
			keystore.ErrConflict, len(still), kid, strings.Join(shown, ", "), more)
	}
	if _, err := c.Retire(kid); err != nil {
		return err
	}
	g.auditLifecycle(nil, audit.Event{Event: "retire", KID: kid, Reason: "kid " + kid + " retired from KeyfsCluster default"})
	fmt.Fprintf(os.Stderr, "keyfs: master key %s retired from the cluster; nodes refuse records sealed to it from now on\n", kid)
	return nil
}
