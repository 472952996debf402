package driver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/moby/sys/mountinfo"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/keyfs/keyfs/fusefs"
	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/keystore"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(runHelper())
	}
	if sock := os.Getenv(holderEnv); sock != "" {
		os.Exit(runHolder(sock))
	}
	os.Exit(m.Run())
}

// The keys every test store holds.
var testKeys = map[string]string{
	"acme/openai":    "sk-acme-openai-1",
	"acme/anthropic": "sk-ant-acme-2",
	"beta/openai":    "sk-beta-openai-3",
	"gamma/gemini":   "gm-gamma-4",
}

type envConfig struct {
	policy string // policy file content; "" = no policy file
	rule   string
}

// env is one driver serving on a real unix socket, over a real store.
type env struct {
	t          *testing.T
	dir        string
	kubelet    string
	state      string
	storeDir   string
	seed       []byte
	store      *keystore.Dir
	index      *keystore.DirIndex // what the driver serves
	key        *keystore.MasterKey
	auditPath  string
	policyPath string
	policy     *Policy
	reg        *prometheus.Registry
	drv        *Driver
	sock       string
	node       csi.NodeClient
	ident      csi.IdentityClient
	conn       *grpc.ClientConn
}

func newEnv(t *testing.T, c envConfig) *env {
	t.Helper()
	fusetest.Require(t)
	e := newStoreEnv(t)
	if c.policy != "" {
		e.policyPath = filepath.Join(e.dir, "policy.yaml")
		writePolicy(t, e.policyPath, c.policy)
	}
	var err error
	if e.policy, err = LoadPolicy(e.policyPath, c.rule); err != nil {
		t.Fatal(err)
	}
	al, err := audit.Open(e.auditPath, audit.DefaultMaxBytes)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { al.Close() })
	e.reg = prometheus.NewRegistry()
	e.drv, err = New(Config{
		Version: "test", NodeID: "node-1", KubeletDir: e.kubelet, StateDir: e.state,
		Store: e.index, Key: e.key, Audit: al, Log: testLogger(t), Policy: e.policy, Registry: e.reg, ReadsOwnMounts: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	watched := make(chan struct{})
	go func() { e.policy.Watch(ctx, 50*time.Millisecond, testLogger(t), nil); close(watched) }()
	served := make(chan error, 1)
	l, err := e.drv.Listen("unix://" + e.sock)
	if err != nil {
		t.Fatal(err)
	}
	go func() { served <- e.drv.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		<-watched
		e.drv.Close()
		detachAll(t, e.dir)
	})
	e.dial()
	return e
}

// newStoreEnv makes directories, a master key and a store holding testKeys.
func newStoreEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir()}
	e.kubelet = filepath.Join(e.dir, "kubelet")
	e.state = filepath.Join(e.dir, "state")
	e.storeDir = filepath.Join(e.dir, "store")
	e.auditPath = filepath.Join(e.dir, "audit.log")
	if err := os.MkdirAll(filepath.Join(e.kubelet, "pods"), 0o750); err != nil {
		t.Fatal(err)
	}
	// Unix socket paths are limited to 108 bytes: keep them short.
	sd, err := os.MkdirTemp("", "kfs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sd) })
	e.sock = filepath.Join(sd, "csi.sock")
	e.seed = make([]byte, keystore.SeedSize)
	rand.Read(e.seed)
	if e.key, err = keystore.NewMasterKey(e.seed); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.key.Close)
	if e.store, err = keystore.OpenDir(e.storeDir); err != nil {
		t.Fatal(err)
	}
	for ref, val := range testKeys {
		e.put(ref, val)
	}
	if e.index, err = keystore.WatchDir(e.store, 50*time.Millisecond, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.index.Close)
	return e
}

