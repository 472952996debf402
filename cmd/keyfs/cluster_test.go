package main

import (
	"bytes"
	"crypto/tls"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/internal/kubetest"
)

// TestClusterStore: against a real API server, the first node's daemon
// bootstraps KeyfsCluster; an admin without state or TPM puts a key and
// applies a `seal --cluster -o yaml` manifest; the running mount shows
// both within 2 s, and a removal; no value reaches etcd.
func TestClusterStore(t *testing.T) {
	fusetest.Require(t)
	k, ns, work, kube := clusterTest(t)
	nodeA := &cli{t: t, state: filepath.Join(work, "node-a"), tpm: "sim", env: kube}
	admin := adminCLI(t, work, kube)

	if r := admin.must(exitNotFound, "sk-too-early", "put", "acme/openai"); !strings.Contains(r.stderr, "no KeyfsCluster") || !strings.Contains(r.stderr, "keyfs serve --store kubernetes creates it") {
		t.Errorf("put before any node bootstrapped: %s", r.stderr)
	}
	kid := strings.TrimSpace(nodeA.must(0, "", "init").stdout)
	mnt := filepath.Join(work, "keys")
	t.Cleanup(func() {
		if fusetest.MustMounted(t, mnt) {
			syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
	})
	mount := nodeA.keyfsCmd("mount", mnt)
	mount.Env = append(mount.Env, "NODE_NAME=node-a")
	stderr := startChild(t, mount)
	if !logged(stderr, "bootstrapped the cluster master") || !logged(stderr, "serving keys") {
		t.Fatalf("the first node did not bootstrap and serve:\n%s", stderr.String())
	}

	admin.must(0, "sk-cluster-put", "put", "acme/openai")
	if !poll(2*time.Second, func() bool {
		b, _ := os.ReadFile(filepath.Join(mnt, "acme", "openai"))
		return string(b) == "sk-cluster-put"
	}) {
		t.Fatalf("a put did not reach the mount within 2 s:\n%s", stderr.String())
	}
	y := admin.must(0, "sk-from-git", "seal", "--cluster", "--tenant", "beta", "--name", "gemini_1", "-o", "yaml").stdout
	if !strings.Contains(y, "kind: SealedKey") || !strings.Contains(y, "name: beta.gemini--u1") || strings.Contains(y, "sk-from-git") {
		t.Fatalf("seal -o yaml:\n%s", y)
	}
	apply(t, k, ns, y)
	if !poll(2*time.Second, func() bool {
		b, _ := os.ReadFile(filepath.Join(mnt, "beta", "gemini_1"))
		return string(b) == "sk-from-git"
	}) {
		t.Fatalf("an applied SealedKey did not reach the mount within 2 s")
	}
	// The node's audit trail records both, with what the API says of the writer.
	var trail string
	if !poll(5*time.Second, func() bool {
		trail = nodeA.must(0, "", "audit", "-o", "json").stdout
		return strings.Contains(trail, `"reason":"add of SealedKey `+ns+`/beta.gemini--u1 by field manager Go-http-client (Update at `)
	}) || !strings.Contains(trail, `"event":"sealedkey","tenant":"acme","key":"openai"`) || !strings.Contains(trail, "by field manager keyfs (Update at ") {
		t.Errorf("the audit trail lacks the SealedKeys' arrival and writers:\n%s", trail)
	}
	ls := admin.must(0, "", "ls").stdout
	if !strings.Contains(ls, "acme    openai") || !strings.Contains(ls, "beta    gemini_1") || !strings.Contains(ls, kid) {
		t.Errorf("ls --store kubernetes:\n%s", ls)
	}
	if v := nodeA.must(0, "", "verify").stdout; strings.Count(v, "  ok") != 2 {
		t.Errorf("verify on the node holding the cluster master:\n%s", v)
	}
	// A SealedKey sealed to another master: its file fails, alone.
	other := &cli{t: t, state: filepath.Join(work, "other"), tpm: "sim"}
	other.must(0, "", "init")
	otherPub := filepath.Join(work, "other.pub")
	writeFile(t, otherPub, other.must(0, "", "pubkey").stdout)
	apply(t, k, ns, admin.must(0, "sk-foreign", "seal", "--pubkey", otherPub, "--tenant", "acme", "--name", "foreign", "-o", "yaml").stdout)
	foreign := filepath.Join(mnt, "acme", "foreign")
	if !poll(2*time.Second, func() bool { _, err := os.Stat(foreign); return err == nil }) {
		t.Fatal("a SealedKey sealed to another master is not listed")
	}
	if _, err := os.ReadFile(foreign); !errors.Is(err, syscall.EIO) {
		t.Errorf("read of a record sealed to another master: %v, want EIO", err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "acme", "openai")); err != nil || string(b) != "sk-cluster-put" {
		t.Errorf("a foreign neighbour broke acme/openai: %q %v", b, err)
	}
	if !logged(stderr, "refusing a SealedKey") || !strings.Contains(stderr.String(), "acme.foreign") {
		t.Errorf("the refusal is not logged naming the object:\n%s", stderr.String())
	}
	// The mount writes audit events just after the reply: wait for it.
	if !poll(5*time.Second, func() bool {
		return strings.Contains(nodeA.must(0, "", "audit", "-o", "json").stdout, `"key":"foreign"`)
	}) {
		t.Error("no audit event for the refused read")
	}

	admin.must(0, "", "rm", "acme/openai")
	if !poll(2*time.Second, func() bool { _, err := os.Stat(filepath.Join(mnt, "acme", "openai")); return os.IsNotExist(err) }) {
		t.Fatalf("a removed key still shows after 2 s")
	}
	if r := admin.must(exitNotFound, "", "master", "rotate"); !strings.Contains(r.stderr, "no keyfs state") {
		t.Errorf("master rotate off a node: %s", r.stderr)
	}

	mount.Process.Signal(syscall.SIGTERM)
	if err := waitOrDump(t, mount, 30*time.Second, stderr); err != nil {
		t.Fatal(err)
	}
	noValueIn(t, k.EtcdDir(), "sk-cluster-put", "sk-from-git", "sk-foreign")
	noValueIn(t, nodeA.state, "sk-cluster-put", "sk-from-git")
	if strings.Contains(stderr.String(), "sk-") {
		t.Error("the daemon logged a value")
	}
}

// apply creates the objects of a YAML manifest as kubectl apply would.
func apply(t *testing.T, k *kubetest.Cluster, ns, y string) {
	t.Helper()
	j, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	cfg := k.Config("admin")
	req, _ := http.NewRequest(http.MethodPost, cfg.Host+"/apis/keyfs.dev/v1alpha1/namespaces/"+ns+"/sealedkeys", bytes.NewReader(j))
	req.Header.Set("Authorization", "Bearer "+cfg.BearerToken)
	req.Header.Set("Content-Type", "application/json")
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("apply: %s", resp.Status)
	}
}

