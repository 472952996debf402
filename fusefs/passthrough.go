package fusefs

import (
	"container/list"
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// An open key file is, where the kernel allows it (Linux 6.9, root),
// passed through to a memory file that holds the opened value: the kernel
// then answers its reads itself, and an open+read+close is one round trip
// to keyfs (OPEN) instead of three (OPEN, READ, the READ that finds EOF).
// The memory file is anonymous (memfd), mapped into keyfs so that
// keyfs's mlockall keeps it out of swap, and wiped when the last file
// reading it is released. Nothing is cached between opens: each is
// decrypted and audited here.
//
// A wiped memory file stays registered with its inode, and the next open
// of that inode copies the value into it again: making, mapping,
// registering, unregistering and closing one cost more than a third of a
// read, and a reader going round more keys than are kept waits twice as
// long for each. The views of a process keep idleBudget files in all,
// shared out equally among the views that keep any, minIdle at least
// each: one view (a gateway reading every tenant's key) keeps a thousand,
// 110 volumes 16 each. An inode is one version of one key of one view,
// so a process that kept such a file mapped after closing it sees zeros,
// and while the key is open again the value it read already, never
// another.
//
// The kernel lets an inode read from one backing file at a time, and
// refuses (EIO) a direct I/O open of an inode that has one: opens of a
// key that is open already share its memory file, and each version is an
// inode of its own (node.go).

// /dev/fuse ioctls (include/uapi/linux/fuse.h): _IOW(229, 1, struct
// fuse_backing_map) and _IOW(229, 2, uint32_t).
const (
	iocBackingOpen  = 0x4010e501
	iocBackingClose = 0x4004e502
)

// backing is the memory file the open files of one key inode (one
// version) read.
type backing struct {
	id   int32         // the kernel's backing id on the connection
	fd   int           // the memory file
	mem  []byte        // its mapping, locked: the value, or zeros
	refs int           // handles reading it; 0: wiped, kept for the next open
	idle *list.Element // in backings.idle while wiped
}

// idleBudget bounds the wiped memory files the views keep for the next
// open, minIdle what one keeps at least: a value is 4 KiB of locked
// memory and a descriptor, mostly. A variable for tests.
var idleBudget = 1024

const minIdle = 16

// keepers counts the views with memory files.
var keepers atomic.Int32

// idleShare is what one view may keep.
func idleShare() int { return max(minIdle, idleBudget/max(1, int(keepers.Load()))) }

// backings are a view's memory files, by node id.
type backings struct {
	mu   sync.Mutex
	m    map[uint64]*backing
	idle list.List // of node ids whose file is wiped, least recently used first
}

// get returns the memory file of node id, holding pt: the one the node's
// open files read, else (if create is set) its wiped one filled again or
// a new one; nil if none.
func (bs *backings) get(c *conn, id uint64, pt []byte, create bool) (*backing, error) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	b, ok := bs.m[id]
	switch {
	case ok && b.refs > 0:
		b.refs++
		return b, nil
	case !create:
		return nil, nil
	case ok:
		// A value of another size under the same version (a record
		// applied again under its number) gets a file of its own: the
		// kept one and its mapping have the old size.
		if len(b.mem) == len(pt) && b.fill(pt) == nil {
			bs.idle.Remove(b.idle)
			b.idle, b.refs = nil, 1
			return b, nil
		}
		bs.drop(c, id)
	}
	b, err := newBacking(c, pt)
	if err != nil {
		return nil, err
	}
	if bs.m == nil {
		bs.m = map[uint64]*backing{}
		keepers.Add(1)
	}
	bs.m[id] = b
	return b, nil
}

// put drops a handle's reference; the last one wipes the file and keeps
// it for the next open, closing the least recently used beyond the
// view's share.
func (bs *backings) put(c *conn, id uint64, b *backing) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if b.refs--; b.refs > 0 {
		return
	}
	clear(b.mem)
	b.idle = bs.idle.PushBack(id)
	for n := idleShare(); bs.idle.Len() > n; {
		bs.drop(c, bs.idle.Front().Value.(uint64))
	}
}

// forget closes node id's wiped file: the kernel dropped the inode.
func (bs *backings) forget(c *conn, id uint64) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if b, ok := bs.m[id]; ok && b.refs == 0 {
		bs.drop(c, id)
	}
}

// drop closes node id's wiped file; bs.mu is held.
func (bs *backings) drop(c *conn, id uint64) {
	b := bs.m[id]
	if b.idle != nil {
		bs.idle.Remove(b.idle)
	}
	b.close(c)
	delete(bs.m, id)
}

// closeAll wipes and closes every memory file: the connection ended.
func (bs *backings) closeAll(c *conn) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	for id, b := range bs.m {
		delete(bs.m, id)
		b.close(c)
	}
	if bs.m != nil {
		bs.m = nil
		keepers.Add(-1)
	}
	bs.idle.Init()
}

