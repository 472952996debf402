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
// the same threads keep reading.
type callers struct {
	mu sync.Mutex
	m  map[uint32]caller
}

type caller struct {
	pid    int
	podUID string
	at     time.Time
}

func (c *callers) get(tid uint32, wantPod bool) caller {
	now := time.Now()
	c.mu.Lock()
	ci, ok := c.m[tid]
	c.mu.Unlock()
	if ok && now.Sub(ci.at) < callerTTL {
		return ci
	}
	ci = caller{pid: tgid(tid), at: now}
	if wantPod {
		ci.podUID = audit.PodUID(ci.pid)
	}
	c.mu.Lock()
	if c.m == nil {
		c.m = map[uint32]caller{}
	}
	c.m[tid] = ci
	c.mu.Unlock()
	return ci
}

// prune forgets expired entries.
func (c *callers) prune() {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	for tid, ci := range c.m {
		if now.Sub(ci.at) >= callerTTL {
			delete(c.m, tid)
		}
	}
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
