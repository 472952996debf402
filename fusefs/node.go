package fusefs

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/keystore"
)

// rootNode lists the visible tenants.
type rootNode struct {
	fs.Inode
	s *Server
}

var (
	_ fs.NodeLookuper  = (*rootNode)(nil)
	_ fs.NodeReaddirer = (*rootNode)(nil)
	_ fs.NodeGetattrer = (*rootNode)(nil)
)

func (r *rootNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	r.s.dirAttr(&out.Attr)
	return 0
}

func (r *rootNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if r.s.visibleTenant(name) == nil {
		return nil, syscall.ENOENT
	}
	r.s.dirAttr(&out.Attr)
	n := &tenantNode{s: r.s, name: name}
	return r.NewInode(ctx, n, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: r.s.ino(name)}), 0
}

func (r *rootNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	snap := r.s.snap.Load()
	var es []fuse.DirEntry
	for _, name := range snap.Tenants() {
		if r.s.visible(name, snap.Tenant(name)) {
			es = append(es, fuse.DirEntry{Name: name, Mode: syscall.S_IFDIR, Ino: r.s.ino(name)})
		}
	}
	return fs.NewListDirStream(es), 0
}

func (s *Server) dirAttr(a *fuse.Attr) {
	a.Mode = syscall.S_IFDIR | 0o555
	a.Nlink = 2
	a.Owner = fuse.Owner{Uid: s.o.UID, Gid: s.o.GID}
	a.SetTimes(nil, &s.mtime, &s.mtime)
}

// tenantNode lists one tenant's visible keys.
type tenantNode struct {
	fs.Inode
	s    *Server
	name string
}

var (
	_ fs.NodeLookuper  = (*tenantNode)(nil)
	_ fs.NodeReaddirer = (*tenantNode)(nil)
	_ fs.NodeGetattrer = (*tenantNode)(nil)
)

func (d *tenantNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.s.dirAttr(&out.Attr)
	return 0
}

func (d *tenantNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	v := d.s.key(d.s.visibleTenant(d.name), name)
	if v == nil {
		return nil, syscall.ENOENT
	}
	ch := d.NewInode(ctx, &keyNode{s: d.s, tenant: d.name, name: name},
		fs.StableAttr{Mode: syscall.S_IFREG, Ino: d.s.ino(d.name + "/" + name)})
	ch.Operations().(*keyNode).fileAttr(v, &out.Attr)
	return ch, 0
}

func (d *tenantNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	t := d.s.visibleTenant(d.name)
	if t == nil {
		return nil, syscall.ENOENT
	}
	names := d.s.keyNames(t)
	es := make([]fuse.DirEntry, 0, len(names))
	for _, name := range names {
		es = append(es, fuse.DirEntry{Name: name, Mode: syscall.S_IFREG, Ino: d.s.ino(d.name + "/" + name)})
	}
	return fs.NewListDirStream(es), 0
}

// keyNode is one key file: tenant/name, always its newest version.
type keyNode struct {
	fs.Inode
	s            *Server
	tenant, name string
	served       atomic.Pointer[keystore.Key] // whose attributes the kernel last got
}

var (
	_ fs.NodeGetattrer = (*keyNode)(nil)
	_ fs.NodeOpener    = (*keyNode)(nil)
)

func (k *keyNode) fileAttr(v *keystore.Key, a *fuse.Attr) {
	size, created := v.Attrs()
	k.served.Store(v)
	a.Mode = syscall.S_IFREG | k.s.o.FileMode
	a.Nlink = 1
	a.Size = uint64(size)
	a.Owner = fuse.Owner{Uid: k.s.o.UID, Gid: k.s.o.GID}
	a.SetTimes(nil, &created, &created)
}

func (k *keyNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if h, ok := f.(*handle); ok {
		k.fileAttr(h.v, &out.Attr) // fstat describes what the fd reads
		return 0
	}
	v := k.s.key(k.s.visibleTenant(k.tenant), k.name)
	if v == nil {
		return syscall.ENOENT
	}
	k.fileAttr(v, &out.Attr)
	return 0
}

// Open decrypts the newest version, so a bad record fails here, with EIO,
// and the audit trail names the version the reader got.
func (k *keyNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EROFS
	}
	start := time.Now()
	h, err := k.open(ctx)
	if k.s.o.OnRead != nil {
		k.s.o.OnRead(k.tenant, time.Since(start), err)
	}
	if errors.Is(err, keystore.ErrNotFound) {
		return nil, 0, syscall.ENOENT // removed meanwhile
	}
	if err != nil {
		return nil, 0, syscall.EIO
	}
	// NOFLUSH: close needs no round trip; DIRECT_IO: no page cache.
	return h, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_NOFLUSH, 0
}

