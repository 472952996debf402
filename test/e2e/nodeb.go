package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"golang.org/x/sys/unix"
)

// node-b is a second node on this machine: its own swtpm, containerd and
// kubelet in a mount and network namespace of their own (a kubelet kills
// pods and pod cgroups it does not know, so nothing may be shared). In
// its mount namespace node-b's directories are bound over node-a's paths
// (ROOT/kubelet, ROOT/keyfs-state, ROOT/containerd, /var/lib/kubelet,
// /run/containerd, …), so that the same manifests, the same hostPaths and
// the same configuration files serve both nodes; in its network namespace
// the same ports are free again. Its pods' cgroups live under /node-b.
// The only way out is the API server's port, forwarded by the harness.
const nodeBName = "node-b"

// nodeBDirs are bound, in node-b's mount namespace, from ROOT/node-b/DIR
// over ROOT/DIR; nodeBHostDirs from ROOT/node-b/NAME over the host path
// kubelet and containerd hard-code (each exists by then: node-a's kubelet
// and containerd made them).
var (
	nodeBDirs     = []string{"kubelet", "keyfs-state", "keyfs-holder", "containerd", "pod-logs", "swtpm", "volume-plugins"}
	nodeBHostDirs = map[string]string{"var-lib-kubelet": "/var/lib/kubelet", "var-log-containers": "/var/log/containers", "run-containerd": "/run/containerd"}
)

// nodeBAddr is node-b's InternalIP: on a veth pair whose two ends are both
// inside its network namespace (kubelet needs a non-loopback address on
// the interface of a default route; nothing outside can reach it).
const nodeBAddr = "192.0.2.2/24"

func (h *harness) nodeBPath(p ...string) string {
	return h.path(append([]string{"node-b"}, p...)...)
}

func (h *harness) nodeBContainerdSock() string { return h.nodeBPath("containerd", "containerd.sock") }

// nodeBCgroups are the cgroup v1 hierarchies given a /node-b cgroup.
func nodeBCgroups() []string {
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*")
	var out []string
	for _, d := range dirs {
		if fi, err := os.Lstat(d); err != nil || !fi.IsDir() || filepath.Base(d) == "unified" {
			continue
		}
		if exists(filepath.Join(d, "cgroup.procs")) {
			out = append(out, filepath.Join(d, "node-b"))
		}
	}
	return out
}

// nsenter is argv run in node-b's namespaces: nsenter execs it (no fork
// for mount and network namespaces), so the pid recorded is its own.
func (h *harness) nsenter(argv ...string) ([]string, error) {
	pid, _, err := readPidFile(h.path("pids", "node-b"))
	if err != nil {
		return nil, fmt.Errorf("node-b's namespaces: %w", err)
	}
	return append([]string{"nsenter", "--target", strconv.Itoa(pid), "--mount", "--net", "--"}, argv...), nil
}

