// Package manifests_test renders the kustomize base as users apply it and
// decodes every object strictly as the Kubernetes type it claims to be.
package manifests_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

func decoder(t *testing.T) runtime.Decoder {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, storagev1.AddToScheme} {
		if err := add(s); err != nil {
			t.Fatal(err)
		}
	}
	return serializer.NewCodecFactory(s, serializer.EnableStrict).UniversalDeserializer()
}

func TestBaseRenders(t *testing.T) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), ".")
	if err != nil {
		t.Fatal(err)
	}
	dec := decoder(t)
	var kinds []string
	var ds, holder *appsv1.DaemonSet
	var driver *storagev1.CSIDriver
	for _, r := range rm.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		obj, gvk, err := dec.Decode(y, nil, nil)
		if err != nil {
			t.Fatalf("%s %s does not decode strictly: %v", r.GetKind(), r.GetName(), err)
		}
		kinds = append(kinds, gvk.Kind)
		switch o := obj.(type) {
		case *appsv1.DaemonSet:
			if o.Name == "keyfs-node" {
				ds = o
			} else {
				holder = o
			}
		case *storagev1.CSIDriver:
			driver = o
		case *corev1.ServiceAccount:
			if o.AutomountServiceAccountToken == nil || *o.AutomountServiceAccountToken {
				t.Error("the driver's service account mounts an API token it does not need")
			}
		}
		if r.GetKind() != "Namespace" && r.GetKind() != "CSIDriver" && r.GetNamespace() != "keyfs-system" {
			t.Errorf("%s %s is in namespace %q, want keyfs-system", r.GetKind(), r.GetName(), r.GetNamespace())
		}
	}
	slices.Sort(kinds)
	if want := []string{"CSIDriver", "ConfigMap", "DaemonSet", "DaemonSet", "Namespace", "ServiceAccount"}; !slices.Equal(kinds, want) {
		t.Fatalf("rendered kinds %v, want %v", kinds, want)
	}
	if driver.Name != "keyfs.csi.dev" || *driver.Spec.AttachRequired || !*driver.Spec.PodInfoOnMount ||
		!slices.Equal(driver.Spec.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecycleEphemeral}) ||
		*driver.Spec.FSGroupPolicy != storagev1.NoneFSGroupPolicy {
		t.Errorf("CSIDriver spec: %+v", driver.Spec)
	}
	c := ds.Spec.Template.Spec.Containers
	if len(c) != 1 || !*c[0].SecurityContext.Privileged || c[0].LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Fatalf("DaemonSet wants one privileged container with a /healthz liveness probe: %+v", c)
	}
	var bidi bool
	for _, m := range c[0].VolumeMounts {
		if m.MountPath == "/var/lib/kubelet" && m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional {
			bidi = true
		}
	}
	if !bidi {
		t.Error("kubelet directory is not mounted with Bidirectional propagation: pods would see empty volumes")
	}
	args := strings.Join(c[0].Args, " ")
	for _, want := range []string{"serve", "--csi-endpoint=unix:///var/lib/kubelet/plugins/keyfs.csi.dev/csi.sock", "--policy=/etc/keyfs/policy.yaml",
		"--holder-socket=/run/keyfs-holder/holder.sock"} {
		if !strings.Contains(args, want) {
			t.Errorf("serve args lack %q: %s", want, args)
		}
	}
	// The fd holder: never rolled with keyfs-node, no token, no privilege,
	// and the same socket.
	hs := holder.Spec.Template.Spec
	hc := hs.Containers[0]
	if holder.Name != "keyfs-holder" || holder.Spec.UpdateStrategy.Type != appsv1.OnDeleteDaemonSetStrategyType ||
		hs.AutomountServiceAccountToken == nil || *hs.AutomountServiceAccountToken || hs.HostNetwork || hs.HostPID ||
		hc.SecurityContext.Privileged != nil && *hc.SecurityContext.Privileged || !slices.Equal(hc.SecurityContext.Capabilities.Drop, []corev1.Capability{"ALL"}) ||
		strings.Join(hc.Args, " ") != "hold --socket=/run/keyfs-holder/holder.sock" {
		t.Errorf("keyfs-holder DaemonSet: %+v", holder.Spec)
	}
}

func TestExamplesDecode(t *testing.T) {
	files, _ := filepath.Glob("examples/*.yaml")
	if len(files) == 0 {
		t.Fatal("no examples")
	}
	dec := decoder(t)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		obj, _, err := dec.Decode(b, nil, nil)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		pod, ok := obj.(*corev1.Pod)
		if !ok || pod.Spec.Volumes[0].CSI == nil || pod.Spec.Volumes[0].CSI.Driver != "keyfs.csi.dev" {
			t.Fatalf("%s: not a pod with a keyfs.csi.dev volume", f)
		}
	}
	// The policy in the ConfigMap parses as YAML with a tenants map.
	b, _ := os.ReadFile("base/policy.yaml")
	var cm corev1.ConfigMap
	if err := yaml.UnmarshalStrict(b, &cm); err != nil {
		t.Fatal(err)
	}
	var p struct {
		Tenants map[string]any `json:"tenants"`
	}
	if err := yaml.UnmarshalStrict([]byte(cm.Data["policy.yaml"]), &p); err != nil || p.Tenants == nil {
		t.Fatalf("policy.yaml in the ConfigMap: %v", err)
	}
}
