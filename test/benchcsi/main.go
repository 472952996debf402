// Command benchcsi measures the keyfs CSI driver over its real gRPC socket
// with real FUSE mounts: publish latency, 110 volumes at once (time and
// daemon memory per volume) and read latency with 110 mounts against 1.
// The driver runs in a child process (this binary, re-executed), so its RSS
// is the daemon's alone. Needs root and /dev/fuse.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/keyfs/keyfs/driver"
	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/test/internal/proc"
)

const daemonEnv = "KEYFS_BENCHCSI_DAEMON"

// blocks is how many times a round alternates reading one mount and all.
const blocks = 4

// settle lets the daemon and kernel finish the aftermath of mass
// (un)publishing before reads are timed.
const settle = 500 * time.Millisecond

var (
	cycles  = flag.Int("cycles", 200, "publish+unpublish cycles for the latency figures")
	volumes = flag.Int("volumes", 110, "volumes published at once")
	idle    = flag.Duration("idle", 30*time.Second, "how long to measure the CPU of the daemon with every volume published and no reads")
	reads   = flag.Int("reads", 2000, "key reads per round and read-latency figure")
	rounds  = flag.Int("rounds", 6, "rounds of read-latency figures")
	hold    = flag.Bool("hold", false, "once the volumes are published, keep them up for outside tools (perf, a reader in C) instead of measuring reads")
)

func main() {
	if os.Getenv(daemonEnv) != "" {
		os.Exit(runDaemon())
	}
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "benchcsi:", err)
		os.Exit(1)
	}
}

