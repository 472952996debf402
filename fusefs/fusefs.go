// Package fusefs serves a read-only FUSE view of a keystore: one directory
// per tenant, one file per key, decrypted on every open and never cached in
// plaintext.
package fusefs

import (
	"errors"
	"fmt"
	"log"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/keystore"
)

// Options configure one mount.
type Options struct {
	// Store is the daemon's shared index of its key store; every mount
	// of the daemon shows views of the same one.
	Store keystore.Store
	Key   *keystore.MasterKey
	Audit *audit.Logger // nil: no audit trail
	// AuditRequired fails an open (EIO) whose audit event cannot be
	// written, instead of serving it unrecorded.
	AuditRequired bool
	Log           *slog.Logger // nil: slog.Default()

	// Allow says whether a tenant is visible; nil allows every tenant. It
	// is called on lookup, readdir, open and every store change; when its
	// answer changes otherwise, call Refresh. It must be cheap and must not
	// wait for Refresh.
	Allow func(tenant string) bool
	// Keys, when non-nil, are the only key names shown.
	Keys []string

	UID, GID uint32
	FileMode uint32 // read bits of key files (ParseFileMode's rule); 0 means 0444

	// ReadsOwnMount is for tests and benchmarks whose process reads the
	// mount it serves; see Server.start. Daemons leave it false.
	ReadsOwnMount bool

	// Pod identifies the pod this mount serves; its pod fields are
	// stamped on every audit event. With PodUID empty the caller's pod is
	// looked up from its cgroup.
	Pod audit.Event

	// OnRead, when set, is called after every open of a key with the time
	// it took and its outcome, for metrics: nil, an error wrapping
	// keystore.ErrNotFound (the key is gone from the view), or what kept
	// the record from being read or opened (keystore.ErrIntegrity, ...).
	OnRead func(tenant string, d time.Duration, err error)

	debugLog *log.Logger             // tests: trace FUSE traffic
	onRead   func(key string)        // tests: called before a READ is answered
	onOpen   func(key, stage string) // tests: called before and after an open's audit event
	directIO bool                    // tests: serve every read here, never pass files through
}

// ErrAuditFailed marks an open refused because its audit event could not
// be written (Options.AuditRequired).
var ErrAuditFailed = errors.New("audit event not written")

// cacheTimeout is how long the kernel may trust entries and attributes.
// It is long because every change is pushed to the kernel by notify;
// the timeout only bounds the damage of a lost notification.
const cacheTimeout = time.Hour

// Server is one mounted keyfs view.
type Server struct {
	o     Options
	log   *slog.Logger
	keys  map[string]bool // nil: every name
	conn  *conn
	mtime time.Time // of directories: the mount time

	// snap is the store snapshot this mount shows: the kernel was told of
	// every difference between it and the ones before.
	snap     atomic.Pointer[keystore.Snapshot]
	nodes    nodeTable
	handles  handles
	backings backings
	salt     uint64 // of key node ids on a passthrough connection; 0: names only

	refreshMu sync.Mutex      // one refresh at a time
	changed   map[string]bool // tenants whose keys changed in the last refresh

	served   chan struct{} // closed when the connection ended
	stop     chan struct{}
	stopOnce sync.Once
	watching sync.WaitGroup
}

func newServer(o Options) (*Server, error) {
	if o.Store == nil || o.Key == nil {
		return nil, errors.New("fusefs: Options.Store and Options.Key are required")
	}
	if o.FileMode == 0 {
		o.FileMode = 0o444
	}
	if err := checkFileMode(o.FileMode); err != nil {
		return nil, fmt.Errorf("fusefs: %w", err)
	}
	s := &Server{
		o:      o,
		log:    o.Log,
		mtime:  time.Now(),
		stop:   make(chan struct{}),
		served: make(chan struct{}),
	}
	// A successor's file handles must not collide with its predecessor's.
	s.handles.next = rand.Uint32()
	if s.log == nil {
		s.log = slog.Default()
	}
	if o.Keys != nil {
		s.keys = map[string]bool{}
		for _, k := range o.Keys {
			s.keys[k] = true
		}
	}
	// A view starts from the store as it is now, not as last polled.
	if err := o.Store.Refresh(); err != nil {
		return nil, err
	}
	s.snap.Store(o.Store.Snapshot())
	return s, nil
}

