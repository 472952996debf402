package fusefs

import (
	"encoding/binary"
	"fmt"
	"sync"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// An open key file is, where the kernel allows it (Linux 6.9, root),
// passed through to a memory file that holds the opened value: the kernel
// then answers its reads itself, and an open+read+close is one round trip
// to keyfs (OPEN) instead of three (OPEN, READ, the READ that finds EOF).
// The memory file is anonymous (memfd), and wiped when the last file
// reading it is released. On a host with swap it is also mapped into
// keyfs while open, so that keyfs's mlockall keeps it out of swap (a map
// and unmap cost about 10 µs an open, so not where nothing can swap).
// Nothing is cached between opens: each is decrypted and audited here.
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
	id   int32  // the kernel's backing id on the connection
	fd   int    // the memory file
	size int    // of the value it holds
	mem  []byte // its locked mapping, on a host with swap
	refs int    // handles reading it
}

// backings are a view's memory files, by node id.
type backings struct {
	mu sync.Mutex
	m  map[uint64]*backing
}

// get returns the memory file of node id, making one that holds pt if no
// file of the node reads one and create is set; nil if not.
func (bs *backings) get(c *conn, id uint64, pt []byte, create bool) (*backing, error) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if b, ok := bs.m[id]; ok {
		b.refs++
		return b, nil
	}
	if !create {
		return nil, nil
	}
	b, err := newBacking(c, pt)
	if err != nil {
		return nil, err
	}
	if bs.m == nil {
		bs.m = map[uint64]*backing{}
	}
	bs.m[id] = b
	return b, nil
}

// put drops a handle's reference; the last one closes and wipes it.
func (bs *backings) put(c *conn, id uint64, b *backing) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if b.refs--; b.refs > 0 {
		return
	}
	delete(bs.m, id)
	b.close(c)
}

// closeAll wipes every memory file: the connection ended.
func (bs *backings) closeAll(c *conn) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	for id, b := range bs.m {
		delete(bs.m, id)
		b.close(c)
	}
}

func (bs *backings) len() int {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	return len(bs.m)
}

func newBacking(c *conn, pt []byte) (*backing, error) {
	fd, err := unix.MemfdCreate("keyfs", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	b := &backing{fd: fd, size: len(pt), refs: 1}
	if err := b.fill(pt); err != nil {
		b.wipe()
		return nil, err
	}
	if b.id, err = openBacking(c, fd); err != nil {
		b.wipe()
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

func (b *backing) fill(pt []byte) error {
	if len(pt) == 0 {
		return nil
	}
	if hostSwaps() {
		if err := unix.Ftruncate(b.fd, int64(len(pt))); err != nil {
			return fmt.Errorf("size the memory file: %w", err)
		}
		mem, err := unix.Mmap(b.fd, 0, len(pt), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return fmt.Errorf("map the memory file: %w", err)
		}
		b.mem = mem
		copy(mem, pt) // faulted in, so locked by mlockall(MCL_FUTURE|MCL_ONFAULT)
		return nil
	}
	if _, err := unix.Pwrite(b.fd, pt, 0); err != nil {
		return fmt.Errorf("write the memory file: %w", err)
	}
	return nil
}

// hostSwaps says whether memory can be swapped out here (asked on every
// new memory file: swap can be turned on at any time).
var hostSwaps = func() bool {
	var si unix.Sysinfo_t
	return unix.Sysinfo(&si) != nil || si.Totalswap > 0
}

func (b *backing) close(c *conn) {
	closeBacking(c, uint32(b.id))
	b.wipe()
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

// wipe overwrites the value and lets the memory file go.
func (b *backing) wipe() {
	if b.mem != nil {
		clear(b.mem)
		unix.Munmap(b.mem)
		b.mem = nil
	} else if b.size > 0 {
		var zero [4096]byte
		for off := 0; off < b.size; off += len(zero) {
			unix.Pwrite(b.fd, zero[:min(len(zero), b.size-off)], int64(off))
		}
	}
	unix.Close(b.fd)
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
