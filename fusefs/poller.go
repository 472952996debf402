package fusefs

import (
	"runtime"
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
// halted vCPU woken for either direction. A handler about to do something
// slow (the store, a synchronous audit write) re-arms first (mayBlock),
// so other requests of its mount go to other readers; a reader that
// takes a request while no other waits starts one, so other mounts never
// wait for a slow one.
//
// Descriptors are non-blocking: a request can vanish between the event
// and the read (its caller was killed), and a blocking read would then
// wait for the next request of that one mount.

// maxReaders bounds the readers, busy or not; maxIdle those waiting: a
// reader that answered waits again only while fewer wait, else it ends.
// More waiting threads only spread the kernel's wake-ups over more
// (colder) threads.
const maxReaders = 256

var maxIdle = int32(max(2, min(16, runtime.GOMAXPROCS(0))))

type poller struct {
	epfd  int
	conns sync.Map // id → *conn, the epoll data of its descriptor
	ids   atomic.Uint64

	mu      sync.Mutex // starting readers
	readers int
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
		thePoller.spawn()
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

// spawn adds a reader, unless there are maxReaders already.
func (p *poller) spawn() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.readers == maxReaders {
		return
	}
	p.readers++
	p.idle.Add(1)
	go p.reader()
}

func (p *poller) reader() {
	bufs := readerBufs.Get().(*[2 * bufSize]byte)
	defer readerBufs.Put(bufs)
	in, out := bufs[:bufSize], bufs[bufSize:]
	var ev [1]unix.EpollEvent
	for {
		n, err := unix.EpollWait(p.epfd, ev[:], -1)
		if err != nil || n == 0 {
			continue // EINTR
		}
		v, ok := p.conns.Load(uint64(uint32(ev[0].Fd)) | uint64(uint32(ev[0].Pad))<<32)
		if !ok {
			continue // removed meanwhile
		}
		if p.idle.Add(-1) == 0 {
			p.spawn() // keep one reader waiting while this one works
		}
		p.serve(v.(*conn), in, out)
		if !p.rejoin() {
			return
		}
	}
}

// serve answers the requests of c until none is there, or a handler
// re-armed c, then re-arms c.
func (p *poller) serve(c *conn, in, out []byte) {
	c.use.RLock()
	defer c.use.RUnlock()
	if c.closed {
		return
	}
	n, ok := c.read(in)
	c.early.Store(false)
	for ok {
		c.handle(in[:n], out)
		if c.early.Load() {
			break // re-armed: other readers take the rest
		}
		n, ok = c.read(in)
	}
	if !ended(c) {
		p.rearm(c)
	}
}

func ended(c *conn) bool {
	select {
	case <-c.ended:
		return true
	default:
		return false
	}
}

// rejoin counts a reader that answered as waiting again, unless enough
// wait already: then it ends.
func (p *poller) rejoin() bool {
	for {
		n := p.idle.Load()
		if n >= maxIdle {
			p.mu.Lock()
			p.readers--
			p.mu.Unlock()
			return false
		}
		if p.idle.CompareAndSwap(n, n+1) {
			return true
		}
	}
}
