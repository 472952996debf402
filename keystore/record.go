package keystore

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hpke"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// MaxValueSize is the largest value keyfs stores.
const MaxValueSize = 64 << 10

// ErrKIDMismatch marks a record sealed to another master key.
var ErrKIDMismatch = errors.New("record sealed to another master key")

// KIDMismatchError says which key a record wants and which one is here,
// with the older masters of the ring, if any.
type KIDMismatchError struct {
	Record, Have string
	Older        []string
}

func (e *KIDMismatchError) Error() string {
	also := ""
	if len(e.Older) > 0 {
		also = " (and older kid " + strings.Join(e.Older, ", ") + ")"
	}
	return fmt.Sprintf("sealed to kid %s, this node holds kid %s%s: seal the value again to this node's public key (keyfs pubkey; in cluster mode keyfs seal --cluster)", e.Record, e.Have, also)
}

func (e *KIDMismatchError) Is(target error) bool {
	return target == ErrKIDMismatch || target == ErrIntegrity
}

// Record is one sealed value: headers in the clear, value encrypted.
//
// Payload: HPKE (export-only) encapsulation to the master key with info
// binding format, tenant and name; the exported secret is a per-record data
// key for AES-256-GCM over the value, with every header as additional data.
// A data key is unique to its record, so the GCM nonce is fixed. The daemon
// caches data keys, so a repeated open costs one AES-GCM decryption.
type Record struct {
	KID     string
	Tenant  string
	Name    string
	Version uint64
	Created time.Time

	enc, ct []byte
	// Derived once, when sealed or parsed: every open needs them.
	aad   []byte   // the header text, GCM additional data
	dekID [32]byte // the data key's cache id
}

// derive fills what Open needs from the headers and encapsulation.
func (r *Record) derive() {
	r.aad = r.armor().headerText()
	r.dekID = dekID(recordInfo(r.Tenant, r.Name), r.enc)
}

const (
	recordKind = "record"
	encSize    = 1120 // MLKEM768X25519 encapsulation
	tagSize    = 16
	dekContext = "keyfs data key"
)

var zeroNonce = make([]byte, 12)

func recordInfo(tenant, name string) []byte {
	return []byte("keyfs-record " + armorVersion + "\x00" + tenant + "\x00" + name)
}

// Seal encrypts value for tenant/name to the master public key. It needs
// no TPM: anyone with master.pub can seal.
func Seal(pub *PublicKey, tenant, name string, version uint64, value []byte) (*Record, error) {
	if err := ValidTenant(tenant); err != nil {
		return nil, err
	}
	if err := ValidKeyName(name); err != nil {
		return nil, err
	}
	if len(value) == 0 {
		return nil, fmt.Errorf("%w: the value is empty", ErrInvalidValue)
	}
	if len(value) > MaxValueSize {
		return nil, fmt.Errorf("%w: the value is %d bytes; the limit is %d", ErrInvalidValue, len(value), MaxValueSize)
	}
	if version == 0 {
		return nil, fmt.Errorf("%w: version must be at least 1", ErrInvalidValue)
	}
	return seal(pub, tenant, name, version, time.Now(), value)
}

// Reseal re-encrypts r's value to the master public key to, keeping its
// tenant, name, version and creation time: the same value under another
// master, for a rotation. ring must open r.
func Reseal(ring *MasterKey, to *PublicKey, r *Record) (*Record, error) {
	v, err := ring.Open(r, r.Tenant, r.Name)
	if err != nil {
		return nil, err
	}
	defer clear(v)
	return seal(to, r.Tenant, r.Name, r.Version, r.Created, v)
}

func seal(pub *PublicKey, tenant, name string, version uint64, created time.Time, value []byte) (*Record, error) {
	enc, s, err := hpke.NewSender(pub.pub, hpke.HKDFSHA256(), hpke.ExportOnly(), recordInfo(tenant, name))
	if err != nil {
		return nil, fmt.Errorf("seal %s/%s: %w", tenant, name, err)
	}
	dek, err := s.Export(dekContext, 32)
	if err != nil {
		return nil, fmt.Errorf("seal %s/%s: %w", tenant, name, err)
	}
	defer clear(dek)
	r := &Record{KID: pub.KID, Tenant: tenant, Name: name, Version: version, Created: created.UTC().Truncate(time.Second), enc: enc}
	g, err := newGCM(dek)
	if err != nil {
		return nil, err
	}
	r.derive()
	r.ct = g.Seal(nil, zeroNonce, value, r.aad)
	return r, nil
}

