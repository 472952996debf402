package driver

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/keyfs/keyfs/internal/fdhold"
	"github.com/keyfs/keyfs/internal/fusetest"
	"github.com/keyfs/keyfs/internal/syncbuf"
	"github.com/keyfs/keyfs/keystore"
)

// helperEnv selects runHelper in a re-executed test binary: a driver
// daemon in its own process, so a test can SIGKILL it.
const helperEnv = "KEYFS_DRIVER_HELPER"

func runHelper() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	seed, err := hex.DecodeString(os.Getenv("KEYFS_H_SEED"))
	if err != nil {
		log.Error("bad seed", "err", err)
		return 2
	}
	key, err := keystore.NewMasterKey(seed)
	if err != nil {
		log.Error("master key", "err", err)
		return 2
	}
	store, err := keystore.OpenDir(os.Getenv("KEYFS_H_STORE"))
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
	c := Config{NodeID: "node-1", KubeletDir: os.Getenv("KEYFS_H_KUBELET"), StateDir: os.Getenv("KEYFS_H_STATE"),
		Store: index, Key: key, Log: log}
	if sock := os.Getenv("KEYFS_H_HOLDER"); sock != "" {
		r := fdhold.Dial(sock, log)
		defer r.Close()
		c.Holders, c.LeaveMounts = []Holder{r}, r.Connected
	}
	d, err := New(c)
	if err != nil {
		log.Error("new", "err", err)
		return 2
	}
	if err := d.Restore(); err != nil {
		log.Error("restore", "err", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	l, err := d.Listen("unix://" + os.Getenv("KEYFS_H_SOCK"))
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

// holderEnv selects runHolder: an fd holder in its own process, as the
// fd-holder pod is, so a test can kill it.
const holderEnv = "KEYFS_DRIVER_HOLDER"

func runHolder(sock string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	l, err := fdhold.Listen(sock)
	if err != nil {
		log.Error("listen", "err", err)
		return 2
	}
	(&fdhold.Holder{}).ServeListener(l, log, 0)
	return 1
}

// startHolder starts the holder and returns it with the environment
// variable that points startDaemon's daemon at it.
func startHolder(t *testing.T, e *env) (*daemon, string) {
	t.Helper()
	sock := filepath.Join(e.dir, "holder", "holder.sock")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), holderEnv+"="+sock)
	if testing.Verbose() {
		cmd.Stderr = os.Stderr
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	dm := &daemon{cmd: cmd, done: make(chan error, 1)}
	go func() { dm.done <- cmd.Wait() }()
	t.Cleanup(func() { dm.kill(syscall.SIGKILL) })
	waitFor(t, 5*time.Second, "the holder's socket", func() bool { _, err := os.Stat(sock); return err == nil })
	return dm, "KEYFS_H_HOLDER=" + sock
}

// daemon is a driver running in a child process.
type daemon struct {
	cmd  *exec.Cmd
	done chan error
	logs *syncbuf.Buffer // its stderr
}

func startDaemon(t *testing.T, e *env, env ...string) *daemon {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), env...), helperEnv+"=1",
		"KEYFS_H_SEED="+hex.EncodeToString(e.seed), "KEYFS_H_STORE="+e.storeDir,
		"KEYFS_H_KUBELET="+e.kubelet, "KEYFS_H_STATE="+e.state, "KEYFS_H_SOCK="+e.sock)
	logs := &syncbuf.Buffer{}
	cmd.Stderr = logs
	if testing.Verbose() {
		cmd.Stdout, cmd.Stderr = os.Stderr, io.MultiWriter(os.Stderr, logs)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	dm := &daemon{cmd: cmd, done: make(chan error, 1), logs: logs}
	go func() { dm.done <- cmd.Wait() }()
	t.Cleanup(func() { dm.kill(syscall.SIGKILL) })
	return dm
}

func (dm *daemon) kill(sig syscall.Signal) error {
	select {
	case err := <-dm.done:
		dm.done <- err
		return err
	default:
	}
	dm.cmd.Process.Signal(sig)
	select {
	case err := <-dm.done:
		dm.done <- err
		return err
	case <-time.After(10 * time.Second):
		dm.cmd.Process.Kill()
		return errors.New("daemon did not exit")
	}
}

