package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keyfs/keyfs/fusefs"
	"github.com/keyfs/keyfs/internal/audit"
)

var errTargetGone = errors.New("target directory is gone")

// NodePublishVolume mounts a keyfs view narrowed to the tenants and keys
// the pod asked for and is granted. Publishing the same volume again with
// the same target and attributes succeeds without doing anything.
func (d *Driver) NodePublishVolume(ctx context.Context, r *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	req, err := d.validatePublish(r)
	if err != nil {
		return nil, d.fail("invalid_argument", codes.InvalidArgument, "%v", err)
	}
	if d.ready != nil {
		if err := d.ready(); err != nil {
			ev := d.podEvent("unavailable", req.pod, req.volumeID)
			ev.Reason = err.Error()
			d.audit.Log(ev)
			return nil, d.fail("not_ready", codes.Unavailable, "%v", err)
		}
	}
	unlock := d.locks.lock(req.volumeID)
	defer unlock()

	d.mu.Lock()
	v := d.vols[req.volumeID]
	owner, taken := d.targets[req.target]
	d.mu.Unlock()
	if v != nil {
		if v.rec.Target == req.target && v.rec.Pod == req.pod && v.params.equal(req.params) {
			return &csi.NodePublishVolumeResponse{}, nil
		}
		if v.rec.Target != req.target {
			return nil, d.fail("already_exists", codes.AlreadyExists, "volume %s is already published at %s, not %s", req.volumeID, v.rec.Target, req.target)
		}
		return nil, d.fail("already_exists", codes.AlreadyExists, "volume %s is already published at %s with other attributes or for another pod: unpublish it first", req.volumeID, req.target)
	}
	if taken && owner != req.volumeID {
		return nil, d.fail("target_in_use", codes.FailedPrecondition, "target %s is already published for volume %s", req.target, owner)
	}
	tenants := req.params.Tenants
	if req.params.All {
		tenants = nil // "*": whatever is granted, evaluated live
	}
	if err := d.policy.check(req.pod, tenants); err != nil {
		var de *DeniedError
		errors.As(err, &de)
		d.m.denials.WithLabelValues("tenant_not_granted").Inc()
		ev := d.podEvent("deny", req.pod, req.volumeID)
		ev.Tenant, ev.Reason = de.Tenant, err.Error()
		d.audit.Log(ev)
		d.log.Warn("publish denied", "volume", req.volumeID, "namespace", req.pod.Namespace, "pod", req.pod.Name, "service_account", req.pod.ServiceAccount, "tenant", de.Tenant)
		return nil, pdenied(err)
	}

	if !d.reserve(req.target, req.volumeID) {
		return nil, d.fail("target_in_use", codes.FailedPrecondition, "target %s is being published for another volume", req.target)
	}
	rec := volumeRecord{VolumeID: req.volumeID, Target: req.target, Attributes: req.attrs, Pod: req.pod}
	published := false
	defer func() {
		if !published {
			d.release(req.target, req.volumeID)
		}
	}()
	if err := d.mountVolume(rec, req.params, true); err != nil {
		var pe *prepareError
		if errors.As(err, &pe) {
			return nil, d.fail("target", codes.FailedPrecondition, "%v", err)
		}
		return nil, d.fail("mount", codes.Internal, "%v", err)
	}
	published = true
	d.m.publishes.Inc()
	ev := d.podEvent("publish", req.pod, req.volumeID)
	if len(req.params.Tenants) == 1 {
		ev.Tenant = req.params.Tenants[0]
	}
	ev.Reason = describeParams(req.params)
	d.audit.Log(ev)
	return &csi.NodePublishVolumeResponse{}, nil
}

func pdenied(err error) error {
	return status.Error(codes.PermissionDenied, err.Error())
}

// prepareError marks a target the driver will not mount on.
type prepareError struct{ err error }

func (e *prepareError) Error() string { return e.err.Error() }
func (e *prepareError) Unwrap() error { return e.err }

