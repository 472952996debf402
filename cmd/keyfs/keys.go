package main

import (
	"crypto/rand"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/kubestore"
	"github.com/keyfs/keyfs/tpm"
	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"
)

func initCmd(g *globals) *cobra.Command {
	var pcrs, recoveryPub string
	var force, ifMissing bool
	c := &cobra.Command{
		Use:   "init",
		Short: "Create a master key sealed to this node's TPM",
		Long: `init makes a new random master seed, seals it to the TPM (optionally bound
to PCR values) and writes master.sealed and master.pub to the state directory.
With --recovery-pub the seed is also sealed to an offline recovery key
(see keyfs recovery-keygen), so a dead TPM is a restore, not a loss.`,
		Args: args(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			pcrList, err := tpm.ParsePCRs(pcrs)
			if err != nil {
				return usageError{err}
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
			if force && ifMissing {
				return usagef("--force and --if-missing contradict each other")
			}
			if err := g.settleMaster(); err != nil {
				return err
			}
			if _, err := os.Stat(g.path("master.sealed")); err == nil && ifMissing {
				p, err := g.publicKey()
				if err != nil {
					return err
				}
				fmt.Fprintf(os.Stderr, "keyfs: %s already holds master key %s; keeping it\n", g.state, p.KID)
				fmt.Fprintln(g.stdout, p.KID)
				return nil
			}
			if _, err := os.Stat(g.path("master.sealed")); err == nil && !force {
				return fmt.Errorf("%w: %s already holds a master key; records sealed to it would become unreadable. Use --force to replace it", fs.ErrExist, g.state)
			}
			if err := g.ensureState(); err != nil {
				return err
			}
			replaced := ""
			if p, err := g.publicKey(); err == nil {
				replaced = "; replaced kid " + p.KID
			}
			seed := make([]byte, keystore.SeedSize)
			defer clear(seed)
			rand.Read(seed)
			m, err := keystore.NewMasterKey(seed)
			if err != nil {
				return err
			}
			defer m.Close()

			start := time.Now()
			var esc []byte
			if recovery != nil {
				if esc, err = keystore.Escrow(recovery, seed); err != nil {
					return err
				}
			}
			if err := g.installMaster(m, seed, pcrList, esc, recovery == nil); err != nil {
				return err
			}
			how := "pcrs " + pcrs
			if recovery != nil {
				how += ", escrowed to recovery kid " + recovery.KID
			}
			g.auditLifecycle(m, audit.Event{Event: "init", KID: m.KID(), Reason: how + replaced})
			fmt.Fprintf(os.Stderr, "keyfs: master key sealed to the TPM in %s", time.Since(start).Round(time.Millisecond))
			if len(pcrList) > 0 {
				fmt.Fprintf(os.Stderr, " (bound to PCRs %s)", pcrs)
			}
			if recovery != nil {
				fmt.Fprintf(os.Stderr, "; escrowed to recovery key %s", recovery.KID)
			}
			fmt.Fprintln(os.Stderr)
			fmt.Fprintln(g.stdout, m.KID())
			return nil
		},
	}
	c.Flags().StringVar(&pcrs, "pcrs", "", "bind the seal to these sha256 PCRs, e.g. 7 or 7,16")
	c.Flags().StringVar(&recoveryPub, "recovery-pub", "", "also seal the seed to this recovery public key file")
	c.Flags().BoolVar(&force, "force", false, "replace an existing master key")
	c.Flags().BoolVar(&ifMissing, "if-missing", false, "do nothing (and succeed) if a master key exists")
	return c
}

func pubkeyCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "pubkey",
		Short: "Print the master public key (safe to share; keyfs seal uses it)",
		Args:  args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			p, err := g.publicKey()
			if err != nil {
				return err
			}
			_, err = g.stdout.Write(p.Marshal())
			return err
		},
	}
}