// nodeBUp starts node-b and waits for it to be Ready.
func (h *harness) nodeBUp(ctx context.Context) error {
	for _, d := range nodeBDirs {
		if err := os.MkdirAll(h.nodeBPath(d), 0o700); err != nil {
			return err
		}
	}
	for d := range nodeBHostDirs {
		if err := os.MkdirAll(h.nodeBPath(d), 0o700); err != nil {
			return err
		}
	}
	if err := os.Chmod(h.nodeBPath("kubelet"), 0o750); err != nil {
		return err
	}
	h.changes.NodeBCgroups = true
	if err := h.saveChanges(); err != nil {
		return err
	}
	for _, d := range nodeBCgroups() {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("cgroup for node-b: %w", err)
		}
		if strings.Contains(d, "/cpuset/") {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				b, err := os.ReadFile(filepath.Join(filepath.Dir(d), f))
				if err != nil {
					return err
				}
				if err := os.WriteFile(filepath.Join(d, f), b, 0o644); err != nil {
					return fmt.Errorf("cgroup for node-b: %s: %w", f, err)
				}
			}
		}
	}
	// The namespaces' anchor: everything of node-b is nsentered into it.
	if err := h.startProc("node-b", []string{"unshare", "--mount", "--net", "--propagation", "private", "sleep", "infinity"}); err != nil {
		return err
	}
	if err := waitFor(ctx, 10*time.Second, "node-b's namespaces", func() (bool, error) {
		pid, _, err := readPidFile(h.path("pids", "node-b"))
		if err != nil {
			return false, err
		}
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		return strings.TrimSpace(string(b)) == "sleep", nil
	}); err != nil {
		return err
	}
	script := []string{
		"set -eu",
		"ip link set lo up",
		"ip link add keyfs0 type veth peer name keyfs1",
		"ip addr add " + nodeBAddr + " dev keyfs0",
		"ip link set keyfs0 up", "ip link set keyfs1 up",
		"ip route add default dev keyfs0",
	}
	// node-a's shared bind of ROOT/kubelet (and its pods' mounts) copied
	// into this namespace go first: containerd checks the propagation of
	// the lowest mount at a path, not of the one on top.
	script = append(script, fmt.Sprintf("umount -R %q", h.kubeletDir()))
	for _, d := range nodeBDirs {
		script = append(script, fmt.Sprintf("mount --bind %q %q", h.nodeBPath(d), h.path(d)))
	}
	script = append(script, fmt.Sprintf("mount --make-rshared %q", h.kubeletDir()))
	for d, host := range nodeBHostDirs {
		script = append(script, fmt.Sprintf("mount --bind %q %q", h.nodeBPath(d), host))
	}
	// kubelet looks its node name up: from a file at once, where DNS,
	// unreachable from here, would take 10 s and kubelet's CSINode set-up
	// would give up on the node it had not registered yet.
	hosts := "127.0.0.1 localhost\n::1 localhost\n" + strings.Split(nodeBAddr, "/")[0] + " " + nodeBName + "\n"
	if err := os.WriteFile(h.nodeBPath("hosts"), []byte(hosts), 0o644); err != nil {
		return err
	}
	script = append(script, fmt.Sprintf("mount --bind %q /etc/hosts", h.nodeBPath("hosts")))
	argv, err := h.nsenter("sh", "-c", strings.Join(script, "\n"))
	if err != nil {
		return err
	}
	if _, err := command(argv[0], argv[1:]...); err != nil {
		return fmt.Errorf("node-b's namespaces: %w", err)
	}
	pid, _, _ := readPidFile(h.path("pids", "node-b"))
	if err := forwardInto(pid, h.ports.APIServer); err != nil {
		return fmt.Errorf("forward the API server into node-b: %w", err)
	}
	if err := h.writeConfigVars("kubelet.yaml", h.path("kubelet-b.yaml"), map[string]string{"CGROUP_ROOT": "/node-b"}); err != nil {
		return err
	}

	start := func(name string, argv ...string) error {
		a, err := h.nsenter(argv...)
		if err != nil {
			return err
		}
		return h.startProc(name, a)
	}
	if err := start("node-b-swtpm", h.swtpmArgv()...); err != nil {
		return err
	}
	if err := start("node-b-containerd", "containerd", "--config="+h.path("containerd.toml")); err != nil {
		return err
	}
	if err := h.loadImages(ctx, nodeBName, h.nodeBContainerdSock()); err != nil {
		return err
	}
	if err := start("node-b-kubelet", filepath.Join(h.k8sBin, "kubelet"),
		"--config="+h.path("kubelet-b.yaml"), "--kubeconfig="+h.path("pki", "kubelet-b.kubeconfig"),
		"--root-dir="+h.kubeletDir(), "--hostname-override="+nodeBName, "--v=2"); err != nil {
		return err
	}
	h.nodes = append(h.nodes, nodeBName)
	return h.waitNodeReady(ctx, nodeBName, "node-b-kubelet")
}

// nodeBDown stops what nodeBUp started, by pid; node-b's namespaces (and
// every mount in them) go with their last process.
func (h *harness) nodeBDown() error {
	errs := []error{h.stopProc("node-b-kubelet", 20*time.Second)}
	if h.running("node-b-containerd") {
		killTasks(h.nodeBContainerdSock())
	}
	errs = append(errs, h.stopProc("node-b-containerd", 15*time.Second), h.stopProc("node-b-swtpm", 15*time.Second))
	return errors.Join(errs...)
}

