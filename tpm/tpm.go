// Package tpm seals keyfs keys to a TPM 2.0 and unseals them again.
//
// Secrets only cross the TPM bus encrypted: commands that carry them run in
// HMAC sessions salted with the storage root key (SRK) and use AES-128-CFB
// parameter encryption. No resource manager is assumed (swtpm has none), so
// every object and session is flushed on every path.
package tpm

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
)

// DefaultDevice is the kernel's resource-managed TPM device.
const DefaultDevice = "/dev/tpmrm0"

// defaultTimeout bounds every swtpm command. ECC operations take about a
// millisecond there; the slack is for loaded CI machines.
const defaultTimeout = 10 * time.Second

// maxSecret is MAX_SYM_DATA, the most a sealed data object can hold.
const maxSecret = 128

// TPM is an open TPM. It is safe for concurrent use; commands are serialized.
type TPM struct {
	mu       sync.Mutex
	tr       transport.TPMCloser
	closed   bool
	insecure bool
}

// Open opens a TPM by spec: a device path such as /dev/tpmrm0 (the default,
// used when spec is empty), "swtpm:HOST:PORT" for swtpm's server port, or
// "sim" for the in-process simulator (only in binaries built with
// -tags simulator; a second Open("sim") waits until the first is closed).
func Open(spec string) (*TPM, error) {
	return open(spec, defaultTimeout)
}

func open(spec string, timeout time.Duration) (*TPM, error) {
	if spec == "" {
		spec = DefaultDevice
	}
	var tr transport.TPMCloser
	var err error
	switch {
	case strings.HasPrefix(spec, "/"):
		tr, err = openDevice(spec)
	case strings.HasPrefix(spec, "swtpm:"):
		tr, err = openSWTPM(strings.TrimPrefix(spec, "swtpm:"), timeout)
	case spec == "sim":
		tr, err = openSimulator()
	default:
		return nil, fmt.Errorf("unknown TPM %q: use a device path such as %s, swtpm:HOST:PORT, or sim", spec, DefaultDevice)
	}
	if err != nil {
		return nil, err
	}
	t, err := New(tr)
	if err != nil {
		tr.Close()
		return nil, err
	}
	t.insecure = spec == "sim"
	return t, nil
}

// Insecure reports a TPM that protects nothing: the in-process simulator,
// whose seeds are fixed. Callers must say so on every use.
func (t *TPM) Insecure() bool { return t.insecure }

func openSWTPM(addr string, timeout time.Duration) (transport.TPMCloser, error) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, fmt.Errorf("bad TPM address swtpm:%s: want swtpm:HOST:PORT, e.g. swtpm:127.0.0.1:2321", addr)
	}
	return dialSWTPM(addr, timeout)
}

func openDevice(path string) (transport.TPMCloser, error) {
	tr, err := linuxtpm.Open(path)
	switch {
	case err == nil:
		return tr, nil
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%w at %s (%w); without a TPM use --tpm swtpm:HOST:PORT, or --tpm sim for tests",
			ErrNoDevice, path, err)
	case errors.Is(err, fs.ErrPermission):
		return nil, fmt.Errorf("open TPM %s: %w; run as root or as a member of the group that owns %s (usually tss)",
			path, err, path)
	case errors.Is(err, linuxtpm.ErrFileIsNotDevice):
		return nil, fmt.Errorf("open TPM %s: %w; pass the TPM character device, usually %s", path, err, DefaultDevice)
	}
	return nil, fmt.Errorf("open TPM %s: %w", path, err)
}

// New wraps an already-open transport and sends TPM2_Startup(CLEAR). On
// error the transport is left open for the caller to close.
func New(tr transport.TPMCloser) (*TPM, error) {
	tr = retrying{tr}
	_, err := tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(tr)
	if err != nil && !errors.Is(err, tpm2.TPMRCInitialize) { // already started: fine
		return nil, fmt.Errorf("tpm startup: %w", err)
	}
	return &TPM{tr: tr}, nil
}