func TestRestartAfterSIGKILL(t *testing.T) {
	fusetest.Require(t)
	e := newStoreEnv(t)
	t.Cleanup(func() { detachAll(t, e.dir) })
	p := pod("acme", "default")
	reqs := []*csi.NodePublishVolumeRequest{
		e.request("vol-a", p, nil),
		e.request("vol-b", p, map[string]string{"keys": "openai", "mode": "0440"}),
		e.request("vol-gone", p, nil),
	}

	dm := startDaemon(t, e)
	first := e.dialDaemon()
	for _, r := range reqs {
		if _, err := first.NodePublishVolume(context.Background(), r); err != nil {
			t.Fatalf("publish %s: %v", r.VolumeId, err)
		}
	}
	want := testKeys["acme/openai"]
	for _, r := range reqs {
		if got := readFile(t, filepath.Join(r.TargetPath, "acme", "openai")); got != want {
			t.Fatalf("%s: read %q, want %q", r.VolumeId, got, want)
		}
	}

	// SIGKILL: the FUSE mounts stay in the mount table, dead. (statfs,
	// unlike stat, is never answered from the kernel's cache.)
	dm.kill(syscall.SIGKILL)
	for _, r := range reqs {
		var st unix.Statfs_t
		if err := unix.Statfs(r.TargetPath, &st); !errors.Is(err, syscall.ENOTCONN) {
			t.Fatalf("%s after SIGKILL: statfs = %v, want ENOTCONN", r.VolumeId, err)
		}
		if _, err := os.ReadFile(filepath.Join(r.TargetPath, "acme", "openai")); err == nil {
			t.Fatalf("%s readable with the daemon dead", r.VolumeId)
		}
	}
	// The pod of vol-gone went away meanwhile: kubelet cleaned its directory.
	gone := reqs[2].TargetPath
	if err := unix.Unmount(gone, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(gone); err != nil {
		t.Fatal(err)
	}

	dm = startDaemon(t, e)
	second := e.dialDaemon()
	for _, r := range reqs[:2] {
		if got := readFile(t, filepath.Join(r.TargetPath, "acme", "openai")); got != want {
			t.Fatalf("%s after restart: read %q, want %q", r.VolumeId, got, want)
		}
	}
	if got := listDir(t, filepath.Join(reqs[1].TargetPath, "acme")); fmt.Sprint(got) != "[openai]" {
		t.Errorf("vol-b after restart lists %v: the keys attribute was lost", got)
	}
	if fi, err := os.Stat(filepath.Join(reqs[1].TargetPath, "acme", "openai")); err != nil || fi.Mode().Perm() != 0o440 {
		t.Errorf("vol-b after restart: mode %v, %v; want 0440", fi.Mode(), err)
	}
	if _, err := os.Stat(gone); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("vol-gone target: %v, want it still gone", err)
	}
	recs, _ := filepath.Glob(filepath.Join(e.state, "volumes", "*.json"))
	if len(recs) != 2 {
		t.Errorf("%d volume records after restart, want 2 (vol-gone's dropped)", len(recs))
	}
	// Kubelet may publish again after a plugin restart: that is a no-op.
	if _, err := second.NodePublishVolume(context.Background(), reqs[0]); err != nil {
		t.Errorf("republish after restart: %v", err)
	}
	stopClean(t, e, second, dm, reqs)
}

// stopClean unpublishes reqs, stops the daemon with SIGTERM and checks
// that no mount is left.
func stopClean(t *testing.T, e *env, node csi.NodeClient, dm *daemon, reqs []*csi.NodePublishVolumeRequest) {
	t.Helper()
	for _, r := range reqs {
		if _, err := node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: r.VolumeId, TargetPath: r.TargetPath}); err != nil {
			t.Errorf("unpublish %s: %v", r.VolumeId, err)
		}
	}
	if err := dm.kill(syscall.SIGTERM); err != nil {
		t.Errorf("daemon exit after SIGTERM: %v", err)
	}
	if ms := keyfsMounts(t, e.dir); len(ms) != 0 {
		t.Errorf("mounts left: %v", ms)
	}
}