// nodeBRoot is node-b's root directory, as seen through its mount namespace.
func (h *harness) nodeBRoot() (string, error) {
	pid, st, err := readPidFile(h.path("pids", "node-b"))
	if err != nil || !alive(pid, st) {
		return "", fmt.Errorf("node-b is not running: %v", err)
	}
	return fmt.Sprintf("/proc/%d/root", pid), nil
}

// forwardInto listens on 127.0.0.1:port in the network namespace of pid
// and forwards every connection to 127.0.0.1:port here, for as long as
// the harness runs.
func forwardInto(pid, port int) error {
	type res struct {
		l   net.Listener
		err error
	}
	c := make(chan res, 1)
	// On its own locked thread: if the thread cannot go back to this
	// namespace, the goroutine exits locked and Go ends the thread.
	go func() {
		runtime.LockOSThread()
		own, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			c <- res{err: err}
			return
		}
		defer own.Close()
		ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			c <- res{err: err}
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			c <- res{err: fmt.Errorf("setns: %w", err)}
			return
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err2 := unix.Setns(int(own.Fd()), unix.CLONE_NEWNET); err2 != nil {
			if l != nil {
				l.Close()
			}
			c <- res{err: fmt.Errorf("setns back: %w", err2)}
			return
		}
		runtime.UnlockOSThread()
		c <- res{l, err}
	}()
	r := <-c
	if r.err != nil {
		return r.err
	}
	go func() {
		for {
			in, err := r.l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				out, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
				if err != nil {
					return
				}
				defer out.Close()
				done := make(chan struct{})
				go func() {
					io.Copy(out, in)
					out.(*net.TCPConn).CloseWrite()
					close(done)
				}()
				io.Copy(in, out)
				in.(*net.TCPConn).CloseWrite()
				<-done
			}()
		}
	}()
	return nil
}

// nodeBLog is a container's log on node-b, read from its log file: the
// API server cannot reach node-b's kubelet (it listens in node-b's
// network namespace). tail > 0 keeps the last lines.
func (h *harness) nodeBLog(p *corev1.Pod, container string, previous bool, tail int) ([]byte, error) {
	files, _ := filepath.Glob(h.nodeBPath("pod-logs", fmt.Sprintf("%s_%s_%s", p.Namespace, p.Name, p.UID), container, "*.log"))
	sort.Slice(files, func(i, j int) bool {
		a, _ := strconv.Atoi(strings.TrimSuffix(filepath.Base(files[i]), ".log"))
		b, _ := strconv.Atoi(strings.TrimSuffix(filepath.Base(files[j]), ".log"))
		return a < b
	})
	if previous {
		if len(files) < 2 {
			return nil, errors.New("no previous container log")
		}
		files = files[:len(files)-1]
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no log of container %s of pod %s/%s on node-b yet", container, p.Namespace, p.Name)
	}
	f, err := os.Open(files[len(files)-1])
	if err != nil {
		return nil, err
	}
	defer f.Close()
	// CRI log lines: TIME STREAM TAG CONTENT, TAG P for a partial line.
	var lines []string
	var partial strings.Builder
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), " ", 4)
		if len(parts) < 3 {
			continue
		}
		content := ""
		if len(parts) == 4 {
			content = parts[3]
		}
		partial.WriteString(content)
		if parts[2] == "P" {
			continue
		}
		lines = append(lines, partial.String())
		partial.Reset()
	}
	if tail > 0 && len(lines) > tail {
		lines = lines[len(lines)-tail:]
	}
	var b bytes.Buffer
	for _, l := range lines {
		b.WriteString(l + "\n")
	}
	return b.Bytes(), sc.Err()
}

// podLog is a container's log: through the API server's log endpoint
// (which kubelet serves), or from the file on node-b.
func (h *harness) podLog(ctx context.Context, p *corev1.Pod, container string, previous bool, tail int) ([]byte, error) {
	if p.Spec.NodeName == nodeBName {
		return h.nodeBLog(p, container, previous, tail)
	}
	o := &corev1.PodLogOptions{Container: container, Previous: previous}
	if tail > 0 {
		o.TailLines = ptr(int64(tail))
	}
	return h.kube.CoreV1().Pods(p.Namespace).GetLogs(p.Name, o).DoRaw(ctx)
}