func (s *Server) mountOptions() *fuse.MountOptions {
	return &fuse.MountOptions{
		Name:               "keyfs",
		MaxWrite:           maxWrite,
		DisableXAttrs:      true,
		DisableReadDirPlus: true, // entries come from LOOKUP, which counts references
		MaxStackDepth:      1,
		Debug:              s.o.debugLog != nil,
		Logger:             s.o.debugLog,
	}
}

func (s *Server) fs() fuse.RawFileSystem {
	return readOnly{&rawFS{RawFileSystem: fuse.NewDefaultRawFileSystem(), s: s}}
}

// Mount mounts a read-only view of o.Store at mountpoint and serves it until
// Unmount.
func Mount(mountpoint string, o Options) (*Server, error) {
	s, err := newServer(o)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	c, err := mountConn(mountpoint, s.fs(), s.mountOptions(), s.log)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	s.attach(c)
	if err := s.start(c); err != nil {
		unix.Unmount(mountpoint, unix.MNT_DETACH)
		unix.Close(c.fd)
		return nil, fmt.Errorf("mount %s: serve: %w", mountpoint, err)
	}
	return s, nil
}

// Resume serves a view another process mounted and stopped serving (it
// exited, or was killed): the connection in sess, whose descriptor Resume
// takes over. Requests the old server had taken unanswered are sent again
// and cached names are checked again, so keys changed in the gap show.
// o must describe the view as it was mounted.
func Resume(sess Session, o Options) (*Server, error) {
	s, err := newServer(o)
	if err != nil {
		return nil, fmt.Errorf("resume %s: %w", sess.Mountpoint, err)
	}
	c, err := resumeConn(sess, s.fs(), s.mountOptions(), s.log)
	if err != nil {
		return nil, fmt.Errorf("resume %s: %w", sess.Mountpoint, err)
	}
	s.attach(c)
	if c.passthrough.Load() {
		dropStale(c)
	}
	s.seed()
	if err := s.start(c); err != nil {
		return nil, fmt.Errorf("resume %s: serve: %w", sess.Mountpoint, err)
	}
	if err := c.notify(notifyResend); err != nil {
		s.log.Warn("the kernel cannot resend the requests the old server took (Linux 6.9 can): their callers stay blocked",
			"mountpoint", sess.Mountpoint, "err", err)
	}
	// Names the kernel cached may have changed meanwhile: make it look
	// them up again (Linux 6.16), else invalidate what the view has now.
	if err := c.notify(notifyIncEpoch); err != nil {
		s.invalidateAll()
	}
	return s, nil
}

// seed fills the node table with every name of the view: the kernel may
// hold any of them from the old server.
func (s *Server) seed() {
	snap := s.snap.Load()
	for _, name := range snap.Tenants() {
		t := snap.Tenant(name)
		if !s.visible(name, t) {
			continue
		}
		s.nodes.add(nodeID(name, ""), name, "", 0, pinned, nil)
		if s.salt != 0 {
			continue // the predecessor's key ids are its own (node.go)
		}
		for _, k := range s.keyNames(t) {
			s.nodes.add(nodeID(name, k), name, k, 0, pinned, t.Key(k))
		}
	}
}

func (s *Server) invalidateAll() {
	for id, e := range s.nodes.all() {
		if e.key == "" {
			s.conn.invalEntry(rootID, e.tenant)
		} else {
			s.conn.invalInode(id)
		}
	}
}

