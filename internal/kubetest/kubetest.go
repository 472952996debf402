// Package kubetest runs a real etcd and kube-apiserver for tests, on
// 127.0.0.1 on free ports, with keyfs's custom resources installed: one
// per test binary, started by the first test that asks and stopped by
// Main. etcd comes from Debian's etcd-server, kube-apiserver from the e2e
// harness's cached build (scripts/deps.sh test makes both).
package kubetest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/keyfs/keyfs/internal/k8sbin"
)

// Cluster is a running API server.
type Cluster struct {
	// Host is the API server's URL.
	Host string
	// Kubeconfig is a file naming the cluster and the admin user.
	Kubeconfig string

	dir    string
	tokens map[string]string // user -> bearer token
	procs  []*proc
}

type proc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when it exits
}

// Users the API server knows, by bearer token: admin is in
// system:masters; the others are in no group, so only what RBAC grants
// them.
var Users = []string{"admin", "platform", "node-a", "node-b", "nobody"}

var (
	once    sync.Once
	shared  *Cluster
	failure error
)

// Main runs the tests and stops the shared cluster: call it from TestMain.
func Main(m *testing.M) int {
	code := m.Run()
	if shared != nil {
		shared.Stop()
	}
	return code
}

// Run starts a cluster of its own, for a program rather than a test
// (benchmarks); Stop it.
func Run() (*Cluster, error) { return start() }

// Start returns the test binary's cluster, starting it on first use. When
// etcd or kube-apiserver is missing, the test fails under CI and is
// skipped elsewhere.
func Start(t testing.TB) *Cluster {
	t.Helper()
	once.Do(func() { shared, failure = start() })
	var missing *missingError
	switch {
	case errors.As(failure, &missing) && os.Getenv("CI") == "":
		t.Skip(failure)
	case failure != nil:
		t.Fatal(failure)
	}
	return shared
}

type missingError struct{ what string }

func (e *missingError) Error() string {
	return e.what + " is missing: run scripts/deps.sh test (installs etcd-server and builds kube-apiserver " + k8sbin.Version + " into " + k8sbin.DefaultCache() + ")"
}

// Config is a client configuration for user, one of Users.
func (c *Cluster) Config(user string) *rest.Config {
	tok, ok := c.tokens[user]
	if !ok {
		panic("kubetest: no user " + user)
	}
	return &rest.Config{Host: c.Host, BearerToken: tok, TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 200, Burst: 400}
}

