package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// harness is one run: where things are, what it started, what it changed
// on the host (persisted in ROOT/host-changes.json, so that `-down ROOT`
// can undo a run that was killed).
type harness struct {
	repo, cache, root string
	start             time.Time
	clusterStart      time.Duration

	k8sBin   string // kube-apiserver, kube-controller-manager, kube-scheduler, kubelet
	keyfsBin string // static keyfs, for keyfs put / rm on the host
	images   []string
	keyfsRef string // the keyfs image reference, from its tarball

	ports   ports
	changes hostChanges
	rest    *rest.Config
	kube    *kubernetes.Clientset

	mu    sync.Mutex
	procs map[string]*exec.Cmd

	nodes         []string // the nodes started, for the summary
	results       []result
	s             scenarioState
	clusterValues []string // values stored in cluster mode, looked for in etcd
}

// ports are chosen free at start: nothing of the harness listens on a
// fixed port, and everything listens on 127.0.0.1.
type ports struct {
	EtcdClient, EtcdPeer, APIServer, ControllerManager, Scheduler int
	Kubelet, KubeletHealthz, SWTPM, SWTPMCtrl, Metrics            int
}

// hostChanges records what the run did outside its root, to undo it.
type hostChanges struct {
	Root             string              `json:"root"`
	Ports            ports               `json:"ports"`
	Sysctls          map[string]string   `json:"sysctls,omitempty"` // values before kubelet changed them
	KubeletRootBind  bool                `json:"kubelet_root_bind"` // ROOT/kubelet bound onto itself, rshared
	MadeVarLibKubelt bool                `json:"made_var_lib_kubelet"`
	MadeVarLogCont   bool                `json:"made_var_log_containers"`
	MadeRunContainrd bool                `json:"made_run_containerd"`
	NodeBCgroups     bool                `json:"node_b_cgroups"` // /sys/fs/cgroup/*/node-b
	IPTables         map[string][]string `json:"iptables_chains_before,omitempty"`
}

// Paths under the root.
func (h *harness) path(p ...string) string { return filepath.Join(append([]string{h.root}, p...)...) }
func (h *harness) kubeletDir() string      { return h.path("kubelet") }
func (h *harness) stateDir() string        { return h.path("keyfs-state") }
func (h *harness) containerdSock() string  { return h.path("containerd", "containerd.sock") }

const nodeName = "localhost" // resolves to 127.0.0.1 wherever this runs: the API server reaches kubelet by it

func (h *harness) logf(format string, a ...any) {
	fmt.Printf("[%6.1fs] %s\n", time.Since(h.start).Seconds(), fmt.Sprintf(format, a...))
}

func (h *harness) makeRoot(root string) error {
	var err error
	if root == "" {
		root, err = os.MkdirTemp("", "keyfs-e2e-")
	} else {
		err = os.Mkdir(root, 0o700)
	}
	if err != nil {
		return err
	}
	if root, err = filepath.Abs(root); err != nil {
		return err
	}
	// Symlinks in the root would make kubelet's and the driver's paths
	// differ from /proc/self/mountinfo's.
	if root, err = filepath.EvalSymlinks(root); err != nil {
		return err
	}
	h.root = root
	h.changes.Root = root
	for _, d := range []string{"bin", "logs", "pids", "pki", "kubelet", "keyfs-state", "swtpm", "etcd", "pod-logs", "cni/net.d", "containerd", "volume-plugins"} {
		if err := os.MkdirAll(h.path(d), 0o700); err != nil {
			return err
		}
	}
	if err := os.Chmod(h.kubeletDir(), 0o750); err != nil {
		return err
	}
	h.logf("root %s", root)
	return h.saveChanges()
}

func (h *harness) saveChanges() error {
	b, err := json.MarshalIndent(h.changes, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(h.path("host-changes.json"), b, 0o600)
}

// loadHarness reads a root left by -keep or by a killed run.
func loadHarness(root string) (*harness, error) {
	b, err := os.ReadFile(filepath.Join(root, "host-changes.json"))
	if err != nil {
		return nil, fmt.Errorf("%s is not a keyfs e2e root: %w", root, err)
	}
	h := &harness{start: time.Now()}
	if err := json.Unmarshal(b, &h.changes); err != nil {
		return nil, err
	}
	if h.changes.Root != filepath.Clean(root) {
		abs, _ := filepath.Abs(root)
		if h.changes.Root != abs {
			return nil, fmt.Errorf("%s records root %s", root, h.changes.Root)
		}
	}
	h.root = h.changes.Root
	h.ports = h.changes.Ports
	if err := h.connect(); err != nil {
		h.logf("no API client (%v): tearing down without deleting pods first", err)
	}
	return h, nil
}

// startProc starts a long-running process in its own process group, output
// to ROOT/logs/NAME.log, and records its pid and start time.
func (h *harness) startProc(name string, argv []string, env ...string) error {
	logf, err := os.OpenFile(h.path("logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	logf.Close()
	st, err := procStartTime(cmd.Process.Pid)
	if err != nil {
		return err
	}
	if err := os.WriteFile(h.path("pids", name), fmt.Appendf(nil, "%d %d\n", cmd.Process.Pid, st), 0o600); err != nil {
		return err
	}
	h.mu.Lock()
	if h.procs == nil {
		h.procs = map[string]*exec.Cmd{}
	}
	h.procs[name] = cmd
	h.mu.Unlock()
	go cmd.Wait() // reap
	return nil
}

// running says whether the process NAME the harness started is alive.
func (h *harness) running(name string) bool {
	pid, st, err := readPidFile(h.path("pids", name))
	return err == nil && alive(pid, st)
}

// stopProc stops the process NAME (and its process group) by its recorded
// pid: SIGTERM, then SIGKILL after grace.
func (h *harness) stopProc(name string, grace time.Duration) error {
	f := h.path("pids", name)
	pid, st, err := readPidFile(f)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if alive(pid, st) {
		syscall.Kill(-pid, syscall.SIGTERM)
		deadline := time.Now().Add(grace)
		for alive(pid, st) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if alive(pid, st) {
			h.logf("%s (pid %d) did not stop in %s: SIGKILL", name, pid, grace)
			syscall.Kill(-pid, syscall.SIGKILL)
			for i := 0; alive(pid, st) && i < 50; i++ {
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	if alive(pid, st) {
		return fmt.Errorf("%s (pid %d) survived SIGKILL", name, pid)
	}
	return os.Remove(f)
}

func readPidFile(f string) (pid int, start uint64, err error) {
	b, err := os.ReadFile(f)
	if err != nil {
		return 0, 0, err
	}
	_, err = fmt.Sscan(string(b), &pid, &start)
	return pid, start, err
}

// procStartTime is field 22 of /proc/PID/stat: with the pid, it names one
// process, never a later one that reused the pid.
func procStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	// f[0] is field 3 (state); field 22 is f[19].
	return strconv.ParseUint(f[19], 10, 64)
}

func alive(pid int, start uint64) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && len(s) > i+2 && s[i+2] == 'Z' {
		return false
	}
	st, err := procStartTime(pid)
	return err == nil && st == start
}

// command runs a short command, returning its combined output in the error.
func command(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func killPid(pid int, start uint64) {
	if alive(pid, start) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}
