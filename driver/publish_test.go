package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/keyfs/keyfs/fusefs"
)

func TestIdentity(t *testing.T) {
	e := newEnv(t, envConfig{})
	ctx := context.Background()
	info, err := e.ident.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.Name != DriverName || info.VendorVersion != "test" {
		t.Fatalf("GetPluginInfo = %v, %v", info, err)
	}
	caps, err := e.ident.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil || len(caps.Capabilities) != 0 {
		t.Fatalf("GetPluginCapabilities = %v, %v; want none (no controller)", caps, err)
	}
	ni, err := e.node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || ni.NodeId != "node-1" {
		t.Fatalf("NodeGetInfo = %v, %v", ni, err)
	}
	probe := func() bool {
		r, err := e.ident.Probe(ctx, &csi.ProbeRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return r.GetReady().GetValue()
	}
	if !probe() {
		t.Fatal("Probe not ready with a key and a readable store")
	}
	if _, err := New(Config{NodeID: "n", StateDir: t.TempDir(), Store: e.index}); err == nil || !strings.Contains(err.Error(), "master key is required") {
		t.Errorf("New without a master key: %v", err)
	}
	os.Rename(e.storeDir, e.storeDir+".moved")
	if probe() {
		t.Error("Probe ready with an unreadable store")
	}
	os.Rename(e.storeDir+".moved", e.storeDir)
}

func TestPublishTenantView(t *testing.T) {
	e := newEnv(t, envConfig{})
	p := pod("acme", "default")
	r := e.request("vol-1", p, map[string]string{"keys": "openai", "uid": "1000", "gid": "2000", "mode": "0440"})
	if err := e.publish(r); err != nil {
		t.Fatal(err)
	}
	tgt := r.TargetPath
	if got := fmt.Sprint(listDir(t, tgt)); got != "[acme]" {
		t.Errorf("target lists %s, want only [acme]", got)
	}
	if got := fmt.Sprint(listDir(t, filepath.Join(tgt, "acme"))); got != "[openai]" {
		t.Errorf("acme lists %s, want only [openai]", got)
	}
	if got := readFile(t, filepath.Join(tgt, "acme", "openai")); got != testKeys["acme/openai"] {
		t.Errorf("read %q, want %q", got, testKeys["acme/openai"])
	}
	for _, hidden := range []string{"acme/anthropic", "beta/openai", "beta"} {
		if _, err := os.Stat(filepath.Join(tgt, hidden)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: stat = %v, want not exist", hidden, err)
		}
	}
	fi, err := os.Stat(filepath.Join(tgt, "acme", "openai"))
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o440 || st.Uid != 1000 || st.Gid != 2000 {
		t.Errorf("key file mode %v uid %d gid %d, want 0440 1000 2000", fi.Mode().Perm(), st.Uid, st.Gid)
	}
	if ms := keyfsMounts(t, e.kubelet); len(ms) != 1 || ms[0] != tgt {
		t.Errorf("mounts %v, want [%s]", ms, tgt)
	}

	// Same volume, same everything: OK, nothing new.
	if err := e.publish(r); err != nil {
		t.Errorf("same publish again: %v", err)
	}
	// Same volume, other attributes or target: AlreadyExists.
	changed := e.request("vol-1", p, map[string]string{"keys": "openai,anthropic", "uid": "1000", "gid": "2000", "mode": "0440"})
	if err := e.publish(changed); code(err) != "AlreadyExists" {
		t.Errorf("changed attributes: %v, want AlreadyExists", err)
	}
	moved := e.request("vol-1", p, map[string]string{"keys": "openai", "uid": "1000", "gid": "2000", "mode": "0440"})
	moved.TargetPath = filepath.Join(filepath.Dir(tgt), "elsewhere")
	if err := e.publish(moved); code(err) != "AlreadyExists" {
		t.Errorf("other target: %v, want AlreadyExists", err)
	}
	if len(keyfsMounts(t, e.kubelet)) != 1 {
		t.Error("a refused publish mounted something")
	}

	if err := e.unpublish("vol-1", tgt); err != nil {
		t.Fatal(err)
	}
	if ms := keyfsMounts(t, e.dir); len(ms) != 0 {
		t.Errorf("mounts left after unpublish: %v", ms)
	}
	if _, err := os.Stat(tgt); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("target after unpublish: %v, want removed", err)
	}
	if err := e.unpublish("vol-1", tgt); err != nil {
		t.Errorf("unpublish again: %v", err)
	}

	pub, unpub := e.auditEvents("publish", "vol-1"), e.auditEvents("unpublish", "vol-1")
	if len(pub) != 1 || len(unpub) != 2 {
		t.Fatalf("audit: %d publish, %d unpublish events; want 1, 2", len(pub), len(unpub))
	}
	if ev := pub[0]; ev.PodNamespace != "acme" || ev.PodName != "web" || ev.PodUID != p.UID || ev.ServiceAccount != "default" || ev.Tenant != "acme" {
		t.Errorf("publish event %+v lacks the pod's identity", ev)
	}
	if ev := unpub[0]; ev.PodNamespace != "acme" || ev.PodUID != p.UID {
		t.Errorf("unpublish event %+v lacks the pod's identity", ev)
	}
	opens := e.auditEvents("open", "vol-1")
	if len(opens) == 0 || opens[0].PodUID != p.UID || opens[0].Key != "openai" {
		t.Errorf("open events %+v: want the pod's identity on reads", opens)
	}
	if got := e.metric("keyfs_csi_publishes_total"); got != 1 {
		t.Errorf("publishes_total = %v, want 1", got)
	}
	if got := e.metric("keyfs_csi_unpublishes_total"); got != 2 {
		t.Errorf("unpublishes_total = %v, want 2", got)
	}
	if got := e.metric("keyfs_reads_total", "tenant", "acme"); got < 1 {
		t.Errorf("reads_total{tenant=acme} = %v, want ≥ 1", got)
	}
	if got := e.metric("keyfs_csi_errors_total", "reason", "already_exists"); got != 2 {
		t.Errorf("errors_total{already_exists} = %v, want 2", got)
	}
	if got := e.metric("keyfs_csi_mounted_volumes"); got != 0 {
		t.Errorf("mounted_volumes = %v, want 0", got)
	}
}