// Close closes the transport. Closing twice is harmless.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	return t.tr.Close()
}

// Blob is a sealed secret: the TPM2B_PUBLIC and TPM2B_PRIVATE of a sealed
// data object under the SRK, the sha256-bank PCRs its policy covers, and
// the SRK's name. Only the TPM that sealed it can load it.
//
// SRKName pins the SRK: Unseal refuses a TPM whose SRK has another name
// before it sends anything secret, since a salted session is only as good
// as the key it is salted to. A blob without one (written before pinning)
// is pinned to the SRK it unseals under; save it again to keep the pin.
type Blob struct {
	Public, Private []byte
	PCRs            []int
	SRKName         []byte
}

// Seal seals secret (1 to 128 bytes) under the SRK. With pcrs, unsealing
// requires those sha256-bank PCRs to hold the values they hold now.
func (t *TPM) Seal(secret []byte, pcrs []int) (blob *Blob, err error) {
	if len(secret) == 0 || len(secret) > maxSecret {
		return nil, fmt.Errorf("tpm seal: the secret must be 1 to %d bytes, got %d", maxSecret, len(secret))
	}
	if err := checkPCRs(pcrs); err != nil {
		return nil, err
	}
	pcrs = sortedPCRs(pcrs)
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	defer func() { // runs after the flushes, which may set err
		if err != nil {
			blob = nil
		}
	}()

	srk, err := t.createSRK()
	if err != nil {
		return nil, err
	}
	defer t.flush(srk.handle, &err)

	pub := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:    true,
			FixedParent: true,
			// A sealed key has no password to guess; without NoDA a few
			// failed policy checks would lock the whole TPM out.
			NoDA:         true,
			UserWithAuth: len(pcrs) == 0,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash,
			&tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
	}
	if len(pcrs) > 0 {
		digest, err := t.pcrPolicyDigest(pcrs)
		if err != nil {
			return nil, err
		}
		pub.AuthPolicy = tpm2.TPM2BDigest{Buffer: digest}
	}

	sess, _, err := tpm2.HMACSession(t.tr, tpm2.TPMAlgSHA256, 16,
		tpm2.Salted(srk.handle, srk.pub), tpm2.AESEncryption(128, tpm2.EncryptIn))
	if err != nil {
		return nil, classify("start session", nil, err)
	}
	defer t.flush(sess.Handle(), &err)

	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: srk.handle, Name: srk.name, Auth: sess},
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: secret}),
		}},
		InPublic: tpm2.New2B(pub),
	}.Execute(t.tr)
	if err != nil {
		return nil, classify("create", nil, err)
	}
	return &Blob{
		Public:  tpm2.Marshal(rsp.OutPublic),
		Private: tpm2.Marshal(rsp.OutPrivate),
		PCRs:    pcrs,
		SRKName: slices.Clone(srk.name.Buffer),
	}, nil
}

