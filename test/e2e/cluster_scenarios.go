package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/kubestore"
)

// Cluster mode on the same node: manifests/cluster applied over the
// single-node install, as a user switching would. Keys become SealedKey
// objects; the node's daemon bootstraps the KeyfsCluster from its master.
func (h *harness) runClusterScenarios(ctx context.Context) {
	if !h.check(ctx, "cluster mode: manifests/cluster deploys, and the node bootstraps KeyfsCluster from its master key", h.clusterDeploy) {
		return
	}
	h.check(ctx, "cluster mode: keyfs put --store kubernetes reaches a running pod within 2 s", h.clusterPut)
	h.check(ctx, "cluster mode: an applied keyfs seal --cluster -o yaml manifest reaches the pod within 2 s", h.clusterApply)
	h.check(ctx, "cluster mode: the keyfs pod's own token cannot write another node's KeyfsNode, approve its node, or read Secrets", h.clusterToken)
	h.runTwoNodeScenarios(ctx)
	h.check(ctx, "cluster mode: no stored value in etcd's data directory, the nodes' state or the objects read back", h.clusterNoPlaintext)
}

var (
	sealedKeys = schema.GroupVersionResource{Group: "keyfs.dev", Version: "v1alpha1", Resource: "sealedkeys"}
	keyfsNodes = schema.GroupVersionResource{Group: "keyfs.dev", Version: "v1alpha1", Resource: "keyfsnodes"}
)

// keyfsCluster runs the host keyfs against the API as the admin: no state,
// no TPM, as from a laptop.
func (h *harness) keyfsCluster(stdin string, args ...string) (string, error) {
	return h.runKeyfs(stdin, append([]string{"--store=kubernetes", "--kubeconfig=" + h.path("pki", "admin.kubeconfig"), "--state=" + h.path("no-state")}, args...)...)
}

func (h *harness) clusterDeploy(ctx context.Context) (string, error) {
	detail, err := h.deployOverlay(ctx, "overlay-cluster")
	if err != nil {
		return detail, err
	}
	c, err := h.admin()
	if err != nil {
		return detail, err
	}
	var kc *kubestore.KeyfsCluster
	if err := waitFor(ctx, 30*time.Second, "KeyfsCluster default", func() (bool, error) {
		kc, _, err = c.Cluster()
		return err == nil, nil
	}); err != nil {
		return detail, err
	}
	b, err := os.ReadFile(filepath.Join(h.stateDir(), "master.pub"))
	if err != nil {
		return detail, err
	}
	pub, err := keystore.ParsePublicKey(b)
	if err != nil {
		return detail, err
	}
	if kc.Spec.KID != pub.KID || kc.Spec.BootstrapNode != nodeName {
		return detail, fmt.Errorf("KeyfsCluster names kid %s bootstrapped by %q; the node's master is %s on %s", kc.Spec.KID, kc.Spec.BootstrapNode, pub.KID, nodeName)
	}
	return detail + fmt.Sprintf("\nKeyfsCluster default: kid %s, bootstrapped by node %s (the DaemonSet pod's own token, through the API)", kc.Spec.KID, nodeName), nil
}

func (h *harness) clusterPut(ctx context.Context) (string, error) {
	v := randomValue("cluster-put")
	if _, err := h.keyfsCluster(v, "put", "acme/openai"); err != nil {
		return "", err
	}
	h.clusterValues = append(h.clusterValues, v)
	p, err := h.createPod(ctx, readerPod("acme", "cluster-reader", "acme", "openai", nil, keyFile))
	if err != nil {
		return "", err
	}
	l, err := h.waitLine(ctx, p, 120*time.Second, "pod acme/cluster-reader reads "+keyFile, func(l watchLine) bool { return l.State == "ok" })
	if err != nil {
		return "", fmt.Errorf("%w\n%s", err, h.describePod(ctx, p))
	}
	if l.SHA256 != sum(v) {
		return "", fmt.Errorf("the pod read sha256 %s, stored %s", l.SHA256, sum(v))
	}
	h.s.reader = p
	v2 := randomValue("cluster-put-2")
	d, err := h.change(ctx, "the pod reads the new value", func() error { _, err := h.keyfsCluster(v2, "put", "acme/openai"); return err },
		func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(v2) })
	if err != nil {
		return "", err
	}
	h.clusterValues = append(h.clusterValues, v2)
	h.s.clusterValue = v2
	detail := fmt.Sprintf("a new pod read the SealedKey's value; a second put reached it %s after keyfs put returned", d.Round(10*time.Millisecond))
	if d > 2*time.Second {
		return detail, errors.New("slower than 2 s")
	}
	return detail, nil
}

