// Package audit writes and reads keyfs's audit trail: one JSON object per
// line, never a value.
package audit

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Event is one audit record. Reason explains error and deny events; it
// comes from keyfs's own error texts, which never carry values.
type Event struct {
	Time           time.Time `json:"time"`
	Event          string    `json:"event"` // open, error, publish, unpublish, deny
	Tenant         string    `json:"tenant,omitempty"`
	Key            string    `json:"key,omitempty"`
	Version        uint64    `json:"version,omitempty"`
	PID            int       `json:"pid,omitempty"`
	UID            *uint32   `json:"uid,omitempty"`
	GID            *uint32   `json:"gid,omitempty"`
	PodUID         string    `json:"pod_uid,omitempty"`
	PodNamespace   string    `json:"pod_namespace,omitempty"`
	PodName        string    `json:"pod_name,omitempty"`
	ServiceAccount string    `json:"service_account,omitempty"`
	Volume         string    `json:"volume,omitempty"`
	Reason         string    `json:"reason,omitempty"`
}

// Logger appends events to a file, rotating it at a size bound, or to a
// writer. It is safe for concurrent use; a failed write is counted, never
// fatal to the read that caused it.
type Logger struct {
	mu       sync.Mutex
	w        io.Writer
	f        *os.File
	path     string
	size     int64
	maxBytes int64
	failures int
}

// Keep is how many rotated files are kept (path.1 … path.Keep).
const Keep = 3

// DefaultMaxBytes bounds one audit file.
const DefaultMaxBytes = 64 << 20

// Open appends to the audit file at path (0600), rotating at maxBytes.
func Open(path string, maxBytes int64) (*Logger, error) {
	l := &Logger{path: path, maxBytes: maxBytes}
	if err := l.openFile(); err != nil {
		return nil, err
	}
	return l, nil
}

// NewWriter logs to w (stdout, for a container's log) without rotation.
func NewWriter(w io.Writer) *Logger { return &Logger{w: w} }

func (l *Logger) openFile() error {
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open audit log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open audit log: %w", err)
	}
	l.f, l.w, l.size = f, f, fi.Size()
	return nil
}

// Log writes e, stamping the time if unset.
func (l *Logger) Log(e Event) {
	if l == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	line, err := json.Marshal(e)
	if err != nil {
		return
	}
	line = append(line, '\n')
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f != nil && l.maxBytes > 0 && l.size+int64(len(line)) > l.maxBytes {
		if err := l.rotate(); err != nil {
			l.failures++
			return
		}
	}
	n, err := l.w.Write(line)
	l.size += int64(n)
	if err != nil {
		l.failures++
	}
}

// Failures counts events that could not be written.
func (l *Logger) Failures() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.failures
}

func (l *Logger) rotate() error {
	l.f.Close()
	for i := Keep - 1; i >= 1; i-- {
		os.Rename(l.path+"."+strconv.Itoa(i), l.path+"."+strconv.Itoa(i+1))
	}
	if err := os.Rename(l.path, l.path+".1"); err != nil {
		return err
	}
	return l.openFile()
}

// Close closes the audit file.
func (l *Logger) Close() error {
	if l == nil || l.f == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Close()
}

// Filter selects events; zero fields match everything.
type Filter struct {
	Tenant, Key string
	Since       time.Time
}

func (f Filter) match(e *Event) bool {
	return (f.Tenant == "" || e.Tenant == f.Tenant) &&
		(f.Key == "" || e.Key == f.Key) &&
		!e.Time.Before(f.Since)
}

// Query reads the audit file at path and its rotated predecessors, oldest
// first, and returns the events f selects.
func Query(path string, f Filter) ([]Event, error) {
	var out []Event
	found := false
	for i := Keep; i >= 0; i-- {
		p := path
		if i > 0 {
			p += "." + strconv.Itoa(i)
		}
		fh, err := os.Open(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read audit log: %w", err)
		}
		found = true
		sc := bufio.NewScanner(fh)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for n := 1; sc.Scan(); n++ {
			var e Event
			if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
				fh.Close()
				return nil, fmt.Errorf("audit log %s line %d is not an audit event: %w", p, n, err)
			}
			if f.match(&e) {
				out = append(out, e)
			}
		}
		err = sc.Err()
		fh.Close()
		if err != nil {
			return nil, fmt.Errorf("read audit log %s: %w", p, err)
		}
	}
	if !found {
		return nil, fmt.Errorf("no audit log at %s: events are written there by keyfs mount and keyfs serve: %w", path, fs.ErrNotExist)
	}
	return out, nil
}

// podRE finds a pod UID in a cgroup path, cgroupfs (/kubepods/burstable/pod<uid>/…)
// or systemd (kubepods-burstable-pod<uid with _>.slice) style.
var podRE = regexp.MustCompile(`pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})`)

// PodUID returns the Kubernetes pod UID of process pid, or "" when it is not
// in a pod.
func PodUID(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return ""
	}
	return podUIDFromCgroup(string(b))
}

func podUIDFromCgroup(s string) string {
	if m := podRE.FindStringSubmatch(s); m != nil {
		return strings.ReplaceAll(m[1], "_", "-")
	}
	return ""
}