const gatewayPolicy = `
tenants:
  acme:
    namespaces: [gateway]
  beta:
    namespaces: [gateway]
`

func TestWildcardFollowsPolicy(t *testing.T) {
	e := newEnv(t, envConfig{policy: gatewayPolicy})
	p := pod("gateway", "api")
	all := e.request("vol-all", p, map[string]string{"tenants": "*"})
	e.mustPublish(all)
	one := e.request("vol-one", p, map[string]string{"tenants": "beta"})
	e.mustPublish(one)
	if got := fmt.Sprint(listDir(t, all.TargetPath)); got != "[acme beta]" {
		t.Fatalf("* lists %s, want [acme beta]", got)
	}
	if got := readFile(t, filepath.Join(all.TargetPath, "beta", "openai")); got != testKeys["beta/openai"] {
		t.Fatalf("read %q", got)
	}

	// Grant gamma, revoke beta: the running mounts follow without a republish.
	writePolicy(t, e.policyPath, `
tenants:
  acme:
    namespaces: [gateway]
  gamma:
    serviceAccounts: [gateway/api]
`)
	waitFor(t, 5*time.Second, "gamma to appear and beta to vanish", func() bool {
		return fmt.Sprint(listDir(t, all.TargetPath)) == "[acme gamma]"
	})
	if got := readFile(t, filepath.Join(all.TargetPath, "gamma", "gemini")); got != testKeys["gamma/gemini"] {
		t.Errorf("read gamma %q", got)
	}
	if _, err := os.ReadFile(filepath.Join(all.TargetPath, "beta", "openai")); err == nil {
		t.Error("revoked tenant still readable through *")
	}
	if got := listDir(t, one.TargetPath); len(got) != 0 {
		t.Errorf("explicit beta volume lists %v after beta was revoked, want nothing", got)
	}

	// A malformed policy keeps the last good one.
	rejected := e.policy.rejected.Load()
	writePolicy(t, e.policyPath, "tenants:\n  Bad_Name:\n    namespaces: [gateway]\n")
	waitFor(t, 5*time.Second, "the malformed policy to be read and rejected", func() bool {
		return e.policy.rejected.Load() > rejected
	})
	if got := fmt.Sprint(listDir(t, all.TargetPath)); got != "[acme gamma]" {
		t.Errorf("after a malformed policy * lists %s, want the last good [acme gamma]", got)
	}
}

