package manifests_test

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/resource"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/keyfs/keyfs/internal/kubetest"
)

func TestMain(m *testing.M) { kubetest.Main(m) }

func render(t *testing.T, dir string) []*resource.Resource {
	t.Helper()
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatal(err)
	}
	return rm.Resources()
}

// apiPath is where objects of r's kind are created.
func apiPath(r *resource.Resource) string {
	ns := r.GetNamespace()
	switch r.GetKind() {
	case "Namespace":
		return "/api/v1/namespaces"
	case "ServiceAccount", "ConfigMap":
		return "/api/v1/namespaces/" + ns + "/" + strings.ToLower(r.GetKind()) + "s"
	case "DaemonSet":
		return "/apis/apps/v1/namespaces/" + ns + "/daemonsets"
	case "CSIDriver":
		return "/apis/storage.k8s.io/v1/csidrivers"
	case "Role", "RoleBinding":
		return "/apis/rbac.authorization.k8s.io/v1/namespaces/" + ns + "/" + strings.ToLower(r.GetKind()) + "s"
	case "ClusterRole", "ClusterRoleBinding":
		return "/apis/rbac.authorization.k8s.io/v1/" + strings.ToLower(r.GetKind()) + "s"
	case "CustomResourceDefinition":
		return "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
	}
	return ""
}

// TestClusterApplies: manifests/cluster creates cleanly on a real API
// server, and the node daemon's own service account token may read
// SealedKeys in keyfs-system and the KeyfsCluster, and nothing else.
func TestClusterApplies(t *testing.T) {
	k := kubetest.Start(t)
	admin := k.Token("admin")
	var kinds []string
	for _, r := range render(t, "cluster") {
		j, err := r.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		p := apiPath(r)
		if p == "" {
			t.Fatalf("no API path for %s %s", r.GetKind(), r.GetName())
		}
		code, body, err := k.Request(admin, http.MethodPost, p, j)
		if err != nil {
			t.Fatal(err)
		}
		// kubetest installed the CRDs already: the same objects.
		if code != http.StatusCreated && !(code == http.StatusConflict && r.GetKind() == "CustomResourceDefinition") {
			t.Fatalf("create %s %s: %d %s", r.GetKind(), r.GetName(), code, body)
		}
		kinds = append(kinds, r.GetKind())
		if r.GetKind() == "DaemonSet" {
			if s := string(j); !strings.Contains(s, `"--store=kubernetes"`) || !strings.Contains(s, `"automountServiceAccountToken":true`) {
				t.Errorf("the cluster DaemonSet does not serve from the API with its token: %s", s)
			}
		}
	}
	slices.Sort(kinds)
	kinds = slices.Compact(kinds)
	for _, want := range []string{"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "DaemonSet", "Role", "RoleBinding", "ServiceAccount"} {
		if !slices.Contains(kinds, want) {
			t.Errorf("manifests/cluster renders no %s", want)
		}
	}

	// The daemon's token, as kubelet would project it (TokenRequest).
	code, body, err := k.Request(admin, http.MethodPost, "/api/v1/namespaces/keyfs-system/serviceaccounts/keyfs-node/token",
		[]byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"audiences":["https://kubernetes.default.svc"]}}`))
	if err != nil || code != http.StatusCreated {
		t.Fatalf("token request: %d %s %v", code, body, err)
	}
	var tr struct{ Status struct{ Token string } }
	if err := json.Unmarshal(body, &tr); err != nil || tr.Status.Token == "" {
		t.Fatalf("token request answer: %v %s", err, body)
	}
	node := tr.Status.Token
	for _, c := range []struct {
		method, path, body string
		allowed            bool
	}{
		{"GET", "/apis/keyfs.dev/v1alpha1/namespaces/keyfs-system/sealedkeys", "", true},
		{"GET", "/apis/keyfs.dev/v1alpha1/namespaces/keyfs-system/sealedkeys?watch=true&timeoutSeconds=1", "", true},
		{"GET", "/apis/keyfs.dev/v1alpha1/keyfsclusters", "", true},
		{"POST", "/apis/keyfs.dev/v1alpha1/namespaces/keyfs-system/sealedkeys", `{"apiVersion":"keyfs.dev/v1alpha1","kind":"SealedKey","metadata":{"name":"acme.x"},"spec":{"tenant":"acme","name":"x","record":"keyfs-record v1\n"}}`, false},
		{"DELETE", "/apis/keyfs.dev/v1alpha1/namespaces/keyfs-system/sealedkeys/acme.x", "", false},
		{"GET", "/apis/keyfs.dev/v1alpha1/namespaces/default/sealedkeys", "", false},
		{"GET", "/api/v1/namespaces/keyfs-system/secrets", "", false},
		{"GET", "/api/v1/secrets", "", false},
		{"GET", "/api/v1/pods", "", false},
		{"DELETE", "/apis/keyfs.dev/v1alpha1/keyfsclusters/default", "", false},
	} {
		var b []byte
		if c.body != "" {
			b = []byte(c.body)
		}
		code, body, err := k.Request(node, c.method, c.path, b)
		if err != nil {
			t.Fatal(err)
		}
		if got := code != http.StatusForbidden && code != http.StatusUnauthorized; got != c.allowed {
			t.Errorf("keyfs-node %s %s: %d (allowed %v, want %v): %s", c.method, c.path, code, got, c.allowed, trim(body))
		}
	}
}

func trim(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	return string(b)
}
