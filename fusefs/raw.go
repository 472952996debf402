package fusefs

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/keystore"
)

// rawFS answers the kernel for one view. It keeps no state the kernel
// depends on that a successor could not rebuild: node ids are hashes of
// names (nodeID), file handles name the version they read.
type rawFS struct {
	fuse.RawFileSystem // ENOSYS for everything not below
	s                  *Server
}

func (fs *rawFS) String() string { return "keyfs" }

func (fs *rawFS) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	s := fs.s
	if h.NodeId == rootID {
		if s.visibleTenant(name) == nil {
			return fuse.ENOENT
		}
		id := nodeID(name, "")
		if !s.nodes.add(id, name, "", 0, 1, nil) {
			return s.collision(name, "")
		}
		out.NodeId, out.Attr.Ino = id, id
		s.dirAttr(&out.Attr)
	} else {
		e, ok := s.nodes.get(h.NodeId)
		if !ok || e.key != "" {
			return fuse.ENOENT
		}
		v := s.key(s.visibleTenant(e.tenant), name)
		if v == nil {
			return fuse.ENOENT
		}
		id, version := s.keyID(e.tenant, name, v)
		if !s.nodes.add(id, e.tenant, name, version, 1, v) {
			return s.collision(e.tenant, name)
		}
		out.NodeId, out.Attr.Ino = id, id
		s.fileAttr(v, &out.Attr)
	}
	out.SetEntryTimeout(cacheTimeout)
	out.SetAttrTimeout(cacheTimeout)
	return fuse.OK
}

func (s *Server) collision(tenant, key string) fuse.Status {
	s.log.Error("node id collision: this name cannot be served in this view", "tenant", tenant, "key", key)
	return fuse.EIO
}

func (fs *rawFS) Forget(id, n uint64) {
	if fs.s.nodes.forget(id, n) {
		fs.s.backings.forget(fs.s.conn, id)
	}
}

func (fs *rawFS) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	s := fs.s
	out.SetTimeout(cacheTimeout)
	if in.NodeId == rootID {
		s.dirAttr(&out.Attr)
		out.Ino = rootID
		return fuse.OK
	}
	e, ok := s.nodes.get(in.NodeId)
	if !ok {
		return s.unknown()
	}
	out.Ino = in.NodeId
	if e.key == "" {
		if s.visibleTenant(e.tenant) == nil {
			return fuse.ENOENT
		}
		s.dirAttr(&out.Attr)
		return fuse.OK
	}
	if in.Flags()&fuse.FUSE_GETATTR_FH != 0 {
		if h := s.handles.get(in.Fh()); h != nil {
			s.fileAttr(h.v, &out.Attr) // fstat describes what the fd reads
			s.nodes.setServed(in.NodeId, h.v)
			return fuse.OK
		}
	}
	v := s.key(s.visibleTenant(e.tenant), e.key)
	if v == nil {
		return fuse.ENOENT
	}
	if e.stale(v) {
		return fuse.Status(syscall.ESTALE) // the name is another inode now
	}
	s.fileAttr(v, &out.Attr)
	s.nodes.setServed(in.NodeId, v)
	return fuse.OK
}

// unknown answers for a node id the table lacks: on a passthrough
// connection it can be a predecessor's (stale: the kernel looks the
// name up again), else the name is gone.
func (s *Server) unknown() fuse.Status {
	if s.salt != 0 {
		return fuse.Status(syscall.ESTALE)
	}
	return fuse.ENOENT
}

func (s *Server) dirAttr(a *fuse.Attr) {
	a.Mode = syscall.S_IFDIR | 0o555
	a.Nlink = 2
	a.Owner = fuse.Owner{Uid: s.o.UID, Gid: s.o.GID}
	a.SetTimes(nil, &s.mtime, &s.mtime)
}

// loading is called before v's record is needed: when it is not in
// memory it is read from the store, which can take long.
func (s *Server) loading(v *keystore.Key) {
	if !v.Cached() {
		s.conn.mayBlock()
	}
}

func (s *Server) fileAttr(v *keystore.Key, a *fuse.Attr) {
	s.loading(v)
	size, created := v.Attrs()
	a.Mode = syscall.S_IFREG | s.o.FileMode
	a.Nlink = 1
	a.Size = uint64(size)
	a.Owner = fuse.Owner{Uid: s.o.UID, Gid: s.o.GID}
	a.SetTimes(nil, &created, &created)
}

func (fs *rawFS) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId == rootID {
		return fuse.OK
	}
	if e, ok := fs.s.nodes.get(in.NodeId); ok && e.key == "" && fs.s.visibleTenant(e.tenant) != nil {
		return fuse.OK
	}
	return fuse.ENOENT
}