// mountVolume mounts rec's view at its target and records it, on disk and
// in d.vols. With create, a missing target directory is made; without (a
// restore), a missing one is errTargetGone. The caller holds the volume
// lock and has reserved the target.
func (d *Driver) mountVolume(rec volumeRecord, params volumeParams, create bool) error {
	made, err := prepareTarget(rec.Target, create)
	if err != nil {
		return err
	}
	done := false
	defer func() {
		if !done && made {
			os.Remove(rec.Target) // fails, harmlessly, if still mounted
		}
	}()
	srv, err := d.mount(rec.Target, d.mountOptions(rec, params))
	if err != nil {
		return fmt.Errorf("mount %s: %w", rec.Target, err)
	}
	v := &volume{rec: rec, params: params, srv: srv}
	if err := d.writeRecord(rec); err != nil {
		// Unrecorded, the mount would be lost on restart: undo it.
		if uerr := d.unmountView(v); uerr != nil {
			d.log.Error("cannot undo mount", "target", rec.Target, "err", uerr)
		}
		return fmt.Errorf("record volume %s: %w", rec.VolumeID, err)
	}
	done = true
	d.add(v)
	return nil
}

// add serves v from now on and deposits its connection with the holders.
func (d *Driver) add(v *volume) {
	d.mu.Lock()
	d.vols[v.rec.VolumeID] = v
	d.mu.Unlock()
	d.m.mounted.Inc()
	sess := v.srv.Session()
	state := sess.MarshalState()
	for _, h := range d.holders {
		if err := h.Hold(v.rec.VolumeID, state, sess.FD); err != nil {
			d.log.Error("a holder does not hold the volume: it will not survive a restart of keyfs", "volume", v.rec.VolumeID, "err", err)
		}
	}
}

func (d *Driver) mountOptions(rec volumeRecord, params volumeParams) fusefs.Options {
	pod, all := rec.Pod, params.All
	listed := map[string]bool{}
	for _, t := range params.Tenants {
		listed[t] = true
	}
	policy := d.policy
	return fusefs.Options{
		Store:         d.store,
		Key:           d.key,
		Audit:         d.audit,
		AuditRequired: d.auditRequired,
		ReadsOwnMount: d.readsOwnMounts,
		Log:           d.log,
		// Re-checked on every lookup and poll, so a revoked grant hides
		// the tenant and, with "*", a new grant shows it.
		Allow: func(t string) bool {
			return (all || listed[t]) && policy.Granted(pod.Namespace, pod.ServiceAccount, t)
		},
		Keys:     params.Keys,
		UID:      params.UID,
		GID:      params.GID,
		FileMode: params.Mode,
		Pod:      d.podEvent("", pod, rec.VolumeID),
		OnRead:   d.m.onRead,
	}
}

// prepareTarget makes sure target is a directory with no mount on it. A
// keyfs mount found there is one this process does not serve (the caller
// holds the volume lock and the volume is not in d.vols): a previous
// daemon left it, dead. It is detached; any other mount is refused.
func prepareTarget(target string, create bool) (made bool, err error) {
	if _, err := fusefs.DetachLeftover(target); err != nil {
		return false, &prepareError{err}
	}
	fi, err := os.Stat(target)
	switch {
	case errors.Is(err, fs.ErrNotExist) && !create:
		return false, errTargetGone
	case errors.Is(err, fs.ErrNotExist):
		if err := os.MkdirAll(target, 0o750); err != nil {
			return false, &prepareError{fmt.Errorf("create target: %w", err)}
		}
		return true, nil
	case err != nil:
		return false, &prepareError{err}
	case !fi.IsDir():
		return false, &prepareError{fmt.Errorf("target %s is not a directory", target)}
	}
	return false, nil
}

func (d *Driver) reserve(target, volumeID string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if owner, ok := d.targets[target]; ok && owner != volumeID {
		return false
	}
	d.targets[target] = volumeID
	return true
}

