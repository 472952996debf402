package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/internal/syncbuf"
	"github.com/keyfs/keyfs/kubestore"
	"github.com/keyfs/keyfs/tpm"
	"github.com/keyfs/keyfs/tpm/tpmtest"
)

// node is one cluster node of a test: its own state and swtpm.
type node struct {
	*cli
	name, mnt string
	mount     *os.Process
	cmd       *exec.Cmd
	log       *syncbuf.Buffer
	args      []string // the daemon's flags
}

func (n *node) cmdOf() *exec.Cmd { return n.cmd }

func startNode(t *testing.T, work, name string, env []string, args ...string) *node {
	t.Helper()
	return startNodeOn(t, work, name, tpmtest.StartSWTPM(t), env, args...)
}

// startNodeOn starts a node on the given TPM, its daemon with args.
func startNodeOn(t *testing.T, work, name, tpmSpec string, env []string, args ...string) *node {
	t.Helper()
	n := &node{cli: &cli{t: t, state: filepath.Join(work, name), tpm: tpmSpec, env: env}, name: name, mnt: filepath.Join(work, name+"-keys"), args: args}
	n.must(0, "", "init")
	t.Cleanup(func() {
		if fusetest.MustMounted(t, n.mnt) {
			syscall.Unmount(n.mnt, syscall.MNT_DETACH)
		}
	})
	n.run(t)
	return n
}

// run starts the node's daemon: keyfs mount, stopped when the test ends.
func (n *node) run(t *testing.T) {
	cmd := n.keyfsCmd(append([]string{"mount", n.mnt}, n.args...)...)
	cmd.Env = append(cmd.Env, "NODE_NAME="+n.name)
	n.log = startChild(t, cmd)
	n.mount, n.cmd = cmd.Process, cmd
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGTERM)
			waitOrDump(t, cmd, 30*time.Second, n.log)
		}
	})
}

// restartNode starts a stopped node's daemon again, on its state and TPM.
func restartNode(t *testing.T, n *node, env []string) *node {
	n2 := &node{cli: n.cli, name: n.name, mnt: n.mnt, args: n.args}
	n2.run(t)
	return n2
}

func (n *node) reads(path, want string, d time.Duration) bool {
	return poll(d, func() bool { b, _ := os.ReadFile(filepath.Join(n.mnt, path)); return string(b) == want })
}

// TestClusterEnrollment: node-a bootstraps the cluster master; node-b,
// with its own TPM, waits for approval; a wrong EK hash approves nothing;
// after keyfs node approve, node-b imports the seed under its EK within
// 10 s and serves; a blob made for node-b planted on node-c is refused
// naming both TPMs; a put reaches both nodes within 2 s.
func TestClusterEnrollment(t *testing.T) {
	fusetest.Require(t)
	k, ns, work, env := clusterTest(t)
	admin := adminCLI(t, work, env)

	a := startNode(t, work, "node-a", env)
	if !logged(a.log, "bootstrapped the cluster master") {
		t.Fatalf("node-a did not bootstrap:\n%s", a.log.String())
	}
	admin.must(0, "sk-enroll-1", "put", "acme/openai")
	if !a.reads("acme/openai", "sk-enroll-1", 2*time.Second) {
		t.Fatal("node-a does not serve the key")
	}

	b := startNode(t, work, "node-b", env)
	ekB := strings.TrimSpace(b.must(0, "", "node", "ek").stdout)
	if !logged(b.log, "waiting for enrollment") {
		t.Fatalf("node-b does not wait for enrollment:\n%s", b.log.String())
	}
	ls := admin.must(0, "", "node", "ls").stdout
	if !strings.Contains(ls, "node-b  "+ekB+"  WaitingForApproval") || !strings.Contains(ls, "keyfs node approve node-b") {
		t.Fatalf("node ls while node-b waits:\n%s", ls)
	}
	if ok, _ := fusetest.Mounted(b.mnt); ok {
		t.Fatal("node-b mounted keys before enrollment")
	}
	wrong := strings.Repeat("0", 64)
	if r := admin.must(exitIntegrity, "", "node", "approve", "node-b", "--ek-hash", wrong); !strings.Contains(r.stderr, "registered EK "+ekB+", not "+wrong) {
		t.Errorf("approve with a wrong EK hash: %s", r.stderr)
	}
	start := time.Now()
	if r := admin.must(0, "", "node", "approve", "node-b", "--ek-hash", ekB); !strings.Contains(r.stderr, "approved node node-b with EK hash "+ekB) {
		t.Errorf("approve: %s", r.stderr)
	}
	if !b.reads("acme/openai", "sk-enroll-1", 10*time.Second) {
		t.Fatalf("node-b not enrolled within 10 s of approval:\nnode-b:\n%s\nnode-a:\n%s", b.log.String(), a.log.String())
	}
	t.Logf("node-b serves keys %s after approval", time.Since(start).Round(10*time.Millisecond))
	if ls := admin.must(0, "", "node", "ls").stdout; !strings.Contains(ls, "node-b  "+ekB+"  Enrolled") {
		t.Errorf("node ls after enrollment:\n%s", ls)
	}
	kid := strings.TrimSpace(a.kid())
	if b.kid() != kid {
		t.Errorf("node-b's state holds kid %s, the cluster's is %s", b.kid(), kid)
	}

	// Put once, read on both within 2 s.
	admin.must(0, "sk-enroll-2", "put", "acme/openai")
	if !a.reads("acme/openai", "sk-enroll-2", 2*time.Second) || !b.reads("acme/openai", "sk-enroll-2", 2*time.Second) {
		t.Fatal("a put did not reach both nodes within 2 s")
	}

	// A blob made for node-b's TPM, planted on node-c: refused, named.
	c := startNode(t, work, "node-c", env)
	ekC := strings.TrimSpace(c.must(0, "", "node", "ek").stdout)
	logged(c.log, "waiting for enrollment")
	client, err := kubestore.New(k.Config("admin"), ns)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := client.GetNode("node-b")
	if err != nil {
		t.Fatal(err)
	}
	seed := make([]byte, 32)
	rand.Read(seed)
	w, err := tpm.WrapToEK(nb.Spec.EKPublic, seed)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := client.GetNode("node-c")
	if err != nil {
		t.Fatal(err)
	}
	nc.Status.State = kubestore.StateIssued
	nc.Status.Enrollment = &kubestore.Enrollment{EKName: w.EKName, Public: w.Public, Duplicate: w.Duplicate, Seed: w.Seed, KID: kid, IssuedBy: "intruder"}
	if _, err := client.SetNodeStatus(nc); err != nil {
		t.Fatal(err)
	}
	want := "made for TPM " + ekB + ", this TPM is " + ekC
	if !logged(c.log, want) {
		t.Fatalf("node-c did not refuse node-b's blob with %q:\n%s", want, c.log.String())
	}
	if !poll(5*time.Second, func() bool {
		o, err := client.GetNode("node-c")
		return err == nil && o.Status.State == kubestore.StateFailed && strings.Contains(o.Status.Message, want)
	}) {
		t.Error("node-c's KeyfsNode does not say why it refused")
	}
	if ok, _ := fusetest.Mounted(c.mnt); ok || c.kid() == kid {
		t.Error("node-c took a blob made for another TPM")
	}
	// Approving node-c drops the blob it refused, so that one is issued anew.
	admin.must(0, "", "node", "approve", "node-c", "--ek-hash", ekC)
	if !c.reads("acme/openai", "sk-enroll-2", 10*time.Second) {
		t.Fatalf("node-c not enrolled within 10 s of its approval after a refused blob:\n%s", c.log.String())
	}
	code, body, _ := k.Request(k.Token("admin"), http.MethodGet, "/apis/keyfs.dev/v1alpha1/keyfsclusters/default", nil)
	var kc kubestore.KeyfsCluster
	if code != http.StatusOK || json.Unmarshal(body, &kc) != nil || kc.Spec.KID != kid || kc.Spec.BootstrapNode != "node-a" {
		t.Errorf("the KeyfsCluster changed: %d %s", code, body)
	}
	for _, n := range []*node{a, b, c} {
		noValueIn(t, n.state, "sk-enroll-1", "sk-enroll-2")
		if bytes.Contains([]byte(n.log.String()), seed[:8]) || strings.Contains(n.log.String(), "sk-enroll") {
			t.Errorf("%s logged a secret", n.name)
		}
	}
	noValueIn(t, k.EtcdDir(), "sk-enroll-1", "sk-enroll-2")
}

