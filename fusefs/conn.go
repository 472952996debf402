package fusefs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// A connection is served by keyfs's own read loop over go-fuse's
// ProtocolServer rather than by fuse.Server, because a successor must be
// able to take over a live /dev/fuse descriptor: fuse.Server always reads
// INIT itself and would swallow the first real request as INIT.

// maxWrite bounds a request (and the max_read mount option); keys are
// small, and the kernel insists on a read buffer this large plus headers.
const maxWrite = 128 << 10

const bufSize = maxWrite + 4096

// Kernel notification codes (include/uapi/linux/fuse.h).
const (
	notifyInvalInode = 2
	notifyInvalEntry = 3
	notifyResend     = 7 // Linux 6.9
	notifyIncEpoch   = 8 // Linux 6.16
)

// resendBit marks a request the kernel sent again after NOTIFY_RESEND.
const resendBit = 1 << 63

// conn is one FUSE connection; the shared poller's readers serve it.
type conn struct {
	id         uint64 // its key in the poller
	fd         int
	mountpoint string
	ps         *fuse.ProtocolServer
	init       []byte // the kernel's INIT request
	reply      []byte // the INIT reply the connection was made with
	dev        string // "major:minor" of the mount, as the mount table shows it
	log        *slog.Logger

	// use is read-locked by a reader while it uses fd, and locked to
	// close it: the number must not be reused under a reader.
	use     sync.RWMutex
	closed  bool
	ended   chan struct{} // closed once the kernel ended the connection
	endOnce sync.Once
	poller  *poller
	early   atomic.Bool // re-armed by mayBlock while a request is handled

	passthrough atomic.Bool     // opens may be given memory files (passthrough.go)
	lostOpen    func(fh uint64) // ends a handle whose OPEN reply the kernel refused
}

// mountConn mounts a FUSE file system served by fs at mountpoint and
// answers the kernel's INIT.
func mountConn(mountpoint string, fs fuse.RawFileSystem, mo *fuse.MountOptions, log *slog.Logger) (*conn, error) {
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return nil, err
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/fuse: %w (load the fuse module, or give the container /dev/fuse)", err)
	}
	data := strings.Join([]string{
		fmt.Sprintf("fd=%d", fd),
		fmt.Sprintf("rootmode=%o", st.Mode&unix.S_IFMT),
		fmt.Sprintf("user_id=%d", os.Geteuid()),
		fmt.Sprintf("group_id=%d", os.Getegid()),
		fmt.Sprintf("max_read=%d", maxWrite),
		"allow_other",         // pods run as other uids
		"default_permissions", // the kernel enforces mode and owner
	}, ",")
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_RDONLY)
	if err := unix.Mount("keyfs", mountpoint, "fuse.keyfs", flags, data); err != nil {
		unix.Close(fd)
		return nil, err
	}
	c := newConn(fd, mountpoint, fs, mo, log)
	fail := func(err error) (*conn, error) {
		unix.Unmount(mountpoint, unix.MNT_DETACH)
		unix.Close(fd)
		return nil, err
	}
	m, err := topMount(mountpoint)
	if err != nil || m == nil {
		return fail(fmt.Errorf("the new mount is not in the mount table: %v", err))
	}
	c.dev = fmt.Sprintf("%d:%d", m.Major, m.Minor)
	in := make([]byte, bufSize)
	n, err := readRequest(fd, in)
	if err != nil {
		return fail(fmt.Errorf("read INIT: %w", err))
	}
	c.init = bytes.Clone(in[:n])
	out := make([]byte, bufSize)
	k, st2 := c.ps.HandleRequest([][]byte{c.init}, [][]byte{out})
	if !st2.Ok() || k == 0 {
		return fail(fmt.Errorf("answer INIT: %v", st2))
	}
	c.reply = bytes.Clone(out[:k])
	if _, err := unix.Write(fd, c.reply); err != nil {
		return fail(fmt.Errorf("write INIT reply: %w", err))
	}
	c.passthrough.Store(negotiatedPassthrough(c.reply))
	return c, nil
}

func newConn(fd int, mountpoint string, fs fuse.RawFileSystem, mo *fuse.MountOptions, log *slog.Logger) *conn {
	return &conn{
		fd:         fd,
		mountpoint: mountpoint,
		ps:         fuse.NewProtocolServer(fs, mo),
		log:        log,
		ended:      make(chan struct{}),
	}
}