// Unseal returns the secret sealed in b. The caller should wipe it after use.
func (t *TPM) Unseal(b *Blob) (secret []byte, err error) {
	if b == nil {
		return nil, errors.New("tpm unseal: nil blob")
	}
	if err := checkPCRs(b.PCRs); err != nil {
		return nil, err
	}
	pub, priv, err := b.decode()
	if err != nil {
		return nil, fmt.Errorf("tpm unseal: bad blob: %w; restore it with `keyfs recover`", err)
	}
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	defer func() { // runs after the flushes, which may set err
		if err != nil {
			clear(secret)
			secret = nil
		}
	}()

	srk, err := t.createSRK()
	if err != nil {
		return nil, err
	}
	defer t.flush(srk.handle, &err)
	// Before any session is salted to it: is this the SRK the seed was
	// sealed under?
	if b.SRKName == nil {
		b.SRKName = slices.Clone(srk.name.Buffer)
	} else if !bytes.Equal(b.SRKName, srk.name.Buffer) {
		return nil, &SRKMismatchError{Pinned: slices.Clone(b.SRKName), Got: slices.Clone(srk.name.Buffer)}
	}

	// Load needs no secret parameter: the private part is encrypted to the SRK.
	obj, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: srk.handle, Name: srk.name, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     *pub,
		InPrivate:    *priv,
	}.Execute(t.tr)
	if err != nil {
		return nil, classify("load", nil, err)
	}
	defer t.flush(obj.ObjectHandle, &err)

	var sess tpm2.Session
	salt, enc := tpm2.Salted(srk.handle, srk.pub), tpm2.AESEncryption(128, tpm2.EncryptOut)
	if len(b.PCRs) == 0 {
		sess, _, err = tpm2.HMACSession(t.tr, tpm2.TPMAlgSHA256, 16, salt, enc)
	} else {
		sess, _, err = tpm2.PolicySession(t.tr, tpm2.TPMAlgSHA256, 16, salt, enc)
	}
	if err != nil {
		return nil, classify("start session", nil, err)
	}
	defer t.flush(sess.Handle(), &err)
	if len(b.PCRs) > 0 {
		_, err := tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: pcrSelection(b.PCRs)}.Execute(t.tr)
		if err != nil {
			return nil, classify("policy PCR", nil, err)
		}
	}

	rsp, err := tpm2.Unseal{
		ItemHandle: tpm2.AuthHandle{Handle: obj.ObjectHandle, Name: obj.Name, Auth: sess},
	}.Execute(t.tr)
	if err != nil {
		return nil, classify("unseal", b.PCRs, err)
	}
	return rsp.OutData.Buffer, nil
}

func (t *TPM) lock() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return errors.New("tpm: use of closed TPM")
	}
	return nil
}

// primary is a primary key the TPM holds: the SRK or the EK.
type primary struct {
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
	pub    tpm2.TPMTPublic
}

// createSRK recreates the TCG ECC P-256 SRK: the same owner seed and
// template always give the same key, so nothing is persisted in the TPM.
func (t *TPM) createSRK() (*primary, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(t.tr)
	if err != nil {
		return nil, classify("create SRK", nil, err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		t.flush(rsp.ObjectHandle, &err)
		return nil, fmt.Errorf("tpm create SRK: %w", err)
	}
	// The name is computed here from the public key the session will be
	// salted to, never taken from the response: it is what the pin checks.
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		t.flush(rsp.ObjectHandle, &err)
		return nil, fmt.Errorf("tpm create SRK: %w", err)
	}
	return &primary{handle: rsp.ObjectHandle, name: *name, pub: *pub}, nil
}

// pcrPolicyDigest computes the PolicyPCR digest of the current PCR values in
// a trial session.
func (t *TPM) pcrPolicyDigest(pcrs []int) (_ []byte, err error) {
	sess, _, err := tpm2.PolicySession(t.tr, tpm2.TPMAlgSHA256, 16, tpm2.Trial())
	if err != nil {
		return nil, classify("start trial session", nil, err)
	}
	defer t.flush(sess.Handle(), &err)
	if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: pcrSelection(pcrs)}).Execute(t.tr); err != nil {
		return nil, classify("policy PCR", nil, err)
	}
	rsp, err := tpm2.PolicyGetDigest{PolicySession: sess.Handle()}.Execute(t.tr)
	if err != nil {
		return nil, classify("policy digest", nil, err)
	}
	return rsp.PolicyDigest.Buffer, nil
}

// flush releases h. Its error is reported only when nothing failed before.
func (t *TPM) flush(h tpm2.TPMHandle, err *error) {
	_, ferr := tpm2.FlushContext{FlushHandle: h}.Execute(t.tr)
	if ferr != nil && *err == nil {
		*err = fmt.Errorf("tpm flush %#x: %w", uint32(h), ferr)
	}
}

func pcrSelection(pcrs []int) tpm2.TPMLPCRSelection {
	u := make([]uint, len(pcrs))
	for i, p := range pcrs {
		u[i] = uint(p)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash:      tpm2.TPMAlgSHA256,
		PCRSelect: tpm2.PCClientCompatible.PCRs(u...),
	}}}
}
