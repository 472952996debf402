package fusefs

import (
	"bytes"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Every connection of a process is served by one pool of readers waiting
// on one epoll set. A request on any of a hundred mounts then wakes one of
// the few threads that served the last ones, not a cold thread of its own
// mount, and a hundred mounts cost no more threads than one.
//
// A descriptor is armed one-shot. The reader the kernel wakes for it
// answers, then reads again at once, and re-arms it only when nothing
// is there. That read is what makes a reader that reads one key at a time
// fast: the reply wakes the caller on this thread's CPU, the caller's
// next request wakes nobody (the descriptor is not armed), and the thread
// finds it as soon as the caller blocks: a ping-pong on one CPU, no
// halted vCPU woken for either direction.
//
// One reader waits at a time, and a reader that takes a request does not
// start another: a second waiting thread would be woken, on the other
// CPU, by a request on another mount (a reader going round mounts, a
// RELEASE and the next OPEN) that the busy reader takes microseconds
// later. For the same reason the reader that a wait gives two
// connections takes a request of each, and answers the one somebody waits
// for first (a reader going round mounts: its OPEN before the RELEASE of
// the file it closed, which nobody waits for). More readers start where
// there is more work: the second of two connections whose requests both
// have a caller waiting gets a reader of its own, a handler about to do
// something slow (the store, a synchronous audit write) re-arms its
// connection and starts a reader if none waits (mayBlock), and a reader
// re-arms a connection after maxDrain requests in a row, so a busy mount
// cannot keep the others waiting.
//
// Descriptors are non-blocking: a request can vanish between the event
// and the read (its caller was killed), and a blocking read would then
// wait for the next request of that one mount.

// maxReaders bounds the readers, busy or not; a reader that answered
// waits again only when no other waits, else it ends.
const maxReaders = 256

// maxDrain bounds the requests of one connection a reader answers before
// it lets the others' go first.
const maxDrain = 16

type poller struct {
	epfd  int
	conns sync.Map // id → *conn, the epoll data of its descriptor
	ids   atomic.Uint64

	mu      sync.Mutex // starting readers
	readers int
	started int          // readers ever started
	idle    atomic.Int32 // readers waiting for a request
}

var (
	pollerOnce sync.Once
	thePoller  *poller
	pollerErr  error
)

func sharedPoller() (*poller, error) {
	pollerOnce.Do(func() {
		fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			pollerErr = err
			return
		}
		thePoller = &poller{epfd: fd}
		thePoller.spawn(nil, nil)
	})
	return thePoller, pollerErr
}

// ctl adds, re-arms (one-shot) or removes c's descriptor.
func (p *poller) ctl(op int, c *conn) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLONESHOT, Fd: int32(uint32(c.id)), Pad: int32(c.id >> 32)}
	return unix.EpollCtl(p.epfd, op, c.fd, &ev)
}

// add starts serving c.
func (p *poller) add(c *conn) error {
	c.id = p.ids.Add(1)
	p.conns.Store(c.id, c)
	if err := p.ctl(unix.EPOLL_CTL_ADD, c); err != nil {
		p.conns.Delete(c.id)
		return err
	}
	return nil
}

// rearm lets the next request of c wake a reader.
func (p *poller) rearm(c *conn) {
	if err := p.ctl(unix.EPOLL_CTL_MOD, c); err != nil {
		c.log.Error("re-arm FUSE connection", "mountpoint", c.mountpoint, "err", err)
	}
}

// remove stops serving c. Removing the descriptor explicitly matters: a
// holder's copy keeps the file, and with it the epoll entry, alive.
func (p *poller) remove(c *conn) {
	p.ctl(unix.EPOLL_CTL_DEL, c)
	p.conns.Delete(c.id)
}

