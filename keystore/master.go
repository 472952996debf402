package keystore

import (
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/hpke"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
)

// Suite names the one cipher suite keyfs uses: a post-quantum hybrid KEM,
// HKDF-SHA256, and AES-256-GCM for values.
const Suite = "MLKEM768X25519,HKDF-SHA256,AES-256-GCM"

// SeedSize is the size of the master seed the TPM seals.
const SeedSize = 32

func kem() hpke.KEM { return hpke.MLKEM768X25519() }

// PublicKey is the master public key: anyone holding it can seal records.
type PublicKey struct {
	pub hpke.PublicKey
	KID string // first 8 bytes of SHA-256 of the key, hex
}

func newPublicKey(pub hpke.PublicKey) *PublicKey {
	sum := sha256.Sum256(pub.Bytes())
	return &PublicKey{pub: pub, KID: hex.EncodeToString(sum[:8])}
}

// Marshal returns the public key armor, as written to master.pub.
func (p *PublicKey) Marshal() []byte { return p.marshalAs("pubkey") }

func (p *PublicKey) marshalAs(kind string) []byte {
	a := armor{kind: kind, headers: []header{{"kid", p.KID}, {"suite", Suite}}, body: p.pub.Bytes()}
	return a.marshal()
}

// ParsePublicKey reads a master public key armor.
func ParsePublicKey(data []byte) (*PublicKey, error) { return parsePublicKeyAs(data, "pubkey") }

func parsePublicKeyAs(data []byte, kind string) (*PublicKey, error) {
	a, err := parseArmor(data, kind, "kid", "suite")
	if err != nil {
		return nil, err
	}
	if s := a.get("suite"); s != Suite {
		return nil, fmt.Errorf("%w: public key suite %q is not supported (want %s)", ErrIntegrity, s, Suite)
	}
	pub, err := kem().NewPublicKey(a.body)
	if err != nil {
		return nil, fmt.Errorf("%w: public key body is not a valid %s key: %w", ErrIntegrity, Suite, err)
	}
	p := newPublicKey(pub)
	if p.KID != a.get("kid") {
		return nil, fmt.Errorf("%w: public key says kid %s but its key hashes to %s (edited?)", ErrIntegrity, a.get("kid"), p.KID)
	}
	return p, nil
}

// MasterKey is the unsealed master private key. It lives only in the
// daemon's memory; Close drops it and wipes the data keys it cached.
type MasterKey struct {
	priv     hpke.PrivateKey
	pub      *PublicKey
	auditKey []byte // HMAC key for audit checkpoints, derived from the seed

	mu      sync.Mutex
	deks    map[[32]byte][]byte      // per-record data keys, by sha256(info, enc)
	pending map[[32]byte]*unwrapping // decapsulations under way; one that ends after Close wipes its key
	ciphers map[[32]byte]cipher.AEAD // of the records opened lately, at most maxCiphers

	// The key ring: other masters whose records this one opens (older
	// ones after a rotation), and how to find one it does not hold yet.
	ringMu  sync.Mutex
	ring    map[string]*MasterKey
	fetch   func(kid string) (*MasterKey, error)
	fetched map[string]time.Time // kid → last failed fetch
}

// Add keeps other opening the records sealed to it, through m; Close
// closes it too.
func (m *MasterKey) Add(other *MasterKey) {
	m.ringMu.Lock()
	defer m.ringMu.Unlock()
	if other.KID() == m.KID() {
		return
	}
	if m.ring == nil {
		m.ring = map[string]*MasterKey{}
	}
	if old := m.ring[other.KID()]; old != nil && old != other {
		old.Close()
	}
	m.ring[other.KID()] = other
}

// OnUnknownKID sets how m finds a master it does not hold when a record
// sealed to it is opened (a daemon running while the master key rotates).
// A kid that f cannot provide is not asked for again within a few seconds.
func (m *MasterKey) OnUnknownKID(f func(kid string) (*MasterKey, error)) {
	m.ringMu.Lock()
	defer m.ringMu.Unlock()
	m.fetch, m.fetched = f, map[string]time.Time{}
}

