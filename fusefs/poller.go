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
// start another: a second waiting thread would be woken, on the other CPU,
// by a request on another mount (a reader going round mounts, a RELEASE
// and the next OPEN) that the busy reader takes microseconds later. For
// the same reason the reader that a wait gives two connections takes a
// request of each, and answers the one somebody waits for first (a reader
// going round mounts: its OPEN before the RELEASE of the file it closed,
// which nobody waits for), and a reader that reads a RELEASE while another
// connection is ready puts the RELEASE aside and answers it after that
// connection's request (serveOne). More readers start where there is more
// work: the second of two connections whose requests both have a caller
// waiting gets a reader of its own, a handler about to do something slow
// (the store, a synchronous audit write) re-arms its connection and starts
// a reader if none waits (mayBlock), and a reader re-arms a connection
// after maxDrain requests in a row, so a busy mount cannot keep the others
// waiting.
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
	n     atomic.Int32 // connections served

	putAside atomic.Uint64 // requests put aside for another's (serveOne)

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
	p.n.Add(1)
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
	if _, ok := p.conns.LoadAndDelete(c.id); ok {
		p.n.Add(-1)
	}
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
	st := readerBufs.Get().(*readerState)
	defer readerBufs.Put(st)
	in, held, out := st.bufs[:bufSize], st.bufs[bufSize:2*bufSize], st.bufs[2*bufSize:]
	later := &st.later
	if first != nil {
		p.serve(first, in, copy(in, req), out, later)
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
			p.serveTwo(a, b, held, in, out, later)
		case a != nil:
			p.serve(a, in, 0, out, later)
		case b != nil:
			p.serve(b, in, 0, out, later)
		}
		if !p.rejoin() {
			return
		}
	}
}

// serveTwo serves two connections with requests: a request somebody waits
// for before one nobody does, and a reader of its own for the second if
// both have a caller waiting.
func (p *poller) serveTwo(a, b *conn, inA, inB, out []byte, later *aside) {
	ka, kb := a.take(inA), b.take(inB)
	waitA, waitB := ka > 0 && !background(inA[:ka]), kb > 0 && !background(inB[:kb])
	switch {
	case waitA && waitB && p.spawn(b, inB[:kb]):
		p.serve(a, inA, ka, out, later)
	case waitB && !waitA:
		p.serve(b, inB, kb, out, later)
		p.serve(a, inA, ka, out, later)
	default:
		p.serve(a, inA, ka, out, later)
		p.serve(b, inB, kb, out, later)
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
// > 0, in holds the first, taken already. It answers the requests put
// aside last, and those it puts aside, before it returns.
func (p *poller) serve(c *conn, in []byte, k int, out []byte, later *aside) {
	for c != nil {
		c = p.serveOne(c, in, k, out, later)
		k = 0
	}
	later.answer(nil, out)
}

// serveOne is serve for one connection: it returns the next one to
// serve, if a request of c that nobody waits for (a RELEASE, a FORGET)
// was put aside for another connection's ready request. A reader going
// round mounts closes a file on one and opens one on the next: the
// reader that answered the OPEN of the first finds the RELEASE when it
// reads that connection again, and the OPEN it waits for would wait
// behind its answer, a re-arm and a wait. The requests put aside are
// answered after the next reply, while its caller runs.
func (p *poller) serveOne(c *conn, in []byte, k int, out []byte, later *aside) *conn {
	c.use.RLock()
	defer c.use.RUnlock()
	if c.closed {
		return nil // a request taken is dropped: there is no one to answer
	}
	ok := k > 0
	if !ok {
		k, ok = c.read(in)
	}
	c.early.Store(false)
	for i := 1; ok; i++ {
		bg := background(in[:k])
		if bg && later.room(k) && p.n.Load() > 1 {
			if d := p.readyElsewhere(c); d != nil {
				// c's next requests are any reader's meanwhile: the
				// request d has may be a slow one.
				later.put(c, in[:k])
				p.putAside.Add(1)
				if !ended(c) {
					p.rearm(c)
				}
				return d
			}
		}
		c.handle(in[:k], out)
		if !bg {
			later.answer(c, out)
		}
		if c.early.Load() {
			return nil // re-armed: other readers take the rest
		}
		if i == maxDrain {
			break
		}
		k, ok = c.read(in)
	}
	if !ended(c) {
		p.rearm(c)
	}
	return nil
}

// readyElsewhere returns a connection other than c with a request, taking
// its readiness; nil if there is none.
func (p *poller) readyElsewhere(c *conn) *conn {
	var ev [1]unix.EpollEvent
	if n, err := unix.EpollWait(p.epfd, ev[:], 0); err != nil || n != 1 {
		return nil
	}
	d := p.conn(ev[0])
	if d == c { // a handler re-armed c: its next request is any reader's
		p.rearm(c)
		return nil
	}
	return d
}

// aside holds a reader's requests put off for a request somebody waits
// for: a RELEASE or a FORGET is under a hundred bytes.
type aside struct {
	n    int
	conn [4]*conn
	size [4]int
	req  [4][256]byte
}

func (a *aside) room(k int) bool { return a.n < len(a.conn) && k <= len(a.req[0]) }

func (a *aside) put(c *conn, req []byte) {
	a.conn[a.n], a.size[a.n] = c, copy(a.req[a.n][:], req)
	a.n++
}

// answer answers the requests put aside. held is a connection the
// caller holds (serveOne's), to be used as is.
func (a *aside) answer(held *conn, out []byte) {
	for i := range a.n {
		c, req := a.conn[i], a.req[i][:a.size[i]]
		a.conn[i] = nil
		if c == held {
			c.handle(req, out)
			continue
		}
		// A writer holds or waits for c only to close it: there is then
		// no one to answer, and waiting for it while holding held could
		// close a cycle with a reader that holds c and waits for held.
		if !c.use.TryRLock() {
			continue
		}
		if !c.closed {
			c.handle(req, out)
		}
		c.use.RUnlock()
	}
	a.n = 0
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