// clusterTest is what a cluster-mode test starts from: the API server, a
// namespace of its own, a work directory, and the environment that points
// keyfs at them.
func clusterTest(t *testing.T) (k *kubetest.Cluster, ns, work string, env []string) {
	k = clusterAPI(t)
	ns = k.Namespace(t)
	return k, ns, t.TempDir(), []string{"KEYFS_STORE=kubernetes", "KUBECONFIG=" + k.Kubeconfig, "KEYFS_NAMESPACE=" + ns}
}

// adminCLI runs keyfs as an admin's machine does: no state, no TPM.
func adminCLI(t *testing.T, work string, env []string) *cli {
	return &cli{t: t, state: filepath.Join(work, "admin-no-state"), tpm: "/nonexistent/tpm", env: env}
}

// clusterAPI is the test binary's API server, with no KeyfsCluster or
// KeyfsNode left when the test ends (they are cluster-scoped).
func clusterAPI(t *testing.T) *kubetest.Cluster {
	k := kubetest.Start(t)
	t.Cleanup(func() {
		for _, p := range []string{"/apis/keyfs.dev/v1alpha1/keyfsclusters/default", "/apis/keyfs.dev/v1alpha1/keyfsnodes"} {
			if code, b, err := k.Request(k.Token("admin"), http.MethodDelete, p, nil); err != nil || (code != http.StatusOK && code != http.StatusNotFound) {
				t.Errorf("delete %s: %d %s %v", p, code, b, err)
			}
		}
	})
	return k
}
