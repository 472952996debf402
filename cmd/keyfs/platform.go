package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"syscall"
	"time"

	"github.com/keyfs/keyfs/fusefs"
	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/internal/harden"
	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/kubestore"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// mountOrResume serves the view at mnt: it takes over the connection the
// supervisor holds from a worker before this one, or mounts afresh.
func mountOrResume(log *slog.Logger, w *worker, mnt string, o fusefs.Options) (*fusefs.Server, bool, error) {
	held, err := w.Collect()
	if err != nil {
		log.Error("cannot collect the mounts the supervisor holds; mounting afresh", "err", err)
	}
	for _, h := range held {
		sess, err := fusefs.ParseSession(h.State, h.FD)
		if h.Name != mnt || err != nil {
			unix.Close(h.FD)
			w.Drop(h.Name)
			continue
		}
		srv, err := fusefs.Resume(sess, o)
		if err == nil {
			return srv, true, nil
		}
		log.Error("cannot resume the mount; mounting afresh (readers of the old one get errors)", "mountpoint", mnt, "err", err)
		unix.Close(h.FD)
		w.Drop(h.Name)
	}
	if n, err := fusefs.DetachLeftover(mnt); err != nil {
		return nil, false, err
	} else if n > 0 {
		log.Warn("detached a keyfs mount a killed process left", "mountpoint", mnt)
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return nil, false, err
	}
	srv, err := fusefs.Mount(mnt, o)
	if err != nil {
		return nil, false, fmt.Errorf("mount %s: %w", mnt, err)
	}
	return srv, false, nil
}

// openAudit opens STATE/audit.log, or stdout for "-".
func (g *globals) openAudit(path string) (*audit.Logger, error) {
	if path == "-" {
		return audit.NewWriter(os.Stdout), nil
	}
	if path == "" {
		path = g.path("audit.log")
	}
	return audit.Open(path, audit.DefaultMaxBytes)
}

func requireRoot(what string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: keyfs %s needs root (FUSE mounts that other users and pods can read, and locked memory): run it with sudo", errNotRoot, what)
	}
	return nil
}

