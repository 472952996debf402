// Package fdhold keeps descriptors for a process that may die: a FUSE
// server deposits each connection it serves (its /dev/fuse descriptor and
// the state a successor needs), and its successor collects them. The
// kernel keeps a FUSE connection alive while any process holds its
// descriptor, so the holder is what lets mounts outlive their server.
//
// The protocol runs over a SOCK_SEQPACKET unix socket, one message each:
//
//	H name NUL state  + 1 fd   hold (replacing what name held)
//	D name                     drop: close it
//	C                          collect: the holder answers with one
//	                           S name NUL state + fd per session, then E
//	R                          ready: the server serves (for a supervisor)
package fdhold

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/keyfs/keyfs/internal/fdpass"
)

// Session is one held descriptor and its state.
type Session struct {
	Name  string
	State []byte
	FD    int
}

// Holder keeps sessions in memory. It holds no keys: whoever holds a FUSE
// descriptor can answer the kernel for that mount, so a holder must be
// reachable only by the servers it holds for.
type Holder struct {
	mu sync.Mutex
	m  map[string]Session
}

// Serve answers one client until it closes the connection; ready, when
// not nil, is called when the client says it serves.
func (h *Holder) Serve(c *net.UnixConn, ready func()) error {
	for {
		msg, fds, err := fdpass.Recv(c)
		if err != nil {
			if errors.Is(err, fdpass.ErrClosed) {
				return nil
			}
			return err
		}
		if err := h.handle(c, msg, fds, ready); err != nil {
			closeAll(fds)
			return err
		}
	}
}

func (h *Holder) handle(c *net.UnixConn, msg []byte, fds []int, ready func()) error {
	if len(msg) == 0 {
		return errors.New("fdhold: empty message")
	}
	switch msg[0] {
	case 'H':
		name, state, ok := bytes.Cut(msg[1:], []byte{0})
		if !ok || len(name) == 0 || len(fds) != 1 {
			return errors.New("fdhold: bad hold message")
		}
		h.put(Session{Name: string(name), State: bytes.Clone(state), FD: fds[0]})
	case 'D':
		closeAll(fds)
		h.Drop(string(msg[1:]))
	case 'C':
		closeAll(fds)
		for _, s := range h.Sessions() {
			if err := fdpass.Send(c, sessionMsg('S', s), s.FD); err != nil {
				return err
			}
		}
		return fdpass.Send(c, []byte{'E'})
	case 'R':
		closeAll(fds)
		if ready != nil {
			ready()
		}
	default:
		return fmt.Errorf("fdhold: unknown message %q", msg[0])
	}
	return nil
}

func sessionMsg(op byte, s Session) []byte {
	b := append([]byte{op}, s.Name...)
	b = append(b, 0)
	return append(b, s.State...)
}

func (h *Holder) put(s Session) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.m == nil {
		h.m = map[string]Session{}
	}
	if old, ok := h.m[s.Name]; ok {
		unix.Close(old.FD)
	}
	h.m[s.Name] = s
}

// Drop closes what name held, if anything.
func (h *Holder) Drop(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if old, ok := h.m[name]; ok {
		unix.Close(old.FD)
		delete(h.m, name)
	}
}

// Sessions lists what is held, by name; the descriptors stay the holder's.
func (h *Holder) Sessions() []Session {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]Session, 0, len(h.m))
	for _, s := range h.m {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Close closes every held descriptor.
func (h *Holder) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, s := range h.m {
		unix.Close(s.FD)
	}
	h.m = nil
}

// Client is a server's end of a holder connection.
type Client struct {
	mu sync.Mutex
	c  *net.UnixConn
}

// NewClient wraps a connection to a holder.
func NewClient(c *net.UnixConn) *Client { return &Client{c: c} }

// Hold deposits fd (the holder gets its own copy) under name.
func (cl *Client) Hold(name string, state []byte, fd int) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return fdpass.Send(cl.c, sessionMsg('H', Session{Name: name, State: state}), fd)
}

// Drop tells the holder to close what it holds under name.
func (cl *Client) Drop(name string) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return fdpass.Send(cl.c, append([]byte{'D'}, name...))
}

// Ready tells the holder this server serves.
func (cl *Client) Ready() error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return fdpass.Send(cl.c, []byte{'R'})
}

// Collect fetches copies of every held session; their descriptors are
// the caller's to close.
func (cl *Client) Collect() ([]Session, error) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if err := fdpass.Send(cl.c, []byte{'C'}); err != nil {
		return nil, err
	}
	var out []Session
	for {
		msg, fds, err := fdpass.Recv(cl.c)
		if err != nil {
			closeSessions(out)
			return nil, fmt.Errorf("fdhold: collect: %w", err)
		}
		if len(msg) == 1 && msg[0] == 'E' && len(fds) == 0 {
			return out, nil
		}
		name, state, ok := bytes.Cut(msg[1:], []byte{0})
		if msg[0] != 'S' || !ok || len(fds) != 1 {
			closeAll(fds)
			closeSessions(out)
			return nil, errors.New("fdhold: collect: bad answer")
		}
		out = append(out, Session{Name: string(name), State: state, FD: fds[0]})
	}
}

// Close closes the connection; the holder keeps what it holds.
func (cl *Client) Close() error { return cl.c.Close() }

