package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/kubestore"
	"github.com/keyfs/keyfs/tpm"
)

// A cluster node's daemon plays two roles in TPM-to-TPM enrollment. A node
// without the cluster master registers its TPM's EK in its KeyfsNode and
// waits; once an admin approves that EK, any node holding the cluster
// master wraps the seed to it (issuer), and the waiting node imports it
// under its EK, checks the kid, seals it again under its own SRK and
// serves (receiver).

// enrollPoll is how often each role looks at the KeyfsNodes.
const enrollPoll = time.Second

// enroller runs the enrollment roles of one daemon.
type enroller struct {
	g       *globals
	c       *kubestore.Client
	node    string
	cluster *keystore.PublicKey
	key     *keystore.MasterKey // the daemon's: gains the cluster master on enrollment
	audit   *audit.Logger
	log     *slog.Logger
	allow   map[string]bool   // EK hashes approved by configuration
	roots   *x509.CertPool    // EK certificates chaining here are approved, when not nil
	warned  map[string]string // KeyfsNode → resource version whose certificate was refused

	mu       sync.Mutex
	enrolled bool
	waitErr  error         // why the node cannot serve yet
	ready    chan struct{} // closed once enrolled
	tried    string        // the enrollment last refused, not tried again
	kids     []string      // the cluster's masters, current first
	fetched  time.Time     // when kids were read
	// onRetire runs when a master leaves the cluster's ring: records
	// sealed to it must be refused from then on, also those read before.
	onRetire func()
}

// clusterKIDs is the cluster's ring as last read, current first.
func (e *enroller) clusterKIDs() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.kids
}

// knows reports whether kid is a master of the cluster, reading the
// KeyfsCluster again (at most once a second) when it is not known: a
// record sealed just after a rotation.
func (e *enroller) knows(kid string) bool {
	if slices.Contains(e.clusterKIDs(), kid) {
		return true
	}
	e.mu.Lock()
	recent := time.Since(e.fetched) < time.Second
	e.mu.Unlock()
	if !recent {
		e.refresh()
	}
	return slices.Contains(e.clusterKIDs(), kid)
}

// refresh reads the KeyfsCluster: a rotation changes its current master.
func (e *enroller) refresh() {
	o, pub, err := e.c.Cluster()
	e.mu.Lock()
	defer e.mu.Unlock()
	e.fetched = time.Now()
	if err != nil {
		e.log.Warn("cannot read KeyfsCluster; keeping the master named before", "err", err)
		return
	}
	if pub.KID != e.cluster.KID {
		e.log.Info("the cluster master rotated", "from", e.cluster.KID, "to", pub.KID)
	}
	kids := o.KIDs()
	retired := slices.ContainsFunc(e.kids, func(k string) bool { return !slices.Contains(kids, k) })
	e.cluster, e.kids = pub, kids
	if retired && e.onRetire != nil {
		e.log.Info("a master left the cluster's ring: records sealed to it are refused from now on", "kids", kids)
		go e.onRetire() // the index calls knows, which takes e.mu
	}
}

// holds reports whether the daemon's key opens records of master kid.
func (e *enroller) holds(kid string) bool { return slices.Contains(e.key.KIDs(), kid) }

// ready reports whether the node holds the cluster master, and if not
// why, naming the command that approves it.
func (e *enroller) check() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.enrolled {
		return nil
	}
	return e.waitErr
}

func (e *enroller) event(name, reason string) {
	e.audit.Log(audit.Event{Time: time.Now().UTC(), Event: name, KID: e.current().KID, Node: e.node, Reason: reason})
}

func (e *enroller) current() *keystore.PublicKey {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cluster
}