// runDaemon is the child: a driver serving until SIGTERM.
func runDaemon() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	seed, _ := hex.DecodeString(os.Getenv("BENCH_SEED"))
	key, err := keystore.NewMasterKey(seed)
	if err != nil {
		log.Error("master key", "err", err)
		return 2
	}
	store, err := keystore.OpenDir(os.Getenv("BENCH_STORE"))
	if err != nil {
		log.Error("store", "err", err)
		return 2
	}
	index, err := keystore.WatchDir(store, 0, log)
	if err != nil {
		log.Error("index", "err", err)
		return 2
	}
	defer index.Close()
	d, err := driver.New(driver.Config{Version: "bench", NodeID: "bench", KubeletDir: os.Getenv("BENCH_KUBELET"),
		StateDir: os.Getenv("BENCH_STATE"), Store: index, Key: key, Log: log})
	if err != nil {
		log.Error("driver", "err", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	l, err := d.Listen("unix://" + os.Getenv("BENCH_SOCK"))
	if err == nil {
		err = d.Serve(ctx, l)
	}
	d.Close()
	if err != nil {
		log.Error("serve", "err", err)
		return 1
	}
	return 0
}

type bench struct {
	dir, kubelet, sock string
	daemon             *exec.Cmd
	node               csi.NodeClient
	ident              csi.IdentityClient
}

func run() error {
	if *rounds < 1 || *reads < blocks {
		return fmt.Errorf("-rounds must be at least 1 and -reads at least %d", blocks)
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root (FUSE mounts)")
	}
	dir, err := os.MkdirTemp("", "benchcsi")
	if err != nil {
		return err
	}
	b := &bench{dir: dir, kubelet: filepath.Join(dir, "kubelet"), sock: filepath.Join(dir, "csi.sock")}
	defer b.cleanup()
	if err := b.start(); err != nil {
		return err
	}

	fmt.Printf("keyfs CSI driver benchmark (%d cycles, %d volumes, %dx%d reads per figure)\n\n", *cycles, *volumes, *rounds, *reads)

	// Publish latency: publish+unpublish cycles, one volume at a time.
	var pub, unpub []time.Duration
	for i := range *cycles {
		r := b.request(fmt.Sprintf("cycle-%d", i))
		t0 := time.Now()
		if err := b.publish(r); err != nil {
			return err
		}
		t1 := time.Now()
		if err := b.unpublish(r); err != nil {
			return err
		}
		pub, unpub = append(pub, t1.Sub(t0)), append(unpub, time.Since(t1))
	}
	pubP50, pubP99 := pct(pub, 50), pct(pub, 99)
	fmt.Printf("NodePublishVolume    p50 %8s  p99 %8s\n", ms(pubP50), ms(pubP99))
	fmt.Printf("NodeUnpublishVolume  p50 %8s  p99 %8s\n", ms(pct(unpub, 50)), ms(pct(unpub, 99)))

	// 110 volumes at once.
	rss0, err := rss(b.daemon.Process.Pid)
	if err != nil {
		return err
	}
	many := make([]*csi.NodePublishVolumeRequest, *volumes)
	for i := range many {
		many[i] = b.request(fmt.Sprintf("many-%03d", i))
	}
	t0 := time.Now()
	if err := parallel(many, b.publish); err != nil {
		return err
	}
	all := time.Since(t0)
	rss1, err := rss(b.daemon.Process.Pid)
	if err != nil {
		return err
	}
	perVol := float64(rss1-rss0) / float64(*volumes)
	fmt.Printf("%d volumes at once   %8s total  daemon RSS %s MB -> %s MB, %.0f KB per volume\n",
		*volumes, ms(all), mb(rss0), mb(rss1), perVol/1024)

	// Read latency: the same file through the same mount, with the other
	// mounts present or not, and going round all of them (each open then
	// lands on another FUSE server). Rounds alternate the mounts present
	// and, within a round, blocks alternate one mount and all, so that
	// the machine's drift (where the scheduler put the threads, mostly)
	// hits the figures compared alike.
	if *hold {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		fmt.Fprintf(os.Stderr, "holding: daemon PID %d, volumes under %s; SIGINT or SIGTERM ends\n", b.daemon.Process.Pid, b.kubelet)
		<-ctx.Done()
		return nil
	}
	first, rest := many[:1], many[1:]
	var with1, withN, roundN []time.Duration
	for round := range *rounds {
		if round > 0 {
			if err := parallel(rest, b.publish); err != nil {
				return err
			}
		}
		time.Sleep(settle)
		for range blocks {
			ds, err := b.readLatency(first, *reads/blocks)
			if err != nil {
				return err
			}
			withN = append(withN, ds...)
			if ds, err = b.readLatency(many, *reads/blocks); err != nil {
				return err
			}
			roundN = append(roundN, ds...)
		}
		if err := parallel(rest, b.unpublish); err != nil {
			return err
		}
		time.Sleep(settle)
		ds, err := b.readLatency(first, *reads)
		if err != nil {
			return err
		}
		with1 = append(with1, ds...)
	}
	read1, readN, readRR := pct(with1, 50), pct(withN, 50), pct(roundN, 50)
	fmt.Printf("read (open+read+close) p50, one mount: %s alone, %s among %d mounts (%.2fx)\n",
		us(read1), us(readN), *volumes, float64(readN)/float64(read1))
	fmt.Printf("read p50 going round all %d mounts: %s (%.2fx one mount among them, %.2fx one alone)\n",
		*volumes, us(readRR), float64(readRR)/float64(readN), float64(readRR)/float64(read1))
	if err := parallel(rest, b.publish); err != nil {
		return err
	}
	// Idle: every volume published, nobody reads.
	time.Sleep(settle)
	fmt.Fprintf(os.Stderr, "idle for %v with %d volumes...\n", *idle, *volumes)
	c0, i0 := proc.CPU(b.daemon.Process.Pid), time.Now()
	time.Sleep(*idle)
	idleShare := float64(proc.CPU(b.daemon.Process.Pid)-c0) / float64(time.Since(i0))
	fmt.Printf("idle with %d volumes: the daemon used %.2f%% of one CPU over %v\n", *volumes, 100*idleShare, *idle)

	t0 = time.Now()
	if err := parallel(many, b.unpublish); err != nil {
		return err
	}
	fmt.Printf("%d volumes unpublished at once in %s\n", *volumes, ms(time.Since(t0)))
	if left := keyfsMounts(b.dir); len(left) != 0 {
		return fmt.Errorf("%d mounts left after unpublishing", len(left))
	}

	fmt.Println()
	target("publish p50 <= 20 ms", pubP50 <= 20*time.Millisecond, ms(pubP50))
	target(fmt.Sprintf("%d volumes <= 5 s in all", *volumes), all <= 5*time.Second, ms(all))
	target("<= 1 MB daemon RSS per volume", perVol <= 1<<20, fmt.Sprintf("%.0f KB", perVol/1024))
	target(fmt.Sprintf("read p50 with %d mounts <= 1.1x of 1 mount", *volumes), float64(readN) <= 1.1*float64(read1),
		fmt.Sprintf("%.2fx", float64(readN)/float64(read1)))
	target(fmt.Sprintf("read p50 round all %d <= 1.1x of one of them", *volumes), float64(readRR) <= 1.1*float64(readN),
		fmt.Sprintf("%.2fx", float64(readRR)/float64(readN)))
	target(fmt.Sprintf("idle with %d volumes <= 0.5%% of one CPU", *volumes), idleShare <= 0.005, fmt.Sprintf("%.2f%%", 100*idleShare))
	return nil
}

func target(what string, met bool, got string) {
	verdict := "MET"
	if !met {
		verdict = "NOT MET"
	}
	fmt.Printf("%-46s %-8s (%s)\n", what, verdict, got)
}

// start makes a store and starts the daemon on it.
func (b *bench) start() error {
	seed := make([]byte, keystore.SeedSize)
	rand.Read(seed)
	key, err := keystore.NewMasterKey(seed)
	if err != nil {
		return err
	}
	defer key.Close()
	storeDir := filepath.Join(b.dir, "store")
	store, err := keystore.OpenDir(storeDir)
	if err != nil {
		return err
	}
	for _, ref := range []string{"acme/openai", "acme/anthropic", "acme/gemini"} {
		tenant, name, _ := keystore.ParseRef(ref)
		val := "sk-" + strings.Repeat("x", 48)
		if _, err := store.Put(tenant, name, func(v uint64) (*keystore.Record, error) {
			return keystore.Seal(key.Public(), tenant, name, v, []byte(val))
		}); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Join(b.kubelet, "pods"), 0o750); err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), daemonEnv+"=1", "BENCH_SEED="+hex.EncodeToString(seed), "BENCH_STORE="+storeDir,
		"BENCH_KUBELET="+b.kubelet, "BENCH_STATE="+filepath.Join(b.dir, "state"), "BENCH_SOCK="+b.sock)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	b.daemon = cmd
	conn, err := grpc.NewClient("unix://"+b.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	b.node, b.ident = csi.NewNodeClient(conn), csi.NewIdentityClient(conn)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		r, err := b.ident.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && r.GetReady().GetValue() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("daemon not ready: %v", err)
		}
	}
}

