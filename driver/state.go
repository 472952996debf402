package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/keyfs/keyfs/fusefs"
	"github.com/keyfs/keyfs/keystore"
	"golang.org/x/sys/unix"
)

// volumeRecord is what the driver keeps on disk about a published volume,
// enough to mount it again after a restart: never a key or a value.
type volumeRecord struct {
	VolumeID   string            `json:"volume_id"`
	Target     string            `json:"target"`
	Attributes map[string]string `json:"attributes,omitempty"`
	Pod        podIdentity       `json:"pod"`
}

func (d *Driver) recordPath(volumeID string) string {
	h := sha256.Sum256([]byte(volumeID))
	return filepath.Join(d.stateDir, "volumes", hex.EncodeToString(h[:])+".json")
}

func (d *Driver) writeRecord(r volumeRecord) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return keystore.WriteFileAtomic(d.recordPath(r.VolumeID), append(b, '\n'), 0o600)
}

func (d *Driver) readRecord(path string) (volumeRecord, error) {
	var r volumeRecord
	b, err := os.ReadFile(path)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("volume record %s: %w", path, err)
	}
	if r.VolumeID == "" || d.recordPath(r.VolumeID) != path {
		return r, fmt.Errorf("volume record %s does not match its volume id %q", path, r.VolumeID)
	}
	return r, nil
}

func (d *Driver) removeRecord(volumeID string) error {
	err := os.Remove(d.recordPath(volumeID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// Restore mounts again every volume a previous run of the daemon published
// and did not unpublish: a mount left dead (ENOTCONN) by a killed daemon is
// detached first. A record whose target directory is gone (the pod went
// away meanwhile) is dropped. Errors for single volumes are logged and
// returned together; the other volumes are restored regardless.
func (d *Driver) Restore() error {
	des, err := os.ReadDir(filepath.Join(d.stateDir, "volumes"))
	if err != nil {
		return fmt.Errorf("driver: restore: %w", err)
	}
	held := d.collect()
	defer func() { // what no record claimed: nothing will serve it
		for id, s := range held {
			unix.Close(s.FD)
			for _, h := range d.holders {
				h.Drop(id)
			}
		}
	}()
	var errs []error
	n := 0
	for _, de := range des {
		if !strings.HasSuffix(de.Name(), ".json") {
			continue // a temp file of an interrupted write
		}
		path := filepath.Join(d.stateDir, "volumes", de.Name())
		rec, err := d.readRecord(path)
		if err != nil {
			d.log.Error("restore: unreadable volume record, skipped", "path", path, "err", err)
			errs = append(errs, err)
			continue
		}
		var sess *fusefs.Session
		if s, ok := held[rec.VolumeID]; ok {
			sess = &s
			delete(held, rec.VolumeID)
		}
		if err := d.restoreOne(rec, sess); err != nil {
			d.log.Error("restore failed", "volume", rec.VolumeID, "target", rec.Target, "err", err)
			errs = append(errs, fmt.Errorf("restore volume %s at %s: %w", rec.VolumeID, rec.Target, err))
			continue
		}
		n++
	}
	if n > 0 {
		d.log.Info("volumes restored", "count", n)
	}
	return errors.Join(errs...)
}

// collect gathers the connections the holders keep, one per volume; the
// other copies are closed.
func (d *Driver) collect() map[string]fusefs.Session {
	out := map[string]fusefs.Session{}
	for _, h := range d.holders {
		ss, err := h.Collect()
		if err != nil {
			d.log.Error("cannot collect the volumes a holder keeps", "err", err)
			continue
		}
		for _, s := range ss {
			sess, err := fusefs.ParseSession(s.State, s.FD)
			if _, dup := out[s.Name]; dup || err != nil {
				unix.Close(s.FD)
				continue
			}
			out[s.Name] = sess
		}
	}
	return out
}

// restoreOne takes a recorded volume back: it resumes the connection a
// holder kept (sess, if not nil), so its pods read on, or else mounts it
// afresh, for new pods. sess's descriptor is closed unless a server took
// it over.
func (d *Driver) restoreOne(rec volumeRecord, sess *fusefs.Session) error {
	defer func() {
		if sess != nil {
			unix.Close(sess.FD)
		}
	}()
	unlock := d.locks.lock(rec.VolumeID)
	defer unlock()
	d.mu.Lock()
	_, served := d.vols[rec.VolumeID]
	d.mu.Unlock()
	if served {
		return nil
	}
	if err := d.checkTarget(rec.Target); err != nil {
		return err
	}
	params, err := parseAttributes(rec.Attributes, rec.Pod)
	if err != nil {
		return err
	}
	if !d.reserve(rec.Target, rec.VolumeID) {
		return fmt.Errorf("target is published for another volume")
	}
	// Grants are not checked again here: the mount's Allow is evaluated
	// live, so a tenant revoked meanwhile is simply not shown.
	switch {
	case sess != nil && sess.Mountpoint == rec.Target:
		srv, err := d.resume(*sess, d.mountOptions(rec, params))
		if err == nil {
			sess = nil // the server's now
			d.add(&volume{rec: rec, params: params, srv: srv})
			d.log.Info("volume resumed", "volume", rec.VolumeID, "target", rec.Target)
			return nil
		}
		d.log.Error("cannot resume the volume; mounting it afresh: its running pods must be restarted", "volume", rec.VolumeID, "target", rec.Target, "err", err)
	case sess == nil && len(d.holders) > 0:
		d.log.Warn("no holder kept the volume's connection; mounting it afresh: its running pods must be restarted", "volume", rec.VolumeID, "target", rec.Target)
	}
	err = d.mountVolume(rec, params, false)
	if errors.Is(err, errTargetGone) {
		d.release(rec.Target, rec.VolumeID)
		d.log.Info("restore: target gone, record dropped", "volume", rec.VolumeID, "target", rec.Target)
		return d.removeRecord(rec.VolumeID)
	}
	if err != nil {
		d.release(rec.Target, rec.VolumeID)
	}
	return err
}
