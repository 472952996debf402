package tpm

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/keyfs/keyfs/tpm/tpmtest"
)

func TestSWTPMSealUnsealAcrossConnectionsAndProcesses(t *testing.T) {
	spec := tpmtest.StartSWTPM(t)
	secret := newSecret(t)

	tp := mustOpen(t, spec)
	before := handles(t, tp)
	plain := mustSeal(t, tp, secret, nil)
	bound := mustSeal(t, tp, secret, []int{16, 7})
	if !slices.Equal(bound.PCRs, []int{7, 16}) {
		t.Fatalf("blob PCRs = %v, want [7 16]", bound.PCRs)
	}
	noLeaks(t, tp, before, "Seal")
	tp.Close() // swtpm serves one client at a time

	for _, b := range []*Blob{plain, bound} {
		unsealInSubprocess(t, spec, b, secret)
	}

	tp = mustOpen(t, spec) // a new connection
	for _, b := range []*Blob{plain, bound} {
		mustUnseal(t, tp, b, secret)
	}
	noLeaks(t, tp, before, "Unseal")
}

func TestSWTPMPCRPolicy(t *testing.T) {
	tp := mustOpen(t, tpmtest.StartSWTPM(t))
	before := handles(t, tp)
	secret := newSecret(t)
	b := mustSeal(t, tp, secret, []int{16})
	mustUnseal(t, tp, b, secret)

	tpmtest.ExtendPCR(t, tp.tr, 16, []byte("a new boot measurement"))
	got, err := tp.Unseal(b)
	var pe *PCRPolicyError
	if !errors.As(err, &pe) {
		t.Fatalf("Unseal after extending PCR 16 = %v, want *PCRPolicyError", err)
	}
	if got != nil {
		t.Fatal("Unseal returned data with an error")
	}
	if !slices.Equal(pe.PCRs, []int{16}) || !strings.Contains(err.Error(), "PCRs 16 changed") ||
		!strings.Contains(err.Error(), "sha256 bank") {
		t.Fatalf("error does not name PCR 16: %v", err)
	}
	if !errors.Is(err, tpm2.TPMRCPolicyFail) {
		t.Fatalf("error does not wrap TPM_RC_POLICY_FAIL: %v", err)
	}
	t.Logf("error: %v", err)
	noLeaks(t, tp, before, "the failed PCR-policy Unseal")

	// A key sealed to the new value unseals; one without PCRs never cared.
	b2 := mustSeal(t, tp, secret, []int{16})
	mustUnseal(t, tp, b2, secret)
	noLeaks(t, tp, before, "Seal and Unseal")
}

func TestSWTPMSecretNeverOnTheBus(t *testing.T) {
	spec := tpmtest.StartSWTPM(t)
	conn, err := dialSWTPM(strings.TrimPrefix(spec, "swtpm:"), defaultTimeout)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{TPMCloser: conn}
	tp, err := New(rec)
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	checkSecretNeverOnTheBus(t, tp, rec)
}

// checkSecretNeverOnTheBus seals and unseals a secret with and without PCRs
// and checks that no command or response holds it, or any 8 bytes of it.
func checkSecretNeverOnTheBus(t *testing.T, tp *TPM, rec *recorder) {
	secret := newSecret(t)
	var blobs []*Blob
	for _, pcrs := range [][]int{nil, {16}} {
		b := mustSeal(t, tp, secret, pcrs)
		mustUnseal(t, tp, b, secret)
		blobs = append(blobs, b)
	}
	if len(rec.msgs) < 20 {
		t.Fatalf("recorded only %d messages", len(rec.msgs))
	}
	all := bytes.Join(rec.msgs, nil)
	for i, m := range append(rec.msgs, all) {
		for off := 0; off+8 <= len(secret); off++ {
			if bytes.Contains(m, secret[off:off+8]) {
				t.Fatalf("message %d holds secret bytes %d..%d in clear", i, off, off+8)
			}
		}
	}
	// The recorder sees what a bus sniffer sees: the sealed public part, and
	// the secret itself when it is unsealed through a plain password session.
	if !bytes.Contains(all, blobs[0].Public[2:]) {
		t.Fatal("recorder missed the Create response")
	}
	unsealInClear(t, tp, blobs[0])
	if !bytes.Contains(bytes.Join(rec.msgs, nil), secret) {
		t.Fatal("recorder did not see the secret unsealed in clear")
	}
}

// unsealInClear unseals through a password session, as a careless client
// would: the secret crosses the bus unencrypted.
func unsealInClear(t *testing.T, tp *TPM, b *Blob) {
	var err error
	defer func() {
		if err != nil {
			t.Fatal(err)
		}
	}()
	pub, priv, err := b.decode()
	if err != nil {
		return
	}
	srk, err := tp.createSRK()
	if err != nil {
		return
	}
	defer tp.flush(srk.handle, &err)
	obj, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: srk.handle, Name: srk.name, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     *pub, InPrivate: *priv,
	}.Execute(tp.tr)
	if err != nil {
		return
	}
	defer tp.flush(obj.ObjectHandle, &err)
	_, err = tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: obj.ObjectHandle, Name: obj.Name, Auth: tpm2.PasswordAuth(nil)}}.Execute(tp.tr)
}

