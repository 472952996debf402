package main

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

const (
	keyfsNamespace       = "keyfs-system"
	keyfsDaemonSet       = "keyfs-node"
	keyfsHolderDaemonSet = "keyfs-holder"
	driverName           = "keyfs.csi.dev"
)

// renderOverlay runs kustomize (krusty, as `kubectl apply -k` does) on
// test/e2e/OVERLAY (overlay: manifests/; overlay-cluster:
// manifests/cluster), after filling in the e2e node's placeholders from
// vars. The manifests are used as they are.
func renderOverlay(repo, overlay string, vars map[string]string) ([]*unstructured.Unstructured, error) {
	mem := filesys.MakeFsInMemory()
	copyTree := func(dir string, fill bool) error {
		return filepath.WalkDir(filepath.Join(repo, dir), func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			rel, err := filepath.Rel(repo, p)
			if err != nil {
				return err
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if fill {
				s, err := expand(string(b), vars)
				if err != nil {
					return fmt.Errorf("%s: %w", rel, err)
				}
				b = []byte(s)
			}
			return mem.WriteFile("/"+rel, b)
		})
	}
	if err := copyTree("manifests", false); err != nil {
		return nil, err
	}
	for _, d := range []string{"test/e2e/node", "test/e2e/" + overlay} {
		if err := copyTree(d, true); err != nil {
			return nil, err
		}
	}
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(mem, "/test/e2e/"+overlay)
	if err != nil {
		return nil, fmt.Errorf("kustomize test/e2e/%s: %w", overlay, err)
	}
	var objs []*unstructured.Unstructured
	for _, r := range rm.Resources() {
		m, err := r.Map()
		if err != nil {
			return nil, err
		}
		objs = append(objs, &unstructured.Unstructured{Object: m})
	}
	return objs, nil
}

func (h *harness) overlayVars() map[string]string {
	v := h.vars()
	i := strings.LastIndex(h.keyfsRef, ":")
	v["IMAGE_NAME"], v["IMAGE_TAG"] = h.keyfsRef[:i], h.keyfsRef[i+1:]
	return v
}

// deploy applies the rendered overlay (server-side apply, every kind the
// base has) and waits for the DaemonSet pod to be ready and the driver
// registered with kubelet.
func (h *harness) deploy(ctx context.Context) (string, error) { return h.deployOverlay(ctx, "overlay") }

func (h *harness) deployOverlay(ctx context.Context, overlay string) (string, error) {
	objs, err := renderOverlay(h.repo, overlay, h.overlayVars())
	if err != nil {
		return "", err
	}
	var all []byte
	for _, o := range objs {
		b, _ := yaml.Marshal(o.Object)
		all = append(append(all, "---\n"...), b...)
	}
	os.WriteFile(h.path("keyfs-rendered-"+overlay+".yaml"), all, 0o600)

	dyn, err := dynamic.NewForConfig(h.rest)
	if err != nil {
		return "", err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(h.kube.Discovery()))
	var kinds []string
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return "", fmt.Errorf("%s: %w", gvk, err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if o.GetNamespace() != "" {
			ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		}
		if _, err := ri.Apply(ctx, o.GetName(), o, metav1.ApplyOptions{FieldManager: "keyfs-e2e", Force: true}); err != nil {
			return "", fmt.Errorf("apply %s %s: %w", gvk.Kind, o.GetName(), err)
		}
		kinds = append(kinds, gvk.Kind+"/"+o.GetName())
	}
	t := time.Now()
	var ds *appsv1.DaemonSet
	if err := waitFor(ctx, 120*time.Second, "DaemonSet keyfs-node ready", func() (bool, error) {
		ds, err = h.kube.AppsV1().DaemonSets(keyfsNamespace).Get(ctx, keyfsDaemonSet, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		return ds.Status.DesiredNumberScheduled == 1 && ds.Status.UpdatedNumberScheduled == 1 && ds.Status.NumberReady == 1 && ds.Status.ObservedGeneration == ds.Generation, nil
	}); err != nil {
		return "", fmt.Errorf("%w%s", err, h.dsPodStatus(ctx))
	}
	ready := time.Since(t)
	if err := h.waitRegistered(ctx, 60*time.Second); err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(h.stateDir(), "master.pub")); err != nil {
		return "", fmt.Errorf("the init container made no master key: %w", err)
	}
	return fmt.Sprintf("applied %s; DaemonSet pod ready %s after apply, driver registered with kubelet after %s; master key sealed to the swtpm",
		strings.Join(kinds, ", "), ready.Round(100*time.Millisecond), since(t)), nil
}

// waitRegistered waits for kubelet to list keyfs.csi.dev on its CSINode:
// the driver registered itself through kubelet's plugin registration API.
func (h *harness) waitRegistered(ctx context.Context, timeout time.Duration) error {
	return waitFor(ctx, timeout, "keyfs.csi.dev registered on CSINode "+nodeName, func() (bool, error) {
		n, err := h.kube.StorageV1().CSINodes().Get(ctx, nodeName, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		for _, d := range n.Spec.Drivers {
			if d.Name == driverName {
				return true, nil
			}
		}
		return false, nil
	})
}

// dsPod is the DaemonSet's current pod on the first node.
func (h *harness) dsPod(ctx context.Context) (*corev1.Pod, error) { return h.dsPodOn(ctx, nodeName) }

// dsPodOn is the DaemonSet's current pod on node.
func (h *harness) dsPodOn(ctx context.Context, node string) (*corev1.Pod, error) {
	l, err := h.kube.CoreV1().Pods(keyfsNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=keyfs-node"})
	if err != nil {
		return nil, err
	}
	for i := range l.Items {
		if l.Items[i].DeletionTimestamp == nil && l.Items[i].Spec.NodeName == node {
			return &l.Items[i], nil
		}
	}
	return nil, fmt.Errorf("no keyfs-node pod on node %s", node)
}

func (h *harness) dsPodStatus(ctx context.Context) string {
	p, err := h.dsPod(ctx)
	if err != nil {
		return ": " + err.Error()
	}
	return "\n" + h.describePod(ctx, p)
}