// KubeconfigFor writes a kubeconfig for user and returns its path.
func (c *Cluster) KubeconfigFor(user string) string {
	p := filepath.Join(c.dir, user+".kubeconfig")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kubetest
  cluster: {server: %q, insecure-skip-tls-verify: true}
users:
- name: %s
  user: {token: %q}
contexts:
- name: kubetest
  context: {cluster: kubetest, user: %s}
current-context: kubetest
`, c.Host, user, c.tokens[user], user)
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		panic(err)
	}
	return p
}

// EtcdDir is etcd's data directory, where a test looks for plaintext.
func (c *Cluster) EtcdDir() string { return filepath.Join(c.dir, "etcd") }

var nsSeq atomic.Int64

// Namespace creates a new namespace for t and returns its name.
func (c *Cluster) Namespace(t testing.TB) string {
	t.Helper()
	name, err := c.NewNamespace()
	if err != nil {
		t.Fatal(err)
	}
	return name
}

// NewNamespace creates a new namespace and returns its name.
func (c *Cluster) NewNamespace() (string, error) {
	name := fmt.Sprintf("kubetest-%d", nsSeq.Add(1))
	return name, c.post("/api/v1/namespaces", []byte(`{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"`+name+`"}}`))
}

// post creates the object in JSON body at path, as admin.
func (c *Cluster) post(path string, body []byte) error {
	code, b, err := c.Request(c.tokens["admin"], http.MethodPost, path, body)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if code != http.StatusCreated {
		return fmt.Errorf("create %s: %d: %s", path, code, b)
	}
	return nil
}

// Token is user's bearer token.
func (c *Cluster) Token(user string) string { return c.tokens[user] }

// Request sends one API request with a bearer token and a JSON body (nil:
// none), returning the status code and the response body.
func (c *Cluster) Request(token, method, path string, body []byte) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, c.Host+path, rd)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	r, err := insecure.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer r.Body.Close()
	b, err := io.ReadAll(r.Body)
	return r.StatusCode, b, err
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && bytes.HasPrefix(b, []byte("module github.com/keyfs/keyfs\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("kubetest: not inside the keyfs repository")
		}
		dir = parent
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func start() (*Cluster, error) {
	repo, err := repoRoot()
	if err != nil {
		return nil, err
	}
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		return nil, &missingError{"etcd"}
	}
	bin, err := k8sbin.Dir(repo, k8sbin.DefaultCache())
	if err != nil {
		return nil, err
	}
	apiserver := filepath.Join(bin, "kube-apiserver")
	if _, err := os.Stat(apiserver); err != nil {
		return nil, &missingError{apiserver}
	}
	dir, err := os.MkdirTemp("", "keyfs-kubetest-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir, tokens: map[string]string{}}
	ok := false
	defer func() {
		if !ok {
			c.Stop()
		}
	}()
	var ports [3]int
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			return nil, err
		}
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	if err := c.run("etcd", etcd, "--name=kubetest", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=kubetest="+peerURL); err != nil {
		return nil, err
	}

	var tokens strings.Builder
	for _, u := range Users {
		b := make([]byte, 16)
		rand.Read(b)
		c.tokens[u] = hex.EncodeToString(b)
		groups := ""
		if u == "admin" {
			groups = ",\"system:masters\""
		}
		fmt.Fprintf(&tokens, "%s,%s,%s%s\n", c.tokens[u], u, u, groups)
	}
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(tokens.String()), 0o600); err != nil {
		return nil, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return nil, err
	}
	if der, err = x509.MarshalPKIXPublicKey(&saKey.PublicKey); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		return nil, err
	}
	if err := c.waitHTTP(etcdURL+"/health", nil, 30*time.Second); err != nil {
		return nil, c.failed("etcd", err)
	}
	c.Host = fmt.Sprintf("https://127.0.0.1:%d", ports[2])
	if err := c.run("kube-apiserver", apiserver,
		"--etcd-servers="+etcdURL, "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", ports[2]), "--cert-dir="+filepath.Join(dir, "certs"),
		"--token-auth-file="+filepath.Join(dir, "tokens.csv"), "--authorization-mode=RBAC",
		"--service-account-key-file="+filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file="+filepath.Join(dir, "sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none",
		"--allow-privileged=true", // the keyfs DaemonSet is privileged
		"--enable-priority-and-fairness=false", "--profiling=false"); err != nil {
		return nil, err
	}
	if err := c.waitHTTP(c.Host+"/readyz", http.Header{"Authorization": {"Bearer " + c.tokens["admin"]}}, 90*time.Second); err != nil {
		return nil, c.failed("kube-apiserver", err)
	}
	if err := c.applyCRDs(filepath.Join(repo, "manifests", "crds")); err != nil {
		return nil, c.failed("kube-apiserver", err)
	}
	c.Kubeconfig = c.KubeconfigFor("admin")
	ok = true
	return c, nil
}

func (c *Cluster) run(name, bin string, args ...string) error {
	log, err := os.Create(filepath.Join(c.dir, name+".log"))
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	c.procs = append(c.procs, p)
	return nil
}

// failed adds the tail of name's log to err.
func (c *Cluster) failed(name string, err error) error {
	b, _ := os.ReadFile(filepath.Join(c.dir, name+".log"))
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return fmt.Errorf("%s: %w; its log ends:\n%s", name, err, b)
}

// Stop ends the cluster's processes and removes its files.
func (c *Cluster) Stop() {
	for i := len(c.procs) - 1; i >= 0; i-- {
		p := c.procs[i]
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	}
	c.procs = nil
	os.RemoveAll(c.dir)
}

// insecure talks to the test API server, whose serving certificate it made itself.
var insecure = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}

// waitHTTP waits until url answers 200, or the last process started exits.
func (c *Cluster) waitHTTP(url string, h http.Header, d time.Duration) error {
	var last error
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		select {
		case <-c.procs[len(c.procs)-1].done:
			return errors.New("exited")
		default:
		}
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		for k, v := range h {
			req.Header[k] = v
		}
		r, err := insecure.Do(req)
		if err != nil {
			last = err
			continue
		}
		r.Body.Close()
		if r.StatusCode == http.StatusOK {
			return nil
		}
		last = fmt.Errorf("%s: %s", url, r.Status)
	}
	return fmt.Errorf("not ready after %s: %w", d, last)
}

// applyCRDs creates every CustomResourceDefinition in dir and waits until
// each serves.
func (c *Cluster) applyCRDs(dir string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return err
	}
	var plurals []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		var crd struct {
			Kind string
			Spec struct {
				Group string
				Names struct{ Plural string }
			}
		}
		if err := yaml.Unmarshal(b, &crd); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		if crd.Kind != "CustomResourceDefinition" {
			continue
		}
		j, err := yaml.YAMLToJSON(b)
		if err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		if err := c.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", j); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		plurals = append(plurals, crd.Spec.Group+"/v1alpha1/"+crd.Spec.Names.Plural)
	}
	for _, p := range plurals {
		if err := c.waitHTTP(c.Host+"/apis/"+p, http.Header{"Authorization": {"Bearer " + c.tokens["admin"]}}, 30*time.Second); err != nil {
			return fmt.Errorf("CRD %s does not serve: %w", p, err)
		}
	}
	return nil
}