func (d *Driver) release(target, volumeID string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.targets[target] == volumeID {
		delete(d.targets, target)
	}
}

// NodeUnpublishVolume unmounts and removes the target. A target that is
// already gone, or a volume unpublished before, is success.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, r *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := r.GetVolumeId(), r.GetTargetPath()
	switch {
	case id == "":
		return nil, d.fail("invalid_argument", codes.InvalidArgument, "volume id is required")
	case target == "":
		return nil, d.fail("invalid_argument", codes.InvalidArgument, "target path is required")
	}
	if err := d.checkTarget(target); err != nil {
		return nil, d.fail("invalid_argument", codes.InvalidArgument, "%v", err)
	}
	unlock := d.locks.lock(id)
	defer unlock()

	d.mu.Lock()
	v := d.vols[id]
	owner, taken := d.targets[target]
	d.mu.Unlock()
	if v != nil && v.rec.Target != target {
		v = nil // not where this volume is: handle the target on its own
	}
	if v == nil && taken && owner != id {
		return nil, d.fail("not_found", codes.NotFound, "volume %s is not published at %s (volume %s is)", id, target, owner)
	}

	// The record on disk covers a volume this run has not mounted (a
	// restart that could not restore it); read it once.
	rec, recErr := d.readRecord(d.recordPath(id))
	ours := recErr == nil && rec.Target == target
	pod := podIdentity{}
	if ours {
		pod = rec.Pod
	}
	if v != nil {
		pod = v.rec.Pod
		if err := d.unmountView(v); err != nil {
			return nil, d.fail("unmount", codes.Internal, "%v", err)
		}
		d.mu.Lock()
		delete(d.vols, id)
		d.mu.Unlock()
		d.m.mounted.Dec()
	} else {
		if _, err := fusefs.DetachLeftover(target); err != nil {
			return nil, d.fail("unmount", codes.Internal, "%v", err)
		}
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, d.fail("remove_target", codes.Internal, "remove target: %v", err)
	}
	if ours {
		if err := d.removeRecord(id); err != nil {
			return nil, d.fail("state", codes.Internal, "remove volume record: %v", err)
		}
	}
	d.release(target, id)
	d.m.unpublishes.Inc()
	d.audit.Log(d.podEvent("unpublish", pod, id))
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// unmountView unmounts a view the driver serves. If a file is still open
// the kernel refuses; the mount is then detached, and its server ends when
// the last file is closed.
func (d *Driver) unmountView(v *volume) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil
	}
	if err := v.srv.Unmount(); err != nil {
		if derr := unix.Unmount(v.rec.Target, unix.MNT_DETACH); derr != nil && !errors.Is(derr, syscall.EINVAL) {
			return fmt.Errorf("unmount %s: %v; detach: %w", v.rec.Target, err, derr)
		}
		d.log.Warn("target busy, detached lazily", "target", v.rec.Target, "err", err)
		go v.srv.Wait()
	}
	v.closed = true
	for _, h := range d.holders {
		if err := h.Drop(v.rec.VolumeID); err != nil {
			d.log.Warn("a holder may still hold an unmounted volume", "volume", v.rec.VolumeID, "err", err)
		}
	}
	return nil
}

func (d *Driver) podEvent(event string, pod podIdentity, volumeID string) audit.Event {
	return audit.Event{
		Event:          event,
		PodNamespace:   pod.Namespace,
		PodName:        pod.Name,
		PodUID:         pod.UID,
		ServiceAccount: pod.ServiceAccount,
		Volume:         volumeID,
		Node:           d.nodeID,
	}
}

// describeParams says what a publish shows, for the audit trail.
func describeParams(p volumeParams) string {
	s := "tenants=*"
	if !p.All {
		s = "tenants=" + strings.Join(p.Tenants, ",")
	}
	if p.Keys != nil {
		s += " keys=" + strings.Join(p.Keys, ",")
	}
	return fmt.Sprintf("%s uid=%d gid=%d mode=%04o", s, p.UID, p.GID, p.Mode)
}