func mountCmd(g *globals) *cobra.Command {
	var tenants, keys, mode, auditPath string
	var uid, gid uint32
	var allowUnprotected, auditRequired bool
	c := &cobra.Command{
		Use:   "mount [--tenants T1,T2] [--keys a,b] [--uid U --gid G --mode M] MOUNTPOINT",
		Short: "Serve keys as read-only files at MOUNTPOINT until SIGINT/SIGTERM",
		Long: `mount unseals the master key with the TPM and serves MOUNTPOINT/<tenant>/<name>
read-only: each open decrypts the newest version of the key; nothing is
cached in plaintext. Keys put or removed while mounted appear or vanish
within a second. Every open is written to the audit log.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(_ *cobra.Command, a []string) error {
			mnt := a[0]
			ts, err := keystore.SplitNames(tenants, keystore.ValidTenant)
			if err != nil {
				return err
			}
			ks, err := keystore.SplitNames(keys, keystore.ValidKeyName)
			if err != nil {
				return err
			}
			m, err := fusefs.ParseFileMode(mode)
			if err != nil {
				return usageError{fmt.Errorf("--%w", err)}
			}
			if err := requireRoot("mount"); err != nil {
				return err
			}
			g.log = slog.New(slog.NewTextHandler(os.Stderr, nil))
			log := g.log
			w, err := asWorker()
			if err != nil {
				return err
			}
			if w == nil {
				return supervise(log)
			}
			if _, err := hardenProcess(log, "mount", allowUnprotected); err != nil {
				return err
			}
			dm, err := g.startDaemon(daemonAudit{path: auditPath, required: auditRequired})
			if err != nil {
				return err
			}
			defer dm.close()
			d, key, al := dm.store, dm.key, dm.audit
			// Catch signals before the mount serves: a stop request must
			// always end in an unmount.
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
			defer signal.Stop(sig)
			if dm.enrolled != nil {
				select {
				case <-dm.enrolled:
				case s := <-sig:
					log.Info("stopped before enrollment", "signal", s.String())
					return nil
				}
			}
			opts := fusefs.Options{Store: d, Key: key, Audit: al, AuditRequired: auditRequired, Log: log, Keys: ks, UID: uid, GID: gid, FileMode: m}
			opts.Pod.Node, _ = os.Hostname()
			if ts != nil {
				opts.Allow = func(t string) bool { return slices.Contains(ts, t) }
			}
			srv, resumed, err := mountOrResume(log, w, mnt, opts)
			if err != nil {
				return err
			}
			if err := w.hold(mnt, srv); err != nil {
				log.Error("the supervisor does not hold the mount: a crash of this process will end it", "err", err)
			}
			w.Ready()
			w.auditRestart(g, al)
			log.Info("serving keys", "mountpoint", mnt, "kid", key.KID(), "tenants", orAll(tenants), "keys", orAll(keys), "resumed", resumed)
			done := make(chan struct{})
			go func() { srv.Wait(); close(done) }()
			select {
			case s := <-sig:
				log.Info("unmounting", "signal", s.String())
				// Unmount returns once this namespace's mount is gone; a
				// copy another namespace holds (a container's bind) ends
				// with this process.
				if err := srv.Unmount(); err != nil {
					return fmt.Errorf("unmount %s: %w (if it stays busy, close what is reading it and run keyfs mount again to clean up)", mnt, err)
				}
			case <-done:
				log.Warn("the mount went away (unmounted from outside)", "mountpoint", mnt)
			}
			w.Drop(mnt)
			return nil
		},
	}
	c.Flags().StringVar(&tenants, "tenants", "", "only these tenants (comma list; default all)")
	c.Flags().StringVar(&keys, "keys", "", "only these key names (comma list; default all)")
	c.Flags().Uint32Var(&uid, "uid", 0, "owner of files and directories")
	c.Flags().Uint32Var(&gid, "gid", 0, "group of files and directories")
	c.Flags().StringVar(&mode, "mode", "0444", "file mode (read bits only)")
	c.Flags().StringVar(&auditPath, "audit-log", "", "audit log file, or - for stdout (default STATE/audit.log)")
	c.Flags().BoolVar(&allowUnprotected, insecureMemoryFlag, false, "run even when memory cannot be locked or dumps disabled (secrets may reach swap)")
	c.Flags().BoolVar(&auditRequired, "audit-required", false, "fail an open (EIO) whose audit event cannot be written")
	addEnrollFlags(c, g)
	return c
}

// auditSealedKey records each SealedKey the daemon sees change: the key,
// its version and kid, and what the API says of its last writer.
func (g *globals) auditSealedKey(al *audit.Logger) func(string, *kubestore.SealedKey) {
	node := g.nodeName()
	return func(change string, o *kubestore.SealedKey) {
		reason := change + " of SealedKey " + o.Namespace + "/" + o.Name
		if w := o.Writer(); w != "" && change != "delete" {
			reason += " by " + w
		}
		al.Log(audit.Event{Time: time.Now().UTC(), Event: "sealedkey", Tenant: o.Spec.Tenant, Key: o.Spec.Name, Version: o.Version(), KID: o.KID(), Node: node, Reason: reason})
	}
}

// addEnrollFlags adds the daemons' explicit rules of automatic approval.
func addEnrollFlags(c *cobra.Command, g *globals) {
	c.Flags().StringSliceVar(&g.autoApprove, "auto-approve-ek", nil, "cluster mode: enroll nodes whose TPM has one of these EK hashes (keyfs node ek) without an admin's approval")
	c.Flags().StringVar(&g.autoApproveCA, "auto-approve-ek-ca", "", "cluster mode: enroll nodes whose EK certificate chains to a CA in this PEM file, without an admin's approval")
}

const insecureMemoryFlag = "insecure-allow-unlocked-memory"

func orAll(s string) string {
	if s == "" {
		return "all"
	}
	return s
}

// lockedGCPercent is a daemon's GC percent once its memory is locked,
// unless GOGC says otherwise. Locked, every page the heap once reached
// stays resident, so the heap may grow a quarter past what is live (most
// of it the index of every key), not twice it: at 30,000 SealedKeys,
// about 80 MB live once served, 100 MB of heap rather than 160.
const lockedGCPercent = 25

// hardenProcess keeps the daemon's secrets out of swap and core dumps, or
// refuses to go on: a daemon that holds the master key unprotected only
// runs when the operator said so with --insecure-allow-unlocked-memory.
func hardenProcess(log *slog.Logger, what string, allowUnprotected bool) (protected bool, err error) {
	herr := harden.Process()
	switch {
	case herr == nil:
		if os.Getenv("GOGC") == "" {
			debug.SetGCPercent(lockedGCPercent)
		}
		return true, nil
	case allowUnprotected:
		log.Warn("running with UNPROTECTED memory (--insecure-allow-unlocked-memory): plaintext and the master key could reach swap or a core dump", "err", herr)
		return false, nil
	}
	return false, fmt.Errorf("%w: keyfs %s cannot protect its memory (%w). Grant CAP_IPC_LOCK (in the DaemonSet: securityContext privileged: true, or capabilities.add: [IPC_LOCK]) "+
		"or raise RLIMIT_MEMLOCK (systemd LimitMEMLOCK=infinity, ulimit -l unlimited); to run without, at the risk of secrets in swap, pass --insecure-allow-unlocked-memory",
		errNotRoot, what, herr)
}

// daemon is what a serving process holds: the one index of its store
// that every view shows, the unsealed master key and the audit trail.
type daemon struct {
	store interface {
		keystore.Store
		Close()
	}
	key   *keystore.MasterKey
	audit *audit.Logger

	// Cluster mode: whether this node can serve yet, closed once it can.
	ready      func() error
	enrolled   <-chan struct{}
	stopEnroll func()
}

// daemonAudit is how a daemon keeps its audit trail.
type daemonAudit struct {
	path     string // "" for STATE/audit.log, "-" for stdout only
	stdout   bool   // every event also to stdout, for a container's log pipeline
	required bool   // an open whose event cannot be written fails
}

// checkpointEvery bounds how long a daemon's newest events stay without
// a checkpoint.
const checkpointEvery = time.Minute

func (g *globals) startDaemon(da daemonAudit) (*daemon, error) {
	var d *keystore.Dir
	var err error
	if !g.cluster() {
		if d, err = g.store(); err != nil {
			return nil, err
		}
	}
	key, err := g.unseal()
	if err != nil {
		return nil, err
	}
	var kc *kubestore.KeyfsCluster
	var cluster *keystore.PublicKey
	var held string
	if g.cluster() {
		if kc, cluster, held, err = g.joinCluster(key); err != nil {
			key.Close()
			return nil, err
		}
	}
	al, err := g.openAudit(da.path)
	if err != nil {
		key.Close()
		return nil, err
	}
	if da.stdout && da.path != "-" {
		al.Tee(os.Stdout)
	}
	al.OnFailure(func(err error) {
		g.log.Error("audit event not written; every failure is counted in keyfs_audit_write_failures_total", "required", da.required, "err", err)
	})
	// Anchor what key-less writers (put, rm) appended, then keep anchoring.
	al.SetCheckpointer(key)
	if err := al.Checkpoint(); err != nil && da.required {
		al.Close()
		key.Close()
		return nil, fmt.Errorf("audit log: %w (--audit-required)", err)
	}
	al.StartCheckpoints(checkpointEvery)
	if !da.required {
		al.StartQueue(4096) // opens are answered before their event is written
	}
	dm := &daemon{key: key, audit: al}
	if g.cluster() {
		var e *enroller
		if e, err = g.newEnroller(dm, kc, cluster, held); err == nil {
			var x *kubestore.Index
			if x, err = kubestore.Watch(g.kubeClient, g.log, e.checkKID, g.auditSealedKey(al)); err == nil {
				dm.store, e.onRetire = x, x.Recheck
				e.start(dm)
			}
		}
	} else {
		dm.store, err = keystore.WatchDir(d, 0, g.log)
	}
	if err != nil {
		al.Close()
		key.Close()
		return nil, err
	}
	return dm, nil
}

func (dm *daemon) close() {
	if dm.stopEnroll != nil {
		dm.stopEnroll()
	}
	dm.store.Close()
	dm.audit.Close()
	dm.key.Close()
}
