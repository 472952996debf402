package keystore

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Store is a key store as a serving daemon sees it: the newest record of
// every key as immutable snapshots, and word of every change. One Store is
// shared by every view the daemon mounts, so a daemon watches its store
// once, however many volumes it serves. The local directory (WatchDir) is
// one; the Kubernetes API is another.
type Store interface {
	// Snapshot returns the current index. It never blocks on I/O.
	Snapshot() *Snapshot
	// Refresh brings the snapshot up to date now rather than at the next
	// change notice: for a new view, a readiness probe, or a reader that
	// found a record the snapshot names already gone. It is cheap when
	// nothing changed, and says why the store cannot be read.
	Refresh() error
}

// Snapshot is one immutable state of a store: tenants, their keys, and the
// newest record of each. A change makes a new Snapshot that shares every
// tenant the change did not touch (compare tenants by pointer to find what
// changed) and closes the old one's Superseded channel.
type Snapshot struct {
	tenants map[string]*Tenant
	names   []string // sorted
	done    chan struct{}
}

// NewSnapshot makes a snapshot of tenants, for a Store implementation;
// tenants without keys are left out. Publish it with a Published.
func NewSnapshot(tenants map[string]*Tenant) *Snapshot {
	s := &Snapshot{tenants: make(map[string]*Tenant, len(tenants)), done: make(chan struct{})}
	for n, t := range tenants {
		if t != nil && len(t.keys) > 0 {
			s.tenants[n] = t
			s.names = append(s.names, n)
		}
	}
	slices.Sort(s.names)
	return s
}

// Published holds a Store's current snapshot and announces its successor.
type Published struct{ p atomic.Pointer[Snapshot] }

// Snapshot returns the current snapshot, nil before the first Publish.
func (p *Published) Snapshot() *Snapshot { return p.p.Load() }

// Publish makes s current and closes the old snapshot's Superseded; a
// snapshot holding the same tenants as the current one is dropped, so
// views see no change. Callers serialize their Publish calls.
func (p *Published) Publish(s *Snapshot) {
	old := p.p.Load()
	if old != nil && s.sameAs(old) {
		return
	}
	p.p.Store(s)
	if old != nil {
		close(old.done)
	}
}

// Tenants lists the tenants holding at least one key, sorted.
func (s *Snapshot) Tenants() []string { return s.names }

// Tenant returns tenant name, or nil.
func (s *Snapshot) Tenant(name string) *Tenant { return s.tenants[name] }

// Superseded is closed when a newer snapshot is current.
func (s *Snapshot) Superseded() <-chan struct{} { return s.done }

// Tenant is one tenant's keys in a snapshot.
type Tenant struct {
	keys  map[string]*Key
	names []string // sorted

	// Local store: ROOT/<tenant>'s mtime when listed, and whether it was
	// too close to the listing to prove a later change would move it
	// (timestamps are coarse), so list it again at the next change.
	mtime time.Time
	racy  bool
}

// NewTenant makes a tenant of keys, for a Store implementation; one key
// per name.
func NewTenant(keys []*Key) *Tenant {
	t := &Tenant{keys: make(map[string]*Key, len(keys))}
	for _, k := range keys {
		t.keys[k.Name] = k
		t.names = append(t.names, k.Name)
	}
	slices.Sort(t.names)
	return t
}

// Key returns key name, or nil. A nil Tenant holds no keys.
func (t *Tenant) Key(name string) *Key {
	if t == nil {
		return nil
	}
	return t.keys[name]
}

// Names lists the tenant's keys, sorted.
func (t *Tenant) Names() []string {
	if t == nil {
		return nil
	}
	return t.names
}

// Key is the newest version of one key. Its record is loaded on first use
// and shared by every snapshot and view that holds the Key.
type Key struct {
	Entry
	load  func(Entry) (*Record, error)
	cache *recordCache // nil: rec is never dropped
	meta  atomic.Pointer[keyMeta]
	rec   atomic.Pointer[Record] // ciphertext only
}

