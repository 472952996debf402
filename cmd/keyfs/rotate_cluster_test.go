package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/kubestore"
)

// TestClusterRotation: a master rotated on one enrolled node reaches the
// other approved node through the enrollment channel, never a node whose
// KeyfsNode was deleted before; records sealed to either master read on
// both during the change; reseal and retire finish it.
func TestClusterRotation(t *testing.T) {
	fusetest.Require(t)
	k, ns, work, env := clusterTest(t)
	admin := adminCLI(t, work, env)
	client, err := kubestore.New(k.Config("admin"), ns)
	if err != nil {
		t.Fatal(err)
	}
	a := startNode(t, work, "node-a", env)
	if !logged(a.log, "bootstrapped the cluster master") {
		t.Fatalf("node-a did not bootstrap:\n%s", a.log.String())
	}
	kid1 := a.kid()
	oldPub := filepath.Join(work, "old.pub")
	writeFile(t, oldPub, a.must(0, "", "pubkey").stdout)
	admin.must(0, "sk-rot-1", "put", "acme/openai")
	b := startNode(t, work, "node-b", env)
	c := startNode(t, work, "node-c", env)
	d := startNode(t, work, "node-d", env)
	for _, n := range []*node{b, c, d} {
		logged(n.log, "waiting for enrollment")
	}
	for _, n := range []string{"node-a", "node-b", "node-c", "node-d"} {
		admin.must(0, "", "node", "approve", n)
	}
	for _, n := range []*node{b, c, d} {
		if !n.reads("acme/openai", "sk-rot-1", 10*time.Second) {
			t.Fatalf("%s not enrolled:\n%s", n.name, n.log.String())
		}
	}
	// node-d is down during the rotation.
	d.mount.Signal(syscall.SIGTERM)
	waitOrDump(t, d.cmdOf(), 30*time.Second, d.log)
	// node-c leaves the cluster before the rotation.
	c.mount.Signal(syscall.SIGTERM)
	waitOrDump(t, c.cmdOf(), 30*time.Second, c.log)
	if code, _, err := k.Request(k.Token("admin"), "DELETE", "/apis/keyfs.dev/v1alpha1/keyfsnodes/node-c", nil); err != nil || code != 200 {
		t.Fatalf("delete KeyfsNode node-c: %d %v", code, err)
	}

	// Rotate on node-b, which is not the node that bootstrapped.
	kid2 := strings.TrimSpace(b.must(0, "", "master", "rotate").stdout)
	if kid2 == kid1 || b.kid() != kid2 {
		t.Fatalf("rotate on node-b: %s -> %s, its state holds %s", kid1, kid2, b.kid())
	}
	o, _, err := client.Cluster()
	if err != nil || o.Spec.KID != kid2 || len(o.Spec.Older) != 1 || o.Spec.Older[0].KID != kid1 {
		t.Fatalf("KeyfsCluster after the rotation: %+v %v", o, err)
	}
	start := time.Now()
	if !poll(10*time.Second, func() bool { return a.kid() == kid2 }) {
		t.Fatalf("node-a did not receive master %s within 10 s:\nnode-a:\n%s\nnode-b:\n%s", kid2, a.log.String(), b.log.String())
	}
	t.Logf("node-a holds the new master %s after the rotation", time.Since(start).Round(10*time.Millisecond))
	// Old and new records both read on both nodes.
	admin.must(0, "sk-rot-2", "put", "beta/gemini")
	for _, n := range []*node{a, b} {
		if !n.reads("beta/gemini", "sk-rot-2", 2*time.Second) || !n.reads("acme/openai", "sk-rot-1", 0) {
			t.Fatalf("%s does not read records of both masters", n.name)
		}
	}
	// node-d comes back holding only the older master: it serves the
	// records sealed to it at once, and receives the new one.
	d2 := restartNode(t, d, env)
	if !d2.reads("acme/openai", "sk-rot-1", 10*time.Second) {
		t.Fatalf("node-d, back with the older master, does not serve its records:\n%s", d2.log.String())
	}
	if !poll(10*time.Second, func() bool { return d2.kid() == kid2 }) || !d2.reads("beta/gemini", "sk-rot-2", 2*time.Second) {
		t.Fatalf("node-d did not receive master %s after its restart:\n%s", kid2, d2.log.String())
	}
	if ls := admin.must(0, "", "ls").stdout; !strings.Contains(ls, kid1) || !strings.Contains(ls, kid2) {
		t.Fatalf("ls before reseal:\n%s", ls)
	}
	if r := b.must(exitError, "", "master", "retire", kid1); !strings.Contains(r.stderr, "acme/openai") || !strings.Contains(r.stderr, "reseal") {
		t.Errorf("retire with a SealedKey sealed to it: %s", r.stderr)
	}
	if r := b.must(0, "", "master", "reseal"); !strings.Contains(r.stderr, "resealed 1 SealedKeys") {
		t.Errorf("reseal: %s", r.stderr)
	}
	if ls := admin.must(0, "", "ls").stdout; strings.Contains(ls, kid1) {
		t.Fatalf("ls after reseal still shows %s:\n%s", kid1, ls)
	}
	if !a.reads("acme/openai", "sk-rot-1", 2*time.Second) {
		t.Fatal("the resealed record does not read on node-a")
	}
	b.must(0, "", "master", "retire", kid1)
	if o, _, err := client.Cluster(); err != nil || len(o.Spec.Older) != 0 {
		t.Fatalf("KeyfsCluster after retire: %+v %v", o, err)
	}
	// A record sealed to the retired master: refused, alone.
	apply(t, k, ns, admin.must(0, "sk-rot-late", "seal", "--pubkey", oldPub, "--tenant", "acme", "--name", "late", "-o", "yaml").stdout)
	late := filepath.Join(a.mnt, "acme", "late")
	if !poll(3*time.Second, func() bool { _, err := os.ReadFile(late); return errors.Is(err, syscall.EIO) }) {
		t.Error("a record sealed to the retired master does not read as EIO")
	}

	// node-c, removed before the rotation, never received the new master:
	// started again, it waits for an approval nobody gave.
	c2 := restartNode(t, c, env)
	if !logged(c2.log, "waiting for enrollment") {
		t.Fatalf("the removed node-c did not wait:\n%s", c2.log.String())
	}
	time.Sleep(3 * time.Second)
	if c2.kid() == kid2 {
		t.Fatal("the removed node-c received the rotated master")
	}
	if nc, err := client.GetNode("node-c"); err != nil || nc.Status.State != kubestore.StateWaiting || nc.Status.Enrollment != nil {
		t.Errorf("node-c's KeyfsNode: %+v %v", nc, err)
	}
	for _, n := range []*node{a, b, c2, d2} {
		noValueIn(t, n.state, "sk-rot-1", "sk-rot-2", "sk-rot-late")
	}
}