func sealCmd(g *globals) *cobra.Command {
	var pubFile, tenant, name, format string
	var version uint64
	var keepNewline, fromCluster bool
	c := &cobra.Command{
		Use:   "seal (--pubkey FILE | --cluster) --tenant T --name N [-o record|yaml]",
		Short: "Seal a value from stdin into a record, offline (no TPM, no state)",
		Long: `seal encrypts a value from stdin to a master public key: a file from
keyfs pubkey, or with --cluster the one KeyfsCluster "default" names (like
kubeseal --fetch-cert). It prints the record (-o record, for keyfs import),
or a SealedKey manifest (-o yaml) for Git and kubectl apply. Both are
ciphertext only.`,
		Args: args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			if (pubFile == "") == !fromCluster || tenant == "" || name == "" {
				return usagef("one of --pubkey and --cluster, and --tenant and --name, are required")
			}
			if format != "record" && format != "yaml" {
				return usagef("-o %q: want record or yaml (to write a file, redirect: keyfs seal ... > FILE)", format)
			}
			if err := keystore.ValidTenant(tenant); err != nil {
				return err
			}
			if err := keystore.ValidKeyName(name); err != nil {
				return err
			}
			var pub *keystore.PublicKey
			if fromCluster {
				c, err := g.kube()
				if err != nil {
					return err
				}
				if _, pub, err = c.Cluster(); err != nil {
					return err
				}
			} else {
				b, err := os.ReadFile(pubFile)
				if err != nil {
					return fmt.Errorf("read --pubkey: %w", err)
				}
				if pub, err = keystore.ParsePublicKey(b); err != nil {
					return fmt.Errorf("--pubkey %s: %w", pubFile, err)
				}
			}
			v, err := g.readValue("value for "+tenant+"/"+name, keepNewline)
			if err != nil {
				return err
			}
			defer clear(v)
			if version == 0 {
				version = uint64(time.Now().Unix())
			}
			r, err := keystore.Seal(pub, tenant, name, version, v)
			if err != nil {
				return err
			}
			out := r.Marshal()
			if format == "yaml" {
				if out, err = yaml.Marshal(kubestore.NewSealedKey(g.namespace, r)); err != nil {
					return err
				}
			}
			_, err = g.stdout.Write(out)
			return err
		},
	}
	c.Flags().StringVar(&pubFile, "pubkey", "", "master public key file (from keyfs pubkey)")
	c.Flags().BoolVar(&fromCluster, "cluster", false, "seal to the cluster master of KeyfsCluster default (needs the Kubernetes API)")
	c.Flags().StringVar(&tenant, "tenant", "", "tenant")
	c.Flags().StringVar(&name, "name", "", "key name")
	c.Flags().StringVarP(&format, "output", "o", "record", "what to print: record (for keyfs import) or yaml (a SealedKey manifest in --namespace)")
	c.Flags().Uint64Var(&version, "version", 0, "record version (default: the current Unix time)")
	c.Flags().BoolVar(&keepNewline, "keep-newline", false, "keep a trailing newline in the value")
	return c
}

