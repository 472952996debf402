package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/dynamic"

	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/kubestore"
	"github.com/keyfs/keyfs/tpm"
)

// The two-node scenarios: node-b joins the cluster node-a bootstrapped,
// with its own TPM, and gets the cluster master only through enrollment.
func (h *harness) runTwoNodeScenarios(ctx context.Context) {
	if !h.check(ctx, "two nodes: node-b joins and waits for approval; its pod does not start, and says how to approve it", h.nodeBWaits) {
		return
	}
	h.check(ctx, "two nodes: node-b's own token cannot update node-a's KeyfsNode, approve itself, or read Secrets", func(ctx context.Context) (string, error) {
		return h.tokenForbidden(ctx, nodeBName, kubestore.StateWaiting, nodeName)
	})
	h.check(ctx, "two nodes: an enrollment made for node-a's TPM, planted on node-b, is refused and changes nothing", h.foreignBlob)
	if !h.check(ctx, "two nodes: keyfs node approve node-b enrolls it within 10 s, and its pod reads its key", h.approveNodeB) {
		return
	}
	h.check(ctx, "two nodes: keyfs put --store kubernetes and an applied keyfs seal --cluster manifest reach pods on both nodes within 2 s", h.bothNodesPut)
	h.check(ctx, "two nodes: keyfs rm makes the file vanish on both nodes within 2 s", h.bothNodesRm)
	h.check(ctx, "two nodes: a SealedKey sealed to another master reads as EIO on both nodes, with a Warning event; other keys keep working", h.foreignMaster)
}

func (h *harness) admin() (*kubestore.Client, error) { return kubestore.New(h.rest, keyfsNamespace) }