// attach makes c this view's connection.
func (s *Server) attach(c *conn) {
	s.conn = c
	c.lostOpen = s.release
	if s.o.directIO {
		c.passthrough.Store(false)
	}
	if c.passthrough.Load() {
		s.salt = rand.Uint64() | 1
	}
}

// keyID is the node id of tenant/key at v's version, and the version
// its inode is bound to (0: any).
func (s *Server) keyID(tenant, key string, v *keystore.Key) (uint64, uint64) {
	if s.salt == 0 {
		return nodeID(tenant, key), 0
	}
	return versionedID(s.salt, tenant, key, v.Version), v.Version
}

func (s *Server) start(c *conn) error {
	if err := c.serve(); err != nil {
		return err
	}
	go func() {
		<-c.ended
		s.backings.closeAll(c)
		c.close()
		close(s.served)
	}()
	// A process that reads its own mount must first make the kernel learn
	// that keyfs files cannot be polled: the Go runtime adds every file it
	// opens to its epoll set, without giving up its P, and a POLL request
	// the kernel sends then can starve the very readers that would answer
	// it (with two Ps, or at a GC stop). A daemon never reads its own
	// mounts and must not probe: killed while the probe's file is open,
	// it could wait forever on its own FLUSH.
	if s.o.ReadsOwnMount {
		if err := c.pollProbe(); err != nil {
			s.log.Warn("poll probe failed", "mountpoint", c.mountpoint, "err", err)
		}
	}
	s.watching.Add(1)
	go s.watch()
	return nil
}

// Session returns what a successor needs to serve this view; its FD stays
// this server's (a holder keeps a copy of it, not the descriptor itself).
func (s *Server) Session() Session {
	return Session{Mountpoint: s.conn.mountpoint, Dev: s.conn.dev, FD: s.conn.fd, Init: s.conn.init, Reply: s.conn.reply}
}

// unmountWait bounds how long Unmount waits for the server to stop once
// the mount is gone from this mount namespace.
const unmountWait = time.Second

// Unmount unmounts the view. It fails while files are open. A pod's
// container holds its own bind of the mount, which keeps the connection
// (and this server) alive after the unmount here; Unmount does not wait
// for those: they end when this process exits.
func (s *Server) Unmount() error {
	select {
	case <-s.served: // unmounted from outside
	default:
		// Only this view's own mount: another may be on top of the path
		// since this one was detached.
		ours, err := s.conn.mounted()
		if err != nil {
			return fmt.Errorf("unmount %s: %w", s.conn.mountpoint, err)
		}
		if ours {
			err := unix.Unmount(s.conn.mountpoint, 0)
			if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: not mounted here any more
				return fmt.Errorf("unmount %s: %w", s.conn.mountpoint, err)
			}
		}
		select {
		case <-s.served:
		case <-time.After(unmountWait):
			s.log.Warn("unmounted, but another mount namespace still holds the view; it ends with this process")
		}
	}
	s.stopWatching()
	return nil
}

// Wait returns when the view is unmounted, by Unmount or from outside.
func (s *Server) Wait() {
	<-s.served
	s.stopWatching()
}

func (s *Server) stopWatching() {
	s.stopOnce.Do(func() { close(s.stop) })
	s.watching.Wait()
}

// Refresh re-evaluates Allow now, for a caller whose grants changed;
// they are visible in the mount when it returns. After the view is
// unmounted it does nothing.
func (s *Server) Refresh() {
	select {
	case <-s.stop:
	case <-s.served:
	default:
		s.refresh()
	}
}

// recheck is how long after a change the mount checks again the tenants
// that changed, for a lookup that raced the change's notifications.
const recheck = 200 * time.Millisecond

// watch follows the store: each new snapshot is diffed against the one
// before and the kernel told of every difference. Nothing runs while the
// store does not change.
func (s *Server) watch() {
	defer s.watching.Done()
	var again <-chan time.Time
	for {
		select {
		case <-s.stop:
			return
		case <-s.served:
			return
		case <-s.snap.Load().Superseded():
			s.refresh()
		case <-again:
			s.refresh()
		}
		again = nil
		s.refreshMu.Lock()
		if s.changed != nil {
			again = time.After(recheck)
		}
		s.refreshMu.Unlock()
	}
}

