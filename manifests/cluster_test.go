package manifests_test

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

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
	case "ValidatingAdmissionPolicy":
		return "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies"
	case "ValidatingAdmissionPolicyBinding":
		return "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings"
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
		if r.GetKind() == "DaemonSet" && r.GetName() == "keyfs-node" {
			if s := string(j); !strings.Contains(s, `"--store=kubernetes"`) || !strings.Contains(s, `"automountServiceAccountToken":true`) {
				t.Errorf("the cluster DaemonSet does not serve from the API with its token: %s", s)
			}
		}
	}
	slices.Sort(kinds)
	kinds = slices.Compact(kinds)
	for _, want := range []string{"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "DaemonSet", "Role", "RoleBinding", "ServiceAccount", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} {
		if !slices.Contains(kinds, want) {
			t.Errorf("manifests/cluster renders no %s", want)
		}
	}

	// A token of the daemon's service account not bound to a pod.
	node := token(t, k, `{}`)
	for _, c := range []struct {
		method, path, body string
		allowed            bool
	}{
		{"GET", "/apis/keyfs.dev/v1alpha1/namespaces/keyfs-system/sealedkeys", "", true},
		{"GET", "/apis/keyfs.dev/v1alpha1/namespaces/keyfs-system/sealedkeys?watch=true&timeoutSeconds=1", "", true},
		{"GET", "/apis/keyfs.dev/v1alpha1/keyfsclusters", "", true},
		{"GET", "/apis/keyfs.dev/v1alpha1/keyfsnodes", "", true},
		{"POST", "/api/v1/namespaces/keyfs-system/events", `{"apiVersion":"v1","kind":"Event","metadata":{"generateName":"x."},"involvedObject":{"kind":"SealedKey","name":"acme.x","namespace":"keyfs-system"},"reason":"RecordRefused","message":"m","type":"Warning"}`, true},
		{"GET", "/api/v1/namespaces/keyfs-system/events", "", false},
		{"POST", "/apis/keyfs.dev/v1alpha1/namespaces/keyfs-system/sealedkeys", `{"apiVersion":"keyfs.dev/v1alpha1","kind":"SealedKey","metadata":{"name":"acme.x"},"spec":{"tenant":"acme","name":"x","record":"keyfs-record v1\n"}}`, false},
		{"DELETE", "/apis/keyfs.dev/v1alpha1/namespaces/keyfs-system/sealedkeys/acme.x", "", false},
		{"GET", "/apis/keyfs.dev/v1alpha1/namespaces/default/sealedkeys", "", false},
		{"GET", "/api/v1/namespaces/keyfs-system/secrets", "", false},
		{"GET", "/api/v1/secrets", "", false},
		{"GET", "/api/v1/pods", "", false},
		{"DELETE", "/apis/keyfs.dev/v1alpha1/keyfsclusters/default", "", false},
		{"DELETE", "/apis/keyfs.dev/v1alpha1/keyfsnodes/node-a", "", false},
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

	// Tokens bound to a pod on node-b, as kubelet projects them: they
	// carry the node's name, and the admission policy holds the daemon
	// to its own KeyfsNode.
	for _, n := range []string{"node-a", "node-b"} {
		mustCreate(t, k, "/api/v1/nodes", `{"apiVersion":"v1","kind":"Node","metadata":{"name":"`+n+`"}}`)
	}
	pod := mustCreate(t, k, "/api/v1/namespaces/keyfs-system/pods", `{"apiVersion":"v1","kind":"Pod","metadata":{"name":"keyfs-node-b"},
		"spec":{"nodeName":"node-b","serviceAccountName":"keyfs-node","automountServiceAccountToken":false,"containers":[{"name":"keyfs","image":"keyfs"}]}}`)
	var p struct{ Metadata struct{ UID string } }
	json.Unmarshal(pod, &p)
	nodeB := token(t, k, `{"boundObjectRef":{"kind":"Pod","apiVersion":"v1","name":"keyfs-node-b","uid":"`+p.Metadata.UID+`"}}`)
	kn := func(name, approved string) []byte {
		a := ""
		if approved != "" {
			a = `,"approvedEKHash":"` + approved + `"`
		}
		return []byte(`{"apiVersion":"keyfs.dev/v1alpha1","kind":"KeyfsNode","metadata":{"name":"` + name + `"},"spec":{"ekPublic":"AAAA","ekHash":"` + strings.Repeat("b", 64) + `"` + a + `}}`)
	}
	mustCreate(t, k, "/apis/keyfs.dev/v1alpha1/keyfsnodes", string(kn("node-a", "")))
	// The policy takes effect once the API server has loaded it.
	denied := func(tok, method, path string, body []byte, want string) bool {
		code, b, err := k.Request(tok, method, path, body)
		return err == nil && code == http.StatusForbidden && strings.Contains(string(b), want)
	}
	if !poll(10*time.Second, func() bool {
		return denied(nodeB, "POST", "/apis/keyfs.dev/v1alpha1/keyfsnodes", kn("node-c", ""), "this token is for node node-b, the object is node-c")
	}) {
		t.Fatal("node-b's token created another node's KeyfsNode")
	}
	if code, b, _ := k.Request(node, "POST", "/apis/keyfs.dev/v1alpha1/keyfsnodes", kn("node-b", "")); code != http.StatusForbidden || !strings.Contains(string(b), "not bound to a pod on a node") {
		t.Errorf("a token bound to no pod wrote a KeyfsNode: %d %s", code, trim(b))
	}
	if code, b, _ := k.Request(nodeB, "POST", "/apis/keyfs.dev/v1alpha1/keyfsnodes", kn("node-b", strings.Repeat("b", 64))); code != http.StatusForbidden || !strings.Contains(string(b), "cannot approve") {
		t.Errorf("node-b created its KeyfsNode approved: %d %s", code, trim(b))
	}
	if code, b, _ := k.Request(nodeB, "POST", "/apis/keyfs.dev/v1alpha1/keyfsnodes", kn("node-b", "")); code != http.StatusCreated {
		t.Fatalf("node-b cannot create its own KeyfsNode: %d %s", code, trim(b))
	}
	own := get(t, k, "/apis/keyfs.dev/v1alpha1/keyfsnodes/node-b")
	own["spec"].(map[string]any)["approvedEKHash"] = strings.Repeat("b", 64)
	if !denied(nodeB, "PUT", "/apis/keyfs.dev/v1alpha1/keyfsnodes/node-b", marshal(own), "cannot approve") {
		t.Error("node-b approved itself")
	}
	other := get(t, k, "/apis/keyfs.dev/v1alpha1/keyfsnodes/node-a")
	other["spec"].(map[string]any)["ekHash"] = strings.Repeat("c", 64)
	if !denied(nodeB, "PUT", "/apis/keyfs.dev/v1alpha1/keyfsnodes/node-a", marshal(other), "this token is for node node-b, the object is node-a") {
		t.Error("node-b updated node-a's KeyfsNode")
	}
	// An enrolled node writes enrollments into others' status.
	other = get(t, k, "/apis/keyfs.dev/v1alpha1/keyfsnodes/node-a")
	other["status"] = map[string]any{"state": "Issued"}
	if code, b, _ := k.Request(nodeB, "PUT", "/apis/keyfs.dev/v1alpha1/keyfsnodes/node-a/status", marshal(other)); code != http.StatusOK {
		t.Errorf("node-b cannot write node-a's status: %d %s", code, trim(b))
	}
	if code, _, _ := k.Request(nodeB, "GET", "/api/v1/namespaces/keyfs-system/secrets", nil); code != http.StatusForbidden {
		t.Errorf("node-b's pod token reads Secrets: %d", code)
	}
}

