package fusefs

import (
	"crypto/sha256"
	"encoding/binary"
	"sync"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/keyfs/keyfs/keystore"
)

// Node ids are a hash of the name, never allocated: a successor that takes
// over a connection answers for every node id the kernel holds without
// being told them. The root is 1; tenants hash "t", keys "t/name".
//
// On a connection that passes files through (passthrough.go) a key's id
// also hashes its version and a salt of the server: the kernel lets an
// inode read from one memory file at a time, so each version, and each
// server's files, get inodes of their own. A stale id (an older version,
// a predecessor's) is answered ESTALE, and the kernel looks the name up
// again.

const rootID = fuse.FUSE_ROOT_ID

func nodeID(tenant, key string) uint64 { return hashID(tenant, key, "") }

func versionedID(salt uint64, tenant, key string, version uint64) uint64 {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:], salt)
	binary.BigEndian.PutUint64(b[8:], version)
	return hashID(tenant, key, string(b[:]))
}

func hashID(tenant, key, extra string) uint64 {
	h := sha256.New()
	h.Write([]byte("keyfs node\x00" + tenant))
	if key != "" {
		h.Write([]byte("\x00" + key))
	}
	if extra != "" {
		h.Write([]byte("\x00" + extra))
	}
	var sum [sha256.Size]byte
	// Clear the top bit: go-fuse reserves 2^64-1 for its poll probe.
	id := binary.BigEndian.Uint64(h.Sum(sum[:0])) >> 1
	if id <= rootID {
		id += 2
	}
	return id
}

// entry is a node the kernel may hold: a tenant directory (key "") or a
// key file.
type entry struct {
	tenant, key string
	version     uint64        // key on a passthrough connection: the version its inode reads; 0: any
	lookups     uint64        // the kernel's references, FORGET takes them back
	served      *keystore.Key // key: whose attributes the kernel last got
}

// stale says whether the entry's inode reads another version than v:
// the name is another inode now.
func (e entry) stale(v *keystore.Key) bool { return e.version != 0 && e.version != v.Version }

// pinned is the reference count of entries a successor seeds from the
// store: it cannot know the kernel's count, so they are never dropped.
const pinned = 1 << 62

// nodeTable maps node ids to names, and lists what the kernel holds for
// invalidation.
type nodeTable struct {
	mu   sync.Mutex
	byID map[uint64]*entry
}

func (t *nodeTable) get(id uint64) (entry, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byID[id]
	if !ok {
		return entry{}, false
	}
	return *e, true
}

// add counts a reference the kernel takes to node id, tenant/key at
// version (a LOOKUP reply); false on a hash collision with another name.
func (t *nodeTable) add(id uint64, tenant, key string, version, n uint64, served *keystore.Key) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.byID == nil {
		t.byID = map[uint64]*entry{}
	}
	e, ok := t.byID[id]
	if !ok {
		e = &entry{tenant: tenant, key: key, version: version}
		t.byID[id] = e
	} else if e.tenant != tenant || e.key != key || e.version != version {
		return false
	}
	e.lookups = min(e.lookups+n, pinned)
	if served != nil {
		e.served = served
	}
	return true
}

func (t *nodeTable) setServed(id uint64, v *keystore.Key) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e, ok := t.byID[id]; ok {
		e.served = v
	}
}

// forget drops n references; true if that was the last.
func (t *nodeTable) forget(id, n uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byID[id]
	if !ok || e.lookups >= pinned {
		return false
	}
	if e.lookups <= n {
		delete(t.byID, id)
		return true
	}
	e.lookups -= n
	return false
}

// all copies the table, for invalidation.
func (t *nodeTable) all() map[uint64]entry {
	t.mu.Lock()
	defer t.mu.Unlock()
	m := make(map[uint64]entry, len(t.byID))
	for id, e := range t.byID {
		m[id] = *e
	}
	return m
}

// handles are the open key files. A file handle (fh) carries the record
// version it reads in its low 32 bits, so a successor that lacks the
// table can still serve it.
type handles struct {
	mu   sync.Mutex
	m    map[uint64]*handle
	next uint32
}

func (hs *handles) add(h *handle) uint64 {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if hs.m == nil {
		hs.m = map[uint64]*handle{}
	}
	for {
		hs.next++
		fh := uint64(hs.next)<<32 | uint64(uint32(h.v.Version))
		if _, used := hs.m[fh]; !used {
			hs.m[fh] = h
			return fh
		}
	}
}

// put files a handle a successor rebuilt under the kernel's fh.
func (hs *handles) put(fh uint64, h *handle) *handle {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if hs.m == nil {
		hs.m = map[uint64]*handle{}
	}
	if old, ok := hs.m[fh]; ok {
		return old // another reader rebuilt it first
	}
	hs.m[fh] = h
	return h
}

func (hs *handles) get(fh uint64) *handle {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	return hs.m[fh]
}

func (hs *handles) remove(fh uint64) *handle {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	h := hs.m[fh]
	delete(hs.m, fh)
	return h
}

func fhVersion(fh uint64) uint32 { return uint32(fh) }
