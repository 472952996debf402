package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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
	allow   map[string]bool // EK hashes approved by configuration

	mu       sync.Mutex
	enrolled bool
	waitErr  error         // why the node cannot serve yet
	ready    chan struct{} // closed once enrolled
	tried    string        // the enrollment last refused, not tried again
}

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
	e.audit.Log(audit.Event{Time: time.Now().UTC(), Event: name, KID: e.cluster.KID, Node: e.node, Reason: reason})
}

// run plays the roles until ctx ends: the receiver's until enrolled, then
// the issuer's.
func (e *enroller) run(ctx context.Context) {
	t := time.NewTicker(enrollPoll)
	defer t.Stop()
	for {
		if e.check() == nil {
			e.issue()
		} else {
			e.receive()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// register writes this node's EK to its KeyfsNode and marks it waiting.
func (e *enroller) register() error {
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

// receive imports an enrollment issued to this node, if there is one.
func (e *enroller) receive() {
	o, err := e.c.GetNode(e.node)
	if err != nil {
		e.log.Warn("cannot read this node's KeyfsNode", "err", err)
		return
	}
	w := o.Status.Enrollment
	if w == nil || o.ResourceVersion == e.tried {
		return
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
	// Drop the EK-wrapped copy: the seed is sealed under this TPM's SRK now.
	o.Status = kubestore.KeyfsNodeStatus{State: kubestore.StateEnrolled, KID: e.cluster.KID,
		Message: fmt.Sprintf("holds the cluster master %s, issued by %s", e.cluster.KID, w.IssuedBy)}
	if _, err := e.c.SetNodeStatus(o); err != nil {
		e.log.Warn("enrolled, but cannot say so in the KeyfsNode", "err", err)
	}
	e.log.Info("enrolled: this node holds the cluster master", "node", e.node, "kid", e.cluster.KID, "issued_by", w.IssuedBy)
	e.event("enroll", "issued by "+w.IssuedBy)
	e.mu.Lock()
	e.enrolled = true
	close(e.ready)
	e.mu.Unlock()
}

// importSeed imports w under this TPM's EK, checks that it is the cluster
// master, seals it under this TPM's SRK with the PCRs of the node's own
// master (which stays in the ring), and adds it to the daemon's key.
func (e *enroller) importSeed(w *kubestore.Enrollment) error {
	if w.KID != e.cluster.KID {
		return fmt.Errorf("%w: issued for master %s, the cluster's is %s", keystore.ErrIntegrity, w.KID, e.cluster.KID)
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
	if m.KID() != e.cluster.KID {
		m.Close()
		return fmt.Errorf("%w: the imported seed is master %s, the cluster's is %s", keystore.ErrIntegrity, m.KID(), e.cluster.KID)
	}
	own := e.key.KID()
	_, blob, err := e.g.unsealSeed(t, "master.sealed", own)
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
	for i := range nodes {
		o := &nodes[i]
		if o.Name == e.node || o.Status.State == kubestore.StateEnrolled || (o.Status.Enrollment != nil && o.Status.Enrollment.KID == e.cluster.KID) {
			continue
		}
		approved := o.Spec.ApprovedEKHash != "" && o.Spec.ApprovedEKHash == o.Spec.EKHash
		if !approved && !e.allow[o.Spec.EKHash] {
			continue
		}
		if h, err := tpm.PublicHash(o.Spec.EKPublic); err != nil || h != o.Spec.EKHash {
			e.log.Warn("KeyfsNode's EK does not match its EK hash; not issuing", "node", o.Name, "err", err)
			continue
		}
		w, err := e.wrap(o.Spec.EKPublic)
		if err != nil {
			e.log.Error("cannot wrap the cluster master to a node's EK", "node", o.Name, "err", err)
			continue
		}
		how := "approved by an admin"
		if !approved {
			how = "EK hash on the --auto-approve-ek list"
		}
		o.Status = kubestore.KeyfsNodeStatus{State: kubestore.StateIssued, Message: fmt.Sprintf("cluster master %s wrapped to EK %s by %s (%s)", e.cluster.KID, o.Spec.EKHash, e.node, how),
			Enrollment: &kubestore.Enrollment{EKName: w.EKName, Public: w.Public, Duplicate: w.Duplicate, Seed: w.Seed, KID: e.cluster.KID, IssuedBy: e.node}}
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

// wrap unseals the cluster seed from this node's TPM and wraps it to ek.
func (e *enroller) wrap(ek []byte) (*tpm.Wrapped, error) {
	t, err := e.g.openTPM()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	seed, _, err := e.g.unsealSeed(t, e.clusterFile(), e.cluster.KID)
	if err != nil {
		return nil, err
	}
	defer clear(seed)
	return tpm.WrapToEK(ek, seed)
}

// clusterFile is the TPM blob of the cluster master in this node's state.
func (e *enroller) clusterFile() string {
	if p, err := e.g.publicKey(); err == nil && p.KID == e.cluster.KID {
		return "master.sealed"
	}
	return ringFile(e.cluster.KID, "sealed")
}
