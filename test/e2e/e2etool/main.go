// Command e2etool is the only program in the e2e test image: containerd
// runs it as every pod's sandbox (pause), and the test pods run it to
// watch their key files (watch).
//
//	e2etool pause
//	e2etool watch FILE...
//
// watch reads each FILE every 50 ms and prints one JSON line to stdout
// whenever what it gets changes: the content's SHA-256 and length, "missing"
// (ENOENT), or the error with its errno name (ENOTCONN, EACCES, ...). A
// read that took 100 ms or more is a change too (stall_ms): it shows how
// long a reader waited while keyfs restarted. The
// harness reads these lines through the pod log API; each carries the
// pod's wall clock in Unix milliseconds, so the harness can time changes to
// within the poll interval.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Line is one change seen by watch.
type Line struct {
	MS     int64  `json:"ms"`
	File   string `json:"file"`
	State  string `json:"state"` // ok, missing, error
	SHA256 string `json:"sha256,omitempty"`
	Len    int    `json:"len,omitempty"`
	Errno  string `json:"errno,omitempty"`
	Err    string `json:"err,omitempty"`
	Stall  int64  `json:"stall_ms,omitempty"`
}

// stallMin is the shortest read duration reported as a stall.
const stallMin = 100 * time.Millisecond

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	if len(os.Args) >= 2 && os.Args[1] == "pause" {
		<-sig
		return
	}
	if len(os.Args) < 3 || os.Args[1] != "watch" {
		fmt.Fprintln(os.Stderr, "usage: e2etool pause | e2etool watch FILE...")
		os.Exit(2)
	}
	files := os.Args[2:]
	last := make([]Line, len(files))
	enc := json.NewEncoder(os.Stdout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		for i, f := range files {
			start := time.Now()
			l := read(f)
			if d := time.Since(start); d >= stallMin {
				l.Stall = d.Milliseconds()
			}
			l.MS = 0
			if l == last[i] {
				continue
			}
			last[i] = l
			l.MS = time.Now().UnixMilli()
			if err := enc.Encode(l); err != nil {
				os.Exit(1)
			}
		}
		select {
		case <-sig:
			return
		case <-tick.C:
		}
	}
}

func read(file string) Line {
	b, err := os.ReadFile(file)
	switch {
	case err == nil:
		h := sha256.Sum256(b)
		return Line{File: file, State: "ok", SHA256: hex.EncodeToString(h[:]), Len: len(b)}
	case errors.Is(err, fs.ErrNotExist):
		return Line{File: file, State: "missing", Errno: "ENOENT", Err: err.Error()}
	}
	l := Line{File: file, State: "error", Err: err.Error()}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		l.Errno = unix.ErrnoName(errno)
	}
	return l
}
