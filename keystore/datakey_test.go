package keystore

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// holdUnwraps makes every decapsulation wait for release, counting them.
func holdUnwraps(t *testing.T) (started <-chan struct{}, release func(), count *atomic.Int32) {
	t.Helper()
	s, r := make(chan struct{}, 16), make(chan struct{})
	var n atomic.Int32
	var once sync.Once
	unwrapHook = func() {
		n.Add(1)
		s <- struct{}{}
		<-r
	}
	release = func() { once.Do(func() { close(r) }) }
	t.Cleanup(func() { release(); unwrapHook = nil })
	return s, release, &n
}

func mustSeal(t *testing.T, m *MasterKey, tenant, name, value string) *Record {
	t.Helper()
	r, err := Seal(m.Public(), tenant, name, 1, []byte(value))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func openAsync(m *MasterKey, r *Record, want string) <-chan error {
	done := make(chan error, 1)
	go func() {
		v, err := m.Open(r, r.Tenant, r.Name)
		if err == nil && string(v) != want {
			err = errors.New("opened another value")
		}
		clear(v)
		done <- err
	}()
	return done
}

// TestOpenDuringUnwrap: while one record's data key is decapsulated, a
// record whose key is cached opens at once, and concurrent opens of the
// first share its one decapsulation.
func TestOpenDuringUnwrap(t *testing.T) {
	m := newMaster(t)
	cached, cold := mustSeal(t, m, "acme", "openai", "v-openai"), mustSeal(t, m, "acme", "gemini", "v-gemini")
	if err := <-openAsync(m, cached, "v-openai"); err != nil {
		t.Fatal(err)
	}
	started, release, unwraps := holdUnwraps(t)
	first := openAsync(m, cold, "v-gemini")
	<-started
	second := openAsync(m, cold, "v-gemini")
	select {
	case err := <-openAsync(m, cached, "v-openai"):
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a cached record's open waits for another record's decapsulation")
	}
	release()
	for _, c := range []<-chan error{first, second} {
		if err := <-c; err != nil {
			t.Fatal(err)
		}
	}
	if n := unwraps.Load(); n != 1 {
		t.Errorf("two concurrent opens of one record decapsulated %d times, want once", n)
	}
}

// TestCloseDuringUnwrap: a master key closed while a decapsulation runs
// keeps nothing of it, and its opens say it is closed.
func TestCloseDuringUnwrap(t *testing.T) {
	m := newMaster(t)
	r := mustSeal(t, m, "acme", "openai", "v1")
	started, release, _ := holdUnwraps(t)
	opened := openAsync(m, r, "v1")
	<-started
	m.Close()
	release()
	if err := <-opened; !errors.Is(err, errClosed) {
		t.Errorf("open across Close: %v, want %v", err, errClosed)
	}
	m.mu.Lock()
	kept := len(m.deks)
	m.mu.Unlock()
	if kept != 0 {
		t.Errorf("a closed master key caches %d data keys", kept)
	}
	if err := <-openAsync(m, r, "v1"); !errors.Is(err, errClosed) {
		t.Errorf("open after Close: %v, want %v", err, errClosed)
	}
}

// TestCiphersBounded: the ciphers kept made are at most maxCiphers, an
// open of a record whose cipher was dropped still opens it, and Close
// drops them all.
func TestCiphersBounded(t *testing.T) {
	m := newMaster(t)
	var recs []*Record
	for i := range maxCiphers + 8 {
		recs = append(recs, mustSeal(t, m, "acme", fmt.Sprintf("k%04d", i), fmt.Sprintf("v%04d", i)))
	}
	kept := func() int {
		m.mu.Lock()
		defer m.mu.Unlock()
		return len(m.ciphers)
	}
	for round := range 2 {
		for i, r := range recs {
			if err := <-openAsync(m, r, fmt.Sprintf("v%04d", i)); err != nil {
				t.Fatalf("round %d, record %d: %v", round, i, err)
			}
		}
		if n := kept(); n != maxCiphers {
			t.Errorf("round %d: %d ciphers kept for %d records opened, want %d", round, n, len(recs), maxCiphers)
		}
	}
	m.Close()
	if n := kept(); n != 0 {
		t.Errorf("a closed master key keeps %d ciphers", n)
	}
}
