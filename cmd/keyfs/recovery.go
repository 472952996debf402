package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/tpm"
	"github.com/spf13/cobra"
)

func recoveryKeygenCmd(g *globals) *cobra.Command {
	var out string
	c := &cobra.Command{
		Use:   "recovery-keygen -o FILE",
		Short: "Make an offline recovery key pair (FILE, and FILE.pub for keyfs init --recovery-pub)",
		Args:  args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			if out == "" {
				return usagef("-o FILE is required: where to write the recovery private key")
			}
			for _, p := range []string{out, out + ".pub"} {
				if _, err := os.Stat(p); err == nil {
					return fmt.Errorf("%w: %s exists; keyfs never overwrites a recovery key", fs.ErrExist, p)
				}
			}
			k, err := keystore.GenerateRecoveryKey()
			if err != nil {
				return err
			}
			priv, err := k.Marshal()
			if err != nil {
				return err
			}
			defer clear(priv)
			if err := writeNew(out, priv, 0o600); err != nil {
				return err
			}
			if err := writeNew(out+".pub", k.MarshalPublic(), 0o644); err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "keyfs: recovery key %s written to %s (keep it offline) and %s.pub (for keyfs init --recovery-pub)\n", k.Public().KID, out, out)
			return nil
		},
	}
	c.Flags().StringVarP(&out, "output", "o", "", "recovery private key file to create")
	return c
}

// writeNew creates path, refusing to replace anything.
func writeNew(path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func recoverCmd(g *globals) *cobra.Command {
	var keyFile, pcrs string
	c := &cobra.Command{
		Use:   "recover --recovery-key FILE",
		Short: "Reseal the escrowed master seed to this node's TPM (new TPM, rebuilt node)",
		Long: `recover opens master.recovery with the offline recovery key and seals the
master seed to this node's TPM, replacing master.sealed. Every record sealed
to the master key opens again; master.pub does not change.`,
		Args: args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			if keyFile == "" {
				return usagef("--recovery-key FILE is required")
			}
			pcrList, err := tpm.ParsePCRs(pcrs)
			if err != nil {
				return usageError{err}
			}
			if err := g.settleMaster(); err != nil {
				return err
			}
			esc, err := os.ReadFile(g.path("master.recovery"))
			if errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("no %s: this state was initialized without --recovery-pub, so there is nothing to recover from: %w", g.path("master.recovery"), err)
			} else if err != nil {
				return err
			}
			kb, err := os.ReadFile(keyFile)
			if err != nil {
				return fmt.Errorf("read --recovery-key: %w", err)
			}
			k, err := keystore.ParseRecoveryKey(kb)
			clear(kb)
			if err != nil {
				return fmt.Errorf("--recovery-key %s: %w", keyFile, err)
			}
			seed, err := k.OpenEscrow(esc)
			if err != nil {
				return fmt.Errorf("%s: %w", g.path("master.recovery"), err)
			}
			defer clear(seed)
			m, err := keystore.NewMasterKey(seed)
			if err != nil {
				return err
			}
			defer m.Close()
			if pub, err := g.publicKey(); err == nil && pub.KID != m.KID() {
				return fmt.Errorf("%w: master.recovery holds kid %s but master.pub is kid %s: restore both from the same backup", keystore.ErrIntegrity, m.KID(), pub.KID)
			}
			if err := g.installMaster(m, seed, pcrList, nil, false); err != nil {
				return err
			}
			g.auditLifecycle(m, audit.Event{Event: "recover", KID: m.KID(), Reason: "resealed to this TPM with recovery key " + k.Public().KID})
			fmt.Fprintf(os.Stderr, "keyfs: master key %s resealed to this TPM\n", m.KID())
			fmt.Fprintln(g.stdout, m.KID())
			return nil
		},
	}
	c.Flags().StringVar(&keyFile, "recovery-key", "", "recovery private key file (from keyfs recovery-keygen)")
	c.Flags().StringVar(&pcrs, "pcrs", "", "bind the new seal to these sha256 PCRs")
	return c
}
