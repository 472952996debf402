package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/internal/syncbuf"
)

// startMount runs `keyfs mount` and waits until wantFile reads.
func (c *cli) startMount(mnt, wantFile string) (*exec.Cmd, *syncbuf.Buffer) {
	c.t.Helper()
	c.t.Cleanup(func() { // runs after startChild's: the child is gone
		if fusetest.MustMounted(c.t, mnt) {
			syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
	})
	cmd := c.keyfsCmd("mount", mnt)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // killGroup: supervisor and worker
	stderr := startChild(c.t, cmd)
	if !poll(10*time.Second, func() bool { _, err := os.ReadFile(filepath.Join(mnt, wantFile)); return err == nil }) {
		c.t.Fatalf("keyfs mount did not serve %s within 10s: %s", wantFile, stderr.String())
	}
	return cmd, stderr
}

func TestMountLifecycle(t *testing.T) {
	fusetest.Require(t)
	c := &cli{t: t, state: filepath.Join(t.TempDir(), "state"), tpm: "sim"}
	mnt := filepath.Join(t.TempDir(), "keys")
	c.must(0, "", "init")
	c.must(0, "sk-mount-1", "put", "acme/openai")

	cmd, stderr := c.startMount(mnt, "acme/openai")
	if b, _ := os.ReadFile(filepath.Join(mnt, "acme/openai")); string(b) != "sk-mount-1" {
		t.Fatalf("read %q", b)
	}
	// SIGTERM: a clean exit and no mount left.
	cmd.Process.Signal(syscall.SIGTERM)
	if err := waitOrDump(t, cmd, 30*time.Second, stderr); err != nil {
		t.Fatalf("keyfs mount after SIGTERM: %v", err)
	}
	if fusetest.MustMounted(t, mnt) {
		t.Fatal("mount left behind after SIGTERM")
	}

	// kill -9 of the worker: its supervisor starts another, which takes
	// the mount over; a reader every 20 ms for 5 s sees no failure.
	cmd, stderr = c.startMount(mnt, "acme/openai")
	first := workerPID(t, stderr, 0)
	var failed, reads atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if b, err := os.ReadFile(filepath.Join(mnt, "acme/openai")); err != nil || string(b) != "sk-mount-1" {
				failed.Add(1)
				t.Errorf("read across the worker's restart: %q %v", b, err)
			}
			reads.Add(1)
		}
	}()
	time.Sleep(time.Second)
	syscall.Kill(first, syscall.SIGKILL)
	second := workerPID(t, stderr, 1)
	wg.Wait()
	close(stop)
	if failed.Load() > 0 {
		t.Fatalf("%d of %d reads failed across the restart", failed.Load(), reads.Load())
	}
	if syscall.Kill(second, 0) != nil {
		t.Fatalf("the new worker %d is not running: %s", second, stderr.String())
	}
	if !logged(stderr, "resumed=true") {
		t.Errorf("the new worker did not resume the mount: %s", stderr.String())
	}
	if r := c.must(0, "", "audit"); !strings.Contains(r.stdout, "worker 1 after the last one ended (killed by SIGKILL)") {
		t.Errorf("no audit event for the restart:\n%s", r.stdout)
	}
	t.Logf("%d reads across a kill -9 of the worker, 0 failed", reads.Load())
	cmd.Process.Signal(syscall.SIGTERM)
	if err := waitOrDump(t, cmd, 30*time.Second, stderr); err != nil {
		t.Fatal(err)
	}

	// kill -9 of supervisor and worker together leaves a dead mount
	// (ENOTCONN); the next start cleans it.
	cmd, stderr = c.startMount(mnt, "acme/openai")
	killGroup(t, cmd, stderr)
	var st syscall.Statfs_t
	if err := syscall.Statfs(mnt, &st); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("after kill -9, statfs %s = %v, want ENOTCONN (a dead FUSE mount)", mnt, err)
	}
	cmd, stderr = c.startMount(mnt, "acme/openai")
	if !logged(stderr, "detached a keyfs mount") {
		t.Errorf("restart did not report the stale mount it cleaned: %s", stderr.String())
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := waitOrDump(t, cmd, 30*time.Second, stderr); err != nil {
		t.Fatal(err)
	}
	if fusetest.MustMounted(t, mnt) {
		t.Fatal("mount left behind")
	}
	if strings.Contains(stderr.String(), "sk-mount") {
		t.Fatal("keyfs mount logged a value")
	}
}

func TestMountRefusals(t *testing.T) {
	c := &cli{t: t, state: filepath.Join(t.TempDir(), "state"), tpm: "sim"}
	for args, want := range map[[2]string]string{
		{"--mode", "0644"}:          "write or execute bits",
		{"--mode", "0"}:             "lets nobody read",
		{"--tenants", "Bad_Tenant"}: "a tenant is 1-63 characters",
		{"--tenants", "acme,,beta"}: "no empty items",
		{"--keys", "openai,../etc"}: "a key name is 1-63 characters",
	} {
		if r := c.must(exitUsage, "", "mount", args[0], args[1], t.TempDir()); !strings.Contains(r.stderr, want) {
			t.Errorf("mount %s %s: %q lacks %q", args[0], args[1], r.stderr, want)
		}
	}
	if os.Geteuid() == 0 {
		// As a non-root user: a clear permission error.
		cmd := exec.Command(keyfsBin, "mount", t.TempDir())
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != exitPerm || !strings.Contains(string(out), "needs root") {
			t.Fatalf("non-root mount: %v %s", err, out)
		}
	}
}

