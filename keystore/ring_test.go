package keystore

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestKeyRing(t *testing.T) {
	old, cur, stranger := newMaster(t), newMaster(t), newMaster(t)
	rOld, _ := Seal(old.Public(), "acme", "openai", 7, []byte("sk-ring"))

	// Without the ring: the kid message.
	var ke *KIDMismatchError
	if _, err := cur.Open(rOld, "acme", "openai"); !errors.As(err, &ke) || ke.Record != old.KID() {
		t.Fatalf("open without the ring: %v", err)
	}

	// Resealed to cur: same tenant, name, version, created and value.
	cur.Add(old)
	if got := cur.KIDs(); len(got) != 2 || got[0] != cur.KID() || got[1] != old.KID() {
		t.Errorf("KIDs = %v", got)
	}
	if v, err := cur.Open(rOld, "acme", "openai"); err != nil || string(v) != "sk-ring" {
		t.Fatalf("open through the ring: %q %v", v, err)
	}
	rNew, err := Reseal(cur, cur.Public(), rOld)
	if err != nil {
		t.Fatal(err)
	}
	if rNew.KID != cur.KID() || rNew.Version != 7 || !rNew.Created.Equal(rOld.Created) || bytes.Equal(rNew.Marshal(), rOld.Marshal()) {
		t.Fatalf("resealed record: kid %s version %d created %v", rNew.KID, rNew.Version, rNew.Created)
	}
	back, err := ParseRecord(rNew.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if v, err := cur.Open(back, "acme", "openai"); err != nil || string(v) != "sk-ring" {
		t.Fatalf("open resealed: %q %v", v, err)
	}

	// A kid outside the ring names the ring in its message.
	rS, _ := Seal(stranger.Public(), "acme", "openai", 8, []byte("x"))
	_, err = cur.Open(rS, "acme", "openai")
	if !errors.As(err, &ke) || !strings.Contains(err.Error(), "this node holds kid "+cur.KID()+" (and older kid "+old.KID()+")") {
		t.Fatalf("stranger: %v", err)
	}

	// OnUnknownKID: asked once for a missing kid, not again at once; a
	// master it returns joins the ring.
	asked := 0
	cur.OnUnknownKID(func(kid string) (*MasterKey, error) {
		asked++
		if asked == 1 {
			return nil, errors.New("not yet")
		}
		return stranger, nil
	})
	for range 3 {
		if _, err := cur.Open(rS, "acme", "openai"); err == nil {
			t.Fatal("opened with a master the fetch did not give")
		}
	}
	if asked != 1 {
		t.Fatalf("fetch asked %d times within the back-off, want 1", asked)
	}
	cur.fetched[stranger.KID()] = cur.fetched[stranger.KID()].Add(-fetchBackoff)
	if v, err := cur.Open(rS, "acme", "openai"); err != nil || string(v) != "x" {
		t.Fatalf("open after the fetch found it: %q %v", v, err)
	}
}
