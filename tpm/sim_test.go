//go:build simulator

package tpm

import (
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/keyfs/keyfs/tpm/tpmtest"
)

// The simulator is one per process: these tests must not run in parallel.

func TestSimSealUnsealAcrossOpensAndProcesses(t *testing.T) {
	secret := newSecret(t)
	tp := mustOpen(t, "sim")
	if !tp.Insecure() {
		t.Fatal("the simulator does not report itself insecure")
	}
	before := handles(t, tp)
	plain := mustSeal(t, tp, secret, nil)
	bound := mustSeal(t, tp, secret, []int{16})
	mustUnseal(t, tp, plain, secret)
	noLeaks(t, tp, before, "Seal and Unseal")
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}

	// Another process, with the same fixed seed, unseals.
	for _, b := range []*Blob{plain, bound} {
		unsealInSubprocess(t, "sim", b, secret)
	}

	// A second simulator in this process, after the first was closed.
	tp = mustOpen(t, "sim")
	mustUnseal(t, tp, plain, secret)
	mustUnseal(t, tp, bound, secret)
	tpmtest.ExtendPCR(t, tp.tr, 16, []byte("x"))
	var pe *PCRPolicyError
	if _, err := tp.Unseal(bound); !errors.As(err, &pe) {
		t.Fatalf("Unseal after extending PCR 16 = %v, want *PCRPolicyError", err)
	}
	noLeaks(t, tp, before, "the failed PCR-policy Unseal")
}

// A second Open("sim") waits for the first to be closed rather than failing.
func TestSimOneAtATime(t *testing.T) {
	first := mustOpen(t, "sim")
	opened := make(chan *TPM)
	go func() {
		tp, err := Open("sim")
		if err != nil {
			t.Error(err)
		}
		opened <- tp
	}()
	select {
	case <-opened:
		t.Fatal("a second simulator opened while the first was open")
	case <-time.After(200 * time.Millisecond):
	}
	first.Close()
	select {
	case tp := <-opened:
		if tp != nil {
			tp.Close()
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the second Open did not return after the first Close")
	}
}

func TestSimSecretNeverOnTheBus(t *testing.T) {
	s, err := simulator.GetWithFixedSeedInsecure(simSeed)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{TPMCloser: transport.FromReadWriteCloser(s)}
	tp, err := New(rec)
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	defer tp.Close()
	checkSecretNeverOnTheBus(t, tp, rec)
}

func BenchmarkSealSim(b *testing.B) {
	tp := mustOpen(b, "sim")
	secret := newSecret(b)
	for b.Loop() {
		mustSeal(b, tp, secret, nil)
	}
}

func BenchmarkUnsealSim(b *testing.B) {
	tp := mustOpen(b, "sim")
	secret := newSecret(b)
	blob := mustSeal(b, tp, secret, nil)
	for b.Loop() {
		mustUnseal(b, tp, blob, secret)
	}
}