var auditOpenRow = regexp.MustCompile(`(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d +open +acme/openai +\d+ +\d+ +0 `)

// TestDemo runs the README's demo command's script as a new user would,
// minus the wait for Ctrl-C, twice.
func TestDemo(t *testing.T) {
	fusetest.Require(t)
	for run := range 2 {
		cmd := exec.Command("../../scripts/demo.sh")
		cmd.Env = append(os.Environ(), "KEYFS_BIN="+keyfsBin, "DEMO_ONESHOT=1")
		var buf syncbuf.Buffer
		cmd.Stdout, cmd.Stderr = &buf, &buf
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		err := waitOrDump(t, cmd, time.Minute, &buf)
		out := []byte(buf.String())
		if err != nil {
			t.Fatalf("demo run %d: %v\n%s", run+1, err, out)
		}
		for _, want := range []string{"acme/openai", "beta", "sk-demo-acme-openai-", "Read-only file system", "(nothing found)"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("demo run %d output lacks %q:\n%s", run+1, want, out)
			}
		}
		// The audit table has a row for the cat: event open, the key, a
		// version, a pid and uid 0.
		if !auditOpenRow.Match(out) {
			t.Errorf("demo run %d output has no audit row for the open of acme/openai:\n%s", run+1, out)
		}
	}
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), "keyfs-demo") {
		t.Fatal("the demo left a mount behind")
	}
}

var workerLine = regexp.MustCompile(`msg="worker started" pid=(\d+) restart=(\d+)`)

// workerPID waits for the log line of the nth restart's worker.
func workerPID(t *testing.T, stderr fmt.Stringer, restart int) int {
	t.Helper()
	var pid int
	if !poll(10*time.Second, func() bool {
		for _, m := range workerLine.FindAllStringSubmatch(stderr.String(), -1) {
			if m[2] == strconv.Itoa(restart) {
				pid, _ = strconv.Atoi(m[1])
				return true
			}
		}
		return false
	}) {
		t.Fatalf("no worker %d started: %s", restart, stderr.String())
	}
	return pid
}

// killGroup kills with SIGKILL the supervisor and its worker (startMount
// makes them a process group) and waits until both are gone.
func killGroup(t *testing.T, cmd *exec.Cmd, stderr fmt.Stringer) {
	t.Helper()
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	waitOrDump(t, cmd, 30*time.Second, stderr)
	start := time.Now()
	if !poll(10*time.Second, func() bool { return syscall.Kill(-cmd.Process.Pid, 0) != nil }) {
		t.Fatal("keyfs mount's worker outlived SIGKILL by 10s")
	}
	t.Logf("worker gone %v after its supervisor", time.Since(start))
}

// TestMountKilledWhileStarting: kill -9 of keyfs mount at any moment of
// its start, including while go-fuse's start-up probe holds a file open on
// the new mount, ends the process and leaves a dead mount the next start
// cleans up; never an unkillable process hung on its own mount.
func TestMountKilledWhileStarting(t *testing.T) {
	fusetest.Require(t)
	c := &cli{t: t, state: filepath.Join(t.TempDir(), "state"), tpm: "sim"}
	c.must(0, "", "init")
	c.must(0, "sk-kill", "put", "acme/openai")
	mnt := filepath.Join(t.TempDir(), "keys")
	t.Cleanup(func() { abortFUSE(t, mnt) })
	for run := range 30 {
		cmd := c.keyfsCmd("mount", mnt)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Kill as soon as the mount exists: inside Mount, before it serves.
		for deadline := time.Now().Add(10 * time.Second); !fusetest.MustMounted(t, mnt) && time.Now().Before(deadline); {
			time.Sleep(time.Duration(run%3) * 100 * time.Microsecond)
		}
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		done := make(chan struct{})
		go func() {
			cmd.Wait()
			for syscall.Kill(-cmd.Process.Pid, 0) == nil { // the worker too
				time.Sleep(time.Millisecond)
			}
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			stack, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stack", cmd.Process.Pid))
			abortFUSE(t, mnt)
			<-done
			t.Fatalf("run %d: keyfs mount did not die from SIGKILL within 10s; kernel stack:\n%s", run, stack)
		}
		syscall.Unmount(mnt, syscall.MNT_DETACH)
	}
}

// abortFUSE aborts the FUSE connection of the mount at mnt, if any, and
// detaches it: what frees a process stuck on a dead server.
// The fusectl file system it needs is mounted for the abort only.
func abortFUSE(t *testing.T, mnt string) {
	if !fusetest.MustMounted(t, mnt) {
		return
	}
	const ctl = "/sys/fs/fuse/connections"
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && f[4] == mnt {
			minor := f[2][strings.Index(f[2], ":")+1:]
			if _, err := os.Stat(ctl + "/" + minor); err != nil {
				if err := syscall.Mount("none", ctl, "fusectl", 0, ""); err == nil {
					defer syscall.Unmount(ctl, 0)
				}
			}
			os.WriteFile(ctl+"/"+minor+"/abort", []byte("1"), 0)
		}
	}
	syscall.Unmount(mnt, syscall.MNT_DETACH)
}