func token(t *testing.T, k *kubetest.Cluster, spec string) string {
	t.Helper()
	body := mustCreate(t, k, "/api/v1/namespaces/keyfs-system/serviceaccounts/keyfs-node/token",
		`{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":`+strings.TrimSuffix(spec, "}")+
			func() string {
				if spec == "{}" {
					return `"audiences":["https://kubernetes.default.svc"]}}`
				}
				return `,"audiences":["https://kubernetes.default.svc"]}}`
			}())
	var tr struct{ Status struct{ Token string } }
	if err := json.Unmarshal(body, &tr); err != nil || tr.Status.Token == "" {
		t.Fatalf("token request answer: %v %s", err, body)
	}
	return tr.Status.Token
}

func mustCreate(t *testing.T, k *kubetest.Cluster, path, body string) []byte {
	t.Helper()
	code, b, err := k.Request(k.Token("admin"), http.MethodPost, path, []byte(body))
	if err != nil || code != http.StatusCreated {
		t.Fatalf("create %s: %d %s %v", path, code, trim(b), err)
	}
	return b
}

func get(t *testing.T, k *kubetest.Cluster, path string) map[string]any {
	t.Helper()
	code, b, err := k.Request(k.Token("admin"), http.MethodGet, path, nil)
	var m map[string]any
	if err != nil || code != http.StatusOK || json.Unmarshal(b, &m) != nil {
		t.Fatalf("get %s: %d %s %v", path, code, trim(b), err)
	}
	return m
}

func marshal(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

func poll(d time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(d); !cond(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

func trim(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	return string(b)
}