// TestResumeAfterSIGKILL: with an fd holder (in its own process, as the
// fd-holder pod), kill -9 of the daemon is a stall for running pods, not
// an error: the next daemon takes the volumes over. So is a SIGTERM, and
// a kill -9 after the holder itself was killed and restarted (the daemon
// deposits everything again).
func TestResumeAfterSIGKILL(t *testing.T) {
	fusetest.Require(t)
	e := newStoreEnv(t)
	t.Cleanup(func() { detachAll(t, e.dir) })
	holder, holderEnv := startHolder(t, e)

	p := pod("acme", "default")
	reqs := []*csi.NodePublishVolumeRequest{e.request("vol-a", p, nil), e.request("vol-b", p, map[string]string{"keys": "openai"})}
	dm := startDaemon(t, e, holderEnv)
	node := e.dialDaemon()
	for _, r := range reqs {
		if _, err := node.NodePublishVolume(context.Background(), r); err != nil {
			t.Fatalf("publish %s: %v", r.VolumeId, err)
		}
	}
	want := testKeys["acme/openai"]
	var failed, reads atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, r := range reqs {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(20 * time.Millisecond):
				}
				if b, err := os.ReadFile(filepath.Join(r.TargetPath, "acme", "openai")); err != nil || string(b) != want {
					failed.Add(1)
					t.Errorf("%s: read across the restart: %q %v", r.VolumeId, b, err)
				}
				reads.Add(1)
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	for i, how := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM, syscall.SIGKILL} {
		if i == 2 {
			holder.kill(syscall.SIGKILL)
			holder, _ = startHolder(t, e)
			time.Sleep(1500 * time.Millisecond) // the daemon reconnects each second
		}
		dm.kill(how)
		time.Sleep(200 * time.Millisecond) // the gap
		dm = startDaemon(t, e, holderEnv)
		node = e.dialDaemon()
		time.Sleep(300 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if failed.Load() > 0 {
		t.Fatalf("%d of %d reads failed across the daemon's restarts", failed.Load(), reads.Load())
	}
	t.Logf("%d reads across kill -9, SIGTERM, holder restart + kill -9 of the daemon, 0 failed", reads.Load())
	stopClean(t, e, node, dm, reqs)
}

// TestHolderLostFallsBack: holder and daemon killed together; nothing kept
// the connection, so the next daemon mounts the volume afresh (new pods
// read) and says, per volume, that its running pods must be restarted.
func TestHolderLostFallsBack(t *testing.T) {
	fusetest.Require(t)
	e := newStoreEnv(t)
	t.Cleanup(func() { detachAll(t, e.dir) })
	holder, holderEnv := startHolder(t, e)
	r := e.request("vol-a", pod("acme", "default"), nil)
	dm := startDaemon(t, e, holderEnv)
	if _, err := e.dialDaemon().NodePublishVolume(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	holder.kill(syscall.SIGKILL)
	dm.kill(syscall.SIGKILL)
	if _, err := os.ReadFile(filepath.Join(r.TargetPath, "acme", "openai")); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("with holder and daemon dead, a read gives %v, want ENOTCONN", err)
	}
	startHolder(t, e)
	dm = startDaemon(t, e, holderEnv)
	node := e.dialDaemon()
	if got := readFile(t, filepath.Join(r.TargetPath, "acme", "openai")); got != testKeys["acme/openai"] {
		t.Fatalf("after the fallback: read %q", got)
	}
	if !strings.Contains(dm.logs.String(), "no holder kept the volume's connection") {
		t.Errorf("the fallback was not logged:\n%s", dm.logs.String())
	}
	stopClean(t, e, node, dm, []*csi.NodePublishVolumeRequest{r})
}

// dialDaemon connects to the child daemon's socket once it answers.
func (e *env) dialDaemon() csi.NodeClient {
	e.t.Helper()
	// A short backoff: the socket may be a dead daemon's until the new
	// one replaces it.
	conn, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.5, MaxDelay: 100 * time.Millisecond}}))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	id := csi.NewIdentityClient(conn)
	waitFor(e.t, 10*time.Second, "the daemon to serve", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		r, err := id.Probe(ctx, &csi.ProbeRequest{})
		return err == nil && r.GetReady().GetValue()
	})
	return csi.NewNodeClient(conn)
}