// open returns the handle, or why not: keystore.ErrNotFound for a key
// this view no longer shows, else what kept the record from opening.
func (k *keyNode) open(ctx context.Context) (*handle, error) {
	s := k.s
	v := s.key(s.visibleTenant(k.tenant), k.name)
	if v == nil {
		return nil, fmt.Errorf("%s/%s: %w", k.tenant, k.name, keystore.ErrNotFound)
	}
	rec, err := v.Record()
	// Rotations pruned the version the snapshot names: take the newest.
	for try := 0; errors.Is(err, keystore.ErrNotFound) && try < 5; try++ {
		if rerr := s.o.Store.Refresh(); rerr != nil {
			break
		}
		if v = s.key(s.o.Store.Snapshot().Tenant(k.tenant), k.name); v == nil {
			break
		}
		rec, err = v.Record()
	}
	if v == nil || errors.Is(err, keystore.ErrNotFound) {
		return nil, fmt.Errorf("%s/%s: %w", k.tenant, k.name, keystore.ErrNotFound) // removed meanwhile
	}
	ev := s.event(ctx, k.tenant, k.name, v.Version)
	var pt []byte
	if err == nil {
		pt, err = s.o.Key.Open(rec, k.tenant, k.name)
	}
	if err != nil {
		ev.Event, ev.Reason = "error", err.Error()
		s.o.Audit.Log(ev)
		s.log.Error("cannot open key", "tenant", k.tenant, "key", k.name, "version", v.Version, "pid", ev.PID, "err", err)
		return nil, err
	}
	if s.o.AuditRequired {
		if aerr := s.o.Audit.Log(ev); aerr != nil {
			clear(pt)
			return nil, fmt.Errorf("%w: %w", ErrAuditFailed, aerr)
		}
	} else {
		s.o.Audit.Go(ev) // written after the reply, when the logger has a queue
	}
	return &handle{v: v, rec: rec, pt: pt, key: s.o.Key}, nil
}

// event is an audit event for the caller of ctx.
func (s *Server) event(ctx context.Context, tenant, key string, version uint64) audit.Event {
	ev := s.o.Pod
	ev.Time, ev.Event, ev.Reason = time.Time{}, "open", ""
	ev.Tenant, ev.Key, ev.Version = tenant, key, version
	if c, ok := fuse.FromContext(ctx); ok {
		uid, gid := c.Uid, c.Gid
		ci := s.callers.get(c.Pid, ev.PodUID == "")
		ev.PID, ev.UID, ev.GID = ci.pid, &uid, &gid
		if ev.PodUID == "" {
			ev.PodUID = ci.podUID
		}
	}
	return ev
}

// handle is one open key file. It pins the record opened, so every read
// through it sees one version. The plaintext is kept only until a read has
// delivered its end (or the file is released) and is wiped once go-fuse has
// written the last reply that refers to it.
type handle struct {
	v   *keystore.Key
	rec *keystore.Record
	key *keystore.MasterKey

	mu       sync.Mutex
	pt       []byte // nil once wiped
	inflight int    // replies still referring to pt
	drop     bool   // wipe pt when inflight reaches 0
}

var (
	_ fs.FileReader   = (*handle)(nil)
	_ fs.FileReleaser = (*handle)(nil)
)

func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size := int64(h.rec.Size())
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.pt == nil { // read again after the end was delivered
		pt, err := h.key.Open(h.rec, h.v.Tenant, h.v.Name)
		if err != nil {
			return nil, syscall.EIO
		}
		h.pt = pt
	}
	end := min(off+int64(len(dest)), size)
	h.inflight++
	if end == size {
		h.drop = true
	}
	return &reply{h: h, data: h.pt[off:end]}, 0
}

// Release wipes unconditionally: a reply whose read was interrupted may
// never call Done, and nobody waits for it any more.
func (h *handle) Release(ctx context.Context) syscall.Errno {
	h.mu.Lock()
	defer h.mu.Unlock()
	clear(h.pt)
	h.pt = nil
	return 0
}

func (h *handle) done() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.inflight--
	h.wipeLocked()
}

func (h *handle) wipeLocked() {
	if h.drop && h.inflight == 0 {
		clear(h.pt)
		h.pt = nil
		h.drop = false
	}
}

// reply hands plaintext to go-fuse without copying it into go-fuse's
// buffers, which are reused unwiped. Slices makes go-fuse writev it and
// call Done only after the reply is written.
type reply struct {
	h    *handle
	data []byte
}

func (r *reply) Size() int                          { return len(r.data) }
func (r *reply) Bytes([]byte) ([]byte, fuse.Status) { return r.data, fuse.OK }
func (r *reply) Slices() ([][]byte, fuse.Status)    { return [][]byte{r.data}, fuse.OK }
func (r *reply) Done()                              { r.h.done() }
