package main

import (
	"context"
	"crypto/tls"
	"embed"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

//go:embed config
var configFS embed.FS

// expand fills ${NAME} from vars; a name not in vars is an error.
func expand(s string, vars map[string]string) (string, error) {
	var missing []string
	out := os.Expand(s, func(k string) string {
		v, ok := vars[k]
		if !ok {
			missing = append(missing, k)
		}
		return v
	})
	if len(missing) > 0 {
		return "", fmt.Errorf("unknown variables %v", missing)
	}
	return out, nil
}

func (h *harness) vars() map[string]string {
	return map[string]string{
		"ROOT":                 h.root,
		"TOOLS_IMAGE":          toolsRef,
		"KUBELET_PORT":         fmt.Sprint(h.ports.Kubelet),
		"KUBELET_HEALTHZ_PORT": fmt.Sprint(h.ports.KubeletHealthz),
		"KUBELET_DIR":          h.kubeletDir(),
		"STATE_DIR":            h.stateDir(),
		"HOLDER_DIR":           h.path("keyfs-holder"),
		"SWTPM_PORT":           fmt.Sprint(h.ports.SWTPM),
		"METRICS_PORT":         fmt.Sprint(h.ports.Metrics),
		"APISERVER_PORT":       fmt.Sprint(h.ports.APIServer),
		"IMAGE":                h.keyfsRef,
		"CGROUP_ROOT":          "/",
	}
}

func (h *harness) writeConfig(name, dest string) error { return h.writeConfigVars(name, dest, nil) }

// writeConfigVars is writeConfig with some variables set otherwise.
func (h *harness) writeConfigVars(name, dest string, set map[string]string) error {
	b, err := configFS.ReadFile("config/" + name)
	if err != nil {
		return err
	}
	vars := h.vars()
	for k, v := range set {
		vars[k] = v
	}
	s, err := expand(string(b), vars)
	if err != nil {
		return fmt.Errorf("config/%s: %w", name, err)
	}
	return os.WriteFile(dest, []byte(s), 0o600)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (h *harness) pickPorts() error {
	seen := map[int]bool{}
	for _, p := range []*int{&h.ports.EtcdClient, &h.ports.EtcdPeer, &h.ports.APIServer, &h.ports.ControllerManager,
		&h.ports.Scheduler, &h.ports.Kubelet, &h.ports.KubeletHealthz, &h.ports.SWTPM, &h.ports.SWTPMCtrl, &h.ports.Metrics} {
		for {
			n, err := freePort()
			if err != nil {
				return err
			}
			if !seen[n] {
				seen[n], *p = true, n
				break
			}
		}
	}
	h.changes.Ports = h.ports
	return h.saveChanges()
}

// clusterUp starts swtpm, etcd, containerd, kube-apiserver,
// kube-controller-manager (DaemonSet and ServiceAccount controllers only),
// kube-scheduler and kubelet, and waits for the node to be Ready.
func (h *harness) clusterUp(ctx context.Context) error {
	if err := h.pickPorts(); err != nil {
		return err
	}
	if err := h.writePKI(); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	for name, dest := range map[string]string{
		"containerd.toml": h.path("containerd.toml"), "kubelet.yaml": h.path("kubelet.yaml"),
		"10-loopback.conflist": h.path("cni", "net.d", "10-loopback.conflist"),
	} {
		if err := h.writeConfig(name, dest); err != nil {
			return err
		}
	}
	pki := h.path("pki")
	loc := "127.0.0.1"
	etcdURL := fmt.Sprintf("http://%s:%d", loc, h.ports.EtcdClient)
	peerURL := fmt.Sprintf("http://%s:%d", loc, h.ports.EtcdPeer)

	if err := h.startProc("swtpm", h.swtpmArgv()); err != nil {
		return err
	}
	if err := h.startProc("etcd", []string{"etcd", "--name=keyfs-e2e", "--data-dir=" + h.path("etcd"),
		"--listen-client-urls=" + etcdURL, "--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL, "--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=keyfs-e2e=" + peerURL}); err != nil {
		return err
	}
	// containerd 1.6 puts its shims' sockets in /run/containerd/s.
	h.changes.MadeRunContainrd = !exists("/run/containerd")
	if err := h.saveChanges(); err != nil {
		return err
	}
	if err := h.startProc("containerd", []string{"containerd", "--config=" + h.path("containerd.toml")}); err != nil {
		return err
	}
	if err := waitFor(ctx, 30*time.Second, "etcd healthy", func() (bool, error) {
		r, err := http.Get(etcdURL + "/health")
		if err != nil {
			return false, nil
		}
		r.Body.Close()
		return r.StatusCode == 200, nil
	}); err != nil {
		return err
	}
	if err := h.startProc("kube-apiserver", []string{filepath.Join(h.k8sBin, "kube-apiserver"),
		"--etcd-servers=" + etcdURL,
		"--bind-address=" + loc, "--advertise-address=" + loc, fmt.Sprintf("--secure-port=%d", h.ports.APIServer),
		"--endpoint-reconciler-type=none",
		"--tls-cert-file=" + pki + "/apiserver.crt", "--tls-private-key-file=" + pki + "/apiserver.key",
		"--client-ca-file=" + pki + "/ca.crt",
		"--kubelet-client-certificate=" + pki + "/admin.crt", "--kubelet-client-key=" + pki + "/admin.key",
		"--kubelet-preferred-address-types=Hostname",
		"--service-account-key-file=" + pki + "/sa.pub", "--service-account-signing-key-file=" + pki + "/sa.key",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-cluster-ip-range=10.0.0.0/24",
		"--authorization-mode=Node,RBAC",
		"--allow-privileged=true", // the keyfs DaemonSet is privileged
		// Without the node lifecycle controller nothing would lift the
		// not-ready taint this plugin puts on a new node.
		"--disable-admission-plugins=TaintNodesByCondition",
		"--enable-priority-and-fairness=false", "--profiling=false"}); err != nil {
		return err
	}
	if err := h.loadImages(ctx, nodeName, h.containerdSock()); err != nil {
		return err
	}
	if err := h.connect(); err != nil {
		return err
	}
	if err := waitFor(ctx, 60*time.Second, "kube-apiserver ready", func() (bool, error) {
		_, err := h.kube.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err == nil, nil
	}); err != nil {
		return err
	}
	h.logf("kube-apiserver ready")
	admin := pki + "/admin.kubeconfig"
	if err := h.startProc("kube-controller-manager", []string{filepath.Join(h.k8sBin, "kube-controller-manager"),
		"--kubeconfig=" + admin, "--authentication-kubeconfig=" + admin, "--authorization-kubeconfig=" + admin,
		"--leader-elect=false", "--controllers=daemonset-controller,serviceaccount-controller,root-ca-certificate-publisher-controller",
		"--root-ca-file=" + pki + "/ca.crt", // for pods' kube-root-ca.crt: cluster mode's keyfs talks to the API
		"--bind-address=" + loc, fmt.Sprintf("--secure-port=%d", h.ports.ControllerManager),
		"--use-service-account-credentials=false", "--profiling=false"}); err != nil {
		return err
	}
	if err := h.startProc("kube-scheduler", []string{filepath.Join(h.k8sBin, "kube-scheduler"),
		"--kubeconfig=" + admin, "--authentication-kubeconfig=" + admin, "--authorization-kubeconfig=" + admin,
		"--leader-elect=false", "--bind-address=" + loc, fmt.Sprintf("--secure-port=%d", h.ports.Scheduler),
		"--profiling=false"}); err != nil {
		return err
	}

	// Host changes kubelet makes, recorded before it starts.
	var err error
	if h.changes.Sysctls, err = readSysctls(); err != nil {
		return err
	}
	h.changes.IPTables = iptablesChains()
	h.changes.MadeVarLibKubelt = !exists("/var/lib/kubelet")
	h.changes.MadeVarLogCont = !exists("/var/log/containers")
	h.changes.KubeletRootBind = true
	if err := h.saveChanges(); err != nil {
		return err
	}
	if err := makeShared(h.kubeletDir()); err != nil {
		h.changes.KubeletRootBind = false
		h.saveChanges()
		return err
	}
	if err := h.startProc("kubelet", []string{filepath.Join(h.k8sBin, "kubelet"),
		"--config=" + h.path("kubelet.yaml"), "--kubeconfig=" + pki + "/kubelet.kubeconfig",
		"--root-dir=" + h.kubeletDir(), "--hostname-override=" + nodeName, "--v=2"}); err != nil {
		return err
	}
	h.nodes = []string{nodeName}
	if err := h.waitNodeReady(ctx, nodeName, "kubelet"); err != nil {
		return err
	}
	for _, c := range []struct {
		name string
		port int
	}{{"kube-controller-manager", h.ports.ControllerManager}, {"kube-scheduler", h.ports.Scheduler}} {
		if err := waitFor(ctx, 30*time.Second, c.name+" healthy", func() (bool, error) {
			if !h.running(c.name) {
				return false, fmt.Errorf("%s exited (see logs/%s.log)", c.name, c.name)
			}
			return healthz(c.port), nil
		}); err != nil {
			return err
		}
	}
	return nil
}

// swtpmArgv runs a node's TPM; node-b's, in its own namespaces, on the
// same port and state path.
func (h *harness) swtpmArgv() []string {
	return []string{"swtpm", "socket", "--tpm2",
		fmt.Sprintf("--server=type=tcp,port=%d,bindaddr=127.0.0.1", h.ports.SWTPM),
		fmt.Sprintf("--ctrl=type=tcp,port=%d,bindaddr=127.0.0.1", h.ports.SWTPMCtrl),
		"--tpmstate=dir=" + h.path("swtpm"), "--flags=not-need-init,startup-clear"}
}

// loadImages waits for node's containerd at sock and imports the images
// (no registry is reachable).
func (h *harness) loadImages(ctx context.Context, node, sock string) error {
	if err := waitFor(ctx, 30*time.Second, node+"'s containerd answering", func() (bool, error) {
		_, err := command("ctr", "--address", sock, "version")
		return err == nil, nil
	}); err != nil {
		return err
	}
	for _, img := range h.images {
		t := time.Now()
		if _, err := command("ctr", "--address", sock, "-n", "k8s.io", "images", "import", img); err != nil {
			return err
		}
		h.logf("imported %s into %s's containerd (%s)", filepath.Base(img), node, since(t))
	}
	return nil
}

// waitNodeReady waits for node's Ready condition while the kubelet the
// harness started as proc runs.
func (h *harness) waitNodeReady(ctx context.Context, node, proc string) error {
	last := "not registered"
	err := waitFor(ctx, 90*time.Second, "node "+node+" Ready", func() (bool, error) {
		if !h.running(proc) {
			return false, fmt.Errorf("%s exited (see logs/%s.log)", proc, proc)
		}
		n, err := h.kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady {
				last = fmt.Sprintf("%s %s: %s", c.Status, c.Reason, c.Message)
				return c.Status == corev1.ConditionTrue, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("%w (Ready: %s)", err, last)
	}
	return nil
}

func healthz(port int) bool {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	r, err := c.Get(fmt.Sprintf("https://127.0.0.1:%d/healthz", port))
	if err != nil {
		return false
	}
	r.Body.Close()
	return r.StatusCode == 200
}

// connect makes the harness's API client: client-go with the admin
// certificate, never a kubectl found on the PATH.
func (h *harness) connect() error {
	pki := h.path("pki")
	ca, err := os.ReadFile(pki + "/ca.crt")
	if err != nil {
		return err
	}
	h.rest = &rest.Config{
		Host: fmt.Sprintf("https://127.0.0.1:%d", h.ports.APIServer),
		TLSClientConfig: rest.TLSClientConfig{
			CAData: ca, CertFile: pki + "/admin.crt", KeyFile: pki + "/admin.key",
		},
		QPS: 50, Burst: 100, Timeout: 30 * time.Second,
	}
	h.kube, err = kubernetes.NewForConfig(h.rest)
	return err
}

// waitFor polls f every 100 ms until it says done, fails, or timeout.
func waitFor(ctx context.Context, timeout time.Duration, what string, f func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		done, err := f()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if done {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not after %s", what, timeout)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// teardown stops everything the run started, by pid, and undoes its host
// changes; with keepLogs (a failed run) ROOT/logs stays for reading.
func (h *harness) teardown(keepLogs bool) error {
	t := time.Now()
	h.logf("tearing down %s", h.root)
	var errs []error
	note := func(err error) {
		if err != nil {
			errs = append(errs, err)
			h.logf("teardown: %v", err)
		}
	}
	// Pods first, while kubelet and the driver run: kubelet unpublishes
	// their volumes.
	if h.kube != nil && h.running("kubelet") && h.running("kube-apiserver") {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		note(h.deleteAllPods(ctx))
		cancel()
	}
	note(h.nodeBDown())
	note(h.stopProc("kubelet", 20*time.Second))
	if h.running("containerd") {
		killTasks(h.containerdSock())
	}
	note(h.stopProc("containerd", 15*time.Second))
	note(h.killStragglers())
	// node-b's namespaces end with their anchor, the last process in them.
	for _, p := range []string{"node-b", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd", "swtpm"} {
		note(h.stopProc(p, 15*time.Second))
	}
	note(unmountUnder(h.root))
	note(removeCgroups(h.changes.NodeBCgroups))
	// kubelet's hard-coded paths outside its root directory.
	links, _ := filepath.Glob("/var/log/containers/*")
	for _, l := range links {
		if dest, err := os.Readlink(l); err == nil && strings.HasPrefix(dest, h.root+"/") {
			note(os.Remove(l))
		}
	}
	if h.changes.MadeVarLogCont {
		os.Remove("/var/log/containers")
	}
	for _, f := range []string{"/var/lib/kubelet/device-plugins/kubelet.sock", "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint"} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			note(err)
		}
	}
	if h.changes.MadeVarLibKubelt {
		os.Remove("/var/lib/kubelet/device-plugins")
		os.Remove("/var/lib/kubelet")
	}
	if h.changes.MadeRunContainrd && len(mountsUnder("/run/containerd")) == 0 {
		note(os.RemoveAll("/run/containerd"))
	}
	if h.changes.Sysctls != nil {
		note(restoreSysctls(h.changes.Sysctls))
	}
	if h.changes.IPTables != nil {
		note(cleanIPTables(h.changes.IPTables))
	}
	if len(errs) > 0 {
		h.logf("teardown incomplete; root %s left as it is", h.root)
		return errors.Join(errs...)
	}
	// Never remove through a mount: unmountUnder checked there is none.
	if keepLogs {
		logs := h.root + "-logs"
		if err := os.Rename(h.path("logs"), logs); err == nil {
			h.logf("logs kept in %s", logs)
		}
	}
	if err := os.RemoveAll(h.root); err != nil {
		return err
	}
	h.logf("teardown done in %s: no process, mount, cgroup or sysctl of this run left", since(t))
	return nil
}

// killTasks kills and deletes every container of the containerd at sock.
func killTasks(sock string) {
	ctr := []string{"--address", sock, "-n", "k8s.io"}
	if out, err := command("ctr", append(ctr, "tasks", "ls", "-q")...); err == nil {
		for _, id := range strings.Fields(out) {
			command("ctr", append(ctr, "tasks", "kill", "-a", "-s", "SIGKILL", id)...)
		}
		time.Sleep(500 * time.Millisecond)
		for _, id := range strings.Fields(out) {
			command("ctr", append(ctr, "tasks", "delete", "-f", id)...)
		}
	}
	if out, err := command("ctr", append(ctr, "containers", "ls", "-q")...); err == nil {
		for _, id := range strings.Fields(out) {
			command("ctr", append(ctr, "containers", "delete", id)...)
		}
	}
}

// killStragglers kills, by pid, what outlives containerd: shims started
// for this root, and processes left in the kubepods cgroups (which held
// none when the harness started).
func (h *harness) killStragglers() error {
	sock := h.containerdSock()
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var pids []string
	for _, f := range cmdlines {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) > 0 && strings.HasPrefix(filepath.Base(args[0]), "containerd-shim") && strings.Contains(string(b), sock) {
			pids = append(pids, filepath.Base(filepath.Dir(f)))
		}
	}
	procs, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	if h.changes.NodeBCgroups {
		nodeB, _ := filepath.Glob("/sys/fs/cgroup/*/node-b")
		procs = append(procs, nodeB...)
	}
	for _, d := range procs {
		filepath.Walk(d, func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.Name() == "cgroup.procs" {
				b, _ := os.ReadFile(p)
				pids = append(pids, strings.Fields(string(b))...)
			}
			return nil
		})
	}
	sort.Strings(pids)
	var last string
	for _, p := range pids {
		if p == last {
			continue
		}
		last = p
		var pid int
		fmt.Sscan(p, &pid)
		if st, err := procStartTime(pid); err == nil {
			h.logf("killing leftover pid %d", pid)
			killPid(pid, st)
		}
	}
	return nil
}
