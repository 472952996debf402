// Command benchcluster prints cluster-mode figures against a real etcd and
// kube-apiserver (internal/kubetest) and real keyfs daemons with real FUSE
// mounts: enrollment time, put on the API → read on each of two nodes (p50,
// p99), and a daemon's start time and memory with many SealedKeys, then
// its memory once it has served each of them. Figures, never pass/fail.
// Needs root, /dev/fuse, etcd and the cached kube-apiserver (scripts/deps.sh
// test).
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/keyfs/keyfs/internal/kubetest"
	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/kubestore"
	"github.com/keyfs/keyfs/test/internal/proc"
)

var (
	puts    = flag.Int("puts", 100, "puts timed for the put → read figure")
	tenants = flag.Int("tenants", 10000, "tenants of the scale figure")
	keysPer = flag.Int("keys", 3, "keys per tenant of the scale figure")
	verbose = flag.Bool("v", false, "print the scale daemon's log (run with GODEBUG=gctrace=1 for its heap)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "benchcluster:", err)
		os.Exit(1)
	}
}

type daemon struct {
	name, state, mnt string
	cmd              *exec.Cmd
	log              *bytes.Buffer
	mu               *sync.Mutex
}

func (d *daemon) logged(s string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return strings.Contains(d.log.String(), s)
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func run() error {
	work, err := os.MkdirTemp("", "keyfs-benchcluster-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	bin := filepath.Join(work, "keyfs")
	if out, err := exec.Command("go", "build", "-tags", "simulator", "-o", bin, "./cmd/keyfs").CombinedOutput(); err != nil {
		return fmt.Errorf("build keyfs: %w\n%s", err, out)
	}
	t := time.Now()
	k, err := kubetest.Run()
	if err != nil {
		return err
	}
	defer k.Stop()
	fmt.Printf("etcd and kube-apiserver %s up in %s\n", "v1.33.13", time.Since(t).Round(10*time.Millisecond))
	ns, err := k.NewNamespace()
	if err != nil {
		return err
	}
	var daemons []*daemon
	defer func() {
		for _, d := range daemons {
			d.cmd.Process.Signal(syscall.SIGTERM)
			d.cmd.Wait()
			syscall.Unmount(d.mnt, syscall.MNT_DETACH)
		}
	}()
	keyfs := func(env []string, stdin string, args ...string) error {
		cmd := exec.Command(bin, args...)
		cmd.Env, cmd.Stdin = env, strings.NewReader(stdin)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("keyfs %s: %w: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	base := append(os.Environ(), "KEYFS_STORE=kubernetes", "KUBECONFIG="+k.Kubeconfig, "KEYFS_TPM=sim")
	start := func(name, namespace, state string) (*daemon, error) {
		d := &daemon{name: name, state: state, mnt: filepath.Join(work, name+"-keys"), log: &bytes.Buffer{}, mu: &sync.Mutex{}}
		if _, err := os.Stat(filepath.Join(state, "master.sealed")); err != nil {
			if err := keyfs(append(base, "KEYFS_STATE="+state), "", "init"); err != nil {
				return nil, err
			}
		}
		d.cmd = exec.Command(bin, "mount", d.mnt)
		d.cmd.Env = append(base, "KEYFS_STATE="+state, "KEYFS_NAMESPACE="+namespace, "NODE_NAME="+name)
		d.cmd.Stderr = lockedWriter{d.mu, d.log}
		if err := d.cmd.Start(); err != nil {
			return nil, err
		}
		daemons = append(daemons, d)
		return d, nil
	}
	wait := func(d time.Duration, cond func() bool) bool {
		for end := time.Now().Add(d); !cond(); time.Sleep(time.Millisecond) {
			if time.Now().After(end) {
				return false
			}
		}
		return true
	}
	env := append(base, "KEYFS_NAMESPACE="+ns, "KEYFS_STATE="+filepath.Join(work, "admin"))

	a, err := start("node-a", ns, filepath.Join(work, "node-a"))
	if err != nil {
		return err
	}
	if !wait(30*time.Second, func() bool { return a.logged("serving keys") }) {
		return fmt.Errorf("node-a did not serve:\n%s", a.log)
	}
	b, err := start("node-b", ns, filepath.Join(work, "node-b"))
	if err != nil {
		return err
	}
	if !wait(30*time.Second, func() bool { return b.logged("waiting for enrollment") }) {
		return fmt.Errorf("node-b did not wait for enrollment:\n%s", b.log)
	}
	t = time.Now()
	if err := keyfs(env, "", "node", "approve", "node-b"); err != nil {
		return err
	}
	if !wait(30*time.Second, func() bool { return b.logged("serving keys") }) {
		return fmt.Errorf("node-b not enrolled:\n%s", b.log)
	}
	fmt.Printf("enrollment: node-b serves %s after keyfs node approve (the issuer polls every second)\n", time.Since(t).Round(time.Millisecond))

	c, err := kubestore.New(k.Config("admin"), ns)
	if err != nil {
		return err
	}
	_, pub, err := c.Cluster()
	if err != nil {
		return err
	}
	lat := map[string][]time.Duration{}
	for i := range *puts {
		v := fmt.Sprintf("sk-bench-%d-%d", i, time.Now().UnixNano())
		if _, err := c.Put("acme", "openai", func(ver uint64) (*keystore.Record, error) {
			return keystore.Seal(pub, "acme", "openai", ver, []byte(v))
		}); err != nil {
			return err
		}
		t := time.Now()
		for _, d := range []*daemon{a, b} {
			if !wait(10*time.Second, func() bool { got, _ := os.ReadFile(filepath.Join(d.mnt, "acme", "openai")); return string(got) == v }) {
				return fmt.Errorf("put %d did not reach %s within 10 s", i, d.name)
			}
			lat[d.name] = append(lat[d.name], time.Since(t))
		}
	}
	for _, n := range []string{"node-a", "node-b"} {
		l := lat[n]
		slices.Sort(l)
		fmt.Printf("put on the API → read on %s (%d puts): p50 %s, p99 %s, max %s\n", n, len(l), l[len(l)/2].Round(100*time.Microsecond), l[len(l)*99/100].Round(100*time.Microsecond), l[len(l)-1].Round(100*time.Microsecond))
	}

	// Scale: many SealedKeys, one daemon starting on them.
	big, err := k.NewNamespace()
	if err != nil {
		return err
	}
	bc, err := kubestore.New(k.Config("admin"), big)
	if err != nil {
		return err
	}
	t = time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for range 16 {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= *tenants**keysPer {
					return
				}
				tenant, name := "t"+strconv.Itoa(i / *keysPer), "key"+strconv.Itoa(i%*keysPer)
				r, err := keystore.Seal(pub, tenant, name, 1, []byte("sk-scale"))
				if err == nil {
					err = bc.Create(r)
				}
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		return err
	}
	n := *tenants * *keysPer
	fmt.Printf("stored %d SealedKeys (%d tenants × %d) in %s\n", n, *tenants, *keysPer, time.Since(t).Round(100*time.Millisecond))
	// node-c holds the cluster master: a copy of node-a's state (the
	// simulator's fixed seed makes its TPM the same).
	cState := filepath.Join(work, "node-c")
	if out, err := exec.Command("cp", "-a", a.state, cState).CombinedOutput(); err != nil {
		return fmt.Errorf("copy state: %w: %s", err, out)
	}
	os.RemoveAll(filepath.Join(cState, "audit.log"))
	t = time.Now()
	d, err := start("node-c", big, cState)
	if err != nil {
		return err
	}
	last := filepath.Join(d.mnt, "t"+strconv.Itoa(*tenants-1), "key"+strconv.Itoa(*keysPer-1))
	if !wait(120*time.Second, func() bool { got, _ := os.ReadFile(last); return string(got) == "sk-scale" }) {
		return fmt.Errorf("node-c did not serve %s:\n%s", last, d.log)
	}
	startTime := time.Since(t)
	time.Sleep(2 * time.Second) // let the first list's garbage be collected
	// The daemon is a supervisor and a worker: the worker holds the keys.
	pid := proc.Child(d.cmd.Process.Pid)
	if pid == 0 {
		return fmt.Errorf("node-c has no worker process:\n%s", d.log)
	}
	rss, hwm := procMem(pid)
	fmt.Printf("daemon start with %d SealedKeys: %s to the first read of the last key; RSS %s, peak %s (goals: 5 s, 150 MB)\n",
		n, startTime.Round(10*time.Millisecond), rss, hwm)
	// Serving makes garbage (each read, its audit event): the heap grows
	// to what the GC lets it, and a locked heap stays that large.
	t = time.Now()
	for i := range n {
		p := filepath.Join(d.mnt, "t"+strconv.Itoa(i / *keysPer), "key"+strconv.Itoa(i%*keysPer))
		if got, err := os.ReadFile(p); err != nil || string(got) != "sk-scale" {
			return fmt.Errorf("read %s: %q, %v", p, got, err)
		}
	}
	readTime := time.Since(t)
	rss, hwm = procMem(pid)
	fmt.Printf("after reading every key once (%s): RSS %s, peak %s\n", readTime.Round(10*time.Millisecond), rss, hwm)
	if *verbose {
		d.mu.Lock()
		fmt.Print(d.log.String())
		d.mu.Unlock()
	}
	return nil
}

// procMem reads a process's resident and peak resident memory.
func procMem(pid int) (rss, hwm string) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "?", "?"
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.Atoi(f[1])
		switch f[0] {
		case "VmRSS:":
			rss = fmt.Sprintf("%.1f MB", float64(kb)/1024)
		case "VmHWM:":
			hwm = fmt.Sprintf("%.1f MB", float64(kb)/1024)
		}
	}
	if rss == "" {
		return "?", "?"
	}
	return rss, hwm
}
