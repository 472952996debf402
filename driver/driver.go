// Package driver is keyfs's CSI node plugin: the Identity and Node services
// that mount a narrowed, read-only keyfs view into a pod as a CSI ephemeral
// inline volume, after checking that the pod may see the tenants it asks for.
package driver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/keyfs/keyfs/fusefs"
	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/internal/fdhold"
	"github.com/keyfs/keyfs/keystore"
)

// DriverName is the CSI driver name pods put in volumes[].csi.driver.
const DriverName = "keyfs.csi.dev"

// DefaultKubeletDir is kubelet's --root-dir; every target path is under it.
const DefaultKubeletDir = "/var/lib/kubelet"

// Config configures a Driver.
type Config struct {
	Name       string // CSI driver name; DriverName when empty
	Version    string // vendor version reported by GetPluginInfo
	NodeID     string // required
	KubeletDir string // DefaultKubeletDir when empty
	StateDir   string // required: volume records live in StateDir/volumes

	Store keystore.Store      // required: the daemon's shared index
	Key   *keystore.MasterKey // required
	Audit *audit.Logger       // nil: no audit trail
	// AuditRequired fails opens whose audit event cannot be written.
	AuditRequired bool
	// ReadsOwnMounts is for tests and benchmarks that read the volumes
	// from the driver's own process (fusefs.Options.ReadsOwnMount).
	ReadsOwnMounts bool
	Log            *slog.Logger // nil: slog.Default()
	// Policy decides which tenants a pod may see; nil means the default
	// rule (tenant == namespace) and no policy file.
	Policy *Policy
	// Registry receives the driver's metrics; nil keeps them unregistered.
	Registry prometheus.Registerer
	// Holders keep copies of the volumes' FUSE connections, so that the
	// next run of the daemon takes them over (Restore) and running pods
	// read on: the daemon's supervisor, the node's fd holder.
	Holders []Holder
	// LeaveMounts, when set and true at Close, leaves the volumes mounted
	// for the next run instead of unmounting them: a holder outside this
	// process keeps them alive meanwhile.
	LeaveMounts func() bool
	// Ready says whether the node can serve keys yet (a cluster node
	// waiting for enrollment cannot): its error refuses every publish with
	// Unavailable and that message, so kubelet retries. nil: always ready.
	Ready func() error
}

// view is what the driver needs of a mounted fusefs server; a seam so a
// test can inject a failing or panicking mount.
type view interface {
	Unmount() error
	Wait()
	Refresh()
	Session() fusefs.Session
}

type mountFunc func(target string, o fusefs.Options) (view, error)

func fuseMount(target string, o fusefs.Options) (view, error) {
	s, err := fusefs.Mount(target, o)
	if err != nil {
		return nil, err
	}
	return s, nil
}

func fuseResume(sess fusefs.Session, o fusefs.Options) (view, error) {
	s, err := fusefs.Resume(sess, o)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Holder keeps copies of FUSE connections for a successor
// (internal/fdhold).
type Holder interface {
	Hold(name string, state []byte, fd int) error
	Drop(name string) error
	Collect() ([]fdhold.Session, error)
}

// volume is one published volume.
type volume struct {
	rec    volumeRecord
	params volumeParams

	mu     sync.Mutex // orders Refresh against Unmount
	srv    view
	closed bool
}

// Driver serves CSI Identity and Node. It has no Controller service:
// ephemeral inline volumes are never provisioned or attached.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer

	name, version, nodeID string
	kubeletDir, stateDir  string
	store                 keystore.Store
	key                   *keystore.MasterKey
	audit                 *audit.Logger
	auditRequired         bool
	readsOwnMounts        bool
	log                   *slog.Logger
	policy                *Policy
	m                     *metrics
	mount                 mountFunc
	resume                func(fusefs.Session, fusefs.Options) (view, error)
	holders               []Holder
	leaveMounts           func() bool
	ready                 func() error

	locks keyedMutex // one publish/unpublish per volume id at a time

	mu      sync.Mutex
	vols    map[string]*volume // by volume id
	targets map[string]string  // target path → volume id, including publishes in flight
	unsub   func()
}