// ErrInvalidValue marks a value keyfs will not store.
var ErrInvalidValue = errors.New("invalid value")

func newGCM(key []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

func (r *Record) armor() *armor {
	return &armor{kind: recordKind, headers: []header{
		{"kid", r.KID},
		{"tenant", r.Tenant},
		{"name", r.Name},
		{"version", strconv.FormatUint(r.Version, 10)},
		{"created", r.Created.UTC().Format(time.RFC3339)},
		{"suite", Suite},
	}}
}

// Marshal returns the record's text form.
func (r *Record) Marshal() []byte {
	a := r.armor()
	a.body = append(append([]byte(nil), r.enc...), r.ct...)
	return a.marshal()
}

// Size is the length of the value, known without decrypting.
func (r *Record) Size() int { return len(r.ct) - tagSize }

// ParseRecord reads a record's text form, accepted only byte for byte as
// Marshal writes it. It checks structure only; Open authenticates.
func ParseRecord(data []byte) (*Record, error) {
	a, err := parseArmor(data, recordKind, "kid", "tenant", "name", "version", "created", "suite")
	if err != nil {
		return nil, err
	}
	r := &Record{KID: a.get("kid"), Tenant: a.get("tenant"), Name: a.get("name")}
	if err := ValidTenant(r.Tenant); err != nil {
		return nil, fmt.Errorf("%w: record line 3: %w", ErrIntegrity, err)
	}
	if err := ValidKeyName(r.Name); err != nil {
		return nil, fmt.Errorf("%w: record line 4: %w", ErrIntegrity, err)
	}
	if r.Version, err = strconv.ParseUint(a.get("version"), 10, 64); err != nil || r.Version == 0 {
		return nil, fmt.Errorf("%w: record line 5: version must be a positive decimal integer", ErrIntegrity)
	}
	if r.Created, err = time.Parse(time.RFC3339, a.get("created")); err != nil {
		return nil, fmt.Errorf("%w: record line 6: created must be an RFC 3339 time", ErrIntegrity)
	}
	if s := a.get("suite"); s != Suite {
		return nil, fmt.Errorf("%w: record suite %q is not supported (want %s)", ErrIntegrity, s, Suite)
	}
	if !validKID(r.KID) {
		return nil, fmt.Errorf("%w: record line 2: kid must be 16 lowercase hex digits", ErrIntegrity)
	}
	if err := a.sameHeaders(r.armor()); err != nil {
		return nil, err
	}
	if len(a.body) < encSize+tagSize+1 {
		return nil, fmt.Errorf("%w: record body is %d bytes, too short to hold a value (truncated)", ErrIntegrity, len(a.body))
	}
	if len(a.body) > encSize+tagSize+MaxValueSize {
		return nil, fmt.Errorf("%w: record body is %d bytes, more than a %d-byte value needs", ErrIntegrity, len(a.body), MaxValueSize)
	}
	r.enc, r.ct = a.body[:encSize], a.body[encSize:]
	r.derive()
	return r, nil
}

// Open decrypts r, which was found in the store as tenant/name. The caller
// wipes the returned value. Errors: *KIDMismatchError, or ErrIntegrity for a
// record that was moved, renamed or tampered with.
func (m *MasterKey) Open(r *Record, tenant, name string) ([]byte, error) {
	if r.Tenant != tenant || r.Name != name {
		return nil, fmt.Errorf("%w: record for %s/%s is stored as %s/%s: records cannot be moved or renamed; reseal the value for %s/%s", ErrIntegrity, r.Tenant, r.Name, tenant, name, tenant, name)
	}
	if r.KID != m.pub.KID {
		if o := m.holder(r.KID); o != nil {
			return o.Open(r, tenant, name)
		}
		ks := m.KIDs()
		return nil, &KIDMismatchError{Record: r.KID, Have: ks[0], Older: ks[1:]}
	}
	// r's tenant and name equal the expected ones (checked above), so the
	// id and additional data derived from its headers are the right ones.
	g, err := m.cipher(r)
	if errors.Is(err, errClosed) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %s/%s version %d: cannot unwrap its data key (tampered): %w", ErrIntegrity, tenant, name, r.Version, err)
	}
	v, err := g.Open(nil, zeroNonce, r.ct, r.aad)
	if err != nil {
		return nil, fmt.Errorf("%w: %s/%s version %d does not authenticate: the record was tampered with, or its headers edited", ErrIntegrity, tenant, name, r.Version)
	}
	return v, nil
}

func validKID(s string) bool {
	if len(s) != 16 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