// run plays the roles until ctx ends: the receiver's until enrolled, then
// the issuer's.
func (e *enroller) run(ctx context.Context) {
	t := time.NewTicker(enrollPoll)
	defer t.Stop()
	for {
		e.refresh()
		if !e.holds(e.current().KID) {
			e.receive()
		}
		if e.holds(e.current().KID) {
			e.issue()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// register writes this node's EK to its KeyfsNode: waiting for approval,
// or, on a node holding master held of the cluster's ring, enrolled with
// it (approve it too, so that it receives the masters later rotations
// make).
func (e *enroller) register(held string) error {
	t, err := e.g.openTPM()
	if err != nil {
		return err
	}
	ek, err := t.EK()
	t.Close()
	if err != nil {
		return fmt.Errorf("read this TPM's endorsement key: %w", err)
	}
	o, err := e.c.RegisterNode(e.node, ek.Public, ek.Hash(), ek.Cert)
	if err != nil {
		return err
	}
	if held != "" {
		if o.Status.State != kubestore.StateEnrolled || o.Status.KID != held {
			msg := "holds the cluster master " + held
			if o.Spec.ApprovedEKHash != o.Spec.EKHash {
				msg += "; approve its EK (keyfs node approve " + e.node + ") so that it receives rotated masters"
			}
			o.Status = kubestore.KeyfsNodeStatus{State: kubestore.StateEnrolled, KID: held, Message: msg}
			if _, err := e.c.SetNodeStatus(o); err != nil {
				return err
			}
		}
		return nil
	}
	e.waitErr = fmt.Errorf("node %s does not hold the cluster master key %s yet: approve its TPM with `keyfs node approve %s` (EK hash %s; compare with keyfs node ek on the node)",
		e.node, e.cluster.KID, e.node, ek.Hash())
	if o.Status.State != kubestore.StateWaiting || o.Status.Enrollment != nil {
		o.Status = kubestore.KeyfsNodeStatus{State: kubestore.StateWaiting, Message: e.waitErr.Error()}
		if _, err := e.c.SetNodeStatus(o); err != nil {
			return err
		}
	}
	e.log.Warn("waiting for enrollment", "node", e.node, "ek_hash", ek.Hash(), "cluster_kid", e.cluster.KID, "approve", "keyfs node approve "+e.node)
	e.event("enroll-wait", e.waitErr.Error())
	return nil
}

// receive gets the current cluster master: from this node's state when a
// rotation ran here, else from an enrollment issued to this node.
func (e *enroller) receive() {
	cur := e.current()
	if p, err := e.g.publicKey(); err == nil && p.KID == cur.KID {
		m, err := e.g.fetchMaster(cur.KID)
		if err != nil {
			e.log.Error("cannot unseal the cluster master from this node's state", "kid", cur.KID, "err", err)
			return
		}
		e.key.Add(m)
		e.enroll(nil, "rotated on this node")
		return
	}
	o, err := e.c.GetNode(e.node)
	if err != nil {
		e.log.Warn("cannot read this node's KeyfsNode", "err", err)
		return
	}
	w := o.Status.Enrollment
	if w == nil || o.ResourceVersion == e.tried || (w.KID != cur.KID && e.check() == nil) {
		return // nothing new; or an enrollment of an older master, for a node serving already
	}
	if err := e.importSeed(w); err != nil {
		e.tried = o.ResourceVersion
		e.log.Error("enrollment refused", "node", e.node, "issued_by", w.IssuedBy, "err", err)
		e.event("enroll-refused", err.Error())
		o.Status.State, o.Status.Message, o.Status.Since = kubestore.StateFailed, "refused the enrollment issued by "+w.IssuedBy+": "+err.Error(), nil
		if o2, err := e.c.SetNodeStatus(o); err == nil {
			e.tried = o2.ResourceVersion
		}
		return
	}
	e.enroll(o, "issued by "+w.IssuedBy)
}

// enroll marks this node as holding the current cluster master: in its
// KeyfsNode (o, or read again), dropping the EK-wrapped copy, and for the
// daemon, which serves from now on.
func (e *enroller) enroll(o *kubestore.KeyfsNode, how string) {
	cur := e.current()
	if o == nil {
		var err error
		if o, err = e.c.GetNode(e.node); err != nil {
			e.log.Warn("holds the cluster master, but cannot read its KeyfsNode", "err", err)
		}
	}
	if o != nil {
		o.Status = kubestore.KeyfsNodeStatus{State: kubestore.StateEnrolled, KID: cur.KID,
			Message: fmt.Sprintf("holds the cluster master %s, %s", cur.KID, how)}
		if _, err := e.c.SetNodeStatus(o); err != nil {
			e.log.Warn("holds the cluster master, but cannot say so in its KeyfsNode", "err", err)
		}
	}
	e.log.Info("this node holds the cluster master", "node", e.node, "kid", cur.KID, "how", how)
	e.event("enroll", how)
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.enrolled {
		e.enrolled = true
		close(e.ready)
	}
}

// importSeed imports w under this TPM's EK, checks that it is the cluster
// master, seals it under this TPM's SRK with the PCRs of the node's own
// master (which stays in the ring), and adds it to the daemon's key.
func (e *enroller) importSeed(w *kubestore.Enrollment) error {
	cur := e.current()
	if w.KID != cur.KID {
		return fmt.Errorf("%w: issued for master %s, the cluster's is %s", keystore.ErrIntegrity, w.KID, cur.KID)
	}
	t, err := e.g.openTPM()
	if err != nil {
		return err
	}
	defer t.Close()
	seed, err := t.Import(&tpm.Wrapped{EKName: w.EKName, Public: w.Public, Duplicate: w.Duplicate, Seed: w.Seed})
	if err != nil {
		return err
	}
	defer clear(seed)
	m, err := keystore.NewMasterKey(seed)
	if err != nil {
		return err
	}
	if m.KID() != cur.KID {
		m.Close()
		return fmt.Errorf("%w: the imported seed is master %s, the cluster's is %s", keystore.ErrIntegrity, m.KID(), cur.KID)
	}
	ownPub, err := e.g.publicKey()
	if err != nil {
		m.Close()
		return err
	}
	own := ownPub.KID
	blob, err := e.g.readBlob("master.sealed") // its PCR policy is the node's choice
	if err != nil {
		m.Close()
		return err
	}
	keep, err := e.g.keepInRing(own)
	if err != nil {
		m.Close()
		return err
	}
	t.Close() // installMaster opens the TPM itself
	if err := e.g.installMaster(m, seed, blob.PCRs, nil, true, keep...); err != nil {
		m.Close()
		return fmt.Errorf("seal the cluster master to this TPM: %w", err)
	}
	e.key.Add(m)
	return nil
}

// issue wraps the cluster seed to every approved node that waits for it.
// Of daemons issuing at once, one write wins (the status's resource
// version); the others' fail harmlessly.
func (e *enroller) issue() {
	nodes, err := e.c.ListNodes()
	if err != nil {
		e.log.Warn("cannot list KeyfsNodes", "err", err)
		return
	}
	cur := e.current()
	for i := range nodes {
		o := &nodes[i]
		if o.Name == e.node || (o.Status.State == kubestore.StateEnrolled && o.Status.KID == cur.KID) ||
			(o.Status.Enrollment != nil && o.Status.Enrollment.KID == cur.KID) {
			continue
		}
		if h, err := tpm.PublicHash(o.Spec.EKPublic); err != nil || h != o.Spec.EKHash {
			e.log.Warn("KeyfsNode's EK does not match its EK hash; not issuing", "node", o.Name, "err", err)
			continue
		}
		how := ""
		switch {
		case o.Spec.ApprovedEKHash != "" && o.Spec.ApprovedEKHash == o.Spec.EKHash:
			how = "approved by an admin"
		case e.allow[o.Spec.EKHash]:
			how = "EK hash on the --auto-approve-ek list"
		case e.roots != nil && len(o.Spec.EKCertificate) > 0:
			if err := tpm.VerifyEKCert(o.Spec.EKPublic, o.Spec.EKCertificate, e.roots); err != nil {
				if e.warned[o.Name] != o.ResourceVersion {
					e.log.Warn("KeyfsNode's EK certificate is not approved by --auto-approve-ek-ca; an admin can approve it", "node", o.Name, "err", err)
					e.warned[o.Name] = o.ResourceVersion
				}
				continue
			}
			how = "EK certificate chains to --auto-approve-ek-ca"
		default:
			continue
		}
		w, err := e.wrap(cur, o.Spec.EKPublic)
		if err != nil {
			e.log.Error("cannot wrap the cluster master to a node's EK", "node", o.Name, "err", err)
			continue
		}
		o.Status = kubestore.KeyfsNodeStatus{State: kubestore.StateIssued, KID: o.Status.KID,
			Message:    fmt.Sprintf("cluster master %s wrapped to EK %s by %s (%s)", cur.KID, o.Spec.EKHash, e.node, how),
			Enrollment: &kubestore.Enrollment{EKName: w.EKName, Public: w.Public, Duplicate: w.Duplicate, Seed: w.Seed, KID: cur.KID, IssuedBy: e.node}}
		if _, err := e.c.SetNodeStatus(o); err != nil {
			if !errors.Is(err, keystore.ErrConflict) {
				e.log.Warn("cannot write an enrollment", "node", o.Name, "err", err)
			}
			continue
		}
		e.log.Info("issued the cluster master to a node", "node", o.Name, "ek_hash", o.Spec.EKHash, "how", how)
		e.event("enroll-issue", fmt.Sprintf("to node %s, EK %s, %s", o.Name, o.Spec.EKHash, how))
	}
}

// wrap unseals master cur from this node's TPM and wraps it to ek.
func (e *enroller) wrap(cur *keystore.PublicKey, ek []byte) (*tpm.Wrapped, error) {
	t, err := e.g.openTPM()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	seed, err := e.g.unsealSeed(t, e.g.masterFile(cur.KID), cur.KID)
	if err != nil {
		return nil, err
	}
	defer clear(seed)
	return tpm.WrapToEK(ek, seed)
}
