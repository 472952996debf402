package tpm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/keyfs/keyfs/tpm/tpmtest"
)

// mitm sits between keyfs and a swtpm on the swtpm TCP framing. With an
// impostor, it answers CreatePrimary (how keyfs gets the SRK it salts its
// sessions to) from another TPM, a key of the attacker's with a
// consistent name, and relays everything else. It records every byte.
type mitm struct {
	addr     string
	real     string
	impostor string // "" relays everything to real

	mu  sync.Mutex
	rec bytes.Buffer
}

const ccCreatePrimary = 0x131

func startMITM(t *testing.T, real, impostor string) *mitm {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &mitm{addr: l.Addr().String(), real: real, impostor: impostor}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { m.serve(t, c) })
		}
	})
	return m
}

func (m *mitm) record(b []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.rec.Write(b)
}

func (m *mitm) recorded() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.rec.Bytes())
}

func (m *mitm) serve(t *testing.T, client net.Conn) {
	defer client.Close()
	dial := func(addr string) net.Conn {
		if addr == "" {
			return nil
		}
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Errorf("mitm: dial %s: %v", addr, err)
			return nil
		}
		return c
	}
	real, imp := dial(m.real), dial(m.impostor)
	if real == nil {
		return
	}
	defer real.Close()
	if imp != nil {
		defer imp.Close()
	}
	for {
		// Client frame: command (4), locality (1), length (4), TPM command.
		hdr := make([]byte, 9)
		if _, err := io.ReadFull(client, hdr); err != nil {
			return
		}
		cmd := make([]byte, binary.BigEndian.Uint32(hdr[5:]))
		if _, err := io.ReadFull(client, cmd); err != nil {
			return
		}
		m.record(hdr)
		m.record(cmd)
		to := real
		if imp != nil && len(cmd) >= 10 && binary.BigEndian.Uint32(cmd[6:10]) == ccCreatePrimary {
			to = imp
		}
		if _, err := to.Write(append(hdr, cmd...)); err != nil {
			return
		}
		// Response frame: length (4), response, acknowledgement (4).
		n := make([]byte, 4)
		if _, err := io.ReadFull(to, n); err != nil {
			return
		}
		rsp := make([]byte, binary.BigEndian.Uint32(n)+4)
		if _, err := io.ReadFull(to, rsp); err != nil {
			return
		}
		m.record(n)
		m.record(rsp)
		if _, err := client.Write(append(n, rsp...)); err != nil {
			return
		}
	}
}

// TestSWTPMPinnedSRKRefusesImpostor: an interposer that hands keyfs its
// own storage key is refused before anything secret crosses, and its
// recording holds neither the seed nor anything that decrypts it.
func TestSWTPMPinnedSRKRefusesImpostor(t *testing.T) {
	real, attacker := tpmtest.StartSWTPM(t), tpmtest.StartSWTPM(t)
	secret := newSecret(t)
	tp := mustOpen(t, real)
	pinned := mustSeal(t, tp, secret, nil)
	tp.Close()
	addr := func(spec string) string { return strings.TrimPrefix(spec, "swtpm:") }

	// Control: a plain relay changes nothing, so the proxy is sound.
	relay := startMITM(t, addr(real), "")
	through := mustOpen(t, "swtpm:"+relay.addr)
	mustUnseal(t, through, pinned, secret)
	through.Close()

	evil := startMITM(t, addr(real), addr(attacker))
	through = mustOpen(t, "swtpm:"+evil.addr)
	got, err := through.Unseal(pinned)
	var me *SRKMismatchError
	if !errors.As(err, &me) || got != nil {
		t.Fatalf("Unseal through an impostor SRK = %v, want *SRKMismatchError", err)
	}
	if !bytes.Equal(me.Pinned, pinned.SRKName) || bytes.Equal(me.Got, pinned.SRKName) {
		t.Errorf("mismatch names pinned %x, got %x", me.Pinned, me.Got)
	}
	rec := evil.recorded()
	if len(rec) == 0 || bytes.Contains(rec, secret) {
		t.Fatalf("recording: %d bytes, holds the seed: %v", len(rec), bytes.Contains(rec, secret))
	}
	// Nothing that decrypts it either: no Load, no session was started.
	for _, cc := range []uint32{0x157 /* Load */, 0x176 /* StartAuthSession */, 0x15e /* Unseal */} {
		if !containsCommand(relay.recorded(), cc) {
			t.Fatalf("the relay's recording lacks command %#x: the parser is wrong", cc)
		}
		if containsCommand(rec, cc) {
			t.Errorf("keyfs sent command %#x through the impostor", cc)
		}
	}
}

// containsCommand reports whether a recording holds a client frame whose
// TPM command code is cc.
func containsCommand(rec []byte, cc uint32) bool {
	for len(rec) >= 9 {
		n := int(binary.BigEndian.Uint32(rec[5:9]))
		if len(rec) < 9+n {
			return false
		}
		cmd := rec[9 : 9+n]
		if len(cmd) >= 10 && binary.BigEndian.Uint32(cmd[6:10]) == cc {
			return true
		}
		rec = rec[9+n:]
		if len(rec) < 4 {
			return false
		}
		rn := int(binary.BigEndian.Uint32(rec[:4]))
		if len(rec) < 4+rn+4 {
			return false
		}
		rec = rec[4+rn+4:]
	}
	return false
}
