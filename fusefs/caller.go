package fusefs

import (
	"bytes"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/keyfs/keyfs/internal/audit"
)

// callerTTL bounds how long a thread's process and pod are remembered. A
// thread id is reused only after the pid space wraps, which takes far
// longer.
const callerTTL = time.Second

// callers maps the thread id FUSE reports to the process (thread group)
// the audit trail names, and its pod, so an open costs no /proc read when
// the same threads keep reading. One map serves every view of the
// process: a reader going round a hundred mounts is learned once, not
// once per mount.
var sharedCallers callers

type callers struct {
	mu     sync.Mutex
	m      map[uint32]caller
	pruned time.Time // when expired entries were last dropped
}

type caller struct {
	pid     int
	podUID  string
	podRead bool // podUID was looked up (a view that knows its pod does not)
	at      time.Time
}

func (c *callers) get(tid uint32, wantPod bool) caller {
	now := time.Now()
	c.mu.Lock()
	ci, ok := c.m[tid]
	c.mu.Unlock()
	fresh := ok && now.Sub(ci.at) < callerTTL
	if fresh && (ci.podRead || !wantPod) {
		return ci
	}
	if !fresh {
		ci = caller{pid: tgid(tid), at: now}
	}
	if wantPod {
		ci.podUID, ci.podRead = audit.PodUID(ci.pid), true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[uint32]caller{}
	}
	// Drop expired entries here, on a miss (which already read /proc), at
	// most once per TTL: the map stays bounded with no timer running.
	if now.Sub(c.pruned) >= callerTTL {
		for t, old := range c.m {
			if now.Sub(old.at) >= callerTTL {
				delete(c.m, t)
			}
		}
		c.pruned = now
	}
	c.m[tid] = ci
	return ci
}

// tgid returns the process of thread tid, or tid if it is gone.
func tgid(tid uint32) int {
	b, err := os.ReadFile("/proc/" + strconv.FormatUint(uint64(tid), 10) + "/status")
	if err == nil {
		if _, rest, ok := bytes.Cut(b, []byte("\nTgid:")); ok {
			line, _, _ := bytes.Cut(rest, []byte("\n"))
			if n, err := strconv.Atoi(string(bytes.TrimSpace(line))); err == nil {
				return n
			}
		}
	}
	return int(tid)
}