// ReadDir lists the directory as it is now; offsets are positions in
// that listing ("." and ".." first).
func (fs *rawFS) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	s := fs.s
	es := []fuse.DirEntry{{Name: ".", Mode: syscall.S_IFDIR, Ino: in.NodeId}, {Name: "..", Mode: syscall.S_IFDIR, Ino: rootID}}
	if in.NodeId == rootID {
		snap := s.snap.Load()
		for _, name := range snap.Tenants() {
			if s.visible(name, snap.Tenant(name)) {
				es = append(es, fuse.DirEntry{Name: name, Mode: syscall.S_IFDIR, Ino: nodeID(name, "")})
			}
		}
	} else {
		e, ok := s.nodes.get(in.NodeId)
		if !ok || e.key != "" {
			return fuse.ENOENT
		}
		t := s.visibleTenant(e.tenant)
		if t == nil {
			return fuse.ENOENT
		}
		for _, name := range s.keyNames(t) {
			id, _ := s.keyID(e.tenant, name, t.Key(name))
			es = append(es, fuse.DirEntry{Name: name, Mode: syscall.S_IFREG, Ino: id})
		}
	}
	for i := int(min(in.Offset, uint64(len(es)))); i < len(es); i++ {
		es[i].Off = uint64(i + 1)
		if !out.AddDirEntry(es[i]) {
			break
		}
	}
	return fuse.OK
}

func (fs *rawFS) ReleaseDir(*fuse.ReleaseIn) {}

func (fs *rawFS) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	out.Bsize, out.Frsize, out.NameLen = 4096, 4096, 255
	return fuse.OK
}

// Open decrypts the newest version, so a bad record fails here, with EIO,
// and the audit trail names the version the reader got.
func (fs *rawFS) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY || in.Flags&syscall.O_TRUNC != 0 {
		return fuse.EROFS
	}
	s := fs.s
	e, ok := s.nodes.get(in.NodeId)
	if !ok {
		return s.unknown()
	}
	if e.key == "" {
		return fuse.ENOENT
	}
	start := time.Now()
	h, err := s.open(&in.InHeader, e)
	if errors.Is(err, errStale) {
		return fuse.Status(syscall.ESTALE)
	}
	if s.o.OnRead != nil {
		s.o.OnRead(e.tenant, time.Since(start), err)
	}
	if errors.Is(err, keystore.ErrNotFound) {
		return fuse.ENOENT // removed meanwhile
	}
	if err != nil {
		return fuse.EIO
	}
	// NOFLUSH: close needs no round trip; DIRECT_IO: no page cache;
	// PASSTHROUGH: reads served by the kernel from the memory file.
	out.OpenFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_NOFLUSH
	if s.passThrough(in.NodeId, h) {
		out.OpenFlags = fuse.FOPEN_PASSTHROUGH | fuse.FOPEN_NOFLUSH
		out.BackingID = h.b.id
	}
	out.Fh = s.handles.add(h)
	return fuse.OK
}

// errStale: the inode opened reads another version than the newest.
var errStale = errors.New("a newer version has its own inode")

// open returns the handle of node e, or why not: errStale for an inode
// of an older version, keystore.ErrNotFound for a key this view no
// longer shows, else what kept the record from opening.
func (s *Server) open(in *fuse.InHeader, e entry) (*handle, error) {
	tenant, name := e.tenant, e.key
	v := s.key(s.visibleTenant(tenant), name)
	if v == nil {
		return nil, fmt.Errorf("%s/%s: %w", tenant, name, keystore.ErrNotFound)
	}
	s.loading(v)
	rec, err := v.Record()
	// Rotations pruned the version the snapshot names: move the view to
	// the store's newest (a passthrough inode is then stale, and the
	// kernel's lookup again must find the newest too).
	for try := 0; errors.Is(err, keystore.ErrNotFound) && try < 5; try++ {
		s.conn.mayBlock()
		if rerr := s.o.Store.Refresh(); rerr != nil {
			break
		}
		s.refresh()
		if v = s.key(s.visibleTenant(tenant), name); v == nil {
			break
		}
		rec, err = v.Record()
	}
	if v == nil || errors.Is(err, keystore.ErrNotFound) {
		return nil, fmt.Errorf("%s/%s: %w", tenant, name, keystore.ErrNotFound) // removed meanwhile
	}
	if e.stale(v) {
		return nil, errStale
	}
	ev := s.event(in, tenant, name, v.Version)
	var pt []byte
	if err == nil {
		pt, err = s.o.Key.Open(rec, tenant, name)
	}
	if err != nil {
		ev.Event, ev.Reason = "error", err.Error()
		s.conn.mayBlock()
		s.o.Audit.Log(ev)
		s.log.Error("cannot open key", "tenant", tenant, "key", name, "version", v.Version, "pid", ev.PID, "err", err)
		return nil, err
	}
	if hook := s.o.onOpen; hook != nil {
		s.conn.mayBlock() // tests' hooks stall
		hook(name, "before audit")
	}
	resent := in.Unique&resendBit != 0
	if resent {
		ev.Reason = "sent again to a successor of a keyfs that died before answering"
		s.conn.mayBlock() // Recorded reads the audit file
	}
	switch {
	case resent && s.o.Audit.Recorded(func(e audit.Event) bool {
		return e.Event == "open" && e.Request == ev.Request && e.PID == ev.PID && e.Tenant == tenant && e.Key == name
	}):
		// The server that died recorded it: once is enough.
	case s.o.AuditRequired:
		s.conn.mayBlock()
		if aerr := s.o.Audit.Log(ev); aerr != nil {
			clear(pt)
			return nil, fmt.Errorf("%w: %w", ErrAuditFailed, aerr)
		}
	default:
		s.o.Audit.Go(ev, s.conn.mayBlock) // written after the reply, when the logger has a queue
	}
	if hook := s.o.onOpen; hook != nil {
		hook(name, "after audit")
	}
	return &handle{v: v, rec: rec, pt: pt, key: s.o.Key}, nil
}

