package main

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/internal/fileset"
	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/tpm"
)

// The key ring: the current master is master.{sealed,pub,recovery}; each
// older master a rotation kept is master-KID.{sealed,pub,recovery} beside
// it, opening the records still sealed to it until it is retired.

func ringFile(kid, ext string) string { return "master-" + kid + "." + ext }

// ringKIDs lists the older masters of the ring, sorted.
func (g *globals) ringKIDs() ([]string, error) {
	ms, err := filepath.Glob(g.path("master-*.sealed"))
	if err != nil {
		return nil, err
	}
	var kids []string
	for _, m := range ms {
		kid := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(m), "master-"), ".sealed")
		if len(kid) == 16 {
			kids = append(kids, kid)
		}
	}
	slices.Sort(kids)
	return kids, nil
}

// ringPublicKeys returns the public keys of the ring's older masters.
func (g *globals) ringPublicKeys() (map[string]*keystore.PublicKey, error) {
	kids, err := g.ringKIDs()
	if err != nil {
		return nil, err
	}
	out := map[string]*keystore.PublicKey{}
	for _, kid := range kids {
		p, err := g.readPublicKey(ringFile(kid, "pub"))
		if err != nil {
			return nil, err
		}
		if p.KID != kid {
			return nil, fmt.Errorf("%w: %s holds kid %s", keystore.ErrIntegrity, ringFile(kid, "pub"), p.KID)
		}
		out[kid] = p
	}
	return out, nil
}

// lifecycleEvent stamps an event with who and where: this process, its
// user and command, and the node.
func (g *globals) lifecycleEvent(ev audit.Event) audit.Event {
	uid := uint32(os.Getuid())
	ev.PID, ev.UID, ev.Command = os.Getpid(), &uid, g.command
	ev.Node, _ = os.Hostname()
	return ev
}

// auditLifecycle records lifecycle events on the state's audit trail. A
// command that unsealed the master (m) anchors them with a checkpoint.
func (g *globals) auditLifecycle(m *keystore.MasterKey, evs ...audit.Event) {
	if len(evs) == 0 {
		return
	}
	if _, err := os.Stat(g.path("master.pub")); err != nil && g.cluster() {
		return // no state here (an admin's machine): the API server's audit log records who wrote SealedKeys
	}
	al, err := g.openAudit("")
	if err != nil {
		g.warn(fmt.Sprintf("cannot write %d audit events: %v", len(evs), err))
		return
	}
	if m != nil {
		al.SetCheckpointer(m)
	}
	failed := 0
	for _, ev := range evs {
		if al.Log(g.lifecycleEvent(ev)) != nil {
			failed++
		}
	}
	if err := al.Close(); err != nil || failed > 0 {
		g.warn(fmt.Sprintf("%d of %d audit events not written (%v)", failed, len(evs), err))
	}
}

// keepInRing is the change that moves the current master's files (of
// kid) into the ring, to commit with the new master's: it keeps opening
// its records and checking its audit checkpoints.
func (g *globals) keepInRing(kid string) ([]fileset.File, error) {
	var keep []fileset.File
	for _, f := range []struct{ from, ext string }{{"master.sealed", "sealed"}, {"master.pub", "pub"}, {"master.recovery", "recovery"}} {
		b, err := os.ReadFile(g.path(f.from))
		if errors.Is(err, fs.ErrNotExist) && f.ext == "recovery" {
			continue
		}
		if err != nil {
			return nil, err
		}
		keep = append(keep, fileset.File{Name: ringFile(kid, f.ext), Data: b, Perm: 0o600})
	}
	return keep, nil
}

func masterCmd(g *globals) *cobra.Command {
	c := &cobra.Command{
		Use:   "master",
		Short: "The master key ring: list, rotate, reseal records, retire old masters",
		Long: `A rotation makes a new master key (a new kid) that seals from then on, and
keeps the older ones opening the records sealed to them. Then reseal
re-encrypts every record to the newest master, and retire drops an old
master once no record needs it. Readers see the same values throughout.`,
	}
	c.AddCommand(masterLsCmd(g), masterRotateCmd(g), masterResealCmd(g), masterRetireCmd(g))
	return c
}

// recordsByKID counts the stored record versions sealed to each kid, and
// names a few of each.
func recordsByKID(d *keystore.Dir) (map[string][]string, error) {
	ts, err := d.Tenants()
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for _, t := range ts {
		es, err := d.AllVersions(t)
		if err != nil {
			return nil, err
		}
		for _, e := range es {
			r, err := d.Read(e)
			if err != nil {
				return nil, err
			}
			out[r.KID] = append(out[r.KID], fmt.Sprintf("%s/%s@%d", e.Tenant, e.Name, e.Version))
		}
	}
	return out, nil
}

func masterLsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List the masters: kid, current or older, since, records sealed to it",
		Args:  args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			if err := g.localOnly("keyfs master ls (kubectl get keyfsclusters shows the cluster's)"); err != nil {
				return err
			}
			pub, err := g.publicKey()
			if err != nil {
				return err
			}
			d, err := g.store()
			if err != nil {
				return err
			}
			older, err := g.ringKIDs()
			if err != nil {
				return err
			}
			recs, err := recordsByKID(d)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "KID\tSTATE\tSINCE\tRECORDS")
			row := func(kid, state, file string) {
				since := "-"
				if fi, err := os.Stat(g.path(file)); err == nil {
					since = fi.ModTime().Local().Format(time.DateTime)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\n", kid, state, since, len(recs[kid]))
			}
			row(pub.KID, "current", "master.sealed")
			for _, kid := range older {
				row(kid, "older", ringFile(kid, "sealed"))
			}
			return w.Flush()
		},
	}
}

func masterRotateCmd(g *globals) *cobra.Command {
	var pcrs, recoveryPub string
	var noRecovery bool
	c := &cobra.Command{
		Use:   "rotate [--pcrs 7] [--recovery-pub FILE | --no-recovery]",
		Short: "Make a new master key; the current one becomes an older master of the ring",
		Long: `rotate seals a new random master seed to the TPM and makes it current: put,
seal and import use it from then on. The previous master stays in the ring
and keeps opening its records until keyfs master retire. The change of
files is one step: a crash leaves the old ring or the new one.`,
		Args: args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			pcrList, err := tpm.ParsePCRs(pcrs)
			if err != nil {
				return usageError{err}
			}
			old, err := g.publicKey()
			if err != nil {
				return err
			}
			if g.cluster() {
				if _, err := g.checkHoldsCluster(old); err != nil {
					return err
				}
			}
			_, statErr := os.Stat(g.path("master.recovery"))
			escrowed := statErr == nil
			switch {
			case recoveryPub != "" && noRecovery:
				return usagef("--recovery-pub and --no-recovery contradict each other")
			case escrowed && recoveryPub == "" && !noRecovery:
				return usagef("the current master is escrowed to a recovery key: pass --recovery-pub FILE to escrow the new one too (or --no-recovery)")
			}
			var recovery *keystore.PublicKey
			if recoveryPub != "" {
				b, err := os.ReadFile(recoveryPub)
				if err != nil {
					return fmt.Errorf("read --recovery-pub: %w", err)
				}
				if recovery, err = keystore.ParseRecoveryPublicKey(b); err != nil {
					return fmt.Errorf("--recovery-pub %s: %w", recoveryPub, err)
				}
			}
			keep, err := g.keepInRing(old.KID)
			if err != nil {
				return err
			}
			seed := make([]byte, keystore.SeedSize)
			defer clear(seed)
			rand.Read(seed)
			m, err := keystore.NewMasterKey(seed)
			if err != nil {
				return err
			}
			defer m.Close()
			var esc []byte
			if recovery != nil {
				if esc, err = keystore.Escrow(recovery, seed); err != nil {
					return err
				}
			}
			if err := g.installMaster(m, seed, pcrList, esc, recovery == nil, keep...); err != nil {
				return err
			}
			g.auditLifecycle(m, audit.Event{Event: "rotate", KID: m.KID(), Reason: fmt.Sprintf("kid %s -> %s", old.KID, m.KID())})
			if g.cluster() {
				if err := g.publishRotation(old, m); err != nil {
					return err
				}
			}
			fmt.Fprintf(os.Stderr, "keyfs: new master key %s; %s stays in the ring and opens its records. Next: keyfs master reseal, then keyfs master retire %s\n",
				m.KID(), old.KID, old.KID)
			fmt.Fprintln(g.stdout, m.KID())
			return nil
		},
	}
	c.Flags().StringVar(&pcrs, "pcrs", "", "bind the new seal to these sha256 PCRs")
	c.Flags().StringVar(&recoveryPub, "recovery-pub", "", "escrow the new seed to this recovery public key file")
	c.Flags().BoolVar(&noRecovery, "no-recovery", false, "do not escrow the new seed (the current master was escrowed)")
	return c
}