func TestSWTPMWrongTPM(t *testing.T) {
	a := mustOpen(t, tpmtest.StartSWTPM(t))
	b := mustOpen(t, tpmtest.StartSWTPM(t))
	secret := newSecret(t)
	before := handles(t, b)
	for _, pcrs := range [][]int{nil, {16}} {
		// Pinned: refused at the SRK, before anything is loaded.
		blob := mustSeal(t, a, secret, pcrs)
		got, err := b.Unseal(blob)
		var me *SRKMismatchError
		if !errors.Is(err, ErrSRKMismatch) || !errors.As(err, &me) || got != nil {
			t.Fatalf("Unseal on another TPM = %v, want ErrSRKMismatch", err)
		}
		for _, want := range []string{fmt.Sprintf("sealed under SRK %x", blob.SRKName), "another TPM", "cleared", "keyfs recover"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("message lacks %q: %v", want, err)
			}
		}
		noLeaks(t, b, before, "the wrong-SRK Unseal")

		// Unpinned (written before pinning): the TPM itself refuses it.
		blob.SRKName = nil
		got, err = b.Unseal(blob)
		if !errors.Is(err, ErrWrongTPM) || got != nil {
			t.Fatalf("Unseal of an unpinned blob on another TPM = %v, want ErrWrongTPM", err)
		}
		if !strings.Contains(err.Error(), "sealed by a different TPM (or the TPM was cleared); restore with `keyfs recover`") {
			t.Fatalf("unhelpful message: %v", err)
		}
		noLeaks(t, b, before, "the wrong-TPM Unseal")
	}
}

func TestNoDevice(t *testing.T) {
	_, err := Open("/nonexistent/tpm")
	if !errors.Is(err, ErrNoDevice) {
		t.Fatalf("Open(/nonexistent/tpm) = %v, want ErrNoDevice", err)
	}
	for _, want := range []string{"/nonexistent/tpm", "--tpm swtpm:HOST:PORT", "--tpm sim"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message %q does not mention %q", err, want)
		}
	}

	// Nothing listening on a swtpm address.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, err = Open("swtpm:" + addr)
	if !errors.Is(err, ErrNoDevice) || !strings.Contains(err.Error(), addr) {
		t.Fatalf("Open(swtpm:%s) with nothing listening = %v, want ErrNoDevice naming the address", addr, err)
	}
}

func TestTimeout(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() { // accept, never answer
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	addr := l.Addr().String()
	start := time.Now()
	_, err = open("swtpm:"+addr, 300*time.Millisecond)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("open of a silent TPM = %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("gave up after %v, want about 300ms", d)
	}
	if !strings.Contains(err.Error(), addr) || !strings.Contains(err.Error(), "300ms") {
		t.Fatalf("message does not name the address and the timeout: %v", err)
	}
	t.Logf("error: %v", err)
}

// swtpm serves one client at a time: a second one must time out, not hang.
func TestSWTPMBusy(t *testing.T) {
	spec := tpmtest.StartSWTPM(t)
	mustOpen(t, spec)
	_, err := open(spec, 300*time.Millisecond)
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "one client at a time") {
		t.Fatalf("second client = %v, want ErrTimeout", err)
	}
}

func TestSWTPMLockout(t *testing.T) {
	tp := mustOpen(t, tpmtest.StartSWTPM(t))
	before := handles(t, tp)
	secret := newSecret(t)
	ours := mustSeal(t, tp, secret, nil)

	// An object without noDA, with a password keyfs does not know: each
	// Unseal is a failed authorization, until the TPM locks out. (The first
	// try also checks the retrying transport: swtpm answers TPM_RC_RETRY to
	// the first use of a DA-protected object after startup.)
	daBlob := sealDAProtected(t, tp, []byte("not-the-empty-password"))
	var err error
	tries := 0
	for ; tries < 20; tries++ {
		if _, err = tp.Unseal(daBlob); errors.Is(err, ErrLockout) {
			break
		}
		if !errors.Is(err, tpm2.TPMRCAuthFail) {
			t.Fatalf("Unseal with a wrong password = %v, want TPM_RC_AUTH_FAIL", err)
		}
	}
	if !errors.Is(err, ErrLockout) || !errors.Is(err, tpm2.TPMRCLockout) {
		t.Fatalf("after %d failed authorizations: %v, want ErrLockout", tries, err)
	}
	t.Logf("locked out after %d failures: %v", tries, err)
	noLeaks(t, tp, before, "the failed Unseals")

	// keyfs's own keys are noDA: lockout does not stop them.
	mustUnseal(t, tp, ours, secret)
	mustSeal(t, tp, secret, []int{16})
	noLeaks(t, tp, before, "Seal and Unseal in lockout")
}