// resumeConn takes over a connection another process mounted: it replays
// the saved INIT, so the protocol server parses requests as negotiated,
// and refuses if this server would have negotiated differently.
func resumeConn(sess Session, fs fuse.RawFileSystem, mo *fuse.MountOptions, log *slog.Logger) (*conn, error) {
	unix.CloseOnExec(sess.FD)
	c := newConn(sess.FD, sess.Mountpoint, fs, mo, log)
	c.init, c.reply, c.dev = sess.Init, sess.Reply, sess.Dev
	c.passthrough.Store(negotiatedPassthrough(sess.Reply))
	out := make([]byte, bufSize)
	m, st := c.ps.HandleRequest([][]byte{bytes.Clone(sess.Init)}, [][]byte{out})
	if !st.Ok() {
		return nil, fmt.Errorf("replay INIT: %v", st)
	}
	// A keyfs from before passthrough made its connections without a
	// stacking depth: serve them as it did, without.
	if !bytes.Equal(withoutStackDepth(out[:m]), withoutStackDepth(sess.Reply)) {
		return nil, fmt.Errorf("this keyfs would negotiate %s, the connection was made with %s: "+
			"run the version that mounted it, or restart the pods that read it", describeInit(out[:m]), describeInit(sess.Reply))
	}
	return c, nil
}

// topMount returns the topmost mount at exactly path, or nil.
func topMount(path string) (*mountinfo.Info, error) {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(path))
	if err != nil || len(ms) == 0 {
		return nil, err
	}
	return ms[len(ms)-1], nil
}

// mounted says whether the topmost mount at the mountpoint is this
// connection's, by the mount table: not a newer mount someone else made
// there after this one was detached.
func (c *conn) mounted() (bool, error) {
	m, err := topMount(c.mountpoint)
	if err != nil || m == nil {
		return false, err
	}
	return fmt.Sprintf("%d:%d", m.Major, m.Minor) == c.dev, nil
}

// initOut decodes an INIT reply; false if there is none.
func initOut(reply []byte) (fuse.InitOut, bool) {
	const hdr = int(unsafe.Sizeof(fuse.OutHeader{}))
	var o fuse.InitOut
	if len(reply) < hdr {
		return o, false
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&o)), unsafe.Sizeof(o)), reply[hdr:])
	return o, true
}

// describeInit summarizes an INIT reply for an error message.
func describeInit(reply []byte) string {
	o, ok := initOut(reply)
	if !ok {
		return "nothing"
	}
	return fmt.Sprintf("protocol 7.%d, flags %#x, max_write %d, max_pages %d", o.Minor, o.Flags64(), o.MaxWrite, o.MaxPages)
}

func readRequest(fd int, buf []byte) (int, error) {
	for {
		n, err := unix.Read(fd, buf)
		// EINTR: a signal; ENOENT: the request was interrupted before
		// we read it; EAGAIN: another reader took it.
		if err == unix.EINTR || err == unix.ENOENT || err == unix.EAGAIN {
			continue
		}
		return n, err
	}
}

// serve adds the connection to the process's poller.
func (c *conn) serve() error {
	p, err := sharedPoller()
	if err != nil {
		return fmt.Errorf("epoll: %w", err)
	}
	c.poller = p
	// The flag is the open file's, shared with the holder's copy and
	// with successors; a successor of this version sets it again.
	if err := unix.SetNonblock(c.fd, true); err != nil {
		return err
	}
	return p.add(c)
}

// readerBufs holds readers' buffers (two requests, one reply, the
// requests put aside): readers come and go with the load, and fresh
// buffers of 264 kB each made most of a busy daemon's garbage.
var readerBufs = sync.Pool{New: func() any { return new(readerState) }}

type readerState struct {
	bufs  [3 * bufSize]byte
	later aside // empty between serves
}

// read reads the request the poller saw; false when there was none.
func (c *conn) read(in []byte) (int, bool) {
	n, err := unix.Read(c.fd, in)
	switch err {
	case nil:
		return n, true
	case unix.EAGAIN, unix.EINTR, unix.ENOENT: // taken, or interrupted: see readRequest
		return 0, false
	case unix.ENODEV: // unmounted, the connection is over
	default:
		c.log.Error("read FUSE request", "mountpoint", c.mountpoint, "err", err)
	}
	c.end()
	return 0, false
}

// take reads one request under use, for a reader that answers another
// connection's first; 0 if there was none.
func (c *conn) take(in []byte) int {
	c.use.RLock()
	defer c.use.RUnlock()
	if c.closed {
		return 0
	}
	n, _ := c.read(in)
	return n
}

// mayBlock is called by a handler before something that can take long
// (the store, a synchronous audit write): the connection is re-armed and
// a reader waits, so its next requests and other mounts' are answered
// meanwhile.
func (c *conn) mayBlock() {
	if c != nil && c.early.CompareAndSwap(false, true) {
		c.poller.mayBlock()
		c.poller.rearm(c)
	}
}