func TestPolicyTable(t *testing.T) {
	const policy = `
tenants:
  acme:
    namespaces: [acme-jobs]
    serviceAccounts: [gateway/api]
  beta:
    serviceAccounts: [shared/reader]
`
	type tc struct {
		name     string
		pod      podIdentity
		tenants  string // "" = attribute absent
		allow    bool
		lists    string
		denyText string // the refused tenant
	}
	run := func(t *testing.T, e *env, cases []tc) {
		for i, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				vol := fmt.Sprintf("vol-%d", i)
				var attrs map[string]string
				if c.tenants != "" {
					attrs = map[string]string{"tenants": c.tenants}
				}
				r := e.request(vol, c.pod, attrs)
				err := e.publish(r)
				if c.allow {
					if err != nil {
						t.Fatalf("publish: %v, want allowed", err)
					}
					t.Cleanup(func() { e.unpublish(vol, r.TargetPath) })
					if got := fmt.Sprint(listDir(t, r.TargetPath)); got != c.lists {
						t.Errorf("lists %s, want %s", got, c.lists)
					}
					return
				}
				if code(err) != "PermissionDenied" {
					t.Fatalf("publish: %v, want PermissionDenied", err)
				}
				want := fmt.Sprintf("pod %s/web (service account %q) may not read tenant %q", c.pod.Namespace, c.pod.ServiceAccount, c.denyText)
				if !contains(msg(err), want, "grant it with") {
					t.Errorf("message %q\nwant it to contain %q and how to grant", msg(err), want)
				}
				evs := e.auditEvents("deny", vol)
				if len(evs) != 1 || evs[0].Tenant != c.denyText || evs[0].PodNamespace != c.pod.Namespace ||
					evs[0].ServiceAccount != c.pod.ServiceAccount || evs[0].PodUID != c.pod.UID {
					t.Errorf("deny audit events %+v", evs)
				}
				if _, err := os.Stat(r.TargetPath); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("denied publish left its target: %v", err)
				}
			})
		}
		if ms := keyfsMounts(t, e.kubelet); len(ms) != 0 {
			t.Errorf("mounts left: %v", ms)
		}
	}

	t.Run("namespace-rule", func(t *testing.T) {
		e := newEnv(t, envConfig{policy: policy})
		run(t, e, []tc{
			{name: "default rule", pod: pod("acme", "default"), allow: true, lists: "[acme]"},
			{name: "default rule other namespace", pod: pod("acme-intruder", "default"), tenants: "acme", denyText: "acme"},
			{name: "granted namespace", pod: pod("acme-jobs", "batch"), tenants: "acme", allow: true, lists: "[acme]"},
			{name: "granted service account only", pod: pod("gateway", "api"), tenants: "acme", allow: true, lists: "[acme]"},
			{name: "ungranted service account in granted namespace", pod: pod("gateway", "other"), tenants: "acme", denyText: "acme"},
			{name: "one tenant not granted refuses all", pod: pod("acme", "default"), tenants: "acme,beta", denyText: "beta"},
			{name: "star shows only granted", pod: pod("shared", "reader"), tenants: "*", allow: true, lists: "[beta]"},
		})
		if got := e.metric("keyfs_csi_denials_total", "reason", "tenant_not_granted"); got != 3 {
			t.Errorf("denials_total = %v, want 3", got)
		}
	})
	t.Run("rule-none", func(t *testing.T) {
		e := newEnv(t, envConfig{policy: policy, rule: RuleNone})
		run(t, e, []tc{
			{name: "own namespace not granted", pod: pod("acme", "default"), denyText: "acme"},
			{name: "granted namespace", pod: pod("acme-jobs", "batch"), tenants: "acme", allow: true, lists: "[acme]"},
			{name: "star with own namespace", pod: pod("acme", "default"), tenants: "*", allow: true, lists: "[]"},
		})
	})
}

