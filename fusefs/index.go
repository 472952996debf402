package fusefs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyfs/keyfs/keystore"
)

// snapshot is an immutable index of the store, so lookups and getattrs
// never touch the disk or take a lock. A refresh builds a new one, reusing
// the tenants whose directory did not change.
type snapshot struct {
	tenants map[string]*tenant
	names   []string // sorted
}

// tenant holds the newest version of each of a tenant's keys that the
// mount may show.
type tenant struct {
	keys  map[string]*version
	names []string // sorted

	mtime time.Time // of ROOT/<tenant> when listed
	// racy: mtime was too close to the listing to prove a later change
	// would move it (timestamps are coarse), so list it again next time.
	racy bool
}

func (t *tenant) visible() bool { return t != nil && len(t.keys) > 0 }

func (t *tenant) lookup(name string) *version {
	if t == nil {
		return nil
	}
	return t.keys[name]
}

// version is one stored record version. Its size and parsed record are
// loaded on first use and shared by every snapshot that holds the version.
type version struct {
	keystore.Entry
	meta atomic.Pointer[meta]
	rec  atomic.Pointer[keystore.Record] // ciphertext only; see recordCache
}

type meta struct {
	size    int64
	created time.Time
}

// racyWindow exceeds any filesystem timestamp granularity.
const racyWindow = 2 * time.Second

// scan lists the store. Tenants whose directory mtime is unchanged since
// old are reused without listing them, so a change costs one stat per
// tenant plus one listing per changed tenant.
func (s *Server) scan(old *snapshot) (*snapshot, error) {
	start := time.Now()
	names, err := s.o.Store.Tenants()
	if err != nil {
		return nil, err
	}
	snap := &snapshot{tenants: make(map[string]*tenant, len(names)), names: names}
	for _, name := range names {
		var prev *tenant
		if old != nil {
			prev = old.tenants[name]
		}
		t, err := s.scanTenant(name, prev, start)
		if err != nil {
			if prev == nil {
				return nil, err
			}
			s.log.Warn("cannot list tenant; keeping what was listed before", "tenant", name, "err", err)
			t = prev
		}
		snap.tenants[name] = t
	}
	return snap, nil
}

func (s *Server) scanTenant(name string, prev *tenant, start time.Time) (*tenant, error) {
	fi, err := os.Stat(filepath.Join(s.o.Store.Root(), name))
	if errors.Is(err, os.ErrNotExist) {
		return &tenant{}, nil // removed since Tenants()
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", name, err)
	}
	if prev != nil && !prev.racy && fi.ModTime().Equal(prev.mtime) {
		return prev, nil
	}
	es, err := s.o.Store.Keys(name)
	if err != nil {
		return nil, err
	}
	t := &tenant{keys: make(map[string]*version, len(es)), mtime: fi.ModTime(), racy: start.Sub(fi.ModTime()) < racyWindow}
	for _, e := range es {
		if s.keys != nil && !s.keys[e.Name] {
			continue
		}
		if v := prev.lookup(e.Name); v != nil && v.Entry == e {
			t.keys[e.Name] = v
		} else {
			t.keys[e.Name] = &version{Entry: e}
		}
		t.names = append(t.names, e.Name) // Keys is sorted
	}
	if prev != nil && sameKeys(prev, t) {
		prev.mtime, prev.racy = t.mtime, t.racy // safe: only refresh reads these
		return prev, nil
	}
	return t, nil
}

func sameKeys(a, b *tenant) bool {
	if len(a.keys) != len(b.keys) {
		return false
	}
	for k, v := range a.keys {
		if b.keys[k] != v {
			return false
		}
	}
	return true
}

// record returns v's parsed record, from memory when cached.
func (s *Server) record(v *version) (*keystore.Record, error) {
	if r := v.rec.Load(); r != nil {
		return r, nil
	}
	r, err := s.o.Store.Read(v.Entry)
	if err != nil {
		if !errors.Is(err, keystore.ErrNotFound) && v.meta.Load() == nil {
			v.meta.Store(&meta{}) // unreadable: size 0, open reports it
		}
		return nil, err
	}
	if v.meta.Load() == nil {
		v.meta.Store(&meta{size: int64(r.Size()), created: r.Created})
	}
	v.rec.Store(r)
	s.cache.add(v)
	return r, nil
}

// attrs returns v's size and creation time, reading the record once.
func (s *Server) attrs(v *version) *meta {
	if m := v.meta.Load(); m != nil {
		return m
	}
	if _, err := s.record(v); err != nil {
		return &meta{}
	}
	return v.meta.Load()
}

// recordCacheSize bounds the parsed records held in memory, about 1.3 KB
// each, mostly the KEM encapsulation. It is a hot set: with more keys than
// this, the rest are read from the store on open; sizes stay known.
const recordCacheSize = 4096

// recordCache bounds the records versions hold: ciphertext only, safe in
// memory, saving a file read and parse per open. First in, first out.
type recordCache struct {
	mu   sync.Mutex
	ring []*version
	next int
}

func (c *recordCache) init(n int) { c.ring = make([]*version, n) }

func (c *recordCache) add(v *version) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.ring[c.next]; old != nil && old != v {
		old.rec.Store(nil)
	}
	c.ring[c.next] = v
	c.next = (c.next + 1) % len(c.ring)
}