// sealDAProtected seals a dummy secret in an object subject to dictionary-attack protection.
func sealDAProtected(t *testing.T, tp *TPM, password []byte) *Blob {
	srk, err := tp.createSRK()
	if err != nil {
		t.Fatal(err)
	}
	defer tp.flush(srk.handle, &err)
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: srk.handle, Name: srk.name, Auth: tpm2.PasswordAuth(nil)},
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			UserAuth: tpm2.TPM2BAuth{Buffer: password},
			Data:     tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: []byte("dummy")}),
		}},
		InPublic: tpm2.New2B(tpm2.TPMTPublic{
			Type:             tpm2.TPMAlgKeyedHash,
			NameAlg:          tpm2.TPMAlgSHA256,
			ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, UserWithAuth: true},
		}),
	}.Execute(tp.tr)
	if err != nil {
		t.Fatal(err)
	}
	return &Blob{Public: tpm2.Marshal(rsp.OutPublic), Private: tpm2.Marshal(rsp.OutPrivate)}
}

func TestClassify(t *testing.T) {
	// Format-1 codes carry the parameter/session number: classify must see through it.
	integrity := tpm2.TPMRC(uint32(tpm2.TPMRCIntegrity) | 0x040 | 0x200) // parameter 2
	policy := tpm2.TPMRC(uint32(tpm2.TPMRCPolicyFail) | 0x800 | 0x100)   // session 1
	tests := []struct {
		op   string
		pcrs []int
		err  error
		want error
	}{
		{"unseal", nil, tpm2.TPMRCLockout, ErrLockout},
		{"load", nil, tpm2.TPMRCLockout, ErrLockout},
		{"load", nil, integrity, ErrWrongTPM},
		{"unseal", []int{7}, policy, tpm2.TPMRCPolicyFail},
	}
	for _, tt := range tests {
		err := classify(tt.op, tt.pcrs, tt.err)
		if !errors.Is(err, tt.want) || !errors.Is(err, tt.err) {
			t.Errorf("classify(%s, %v) = %v, want %v", tt.op, tt.err, err, tt.want)
		}
	}
	var pe *PCRPolicyError
	if err := classify("unseal", []int{7, 16}, policy); !errors.As(err, &pe) ||
		err.Error() != "PCR policy not satisfied: PCRs 7,16 changed since the key was sealed (sha256 bank); "+
			"boot into the state the key was sealed in, or restore with `keyfs recover` and seal again" {
		t.Errorf("policy failure: %v", err)
	}
	if err := classify("create", nil, integrity); errors.Is(err, ErrWrongTPM) {
		t.Errorf("integrity outside Load is not a wrong TPM: %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	for _, spec := range []string{"tcp:127.0.0.1:2321", "swtpm:nohostport", "dev/tpm0"} {
		if tp, err := Open(spec); err == nil {
			tp.Close()
			t.Errorf("Open(%q) succeeded", spec)
		} else {
			t.Logf("Open(%q): %v", spec, err)
		}
	}
}

func TestArgumentChecks(t *testing.T) {
	tp := mustOpen(t, tpmtest.StartSWTPM(t))
	if tp.Insecure() {
		t.Error("swtpm reported as the insecure simulator")
	}
	if _, err := tp.Seal(nil, nil); err == nil {
		t.Error("sealed an empty secret")
	}
	if _, err := tp.Seal(make([]byte, 129), nil); err == nil {
		t.Error("sealed 129 bytes")
	}
	if _, err := tp.Seal(make([]byte, 32), []int{24}); err == nil || !strings.Contains(err.Error(), "0 to 23") {
		t.Errorf("Seal with PCR 24: %v", err)
	}
	if _, err := tp.Unseal(&Blob{Public: []byte{0, 1}, Private: []byte{0, 1, 2}}); err == nil {
		t.Error("unsealed garbage")
	}
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tp.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := tp.Seal(make([]byte, 32), nil); err == nil {
		t.Error("Seal after Close succeeded")
	}
}

func BenchmarkSealSWTPM(b *testing.B) {
	tp := mustOpen(b, tpmtest.StartSWTPM(b))
	secret := newSecret(b)
	for b.Loop() {
		mustSeal(b, tp, secret, nil)
	}
}

func BenchmarkUnsealSWTPM(b *testing.B) {
	tp := mustOpen(b, tpmtest.StartSWTPM(b))
	secret := newSecret(b)
	blob := mustSeal(b, tp, secret, nil)
	for b.Loop() {
		mustUnseal(b, tp, blob, secret)
	}
}

func BenchmarkUnsealPCRSWTPM(b *testing.B) {
	tp := mustOpen(b, tpmtest.StartSWTPM(b))
	secret := newSecret(b)
	blob := mustSeal(b, tp, secret, []int{7, 16})
	for b.Loop() {
		mustUnseal(b, tp, blob, secret)
	}
}
