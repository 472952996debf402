// Package audit writes and reads keyfs's audit trail: one JSON object per
// line, never a value.
package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
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

	"golang.org/x/sys/unix"
)

// Event is one audit record. Reason explains error and deny events; it
// comes from keyfs's own error texts, which never carry values.
//
// Seq and Prev chain the events of one audit trail: Prev is the SHA-256
// (hex) of the previous line as written, so an edited, inserted, deleted
// or reordered event breaks the chain. A checkpoint event carries a MAC
// over its Prev and Seq that only the master key (KID) can make, so the
// chain cannot be rewritten from an edit onwards without detection.
type Event struct {
	Time           time.Time `json:"time"`
	Seq            uint64    `json:"seq,omitempty"`
	Prev           string    `json:"prev,omitempty"`
	Event          string    `json:"event"` // open, error, publish, unpublish, deny, init, put, ..., checkpoint
	Tenant         string    `json:"tenant,omitempty"`
	Key            string    `json:"key,omitempty"`
	Version        uint64    `json:"version,omitempty"`
	KID            string    `json:"kid,omitempty"`
	PID            int       `json:"pid,omitempty"`
	UID            *uint32   `json:"uid,omitempty"`
	GID            *uint32   `json:"gid,omitempty"`
	Command        string    `json:"command,omitempty"`
	Node           string    `json:"node,omitempty"`
	PodUID         string    `json:"pod_uid,omitempty"`
	PodNamespace   string    `json:"pod_namespace,omitempty"`
	PodName        string    `json:"pod_name,omitempty"`
	ServiceAccount string    `json:"service_account,omitempty"`
	Volume         string    `json:"volume,omitempty"`
	// Request is the FUSE request of an open: a successor of a killed
	// keyfs that is sent the request again finds whether it was recorded.
	Request uint64 `json:"request,omitempty"`
	Reason  string `json:"reason,omitempty"`
	MAC     string `json:"mac,omitempty"`
}

// Checkpointer makes checkpoint MACs: the master key's kid and its MAC
// over a message.
type Checkpointer interface {
	KID() string
	AuditMAC(msg []byte) []byte
}

// CheckpointMessage is what a checkpoint's MAC covers: the chain head
// before it and its sequence number.
func CheckpointMessage(prev string, seq uint64) []byte {
	return []byte("keyfs audit checkpoint v1\x00" + prev + "\x00" + strconv.FormatUint(seq, 10))
}

// Logger appends chained events to a file, rotating it at a size bound,
// or writes them to a writer. Several processes may append to one file:
// each append holds PATH.lock and continues the chain from the file's
// last line. It is safe for concurrent use.
type Logger struct {
	mu       sync.Mutex
	w        io.Writer // NewWriter: no file, no chain
	tee      io.Writer // every line also goes here (nil: nowhere)
	f        *os.File
	lock     *os.File
	path     string
	maxBytes int64

	// The chain head as of offset headSize of f.
	head     string
	seq      uint64
	headSize int64
	known    bool

	cp        Checkpointer
	sinceCP   int // events since the last checkpoint
	failures  int
	onFailure func(error) // called on the first failure
	failed    bool
	stopCP    chan struct{}
	cpDone    chan struct{}

	qmu       sync.RWMutex // senders hold it read-locked; Close takes it to close queue
	queue     chan Event   // Go's queue to the writer goroutine; nil: Go writes at once
	queueDone chan struct{}
}

// StartQueue gives Go a queue of n events and a goroutine that writes
// them, so that a reader's open is answered before its event is written.
// Close writes what is queued.
func (l *Logger) StartQueue(n int) {
	l.qmu.Lock()
	defer l.qmu.Unlock()
	if l.queue != nil {
		return
	}
	q, done := make(chan Event, n), make(chan struct{})
	l.queue, l.queueDone = q, done
	go func() {
		defer close(done)
		batch := make([]Event, 0, maxBatch)
		for e := range q {
			// Let a burst gather: meanwhile senders queue without waking
			// this goroutine, and the burst costs one file lock and write.
			batch = append(batch[:0], e)
			time.Sleep(gatherDelay)
		drain:
			for len(batch) < maxBatch {
				select {
				case e, ok := <-q:
					if !ok {
						break drain
					}
					batch = append(batch, e)
				default:
					break drain
				}
			}
			l.logAll(batch)
		}
	}()
}