// spawn adds a reader that first serves c, starting with its request
// req if one was taken, or, with c nil, waits; false if there are
// maxReaders already.
func (p *poller) spawn(c *conn, req []byte) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.readers == maxReaders {
		return false
	}
	p.readers++
	p.started++
	if c == nil {
		p.idle.Add(1)
	}
	go p.reader(c, bytes.Clone(req))
	return true
}

// mayBlock makes sure a reader waits while this one does something slow.
func (p *poller) mayBlock() {
	if p.idle.Load() == 0 {
		p.spawn(nil, nil)
	}
}

func (p *poller) reader(first *conn, req []byte) {
	bufs := readerBufs.Get().(*[3 * bufSize]byte)
	defer readerBufs.Put(bufs)
	in, held, out := bufs[:bufSize], bufs[bufSize:2*bufSize], bufs[2*bufSize:]
	if first != nil {
		p.serve(first, in, copy(in, req), out)
		if !p.rejoin() {
			return
		}
	}
	var ev [2]unix.EpollEvent
	for {
		n, err := unix.EpollWait(p.epfd, ev[:], -1)
		if err != nil || n <= 0 {
			continue // EINTR
		}
		p.idle.Add(-1)
		a, b := p.conn(ev[0]), (*conn)(nil)
		if n == 2 {
			b = p.conn(ev[1])
		}
		switch {
		case a != nil && b != nil:
			p.serveTwo(a, b, held, in, out)
		case a != nil:
			p.serve(a, in, 0, out)
		case b != nil:
			p.serve(b, in, 0, out)
		}
		if !p.rejoin() {
			return
		}
	}
}

// serveTwo serves two connections with requests: a request somebody waits
// for before one nobody does, and a reader of its own for the second if
// both have a caller waiting.
func (p *poller) serveTwo(a, b *conn, inA, inB, out []byte) {
	ka, kb := a.take(inA), b.take(inB)
	waitA, waitB := ka > 0 && !background(inA[:ka]), kb > 0 && !background(inB[:kb])
	switch {
	case waitA && waitB && p.spawn(b, inB[:kb]):
		p.serve(a, inA, ka, out)
	case waitB && !waitA:
		p.serve(b, inB, kb, out)
		p.serve(a, inA, ka, out)
	default:
		p.serve(a, inA, ka, out)
		p.serve(b, inB, kb, out)
	}
}

func (p *poller) conn(ev unix.EpollEvent) *conn {
	v, ok := p.conns.Load(uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32)
	if !ok {
		return nil // removed meanwhile
	}
	return v.(*conn)
}

// serve answers the requests of c until none is there, maxDrain were, or
// a handler re-armed c; then it re-arms c (unless the handler did). If k
// > 0, in holds the first, taken already.
func (p *poller) serve(c *conn, in []byte, k int, out []byte) {
	c.use.RLock()
	defer c.use.RUnlock()
	if c.closed {
		return // a request taken is dropped: there is no one to answer
	}
	ok := k > 0
	if !ok {
		k, ok = c.read(in)
	}
	c.early.Store(false)
	for i := 1; ok; i++ {
		c.handle(in[:k], out)
		if c.early.Load() {
			return // re-armed: other readers take the rest
		}
		if i == maxDrain {
			break
		}
		k, ok = c.read(in)
	}
	if !ended(c) {
		p.rearm(c)
	}
}

// background says whether a request is one no caller waits for: a
// RELEASE (the kernel sends it after close returned) or a FORGET.
func background(req []byte) bool {
	switch opcode(req) {
	case opForget, opRelease, opReleaseDir, opBatchForget:
		return true
	}
	return false
}

func ended(c *conn) bool {
	select {
	case <-c.ended:
		return true
	default:
		return false
	}
}

// rejoin counts a reader that answered as waiting again, unless another
// waits already: then it ends.
func (p *poller) rejoin() bool {
	if p.idle.CompareAndSwap(0, 1) {
		return true
	}
	p.mu.Lock()
	p.readers--
	p.mu.Unlock()
	return false
}
