// Package fusefs serves a read-only FUSE view of a keystore: one directory
// per tenant, one file per key, decrypted on every open and never cached in
// plaintext.
package fusefs

import (
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
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
	// mount it serves; see Mount. Daemons leave it false.
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

	debugLog *log.Logger // tests: trace FUSE traffic
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
	fuse  *fuse.Server
	root  *rootNode
	mtime time.Time // of directories: the mount time

	// snap is the store snapshot this mount shows: the kernel was told of
	// every difference between it and the ones before.
	snap    atomic.Pointer[keystore.Snapshot]
	callers callers

	refreshMu sync.Mutex      // one refresh at a time
	changed   map[string]bool // tenants whose keys changed in the last refresh

	inoMu   sync.Mutex
	inos    map[string]uint64
	nextIno uint64

	served   chan struct{} // closed when the serve loop ends
	stop     chan struct{}
	stopOnce sync.Once
	watching sync.WaitGroup
}

// Mount mounts a read-only view of o.Store at mountpoint and serves it until
// Unmount.
func Mount(mountpoint string, o Options) (*Server, error) {
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
		o:       o,
		log:     o.Log,
		mtime:   time.Now(),
		inos:    map[string]uint64{},
		nextIno: 2, // 1 is the root
		stop:    make(chan struct{}),
		served:  make(chan struct{}),
	}
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
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	s.snap.Store(o.Store.Snapshot())

	s.root = &rootNode{s: s}
	timeout := cacheTimeout
	raw := fs.NewNodeFS(s.root, &fs.Options{
		EntryTimeout: &timeout,
		AttrTimeout:  &timeout,
		// No NegativeTimeout: a name that appears needs no notification.
		NullPermissions: true,
	})
	srv, err := fuse.NewServer(readOnly{raw}, mountpoint, &fuse.MountOptions{
		AllowOther: true, // pods run as other uids
		FsName:     "keyfs",
		Name:       "keyfs",
		// default_permissions: the kernel enforces FileMode/UID/GID.
		Options:       []string{"ro", "default_permissions"},
		DisableXAttrs: true,
		// Plaintext must not pass through pipe buffers.
		DisableSplice: true,
		DirectMount:   true,
		Debug:         o.debugLog != nil,
		Logger:        o.debugLog,
	})
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
	}
	// go-fuse's direct mount opens /dev/fuse without O_CLOEXEC; a child
	// started later would inherit the connection and keep a killed
	// server's mount hanging instead of failing with ENOTCONN.
	for _, fd := range fuseFDs() {
		syscall.CloseOnExec(fd)
	}
	s.fuse = srv
	go func() {
		srv.Serve()
		close(s.served)
	}()
	// The direct mount and INIT are done when NewServer returns; all
	// WaitMount adds is go-fuse's poll hack, which opens a file on the mount
	// from this process, so that the Go runtime's poller in this process
	// cannot starve the server when this process reads the mount too. A
	// daemon never does, and must not run the hack: killed while the file
	// is open, the process may close it before /dev/fuse as it exits, and
	// its FLUSH then waits forever for a server that is the dying process
	// itself (an unkillable process and a hung mount).
	if o.ReadsOwnMount {
		if err := srv.WaitMount(); err != nil {
			srv.Unmount()
			return nil, fmt.Errorf("mount %s: %w", mountpoint, err)
		}
	}
	s.watching.Add(1)
	go s.watch()
	return s, nil
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
		done := make(chan error, 1)
		go func() { done <- s.fuse.Unmount() }()
		select {
		case err := <-done:
			if err != nil {
				return err
			}
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

// invalidate compares what the kernel may hold (go-fuse's tree mirrors
// the kernel's inode references) with the current truth and notifies the
// kernel of every difference. Appearing names need nothing: failed lookups
// are not cached. Keys are checked in tenants that changed in this refresh
// or the one before, which catches a lookup that raced the change.
func (s *Server) invalidate(old, cur *keystore.Snapshot) {
	root := &s.root.Inode
	var changed map[string]bool
	for name, ti := range root.Children() {
		t := cur.Tenant(name)
		if !s.visible(name, t) {
			root.NotifyEntry(name)
		}
		if t != old.Tenant(name) {
			if changed == nil {
				changed = map[string]bool{}
			}
			changed[name] = true
		} else if !s.changed[name] {
			continue
		}
		for key, ki := range ti.Children() {
			v := s.key(t, key)
			if v == nil {
				ti.NotifyEntry(key)
				continue
			}
			if kn, ok := ki.Operations().(*keyNode); ok && kn.served.Load() != v {
				ki.NotifyContent(0, 0) // attributes (size) changed
			}
		}
	}
	s.changed = changed
}

func (s *Server) allow(tenant string) bool {
	return s.o.Allow == nil || s.o.Allow(tenant)
}

// ino returns the inode number of a tenant ("t") or key ("t/name"), stable
// for the life of the mount so the kernel's cached inodes stay valid.
func (s *Server) ino(id string) uint64 {
	s.inoMu.Lock()
	defer s.inoMu.Unlock()
	n, ok := s.inos[id]
	if !ok {
		n = s.nextIno
		s.nextIno++
		s.inos[id] = n
	}
	return n
}

// CleanStale detaches a mount left at mountpoint by a killed keyfs and
// reports whether it did. A dead mount answers ENOTCONN; statfs always asks
// the (gone) server, where stat may be answered from cached attributes.
func CleanStale(mountpoint string) (bool, error) {
	var st unix.Statfs_t
	err := unix.Statfs(mountpoint, &st)
	if err == nil {
		_, err = os.Stat(mountpoint)
	}
	if err == nil || errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if !errors.Is(err, syscall.ENOTCONN) {
		return false, fmt.Errorf("check %s for a stale mount: %w", mountpoint, err)
	}
	if err := unix.Unmount(mountpoint, unix.MNT_DETACH); err != nil {
		return false, fmt.Errorf("detach stale mount %s: %w", mountpoint, err)
	}
	return true, nil
}

// fuseFDs lists this process's /dev/fuse descriptors.
func fuseFDs() []int {
	des, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil
	}
	var fds []int
	for _, de := range des {
		fd, err := strconv.Atoi(de.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink("/proc/self/fd/" + de.Name()); err == nil && target == "/dev/fuse" {
			fds = append(fds, fd)
		}
	}
	return fds
}

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
