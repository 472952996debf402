package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// debs are the Debian packages the harness runs: etcd, containerd, runc,
// the CNI loopback plugin, iptables and conntrack (kubelet's host tools),
// swtpm (the node's TPM) and fuse3.
var debs = []string{"etcd-server", "containerd", "runc", "containernetworking-plugins", "iptables", "conntrack", "swtpm", "swtpm-tools", "fuse3"}

func installDeps() error {
	var missing []string
	for _, p := range debs {
		out, _ := exec.Command("dpkg-query", "-W", "-f=${Status}", p).Output()
		if !strings.Contains(string(out), "install ok installed") {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	fmt.Printf("installing Debian packages: %s\n", strings.Join(missing, " "))
	if out, err := command("apt-get", "update", "-qq"); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	cmd := exec.Command("apt-get", append([]string{"install", "-y", "-qq", "--no-install-recommends"}, missing...)...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get install %s: %w\n%s", strings.Join(missing, " "), err, out)
	}
	// Debian's packages may start their own daemons where an init system
	// runs; a daemon the harness did not start makes it refuse below.
	return refuseRealCluster()
}

// refuseRealCluster fails if this machine runs, or ran, a Kubernetes node
// or container runtime the harness did not start: it would share kubelet's
// hard-coded paths (/var/lib/kubelet/device-plugins, /var/log/containers),
// containerd's (/run/containerd) and the kubepods cgroups with it.
func refuseRealCluster() error {
	var why []string
	for _, p := range []string{"/etc/kubernetes", "/run/containerd/containerd.sock", "/var/run/docker.sock", "/run/k3s", "/var/lib/rancher"} {
		if _, err := os.Lstat(p); err == nil {
			why = append(why, p+" exists")
		}
	}
	// /var/lib/kubelet: only an earlier run's device-plugins socket and
	// checkpoint (kubelet always writes them there) may be left.
	if err := filepath.Walk("/var/lib/kubelet", func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		switch p {
		case "/var/lib/kubelet", "/var/lib/kubelet/device-plugins",
			"/var/lib/kubelet/device-plugins/kubelet.sock", "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint":
			return nil
		}
		why = append(why, p+" exists (a kubelet's root directory)")
		return filepath.SkipAll
	}); err != nil && !errors.Is(err, os.ErrNotExist) {
		why = append(why, "/var/lib/kubelet: "+err.Error())
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/comm")
	for _, f := range procs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		comm := strings.TrimSpace(string(b))
		switch comm {
		case "kube-apiserver", "etcd":
			// The unit tests' own (internal/kubetest, all state under
			// /tmp/keyfs-kubetest-*) share no host path with this run.
			if args, _ := os.ReadFile(filepath.Join(filepath.Dir(f), "cmdline")); strings.Contains(string(args), "/keyfs-kubetest-") {
				continue
			}
			why = append(why, fmt.Sprintf("a %s process runs (pid %s)", comm, filepath.Base(filepath.Dir(f))))
		case "kubelet", "containerd", "dockerd", "kube-proxy", "k3s", "k3s-server", "crio":
			why = append(why, fmt.Sprintf("a %s process runs (pid %s)", comm, filepath.Base(filepath.Dir(f))))
		}
	}
	cgs, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	if d := "/sys/fs/cgroup/kubepods.slice"; exists(d) {
		cgs = append(cgs, d)
	}
	for _, d := range cgs {
		if n := cgroupTasks(d); n > 0 {
			why = append(why, fmt.Sprintf("cgroup %s holds %d processes", d, n))
		}
	}
	if len(why) > 0 {
		return fmt.Errorf("this machine has (or had) a Kubernetes node or container runtime that this harness did not start:\n  %s\nRun the e2e on a machine without one; if these are left by a killed e2e run, run `go run ./test/e2e -down ROOT` with its root (/tmp/keyfs-e2e-*)", strings.Join(why, "\n  "))
	}
	return nil
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// cgroupTasks counts the processes in a cgroup tree.
func cgroupTasks(dir string) int {
	n := 0
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() && fi.Name() == "cgroup.procs" {
			b, _ := os.ReadFile(p)
			n += len(strings.Fields(string(b)))
		}
		return nil
	})
	return n
}

// removeCgroups removes the kubepods cgroup trees kubelet made, and
// node-b's when the run made them (deepest first; a cgroup directory is
// removed with rmdir).
func removeCgroups(nodeB bool) error {
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	if nodeB {
		b, _ := filepath.Glob("/sys/fs/cgroup/*/node-b")
		dirs = append(dirs, b...)
	}
	var errs []error
	for _, d := range dirs {
		var all []string
		filepath.Walk(d, func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.IsDir() {
				all = append(all, p)
			}
			return nil
		})
		sort.Sort(sort.Reverse(sort.StringSlice(all)))
		for _, p := range all {
			if err := unix.Rmdir(p); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("rmdir %s: %w", p, err))
				break
			}
		}
	}
	return errors.Join(errs...)
}

