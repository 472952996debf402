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
	"net"
	"sort"
	"sync"

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