// NewKey makes a key for a Store implementation whose records are in
// memory already: load fetches one on first use, and the Key keeps it.
func NewKey(e Entry, load func(Entry) (*Record, error)) *Key {
	return &Key{Entry: e, load: load}
}

type keyMeta struct {
	size    int64
	created time.Time
}

// Record returns the key's parsed record (ciphertext), from memory when
// cached. An error wrapping ErrNotFound means it was removed since the
// snapshot was made.
// Cached says whether Record and Attrs answer from memory, not the store.
func (k *Key) Cached() bool { return k.rec.Load() != nil }

func (k *Key) Record() (*Record, error) {
	if r := k.rec.Load(); r != nil {
		return r, nil
	}
	r, err := k.load(k.Entry)
	if err != nil {
		if !errors.Is(err, ErrNotFound) && k.meta.Load() == nil {
			k.meta.Store(&keyMeta{}) // unreadable: size 0, open reports why
		}
		return nil, err
	}
	if k.meta.Load() == nil {
		k.meta.Store(&keyMeta{size: int64(r.Size()), created: r.Created})
	}
	k.rec.Store(r)
	if k.cache != nil {
		k.cache.add(k)
	}
	return r, nil
}

// Attrs returns the value's size and the record's creation time, reading
// the record once; an unreadable record has size 0.
func (k *Key) Attrs() (size int64, created time.Time) {
	m := k.meta.Load()
	if m == nil {
		if _, err := k.Record(); err != nil {
			return 0, time.Time{}
		}
		m = k.meta.Load()
	}
	return m.size, m.created
}

// recordCacheSize bounds the parsed records an index holds, about 1.3 KB
// each, mostly the KEM encapsulation. It is a hot set: with more keys
// than this, the rest are loaded again on open; sizes stay known.
const recordCacheSize = 4096

// recordCache bounds the records Keys hold: ciphertext only, safe in
// memory, saving a read and parse per open. First in, first out.
type recordCache struct {
	mu   sync.Mutex
	ring []*Key
	next int
}

func (c *recordCache) add(k *Key) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.ring[c.next]; old != nil && old != k {
		old.rec.Store(nil)
	}
	c.ring[c.next] = k
	c.next = (c.next + 1) % len(c.ring)
}

// DirIndex is the local directory store as a Store: one poller of the
// store's generation file for the whole daemon, and one record cache.
type DirIndex struct {
	Published
	d     *Dir
	log   *slog.Logger
	cache *recordCache

	mu      sync.Mutex // one scan at a time
	gen     string     // generation the snapshot reflects
	lastErr error

	stop chan struct{}
	done chan struct{}
}

// DefaultPollInterval is how often WatchDir checks the store's generation.
const DefaultPollInterval = 200 * time.Millisecond

// WatchDir indexes d and keeps the index current, checking d's generation
// file every poll (DefaultPollInterval when 0) until Close.
func WatchDir(d *Dir, poll time.Duration, log *slog.Logger) (*DirIndex, error) {
	if poll <= 0 {
		poll = DefaultPollInterval
	}
	if log == nil {
		log = slog.Default()
	}
	x := &DirIndex{d: d, log: log, cache: &recordCache{ring: make([]*Key, recordCacheSize)}, stop: make(chan struct{}), done: make(chan struct{})}
	gen, err := d.Gen()
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", d.Root(), err)
	}
	snap, err := x.scan(nil)
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", d.Root(), err)
	}
	x.gen = gen
	x.Publish(snap)
	go x.watch(poll)
	return x, nil
}

// Refresh rescans the store now if its generation moved.
func (x *DirIndex) Refresh() error { return x.refresh() }

// Close stops watching. Snapshots stay readable.
func (x *DirIndex) Close() {
	select {
	case <-x.stop:
	default:
		close(x.stop)
	}
	<-x.done
}