// The sysctls kubelet sets at start (setupKernelTunables in
// pkg/kubelet/cm/container_manager_linux.go).
var kubeletSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

func readSysctls() (map[string]string, error) {
	m := map[string]string{}
	for _, k := range kubeletSysctls {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			return nil, err
		}
		m[k] = strings.TrimSpace(string(b))
	}
	return m, nil
}

func restoreSysctls(m map[string]string) error {
	var errs []error
	for k, v := range m {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err == nil && strings.TrimSpace(string(b)) == v {
			continue
		}
		if err := os.WriteFile("/proc/sys/"+k, []byte(v+"\n"), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("sysctl %s=%s: %w", k, v, err))
		}
	}
	return errors.Join(errs...)
}

// iptables chains: kubelet is configured not to make any
// (makeIPTablesUtilChains: false); should one appear all the same, the
// harness removes the KUBE-* chains that were not there before.
var iptTables = []string{"filter", "nat", "mangle"}

func iptablesChains() map[string][]string {
	m := map[string][]string{}
	for _, ipt := range []string{"iptables", "ip6tables"} {
		for _, t := range iptTables {
			out, err := exec.Command(ipt, "-w", "-t", t, "-S").Output()
			if err != nil {
				continue
			}
			var chains []string
			for _, l := range strings.Split(string(out), "\n") {
				if f := strings.Fields(l); len(f) >= 2 && (f[0] == "-N" || f[0] == "-P") {
					chains = append(chains, f[1])
				}
			}
			m[ipt+"/"+t] = chains
		}
	}
	return m
}

func cleanIPTables(before map[string][]string) error {
	var errs []error
	for key, chains := range iptablesChains() {
		ipt, t, _ := strings.Cut(key, "/")
		var added []string
		for _, c := range chains {
			if strings.HasPrefix(c, "KUBE-") && !slices.Contains(before[key], c) {
				added = append(added, c)
			}
		}
		if len(added) == 0 {
			continue
		}
		// Drop the rules that jump to them, then the chains.
		out, _ := exec.Command(ipt, "-w", "-t", t, "-S").Output()
		for _, l := range strings.Split(string(out), "\n") {
			f := strings.Fields(l)
			if len(f) < 2 || f[0] != "-A" {
				continue
			}
			for _, c := range added {
				if slices.Contains(f, c) && f[1] != c {
					f[0] = "-D"
					if _, err := command(ipt, append([]string{"-w", "-t", t}, f...)...); err != nil {
						errs = append(errs, err)
					}
					break
				}
			}
		}
		for _, c := range added {
			command(ipt, "-w", "-t", t, "-F", c)
			if _, err := command(ipt, "-w", "-t", t, "-X", c); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// mount is one line of /proc/self/mountinfo.
type mount struct {
	ID, Parent int
	Point      string
	FSType     string
	Source     string
	Optional   string // shared:N, master:N
}

func mounts() ([]mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ms []mount
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := slices.Index(f, "-")
		if len(f) < 10 || sep < 6 || len(f) < sep+3 {
			continue
		}
		id, _ := strconv.Atoi(f[0])
		parent, _ := strconv.Atoi(f[1])
		ms = append(ms, mount{ID: id, Parent: parent, Point: unescapeMount(f[4]), Optional: strings.Join(f[6:sep], " "), FSType: f[sep+1], Source: f[sep+2]})
	}
	return ms, sc.Err()
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mountsUnder lists the mount points at or under dir, deepest first.
func mountsUnder(dir string) []mount {
	ms, _ := mounts()
	var out []mount
	for _, m := range ms {
		if m.Point == dir || strings.HasPrefix(m.Point, dir+"/") {
			out = append(out, m)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].ID > out[j].ID })
	sort.SliceStable(out, func(i, j int) bool { return strings.Count(out[i].Point, "/") > strings.Count(out[j].Point, "/") })
	return out
}

// unmountUnder detaches every mount at or under dir.
func unmountUnder(dir string) error {
	for range 5 {
		ms := mountsUnder(dir)
		if len(ms) == 0 {
			return nil
		}
		for _, m := range ms {
			unix.Unmount(m.Point, unix.MNT_DETACH)
		}
	}
	if ms := mountsUnder(dir); len(ms) > 0 {
		var ps []string
		for _, m := range ms {
			ps = append(ps, m.Point)
		}
		return fmt.Errorf("still mounted: %s", strings.Join(ps, ", "))
	}
	return nil
}

// makeShared binds dir onto itself and makes it a shared mount, so that
// mounts made under it in a container with Bidirectional propagation (the
// keyfs DaemonSet's FUSE mounts) reach kubelet and the pods. containerd
// refuses Bidirectional propagation from a mount that is not shared.
func makeShared(dir string) error {
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("mount --bind %s %s: %w", dir, dir, err)
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		return fmt.Errorf("mount --make-rshared %s: %w", dir, err)
	}
	return nil
}