// handle answers a request.
func (c *conn) handle(req, out []byte) {
	m, st := c.ps.HandleRequest([][]byte{req}, [][]byte{out})
	if st.Ok() && m > 0 {
		// ENOENT: the request was interrupted meanwhile.
		if _, err := unix.Write(c.fd, out[:m]); err != nil {
			if err != unix.ENOENT {
				c.log.Debug("write FUSE reply", "mountpoint", c.mountpoint, "err", err)
			}
			c.lost(req, out[:m])
		}
	}
	clear(out[:m]) // a READ reply held plaintext
}

// lost ends the handle of an OPEN whose reply the kernel did not take:
// no RELEASE will come for it.
func (c *conn) lost(req, reply []byte) {
	const out = int(unsafe.Sizeof(fuse.OutHeader{}))
	if c.lostOpen != nil && opcode(req) == opOpen && len(reply) >= out+8 && int32(binary.NativeEndian.Uint32(reply[4:])) == 0 {
		c.lostOpen(binary.NativeEndian.Uint64(reply[out:]))
	}
}

// opcode is a request's FUSE opcode; 0 if it is too short for a header.
func opcode(req []byte) uint32 {
	if len(req) < int(unsafe.Sizeof(fuse.InHeader{})) {
		return 0
	}
	return binary.NativeEndian.Uint32(req[4:])
}

// Opcodes (include/uapi/linux/fuse.h).
const (
	opForget      = 2
	opOpen        = 14
	opRelease     = 18
	opReleaseDir  = 29
	opBatchForget = 42
)

// end stops serving a connection the kernel ended.
func (c *conn) end() {
	c.endOnce.Do(func() {
		c.poller.remove(c)
		close(c.ended)
	})
}

// close closes the descriptor once no reader uses it.
func (c *conn) close() {
	c.use.Lock()
	defer c.use.Unlock()
	c.closed = true
	unix.Close(c.fd)
}

// pollProbe polls a file on the mount once, so that the kernel gets
// ENOSYS and never sends POLL again on this connection. go-fuse's protocol
// server answers for its probe file itself.
func (c *conn) pollProbe() error {
	fd, err := unix.Open(filepath.Join(c.mountpoint, ".go-fuse-epoll-hack"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	_, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
	return err
}

// notify writes a notification; the kernel answers ENOENT for an entry or
// inode it does not hold, which is not an error here.
func (c *conn) notify(code int32, payload ...[]byte) error {
	size := int(unsafe.Sizeof(fuse.OutHeader{}))
	for _, p := range payload {
		size += len(p)
	}
	h := fuse.OutHeader{Length: uint32(size), Status: code}
	iov := append([][]byte{unsafe.Slice((*byte)(unsafe.Pointer(&h)), unsafe.Sizeof(h))}, payload...)
	_, err := unix.Writev(c.fd, iov)
	if err == unix.ENOENT {
		return nil
	}
	return err
}

func (c *conn) invalEntry(parent uint64, name string) error {
	var p [16]byte
	binary.NativeEndian.PutUint64(p[0:], parent)
	binary.NativeEndian.PutUint32(p[8:], uint32(len(name)))
	return c.notify(notifyInvalEntry, p[:], append([]byte(name), 0))
}

func (c *conn) invalInode(ino uint64) error {
	var p [24]byte // ino, offset 0, length 0: attributes and all data
	binary.NativeEndian.PutUint64(p[0:], ino)
	return c.notify(notifyInvalInode, p[:])
}

// Session is what a successor needs to serve a view another process
// mounted: the connection's /dev/fuse descriptor, and the INIT exchange
// the kernel had with the first server (the kernel sends INIT once).
type Session struct {
	Mountpoint  string
	Dev         string // the mount's "major:minor" in the mount table
	FD          int
	Init, Reply []byte
}

const sessionMagic = "keyfs-fuse-session v1\n"

// MarshalState encodes everything of the session but its descriptor.
func (s Session) MarshalState() []byte {
	b := []byte(sessionMagic)
	for _, f := range [][]byte{[]byte(s.Mountpoint), []byte(s.Dev), s.Init, s.Reply} {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

// ParseSession decodes MarshalState's form; fd is the descriptor that came
// with it.
func ParseSession(state []byte, fd int) (Session, error) {
	rest, ok := bytes.CutPrefix(state, []byte(sessionMagic))
	if !ok {
		return Session{}, errors.New("not a keyfs FUSE session")
	}
	var f [4][]byte
	for i := range f {
		if len(rest) < 4 || uint32(len(rest)-4) < binary.BigEndian.Uint32(rest) {
			return Session{}, errors.New("truncated keyfs FUSE session")
		}
		n := binary.BigEndian.Uint32(rest)
		f[i], rest = bytes.Clone(rest[4:4+n]), rest[4+n:]
	}
	return Session{Mountpoint: string(f[0]), Dev: string(f[1]), FD: fd, Init: f[2], Reply: f[3]}, nil
}
