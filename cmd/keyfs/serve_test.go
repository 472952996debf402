package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/keyfs/keyfs/internal/fusetest"
)

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func dialUnix(t *testing.T, path string) *grpc.ClientConn {
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestServe(t *testing.T) {
	fusetest.Require(t)
	tmp := t.TempDir()
	c := &cli{t: t, state: filepath.Join(tmp, "state"), tpm: "sim"}
	c.must(0, "", "init")
	c.must(0, "sk-serve-acme", "put", "acme/openai")
	c.must(0, "sk-serve-beta", "put", "beta/openai")
	kubelet := filepath.Join(tmp, "kubelet")
	regDir := filepath.Join(kubelet, "plugins_registry")
	os.MkdirAll(regDir, 0o755)
	sock := filepath.Join(kubelet, "plugins", "keyfs.csi.dev", "csi.sock")
	os.MkdirAll(filepath.Dir(sock), 0o755)
	metrics := freeAddr(t)
	policy := filepath.Join(tmp, "policy.yaml")
	if err := os.WriteFile(policy, []byte("tenants: {}\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	cmd := c.keyfsCmd("serve", "--csi-endpoint", "unix://"+sock, "--node-id", "node-1",
		"--kubelet-dir", kubelet, "--kubelet-registration-dir", regDir, "--metrics-addr", metrics, "--policy", policy)
	logs := startChild(t, cmd)
	healthz := func() int {
		r, err := http.Get("http://" + metrics + "/healthz")
		if err != nil {
			return 0
		}
		r.Body.Close()
		return r.StatusCode
	}
	if !poll(15*time.Second, func() bool { return healthz() == 200 }) {
		t.Fatalf("serve not healthy within 15s: %s", logs.String())
	}

	node := csi.NewNodeClient(dialUnix(t, sock))
	ctx := context.Background()
	target := filepath.Join(kubelet, "pods", "uid-1", "volumes", "kubernetes.io~csi", "keys", "mount")
	req := &csi.NodePublishVolumeRequest{
		VolumeId: "csi-vol-1", TargetPath: target, Readonly: true,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY},
		},
		VolumeContext: map[string]string{
			"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.namespace": "acme",
			"csi.storage.k8s.io/pod.name": "app", "csi.storage.k8s.io/pod.uid": "uid-1",
			"csi.storage.k8s.io/serviceAccount.name": "default", "tenants": "acme",
		},
	}
	if _, err := node.NodePublishVolume(ctx, req); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "acme", "openai")); err != nil || string(b) != "sk-serve-acme" {
		t.Fatalf("read through the published volume: %q %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(target, "beta")); err == nil {
		t.Fatal("namespace acme sees tenant beta")
	}
	req.VolumeId, req.TargetPath = "csi-vol-2", filepath.Join(kubelet, "pods", "uid-2", "volumes", "kubernetes.io~csi", "keys", "mount")
	req.VolumeContext["tenants"] = "beta"
	if _, err := node.NodePublishVolume(ctx, req); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "acme") {
		t.Fatalf("acme pod asking for beta: %v", err)
	}
	// A policy change is picked up and logged by the running daemon.
	if err := os.WriteFile(policy, []byte("tenants:\n  beta:\n    namespaces: [acme]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if !logged(logs, `"msg":"policy reloaded"`) {
		t.Fatalf("policy change not logged within 10s:\n%s", logs.String())
	}

	// Metrics count the publish, the denial and the read.
	r, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(r.Body)
	r.Body.Close()
	for _, want := range []string{"keyfs_csi_publishes_total 1", "keyfs_csi_denials_total", `keyfs_reads_total{tenant="acme"} 1`, "keyfs_csi_mounted_volumes 1", `keyfs_policy_reloads_total{result="applied"} 1`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	// kubelet's side of plugin registration.
	info, err := registerapi.NewRegistrationClient(dialUnix(t, filepath.Join(regDir, "keyfs.csi.dev-reg.sock"))).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil || info.Name != "keyfs.csi.dev" || info.Endpoint != sock {
		t.Fatalf("registration GetInfo: %+v %v", info, err)
	}

	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "csi-vol-1", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("target after unpublish: %v", err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := waitOrDump(t, cmd, 30*time.Second, logs); err != nil {
		t.Fatalf("serve after SIGTERM: %v\n%s", err, logs.String())
	}
	if strings.Contains(logs.String(), "sk-serve") {
		t.Fatal("serve logged a value")
	}
	// Every line is JSON with the same keys for time, level and message,
	// the simulator's warning and the policy reload included.
	var sawSim, sawPolicy bool
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var l struct{ Time, Level, Msg string }
		if err := json.Unmarshal([]byte(line), &l); err != nil || l.Time == "" || l.Level == "" || l.Msg == "" {
			t.Errorf("log line is not a JSON log record: %s", line)
		}
		if strings.HasPrefix(l.Msg, "keyfs:") {
			t.Errorf("log message carries the keyfs: prefix of CLI messages: %s", line)
		}
		sawSim = sawSim || l.Level == "WARN" && strings.Contains(l.Msg, "INSECURE in-process TPM simulator")
		sawPolicy = sawPolicy || l.Msg == "policy reloaded"
	}
	if !sawSim || !sawPolicy {
		t.Errorf("serve's log lacks the simulator warning (%v) or the policy reload (%v):\n%s", sawSim, sawPolicy, logs.String())
	}
	audit := c.must(0, "", "audit", "-o", "json").stdout
	for _, want := range []string{`"event":"publish"`, `"event":"deny"`, `"event":"open"`, `"pod_uid":"uid-1"`, `"event":"unpublish"`} {
		if !strings.Contains(audit, want) {
			t.Errorf("audit lacks %s", want)
		}
	}
}

func TestServeWithoutState(t *testing.T) {
	fusetest.Require(t)
	c := &cli{t: t, state: filepath.Join(t.TempDir(), "none"), tpm: "sim"}
	r := c.must(exitNotFound, "", "serve", "--csi-endpoint", "unix://"+filepath.Join(t.TempDir(), "csi.sock"), "--metrics-addr", freeAddr(t))
	if !strings.Contains(r.stderr, "keyfs init") {
		t.Fatalf("serve without state: %s", r.stderr)
	}
}

// TestDaemonsRefuseUnprotectedMemory: without CAP_IPC_LOCK and with
// RLIMIT_MEMLOCK 0, serve and mount refuse to start and say what to
// change; with --insecure-allow-unlocked-memory serve runs, says so in its
// log and in /metrics.
func TestDaemonsRefuseUnprotectedMemory(t *testing.T) {
	fusetest.Require(t)
	for _, tool := range []string{"setpriv", "prlimit"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s (util-linux) is needed: %v", tool, err)
		}
	}
	tmp := t.TempDir()
	c := &cli{t: t, state: filepath.Join(tmp, "state"), tpm: "sim"}
	c.must(0, "", "init")
	c.must(0, "sk-unlocked", "put", "acme/openai")
	unlocked := func(args ...string) *exec.Cmd {
		cmd := exec.Command("setpriv", append([]string{"--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--",
			"prlimit", "--memlock=0:0", "--", keyfsBin}, args...)...)
		cmd.Env = append(os.Environ(), "KEYFS_STATE="+c.state, "KEYFS_TPM=sim")
		return cmd
	}
	sock := filepath.Join(tmp, "csi.sock")
	serveArgs := []string{"serve", "--csi-endpoint", "unix://" + sock, "--kubelet-dir", filepath.Join(tmp, "kubelet"),
		"--kubelet-registration-dir", "", "--metrics-addr", freeAddr(t)}
	for _, args := range [][]string{serveArgs, {"mount", filepath.Join(tmp, "mnt")}} {
		out, err := unlocked(args...).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != exitPerm || !strings.Contains(string(out), "cannot protect its memory") ||
			!strings.Contains(string(out), "CAP_IPC_LOCK") || !strings.Contains(string(out), "--insecure-allow-unlocked-memory") {
			t.Errorf("keyfs %s without locked memory: %v\n%s", args[0], err, out)
		}
	}

	metrics := freeAddr(t)
	serveArgs[len(serveArgs)-1] = metrics
	cmd := unlocked(append(serveArgs, "--insecure-allow-unlocked-memory")...)
	logs := startChild(t, cmd)
	var body string
	if !poll(15*time.Second, func() bool { body = metricsText(metrics); return body != "" }) {
		t.Fatalf("serve with --insecure-allow-unlocked-memory did not serve /metrics: %s", logs.String())
	}
	if !strings.Contains(body, "keyfs_insecure_unlocked_memory 1") {
		t.Errorf("/metrics does not show the unprotected memory")
	}
	if !logged(logs, "UNPROTECTED memory") {
		t.Errorf("no warning logged: %s", logs.String())
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := waitOrDump(t, cmd, 30*time.Second, logs); err != nil {
		t.Fatalf("serve after SIGTERM: %v\n%s", err, logs.String())
	}
}
