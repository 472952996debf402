package audit

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// CheckMAC verifies a checkpoint MAC made by master key kid.
type CheckMAC func(kid string, msg, mac []byte) error

// Problem is one place where a trail is not what its writers wrote.
type Problem struct {
	File string
	Line int
	Seq  uint64
	What string
}

func (p Problem) String() string {
	return fmt.Sprintf("%s line %d (seq %d): %s", p.File, p.Line, p.Seq, p.What)
}

// Verified is what Verify found.
type Verified struct {
	Files            []string
	Events           int
	Legacy           int // events from before the chain, not checked
	FirstSeq         uint64
	LastSeq          uint64
	Checkpoints      int
	LastCheckpoint   uint64
	Unanchored       int // events after the last checkpoint
	Problems         []Problem
	anchorSeq        uint64
	checkpointHashes map[uint64]string
}

// OK reports a trail with no problem.
func (v *Verified) OK() bool { return len(v.Problems) == 0 }

// Verify walks the audit trail at path (its rotated files oldest first,
// then path) and checks every link of the chain, every checkpoint's MAC
// with check, and the anchor. It returns an error only when the trail
// cannot be read at all.
func Verify(path string, check CheckMAC) (*Verified, error) {
	v := &Verified{checkpointHashes: map[uint64]string{}}
	var lastHash string
	var lastSeq uint64
	started := false
	files, err := eachLine(path, func(p string, n int, line []byte) error {
		sum := sha256.Sum256(line)
		hash := hex.EncodeToString(sum[:])
		bad := func(seq uint64, what string) { v.Problems = append(v.Problems, Problem{p, n, seq, what}) }
		var e Event
		if err := json.Unmarshal(line, &e); err != nil {
			bad(lastSeq+1, "not an audit event (edited, or a writer killed mid-line)")
			lastHash = hash
			return nil
		}
		if e.Seq == 0 {
			if started {
				bad(0, "an unchained event inside the chain (inserted)")
			} else {
				v.Legacy++
			}
			return nil
		}
		v.Events++
		switch {
		case !started:
			v.FirstSeq = e.Seq
		case e.Seq > lastSeq+1:
			bad(e.Seq, fmt.Sprintf("the chain jumps from seq %d to %d: %d events deleted", lastSeq, e.Seq, e.Seq-lastSeq-1))
		case e.Seq <= lastSeq:
			bad(e.Seq, fmt.Sprintf("seq %d after seq %d: events reordered or inserted", e.Seq, lastSeq))
		case e.Prev != lastHash:
			bad(e.Seq, "does not chain to the event before it: it or the one before was edited, or one was inserted or reordered")
		}
		started = true
		if e.Event == "checkpoint" {
			v.Checkpoints++
			mac, err := hex.DecodeString(e.MAC)
			if err == nil {
				err = check(e.KID, CheckpointMessage(e.Prev, e.Seq), mac)
			}
			if err != nil {
				bad(e.Seq, fmt.Sprintf("checkpoint does not verify (%v): the trail before it was rewritten", err))
			}
			v.LastCheckpoint, v.Unanchored = e.Seq, 0
			v.checkpointHashes[e.Seq] = hash
		} else {
			v.Unanchored++
		}
		lastHash, lastSeq = hash, e.Seq
		return nil
	})
	if err != nil {
		return nil, err
	}
	v.Files = files
	if len(v.Files) == 0 {
		return nil, fmt.Errorf("no audit log at %s: %w", path, fs.ErrNotExist)
	}
	v.LastSeq = lastSeq
	v.checkAnchor(path)
	return v, nil
}

// checkAnchor compares the trail with the last checkpoint its writers
// recorded apart from it.
func (v *Verified) checkAnchor(path string) {
	b, err := os.ReadFile(Anchor(path))
	if errors.Is(err, fs.ErrNotExist) {
		if v.Checkpoints > 0 {
			v.Problems = append(v.Problems, Problem{Anchor(path), 1, 0, "the anchor file is missing, though the trail has checkpoints"})
		}
		return
	}
	bad := func(seq uint64, what string) { v.Problems = append(v.Problems, Problem{Anchor(path), 1, seq, what}) }
	var a Event
	if err != nil || json.Unmarshal(b[:len(b)-min(len(b), 1)], &a) != nil || a.Event != "checkpoint" {
		bad(0, "the anchor is not a checkpoint")
		return
	}
	v.anchorSeq = a.Seq
	if a.Seq > v.LastSeq {
		bad(a.Seq, fmt.Sprintf("the anchor records checkpoint seq %d but the trail ends at seq %d: its tail was cut", a.Seq, v.LastSeq))
		return
	}
	sum := sha256.Sum256(b[:len(b)-1])
	if h, ok := v.checkpointHashes[a.Seq]; a.Seq >= v.FirstSeq && (!ok || h != hex.EncodeToString(sum[:])) {
		bad(a.Seq, "the anchored checkpoint is not the trail's checkpoint at that seq")
	}
}
