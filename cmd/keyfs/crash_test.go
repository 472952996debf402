package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"
)

// kid returns the state's master kid, from master.pub.
func (c *cli) kid() string {
	c.t.Helper()
	r := c.must(0, "", "pubkey")
	m := regexp.MustCompile(`(?m)^kid: ([0-9a-f]{16})$`).FindStringSubmatch(r.stdout)
	if m == nil {
		c.t.Fatalf("pubkey without a kid:\n%s", r.stdout)
	}
	return m[1]
}

// escrowKID is the master kid master.recovery holds, or "".
func (c *cli) escrowKID() string {
	c.t.Helper()
	b, err := os.ReadFile(filepath.Join(c.state, "master.recovery"))
	if os.IsNotExist(err) {
		return ""
	}
	if err != nil {
		c.t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^master-kid: ([0-9a-f]{16})$`).FindSubmatch(b)
	if m == nil {
		c.t.Fatalf("master.recovery without a master-kid:\n%s", b)
	}
	return string(m[1])
}

// killedAt runs keyfs args and SIGKILLs it after d (it may finish first).
func (c *cli) killedAt(d time.Duration, args ...string) {
	c.t.Helper()
	cmd := c.keyfsCmd(args...)
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	time.Sleep(d)
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
}

// durationOf times one uninterrupted run of keyfs args.
func (c *cli) durationOf(args ...string) time.Duration {
	c.t.Helper()
	start := time.Now()
	c.must(0, "", args...)
	return time.Since(start)
}

// TestMasterChangeSurvivesKill: kill -9 at random points of init --force
// and of recover leaves the old master whole or the new one complete
// (sealed seed, public key, escrow and SRK pin of one master), never a mix.
func TestMasterChangeSurvivesKill(t *testing.T) {
	const runs = 50
	work := t.TempDir()
	c := &cli{t: t, state: filepath.Join(work, "state"), tpm: "sim"}
	rec := filepath.Join(work, "recovery.key")
	c.must(0, "", "recovery-keygen", "-o", rec)
	c.must(0, "", "init", "--recovery-pub", rec+".pub")
	tenant := "t0" // holds a record sealed to the current master
	c.must(0, "sk-crash-0", "put", tenant+"/openai")

	check := func(run int, before string) (after string) {
		t.Helper()
		after = c.kid()
		if esc := c.escrowKID(); esc != after {
			t.Fatalf("run %d: master.pub is kid %s but master.recovery holds kid %s: a mix of two masters", run, after, esc)
		}
		if after == before {
			c.must(0, "", "verify", tenant) // the old master opens its records
			return after
		}
		// The new master is complete: put and verify work.
		tenant = fmt.Sprintf("run%d", run)
		c.must(0, "sk-crash-new", "put", tenant+"/openai")
		c.must(0, "", "verify", tenant)
		return after
	}

	d := c.durationOf("init", "--force", "--recovery-pub", rec+".pub")
	kid := c.kid()
	tenant = "t-init"
	c.must(0, "sk-crash-1", "put", tenant+"/openai")
	changed := 0
	for run := range runs {
		c.killedAt(time.Duration(rand.Int64N(int64(d))), "init", "--force", "--recovery-pub", rec+".pub")
		next := check(run, kid)
		if next != kid {
			changed++
		}
		kid = next
	}
	t.Logf("init --force: %d of %d killed runs had switched to the new master (one run takes %v)", changed, runs, d)

	d = c.durationOf("recover", "--recovery-key", rec)
	for run := range runs {
		c.killedAt(time.Duration(rand.Int64N(int64(d))), "recover", "--recovery-key", rec)
		if next := check(run, kid); next != kid {
			t.Fatalf("run %d: recover changed the master kid from %s to %s", run, kid, next)
		}
	}
	if _, err := os.Stat(filepath.Join(c.state, masterJournal)); !os.IsNotExist(err) {
		t.Errorf("a journal is left after the last command: %v", err)
	}
}
