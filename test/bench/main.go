// Command bench measures keyfs reads against a stock go-fuse server doing
// the same work, tmpfs and gocryptfs (latency, reads/s, CPU per read), how
// keyfs scales with the number of tenants, and what an idle mount costs.
// It needs root and /dev/fuse.
//
//	go run ./test/bench [-d 2s] [-tenants 10000] [-idle 30s]
package main

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyfs/keyfs/fusefs"
	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/test/internal/proc"
)

var (
	dur     = flag.Duration("d", time.Second, "duration of each measurement")
	rounds  = flag.Int("rounds", 5, "rounds of measurements, interleaved across filesystems; medians are reported")
	conc    = flag.Int("c", 8, "concurrent readers for reads/s")
	tenants = flag.Int("tenants", 10000, "tenants in the large store (3 keys each)")
	idle    = flag.Duration("idle", 30*time.Second, "how long to measure the CPU an idle keyfs mount uses")

	memProfile = flag.String("memprofile", "", "write a heap profile of the keyfs server after the large walk")
	cpuProfile = flag.String("cpuprofile", "", "write a CPU profile of this process (the keyfs server)")

	inproc     = flag.Bool("inproc", false, "read from goroutines of this process instead of a child process")
	readerMode = flag.String("reader", "", "internal: run as a reader child (latency, round, throughput, walk)")
	readerPath = flag.String("path", "", "internal: file or mount the reader child reads")
)

const valueSize = 64

// roundKeys is how many keys of the large view the round reader goes
// round: fewer than a view keeps memory files for (passthrough.go).
const roundKeys = 256

func main() {
	flag.Parse()
	if *readerMode != "" {
		if err := readerMain(*readerMode, *readerPath, *conc, *dur); err != nil {
			fmt.Fprintln(os.Stderr, "reader:", err)
			os.Exit(1)
		}
		return
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stderr, "\nbench: %v: cleaning up\n", s)
		cleanup()
		os.Exit(130)
	}()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			pprof.StartCPUProfile(f)
			atExit(func() { pprof.StopCPUProfile(); f.Close() })
		}
	}
	err := run()
	cleanup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// cleanups run last-registered first, on return, error or signal.
var cleanups struct {
	sync.Mutex
	fs []func()
}

func atExit(f func()) {
	cleanups.Lock()
	defer cleanups.Unlock()
	cleanups.fs = append(cleanups.fs, f)
}

func cleanup() {
	cleanups.Lock()
	defer cleanups.Unlock()
	for i := len(cleanups.fs) - 1; i >= 0; i-- {
		cleanups.fs[i]()
	}
	cleanups.fs = nil
}

