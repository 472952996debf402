package tpm

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/keyfs/keyfs/tpm/tpmtest"
)

// recorder keeps a copy of every command and response that crosses the transport.
type recorder struct {
	transport.TPMCloser
	msgs [][]byte
}

func (r *recorder) Send(cmd []byte) ([]byte, error) {
	r.msgs = append(r.msgs, slices.Clone(cmd))
	rsp, err := r.TPMCloser.Send(cmd)
	r.msgs = append(r.msgs, slices.Clone(rsp)) // a copy: go-tpm decrypts in place
	return rsp, err
}

func newSecret(t testing.TB) []byte {
	s := make([]byte, 32)
	if _, err := rand.Read(s); err != nil {
		t.Fatal(err)
	}
	return s
}

func mustOpen(t testing.TB, spec string) *TPM {
	t.Helper()
	tp, err := Open(spec)
	if err != nil {
		t.Fatalf("Open(%q): %v", spec, err)
	}
	t.Cleanup(func() { tp.Close() })
	return tp
}

func handles(t testing.TB, tp *TPM) []uint32 {
	t.Helper()
	return tpmtest.TransientHandles(t, tp.tr)
}

// noLeaks fails the test if the TPM holds objects or sessions it did not hold before.
func noLeaks(t testing.TB, tp *TPM, before []uint32, after string) {
	t.Helper()
	if now := handles(t, tp); !slices.Equal(now, before) {
		t.Fatalf("after %s: TPM holds handles %#x, before it held %#x", after, now, before)
	}
}

func mustSeal(t testing.TB, tp *TPM, secret []byte, pcrs []int) *Blob {
	t.Helper()
	b, err := tp.Seal(secret, pcrs)
	if err != nil {
		t.Fatalf("Seal(pcrs %v): %v", pcrs, err)
	}
	return b
}

func mustUnseal(t testing.TB, tp *TPM, b *Blob, want []byte) {
	t.Helper()
	got, err := tp.Unseal(b)
	if err != nil {
		t.Fatalf("Unseal(pcrs %v): %v", b.PCRs, err)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Unseal(pcrs %v) returned a different secret", b.PCRs)
	}
}

// Environment of the helper process started by unsealInSubprocess.
const (
	envHelper = "KEYFS_TPM_TEST_HELPER"
	envSpec   = "KEYFS_TPM_TEST_SPEC"
	envBlob   = "KEYFS_TPM_TEST_BLOB"
	envWant   = "KEYFS_TPM_TEST_WANT_SHA256"
)

// TestHelperUnseal is not a test: unsealInSubprocess runs it in a new process.
func TestHelperUnseal(t *testing.T) {
	if os.Getenv(envHelper) != "unseal" {
		return
	}
	b, err := ParseBlob([]byte(os.Getenv(envBlob)))
	if err != nil {
		t.Fatal(err)
	}
	tp, err := Open(os.Getenv(envSpec))
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	got, err := tp.Unseal(b)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(got)
	if hex.EncodeToString(sum[:]) != os.Getenv(envWant) {
		t.Fatal("unsealed a different secret")
	}
	os.Stdout.WriteString("helper: unsealed OK\n")
}

// unsealInSubprocess unseals b in a fresh process of this test binary and
// returns that process's stderr.
func unsealInSubprocess(t *testing.T, spec string, b *Blob, secret []byte) string {
	t.Helper()
	text, err := b.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(secret)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperUnseal$", "-test.count=1")
	cmd.Env = append(os.Environ(), envHelper+"=unseal", envSpec+"="+spec,
		envBlob+"="+string(text), envWant+"="+hex.EncodeToString(sum[:]))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || !strings.Contains(string(out), "helper: unsealed OK") {
		t.Fatalf("unseal in a subprocess: %v\nstdout:\n%s\nstderr:\n%s", err, out, stderr.String())
	}
	return stderr.String()
}