func closeSessions(ss []Session) {
	for _, s := range ss {
		unix.Close(s.FD)
	}
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// Remote is a server's connection to a holder in another pod: it
// reconnects when the holder restarts, and then deposits again all it
// holds, since a restarted holder holds nothing. It keeps its own copy of
// each descriptor for that.
type Remote struct {
	path string
	log  *slog.Logger

	mu   sync.Mutex
	cl   *Client // nil while not connected
	held map[string]Session
	stop chan struct{}
}

// Dial connects to the holder at path, now if it can, else in the
// background, once a second, until Close.
func Dial(path string, log *slog.Logger) *Remote {
	r := &Remote{path: path, log: log, held: map[string]Session{}, stop: make(chan struct{})}
	r.connect()
	go r.keep()
	return r
}

func (r *Remote) connect() bool {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: r.path, Net: "unixpacket"})
	if err != nil {
		return false
	}
	cl := NewClient(c)
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.held {
		if err := cl.Hold(s.Name, s.State, s.FD); err != nil {
			cl.Close()
			return false
		}
	}
	r.cl = cl
	r.log.Info("connected to the fd holder", "socket", r.path, "deposited", len(r.held))
	return true
}

// keep watches the connection: a holder that goes away closes it.
func (r *Remote) keep() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			return
		case <-t.C:
		}
		r.mu.Lock()
		cl := r.cl
		r.mu.Unlock()
		if cl != nil && !cl.closedByPeer() {
			continue
		}
		if cl != nil {
			r.log.Warn("lost the fd holder; reconnecting", "socket", r.path)
			r.mu.Lock()
			r.cl = nil
			r.mu.Unlock()
			cl.Close()
		}
		r.connect()
	}
}

// closedByPeer polls the socket without blocking: readable, while no
// Collect waits for answers, means the holder closed (or broke) its end.
func (cl *Client) closedByPeer() bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	raw, err := cl.c.SyscallConn()
	if err != nil {
		return true
	}
	closed := false
	raw.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(p, 0)
		closed = err == nil && n > 0 && p[0].Revents&(unix.POLLIN|unix.POLLHUP|unix.POLLERR) != 0
	})
	return closed
}

// Connected says whether the holder holds what this process deposited.
func (r *Remote) Connected() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cl != nil
}

// Hold deposits a copy of fd under name, now or when the holder is back.
func (r *Remote) Hold(name string, state []byte, fd int) error {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if old, ok := r.held[name]; ok {
		unix.Close(old.FD)
	}
	r.held[name] = Session{Name: name, State: bytes.Clone(state), FD: dup}
	if r.cl == nil {
		return nil
	}
	return r.cl.Hold(name, state, dup)
}

// Drop forgets name here and at the holder.
func (r *Remote) Drop(name string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if old, ok := r.held[name]; ok {
		unix.Close(old.FD)
		delete(r.held, name)
	}
	if r.cl == nil {
		return nil
	}
	return r.cl.Drop(name)
}

// Collect fetches what the holder holds; nothing when it is not there.
func (r *Remote) Collect() ([]Session, error) {
	r.mu.Lock()
	cl := r.cl
	r.mu.Unlock()
	if cl == nil {
		return nil, nil
	}
	return cl.Collect()
}

// Close disconnects; the holder keeps what it holds.
func (r *Remote) Close() {
	close(r.stop)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cl != nil {
		r.cl.Close()
		r.cl = nil
	}
	for _, s := range r.held {
		unix.Close(s.FD)
	}
	r.held = nil
}

// Listen makes the holder's unix socket at path, for root only: the
// directory is made 0700, the socket 0600, and ServeListener checks every
// peer's credentials, since whoever can collect a connection can answer
// its readers.
func Listen(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if err := os.Chmod(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	os.Remove(path) // a dead holder's socket
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// ServeListener answers every root peer that connects to l until l is
// closed; others are refused and logged. When no server has been
// connected for orphanAfter (0: never), the holder closes what it holds:
// a server gone for good leaves its readers hanging while the holder
// keeps their connections, and failing is better than hanging forever.
func (h *Holder) ServeListener(l *net.UnixListener, log *slog.Logger, orphanAfter time.Duration) error {
	var mu sync.Mutex
	clients := 0
	var orphan *time.Timer
	joined := func() {
		mu.Lock()
		defer mu.Unlock()
		clients++
		if orphan != nil {
			orphan.Stop()
			orphan = nil
		}
	}
	left := func() {
		mu.Lock()
		defer mu.Unlock()
		if clients--; clients == 0 && orphanAfter > 0 {
			orphan = time.AfterFunc(orphanAfter, func() {
				mu.Lock()
				defer mu.Unlock()
				if clients > 0 {
					return
				}
				if n := len(h.Sessions()); n > 0 {
					log.Warn("no keyfs collected the held connections in time: closing them, so their readers fail instead of hanging", "connections", n, "after", orphanAfter)
					h.Close()
				}
			})
		}
	}
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return err
		}
		uid, pid, err := peer(c)
		if err != nil || uid != 0 {
			log.Warn("refused a connection that is not root's", "uid", uid, "pid", pid, "err", err)
			c.Close()
			continue
		}
		log.Info("server connected", "pid", pid)
		joined()
		go func() {
			defer left()
			defer c.Close()
			if err := h.Serve(c, nil); err != nil {
				log.Warn("server connection ended", "pid", pid, "err", err)
			}
		}()
	}
}

func peer(c *net.UnixConn) (uid uint32, pid int32, err error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *unix.Ucred
	var cerr error
	raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cerr != nil {
		return 0, 0, cerr
	}
	return cred.Uid, cred.Pid, nil
}
