package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/internal/syncbuf"
)

func events(t *testing.T, c *cli) []audit.Event {
	t.Helper()
	var evs []audit.Event
	for _, l := range strings.Split(strings.TrimSpace(c.must(0, "", "audit", "-o", "json").stdout), "\n") {
		var e audit.Event
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("audit -o json line %q: %v", l, err)
		}
		evs = append(evs, e)
	}
	return evs
}

// TestAuditLifecycle: init, put, import, rm and recover each leave one
// event naming the actor; the chain verifies, and an edit is found.
func TestAuditLifecycle(t *testing.T) {
	work := t.TempDir()
	c := &cli{t: t, state: filepath.Join(work, "state"), tpm: "sim"}
	rec := filepath.Join(work, "recovery.key")
	c.must(0, "", "recovery-keygen", "-o", rec)
	kid := strings.TrimSpace(c.must(0, "", "init", "--recovery-pub", rec+".pub").stdout)
	c.must(0, "sk-life-1", "put", "acme/openai")
	f := filepath.Join(work, "r.rec")
	writeFile(t, f, c.must(0, "sk-life-2", "seal", "--pubkey", filepath.Join(c.state, "master.pub"), "--tenant", "acme", "--name", "gemini").stdout)
	c.must(0, "", "import", f)
	c.must(0, "", "rm", "acme/openai")
	c.must(0, "", "recover", "--recovery-key", rec)

	host, _ := os.Hostname()
	want := map[string]string{"init": "keyfs init", "put": "keyfs put", "import": "keyfs import", "rm": "keyfs rm", "recover": "keyfs recover"}
	seen := map[string]int{}
	for _, e := range events(t, c) {
		cmd, ok := want[e.Event]
		if !ok {
			continue
		}
		seen[e.Event]++
		if e.Command != cmd || e.Node != host || e.PID == 0 || e.UID == nil || *e.UID != uint32(os.Getuid()) || e.Seq == 0 {
			t.Errorf("%s event lacks its actor: %+v", e.Event, e)
		}
		if (e.Event == "init" || e.Event == "recover") && e.KID != kid {
			t.Errorf("%s event kid %q, want %s", e.Event, e.KID, kid)
		}
		if (e.Event == "put" || e.Event == "import" || e.Event == "rm") && (e.Tenant != "acme" || e.Version == 0) {
			t.Errorf("%s event without its key and version: %+v", e.Event, e)
		}
	}
	for ev := range want {
		if seen[ev] != 1 {
			t.Errorf("%d %s events, want 1", seen[ev], ev)
		}
	}
	if r := c.must(0, "", "audit", "verify"); !strings.Contains(r.stdout, "chain intact") {
		t.Fatalf("audit verify of an untouched trail:\n%s%s", r.stdout, r.stderr)
	}

	// One edited byte: found, with its place.
	log := filepath.Join(c.state, "audit.log")
	b, _ := os.ReadFile(log)
	edited := strings.Replace(string(b), `"key":"gemini"`, `"key":"gemino"`, 1)
	if edited == string(b) {
		t.Fatal("nothing to edit")
	}
	os.WriteFile(log, []byte(edited), 0o600)
	r := c.must(exitIntegrity, "", "audit", "verify")
	if !strings.Contains(r.stdout, "audit.log line ") || !strings.Contains(r.stdout, "does not chain") {
		t.Fatalf("an edit not reported with its place:\n%s%s", r.stdout, r.stderr)
	}
}

