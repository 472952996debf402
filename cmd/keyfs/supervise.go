package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyfs/keyfs/fusefs"
	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/internal/fdhold"
	"github.com/keyfs/keyfs/internal/fdpass"
)

// A daemon (keyfs mount, keyfs serve) runs as two processes: a supervisor
// that holds no keys, opens no TPM and no network, and a worker that does
// the work. The supervisor holds a copy of every FUSE connection the
// worker serves and restarts the worker when it dies; the successor takes
// the connections over, so readers see a stall, not an error.

// Environment of a worker: it is one (its supervisor is on fd 3), and
// what its predecessor's end was.
const (
	envWorker  = "KEYFS_WORKER"
	envRestart = "KEYFS_RESTART" // "N:how the last worker ended"
)

// worker is a running worker's link to its supervisor.
type worker struct {
	*fdhold.Client
	restart int    // how many workers came before this one
	reason  string // how the last one ended
}

// asWorker returns the link to the supervisor when this process is a
// worker, else nil.
func asWorker() (*worker, error) {
	if os.Getenv(envWorker) == "" {
		return nil, nil
	}
	c, err := fdpass.FileConn(os.NewFile(3, "supervisor"))
	if err != nil {
		return nil, fmt.Errorf("worker: no supervisor on fd 3: %w", err)
	}
	w := &worker{Client: fdhold.NewClient(c)}
	if n, why, ok := strings.Cut(os.Getenv(envRestart), ":"); ok {
		w.restart, _ = strconv.Atoi(n)
		w.reason = why
	}
	// Nothing this process starts is a worker.
	os.Unsetenv(envWorker)
	os.Unsetenv(envRestart)
	return w, nil
}

// hold deposits a view's connection with the supervisor.
func (w *worker) hold(name string, srv *fusefs.Server) error {
	sess := srv.Session()
	return w.Hold(name, sess.MarshalState(), sess.FD)
}

// auditRestart records that this worker replaced one that died.
func (w *worker) auditRestart(g *globals, al *audit.Logger) {
	if w.restart == 0 {
		return
	}
	ev := audit.Event{Event: "restart", Reason: fmt.Sprintf("worker %d after the last one ended (%s)", w.restart, w.reason)}
	if err := al.Log(g.lifecycleEvent(ev)); err != nil {
		g.log.Error("cannot audit the restart", "err", err)
	}
}

// workerExit is a worker's exit status, which the supervisor exits with.
type workerExit struct{ code int }

func (e workerExit) Error() string { return fmt.Sprintf("worker exited with status %d", e.code) }

// restartBackoff is how long the supervisor waits before the nth restart
// in a row of a worker that did not stay up.
func restartBackoff(n int) time.Duration {
	if n <= 1 {
		return 0
	}
	return min(100*time.Millisecond<<(n-2), 5*time.Second)
}

// stableAfter is how long a worker must serve for its next crash to count
// as the first in a row again.
const stableAfter = 10 * time.Second

// supervise runs this command again as its worker, holding the worker's
// FUSE connections, and restarts it when it dies after it served. It ends
// when the worker exits by itself with status 0 (a clean stop), or with
// the worker's status when it fails before it ever served (bad
// configuration: restarting would not help).
func supervise(log *slog.Logger) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("supervise: %w", err)
	}
	h := &fdhold.Holder{}
	defer h.Close()
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)

	everServed, inARow, restarts := false, 0, 0
	reason := ""
	for {
		served := make(chan struct{})
		var once sync.Once
		w, err := startWorker(exe, h, func() { once.Do(func() { close(served) }) }, restarts, reason)
		if err != nil {
			return err
		}
		started := time.Now()
		log.Info("worker started", "pid", w.proc.Pid, "restart", restarts)
		var state *os.ProcessState
		stopping := false
	wait:
		for {
			select {
			case s := <-sig:
				stopping = true
				w.proc.Signal(s)
			case <-served:
				everServed = true
				served = nil
			case state = <-w.exited:
				break wait
			}
		}
		switch code := state.ExitCode(); {
		case code == 0:
			return nil
		case stopping || !everServed:
			return workerExit{max(code, exitError)} // it said why on stderr; -1: killed
		}
		reason = describeExit(state)
		if time.Since(started) > stableAfter {
			inARow = 0
		}
		inARow++
		restarts++
		wait := restartBackoff(inARow)
		log.Warn("worker died; starting another, which takes over its mounts", "pid", w.proc.Pid, "exit", reason, "in", wait, "held", len(h.Sessions()))
		select {
		case s := <-sig:
			log.Info("stopping: unmounting the views no worker serves", "signal", s.String())
			detachHeld(log, h)
			return nil
		case <-time.After(wait):
		}
	}
}

// detachHeld detaches the mounts of the held connections: nobody will
// serve them any more.
func detachHeld(log *slog.Logger, h *fdhold.Holder) {
	for _, s := range h.Sessions() {
		sess, err := fusefs.ParseSession(s.State, s.FD)
		if err != nil {
			continue
		}
		if _, err := fusefs.DetachLeftover(sess.Mountpoint); err != nil {
			log.Error("cannot detach a mount no worker serves", "mountpoint", sess.Mountpoint, "err", err)
		}
	}
}

type runningWorker struct {
	proc   *os.Process
	exited chan *os.ProcessState
}

// startWorker starts exe with this process's arguments as a worker and
// serves its link to h. The worker gets SIGTERM if this process dies, so
// it never serves unsupervised.
func startWorker(exe string, h *fdhold.Holder, ready func(), restarts int, reason string) (*runningWorker, error) {
	mine, peer, err := fdpass.Pair()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{peer}
	cmd.Env = append(os.Environ(), envWorker+"=1")
	if restarts > 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d:%s", envRestart, restarts, reason))
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	w := &runningWorker{exited: make(chan *os.ProcessState, 1)}
	started := make(chan error, 1)
	// Pdeathsig follows the thread that forked: keep that thread for as
	// long as the worker lives.
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		err := cmd.Start()
		peer.Close()
		started <- err
		if err != nil {
			mine.Close()
			return
		}
		cmd.Wait()
		w.exited <- cmd.ProcessState
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start worker: %w", err)
	}
	w.proc = cmd.Process
	go func() {
		defer mine.Close()
		h.Serve(mine, ready) // ends when the worker's end closes
	}()
	return w, nil
}

func describeExit(st *os.ProcessState) string {
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "killed by " + unix.SignalName(ws.Signal())
	}
	return fmt.Sprintf("exit status %d", st.ExitCode())
}