// gatherDelay is how long the queue's writer waits after an event for
// more; maxBatch bounds what it writes at once.
const (
	gatherDelay = time.Millisecond
	maxBatch    = 256
)

// Go logs e without making the caller wait for the write when a queue is
// started (it waits only while the queue is full: events are never
// dropped); a failure is counted and reported like Log's. wait, if not
// nil, is called before Go waits: for a full queue, or for the file when
// there is no queue.
func (l *Logger) Go(e Event, wait func()) {
	if l == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	l.qmu.RLock()
	if l.queue != nil {
		select {
		case l.queue <- e: // the writer drains it without qmu
		default:
			if wait != nil {
				wait()
			}
			l.queue <- e
		}
		l.qmu.RUnlock()
		return
	}
	l.qmu.RUnlock()
	if wait != nil {
		wait()
	}
	l.Log(e)
}

// Keep is how many rotated files are kept (path.1 … path.Keep).
const Keep = 3

// DefaultMaxBytes bounds one audit file.
const DefaultMaxBytes = 64 << 20

// CheckpointEvery is how many events a key-holding writer lets pass
// before it writes a checkpoint.
const CheckpointEvery = 1000

// Open appends to the audit file at path (0600), rotating at maxBytes.
func Open(path string, maxBytes int64) (*Logger, error) {
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	l := &Logger{path: path, maxBytes: maxBytes, lock: lock}
	if err := l.openFile(); err != nil {
		lock.Close()
		return nil, err
	}
	return l, nil
}

// NewWriter logs to w (stdout, for a container's log) without rotation
// and without a chain.
func NewWriter(w io.Writer) *Logger { return &Logger{w: w} }

// Tee sends every event line to w as well (a container's stdout, for a
// log pipeline).
func (l *Logger) Tee(w io.Writer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.tee = w
}

// OnFailure sets what is called (once) when an event cannot be written.
func (l *Logger) OnFailure(f func(error)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.onFailure = f
}

func (l *Logger) openFile() error {
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open audit log: %w", err)
	}
	if l.f != nil {
		l.f.Close()
	}
	l.f, l.w, l.known = f, f, false
	return nil
}

// Log writes e, stamping the time if unset, and returns why it could not.
func (l *Logger) Log(e Event) error {
	if l == nil {
		return nil
	}
	return l.logAll([]Event{e})
}

// logAll writes events in order, with a checkpoint after every
// CheckpointEvery of them, and returns the first failure.
func (l *Logger) logAll(es []Event) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var first error
	for len(es) > 0 {
		n := len(es)
		chained := l.cp != nil && l.f != nil
		if chained {
			n = min(n, max(1, CheckpointEvery-l.sinceCP))
		}
		_, err := l.appendAll(es[:n])
		if err == nil && chained {
			for _, e := range es[:n] {
				if e.Event != "checkpoint" {
					l.sinceCP++
				}
			}
			if l.sinceCP >= CheckpointEvery {
				err = l.checkpointLocked()
			}
		}
		if err != nil {
			l.failures += n
			if !l.failed && l.onFailure != nil {
				l.onFailure(err)
			}
			l.failed = true
			if first == nil {
				first = err
			}
		}
		es = es[n:]
	}
	return first
}

// recentBytes is how far back Recorded looks: the events of the last
// moments of a server that died.
const recentBytes = 1 << 20