// event is an audit event for the caller of a request.
func (s *Server) event(in *fuse.InHeader, tenant, key string, version uint64) audit.Event {
	ev := s.o.Pod
	ev.Time, ev.Event, ev.Reason = time.Time{}, "open", ""
	ev.Tenant, ev.Key, ev.Version = tenant, key, version
	ev.Request = in.Unique &^ resendBit
	uid, gid := in.Uid, in.Gid
	ci := sharedCallers.get(in.Pid, ev.PodUID == "")
	ev.PID, ev.UID, ev.GID = ci.pid, &uid, &gid
	if ev.PodUID == "" {
		ev.PodUID = ci.podUID
	}
	return ev
}

func (fs *rawFS) Read(_ <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	if hook := fs.s.o.onRead; hook != nil {
		fs.s.conn.mayBlock()
		e, _ := fs.s.nodes.get(in.NodeId)
		hook(e.key)
	}
	h := fs.s.handles.get(in.Fh)
	if h == nil {
		var err error
		if h, err = fs.s.reopen(in); err != nil {
			return nil, fuse.EIO
		}
	}
	return h.read(int64(in.Offset), int(in.Size))
}

// reopen rebuilds the handle of a file opened before a takeover: the
// version it names, or, for a read from the start, the newest one when
// that version is gone (a read in the middle of a value it cannot serve).
func (s *Server) reopen(in *fuse.ReadIn) (*handle, error) {
	e, ok := s.nodes.get(in.NodeId)
	if !ok || e.key == "" {
		return nil, errors.New("no such node")
	}
	v := s.key(s.visibleTenant(e.tenant), e.key)
	if v == nil {
		return nil, keystore.ErrNotFound
	}
	if uint32(v.Version) != fhVersion(in.Fh) && in.Offset != 0 {
		return nil, fmt.Errorf("%s/%s version %d is gone", e.tenant, e.key, fhVersion(in.Fh))
	}
	s.loading(v)
	rec, err := v.Record()
	if err != nil {
		return nil, err
	}
	return s.handles.put(in.Fh, &handle{v: v, rec: rec, key: s.o.Key}), nil
}

func (fs *rawFS) Release(_ <-chan struct{}, in *fuse.ReleaseIn) { fs.s.release(in.Fh) }

// release ends a handle: the kernel released it, or never got it.
func (s *Server) release(fh uint64) {
	if h := s.handles.remove(fh); h != nil {
		if h.b != nil {
			s.backings.put(s.conn, h.node, h.b)
		}
		h.release()
	}
}

// handle is one open key file. It pins the record opened, so every read
// through it sees one version. The plaintext is kept only until a read has
// delivered its end (or the file is released), and wiped once the reply
// that refers to it is written.
type handle struct {
	v   *keystore.Key
	rec *keystore.Record
	key *keystore.MasterKey

	b    *backing // the memory file the kernel reads, or nil
	node uint64   // b's node

	mu       sync.Mutex
	pt       []byte // nil once wiped
	inflight int    // replies still referring to pt
	drop     bool   // wipe pt when inflight reaches 0
}

func (h *handle) read(off int64, n int) (fuse.ReadResult, fuse.Status) {
	size := int64(h.rec.Size())
	if off >= size {
		return fuse.ReadResultData(nil), fuse.OK
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.pt == nil { // read again after the end was delivered
		pt, err := h.key.Open(h.rec, h.v.Tenant, h.v.Name)
		if err != nil {
			return nil, fuse.EIO
		}
		h.pt = pt
	}
	end := min(off+int64(n), size)
	h.inflight++
	if end == size {
		h.drop = true
	}
	return &reply{h: h, data: h.pt[off:end]}, fuse.OK
}

// release wipes unconditionally: nothing reads the handle any more.
func (h *handle) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	clear(h.pt)
	h.pt = nil
}

func (h *handle) done() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.inflight--
	if h.drop && h.inflight == 0 {
		clear(h.pt)
		h.pt = nil
		h.drop = false
	}
}

// reply hands plaintext to the protocol server, which copies it into the
// reply buffer (wiped after the write) and then calls Done.
type reply struct {
	h    *handle
	data []byte
}

func (r *reply) Size() int                          { return len(r.data) }
func (r *reply) Bytes([]byte) ([]byte, fuse.Status) { return r.data, fuse.OK }
func (r *reply) Slices() ([][]byte, fuse.Status)    { return [][]byte{r.data}, fuse.OK }
func (r *reply) Done()                              { r.h.done() }
