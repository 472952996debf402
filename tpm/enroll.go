package tpm

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Enrollment gives one TPM's secret to another node's TPM: a node holding
// the secret wraps it in software to the new node's endorsement key (EK),
// and only the TPM owning that EK can import it. (The sealed master object
// is FixedTPM, so TPM2_Duplicate of it is impossible by design; every
// daemon holds the seed in memory anyway.)

// ekCertIndex is the NV index of the RSA-2048 EK certificate (TCG EK
// Credential Profile).
const ekCertIndex = 0x01c00002

// EK is a TPM's RSA-2048 endorsement key of the TCG default template.
type EK struct {
	Public []byte // TPM2B_PUBLIC
	Name   []byte // TPM name: algorithm id and SHA-256 of the public area
	Cert   []byte // DER certificate from NV, nil when the TPM has none
}

// Hash is the EK's identity an admin compares before approving a node:
// hex SHA-256 of its public area.
func (e *EK) Hash() string { return NameHash(e.Name) }

// NameHash is the hex digest part of a TPM name.
func NameHash(name []byte) string {
	if len(name) < 2 {
		return hex.EncodeToString(name)
	}
	return hex.EncodeToString(name[2:])
}

// EK recreates the TPM's endorsement key from the template (the same key
// every time) and reads its certificate, if the TPM stores one.
func (t *TPM) EK() (_ *EK, err error) {
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	ek, err := t.createEK()
	if err != nil {
		return nil, err
	}
	defer t.flush(ek.handle, &err)
	out := &EK{Public: tpm2.Marshal(tpm2.New2B(ek.pub)), Name: bytes.Clone(ek.name.Buffer)}
	out.Cert, err = t.readNV(ekCertIndex)
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (t *TPM) createEK() (*primary, error) {
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpm2.RSAEKTemplate)}.Execute(t.tr)
	if err != nil {
		return nil, classify("create EK", nil, err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err == nil {
		var name *tpm2.TPM2BName
		if name, err = tpm2.ObjectName(pub); err == nil {
			return &primary{handle: rsp.ObjectHandle, name: *name, pub: *pub}, nil
		}
	}
	t.flush(rsp.ObjectHandle, &err)
	return nil, fmt.Errorf("tpm create EK: %w", err)
}

// readNV reads a whole NV index; nil when it is not defined.
func (t *TPM) readNV(idx tpm2.TPMHandle) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(t.tr)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nil, nil
	}
	if err != nil {
		return nil, classify("read EK certificate", nil, err)
	}
	p, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("tpm read EK certificate: %w", err)
	}
	h := tpm2.NamedHandle{Handle: idx, Name: pub.NVName}
	var out []byte
	for off := uint16(0); off < p.DataSize; {
		n := min(p.DataSize-off, 768)
		r, err := tpm2.NVRead{AuthHandle: h, NVIndex: h, Size: n, Offset: off}.Execute(t.tr)
		if err != nil {
			return nil, classify("read EK certificate", nil, err)
		}
		out = append(out, r.Data.Buffer...)
		off += n
	}
	return out, nil
}

// Wrapped is a secret wrapped to one TPM's EK (TPM2_Import's inputs).
type Wrapped struct {
	EKName    []byte `json:"ekName"`    // the TPM it is for
	Public    []byte `json:"public"`    // TPM2B_PUBLIC of the sealed data object
	Duplicate []byte `json:"duplicate"` // its private part, encrypted to the EK
	Seed      []byte `json:"seed"`      // the symmetric seed, encrypted to the EK
}

// WrapToEK wraps secret, in software, to the EK whose TPM2B_PUBLIC is
// ekPublic. It needs no TPM.
func WrapToEK(ekPublic, secret []byte) (*Wrapped, error) {
	if len(secret) == 0 || len(secret) > maxSecret {
		return nil, fmt.Errorf("tpm wrap: secret of %d bytes; want 1 to %d", len(secret), maxSecret)
	}
	ek, err := parsePublic(ekPublic)
	if err != nil {
		return nil, fmt.Errorf("tpm wrap: bad EK public area: %w", err)
	}
	if !ek.ObjectAttributes.Restricted || !ek.ObjectAttributes.Decrypt || ek.ObjectAttributes.SignEncrypt {
		return nil, errors.New("tpm wrap: the key given is not an endorsement key (a restricted decryption key)")
	}
	ekName, err := tpm2.ObjectName(ek)
	if err != nil {
		return nil, fmt.Errorf("tpm wrap: %w", err)
	}
	encap, err := tpm2.ImportEncapsulationKey(ek)
	if err != nil {
		return nil, fmt.Errorf("tpm wrap: %w", err)
	}
	obfuscate := make([]byte, 32)
	rand.Read(obfuscate)
	unique := sha256.Sum256(append(bytes.Clone(obfuscate), secret...))
	pub := tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgKeyedHash,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{UserWithAuth: true, NoDA: true},
		Parameters:       tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{}),
		Unique:           tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: unique[:]}),
	}
	name, err := tpm2.ObjectName(&pub)
	if err != nil {
		return nil, fmt.Errorf("tpm wrap: %w", err)
	}
	sens := tpm2.Marshal(tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgKeyedHash,
		SeedValue:     tpm2.TPM2BDigest{Buffer: obfuscate},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BSensitiveData{Buffer: secret}),
	})
	defer clear(sens)
	dup, seed, err := tpm2.CreateDuplicate(rand.Reader, encap, name.Buffer, sens)
	if err != nil {
		return nil, fmt.Errorf("tpm wrap: %w", err)
	}
	return &Wrapped{EKName: ekName.Buffer, Public: tpm2.Marshal(tpm2.New2B(pub)), Duplicate: dup, Seed: seed}, nil
}