// unmount unmounts dir, lazily if it is busy.
func unmount(dir string) {
	for range 20 {
		if err := unix.Unmount(dir, 0); err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	unix.Unmount(dir, unix.MNT_DETACH)
}

type row struct {
	name, path string
	lats, thrs []result
	skipped    string
	// cpu, when set, is the server's CPU time so far; cpus are CPU
	// seconds per 1,000 reads of each round.
	cpu  func() time.Duration
	cpus []float64
}

// medianOf returns the median of vs.
func medianOf(vs []float64) float64 {
	vs = slices.Clone(vs)
	slices.Sort(vs)
	return vs[len(vs)/2]
}

// median returns the median of f over rs.
func median(rs []result, f func(result) float64) float64 {
	vs := make([]float64, len(rs))
	for i, r := range rs {
		vs[i] = f(r)
	}
	return medianOf(vs)
}

func p50(r result) float64  { return float64(r.P50) }
func p99(r result) float64  { return float64(r.P99) }
func rate(r result) float64 { return r.perSec() }

func run() error {
	if os.Geteuid() != 0 {
		return errors.New("run as root: the bench mounts FUSE and tmpfs")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("no FUSE: %w", err)
	}
	if *tenants < roundKeys {
		return fmt.Errorf("-tenants %d: the large store needs %d tenants at least (the round reader reads %d)", *tenants, roundKeys, roundKeys)
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	work, err := os.MkdirTemp("", "keyfs-bench-")
	if err != nil {
		return err
	}
	atExit(func() { os.RemoveAll(work) })
	// Everything lives on tmpfs, so no row measures a disk.
	if err := unix.Mount("tmpfs", work, "tmpfs", 0, "size=1g,mode=0700"); err != nil {
		return fmt.Errorf("mount tmpfs: %w", err)
	}
	atExit(func() { unmount(work) })

	seed := make([]byte, keystore.SeedSize)
	rand.Read(seed)
	m, err := keystore.NewMasterKey(seed)
	clear(seed)
	if err != nil {
		return err
	}
	defer m.Close()
	al, err := audit.Open(filepath.Join(work, "audit.log"), audit.DefaultMaxBytes)
	if err != nil {
		return err
	}
	atExit(func() { al.Close() })
	// As keyfs serve and mount keep it: chained, checkpointed with the
	// master key, written just after each open's reply.
	al.SetCheckpointer(m)
	al.StartQueue(4096)

	fmt.Printf("keyfs read benchmark: %d-byte key, open+read+close as an application does (open, read to EOF, close),\n", valueSize)
	where := "in a separate process"
	if *inproc {
		where = "in goroutines of the server's process"
	}
	fmt.Printf("readers %s; %v per measurement, medians of %d interleaved rounds; %d readers for reads/s;\n", where, *dur, *rounds, *conc)
	fmt.Printf("keyfs audits every open to a file; everything on tmpfs; GOMAXPROCS %d, %d CPUs\n\n", runtime.GOMAXPROCS(0), runtime.NumCPU())

	small, smallKey, err := makeStore(filepath.Join(work, "store-small"), m, 10)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "sealing %d tenants × 3 keys...\n", *tenants)
	t0 := time.Now()
	large, largeKey, err := makeStore(filepath.Join(work, "store-large"), m, *tenants)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "sealed in %v\n", time.Since(t0).Round(time.Millisecond))

	decrypt, err := decryptCost(small, m, smallKey.Entry)
	if err != nil {
		return err
	}

	// (a) keyfs, small store; (b) tmpfs; (c) gocryptfs over tmpfs.
	ks, err := mountKeyfs(work, "mnt-small", small, m, al, smallKey)
	if err != nil {
		return err
	}
	plain := filepath.Join(work, "plain")
	if err := os.WriteFile(plain, smallKey.value, 0o600); err != nil {
		return err
	}
	rows := []*row{{name: "keyfs", path: ks.path, cpu: proc.SelfCPU}, {name: "go-fuse floor", cpu: proc.SelfCPU}, {name: "tmpfs", path: plain}, {name: "gocryptfs"}}
	if rows[1].path, err = mountFloor(work, smallKey.value); err != nil {
		return err
	}
	if rows[3].path, err = gocryptfs(work, smallKey.value); err != nil {
		rows[3].skipped = err.Error()
	} else if pid := proc.Find("gocryptfs", filepath.Join(work, "gc-cipher")); pid != 0 {
		rows[3].cpu = func() time.Duration { return proc.CPU(pid) }
	}
	// Rounds interleave the filesystems so drift on a shared machine hits
	// them alike.
	for i := range *rounds {
		fmt.Fprintf(os.Stderr, "round %d/%d:", i+1, *rounds)
		for _, r := range rows {
			if r.skipped != "" {
				continue
			}
			var cpu0 time.Duration
			if r.cpu != nil {
				cpu0 = r.cpu()
			}
			lat, thr, err := measurePath(r.path, smallKey.value)
			if err != nil {
				return err
			}
			r.lats, r.thrs = append(r.lats, lat), append(r.thrs, thr)
			if r.cpu != nil {
				r.cpus = append(r.cpus, (r.cpu()-cpu0).Seconds()*1000/float64(lat.Reads+thr.Reads))
			}
			fmt.Fprintf(os.Stderr, "  %s p50 %s %.0f/s", r.name, us(lat.P50), thr.perSec())
		}
		fmt.Fprintln(os.Stderr)
	}

	// Tenant scale: the large store, latency interleaved with the small one.
	kl, err := mountKeyfs(work, "mnt-large", large, m, al, largeKey)
	if err != nil {
		return err
	}
	for i := range *rounds {
		fmt.Fprintf(os.Stderr, "scale round %d/%d:", i+1, *rounds)
		for _, k := range []struct {
			run *keyfsRun
			key key
		}{{&ks, smallKey}, {&kl, largeKey}} {
			lat, err := child("latency", k.run.path, 1, k.key.value)
			if err != nil {
				return err
			}
			if lat.Errors > 0 {
				return fmt.Errorf("reading %s: %d errors, first: %s", k.run.path, lat.Errors, lat.First)
			}
			k.run.lats = append(k.run.lats, lat)
			fmt.Fprintf(os.Stderr, "  %d tenants p50 %s", k.run.tenants, us(lat.P50))
		}
		lat, err := child("round", kl.mnt, roundKeys, nil)
		if err != nil {
			return err
		}
		if lat.Errors > 0 {
			return fmt.Errorf("going round %d keys of %s: %d errors, first: %s", roundKeys, kl.mnt, lat.Errors, lat.First)
		}
		kl.round = append(kl.round, lat)
		fmt.Fprintf(os.Stderr, "  round %d keys p50 %s", roundKeys, us(lat.P50))
		fmt.Fprintln(os.Stderr)
	}
	if err := walk(&kl); err != nil {
		return err
	}
	// Idle: the mounts stay, nobody reads; what does this process (the
	// keyfs servers, their shared store indexes) burn meanwhile?
	// The collection of what the walk allocated is not idling: settle first.
	runtime.GC()
	debug.FreeOSMemory()
	time.Sleep(2 * time.Second)
	fmt.Fprintf(os.Stderr, "idle for %v...\n", *idle)
	c0, t0 := proc.SelfCPU(), time.Now()
	time.Sleep(*idle)
	idleShare := float64(proc.SelfCPU()-c0) / float64(time.Since(t0))
	printReport(rows, decrypt, ks, kl, idleShare)
	return nil
}

