package keystore

import (
	"crypto/hpke"
	"fmt"
)

// RecoveryKey is an offline key pair that can open the master seed escrow
// written by `keyfs init --recovery-pub`. Its private half belongs offline.
type RecoveryKey struct{ priv hpke.PrivateKey }

// GenerateRecoveryKey makes a new recovery key pair.
func GenerateRecoveryKey() (*RecoveryKey, error) {
	priv, err := kem().GenerateKey()
	if err != nil {
		return nil, fmt.Errorf("generate recovery key: %w", err)
	}
	return &RecoveryKey{priv: priv}, nil
}

// Public returns the recovery public key.
func (k *RecoveryKey) Public() *PublicKey { return newPublicKey(k.priv.PublicKey()) }

// MarshalPublic returns the recovery public key armor for `init --recovery-pub`.
func (k *RecoveryKey) MarshalPublic() []byte { return k.Public().marshalAs("recovery-pub") }

// Marshal returns the private key armor. The caller wipes it after writing.
func (k *RecoveryKey) Marshal() ([]byte, error) {
	b, err := k.priv.Bytes()
	if err != nil {
		return nil, err
	}
	defer clear(b)
	a := armor{kind: "recovery-key", headers: []header{{"kid", k.Public().KID}, {"suite", Suite}}, body: b}
	return a.marshal(), nil
}

// ParseRecoveryKey reads a recovery private key armor.
func ParseRecoveryKey(data []byte) (*RecoveryKey, error) {
	a, err := parseArmor(data, "recovery-key", "kid", "suite")
	if err != nil {
		return nil, err
	}
	defer clear(a.body)
	priv, err := kem().NewPrivateKey(a.body)
	if err != nil {
		return nil, fmt.Errorf("%w: recovery key body is not a valid key", ErrIntegrity)
	}
	k := &RecoveryKey{priv: priv}
	if k.Public().KID != a.get("kid") {
		return nil, fmt.Errorf("%w: recovery key says kid %s but holds kid %s (edited?)", ErrIntegrity, a.get("kid"), k.Public().KID)
	}
	return k, nil
}

// ParseRecoveryPublicKey reads a recovery public key armor.
func ParseRecoveryPublicKey(data []byte) (*PublicKey, error) {
	return parsePublicKeyAs(data, "recovery-pub")
}

func escrowInfo(masterKID string) []byte {
	return []byte("keyfs-escrow " + armorVersion + "\x00" + masterKID)
}

// Escrow seals the master seed to a recovery public key.
func Escrow(recovery *PublicKey, seed []byte) ([]byte, error) {
	m, err := NewMasterKey(seed)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	enc, ct, err := hpkeSeal(recovery, escrowInfo(m.KID()), seed)
	if err != nil {
		return nil, fmt.Errorf("escrow master seed: %w", err)
	}
	a := armor{kind: "escrow", headers: []header{{"recovery-kid", recovery.KID}, {"master-kid", m.KID()}, {"suite", Suite}},
		body: append(enc, ct...)}
	return a.marshal(), nil
}

func hpkeSeal(pub *PublicKey, info, plaintext []byte) (enc, ct []byte, err error) {
	enc, s, err := hpke.NewSender(pub.pub, hpke.HKDFSHA256(), hpke.AES256GCM(), info)
	if err != nil {
		return nil, nil, err
	}
	ct, err = s.Seal(nil, plaintext)
	return enc, ct, err
}

// OpenEscrow returns the master seed held in an escrow blob. The caller
// wipes it.
func (k *RecoveryKey) OpenEscrow(data []byte) ([]byte, error) {
	a, err := parseArmor(data, "escrow", "recovery-kid", "master-kid", "suite")
	if err != nil {
		return nil, err
	}
	if kid := k.Public().KID; a.get("recovery-kid") != kid {
		return nil, &KIDMismatchError{Record: a.get("recovery-kid"), Have: kid}
	}
	if len(a.body) < encSize {
		return nil, fmt.Errorf("%w: escrow body is truncated", ErrIntegrity)
	}
	r, err := hpke.NewRecipient(a.body[:encSize], k.priv, hpke.HKDFSHA256(), hpke.AES256GCM(), escrowInfo(a.get("master-kid")))
	if err != nil {
		return nil, fmt.Errorf("%w: escrow: %w", ErrIntegrity, err)
	}
	seed, err := r.Open(nil, a.body[encSize:])
	if err != nil {
		return nil, fmt.Errorf("%w: escrow does not authenticate (tampered, or made for another recovery key)", ErrIntegrity)
	}
	m, err := NewMasterKey(seed)
	if err != nil {
		clear(seed)
		return nil, err
	}
	defer m.Close()
	if m.KID() != a.get("master-kid") {
		clear(seed)
		return nil, fmt.Errorf("%w: escrow says master kid %s but holds kid %s", ErrIntegrity, a.get("master-kid"), m.KID())
	}
	return seed, nil
}