func (h *harness) clusterApply(ctx context.Context) (string, error) {
	v := randomValue("cluster-git")
	o, err := h.sealedKey(v, "--cluster", "--tenant", "acme", "--name", "openai")
	if err != nil {
		return "", err
	}
	d, err := h.change(ctx, "the pod reads the applied value", func() error { return h.applySealedKey(ctx, o) },
		func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(v) })
	if err != nil {
		return "", err
	}
	h.clusterValues = append(h.clusterValues, v)
	h.s.clusterValue = v
	detail := fmt.Sprintf("SealedKey %s applied (server side, as kubectl apply --server-side); the pod read it %s later", o.GetName(), d.Round(10*time.Millisecond))
	if d > 2*time.Second {
		return detail, errors.New("slower than 2 s")
	}
	return detail, nil
}

// sealedKey is the SealedKey manifest keyfs seal -o yaml prints for value
// (as the admin, from stdin), checked not to hold it.
func (h *harness) sealedKey(value string, args ...string) (*unstructured.Unstructured, error) {
	y, err := h.keyfsCluster(value, append(append([]string{"seal"}, args...), "-o", "yaml")...)
	if err != nil {
		return nil, err
	}
	if strings.Contains(y, value) {
		return nil, errors.New("the manifest holds the value")
	}
	var o unstructured.Unstructured
	if err := yaml.Unmarshal([]byte(y), &o.Object); err != nil {
		return nil, err
	}
	return &o, nil
}

// applySealedKey applies o as kubectl apply --server-side does.
func (h *harness) applySealedKey(ctx context.Context, o *unstructured.Unstructured) error {
	dyn, err := dynamic.NewForConfig(h.rest)
	if err != nil {
		return err
	}
	_, err = dyn.Resource(sealedKeys).Namespace(keyfsNamespace).Apply(ctx, o.GetName(), o, metav1.ApplyOptions{FieldManager: "kubectl", Force: true})
	return err
}

// podToken is the service account token kubelet projected into the
// keyfs DaemonSet pod on node: bound to the pod, carrying the node's name.
// node-b's is read through its mount namespace.
func (h *harness) podToken(ctx context.Context, node string) (string, error) {
	p, err := h.dsPodOn(ctx, node)
	if err != nil {
		return "", err
	}
	root := ""
	if node == nodeBName {
		if root, err = h.nodeBRoot(); err != nil {
			return "", err
		}
	}
	files, _ := filepath.Glob(filepath.Join(root+h.kubeletDir(), "pods", string(p.UID), "volumes", "kubernetes.io~projected", "*", "token"))
	if len(files) != 1 {
		return "", fmt.Errorf("want one projected token in pod %s, found %v", p.Name, files)
	}
	b, err := os.ReadFile(files[0])
	return strings.TrimSpace(string(b)), err
}

func (h *harness) clusterToken(ctx context.Context) (string, error) {
	admin, err := dynamic.NewForConfig(h.rest)
	if err != nil {
		return "", err
	}
	node := func(name string) *unstructured.Unstructured {
		spec := map[string]any{"ekPublic": "AAAA", "ekHash": strings.Repeat("e", 64)}
		return &unstructured.Unstructured{Object: map[string]any{"apiVersion": "keyfs.dev/v1alpha1", "kind": "KeyfsNode", "metadata": map[string]any{"name": name}, "spec": spec}}
	}
	nodes := admin.Resource(keyfsNodes)
	if _, err := nodes.Create(ctx, node("node-other"), metav1.CreateOptions{}); err != nil {
		return "", err
	}
	defer nodes.Delete(context.Background(), "node-other", metav1.DeleteOptions{})
	return h.tokenForbidden(ctx, nodeName, kubestore.StateEnrolled, "node-other")
}