func (x *DirIndex) watch(poll time.Duration) {
	defer close(x.done)
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		select {
		case <-x.stop:
			return
		case <-t.C:
			x.refresh()
		}
	}
}

// refresh rescans when the generation changed and publishes the new
// snapshot if anything differs.
func (x *DirIndex) refresh() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	old := x.Snapshot()
	gen, err := x.d.Gen()
	if err != nil {
		return x.failed("cannot read store generation", err)
	}
	if gen == x.gen && x.lastErr == nil {
		return nil
	}
	snap, err := x.scan(old)
	if err != nil {
		return x.failed("cannot rescan store", err)
	}
	x.gen, x.lastErr = gen, nil
	x.Publish(snap)
	return nil
}

func (x *DirIndex) failed(what string, err error) error {
	if x.lastErr == nil || x.lastErr.Error() != err.Error() {
		x.log.Warn(what, "store", x.d.Root(), "err", err)
	}
	x.lastErr = err
	return err
}

// sameAs: the same tenants, each the same object.
func (s *Snapshot) sameAs(o *Snapshot) bool {
	if len(s.tenants) != len(o.tenants) {
		return false
	}
	for n, t := range s.tenants {
		if o.tenants[n] != t {
			return false
		}
	}
	return true
}

// racyWindow exceeds any filesystem timestamp granularity.
const racyWindow = 2 * time.Second

// scan lists the store. Tenants whose directory mtime is unchanged since
// old are reused without listing them, so a change costs one stat per
// tenant plus one listing per changed tenant.
func (x *DirIndex) scan(old *Snapshot) (*Snapshot, error) {
	start := time.Now()
	names, err := x.d.Tenants()
	if err != nil {
		return nil, err
	}
	snap := &Snapshot{tenants: make(map[string]*Tenant, len(names)), done: make(chan struct{})}
	for _, name := range names {
		var prev *Tenant
		if old != nil {
			prev = old.tenants[name]
		}
		t, err := x.scanTenant(name, prev, start)
		if err != nil {
			if prev == nil {
				return nil, err
			}
			x.log.Warn("cannot list tenant; keeping what was listed before", "tenant", name, "err", err)
			t = prev
		}
		if t != nil {
			snap.tenants[name] = t
			snap.names = append(snap.names, name) // Tenants is sorted
		}
	}
	return snap, nil
}

// scanTenant lists one tenant, reusing prev when nothing changed; nil for a
// tenant without keys.
func (x *DirIndex) scanTenant(name string, prev *Tenant, start time.Time) (*Tenant, error) {
	fi, err := os.Stat(filepath.Join(x.d.Root(), name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil // removed since Tenants()
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", name, err)
	}
	if prev != nil && !prev.racy && fi.ModTime().Equal(prev.mtime) {
		return prev, nil
	}
	es, err := x.d.Keys(name)
	if err != nil {
		return nil, err
	}
	if len(es) == 0 {
		return nil, nil
	}
	t := &Tenant{keys: make(map[string]*Key, len(es)), mtime: fi.ModTime(), racy: start.Sub(fi.ModTime()) < racyWindow}
	for _, e := range es {
		if k := prev.Key(e.Name); k != nil && k.Entry == e {
			t.keys[e.Name] = k
		} else {
			t.keys[e.Name] = &Key{Entry: e, load: x.d.Read, cache: x.cache}
		}
		t.names = append(t.names, e.Name) // Keys is sorted
	}
	if prev != nil && slices.Equal(prev.names, t.names) && sameKeys(prev, t) {
		// Unchanged: keep prev, so views see no change. Only refresh
		// (under x.mu) touches these fields, and readers never do.
		prev.mtime, prev.racy = t.mtime, t.racy
		return prev, nil
	}
	return t, nil
}

func sameKeys(a, b *Tenant) bool {
	for k, v := range a.keys {
		if b.keys[k] != v {
			return false
		}
	}
	return true
}