func putCmd(g *globals) *cobra.Command {
	var keepNewline bool
	c := &cobra.Command{
		Use:   "put TENANT/NAME",
		Short: "Seal a value from stdin to the master public key and store it (no TPM needed)",
		Long: `put seals the value to master.pub (--store local) or to the cluster master
named by KeyfsCluster "default" (--store kubernetes), and stores it as the
key's next version.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(_ *cobra.Command, a []string) error {
			tenant, name, err := keystore.ParseRef(a[0])
			if err != nil {
				return err
			}
			pub, _, err := g.sealingKey()
			if err != nil {
				return err
			}
			d, err := g.keys()
			if err != nil {
				return err
			}
			v, err := g.readValue("value for "+a[0], keepNewline)
			if err != nil {
				return err
			}
			defer clear(v)
			r, err := d.Put(tenant, name, func(version uint64) (*keystore.Record, error) {
				return keystore.Seal(pub, tenant, name, version, v)
			})
			if err != nil {
				return err
			}
			g.auditLifecycle(nil, audit.Event{Event: "put", Tenant: tenant, Key: name, Version: r.Version, KID: r.KID})
			fmt.Fprintf(os.Stderr, "keyfs: stored %s/%s version %d (%d bytes, kid %s)\n", tenant, name, r.Version, r.Size(), r.KID)
			return nil
		},
	}
	c.Flags().BoolVar(&keepNewline, "keep-newline", false, "keep a trailing newline in the value")
	return c
}

func importCmd(g *globals) *cobra.Command {
	var noVerify bool
	c := &cobra.Command{
		Use:   "import FILE...",
		Short: "Store records made with keyfs seal",
		Long: `import checks every record before storing any: it must parse, be sealed to
this state's master key or an older master of its ring, and (unless
--no-verify) open with the master key unsealed from the TPM. One bad record
stores nothing. With --store kubernetes, a record must be sealed to the
cluster master; it is not opened (the machine importing seldom holds the
master), and a node refuses at read one that does not open.`,
		Args: args(cobra.MinimumNArgs(1)),
		RunE: func(_ *cobra.Command, files []string) error {
			// Records sealed offline to an older master of the ring are
			// accepted while it is in the ring.
			pub, ring, err := g.sealingKey()
			if err != nil {
				return err
			}
			d, err := g.keys()
			if err != nil {
				return err
			}
			var m *keystore.MasterKey
			if !noVerify && !g.cluster() {
				if m, err = g.unseal(); err != nil {
					return fmt.Errorf("%w (to import without checking, use --no-verify)", err)
				}
				defer m.Close()
			}
			var recs []*keystore.Record
			for _, f := range files {
				b, err := os.ReadFile(f)
				if err != nil {
					return err
				}
				r, err := keystore.ParseRecord(b)
				if err != nil {
					return fmt.Errorf("%s: %w", f, err)
				}
				if r.KID != pub.KID && ring[r.KID] == nil {
					return fmt.Errorf("%s: %w", f, &keystore.KIDMismatchError{Record: r.KID, Have: pub.KID, Older: slices.Sorted(maps.Keys(ring))})
				}
				if m != nil {
					v, err := m.Open(r, r.Tenant, r.Name)
					clear(v)
					if err != nil {
						return fmt.Errorf("%s: %w", f, err)
					}
				}
				recs = append(recs, r)
			}
			var evs []audit.Event
			defer func() { g.auditLifecycle(m, evs...) }() // what was stored, also on an error
			for i, r := range recs {
				if err := d.Import(r); err != nil {
					return fmt.Errorf("%s: %w", files[i], err)
				}
				evs = append(evs, audit.Event{Time: time.Now().UTC(), Event: "import", Tenant: r.Tenant, Key: r.Name, Version: r.Version, KID: r.KID,
					Reason: "from " + files[i]})
				fmt.Fprintf(os.Stderr, "keyfs: imported %s/%s version %d\n", r.Tenant, r.Name, r.Version)
			}
			return nil
		},
	}
	c.Flags().BoolVar(&noVerify, "no-verify", false, "skip opening each record with the TPM-held master key")
	return c
}

func lsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "ls [TENANT]",
		Short: "List stored keys: tenant, name, version, kid, created (never values)",
		Args:  args(cobra.MaximumNArgs(1)),
		RunE: func(_ *cobra.Command, a []string) error {
			d, err := g.keys()
			if err != nil {
				return err
			}
			tenants, err := tenantsArg(d, a)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "TENANT\tNAME\tVERSION\tKID\tCREATED")
			n := 0
			err = eachKey(d, tenants, func(e keystore.Entry, r *keystore.Record, err error) {
				if err != nil {
					fmt.Fprintf(w, "%s\t%s\t%d\t?\tunreadable: %v\n", e.Tenant, e.Name, e.Version, err)
					return
				}
				fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", e.Tenant, e.Name, e.Version, r.KID, r.Created.Format(time.RFC3339))
				n++
			})
			if err != nil {
				return err
			}
			if err := w.Flush(); err != nil {
				return err
			}
			if len(a) == 1 && n == 0 {
				return fmt.Errorf("%w: tenant %s has no keys", keystore.ErrNotFound, a[0])
			}
			return nil
		},
	}
}

func rmCmd(g *globals) *cobra.Command {
	var all bool
	c := &cobra.Command{
		Use:   "rm TENANT/NAME",
		Short: "Remove the newest version of a key (the previous kept version becomes current), or all versions",
		Long: `rm removes the newest stored version of a key; the previous kept version
becomes current, and --all-versions removes the key. The Kubernetes store
keeps one version per key (its SealedKey object): rm removes the key.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(_ *cobra.Command, a []string) error {
			tenant, name, err := keystore.ParseRef(a[0])
			if err != nil {
				return err
			}
			d, err := g.keys()
			if err != nil {
				return err
			}
			removed, err := d.Remove(tenant, name, all)
			if err != nil {
				return err
			}
			vs := make([]string, len(removed))
			var evs []audit.Event
			for i, v := range removed {
				vs[i] = fmt.Sprint(v)
				evs = append(evs, audit.Event{Event: "rm", Tenant: tenant, Key: name, Version: v})
			}
			g.auditLifecycle(nil, evs...)
			fmt.Fprintf(os.Stderr, "keyfs: removed %s version %s", a[0], strings.Join(vs, ", "))
			if e, err := d.Newest(tenant, name); err == nil {
				fmt.Fprintf(os.Stderr, "; version %d is now current (use --all-versions to remove the key)", e.Version)
			}
			fmt.Fprintln(os.Stderr)
			return nil
		},
	}
	c.Flags().BoolVar(&all, "all-versions", false, "remove every stored version: the key disappears")
	return c
}

func verifyCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "verify [TENANT]",
		Short: "Open every stored key with the TPM-held master key and report which open (never values)",
		Args:  args(cobra.MaximumNArgs(1)),
		RunE: func(_ *cobra.Command, a []string) error {
			d, err := g.keys()
			if err != nil {
				return err
			}
			tenants, err := tenantsArg(d, a)
			if err != nil {
				return err
			}
			m, err := g.unseal()
			if err != nil {
				return err
			}
			defer m.Close()
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "TENANT\tNAME\tVERSION\tSTATUS")
			var firstErr error
			err = eachKey(d, tenants, func(e keystore.Entry, r *keystore.Record, err error) {
				if err == nil {
					var v []byte
					v, err = m.Open(r, e.Tenant, e.Name)
					clear(v)
				}
				status := "ok"
				if err != nil {
					status = err.Error()
					if firstErr == nil {
						firstErr = fmt.Errorf("%s/%s: %w", e.Tenant, e.Name, err)
					}
				}
				fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", e.Tenant, e.Name, e.Version, status)
			})
			if err != nil {
				return err
			}
			if err := w.Flush(); err != nil {
				return err
			}
			return firstErr
		},
	}
}
