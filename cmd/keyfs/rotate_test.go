package main

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/fusetest"
)

// TestMasterRotation: rotate, seal offline to the old and the new public
// key, reseal while a mounted file is read in a loop (no failed read, the
// value never changes), retire the old master, and see records sealed to
// it refused with the kid message.
func TestMasterRotation(t *testing.T) {
	fusetest.Require(t)
	work := t.TempDir()
	c := &cli{t: t, state: filepath.Join(work, "state"), tpm: "sim"}
	rec := filepath.Join(work, "recovery.key")
	c.must(0, "", "recovery-keygen", "-o", rec)
	kid1 := strings.TrimSpace(c.must(0, "", "init", "--recovery-pub", rec+".pub").stdout)
	c.must(0, "sk-rot-openai", "put", "acme/openai")
	c.must(0, "sk-rot-gemini", "put", "beta/gemini")
	oldPub := filepath.Join(work, "old.pub")
	if err := os.WriteFile(oldPub, []byte(c.must(0, "", "pubkey").stdout), 0o644); err != nil {
		t.Fatal(err)
	}

	mnt := filepath.Join(work, "keys")
	mount, stderr := c.startMount(mnt, "acme/openai")
	var reads, bad atomic.Int64
	var firstBad atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			b, err := os.ReadFile(filepath.Join(mnt, "acme", "openai"))
			reads.Add(1)
			if err != nil || string(b) != "sk-rot-openai" {
				if bad.Add(1) == 1 {
					firstBad.Store(string(b) + " " + errString(err))
				}
			}
		}
	})

	// A rotation escrowed like the first master needs the recovery key.
	if r := c.must(exitUsage, "", "master", "rotate"); !strings.Contains(r.stderr, "--recovery-pub") {
		t.Errorf("rotate of an escrowed master without --recovery-pub: %s", r.stderr)
	}
	kid2 := strings.TrimSpace(c.must(0, "", "master", "rotate", "--recovery-pub", rec+".pub").stdout)
	if kid2 == kid1 || c.kid() != kid2 || c.escrowKID() != kid2 {
		t.Fatalf("after rotate: kid %s -> %s, pubkey %s, escrow %s", kid1, kid2, c.kid(), c.escrowKID())
	}

	// Offline seals to the old and the new public key are both accepted.
	for i, pub := range []string{oldPub, filepath.Join(c.state, "master.pub")} {
		f := filepath.Join(work, "offline"+itoa1(i)+".rec")
		writeFile(t, f, c.must(0, "sk-offline", "seal", "--pubkey", pub, "--tenant", "gamma", "--name", "key"+itoa1(i)).stdout)
		c.must(0, "", "import", f)
	}
	ls := c.must(0, "", "master", "ls").stdout
	if !strings.Contains(ls, kid2+"  current") || !strings.Contains(ls, kid1+"  older") {
		t.Fatalf("master ls:\n%s", ls)
	}
	if r := c.must(exitError, "", "master", "retire", kid1); !strings.Contains(r.stderr, "acme/openai@") || !strings.Contains(r.stderr, "reseal") {
		t.Errorf("retire with records still sealed to it: %s", r.stderr)
	}

	// Reseal under the running reader.
	poll(5*time.Second, func() bool { return reads.Load() >= 50 })
	before := reads.Load()
	if r := c.must(0, "", "master", "reseal"); !strings.Contains(r.stderr, "resealed 3 record versions") {
		t.Errorf("reseal: %s", r.stderr)
	}
	poll(2*time.Second, func() bool { return reads.Load() >= before+100 })
	close(stop)
	wg.Wait()
	if reads.Load() < before+100 || bad.Load() != 0 {
		t.Fatalf("%d reads (%d after the reseal started), %d bad; first bad: %v\nmount log:\n%s", reads.Load(), reads.Load()-before, bad.Load(), firstBad.Load(), stderr.String())
	}
	if !strings.Contains(c.must(0, "", "master", "ls").stdout, kid1+"  older") {
		t.Fatal("the old master left the ring before retire")
	}
	for _, line := range strings.Split(strings.TrimSpace(c.must(0, "", "ls").stdout), "\n")[1:] {
		if !strings.Contains(line, kid2) {
			t.Errorf("not resealed to %s: %s", kid2, line)
		}
	}
	c.must(0, "", "verify")
	if a := c.must(0, "", "audit", "-o", "json").stdout; strings.Count(a, `"event":"reseal"`) != 3 || !strings.Contains(a, `"event":"rotate"`) {
		t.Errorf("audit lacks the rotation or the reseals:\n%s", a)
	}

	// Retire: records sealed to the old master are refused from now on.
	c.must(0, "", "master", "retire", kid1)
	f := filepath.Join(work, "late.rec")
	writeFile(t, f, c.must(0, "sk-late", "seal", "--pubkey", oldPub, "--tenant", "gamma", "--name", "late").stdout)
	if r := c.must(exitIntegrity, "", "import", f); !strings.Contains(r.stderr, "sealed to kid "+kid1+", this node holds kid "+kid2) {
		t.Errorf("import of a record sealed to the retired master: %s", r.stderr)
	}
	// A key the running mount had not read: it loads the resealed record,
	// sealed to a master the daemon did not hold when it started.
	if b, err := os.ReadFile(filepath.Join(mnt, "beta", "gemini")); err != nil || string(b) != "sk-rot-gemini" {
		t.Errorf("read after retire through the running mount: %q %v", b, err)
	}
	if !logged(stderr, "master key "+kid2+" unsealed") {
		t.Errorf("the running mount did not pick up the new master:\n%s", stderr.String())
	}
	mount.Process.Signal(syscall.SIGTERM)
	if err := waitOrDump(t, mount, 30*time.Second, stderr); err != nil {
		t.Fatal(err)
	}
	noValueIn(t, c.state, "sk-rot-openai", "sk-rot-gemini", "sk-offline")
}

func itoa1(i int) string { return string(rune('0' + i)) }

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