// Recorded says whether one of the recent events of the trail's current
// file matches. A writer without a file records nothing it can read back.
func (l *Logger) Recorded(match func(Event) bool) bool {
	if l == nil || l.path == "" {
		return false
	}
	f, err := os.Open(l.path)
	if err != nil {
		return false
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	off := max(0, fi.Size()-recentBytes)
	b := make([]byte, fi.Size()-off)
	if _, err := f.ReadAt(b, off); err != nil && err != io.EOF {
		return false
	}
	for _, line := range bytes.Split(b, []byte{'\n'}) {
		var e Event
		if len(line) > 0 && json.Unmarshal(line, &e) == nil && match(e) {
			return true
		}
	}
	return false
}

// append writes one event and returns its line; l.mu is held.
func (l *Logger) append(e Event) ([]byte, error) { return l.appendAll([]Event{e}) }

// appendAll writes events in order under one file lock, in one write
// unless the file rotates between them, and returns the last line; l.mu
// is held. A checkpoint gets its MAC here, over the chain head it
// follows, under the file lock that keeps other writers from moving that
// head.
func (l *Logger) appendAll(es []Event) ([]byte, error) {
	now := time.Now().UTC()
	if l.f == nil { // a plain writer
		var line []byte
		for _, e := range es {
			if e.Time.IsZero() {
				e.Time = now
			}
			b, err := json.Marshal(e)
			if err != nil {
				return nil, err
			}
			line = append(b, '\n')
			if _, err := l.w.Write(line); err != nil {
				return nil, err
			}
		}
		return line, nil
	}
	if err := unix.Flock(int(l.lock.Fd()), unix.LOCK_EX); err != nil {
		return nil, fmt.Errorf("lock audit log: %w", err)
	}
	defer unix.Flock(int(l.lock.Fd()), unix.LOCK_UN)
	size, err := l.current()
	if err != nil {
		return nil, err
	}
	head, seq := l.head, l.seq
	var buf, last []byte
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		if _, err := l.f.Write(buf); err != nil {
			l.known = false // current() reads the head back from the file
			return fmt.Errorf("write audit log: %w", err)
		}
		l.head, l.seq, l.headSize, l.known = head, seq, size, true
		if l.tee != nil {
			l.tee.Write(buf)
		}
		buf = buf[:0]
		return nil
	}
	for _, e := range es {
		if e.Time.IsZero() {
			e.Time = now
		}
		e.Seq, e.Prev = seq+1, head
		if e.Event == "checkpoint" && l.cp != nil {
			e.KID, e.MAC = l.cp.KID(), hex.EncodeToString(l.cp.AuditMAC(CheckpointMessage(e.Prev, e.Seq)))
		}
		line, err := json.Marshal(e)
		if err != nil {
			return nil, err
		}
		line = append(line, '\n')
		if l.maxBytes > 0 && size > 0 && size+int64(len(line)) > l.maxBytes {
			if err := flush(); err != nil {
				return nil, err
			}
			if err := l.rotate(); err != nil {
				return nil, fmt.Errorf("rotate audit log: %w", err)
			}
			size = 0
		}
		buf = append(buf, line...)
		sum := sha256.Sum256(line[:len(line)-1])
		head, seq, size, last = hex.EncodeToString(sum[:]), e.Seq, size+int64(len(line)), line
	}
	return last, flush()
}

// current makes sure f is the file at path (another process may have
// rotated it) and the chain head is the file's last line; it returns the
// file's size. Called under the file lock.
func (l *Logger) current() (int64, error) {
	pi, err := os.Stat(l.path)
	fi, ferr := l.f.Stat()
	if err != nil || ferr != nil || !os.SameFile(pi, fi) {
		if err := l.openFile(); err != nil {
			return 0, err
		}
		if fi, ferr = l.f.Stat(); ferr != nil {
			return 0, ferr
		}
	}
	if l.known && fi.Size() == l.headSize {
		return fi.Size(), nil
	}
	head, seq, err := lastEvent(l.path)
	if err == nil && seq == 0 {
		head, seq, err = lastEvent(l.path + ".1") // just rotated
	}
	if err != nil {
		return 0, err
	}
	l.head, l.seq, l.headSize, l.known = head, seq, fi.Size(), true
	return fi.Size(), nil
}

// lastEvent returns the hash and seq of the last event line of a file;
// seq 0 for none (or no file).
func lastEvent(path string) (head string, seq uint64, err error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", 0, nil
	}
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", 0, err
	}
	off := max(0, fi.Size()-256<<10)
	b := make([]byte, fi.Size()-off)
	if _, err := f.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
		return "", 0, err
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		var e Event
		if json.Unmarshal([]byte(lines[i]), &e) == nil && e.Seq > 0 {
			sum := sha256.Sum256([]byte(lines[i]))
			return hex.EncodeToString(sum[:]), e.Seq, nil
		}
	}
	return "", 0, nil
}