// New checks c and returns a driver holding no volumes; call Restore to
// take back the volumes a previous run published.
func New(c Config) (*Driver, error) {
	if c.NodeID == "" {
		return nil, errors.New("driver: a node id is required")
	}
	if c.Store == nil {
		return nil, errors.New("driver: a key store is required")
	}
	if c.Key == nil {
		return nil, errors.New("driver: the master key is required")
	}
	if c.StateDir == "" {
		return nil, errors.New("driver: a state directory is required")
	}
	if c.Name == "" {
		c.Name = DriverName
	}
	if c.KubeletDir == "" {
		c.KubeletDir = DefaultKubeletDir
	}
	if !filepath.IsAbs(c.KubeletDir) {
		return nil, fmt.Errorf("driver: kubelet directory %q is not absolute", c.KubeletDir)
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	if c.Policy == nil {
		p, err := LoadPolicy("", RuleNamespace)
		if err != nil {
			return nil, err
		}
		c.Policy = p
	}
	if err := os.MkdirAll(filepath.Join(c.StateDir, "volumes"), 0o700); err != nil {
		return nil, fmt.Errorf("driver: state directory: %w", err)
	}
	m, err := newMetrics(c.Registry, c.Policy)
	if err != nil {
		return nil, err
	}
	d := &Driver{
		name:           c.Name,
		version:        c.Version,
		nodeID:         c.NodeID,
		kubeletDir:     filepath.Clean(c.KubeletDir),
		stateDir:       c.StateDir,
		store:          c.Store,
		key:            c.Key,
		audit:          c.Audit,
		auditRequired:  c.AuditRequired,
		readsOwnMounts: c.ReadsOwnMounts,
		log:            c.Log,
		policy:         c.Policy,
		m:              m,
		mount:          fuseMount,
		resume:         fuseResume,
		holders:        c.Holders,
		leaveMounts:    c.LeaveMounts,
		ready:          c.Ready,
		vols:           map[string]*volume{},
		targets:        map[string]string{},
	}
	d.unsub = c.Policy.subscribe(d.Refresh)
	return d, nil
}

// Refresh makes every mount re-evaluate its grants now; the driver calls
// it itself when its Policy changes.
func (d *Driver) Refresh() {
	for _, v := range d.volumes() {
		v.mu.Lock()
		if !v.closed {
			v.srv.Refresh()
		}
		v.mu.Unlock()
	}
}

func (d *Driver) volumes() []*volume {
	d.mu.Lock()
	defer d.mu.Unlock()
	vs := make([]*volume, 0, len(d.vols))
	for _, v := range d.vols {
		vs = append(vs, v)
	}
	return vs
}

// Close stops serving the views but keeps the volume records, so a
// restarted daemon's Restore takes them back at the same targets. Call it
// after Serve has returned. With LeaveMounts true the mounts stay for the
// next run, which resumes them: running pods see a stall. Otherwise every
// view is unmounted: a FUSE mount cannot outlive its server, so running
// pods (they hold their own binds) get ENOTCONN until they are restarted.
func (d *Driver) Close() {
	d.unsub()
	if d.leaveMounts != nil && d.leaveMounts() {
		d.log.Info("leaving the volumes mounted for the next run to resume", "volumes", len(d.volumes()))
		return
	}
	var wg sync.WaitGroup
	for _, v := range d.volumes() {
		wg.Go(func() {
			if err := d.unmountView(v); err != nil {
				d.log.Error("cannot unmount on shutdown", "volume", v.rec.VolumeID, "target", v.rec.Target, "err", err)
			}
		})
	}
	wg.Wait()
	d.mu.Lock()
	d.vols = map[string]*volume{}
	d.targets = map[string]string{}
	d.mu.Unlock()
	d.m.mounted.Set(0)
}

// Identity service.

func (d *Driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: d.name, VendorVersion: d.version}, nil
}

// GetPluginCapabilities reports none: no controller service, no topology.
func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{}, nil
}

// Probe is ready while the store can be listed (a driver always holds its
// master key: New requires it).
func (d *Driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	ready := true
	if err := d.store.Refresh(); err != nil {
		d.log.Warn("probe: store unreadable", "err", err)
		ready = false
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(ready)}, nil
}

// Node service.

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID}, nil
}

// NodeGetCapabilities reports none: no staging, stats, expansion or health.
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

// fail counts an error by reason and returns it as a gRPC status.
func (d *Driver) fail(reason string, c codes.Code, format string, args ...any) error {
	d.m.errors.WithLabelValues(reason).Inc()
	return status.Errorf(c, format, args...)
}

// keyedMutex serializes work per key and forgets keys nobody holds.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu sync.Mutex
	n  int
}

func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.n++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.n--; e.n == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}