type key struct {
	keystore.Entry
	value []byte
}

var keyNames = []string{"anthropic", "gemini", "openai"}

// makeStore seals n tenants × 3 keys of random 64-byte values and returns
// the store and the openai key of the middle tenant.
func makeStore(root string, m *keystore.MasterKey, n int) (*keystore.Dir, key, error) {
	d, err := keystore.OpenDir(root)
	if err != nil {
		return nil, key{}, err
	}
	type job struct{ tenant, name string }
	jobs := make(chan job)
	recs := make(chan *keystore.Record, 256)
	errc := make(chan error, runtime.NumCPU())
	var wg sync.WaitGroup
	want := job{fmt.Sprintf("t%05d", n/2), "openai"}
	var wantValue []byte
	var mu sync.Mutex
	for range runtime.NumCPU() {
		wg.Go(func() {
			v := make([]byte, valueSize)
			for j := range jobs {
				rand.Read(v)
				hex.Encode(v, v[:valueSize/2]) // printable, like an API key
				r, err := keystore.Seal(m.Public(), j.tenant, j.name, 1, v)
				if err != nil {
					errc <- err
					return
				}
				if j == want {
					mu.Lock()
					wantValue = append([]byte(nil), v...)
					mu.Unlock()
				}
				recs <- r
			}
		})
	}
	go func() {
		for i := range n {
			for _, k := range keyNames {
				jobs <- job{fmt.Sprintf("t%05d", i), k}
			}
		}
		close(jobs)
		wg.Wait()
		close(recs)
	}()
	for r := range recs {
		if err := d.Import(r); err != nil {
			return nil, key{}, err
		}
	}
	select {
	case err := <-errc:
		return nil, key{}, err
	default:
	}
	e, err := d.Newest(want.tenant, want.name)
	return d, key{Entry: e, value: wantValue}, err
}