// inUse counts the memory files open files read.
func (bs *backings) inUse() int {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	n := 0
	for _, b := range bs.m {
		if b.refs > 0 {
			n++
		}
	}
	return n
}

func newBacking(c *conn, pt []byte) (*backing, error) {
	fd, err := unix.MemfdCreate("keyfs", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	b := &backing{fd: fd, refs: 1}
	if err := b.fill(pt); err != nil {
		b.close(nil)
		return nil, err
	}
	if b.id, err = openBacking(c, fd); err != nil {
		b.close(nil)
		return nil, err
	}
	return b, nil
}

// openBacking registers memory file fd with c; the id names it in OPEN
// replies.
func openBacking(c *conn, fd int) (int32, error) {
	m := fuse.BackingMap{Fd: int32(fd)}
	id, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), iocBackingOpen, uintptr(unsafe.Pointer(&m)))
	if errno != 0 {
		return 0, fmt.Errorf("register the memory file with the FUSE connection: %w", errno)
	}
	return int32(id), nil
}

// fill writes pt into the file: a new one, or one wiped of pt's size.
// The file is mapped into keyfs, so keyfs's mlockall keeps it out of
// swap, and filling and wiping it are copies, not system calls.
func (b *backing) fill(pt []byte) error {
	if len(pt) == 0 {
		return nil
	}
	if b.mem == nil {
		if err := unix.Ftruncate(b.fd, int64(len(pt))); err != nil {
			return fmt.Errorf("size the memory file: %w", err)
		}
		mem, err := unix.Mmap(b.fd, 0, len(pt), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return fmt.Errorf("map the memory file: %w", err)
		}
		b.mem = mem
	}
	copy(b.mem, pt) // faulted in, so locked by mlockall(MCL_FUTURE|MCL_ONFAULT)
	return nil
}

// close unregisters (c nil: it never was), wipes and closes the file.
func (b *backing) close(c *conn) {
	if c != nil {
		closeBacking(c, uint32(b.id))
	}
	if b.mem != nil {
		clear(b.mem)
		unix.Munmap(b.mem)
		b.mem = nil
	}
	unix.Close(b.fd)
}

func closeBacking(c *conn, id uint32) {
	unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), iocBackingClose, uintptr(unsafe.Pointer(&id)))
}

// dropStale unregisters the memory files a killed predecessor left on c
// (its files still open keep theirs; the rest are freed). The kernel
// numbers them in increasing order, so every one below the number this
// server gets first was a predecessor's. Call it before serving c.
func dropStale(c *conn) {
	fd, err := unix.MemfdCreate("keyfs", unix.MFD_CLOEXEC)
	if err != nil {
		return
	}
	first, err := openBacking(c, fd)
	unix.Close(fd)
	if err != nil {
		return
	}
	go func() {
		for id := uint32(1); id <= uint32(first); id++ {
			// The descriptor's number must not be another's by now.
			c.use.RLock()
			if !c.closed {
				closeBacking(c, id)
			}
			c.use.RUnlock()
		}
	}()
}

// negotiatedPassthrough says whether an INIT reply enabled passthrough:
// the kernel takes it only with a stacking depth.
func negotiatedPassthrough(reply []byte) bool {
	o, ok := initOut(reply)
	return ok && o.Flags64()&fuse.CAP_PASSTHROUGH != 0 && o.MaxStackDepth > 0
}

// withoutStackDepth returns an INIT reply with its stacking depth zeroed:
// a keyfs from before passthrough made its connections without one.
func withoutStackDepth(reply []byte) []byte {
	const off = int(unsafe.Sizeof(fuse.OutHeader{})) + int(unsafe.Offsetof(fuse.InitOut{}.MaxStackDepth))
	r := append([]byte(nil), reply...)
	if len(r) >= off+4 {
		binary.NativeEndian.PutUint32(r[off:], 0)
	}
	return r
}

// passThrough gives h, opened on node id, a memory file to read from;
// false when h is to be read through keyfs (direct I/O). An inode that
// has one must get it: the kernel refuses direct I/O on it.
func (s *Server) passThrough(id uint64, h *handle) bool {
	if s.salt == 0 {
		return false
	}
	b, err := s.backings.get(s.conn, id, h.pt, s.conn.passthrough.Load())
	if err != nil {
		if s.conn.passthrough.CompareAndSwap(true, false) {
			s.log.Warn("key files of this view are read through keyfs from now on, not from memory files (slower, as safe)",
				"mountpoint", s.conn.mountpoint, "err", err)
		}
		return false
	}
	if b == nil {
		return false
	}
	h.b, h.node = b, id
	h.release() // the memory file holds the value now
	return true
}