func (e *env) put(ref, val string) {
	e.t.Helper()
	tenant, name, err := keystore.ParseRef(ref)
	if err != nil {
		e.t.Fatal(err)
	}
	_, err = e.store.Put(tenant, name, func(v uint64) (*keystore.Record, error) {
		return keystore.Seal(e.key.Public(), tenant, name, v, []byte(val))
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) dial() {
	e.t.Helper()
	// Dialing before the socket exists costs a second of gRPC backoff.
	waitFor(e.t, 5*time.Second, "the CSI socket", func() bool {
		_, err := os.Stat(e.sock)
		return err == nil
	})
	conn, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	e.conn, e.node, e.ident = conn, csi.NewNodeClient(conn), csi.NewIdentityClient(conn)
	waitFor(e.t, 5*time.Second, "the CSI socket to answer", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := e.ident.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		return err == nil
	})
}

func writePolicy(t testing.TB, path, content string) {
	t.Helper()
	if err := keystore.WriteFileAtomic(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() && os.Getenv("KEYFS_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// pod is the identity kubelet reports for a test pod.
func pod(namespace, sa string) podIdentity {
	b := make([]byte, 8)
	rand.Read(b)
	return podIdentity{Namespace: namespace, Name: "web", UID: "uid-" + hex.EncodeToString(b), ServiceAccount: sa}
}

// target is where kubelet would ask to mount volume vol of a pod.
func (e *env) target(p podIdentity, vol string) string {
	return filepath.Join(e.kubelet, "pods", p.UID, "volumes", "kubernetes.io~csi", vol, "mount")
}

// request builds what kubelet sends for an inline volume with attrs.
func (e *env) request(vol string, p podIdentity, attrs map[string]string) *csi.NodePublishVolumeRequest {
	vc := map[string]string{
		ctxEphemeral:      "true",
		ctxPodNamespace:   p.Namespace,
		ctxPodName:        p.Name,
		ctxPodUID:         p.UID,
		ctxServiceAccount: p.ServiceAccount,
	}
	for k, v := range attrs {
		vc[k] = v
	}
	return &csi.NodePublishVolumeRequest{
		VolumeId:   vol,
		TargetPath: e.target(p, vol),
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		Readonly:      true,
		VolumeContext: vc,
	}
}

func (e *env) publish(r *csi.NodePublishVolumeRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := e.node.NodePublishVolume(ctx, r)
	return err
}

func (e *env) mustPublish(r *csi.NodePublishVolumeRequest) {
	e.t.Helper()
	if err := e.publish(r); err != nil {
		e.t.Fatalf("publish %s: %v", r.VolumeId, err)
	}
	e.t.Cleanup(func() { e.unpublish(r.VolumeId, r.TargetPath) })
}

func (e *env) unpublish(vol, target string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := e.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target})
	return err
}

// keyfsMounts lists keyfs mount points under dir.
func keyfsMounts(t testing.TB, dir string) []string {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		if m.FSType == fusefs.FSType {
			out = append(out, m.Mountpoint)
		}
	}
	return out
}

// detachAll detaches any keyfs mount a failed test left under dir, so one
// failure does not leak mounts into the machine.
func detachAll(t testing.TB, dir string) {
	for _, mp := range keyfsMounts(t, dir) {
		t.Errorf("mount left behind: %s", mp)
		unix.Unmount(mp, unix.MNT_DETACH)
	}
}

func listDir(t testing.TB, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("list %s: %v", dir, err)
	}
	var names []string
	for _, de := range des {
		names = append(names, de.Name())
	}
	slices.Sort(names)
	return names
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return string(b)
}

func waitFor(t testing.TB, d time.Duration, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// auditEvents returns the audit events of kind for volume vol.
func (e *env) auditEvents(kind, vol string) []audit.Event {
	e.t.Helper()
	evs, err := audit.Query(e.auditPath, audit.Filter{})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		e.t.Fatal(err)
	}
	return slices.DeleteFunc(evs, func(ev audit.Event) bool { return ev.Event != kind || ev.Volume != vol })
}

// metric returns the value of a counter or gauge, summed over labels
// matching want (label=value pairs).
func (e *env) metric(name string, want ...string) float64 {
	e.t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(want); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == want[i] && lp.GetValue() == want[i+1] {
						found = true
					}
				}
				if !found {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			case m.Histogram != nil:
				sum += float64(m.Histogram.GetSampleCount())
			}
		}
	}
	return sum
}

func code(err error) string { return status.Code(err).String() }

func msg(err error) string { return status.Convert(err).Message() }

func contains(s string, subs ...string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}