// decryptCost times MasterKey.Open on a record whose data key is cached,
// which is what every open of a key file costs in decryption.
func decryptCost(d *keystore.Dir, m *keystore.MasterKey, e keystore.Entry) (time.Duration, error) {
	r, err := d.Read(e)
	if err != nil {
		return 0, err
	}
	pt, err := m.Open(r, e.Tenant, e.Name) // caches the data key
	if err != nil {
		return 0, err
	}
	clear(pt)
	const n = 20000
	start := time.Now()
	for range n {
		pt, _ := m.Open(r, e.Tenant, e.Name)
		clear(pt)
	}
	return time.Since(start) / n, nil
}

type keyfsRun struct {
	tenants   int
	path      string // the key measured
	mnt       string
	lats      []result
	round     []result      // going round roundKeys keys
	start     time.Duration // Mount call to first successful read
	rssFirst  int64         // RSS growth at first read
	rssWalk   int64         // RSS growth after reading every key
	walkReads int
	base      int64
}

// mountKeyfs mounts a keyfs view of d, timing Mount to the first
// successful read of k, and the RSS it adds.
func mountKeyfs(work, name string, d *keystore.Dir, m *keystore.MasterKey, al *audit.Logger, k key) (keyfsRun, error) {
	mnt := filepath.Join(work, name)
	if err := os.Mkdir(mnt, 0o755); err != nil {
		return keyfsRun{}, err
	}
	ts, err := d.Tenants()
	if err != nil {
		return keyfsRun{}, err
	}
	run := keyfsRun{tenants: len(ts), mnt: mnt, path: filepath.Join(mnt, k.Tenant, k.Name)}
	runtime.GC()
	debug.FreeOSMemory()
	run.base = rss()

	// Start counts what a daemon does: index the store, then mount.
	start := time.Now()
	index, err := keystore.WatchDir(d, 0, nil)
	if err != nil {
		return run, err
	}
	atExit(index.Close)
	s, err := fusefs.Mount(mnt, fusefs.Options{
		Store: index, Key: m, Audit: al, ReadsOwnMount: true, // the bench reads it from this process
		// As the CSI driver mounts it: the pod is known.
		Pod: audit.Event{PodNamespace: "bench", PodName: "bench-0", PodUID: "00000000-0000-0000-0000-000000000000", ServiceAccount: "default", Volume: "keys"},
	})
	if err != nil {
		return run, err
	}
	atExit(func() {
		if s.Unmount() != nil {
			unmount(mnt)
		}
	})
	for {
		if _, err := os.ReadFile(run.path); err == nil {
			break
		}
		if time.Since(start) > 30*time.Second {
			return run, fmt.Errorf("keyfs mount of %d tenants does not serve %s", run.tenants, run.path)
		}
		time.Sleep(time.Millisecond)
	}
	run.start = time.Since(start)
	run.rssFirst = rss() - run.base
	return run, nil
}