// tokenForbidden checks what the token kubelet projected into node's
// keyfs pod may do: read SealedKeys, but not update KeyfsNode other, not
// approve its own node (whose KeyfsNode is in state), not list Secrets or
// Pods.
func (h *harness) tokenForbidden(ctx context.Context, node, state, otherNode string) (string, error) {
	tok, err := h.podToken(ctx, node)
	if err != nil {
		return "", err
	}
	cfg := rest.AnonymousClientConfig(h.rest)
	cfg.BearerToken = tok
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return "", err
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return "", err
	}
	admin, err := dynamic.NewForConfig(h.rest)
	if err != nil {
		return "", err
	}
	var out []string
	forbidden := func(what string, err error) error {
		if !apierrors.IsForbidden(err) {
			return fmt.Errorf("%s: %v, want Forbidden", what, err)
		}
		msg := err.Error()
		if len(msg) > 160 {
			msg = msg[:160] + "…"
		}
		out = append(out, what+": Forbidden ("+msg+")")
		return nil
	}
	// Its own reads work: the token is the daemon's.
	if _, err := dyn.Resource(sealedKeys).Namespace(keyfsNamespace).List(ctx, metav1.ListOptions{}); err != nil {
		return "", fmt.Errorf("the pod's token cannot list SealedKeys: %w", err)
	}
	other, err := admin.Resource(keyfsNodes).Get(ctx, otherNode, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	other.Object["spec"].(map[string]any)["ekHash"] = strings.Repeat("f", 64)
	_, err = dyn.Resource(keyfsNodes).Update(ctx, other, metav1.UpdateOptions{})
	if err := forbidden("update KeyfsNode "+otherNode, err); err != nil {
		return "", err
	}
	// The daemon registered its own node's KeyfsNode itself.
	own, err := dyn.Resource(keyfsNodes).Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("the daemon did not register KeyfsNode %s: %w", node, err)
	}
	got, _, _ := unstructured.NestedString(own.Object, "status", "state")
	hash, _, _ := unstructured.NestedString(own.Object, "spec", "ekHash")
	if got != state || len(hash) != 64 {
		return "", fmt.Errorf("KeyfsNode %s: state %q, EK hash %q; want %s and the swtpm's EK", node, got, hash, state)
	}
	out = append(out, fmt.Sprintf("KeyfsNode %s registered by the daemon: %s, EK %s…", node, state, hash[:16]))
	own.Object["spec"].(map[string]any)["approvedEKHash"] = hash
	_, err = dyn.Resource(keyfsNodes).Update(ctx, own, metav1.UpdateOptions{})
	if err := forbidden("approve its own node", err); err != nil {
		return "", err
	}
	_, err = kube.CoreV1().Secrets(keyfsNamespace).List(ctx, metav1.ListOptions{})
	if err := forbidden("list Secrets in keyfs-system", err); err != nil {
		return "", err
	}
	_, err = kube.CoreV1().Pods("acme").List(ctx, metav1.ListOptions{})
	if err := forbidden("list Pods", err); err != nil {
		return "", err
	}
	return "with the token kubelet projected into the keyfs pod (bound to it, naming node " + node + "):\n" + strings.Join(out, "\n"), nil
}

func (h *harness) clusterNoPlaintext(ctx context.Context) (string, error) {
	if len(h.clusterValues) == 0 {
		return "", errors.New("no value was stored in cluster mode")
	}
	count := map[string]int{}
	dirs := []string{h.path("etcd"), h.stateDir()}
	if slices.Contains(h.nodes, nodeBName) {
		dirs = append(dirs, h.nodeBPath("keyfs-state"))
	}
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return err
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			count[dir]++
			for _, v := range h.clusterValues {
				if strings.Contains(string(b), v) {
					return fmt.Errorf("%s holds a stored value", p)
				}
			}
			return nil
		})
		if err != nil {
			return "", err
		}
	}
	n := count[h.path("etcd")]
	dyn, err := dynamic.NewForConfig(h.rest)
	if err != nil {
		return "", err
	}
	l, err := dyn.Resource(sealedKeys).Namespace(keyfsNamespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return "", err
	}
	all, _ := yaml.Marshal(l.Object)
	for _, it := range l.Items {
		b, _ := yaml.Marshal(it.Object)
		all = append(all, b...)
	}
	for _, v := range h.clusterValues {
		if strings.Contains(string(all), v) {
			return "", errors.New("a SealedKey read back holds a stored value")
		}
	}
	return fmt.Sprintf("%d values stored in cluster mode; none in the %d files of etcd's data directory, none in the %d files of the nodes' keyfs state (%d nodes), none in the %d SealedKeys read back",
		len(h.clusterValues), n, count[h.stateDir()]+count[h.nodeBPath("keyfs-state")], len(dirs)-1, len(l.Items)), nil
}
