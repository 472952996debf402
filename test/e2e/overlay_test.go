package main

import (
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"
)

// TestOverlayRenders renders the e2e overlay over manifests/ as the
// harness does, without a cluster: a base change the overlay does not
// expect fails here, in the unit tests, rather than minutes into an e2e run.
func TestOverlayRenders(t *testing.T) {
	vars := map[string]string{
		"IMAGE_NAME": "ghcr.io/keyfs/keyfs", "IMAGE_TAG": "e2e",
		"KUBELET_DIR": "/tmp/keyfs-e2e-x/kubelet", "STATE_DIR": "/tmp/keyfs-e2e-x/keyfs-state", "HOLDER_DIR": "/tmp/keyfs-e2e-x/keyfs-holder",
		"SWTPM_PORT": "40001", "METRICS_PORT": "40003", "APISERVER_PORT": "40005",
	}
	for _, overlay := range []string{"overlay", "overlay-cluster"} {
		t.Run(overlay, func(t *testing.T) { checkOverlay(t, overlay, vars) })
	}
	delete(vars, "SWTPM_PORT")
	if _, err := renderOverlay("../..", "overlay", vars); err == nil || !strings.Contains(err.Error(), "SWTPM_PORT") {
		t.Errorf("a missing variable: %v", err)
	}
}

func checkOverlay(t *testing.T, overlay string, vars map[string]string) {
	objs, err := renderOverlay("../..", overlay, vars)
	if err != nil {
		t.Fatal(err)
	}
	var ds *appsv1.DaemonSet
	var all []string
	for _, o := range objs {
		b, err := yaml.Marshal(o.Object)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, string(b))
		if o.GetKind() == "DaemonSet" && o.GetName() == "keyfs-node" {
			ds = &appsv1.DaemonSet{}
			if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, ds, true); err != nil {
				t.Fatal(err)
			}
		}
	}
	if ds == nil {
		t.Fatal("no DaemonSet rendered")
	}
	rendered := strings.Join(all, "---\n")
	for _, gone := range []string{"/dev/tpmrm0", "/var/lib/kubelet", ":9810", "/run/keyfs-holder"} {
		if strings.Contains(rendered, gone) {
			t.Errorf("rendered manifests still hold %q", gone)
		}
	}
	s := ds.Spec.Template.Spec
	if !s.HostNetwork {
		t.Error("not hostNetwork")
	}
	for _, c := range append(s.InitContainers, s.Containers...) {
		if c.Image != "ghcr.io/keyfs/keyfs:e2e" || c.ImagePullPolicy != corev1.PullNever {
			t.Errorf("%s: image %s, pull %s", c.Name, c.Image, c.ImagePullPolicy)
		}
		if !strings.Contains(strings.Join(c.Args, " "), "--tpm=swtpm:127.0.0.1:40001") {
			t.Errorf("%s: args %v", c.Name, c.Args)
		}
	}
	c := s.Containers[0]
	args := strings.Join(c.Args, " ")
	for _, want := range []string{
		"--kubelet-dir=/tmp/keyfs-e2e-x/kubelet",
		"--csi-endpoint=unix:///tmp/keyfs-e2e-x/kubelet/plugins/keyfs.csi.dev/csi.sock",
		"--kubelet-registration-dir=/tmp/keyfs-e2e-x/kubelet/plugins_registry",
		"--metrics-addr=127.0.0.1:40003",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("serve args lack %s: %s", want, args)
		}
	}
	if c.LivenessProbe.HTTPGet.Host != "127.0.0.1" || c.Ports[0].ContainerPort != 40003 {
		t.Errorf("probe %+v, ports %+v", c.LivenessProbe.HTTPGet, c.Ports)
	}
	var bidi bool
	for _, m := range c.VolumeMounts {
		if m.Name == "kubelet-dir" {
			bidi = m.MountPath == "/tmp/keyfs-e2e-x/kubelet" && m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional
		}
	}
	if !bidi {
		t.Errorf("kubelet-dir mount: %+v", c.VolumeMounts)
	}
	paths := map[string]string{}
	for _, v := range s.Volumes {
		if v.HostPath != nil {
			paths[v.Name] = v.HostPath.Path
		}
	}
	if paths["kubelet-dir"] != "/tmp/keyfs-e2e-x/kubelet" || paths["state"] != "/tmp/keyfs-e2e-x/keyfs-state" || paths["tpm"] != "" {
		t.Errorf("hostPaths: %v", paths)
	}
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	if env["KUBERNETES_SERVICE_HOST"] != "127.0.0.1" || env["KUBERNETES_SERVICE_PORT"] != "40005" {
		t.Errorf("the API server's address: %v", env)
	}
	cluster := overlay == "overlay-cluster"
	if strings.Contains(args, "--store=kubernetes") != cluster || (s.AutomountServiceAccountToken != nil && *s.AutomountServiceAccountToken) != cluster {
		t.Errorf("%s: --store=kubernetes and a token in: %v, want %v: %s", overlay, !cluster, cluster, args)
	}
}