// walk reads every key of the mount once, from a child, and records the
// RSS this process grew by.
func walk(run *keyfsRun) error {
	w, err := child("walk", run.mnt, 1, nil)
	if err != nil {
		return err
	}
	if w.Errors > 0 {
		return fmt.Errorf("walk of %s: %d errors, first: %s", run.mnt, w.Errors, w.First)
	}
	run.walkReads = w.Reads
	run.rssWalk = rss() - run.base
	if *memProfile != "" {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fmt.Fprintf(os.Stderr, "after walk: heap inuse %s idle %s released %s, stacks %s, sys %s, gc %d\n",
			mb(int64(ms.HeapInuse)), mb(int64(ms.HeapIdle)), mb(int64(ms.HeapReleased)), mb(int64(ms.StackInuse)), mb(int64(ms.Sys)), ms.NumGC)
		f, err := os.Create(*memProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		runtime.GC()
		return pprof.WriteHeapProfile(f)
	}
	return nil
}

// measurePath runs a latency child and a throughput child against path.
func measurePath(path string, want []byte) (lat, thr result, err error) {
	if lat, err = child("latency", path, 1, want); err != nil {
		return
	}
	if thr, err = child("throughput", path, *conc, want); err != nil {
		return
	}
	for _, r := range []result{lat, thr} {
		if r.Errors > 0 {
			return lat, thr, fmt.Errorf("reading %s: %d of %d reads failed, first: %s", path, r.Errors, r.Reads, r.First)
		}
	}
	return
}

func child(mode, path string, n int, want []byte) (result, error) {
	if *inproc {
		return runReader(mode, path, n, *dur, want)
	}
	self, err := os.Executable()
	if err != nil {
		return result{}, err
	}
	cmd := exec.Command(self, "-reader", mode, "-path", path, "-c", strconv.Itoa(n), "-d", dur.String())
	cmd.Env = append(os.Environ(), expectEnv+"="+hex.EncodeToString(want))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return result{}, err
	}
	if err := cmd.Start(); err != nil {
		return result{}, err
	}
	atExit(func() { cmd.Process.Kill() })
	var r result
	derr := json.NewDecoder(bufio.NewReader(out)).Decode(&r)
	if err := cmd.Wait(); err != nil {
		return r, fmt.Errorf("reader %s %s: %w", mode, path, err)
	}
	return r, derr
}

// gocryptfs mounts a fresh gocryptfs over tmpfs holding value as "key",
// and returns the plaintext path.
func gocryptfs(work string, value []byte) (string, error) {
	if _, err := exec.LookPath("gocryptfs"); err != nil {
		return "", errors.New("gocryptfs is not installed: apt-get install gocryptfs")
	}
	cipher, plain := filepath.Join(work, "gc-cipher"), filepath.Join(work, "gc-plain")
	for _, d := range []string{cipher, plain} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return "", err
		}
	}
	// A throwaway password; low scrypt cost, it only guards bench data.
	if out, err := exec.Command("gocryptfs", "-init", "-q", "-extpass", "echo bench-pw", "-scryptn", "10", cipher).CombinedOutput(); err != nil {
		return "", fmt.Errorf("gocryptfs -init: %v: %s", err, out)
	}
	if out, err := exec.Command("gocryptfs", "-q", "-extpass", "echo bench-pw", cipher, plain).CombinedOutput(); err != nil {
		return "", fmt.Errorf("gocryptfs mount: %v: %s", err, out)
	}
	atExit(func() { unmount(plain) })
	f := filepath.Join(plain, "key")
	return f, os.WriteFile(f, value, 0o600)
}

// rss is this process's resident set in bytes.
func rss() int64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// us formats nanoseconds as microseconds.
func us[T time.Duration | float64](ns T) string { return fmt.Sprintf("%.1f µs", float64(ns)/1e3) }

func mb(n int64) string { return fmt.Sprintf("%.1f MB", float64(n)/(1<<20)) }