// refresh moves the mount to the store's current snapshot and tells the
// kernel to drop whatever it caches that is no longer true.
func (s *Server) refresh() {
	s.refreshMu.Lock()
	defer s.refreshMu.Unlock()
	old, cur := s.snap.Load(), s.o.Store.Snapshot()
	s.snap.Store(cur)
	s.invalidate(old, cur)
}

// invalidate compares what the kernel may hold (the node table counts its
// references) with the current truth and notifies the kernel of every
// difference. Appearing names need nothing: failed lookups are not cached.
// Keys are checked in tenants that changed in this refresh or the one
// before, which catches a lookup that raced the change.
func (s *Server) invalidate(old, cur *keystore.Snapshot) {
	var changed map[string]bool
	held := s.nodes.all()
	for _, e := range held {
		if e.key != "" {
			continue
		}
		t := cur.Tenant(e.tenant)
		if !s.visible(e.tenant, t) {
			s.conn.invalEntry(rootID, e.tenant)
		}
		if t != old.Tenant(e.tenant) {
			if changed == nil {
				changed = map[string]bool{}
			}
			changed[e.tenant] = true
		}
	}
	for id, e := range held {
		if e.key == "" || !changed[e.tenant] && !s.changed[e.tenant] {
			continue
		}
		v := s.key(cur.Tenant(e.tenant), e.key)
		switch {
		case v == nil, e.stale(v):
			s.conn.invalEntry(nodeID(e.tenant, ""), e.key) // gone, or another inode now
		case e.served != v:
			s.conn.invalInode(id) // attributes (size) changed
		}
	}
	s.changed = changed
}

func (s *Server) allow(tenant string) bool {
	return s.o.Allow == nil || s.o.Allow(tenant)
}

// DetachLeftover detaches the keyfs mounts at target that no server of
// this process holds, and says how many it detached: a dead one a killed
// keyfs left, or a live one of an old keyfs still shutting down. It reads
// the mount table only: a stat or statfs of a dead mount may hang. A mount
// of another file system is refused.
func DetachLeftover(target string) (int, error) {
	for n := range 16 { // a crash-looping daemon may have stacked several
		m, err := topMount(target)
		if err != nil || m == nil {
			return n, err
		}
		if m.FSType != FSType {
			return n, fmt.Errorf("%s has a %s mount that keyfs did not make; not touching it", target, m.FSType)
		}
		if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
			return n, fmt.Errorf("detach leftover mount %s: %w", target, err)
		}
	}
	return 16, fmt.Errorf("%s: cannot clear its mounts", target)
}

// FSType is how a keyfs mount shows in the mount table.
const FSType = "fuse.keyfs"

// ParseFileMode parses an octal file mode for a view's keys: read bits
// only, and at least one of them.
func ParseFileMode(s string) (uint32, error) {
	m, err := strconv.ParseUint(s, 8, 32)
	if err != nil {
		return 0, fmt.Errorf("mode %q: want an octal mode such as 0440", s)
	}
	if err := checkFileMode(uint32(m)); err != nil {
		return 0, err
	}
	return uint32(m), nil
}

// checkFileMode is the one rule for a view's file mode.
func checkFileMode(m uint32) error {
	switch {
	case m > 0o777:
		return fmt.Errorf("mode %04o is out of range: want 0400..0444 (octal)", m)
	case m&^0o444 != 0:
		return fmt.Errorf("mode %04o has write or execute bits: keyfs files are read-only, use read bits only (0444, 0440, 0400)", m)
	case m == 0:
		return fmt.Errorf("mode %04o lets nobody read: use 0400, 0440 or 0444", m)
	}
	return nil
}