func TestBadInput(t *testing.T) {
	e := newEnv(t, envConfig{})
	p := pod("acme", "default")
	cases := []struct {
		name string
		edit func(r *csi.NodePublishVolumeRequest)
		want string // in the message
	}{
		{"no volume id", func(r *csi.NodePublishVolumeRequest) { r.VolumeId = "" }, "volume id"},
		{"no target", func(r *csi.NodePublishVolumeRequest) { r.TargetPath = "" }, "target path"},
		{"relative target", func(r *csi.NodePublishVolumeRequest) { r.TargetPath = "pods/x/mount" }, "not absolute"},
		{"dotdot target", func(r *csi.NodePublishVolumeRequest) {
			r.TargetPath = e.kubelet + "/pods/../../escape/mount"
		}, "not clean"},
		{"trailing slash target", func(r *csi.NodePublishVolumeRequest) { r.TargetPath += "/" }, "not clean"},
		{"outside kubelet dir", func(r *csi.NodePublishVolumeRequest) { r.TargetPath = filepath.Join(e.dir, "elsewhere", "mount") }, "not under the kubelet directory"},
		{"kubelet dir prefix trick", func(r *csi.NodePublishVolumeRequest) { r.TargetPath = e.kubelet + "-evil/mount" }, "not under the kubelet directory"},
		{"no capability", func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability = nil }, "capability"},
		{"block", func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
		}, "block"},
		{"fs type", func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().FsType = "ext4" }, "fsType"},
		{"mount flags", func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().MountFlags = []string{"rw"} }, "mount option"},
		{"no access mode", func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.AccessMode = nil }, "access mode"},
		{"not read-only", func(r *csi.NodePublishVolumeRequest) { r.Readonly = false }, "readOnly: true"},
		{"persistent", func(r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, ctxEphemeral) }, "ephemeral"},
		{"ephemeral false", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[ctxEphemeral] = "false" }, "ephemeral"},
		{"no pod info", func(r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, ctxPodNamespace) }, "podInfoOnMount"},
		{"bad tenant", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["tenants"] = "Acme_Corp" }, "a tenant is 1-63 characters"},
		{"empty tenant item", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["tenants"] = "acme,," }, "no empty items"},
		{"star mixed", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["tenants"] = "*,acme" }, "tenant \"*\""},
		{"bad key", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["keys"] = "../openai" }, "a key name is"},
		{"unknown attribute", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["tenant"] = "acme" }, "tenants, keys, uid, gid, mode"},
		{"mode too big", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["mode"] = "01000" }, "out of range"},
		{"mode writable", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["mode"] = "0644" }, "write or execute"},
		{"mode zero", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["mode"] = "0000" }, "nobody"},
		{"mode not octal", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["mode"] = "0o9" }, "octal"},
		{"uid negative", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["uid"] = "-1" }, "0..2147483647"},
		{"gid too big", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["gid"] = "2147483648" }, "0..2147483647"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := e.request(fmt.Sprintf("bad-%d", i), p, nil)
			c.edit(r)
			err := e.publish(r)
			if code(err) != "InvalidArgument" || !contains(msg(err), c.want) {
				t.Errorf("publish: %v; want InvalidArgument mentioning %q", err, c.want)
			}
		})
	}
	if ms := keyfsMounts(t, e.dir); len(ms) != 0 {
		t.Errorf("bad input mounted %v", ms)
	}
	if des, _ := os.ReadDir(filepath.Join(e.kubelet, "pods")); len(des) != 0 {
		t.Errorf("bad input created directories: %v", des)
	}
	if des, _ := os.ReadDir(filepath.Join(e.state, "volumes")); len(des) != 0 {
		t.Errorf("bad input recorded volumes: %v", des)
	}

	for _, c := range []struct{ vol, target, want string }{
		{"", e.target(p, "x"), "volume id"},
		{"x", "", "target path"},
		{"x", "/etc", "not under the kubelet directory"},
	} {
		if err := e.unpublish(c.vol, c.target); code(err) != "InvalidArgument" || !contains(msg(err), c.want) {
			t.Errorf("unpublish(%q, %q): %v, want InvalidArgument", c.vol, c.target, err)
		}
	}
}

