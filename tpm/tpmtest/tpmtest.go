// Package tpmtest starts throw-away swtpm instances for tests and holds the
// TPM commands only tests send (PCR extends, handle listings), so package
// tpm exports none of them.
package tpmtest

import (
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/tcp"

	"github.com/keyfs/keyfs/internal/syncbuf"
	"github.com/keyfs/keyfs/internal/testenv"
)

// StartSWTPM starts a private swtpm with fresh state on free 127.0.0.1
// ports and returns its spec for tpm.Open ("swtpm:127.0.0.1:PORT"). It is
// stopped when the test ends. Without swtpm installed the test is skipped,
// unless the CI environment variable is set: then it fails.
func StartSWTPM(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		testenv.Missing(t, fmt.Sprintf("swtpm not found (%v); apt-get install swtpm swtpm-tools", err))
	}
	dir := t.TempDir()
	var lastErr string
	// A free port can be taken between probing and swtpm binding it: retry.
	for range 3 {
		addr, errText, ok := start(t, bin, dir)
		if ok {
			return "swtpm:" + addr
		}
		lastErr = errText
	}
	t.Fatalf("swtpm did not start: %s", lastErr)
	return ""
}

// StartSWTPMWithEKCert is StartSWTPM with a TPM manufactured by
// swtpm_setup: an RSA EK certificate in NV, issued by a local CA made for
// the test. It returns the spec and the CA's certificates (PEM: the root
// and the issuer), what an EK-certificate approval rule trusts.
func StartSWTPMWithEKCert(t testing.TB) (spec string, caPEM []byte) {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	setup, err2 := exec.LookPath("swtpm_setup")
	if err != nil || err2 != nil {
		testenv.Missing(t, fmt.Sprintf("swtpm or swtpm_setup not found (%v %v); apt-get install swtpm swtpm-tools", err, err2))
	}
	dir := t.TempDir()
	state, ca := filepath.Join(dir, "state"), filepath.Join(dir, "ca")
	for _, d := range []string{state, ca} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		"localca.conf": "statedir = " + ca + "\nsigningkey = " + ca + "/signkey.pem\nissuercert = " + ca + "/issuercert.pem\ncertserial = " + ca + "/certserial\n",
		"swtpm_setup.conf": "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = " + filepath.Join(dir, "localca.conf") +
			"\ncreate_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n",
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command(setup, "--tpm2", "--tpmstate", state, "--create-ek-cert", "--config", filepath.Join(dir, "swtpm_setup.conf"), "--overwrite").CombinedOutput()
	if err != nil {
		t.Fatalf("swtpm_setup: %v\n%s", err, out)
	}
	for _, f := range []string{"swtpm-localca-rootca-cert.pem", "issuercert.pem"} {
		b, err := os.ReadFile(filepath.Join(ca, f))
		if err != nil {
			t.Fatalf("the local CA swtpm_setup made: %v", err)
		}
		caPEM = append(caPEM, b...)
	}
	var lastErr string
	for range 3 {
		addr, errText, ok := start(t, bin, state)
		if ok {
			return "swtpm:" + addr, caPEM
		}
		lastErr = errText
	}
	t.Fatalf("swtpm did not start: %s", lastErr)
	return "", nil
}

func start(t testing.TB, bin, dir string) (addr, errText string, ok bool) {
	port, ctrl := freePort(t), freePort(t)
	addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	var out syncbuf.Buffer
	cmd := exec.Command(bin, "socket", "--tpm2",
		"--server", "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(port),
		"--ctrl", "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(ctrl),
		"--tpmstate", "dir="+dir,
		"--flags", "not-need-init,startup-clear")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		cmd.Process.Kill()
		<-exited
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return "", out.String(), false
		default:
		}
		// swtpm serves one client at a time; this probe disconnects at once.
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			ctrlAddrs.Store("swtpm:"+addr, net.JoinHostPort("127.0.0.1", strconv.Itoa(ctrl)))
			t.Cleanup(func() {
				stop()
				ctrlAddrs.Delete("swtpm:" + addr)
			})
			return addr, "", true
		}
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	return "", "not listening after 10s: " + out.String(), false
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// ctrlAddrs maps the spec of each running swtpm to its control port.
var ctrlAddrs sync.Map

// Dial opens a raw connection to a swtpm that StartSWTPM started. swtpm
// serves one client at a time: close any other client first, and close
// this one before the next (it is closed when the test ends at the latest).
func Dial(t testing.TB, spec string) transport.TPMCloser {
	t.Helper()
	ctrl, ok := ctrlAddrs.Load(spec)
	if !ok {
		t.Fatalf("tpmtest.Dial(%q): not a swtpm started by StartSWTPM", spec)
	}
	tr, err := tcp.Open(tcp.Config{CommandAddress: strings.TrimPrefix(spec, "swtpm:"), PlatformAddress: ctrl.(string)})
	if err != nil {
		t.Fatalf("dial swtpm %s: %v", spec, err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

// ExtendPCR extends the sha256 bank of pcr with sha256(data), as a new boot
// measurement would.
func ExtendPCR(t testing.TB, tr transport.TPM, pcr int, data []byte) {
	t.Helper()
	d := sha256.Sum256(data)
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{
			{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]},
		}},
	}.Execute(tr)
	if err != nil {
		t.Fatalf("extend PCR %d: %v", pcr, err)
	}
}

// TransientHandles lists the transient objects and the loaded and saved
// sessions the TPM holds (only this client's under a resource manager).
// Tests compare it before and after an operation to find leaks.
func TransientHandles(t testing.TB, tr transport.TPM) []uint32 {
	t.Helper()
	var out []uint32
	for _, first := range []uint32{0x80000000, 0x02000000, 0x03000000} {
		prop := first
		for {
			rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: prop, PropertyCount: 64}.Execute(tr)
			if err != nil {
				t.Fatalf("get handles: %v", err)
			}
			hs, err := rsp.CapabilityData.Data.Handles()
			if err != nil {
				t.Fatalf("get handles: %v", err)
			}
			for _, h := range hs.Handle {
				out = append(out, uint32(h))
			}
			if !rsp.MoreData || len(hs.Handle) == 0 {
				break
			}
			// Loaded policy sessions come back as 0x03...; continue by index.
			prop = first | (uint32(hs.Handle[len(hs.Handle)-1])&0xFFFFFF + 1)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