// TestClusterAutoApprove: with --auto-approve-ek-ca, a node whose TPM has
// an EK certificate from that CA enrolls without an admin; one without a
// certificate still waits for keyfs node approve.
func TestClusterAutoApprove(t *testing.T) {
	fusetest.Require(t)
	_, _, work, env := clusterTest(t)
	admin := adminCLI(t, work, env)
	specB, caPEM := tpmtest.StartSWTPMWithEKCert(t)
	ca := filepath.Join(work, "ek-ca.pem")
	writeFile(t, ca, string(caPEM))

	a := startNode(t, work, "node-a", env, "--auto-approve-ek-ca", ca)
	if !logged(a.log, "bootstrapped the cluster master") {
		t.Fatalf("node-a did not bootstrap:\n%s", a.log.String())
	}
	admin.must(0, "sk-auto-1", "put", "acme/openai")
	start := time.Now()
	b := startNodeOn(t, work, "node-b", specB, env)
	if !b.reads("acme/openai", "sk-auto-1", 15*time.Second) {
		t.Fatalf("node-b with a CA-issued EK certificate was not enrolled:\nnode-b:\n%s\nnode-a:\n%s", b.log.String(), a.log.String())
	}
	t.Logf("node-b enrolled by its EK certificate %s after its daemon started", time.Since(start).Round(10*time.Millisecond))
	if !logged(a.log, "EK certificate chains to --auto-approve-ek-ca") {
		t.Errorf("node-a does not say why it enrolled node-b:\n%s", a.log.String())
	}
	c := startNode(t, work, "node-c", env)
	logged(c.log, "waiting for enrollment")
	time.Sleep(3 * time.Second)
	if ok, _ := fusetest.Mounted(c.mnt); ok {
		t.Fatal("node-c, without an EK certificate, was enrolled without approval")
	}
	if ls := admin.must(0, "", "node", "ls").stdout; !strings.Contains(ls, "node-c") || !strings.Contains(ls, "WaitingForApproval") {
		t.Errorf("node ls:\n%s", ls)
	}
	missing := filepath.Join(work, "no-such-ca.pem")
	if r := b.must(exitNotFound, "", "mount", "--auto-approve-ek-ca", missing, filepath.Join(work, "keys-b2")); !strings.Contains(r.stderr, "--auto-approve-ek-ca: open "+missing) {
		t.Errorf("a missing CA file: %s", r.stderr)
	}
}