// cleanup stops the daemon (which unmounts what it serves), detaches
// anything left and removes the scratch directory.
func (b *bench) cleanup() {
	if b.daemon != nil {
		b.daemon.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { b.daemon.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			b.daemon.Process.Kill()
			<-done
		}
	}
	for _, mp := range keyfsMounts(b.dir) {
		fmt.Fprintln(os.Stderr, "benchcsi: detaching leftover mount", mp)
		unix.Unmount(mp, unix.MNT_DETACH)
	}
	os.RemoveAll(b.dir)
}

func (b *bench) request(vol string) *csi.NodePublishVolumeRequest {
	uid := "bench-" + vol
	return &csi.NodePublishVolumeRequest{
		VolumeId:   vol,
		TargetPath: filepath.Join(b.kubelet, "pods", uid, "volumes", "kubernetes.io~csi", "keys", "mount"),
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		Readonly: true,
		VolumeContext: map[string]string{
			"csi.storage.k8s.io/ephemeral":           "true",
			"csi.storage.k8s.io/pod.namespace":       "acme",
			"csi.storage.k8s.io/pod.name":            "app-" + vol,
			"csi.storage.k8s.io/pod.uid":             uid,
			"csi.storage.k8s.io/serviceAccount.name": "default",
		},
	}
}

func (b *bench) publish(r *csi.NodePublishVolumeRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := b.node.NodePublishVolume(ctx, r); err != nil {
		return fmt.Errorf("publish %s: %w", r.VolumeId, err)
	}
	return nil
}

func (b *bench) unpublish(r *csi.NodePublishVolumeRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := b.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: r.VolumeId, TargetPath: r.TargetPath}); err != nil {
		return fmt.Errorf("unpublish %s: %w", r.VolumeId, err)
	}
	return nil
}

// readLatency opens, reads and closes a key n times, going round the
// given mounts, after one untimed pass over each.
func (b *bench) readLatency(vols []*csi.NodePublishVolumeRequest, n int) ([]time.Duration, error) {
	buf := make([]byte, 4096)
	readOnce := func(r *csi.NodePublishVolumeRequest) error {
		f, err := os.Open(filepath.Join(r.TargetPath, "acme", "openai"))
		if err != nil {
			return err
		}
		_, err = f.Read(buf)
		f.Close()
		return err
	}
	for _, r := range vols {
		if err := readOnce(r); err != nil {
			return nil, err
		}
	}
	ds := make([]time.Duration, n)
	for i := range ds {
		t0 := time.Now()
		if err := readOnce(vols[i%len(vols)]); err != nil {
			return nil, err
		}
		ds[i] = time.Since(t0)
	}
	return ds, nil
}

func parallel(rs []*csi.NodePublishVolumeRequest, f func(*csi.NodePublishVolumeRequest) error) error {
	errs := make([]error, len(rs))
	var wg sync.WaitGroup
	for i, r := range rs {
		wg.Go(func() { errs[i] = f(r) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func keyfsMounts(dir string) []string {
	ms, _ := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	var out []string
	for _, m := range ms {
		if m.FSType == "fuse.keyfs" {
			out = append(out, m.Mountpoint)
		}
	}
	return out
}

// rss is a process's resident set in bytes.
func rss(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, errors.New("no VmRSS")
}

func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000) }
func us(d time.Duration) string { return fmt.Sprintf("%d µs", d.Microseconds()) }
func mb(b int64) string         { return fmt.Sprintf("%.1f", float64(b)/(1<<20)) }