func printReport(rows []*row, decrypt time.Duration, small, large keyfsRun, idleShare float64) {
	fmt.Printf("%-18s %12s %12s %16s %16s\n", "open+read+close", "p50", "p99", fmt.Sprintf("reads/s (%d)", *conc), "CPU s/1000 reads")
	byName := map[string]*row{}
	for _, r := range rows {
		byName[r.name] = r
		if r.skipped != "" {
			fmt.Printf("%-18s skipped: %s\n", r.name, r.skipped)
			continue
		}
		cpu := "-"
		if len(r.cpus) > 0 {
			cpu = fmt.Sprintf("%.3f", medianOf(r.cpus))
		}
		fmt.Printf("%-18s %12s %12s %16.0f %16s\n", r.name, us(median(r.lats, p50)), us(median(r.lats, p99)), median(r.thrs, rate), cpu)
	}
	k := byName["keyfs"]
	ratio := func(f func(result) float64, a, b []result) float64 { return median(a, f) / median(b, f) }
	for _, other := range []string{"go-fuse floor", "tmpfs", "gocryptfs"} {
		o := byName[other]
		if o.skipped != "" {
			continue
		}
		fmt.Printf("%-18s %11.2fx %11.2fx %15.2fx\n", "keyfs/"+other,
			ratio(p50, k.lats, o.lats), ratio(p99, k.lats, o.lats), ratio(rate, k.thrs, o.thrs))
	}

	fmt.Printf("\n%-18s %12s %12s %14s %14s\n", "tenant scale", "read p50", "start", "RSS at start", "RSS all read")
	for _, r := range []keyfsRun{small, large} {
		all := "-"
		if r.walkReads > 0 {
			all = fmt.Sprintf("%s (%d keys)", mb(r.rssWalk), r.walkReads)
		}
		fmt.Printf("%-18s %12s %12s %14s %14s\n", fmt.Sprintf("%d tenants", r.tenants), us(median(r.lats, p50)), r.start.Round(time.Millisecond), mb(r.rssFirst), all)
	}
	scale := ratio(p50, large.lats, small.lats)
	fmt.Printf("%-18s %11.2fx\n", fmt.Sprintf("%d/%d", large.tenants, small.tenants), scale)
	fmt.Printf("%-18s %12s %11.2fx one key of the view (a gateway reading many tenants' keys)\n",
		fmt.Sprintf("round %d keys", roundKeys), us(median(large.round, p50)), ratio(p50, large.round, large.lats))

	share := float64(decrypt) / median(k.lats, p50)
	fmt.Printf("\ndecryption (MasterKey.Open, data key cached): %s = %.1f%% of keyfs p50\n", us(decrypt), 100*share)

	fmt.Println("\ntargets:")
	target := func(what string, got string, ok bool) {
		s := "MET"
		if !ok {
			s = "NOT MET"
		}
		fmt.Printf("  %-44s %-10s %s\n", what, got, s)
	}
	thrWhat := fmt.Sprintf("%d-reader reads/s >= 2x gocryptfs", *conc)
	if g := byName["gocryptfs"]; g.skipped == "" {
		r := ratio(p50, k.lats, g.lats)
		target("keyfs p50 <= 0.6x gocryptfs", fmt.Sprintf("%.2fx", r), r <= 0.6)
	} else {
		fmt.Printf("  %-44s skipped: no gocryptfs\n", "keyfs p50 <= 0.6x gocryptfs")
	}
	f := ratio(p50, k.lats, byName["go-fuse floor"].lats)
	target("keyfs p50 <= 0.8x the stock go-fuse floor", fmt.Sprintf("%.2fx", f), f <= 0.8)
	target("decryption <= 10% of the read", fmt.Sprintf("%.1f%%", 100*share), share <= 0.10)
	if g := byName["gocryptfs"]; g.skipped == "" {
		r := ratio(rate, k.thrs, g.thrs)
		target(thrWhat, fmt.Sprintf("%.2fx", r), r >= 2)
	} else {
		fmt.Printf("  %-44s skipped: no gocryptfs\n", thrWhat)
	}
	target("idle keyfs mounts <= 0.5% of one CPU", fmt.Sprintf("%.2f%%", 100*idleShare), idleShare <= 0.005)
	target(fmt.Sprintf("%d tenants p50 within 1.2x of %d", large.tenants, small.tenants), fmt.Sprintf("%.2fx", scale), scale <= 1.2)
	target(fmt.Sprintf("start <= 1 s (%d tenants)", large.tenants), large.start.Round(time.Millisecond).String(), large.start <= time.Second)
	worst := max(large.rssFirst, large.rssWalk)
	target(fmt.Sprintf("RSS <= 100 MB at %d tenants", large.tenants), mb(worst), worst <= 100<<20)
}