// ErrWrongEK marks a wrapped secret made for another TPM's EK; nothing was
// sent to this TPM. The error is a *WrongEKError.
var ErrWrongEK = errors.New("wrapped to another TPM's endorsement key")

// WrongEKError names the TPM a wrapped secret was made for and this one.
type WrongEKError struct{ For, This []byte }

func (e *WrongEKError) Error() string {
	return fmt.Sprintf("%v: made for TPM %s, this TPM is %s (EK hashes); nothing was imported", ErrWrongEK, NameHash(e.For), NameHash(e.This))
}

func (e *WrongEKError) Is(target error) bool { return target == ErrWrongEK }

// endorsementAuth satisfies the EK's policy: PolicySecret on the
// endorsement hierarchy (empty authorization).
func endorsementAuth() tpm2.Session {
	return tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tr transport.TPM, h tpm2.TPMISHPolicy, nonce tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicySecret{AuthHandle: tpm2.TPMRHEndorsement, PolicySession: h, NonceTPM: nonce}.Execute(tr)
		return err
	})
}

// Import imports w under this TPM's EK and unseals it over a session
// salted to the EK with response encryption, so the secret never crosses
// the bus in clear. It refuses, before sending anything, a w made for
// another TPM. The caller wipes the secret; the imported object is not
// kept (seal the secret again under the SRK).
func (t *TPM) Import(w *Wrapped) (secret []byte, err error) {
	if w == nil {
		return nil, errors.New("tpm import: nothing to import")
	}
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](w.Public)
	if err != nil {
		return nil, fmt.Errorf("tpm import: bad public area: %w", err)
	}
	if err := t.lock(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	defer func() {
		if err != nil {
			clear(secret)
			secret = nil
		}
	}()
	ek, err := t.createEK()
	if err != nil {
		return nil, err
	}
	defer t.flush(ek.handle, &err)
	if !bytes.Equal(w.EKName, ek.name.Buffer) {
		return nil, &WrongEKError{For: bytes.Clone(w.EKName), This: bytes.Clone(ek.name.Buffer)}
	}
	parent := tpm2.AuthHandle{Handle: ek.handle, Name: ek.name, Auth: endorsementAuth()}
	imp, err := tpm2.Import{
		ParentHandle: parent,
		ObjectPublic: *pub,
		Duplicate:    tpm2.TPM2BPrivate{Buffer: w.Duplicate},
		InSymSeed:    tpm2.TPM2BEncryptedSecret{Buffer: w.Seed},
	}.Execute(t.tr)
	if err != nil {
		return nil, classify("import", nil, err)
	}
	obj, err := tpm2.Load{ParentHandle: parent, InPublic: *pub, InPrivate: imp.OutPrivate}.Execute(t.tr)
	if err != nil {
		return nil, classify("load imported", nil, err)
	}
	defer t.flush(obj.ObjectHandle, &err)
	rsp, err := tpm2.Unseal{ItemHandle: tpm2.NamedHandle{Handle: obj.ObjectHandle, Name: obj.Name}}.Execute(t.tr,
		tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.Salted(ek.handle, ek.pub), tpm2.AESEncryption(128, tpm2.EncryptOut)))
	if err != nil {
		return nil, classify("unseal imported", nil, err)
	}
	return rsp.OutData.Buffer, nil
}

// parsePublic decodes a TPM2B_PUBLIC.
func parsePublic(b []byte) (*tpm2.TPMTPublic, error) {
	p2b, err := tpm2.Unmarshal[tpm2.TPM2BPublic](b)
	if err != nil {
		return nil, err
	}
	return p2b.Contents()
}

// PublicHash is the EK hash (as EK.Hash) of a TPM2B_PUBLIC.
func PublicHash(public []byte) (string, error) {
	p, err := parsePublic(public)
	if err != nil {
		return "", fmt.Errorf("bad public area: %w", err)
	}
	name, err := tpm2.ObjectName(p)
	if err != nil {
		return "", err
	}
	return NameHash(name.Buffer), nil
}

// oidSAN is subjectAltName. TPM EK certificates carry it critical, holding
// only a directoryName (TCG EK Credential Profile), which Go's x509 does
// not handle.
var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

// VerifyEKCert checks that cert (DER) certifies the EK whose TPM2B_PUBLIC
// is ekPublic and chains to one of roots: how a manufacturer's CA can
// approve nodes without an admin.
func VerifyEKCert(ekPublic, cert []byte, roots *x509.CertPool) error {
	if len(cert) == 0 {
		return errors.New("the TPM has no EK certificate")
	}
	c, err := x509.ParseCertificate(cert)
	if err != nil {
		return fmt.Errorf("EK certificate: %w", err)
	}
	c.UnhandledCriticalExtensions = slices.DeleteFunc(c.UnhandledCriticalExtensions, func(o asn1.ObjectIdentifier) bool { return o.Equal(oidSAN) })
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("EK certificate: %w", err)
	}
	p, err := parsePublic(ekPublic)
	if err != nil {
		return fmt.Errorf("bad EK public area: %w", err)
	}
	ek, err := tpm2.Pub(*p)
	if err != nil {
		return fmt.Errorf("EK public area: %w", err)
	}
	certKey, ok := c.PublicKey.(*rsa.PublicKey)
	ekKey, ok2 := ek.(*rsa.PublicKey)
	if !ok || !ok2 || !certKey.Equal(ekKey) {
		return errors.New("the EK certificate certifies another key than this EK")
	}
	return nil
}