// KIDs lists the masters m opens records of: its own kid first.
func (m *MasterKey) KIDs() []string {
	m.ringMu.Lock()
	defer m.ringMu.Unlock()
	ks := make([]string, 0, len(m.ring))
	for k := range m.ring {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return append([]string{m.KID()}, ks...)
}

// holder returns the master in m's ring sealed-to kid, fetching it once
// if m has a way to.
func (m *MasterKey) holder(kid string) *MasterKey {
	m.ringMu.Lock()
	defer m.ringMu.Unlock()
	if o := m.ring[kid]; o != nil {
		return o
	}
	if m.fetch == nil || time.Since(m.fetched[kid]) < fetchBackoff {
		return nil
	}
	o, err := m.fetch(kid) // under ringMu: one fetch at a time
	if err != nil || o == nil || o.KID() != kid {
		m.fetched[kid] = time.Now()
		return nil
	}
	if m.ring == nil {
		m.ring = map[string]*MasterKey{}
	}
	m.ring[kid] = o
	return o
}

// fetchBackoff spaces out fetches of a kid that could not be found.
const fetchBackoff = 5 * time.Second

// maxCachedDEKs bounds the data-key cache (32 bytes each).
const maxCachedDEKs = 1 << 17

// NewMasterKey derives the master key pair from the TPM-sealed seed. The
// caller wipes seed. Go's KEM keys cannot be zeroed in place: the daemon
// locks its memory and disables core dumps instead.
func NewMasterKey(seed []byte) (*MasterKey, error) {
	if len(seed) != SeedSize {
		return nil, fmt.Errorf("%w: master seed is %d bytes, want %d", ErrIntegrity, len(seed), SeedSize)
	}
	priv, err := kem().DeriveKeyPair(seed)
	if err != nil {
		return nil, fmt.Errorf("derive master key: %w", err)
	}
	ak, err := hkdf.Key(sha256.New, seed, nil, auditKeyInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("derive audit key: %w", err)
	}
	return &MasterKey{priv: priv, pub: newPublicKey(priv.PublicKey()), auditKey: ak, deks: map[[32]byte][]byte{}, pending: map[[32]byte]*unwrapping{}, ciphers: map[[32]byte]cipher.AEAD{}}, nil
}

const auditKeyInfo = "keyfs audit checkpoint key v1"

// AuditMAC authenticates msg (an audit checkpoint) with a key only this
// master's seed derives.
func (m *MasterKey) AuditMAC(msg []byte) []byte {
	h := hmac.New(sha256.New, m.auditKey)
	h.Write(msg)
	return h.Sum(nil)
}

// CheckAuditMAC checks an audit checkpoint MAC made by master kid: this
// one or one of its ring.
func (m *MasterKey) CheckAuditMAC(kid string, msg, mac []byte) error {
	k := m
	if kid != m.KID() {
		if k = m.holder(kid); k == nil {
			return fmt.Errorf("made by master key %s, which this node does not hold (retired, or another node's)", kid)
		}
	}
	if !hmac.Equal(mac, k.AuditMAC(msg)) {
		return errors.New("its MAC is wrong")
	}
	return nil
}

// Public returns the master public key.
func (m *MasterKey) Public() *PublicKey { return m.pub }

// KID is the master key's id.
func (m *MasterKey) KID() string { return m.pub.KID }

// Close wipes cached data keys and drops the private key, its ring's too.
func (m *MasterKey) Close() {
	m.ringMu.Lock()
	for k, o := range m.ring {
		o.Close()
		delete(m.ring, k)
	}
	m.ringMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, v := range m.deks {
		clear(v)
		delete(m.deks, k)
	}
	clear(m.ciphers)
	clear(m.auditKey)
	m.priv = nil
}

// dekID names a record's data key in the cache: its HPKE info and
// encapsulation determine it.
func dekID(info, enc []byte) (id [32]byte) {
	h := sha256.New()
	h.Write(info)
	h.Write([]byte{0})
	h.Write(enc)
	h.Sum(id[:0])
	return id
}

// maxCiphers bounds the AES-GCM ciphers kept made: one a record, of the
// records opened lately. Making one is 0.6 µs and 1.3 kB of garbage an
// open, 3% of a read and most of what keyfs allocates for it; a kept one
// is 1.6 kB (all 30,000 records of a large store would be 48 MB). Go
// cannot wipe a cipher's key schedule, kept or garbage: the bound is on
// the kept ones, and there are fewer garbage ones.
const maxCiphers = 1024

// cipher returns the AES-GCM cipher of record r's data key.
func (m *MasterKey) cipher(r *Record) (cipher.AEAD, error) {
	m.mu.Lock()
	g, ok := m.ciphers[r.dekID]
	m.mu.Unlock()
	if ok {
		return g, nil
	}
	k, err := m.dek(r)
	if err != nil {
		return nil, err
	}
	if g, err = newGCM(k); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.priv != nil {
		if len(m.ciphers) >= maxCiphers {
			for id := range m.ciphers { // one at random
				delete(m.ciphers, id)
				break
			}
		}
		m.ciphers[r.dekID] = g
	}
	return g, nil
}

// unwrapping is a decapsulation under way, which opens of its record
// wait for.
type unwrapping struct {
	done chan struct{} // closed, under MasterKey.mu, once key or err is set
	key  []byte
	err  error
}

// errClosed is what opening with a closed master key says.
var errClosed = errors.New("master key is closed")

// unwrapHook, if set, runs before each decapsulation: tests hold one.
var unwrapHook func()

// dek returns record r's data key, from cache or by one HPKE
// decapsulation. A decapsulation runs outside m.mu, so opens of other
// records go on meanwhile, and one runs at a time per record: concurrent
// opens of a record not cached yet wait for the first.
func (m *MasterKey) dek(r *Record) ([]byte, error) {
	m.mu.Lock()
	if k, ok := m.deks[r.dekID]; ok {
		m.mu.Unlock()
		return k, nil
	}
	if m.priv == nil {
		m.mu.Unlock()
		return nil, errClosed
	}
	if u, ok := m.pending[r.dekID]; ok {
		m.mu.Unlock()
		<-u.done
		return u.key, u.err
	}
	u := &unwrapping{done: make(chan struct{})}
	m.pending[r.dekID] = u
	priv := m.priv
	m.mu.Unlock()

	k, err := unwrap(priv, r)
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.pending, r.dekID)
	switch {
	case err == nil && m.priv == nil: // closed meanwhile
		clear(k)
		k, err = nil, errClosed
	case err == nil:
		if len(m.deks) >= maxCachedDEKs {
			for id, v := range m.deks {
				clear(v)
				delete(m.deks, id)
			}
		}
		m.deks[r.dekID] = k
	}
	u.key, u.err = k, err
	close(u.done)
	return k, err
}

// unwrap decapsulates r's data key.
func unwrap(priv hpke.PrivateKey, r *Record) ([]byte, error) {
	if unwrapHook != nil {
		unwrapHook()
	}
	rc, err := hpke.NewRecipient(r.enc, priv, hpke.HKDFSHA256(), hpke.ExportOnly(), recordInfo(r.Tenant, r.Name))
	if err != nil {
		return nil, err
	}
	return rc.Export(dekContext, 32)
}