// TestAuditReport: a mounted view read by two processes as two uids; the
// report names both, with their counts, and says the chain verified.
func TestAuditReport(t *testing.T) {
	fusetest.Require(t)
	// Another uid reads the mount: its directory must be traversable.
	work, err := os.MkdirTemp("", "kfsreport")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(work) })
	os.Chmod(work, 0o755)
	c := &cli{t: t, state: filepath.Join(work, "state"), tpm: "sim"}
	c.must(0, "", "init")
	c.must(0, "sk-report", "put", "acme/openai")
	mnt := filepath.Join(work, "keys")
	mount, stderr := c.startMount(mnt, "acme/openai") // one open by this test (uid 0)
	file := filepath.Join(mnt, "acme", "openai")
	for range 2 {
		if out, err := exec.Command("setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", "cat", file).CombinedOutput(); err != nil || string(out) != "sk-report" {
			t.Fatalf("read as uid 4242: %q %v", out, err)
		}
	}
	mount.Process.Signal(syscall.SIGTERM) // its last checkpoint anchors the opens
	if err := waitOrDump(t, mount, 30*time.Second, stderr); err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Chain   string
		Readers []struct {
			UID   *uint32
			Opens int
			Node  string
		}
	}
	if err := json.Unmarshal([]byte(c.must(0, "", "audit", "report", "--key", "acme/openai", "-o", "json").stdout), &rep); err != nil {
		t.Fatal(err)
	}
	opens := map[uint32]int{}
	for _, r := range rep.Readers {
		if r.UID != nil {
			opens[*r.UID] += r.Opens
		}
	}
	if rep.Chain != "verified" || opens[0] < 1 || opens[4242] != 2 {
		t.Fatalf("report: chain %q, opens by uid %v", rep.Chain, opens)
	}
	table := c.must(0, "", "audit", "report", "--key", "acme/openai").stdout
	if !strings.Contains(table, "audit chain: verified") || !strings.Contains(table, "4242") {
		t.Errorf("report table:\n%s", table)
	}
}