func masterResealCmd(g *globals) *cobra.Command {
	var from, out string
	c := &cobra.Command{
		Use:   "reseal [--from DIR -o DIR]",
		Short: "Re-encrypt every record to the newest master, keeping versions and values",
		Long: `reseal re-encrypts each stored record version that is sealed to an older
master of the ring to the current one, in place: same tenant, name,
version and value, so readers see no change (the daemon picks up the
current master by itself). With --from DIR -o DIR it does the same for the
record files (*.rec) in DIR, written to another directory, for records
kept in Git.`,
		Args: args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			if (from == "") != (out == "") {
				return usagef("--from and -o go together")
			}
			if g.cluster() && from == "" {
				return g.resealCluster()
			}
			pub, err := g.publicKey()
			if err != nil {
				return err
			}
			ring, err := g.unseal()
			if err != nil {
				return err
			}
			defer ring.Close()
			if from != "" {
				return resealFiles(ring, pub, from, out)
			}
			d, err := g.store()
			if err != nil {
				return err
			}
			ts, err := d.Tenants()
			if err != nil {
				return err
			}
			n, same := 0, 0
			var evs []audit.Event
			defer func() { g.auditLifecycle(ring, evs...) }() // what was resealed, also on an error
			for _, t := range ts {
				es, err := d.AllVersions(t)
				if err != nil {
					return err
				}
				for _, e := range es {
					r, err := d.Read(e)
					if err != nil {
						return err
					}
					if r.KID == pub.KID {
						same++
						continue
					}
					nr, err := keystore.Reseal(ring, pub, r)
					if err != nil {
						return fmt.Errorf("%s/%s version %d: %w", e.Tenant, e.Name, e.Version, err)
					}
					if err := d.Replace(nr); err != nil {
						return err
					}
					evs = append(evs, audit.Event{Time: time.Now().UTC(), Event: "reseal", Tenant: e.Tenant, Key: e.Name, Version: e.Version, KID: pub.KID,
						Reason: fmt.Sprintf("kid %s -> %s", r.KID, pub.KID)})
					n++
				}
			}
			fmt.Fprintf(os.Stderr, "keyfs: resealed %d record versions to master key %s (%d already were)\n", n, pub.KID, same)
			return nil
		},
	}
	c.Flags().StringVar(&from, "from", "", "reseal the record files in this directory instead of the store")
	c.Flags().StringVarP(&out, "output", "o", "", "with --from: write the resealed files here")
	return c
}

// resealFiles reseals the *.rec files of dir into out (same names); files
// already sealed to pub are copied.
func resealFiles(ring *keystore.MasterKey, pub *keystore.PublicKey, dir, out string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.rec"))
	if err != nil {
		return err
	}
	if len(files) == 0 {
		return fmt.Errorf("%w: no *.rec files in %s", fs.ErrNotExist, dir)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	n := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		r, err := keystore.ParseRecord(b)
		if err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		text := b
		if r.KID != pub.KID {
			nr, err := keystore.Reseal(ring, pub, r)
			if err != nil {
				return fmt.Errorf("%s: %w", f, err)
			}
			text = nr.Marshal()
			n++
		}
		dst := filepath.Join(out, filepath.Base(f))
		if same, _ := os.ReadFile(dst); bytes.Equal(same, text) {
			continue
		}
		if err := keystore.WriteFileAtomic(dst, text, 0o644); err != nil {
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "keyfs: resealed %d of %d record files to master key %s into %s\n", n, len(files), pub.KID, out)
	return nil
}

func masterRetireCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "retire KID",
		Short: "Drop an older master once no stored record is sealed to it",
		Args:  args(cobra.ExactArgs(1)),
		RunE: func(_ *cobra.Command, a []string) error {
			kid := a[0]
			pub, err := g.publicKey()
			if err != nil {
				return err
			}
			if kid == pub.KID {
				return usagef("%s is the current master: rotate first, then reseal, then retire it", kid)
			}
			if g.cluster() {
				return g.retireCluster(kid)
			}
			if _, err := os.Stat(g.path(ringFile(kid, "sealed"))); err != nil {
				return fmt.Errorf("%w: %s is not an older master of this state (keyfs master ls lists them)", keystore.ErrNotFound, kid)
			}
			d, err := g.store()
			if err != nil {
				return err
			}
			recs, err := recordsByKID(d)
			if err != nil {
				return err
			}
			if rs := recs[kid]; len(rs) > 0 {
				shown := rs[:min(len(rs), 5)]
				return fmt.Errorf("%w: %d stored record versions are sealed to %s (%s%s): run keyfs master reseal first",
					keystore.ErrConflict, len(rs), kid, strings.Join(shown, ", "), map[bool]string{true: ", …"}[len(rs) > len(shown)])
			}
			files := []fileset.File{{Name: ringFile(kid, "sealed"), Remove: true}, {Name: ringFile(kid, "pub"), Remove: true}, {Name: ringFile(kid, "recovery"), Remove: true}}
			if err := fileset.Commit(g.state, masterJournal, files); err != nil {
				return err
			}
			g.auditLifecycle(nil, audit.Event{Event: "retire", KID: kid, Reason: "kid " + kid + " retired"})
			fmt.Fprintf(os.Stderr, "keyfs: master key %s retired; records sealed to it no longer open here\n", kid)
			return nil
		},
	}
}
