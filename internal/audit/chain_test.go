package audit

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

type testKey struct{ kid, key string }

func (k testKey) KID() string { return k.kid }
func (k testKey) AuditMAC(msg []byte) []byte {
	h := hmac.New(sha256.New, []byte(k.key))
	h.Write(msg)
	return h.Sum(nil)
}

func (k testKey) check(kid string, msg, mac []byte) error {
	if kid != k.kid {
		return fmt.Errorf("unknown kid %s", kid)
	}
	if !hmac.Equal(mac, k.AuditMAC(msg)) {
		return errors.New("MAC mismatch")
	}
	return nil
}

var key = testKey{"00112233445566aa", "the master's audit key"}

// writeTrail writes n events across restarts (a new Logger per batch) and
// rotations, with checkpoints, and returns the path.
func writeTrail(t *testing.T, maxBytes int64, batches ...int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	for b, n := range batches {
		l, err := Open(path, maxBytes)
		if err != nil {
			t.Fatal(err)
		}
		if b%2 == 0 {
			l.SetCheckpointer(key) // a daemon; odd batches are key-less CLI writers
		}
		for i := range n {
			if err := l.Log(Event{Event: "open", Tenant: "acme", Key: "openai", Version: uint64(i + 1), PID: 1000 + i}); err != nil {
				t.Fatal(err)
			}
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

func lines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func writeLines(t *testing.T, path string, ls []string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(strings.Join(ls, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestChainVerifies(t *testing.T) {
	// Three writers (daemon, CLI, daemon again: two daemon restarts) and
	// rotations at 4 KB.
	path := writeTrail(t, 4096, 20, 5, 20)
	v, err := Verify(path, key.check)
	if err != nil {
		t.Fatal(err)
	}
	if !v.OK() || len(v.Files) < 2 || v.Events != 45+2 || v.FirstSeq != 1 || v.LastSeq != 47 || v.Checkpoints != 2 || v.Unanchored != 0 {
		t.Fatalf("untouched trail: %+v", v)
	}
}

func TestChainFindsTampering(t *testing.T) {
	cases := []struct {
		name, want string
		edit       func(t *testing.T, path string)
	}{
		{"edited byte", "does not chain", func(t *testing.T, path string) {
			ls := lines(t, path)
			ls[3] = strings.Replace(ls[3], `"pid":1003`, `"pid":1009`, 1)
			if !strings.Contains(ls[3], "1009") {
				t.Fatal("the edit did not apply")
			}
			writeLines(t, path, ls)
		}},
		{"forged insert", "reordered or inserted", func(t *testing.T, path string) {
			ls := lines(t, path)
			writeLines(t, path, append(ls[:5], append([]string{ls[4]}, ls[5:]...)...))
		}},
		{"deleted", "1 events deleted", func(t *testing.T, path string) {
			ls := lines(t, path)
			writeLines(t, path, append(ls[:5], ls[6:]...))
		}},
		{"swapped", "reordered", func(t *testing.T, path string) {
			ls := lines(t, path)
			ls[5], ls[6] = ls[6], ls[5]
			writeLines(t, path, ls)
		}},
		{"rewritten from an edit on", "checkpoint does not verify", func(t *testing.T, path string) {
			// Re-chain every line after an edit, as an attacker without
			// the key would: only the checkpoint MAC gives it away.
			ls := lines(t, path)
			ls[2] = strings.Replace(ls[2], `"pid":1002`, `"pid":1666`, 1)
			if !strings.Contains(ls[2], "1666") {
				t.Fatal("the edit did not apply")
			}
			for i := 3; i < len(ls); i++ {
				sum := sha256.Sum256([]byte(ls[i-1]))
				j := strings.Index(ls[i], `"prev":"`) + len(`"prev":"`)
				ls[i] = ls[i][:j] + fmt.Sprintf("%x", sum) + ls[i][j+64:]
			}
			writeLines(t, path, ls)
		}},
		{"truncated mid-line", "not an audit event", func(t *testing.T, path string) {
			b, _ := os.ReadFile(path)
			os.WriteFile(path, b[:len(b)-30], 0o600)
		}},
		{"tail cut", "tail was cut", func(t *testing.T, path string) {
			ls := lines(t, path)
			writeLines(t, path, ls[:len(ls)-3])
		}},
		{"anchor removed", "anchor file is missing", func(t *testing.T, path string) {
			os.Remove(Anchor(path))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := writeTrail(t, 0, 10, 3, 10) // one file
			c.edit(t, path)
			v, err := Verify(path, key.check)
			if err != nil {
				t.Fatal(err)
			}
			if v.OK() {
				t.Fatalf("%s not found: %+v", c.name, v)
			}
			var all []string
			for _, p := range v.Problems {
				all = append(all, p.String())
			}
			if got := strings.Join(all, "\n"); !strings.Contains(got, c.want) || !strings.Contains(got, "line ") {
				t.Fatalf("%s: problems lack %q or a position:\n%s", c.name, c.want, got)
			}
		})
	}
	t.Run("rotated file dropped", func(t *testing.T) {
		path := writeTrail(t, 2048, 30, 5, 30)
		if _, err := os.Stat(path + ".2"); err != nil {
			t.Fatalf("want at least two rotations: %v", err)
		}
		os.Remove(path + ".1")
		v, err := Verify(path, key.check)
		if err != nil {
			t.Fatal(err)
		}
		if v.OK() || !strings.Contains(v.Problems[0].What, "deleted") {
			t.Fatalf("dropped rotated file not found: %+v", v.Problems)
		}
	})
}

// TestChainAcrossProcesses: two loggers on one file (a daemon and a CLI
// command) interleave into one chain.
func TestChainAcrossProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	a, err := Open(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	a.SetCheckpointer(key)
	b, err := Open(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		a.Log(Event{Event: "open", PID: i})
		b.Log(Event{Event: "put", PID: i})
	}
	b.Close()
	a.Close()
	v, err := Verify(path, key.check)
	if err != nil || !v.OK() || v.Events != 21 || v.Unanchored != 0 {
		t.Fatalf("interleaved: %+v %v", v, err)
	}
	if b, _ := os.ReadFile(path); bytes.Count(b, []byte(`"event":"checkpoint"`)) != 1 {
		t.Fatalf("want one checkpoint, at the daemon's close:\n%s", b)
	}
}

// TestWriterWithCheckpointer: a plain writer (--audit-log -) given a key
// writes events and never tries to chain or checkpoint them.
func TestWriterWithCheckpointer(t *testing.T) {
	var buf bytes.Buffer
	l := NewWriter(&buf)
	l.SetCheckpointer(key)
	l.StartCheckpoints(time.Millisecond)
	for range CheckpointEvery + 1 {
		if err := l.Log(Event{Event: "open"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(buf.Bytes(), []byte("\n")); n != CheckpointEvery+1 || bytes.Contains(buf.Bytes(), []byte("checkpoint")) {
		t.Fatalf("%d lines, checkpoint written: %v", n, bytes.Contains(buf.Bytes(), []byte("checkpoint")))
	}
}

// TestQueue: events handed to Go are written by the queue's goroutine, in
// one chain; Close writes what is queued; a late Go writes at once.
func TestQueue(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	l.SetCheckpointer(key)
	l.StartQueue(8)
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for j := range 50 {
				l.Go(Event{Event: "open", PID: i*100 + j}, nil)
			}
		})
	}
	wg.Wait()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	l.Go(Event{Event: "open"}, nil) // after Close: no panic, counted as a failure
	if l.Failures() != 1 {
		t.Errorf("failures %d, want 1 (the event after Close)", l.Failures())
	}
	v, err := Verify(path, key.check)
	if err != nil || !v.OK() || v.Events != 201 || v.Unanchored != 0 {
		t.Fatalf("queued trail: %+v %v", v, err)
	}
}

// TestQueueBatches: a burst through the queue is written in batches that
// keep the chain across checkpoints (every CheckpointEvery events) and
// rotations, in the order it was queued.
func TestQueueBatches(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, 256<<10) // rotates, but keeps every event (Keep files)
	if err != nil {
		t.Fatal(err)
	}
	l.SetCheckpointer(key)
	l.StartQueue(4096)
	n := 2*CheckpointEvery + 500
	for i := range n {
		l.Go(Event{Event: "open", PID: i + 1}, nil)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	v, err := Verify(path, key.check)
	if err != nil || !v.OK() || v.Unanchored != 0 {
		t.Fatalf("batched trail: %+v %v", v, err)
	}
	var pids []int
	checkpoints := 0
	evs, err := Query(path, Filter{}) // path and its rotated files, oldest first
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs {
		if e.Event == "checkpoint" {
			checkpoints++
		} else {
			pids = append(pids, e.PID)
		}
	}
	files := 1
	for _, f := range []string{path + ".1", path + ".2", path + ".3"} {
		if _, err := os.Stat(f); err == nil {
			files++
		}
	}
	if len(pids) != n {
		t.Errorf("%d events read back, want %d", len(pids), n)
	}
	if files < 2 {
		t.Errorf("%d files: the trail did not rotate", files)
	}
	if checkpoints != 3 {
		t.Errorf("%d checkpoints, want 3 (two every %d events, one at close)", checkpoints, CheckpointEvery)
	}
	for i, p := range pids {
		if p != i+1 {
			t.Fatalf("event %d has pid %d: out of order", i, p)
		}
	}
}