func (h *harness) nodeBWaits(ctx context.Context) (string, error) {
	if h.s.reader == nil || h.s.clusterValue == "" {
		return "", errors.New("no reader pod in cluster mode on node-a (an earlier scenario failed)")
	}
	t := time.Now()
	if err := h.nodeBUp(ctx); err != nil {
		return "", err
	}
	up := time.Since(t)
	c, err := h.admin()
	if err != nil {
		return "", err
	}
	var o *kubestore.KeyfsNode
	if err := waitFor(ctx, 120*time.Second, "KeyfsNode node-b waiting for approval", func() (bool, error) {
		o, err = c.GetNode(nodeBName)
		return err == nil && o.Status.State == kubestore.StateWaiting, nil
	}); err != nil {
		p, _ := h.dsPodOn(ctx, nodeBName)
		if p != nil {
			err = fmt.Errorf("%w\n%s", err, h.describePod(ctx, p))
		}
		return "", err
	}
	registered := time.Since(t)
	p, err := h.createPod(ctx, onNode(readerPod("acme", "reader-b", "acme", "openai", nil, keyFile), nodeBName))
	if err != nil {
		return "", err
	}
	h.s.readerB = p
	want := "keyfs node approve " + nodeBName
	var msg string
	if err := waitFor(ctx, 90*time.Second, "a FailedMount event on acme/reader-b naming "+want, func() (bool, error) {
		evs, err := h.podEvents(ctx, p)
		if err != nil {
			return false, nil
		}
		for _, e := range evs {
			if e.Reason == "FailedMount" && strings.Contains(e.Message, want) {
				msg = e.Message
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		return "", fmt.Errorf("%w\n%s", err, h.describePod(ctx, p))
	}
	q, err := h.kube.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if everRan(q) {
		return "", errors.New("acme/reader-b started on a node without the cluster master")
	}
	_, kc, err := c.Cluster()
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile(h.nodeBPath("keyfs-state", "master.pub"))
	if err != nil {
		return "", fmt.Errorf("node-b's init container made no master key: %w", err)
	}
	own, err := keystore.ParsePublicKey(b)
	if err != nil {
		return "", err
	}
	if own.KID == kc.KID {
		return "", fmt.Errorf("node-b's own master is the cluster's (%s): it cannot have been sealed on node-b alone", kc.KID)
	}
	if len(msg) > 300 {
		msg = msg[:300] + "…"
	}
	return fmt.Sprintf("node-b (own mount and network namespaces, containerd, kubelet, swtpm, cgroup root /node-b) Ready %s after start; its keyfs registered KeyfsNode node-b (EK %.16s…) as %s %s after start, holding only its own master %s (the cluster's is %s)\nacme/reader-b not started; kubelet's event: %s",
		up.Round(100*time.Millisecond), o.Spec.EKHash, o.Status.State, registered.Round(100*time.Millisecond), own.KID, kc.KID, msg), nil
}

// foreignBlob plants on node-b's KeyfsNode an enrollment of the cluster's
// kid wrapped to node-a's EK, as a confused or malicious issuer would.
func (h *harness) foreignBlob(ctx context.Context) (string, error) {
	c, err := h.admin()
	if err != nil {
		return "", err
	}
	na, err := c.GetNode(nodeName)
	if err != nil {
		return "", err
	}
	nb, err := c.GetNode(nodeBName)
	if err != nil {
		return "", err
	}
	before, _, err := c.Cluster()
	if err != nil {
		return "", err
	}
	seed := make([]byte, 32)
	rand.Read(seed)
	w, err := tpm.WrapToEK(na.Spec.EKPublic, seed)
	clear(seed)
	if err != nil {
		return "", err
	}
	nb.Status.State = kubestore.StateIssued
	nb.Status.Enrollment = &kubestore.Enrollment{EKName: w.EKName, Public: w.Public, Duplicate: w.Duplicate, Seed: w.Seed, KID: before.Spec.KID, IssuedBy: "keyfs-e2e"}
	planted := time.Now()
	if _, err := c.SetNodeStatus(nb); err != nil {
		return "", err
	}
	want := "made for TPM " + na.Spec.EKHash + ", this TPM is " + nb.Spec.EKHash
	var got *kubestore.KeyfsNode
	if err := waitFor(ctx, 15*time.Second, "node-b refusing the blob", func() (bool, error) {
		got, err = c.GetNode(nodeBName)
		return err == nil && got.Status.State == kubestore.StateFailed, nil
	}); err != nil {
		return "", err
	}
	if !strings.Contains(got.Status.Message, want) {
		return "", fmt.Errorf("node-b's KeyfsNode says %q, want it to name both TPMs (%s)", got.Status.Message, want)
	}
	after, _, err := c.Cluster()
	if err != nil {
		return "", err
	}
	if after.Spec.KID != before.Spec.KID || after.Spec.BootstrapNode != before.Spec.BootstrapNode {
		return "", fmt.Errorf("KeyfsCluster changed: kid %s → %s", before.Spec.KID, after.Spec.KID)
	}
	if na2, err := c.GetNode(nodeName); err != nil || na2.Status.State != kubestore.StateEnrolled {
		return "", fmt.Errorf("node-a's KeyfsNode changed: %v %v", na2, err)
	}
	q, err := h.kube.CoreV1().Pods("acme").Get(ctx, "reader-b", metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if everRan(q) {
		return "", errors.New("acme/reader-b started after the planted blob")
	}
	// e2etool prints a line on each change: node-a's pod still reads the
	// value it read, and saw nothing else since the blob was planted.
	ls, err := h.podLines(ctx, h.s.reader)
	if err != nil {
		return "", err
	}
	if len(ls) == 0 || ls[len(ls)-1].State != "ok" || ls[len(ls)-1].SHA256 != sum(h.s.clusterValue) {
		return "", fmt.Errorf("node-a's pod does not read the stored value: %v", ls)
	}
	for _, l := range ls {
		if l.Time().After(planted) && l.State != "ok" {
			return "", fmt.Errorf("node-a's pod read %s after the blob was planted", l)
		}
	}
	return fmt.Sprintf("node-b's KeyfsNode: %s: %q\nKeyfsCluster unchanged (kid %s), node-a Enrolled and its pod reading, acme/reader-b still not started",
		got.Status.State, got.Status.Message, after.Spec.KID), nil
}

func (h *harness) approveNodeB(ctx context.Context) (string, error) {
	if h.s.readerB == nil {
		return "", errors.New("no reader pod on node-b")
	}
	c, err := h.admin()
	if err != nil {
		return "", err
	}
	nb, err := c.GetNode(nodeBName)
	if err != nil {
		return "", err
	}
	t := time.Now()
	if _, err := h.keyfsCluster("", "node", "approve", nodeBName, "--ek-hash", nb.Spec.EKHash); err != nil {
		return "", err
	}
	_, kc, err := c.Cluster()
	if err != nil {
		return "", err
	}
	var o *kubestore.KeyfsNode
	if err := waitFor(ctx, 30*time.Second, "node-b enrolled", func() (bool, error) {
		o, err = c.GetNode(nodeBName)
		return err == nil && o.Status.State == kubestore.StateEnrolled && o.Status.KID == kc.KID, nil
	}); err != nil {
		if o != nil {
			err = fmt.Errorf("%w; KeyfsNode node-b: %s: %s", err, o.Status.State, o.Status.Message)
		}
		return "", err
	}
	enrolled := time.Since(t)
	l, err := h.waitLine(ctx, h.s.readerB, 150*time.Second, "acme/reader-b reads "+keyFile, func(l watchLine) bool { return l.State == "ok" })
	if err != nil {
		return "", fmt.Errorf("%w\n%s", err, h.describePod(ctx, h.s.readerB))
	}
	read := time.Since(t)
	if l.SHA256 != sum(h.s.clusterValue) {
		return "", fmt.Errorf("acme/reader-b read sha256 %s, stored %s", l.SHA256, sum(h.s.clusterValue))
	}
	detail := fmt.Sprintf("KeyfsNode node-b Enrolled (kid %s) %s after keyfs node approve: %q\nacme/reader-b started and read the stored value %s after approve (kubelet's mount retry back-off)",
		o.Status.KID, enrolled.Round(10*time.Millisecond), o.Status.Message, read.Round(100*time.Millisecond))
	if enrolled > 10*time.Second {
		return detail, errors.New("enrollment slower than 10 s")
	}
	return detail, nil
}

// changeBoth runs do and measures when the readers on both nodes see want.
func (h *harness) changeBoth(ctx context.Context, what string, do func() error, want func(watchLine) bool) (map[string]time.Duration, error) {
	if h.s.reader == nil || h.s.readerB == nil {
		return nil, errors.New("no reader pod on one of the nodes")
	}
	if err := do(); err != nil {
		return nil, err
	}
	done := time.Now()
	out := map[string]time.Duration{}
	for node, p := range map[string]*corev1.Pod{nodeName: h.s.reader, nodeBName: h.s.readerB} {
		d, err := h.sees(ctx, p, done, what+" on "+node, want)
		if err != nil {
			return nil, err
		}
		out[node] = d
	}
	return out, nil
}

// both formats the delays of changeBoth, failing past limit.
func both(d map[string]time.Duration, limit time.Duration) (string, error) {
	s := fmt.Sprintf("%s %s, %s %s", nodeName, d[nodeName].Round(10*time.Millisecond), nodeBName, d[nodeBName].Round(10*time.Millisecond))
	if d[nodeName] > limit || d[nodeBName] > limit {
		return s, fmt.Errorf("slower than %s", limit)
	}
	return s, nil
}

func (h *harness) bothNodesPut(ctx context.Context) (string, error) {
	v := randomValue("two-node-put")
	d, err := h.changeBoth(ctx, "the new value", func() error { _, err := h.keyfsCluster(v, "put", "acme/openai"); return err },
		func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(v) })
	if err != nil {
		return "", err
	}
	h.clusterValues = append(h.clusterValues, v)
	h.s.clusterValue = v
	put, err := both(d, 2*time.Second)
	detail := "keyfs put --store kubernetes, read after: " + put
	if err != nil {
		return detail, err
	}
	v2 := randomValue("two-node-git")
	o, err := h.sealedKey(v2, "--cluster", "--tenant", "acme", "--name", "openai")
	if err != nil {
		return detail, err
	}
	d, err = h.changeBoth(ctx, "the applied value", func() error { return h.applySealedKey(ctx, o) },
		func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(v2) })
	if err != nil {
		return detail, err
	}
	h.clusterValues = append(h.clusterValues, v2)
	h.s.clusterValue = v2
	applied, err := both(d, 2*time.Second)
	return detail + "\nkeyfs seal --cluster -o yaml, applied, read after: " + applied, err
}

func (h *harness) bothNodesRm(ctx context.Context) (string, error) {
	d, err := h.changeBoth(ctx, "the file vanishing", func() error { _, err := h.keyfsCluster("", "rm", "acme/openai"); return err },
		func(l watchLine) bool { return l.State == "missing" })
	if err != nil {
		return "", err
	}
	gone, err := both(d, 2*time.Second)
	detail := "ENOENT after keyfs rm --store kubernetes: " + gone
	if err != nil {
		return detail, err
	}
	v := randomValue("two-node-back")
	d, err = h.changeBoth(ctx, "the file back", func() error { _, err := h.keyfsCluster(v, "put", "acme/openai"); return err },
		func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(v) })
	if err != nil {
		return detail, fmt.Errorf("putting a value back: %w", err)
	}
	h.clusterValues = append(h.clusterValues, v)
	h.s.clusterValue = v
	back, _ := both(d, time.Hour)
	return detail + "\nput back: readable again after " + back, nil
}

// foreignMaster applies a well-formed SealedKey sealed to a master the
// cluster does not have: its file reads as EIO on every node, each
// refusing node posts a Warning event on the object, and the other keys
// are served.
func (h *harness) foreignMaster(ctx context.Context) (string, error) {
	seed := make([]byte, 32)
	rand.Read(seed)
	m, err := keystore.NewMasterKey(seed)
	clear(seed)
	if err != nil {
		return "", err
	}
	pubFile := h.path("foreign-master.pub")
	if err := os.WriteFile(pubFile, m.Public().Marshal(), 0o600); err != nil {
		return "", err
	}
	m.Close()
	v := randomValue("foreign-master")
	o, err := h.sealedKey(v, "--pubkey", pubFile, "--tenant", "acme", "--name", "stray")
	if err != nil {
		return "", err
	}
	h.clusterValues = append(h.clusterValues, v)
	dyn, err := dynamic.NewForConfig(h.rest)
	if err != nil {
		return "", err
	}
	if err := h.applySealedKey(ctx, o); err != nil {
		return "", fmt.Errorf("the API refused a well-formed SealedKey (only the nodes can tell its master): %w", err)
	}
	defer dyn.Resource(sealedKeys).Namespace(keyfsNamespace).Delete(context.Background(), o.GetName(), metav1.DeleteOptions{})
	const stray = "/keys/acme/stray"
	var out []string
	for _, node := range []string{nodeName, nodeBName} {
		p, err := h.createPod(ctx, onNode(readerPod("acme", "stray-"+strings.TrimPrefix(node, "node-"), "acme", "", nil, stray, keyFile), node))
		if err != nil {
			return "", err
		}
		var eio, ok watchLine
		if _, err := h.waitLine(ctx, p, 120*time.Second, "a pod on "+node+" reading "+stray+" (EIO) and "+keyFile, func(l watchLine) bool {
			switch {
			case l.File == stray && l.State != "ok" && l.State != "missing":
				eio = l
			case l.File == keyFile && l.State == "ok":
				ok = l
			}
			return eio.State != "" && ok.State != ""
		}); err != nil {
			return "", fmt.Errorf("%w\n%s", err, h.describePod(ctx, p))
		}
		if eio.Errno != "EIO" {
			return "", fmt.Errorf("%s on %s: %s, want EIO", stray, node, eio)
		}
		if ok.SHA256 != sum(h.s.clusterValue) {
			return "", fmt.Errorf("%s on %s read sha256 %s, stored %s", keyFile, node, ok.SHA256, sum(h.s.clusterValue))
		}
		out = append(out, fmt.Sprintf("%s: %s %s; %s %s", node, stray, eio, keyFile, ok))
	}
	var evs []corev1.Event
	if err := waitFor(ctx, 20*time.Second, "Warning events on SealedKey "+o.GetName()+" from both nodes", func() (bool, error) {
		l, err := h.kube.CoreV1().Events(keyfsNamespace).List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("involvedObject.name", o.GetName()).String()})
		if err != nil {
			return false, nil
		}
		evs = l.Items
		hosts := map[string]bool{}
		for _, e := range evs {
			if e.Type == corev1.EventTypeWarning && e.Reason == "RecordRefused" {
				hosts[e.Source.Host] = true
			}
		}
		return hosts[nodeName] && hosts[nodeBName], nil
	}); err != nil {
		var seen []string
		for _, e := range evs {
			seen = append(seen, e.Source.Host+": "+e.Reason+" "+e.Message)
		}
		return strings.Join(out, "\n"), fmt.Errorf("%w; events: %v", err, seen)
	}
	msg := evs[0].Message
	if len(msg) > 200 {
		msg = msg[:200] + "…"
	}
	out = append(out, fmt.Sprintf("SealedKey %s: Warning RecordRefused from %s and %s: %s", o.GetName(), nodeName, nodeBName, msg))
	return strings.Join(out, "\n"), nil
}