// TestAuditRequired: with the audit log on a full file system, --audit-required
// fails reads with EIO; without it reads work.
func TestAuditRequired(t *testing.T) {
	fusetest.Require(t)
	work := t.TempDir()
	c := &cli{t: t, state: filepath.Join(work, "state"), tpm: "sim"}
	c.must(0, "", "init")
	c.must(0, "sk-required", "put", "acme/openai")
	small := smallTmpfs(t)
	for required, wantErr := range map[bool]bool{false: false, true: true} {
		logPath := filepath.Join(small, "audit-"+strconv.FormatBool(required)+".log")
		args := []string{"mount", "--audit-log", logPath}
		if required {
			args = append(args, "--audit-required")
		}
		mnt := filepath.Join(work, "keys-"+strconv.FormatBool(required))
		cmd := c.keyfsCmd(append(args, mnt)...)
		logs := startChild(t, cmd)
		file := filepath.Join(mnt, "acme", "openai")
		if !poll(10*time.Second, func() bool { return exists(file) }) {
			t.Fatalf("mount not up: %s", logs.String())
		}
		undo := fillUp(t, small, logPath)
		_, err := os.ReadFile(file)
		if gotErr := err != nil; gotErr != wantErr || (wantErr && !strings.Contains(err.Error(), "input/output error")) {
			t.Errorf("audit-required=%v on a full audit file system: read error %v", required, err)
		}
		// Without --audit-required the event is written after the reply.
		logged(logs, "audit event not written")
		undo()
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if !strings.Contains(logs.String(), "audit event not written") {
			t.Errorf("audit-required=%v: the first failure was not logged:\n%s", required, logs.String())
		}
	}
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// smallTmpfs mounts a 64 KB tmpfs for the test, to be filled up.
func smallTmpfs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64k"); err != nil {
		t.Fatalf("mount a small tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// fillUp fills the file system at dir, and the last page of the file at
// log, so the next append to log fails; undo frees the space.
func fillUp(t *testing.T, dir, log string) (undo func()) {
	t.Helper()
	filler := filepath.Join(dir, "filler")
	os.WriteFile(filler, make([]byte, 128<<10), 0o600)
	if lf, err := os.OpenFile(log, os.O_WRONLY|os.O_APPEND, 0); err == nil {
		for {
			if _, err := lf.Write(make([]byte, 512)); err != nil {
				break
			}
		}
		lf.Close()
	}
	return func() { os.Remove(filler) }
}

// TestServeAuditMetricsAndExport: serve writes every audit event to stdout
// too (--audit-stdout), and with its audit log on a full file system counts
// each lost event in keyfs_audit_write_failures_total: reads are served
// without --audit-required and fail with EIO with it.
func TestServeAuditMetricsAndExport(t *testing.T) {
	fusetest.Require(t)
	for _, required := range []bool{false, true} {
		tmp := t.TempDir()
		c := &cli{t: t, state: filepath.Join(tmp, "state"), tpm: "sim"}
		c.must(0, "", "init")
		c.must(0, "sk-export", "put", "acme/openai")
		small := smallTmpfs(t)
		logPath := filepath.Join(small, "audit.log")
		kubelet := filepath.Join(tmp, "kubelet")
		sock := filepath.Join(tmp, "csi.sock")
		metrics := freeAddr(t)
		args := []string{"serve", "--csi-endpoint", "unix://" + sock, "--node-id", "node-1", "--kubelet-dir", kubelet,
			"--kubelet-registration-dir", "", "--metrics-addr", metrics, "--audit-log", logPath, "--audit-stdout"}
		if required {
			args = append(args, "--audit-required")
		}
		cmd := c.keyfsCmd(args...)
		var stdout syncbuf.Buffer
		cmd.Stdout = &stdout
		logs := startChild(t, cmd)
		failures := regexp.MustCompile(`(?m)^keyfs_audit_write_failures_total (\S+)$`)
		metric := func() string {
			b := metricsText(metrics)
			if b == "" {
				return ""
			}
			if m := failures.FindStringSubmatch(b); m != nil {
				return m[1]
			}
			return "none"
		}
		if !poll(15*time.Second, func() bool { return metric() != "" }) {
			t.Fatalf("serve not up: %s", logs.String())
		}
		target := filepath.Join(kubelet, "pods", "uid-1", "volumes", "kubernetes.io~csi", "keys", "mount")
		_, err := csi.NewNodeClient(dialUnix(t, sock)).NodePublishVolume(context.Background(), &csi.NodePublishVolumeRequest{
			VolumeId: "v1", TargetPath: target, Readonly: true,
			VolumeCapability: &csi.VolumeCapability{
				AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
				AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY},
			},
			VolumeContext: map[string]string{"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.namespace": "acme",
				"csi.storage.k8s.io/pod.name": "app", "csi.storage.k8s.io/pod.uid": "uid-1", "csi.storage.k8s.io/serviceAccount.name": "default"},
		})
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(target, "acme", "openai")
		if b, err := os.ReadFile(file); err != nil || string(b) != "sk-export" {
			t.Fatalf("read: %q %v", b, err)
		}
		// Events are written just after the reply (to the file, then to
		// stdout): wait for the open's.
		openEvent := regexp.MustCompile(`"event":"open"[^\n]*"pod_uid":"uid-1"`)
		if !poll(5*time.Second, func() bool { return openEvent.MatchString(stdout.String()) }) {
			t.Fatalf("the open event is not on stdout:\n%s", stdout.String())
		}
		undo := fillUp(t, small, logPath)
		for i := range 3 {
			_, err := os.ReadFile(file)
			if required != (err != nil) || (required && !strings.Contains(err.Error(), "input/output error")) {
				t.Errorf("required=%v: read %d on a full audit file system: %v", required, i, err)
			}
		}
		// Without --audit-required the failures happen after the replies.
		poll(5*time.Second, func() bool { return metric() == "3" })
		if got := metric(); got != "3" {
			t.Errorf("required=%v: keyfs_audit_write_failures_total = %s, want 3", required, got)
		}
		cmd.Process.Signal(syscall.SIGTERM)
		waitOrDump(t, cmd, 30*time.Second, logs)
		undo()
	}
}
