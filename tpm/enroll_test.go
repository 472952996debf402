package tpm

import (
	"bytes"
	"crypto/x509"
	"errors"
	"strings"
	"testing"

	"github.com/keyfs/keyfs/tpm/tpmtest"
)

// TestEnrollAcrossTPMs: a secret wrapped in software to B's EK imports
// on B, over a salted session that keeps it off the bus, and only there:
// A refuses it naming both TPMs, a tampered blob fails, nothing leaks.
func TestEnrollAcrossTPMs(t *testing.T) {
	specA, specB := tpmtest.StartSWTPM(t), tpmtest.StartSWTPM(t)
	a := mustOpen(t, specA)
	conn, err := dialSWTPM(strings.TrimPrefix(specB, "swtpm:"), defaultTimeout)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{TPMCloser: conn}
	b, err := New(rec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	beforeA, beforeB := handles(t, a), handles(t, b)

	ekA, err := a.EK()
	if err != nil {
		t.Fatal(err)
	}
	ekB, err := b.EK()
	if err != nil {
		t.Fatal(err)
	}
	again, err := b.EK()
	if err != nil || !bytes.Equal(again.Name, ekB.Name) {
		t.Fatalf("the EK is not the same key twice: %v", err)
	}
	if ekA.Hash() == ekB.Hash() || len(ekB.Hash()) != 64 {
		t.Fatalf("EK hashes %s and %s", ekA.Hash(), ekB.Hash())
	}
	noLeaks(t, b, beforeB, "EK")

	secret := newSecret(t)
	w, err := WrapToEK(ekB.Public, secret)
	if err != nil {
		t.Fatal(err)
	}
	for _, part := range [][]byte{w.Public, w.Duplicate, w.Seed} {
		if bytes.Contains(part, secret[:8]) {
			t.Fatal("the wrapped blob holds the secret in clear")
		}
	}
	rec.msgs = nil
	got, err := b.Import(w)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, secret) {
		t.Fatal("B imported another secret")
	}
	noLeaks(t, b, beforeB, "Import")
	if all := bytes.Join(rec.msgs, nil); len(rec.msgs) < 8 || bytes.Contains(all, secret[:8]) || bytes.Contains(all, secret[16:24]) {
		t.Fatalf("%d messages; the secret crossed B's bus in clear: %v", len(rec.msgs), bytes.Contains(all, secret[:8]))
	}

	_, err = a.Import(w)
	var wrong *WrongEKError
	if !errors.Is(err, ErrWrongEK) || !errors.As(err, &wrong) || !strings.Contains(err.Error(), "made for TPM "+ekB.Hash()+", this TPM is "+ekA.Hash()) {
		t.Fatalf("A importing B's blob: %v", err)
	}
	noLeaks(t, a, beforeA, "the refused Import")

	bad := *w
	bad.Duplicate = bytes.Clone(w.Duplicate)
	bad.Duplicate[len(bad.Duplicate)-1] ^= 1
	if s, err := b.Import(&bad); err == nil || s != nil {
		t.Fatalf("a tampered blob imported: %v", err)
	}
	noLeaks(t, b, beforeB, "the failed Import")

	if _, err := WrapToEK(ekB.Public[:10], secret); err == nil {
		t.Error("a truncated EK public area was accepted")
	}
	if _, err := WrapToEK(ekB.Public, make([]byte, maxSecret+1)); err == nil {
		t.Error("an oversized secret was accepted")
	}
}

// TestEKCertificate: a TPM manufactured with an EK certificate presents
// it; it verifies against its CA for its own EK only.
func TestEKCertificate(t *testing.T) {
	spec, caPEM := tpmtest.StartSWTPMWithEKCert(t)
	tp := mustOpen(t, spec)
	ek, err := tp.EK()
	if err != nil {
		t.Fatal(err)
	}
	if len(ek.Cert) == 0 {
		t.Fatal("no EK certificate read from NV")
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatal("the CA's PEM holds no certificate")
	}
	if err := VerifyEKCert(ek.Public, ek.Cert, roots); err != nil {
		t.Fatalf("the TPM's own EK certificate: %v", err)
	}
	other, err := mustOpen(t, tpmtest.StartSWTPM(t)).EK()
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyEKCert(other.Public, ek.Cert, roots); err == nil || !strings.Contains(err.Error(), "another key") {
		t.Errorf("a certificate presented for another EK: %v", err)
	}
	if err := VerifyEKCert(ek.Public, ek.Cert, x509.NewCertPool()); err == nil {
		t.Error("verified against no CA")
	}
	if err := VerifyEKCert(other.Public, other.Cert, roots); err == nil || !strings.Contains(err.Error(), "no EK certificate") {
		t.Errorf("a TPM without a certificate: %v", err)
	}
}