func TestUnpublishLeftoverMount(t *testing.T) {
	e := newEnv(t, envConfig{})
	p := pod("acme", "default")
	tgt := e.target(p, "vol-old")
	if err := os.MkdirAll(tgt, 0o750); err != nil {
		t.Fatal(err)
	}
	// A mount this driver does not know, as a previous daemon leaves it.
	srv, err := fusefs.Mount(tgt, fusefs.Options{Store: e.index, Key: e.key, Log: testLogger(t), ReadsOwnMount: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.unpublish("vol-old", tgt); err != nil {
		srv.Unmount()
		t.Fatal(err)
	}
	// Detached and unused, the mount is gone: its server ends.
	waited := make(chan struct{})
	go func() { srv.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Error("the detached mount's server did not end")
	}
	if ms := keyfsMounts(t, e.dir); len(ms) != 0 {
		t.Errorf("mounts left: %v", ms)
	}
	if _, err := os.Stat(tgt); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("target: %v, want removed", err)
	}
	// Never a target that was never there.
	if err := e.unpublish("vol-never", e.target(p, "vol-never")); err != nil {
		t.Errorf("unpublish of a missing target: %v", err)
	}
}

func TestConcurrentPublishes(t *testing.T) {
	e := newEnv(t, envConfig{})
	const n = 50
	// Warm up gRPC and go-fuse so their lazily started goroutines count
	// in the baseline.
	warm := e.request("warm", pod("acme", "default"), nil)
	if err := e.publish(warm); err != nil {
		t.Fatal(err)
	}
	if err := e.unpublish("warm", warm.TargetPath); err != nil {
		t.Fatal(err)
	}
	base := settledGoroutines(t)

	reqs := make([]*csi.NodePublishVolumeRequest, n)
	for i := range reqs {
		reqs[i] = e.request(fmt.Sprintf("vol-%02d", i), pod("acme", "default"), nil)
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i, r := range reqs {
		wg.Go(func() { errs[i] = e.publish(r) })
	}
	wg.Wait()
	t.Logf("%d concurrent publishes in %v", n, time.Since(start))
	for i, err := range errs {
		if err != nil {
			t.Errorf("publish %d: %v", i, err)
		}
	}
	if ms := keyfsMounts(t, e.kubelet); len(ms) != n {
		t.Errorf("%d mounts, want %d", len(ms), n)
	}
	for _, r := range reqs {
		if got := readFile(t, filepath.Join(r.TargetPath, "acme", "anthropic")); got != testKeys["acme/anthropic"] {
			t.Fatalf("%s: read %q", r.VolumeId, got)
		}
	}
	for i, r := range reqs {
		wg.Go(func() { errs[i] = e.unpublish(r.VolumeId, r.TargetPath) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("unpublish %d: %v", i, err)
		}
	}
	if ms := keyfsMounts(t, e.dir); len(ms) != 0 {
		t.Errorf("%d mounts left after unpublish", len(ms))
	}
	const slack = 5
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > base+slack && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > base+slack {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines after unpublishing, baseline %d:\n%s", g, base, buf[:runtime.Stack(buf, true)])
	}
	if len(e.drv.locks.m) != 0 {
		t.Errorf("per-volume locks not released: %d", len(e.drv.locks.m))
	}
}

func TestPanicBecomesInternal(t *testing.T) {
	e := newEnv(t, envConfig{})
	e.drv.mount = func(string, fusefs.Options) (view, error) { panic("injected") }
	r := e.request("vol-panic", pod("acme", "default"), nil)
	err := e.publish(r)
	if code(err) != "Internal" {
		t.Fatalf("publish with a panicking mount: %v, want Internal", err)
	}
	if got := e.metric("keyfs_csi_errors_total", "reason", "panic"); got != 1 {
		t.Errorf("errors_total{panic} = %v", got)
	}
	if _, err := os.Stat(r.TargetPath); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("panicked publish left the target it made: %v", err)
	}
	// The daemon lives on, and the volume's lock and target were released.
	if _, err := e.ident.Probe(context.Background(), &csi.ProbeRequest{}); err != nil {
		t.Fatalf("probe after panic: %v", err)
	}
	e.drv.mount = fuseMount
	if err := e.publish(r); err != nil {
		t.Fatalf("publish after the panic: %v", err)
	}
	if err := e.unpublish(r.VolumeId, r.TargetPath); err != nil {
		t.Fatal(err)
	}
}

func TestMountFailureUndone(t *testing.T) {
	e := newEnv(t, envConfig{})
	e.drv.mount = func(string, fusefs.Options) (view, error) { return nil, errors.New("no fuse today") }
	r := e.request("vol-fail", pod("acme", "default"), nil)
	if err := e.publish(r); code(err) != "Internal" || !contains(msg(err), "no fuse today") {
		t.Fatalf("publish: %v, want Internal with the cause", err)
	}
	if des, _ := os.ReadDir(filepath.Join(e.state, "volumes")); len(des) != 0 {
		t.Errorf("failed publish recorded: %v", des)
	}
	if _, err := os.Stat(r.TargetPath); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("failed publish left the target it made: %v", err)
	}
	e.drv.mount = fuseMount
	if err := e.publish(r); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if err := e.unpublish(r.VolumeId, r.TargetPath); err != nil {
		t.Fatal(err)
	}
}

func TestSameTargetOtherVolume(t *testing.T) {
	e := newEnv(t, envConfig{})
	p := pod("acme", "default")
	a := e.request("vol-a", p, nil)
	e.mustPublish(a)
	b := e.request("vol-b", p, nil)
	b.TargetPath = a.TargetPath
	if err := e.publish(b); code(err) != codes.FailedPrecondition.String() {
		t.Errorf("second volume on a used target: %v, want FailedPrecondition", err)
	}
	if err := e.unpublish("vol-b", a.TargetPath); code(err) != "NotFound" {
		t.Errorf("unpublish of another volume's target: %v, want NotFound", err)
	}
	if got := readFile(t, filepath.Join(a.TargetPath, "acme", "openai")); got != testKeys["acme/openai"] {
		t.Errorf("vol-a damaged: %q", got)
	}
}

func TestUnpublishBusy(t *testing.T) {
	e := newEnv(t, envConfig{})
	r := e.request("vol-busy", pod("acme", "default"), nil)
	if err := e.publish(r); err != nil {
		t.Fatal(err)
	}
	// A process still holds a key open (kubelet unpublishes after the
	// containers are gone, but a straggler must not wedge the volume).
	f, err := os.Open(filepath.Join(r.TargetPath, "acme", "openai"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := e.unpublish(r.VolumeId, r.TargetPath); err != nil {
		t.Fatalf("unpublish with a file open: %v", err)
	}
	if ms := keyfsMounts(t, e.dir); len(ms) != 0 {
		t.Errorf("mounts left: %v", ms)
	}
	if _, err := os.Stat(r.TargetPath); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("target: %v, want removed", err)
	}
	buf := make([]byte, 64)
	if n, err := f.Read(buf); err != nil || string(buf[:n]) != testKeys["acme/openai"] {
		t.Errorf("the open file reads %q, %v after a lazy detach", buf[:n], err)
	}
}

// settledGoroutines waits until the goroutine count stops falling (what a
// finished unpublish started winds down) and returns it.
func settledGoroutines(t *testing.T) int {
	t.Helper()
	n, same := runtime.NumGoroutine(), 0
	for deadline := time.Now().Add(5 * time.Second); same < 5 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		if m := runtime.NumGoroutine(); m < n {
			n, same = m, 0
		} else {
			same++
		}
	}
	return n
}

// TestNotReadyUnavailable: while the node cannot serve keys (a cluster
// node waiting for enrollment), publishes fail with Unavailable and the
// reason, audited, and nothing is mounted; once ready, the same request
// publishes.
func TestNotReadyUnavailable(t *testing.T) {
	e := newEnv(t, envConfig{})
	var waiting atomic.Bool
	waiting.Store(true)
	e.drv.ready = func() error {
		if waiting.Load() {
			return errors.New("node node-1 waits for enrollment: approve it with keyfs node approve node-1")
		}
		return nil
	}
	r := e.request("vol-wait", pod("acme", "default"), nil)
	if err := e.publish(r); code(err) != "Unavailable" || !contains(msg(err), "keyfs node approve node-1") {
		t.Fatalf("publish before enrollment: %v, want Unavailable naming the approve command", err)
	}
	if m := keyfsMounts(t, e.dir); len(m) != 0 {
		t.Fatalf("mounted while not ready: %v", m)
	}
	b, err := os.ReadFile(e.auditPath)
	if err != nil || !strings.Contains(string(b), `"event":"unavailable"`) || !strings.Contains(string(b), "keyfs node approve node-1") {
		t.Errorf("no audit event for the refused publish: %v\n%s", err, b)
	}
	waiting.Store(false)
	e.mustPublish(r)
	if got := readFile(t, filepath.Join(r.TargetPath, "acme", "openai")); got != testKeys["acme/openai"] {
		t.Errorf("read after ready: %q", got)
	}
	if err := e.unpublish(r.VolumeId, r.TargetPath); err != nil {
		t.Fatal(err)
	}
}