// Anchor returns the path of the anchor file: the last checkpoint, kept
// apart from the log so that a cut tail shows.
func Anchor(path string) string { return path + ".anchor" }

// SetCheckpointer lets l write checkpoints with cp's key: every
// CheckpointEvery events, on Checkpoint, and on Close.
func (l *Logger) SetCheckpointer(cp Checkpointer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cp = cp
}

// Checkpoint writes a checkpoint now: a daemon anchors, when it starts,
// what key-less writers (put, rm) appended.
func (l *Logger) Checkpoint() error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cp == nil || l.f == nil {
		return nil
	}
	return l.checkpointLocked()
}

// checkpointLocked appends a checkpoint over the chain head as it is in
// the file (other writers included) and writes the anchor; l.mu is held.
func (l *Logger) checkpointLocked() error {
	if l.f == nil {
		return nil // a plain writer has no chain to anchor
	}
	line, err := l.append(Event{Event: "checkpoint", PID: os.Getpid()})
	if err != nil {
		return err
	}
	l.sinceCP = 0
	if err := writeAnchor(Anchor(l.path), line); err != nil {
		return fmt.Errorf("write audit anchor: %w", err)
	}
	return nil
}

func writeAnchor(path string, line []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, line, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// StartCheckpoints writes a checkpoint every interval while events come.
func (l *Logger) StartCheckpoints(interval time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopCP != nil || l.cp == nil || l.f == nil {
		return
	}
	l.stopCP, l.cpDone = make(chan struct{}), make(chan struct{})
	go func(stop, done chan struct{}) {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				l.mu.Lock()
				if l.sinceCP > 0 {
					l.checkpointLocked()
				}
				l.mu.Unlock()
			}
		}
	}(l.stopCP, l.cpDone)
}

// Failures counts events that could not be written.
func (l *Logger) Failures() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.failures
}

func (l *Logger) rotate() error {
	for i := Keep - 1; i >= 1; i-- {
		os.Rename(l.path+"."+strconv.Itoa(i), l.path+"."+strconv.Itoa(i+1))
	}
	if err := os.Rename(l.path, l.path+".1"); err != nil {
		return err
	}
	head, seq, hs := l.head, l.seq, l.known
	if err := l.openFile(); err != nil {
		return err
	}
	l.head, l.seq, l.headSize, l.known = head, seq, 0, hs
	return nil
}

// Close writes a last checkpoint (when l holds a key and events came
// since the last) and closes the audit file.
func (l *Logger) Close() error {
	if l == nil || l.f == nil {
		return nil
	}
	l.qmu.Lock()
	if l.queue != nil {
		close(l.queue) // no sender holds qmu now; later ones write at once
		<-l.queueDone
		l.queue = nil
	}
	l.qmu.Unlock()
	l.mu.Lock()
	stop, done := l.stopCP, l.cpDone
	l.stopCP = nil
	l.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	var err error
	if l.cp != nil && l.sinceCP > 0 {
		err = l.checkpointLocked()
	}
	l.lock.Close()
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	return err
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
	files, err := eachLine(path, func(p string, n int, line []byte) error {
		var e Event
		if err := json.Unmarshal(line, &e); err != nil {
			return fmt.Errorf("audit log %s line %d is not an audit event: %w", p, n, err)
		}
		if f.match(&e) {
			out = append(out, e)
		}
		return nil
	})
	if err == nil && len(files) == 0 {
		err = fmt.Errorf("no audit log at %s: events are written there by keyfs mount and keyfs serve: %w", path, fs.ErrNotExist)
	}
	return out, err
}

// eachLine calls f for every line of the audit trail at path, oldest
// first: the rotated files path.Keep … path.1, then path. It returns the
// files it read.
func eachLine(path string, f func(file string, n int, line []byte) error) (files []string, err error) {
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
			return files, fmt.Errorf("read audit log: %w", err)
		}
		files = append(files, p)
		sc := bufio.NewScanner(fh)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for n := 1; sc.Scan(); n++ {
			if err := f(p, n, sc.Bytes()); err != nil {
				fh.Close()
				return files, err
			}
		}
		err = sc.Err()
		fh.Close()
		if err != nil {
			return files, fmt.Errorf("read audit log %s: %w", p, err)
		}
	}
	return files, nil
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
