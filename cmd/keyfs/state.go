package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/keyfs/keyfs/internal/fileset"
	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/tpm"
	"golang.org/x/term"
)

// The state directory: master.sealed (TPM blob and SRK pin), master.pub,
// optional master.recovery (escrow), store/ (records), audit.log. The
// master files change together (fileset, journal master.next).
func (g *globals) path(name string) string { return filepath.Join(g.state, name) }

const masterJournal = "master.next"

// settleMaster finishes or undoes a change of master that a crash cut
// short; everything that reads a master file calls it first.
func (g *globals) settleMaster() error {
	if err := fileset.Settle(g.state, masterJournal); err != nil {
		return fmt.Errorf("finish the interrupted change of master key in %s: %w", g.state, err)
	}
	return nil
}

func (g *globals) ensureState() error {
	if err := os.MkdirAll(g.state, 0o700); err != nil {
		return fmt.Errorf("create state directory %s: %w", g.state, err)
	}
	return os.Chmod(g.state, 0o700)
}

func (g *globals) store() (*keystore.Dir, error) {
	if err := g.settleMaster(); err != nil {
		return nil, err
	}
	if _, err := os.Stat(g.path("master.pub")); err != nil {
		return nil, g.noState(err)
	}
	return keystore.OpenDir(g.path("store"))
}

func (g *globals) noState(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("no keyfs state in %s: run `keyfs init` first, or point --state / KEYFS_STATE at it: %w", g.state, err)
	}
	return err
}

// publicKey returns the current master's public key.
func (g *globals) publicKey() (*keystore.PublicKey, error) {
	if err := g.settleMaster(); err != nil {
		return nil, err
	}
	return g.readPublicKey("master.pub")
}

// readPublicKey reads the public key file name of the state directory.
func (g *globals) readPublicKey(name string) (*keystore.PublicKey, error) {
	b, err := os.ReadFile(g.path(name))
	if err != nil {
		return nil, g.noState(err)
	}
	p, err := keystore.ParsePublicKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", g.path(name), err)
	}
	return p, nil
}

// unseal opens the TPM and returns the master key with its ring (the
// older masters a rotation kept); the caller closes it. A master added
// while the key lives (a rotation under a running daemon) is unsealed when
// a record sealed to it is first opened.
func (g *globals) unseal() (*keystore.MasterKey, error) {
	pub, err := g.publicKey()
	if err != nil {
		return nil, err
	}
	t, err := g.openTPM()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	m, err := g.unsealFile(t, "master.sealed", pub.KID)
	if err != nil {
		return nil, err
	}
	older, err := g.ringKIDs()
	if err != nil {
		m.Close()
		return nil, err
	}
	for _, kid := range older {
		o, err := g.unsealFile(t, ringFile(kid, "sealed"), kid)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("older master %s: %w", kid, err)
		}
		m.Add(o)
	}
	m.OnUnknownKID(g.fetchMaster)
	return m, nil
}

// masterFile is the TPM blob of master kid in the state: the current one
// or one of the ring.
func (g *globals) masterFile(kid string) string {
	if p, err := g.publicKey(); err == nil && p.KID == kid {
		return "master.sealed"
	}
	return ringFile(kid, "sealed")
}

// fetchMaster unseals master kid from the state as it is now: the current
// master after a rotation, or an older one of the ring.
func (g *globals) fetchMaster(kid string) (*keystore.MasterKey, error) {
	name := ringFile(kid, "sealed")
	if pub, err := g.publicKey(); err == nil && pub.KID == kid {
		name = "master.sealed"
	} else if _, err := os.Stat(g.path(name)); err != nil {
		return nil, err // not a master of this state
	}
	t, err := g.openTPM()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	m, err := g.unsealFile(t, name, kid)
	if err == nil {
		g.info(fmt.Sprintf("master key %s unsealed: a record sealed to it was opened (a rotation since this process started)", kid))
	}
	return m, err
}

// unsealFile unseals the master seed in the TPM blob file name and checks
// that it derives master kid.
func (g *globals) unsealFile(t *tpm.TPM, name, kid string) (*keystore.MasterKey, error) {
	seed, m, err := g.unsealMaster(t, name, kid)
	clear(seed)
	return m, err
}

// unsealSeed is unsealFile's seed, for wrapping it to another TPM. The
// caller wipes it.
func (g *globals) unsealSeed(t *tpm.TPM, name, kid string) ([]byte, error) {
	seed, m, err := g.unsealMaster(t, name, kid)
	if m != nil {
		m.Close()
	}
	return seed, err
}

// readBlob reads and parses the TPM blob file name of the state.
func (g *globals) readBlob(name string) (*tpm.Blob, error) {
	b, err := os.ReadFile(g.path(name))
	if err != nil {
		return nil, g.noState(err)
	}
	blob, err := tpm.ParseBlob(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %w", g.path(name), keystore.ErrIntegrity, err)
	}
	return blob, nil
}

// unsealMaster unseals the master seed in the TPM blob file name and
// checks that it derives master kid: the seed and the master.
func (g *globals) unsealMaster(t *tpm.TPM, name, kid string) ([]byte, *keystore.MasterKey, error) {
	blob, err := g.readBlob(name)
	if err != nil {
		return nil, nil, err
	}
	unpinned := blob.SRKName == nil
	seed, err := t.Unseal(blob)
	if err != nil {
		return nil, nil, fmt.Errorf("unseal the master key: %w", err)
	}
	if unpinned {
		g.pinSRK(name, blob)
	}
	m, err := keystore.NewMasterKey(seed)
	if err != nil {
		clear(seed)
		return nil, nil, err
	}
	if m.KID() != kid {
		m.Close()
		clear(seed)
		return nil, nil, fmt.Errorf("%w: %s holds kid %s but its public key is kid %s: the state directory mixes two masters; restore both files from the same backup",
			keystore.ErrIntegrity, name, m.KID(), kid)
	}
	return seed, m, nil
}

// pinSRK saves a blob written before SRK pinning with the SRK it just
// unsealed under, so every later unseal checks the TPM's storage key first.
func (g *globals) pinSRK(name string, blob *tpm.Blob) {
	text, err := blob.MarshalText()
	if err == nil {
		err = keystore.WriteFileAtomic(g.path(name), text, 0o600)
	}
	if err != nil {
		g.warn(fmt.Sprintf("%s predates SRK pinning and could not be upgraded (%v); it unseals, but the TPM's storage key is not checked", name, err))
		return
	}
	g.info(fmt.Sprintf("%s predated SRK pinning: it now pins this TPM's storage key %x", name, blob.SRKName))
}

// readValue reads a value from stdin: hidden input on a terminal, else the
// whole stream. One trailing newline is dropped unless keepNewline: `echo`
// adds one, and a newline inside an HTTP header breaks API calls.
func (g *globals) readValue(prompt string, keepNewline bool) ([]byte, error) {
	var v []byte
	if term.IsTerminal(int(g.stdin.Fd())) {
		fmt.Fprintf(os.Stderr, "%s (input hidden): ", prompt)
		b, err := term.ReadPassword(int(g.stdin.Fd()))
		fmt.Fprintln(os.Stderr)
		if err != nil {
			return nil, fmt.Errorf("read value: %w", err)
		}
		v = b
	} else {
		b, err := io.ReadAll(io.LimitReader(g.stdin, keystore.MaxValueSize+2))
		if err != nil {
			return nil, fmt.Errorf("read value from stdin: %w", err)
		}
		v = b
	}
	if !keepNewline {
		if n := len(v); n > 0 && v[n-1] == '\n' {
			v = bytes.TrimSuffix(v[:n-1], []byte("\r"))
		}
	}
	switch {
	case len(v) == 0:
		return nil, fmt.Errorf("%w: the value on stdin is empty: pipe the key in, for example `printf %%s \"$KEY\" | keyfs put acme/openai`", keystore.ErrInvalidValue)
	case len(v) > keystore.MaxValueSize:
		clear(v)
		return nil, fmt.Errorf("%w: the value on stdin is over %d bytes", keystore.ErrInvalidValue, keystore.MaxValueSize)
	}
	return v, nil
}

// installMaster seals seed (the seed of m) to the TPM, proves the blob
// unseals, and replaces master.sealed and master.pub, and with escrow
// master.recovery, as one change: after a crash the old master is whole,
// or the new one is. dropEscrow removes a master.recovery of the old
// master instead.
func (g *globals) installMaster(m *keystore.MasterKey, seed []byte, pcrs []int, escrow []byte, dropEscrow bool, also ...fileset.File) error {
	t, err := g.openTPM()
	if err != nil {
		return err
	}
	defer t.Close()
	blob, err := t.Seal(seed, pcrs)
	if err != nil {
		return fmt.Errorf("seal the master seed: %w", err)
	}
	back, err := t.Unseal(blob)
	if err != nil {
		return fmt.Errorf("check the sealed master seed: %w", err)
	}
	same := bytes.Equal(back, seed)
	clear(back)
	if !same {
		return errors.New("the TPM returned a different seed than it sealed: do not use this TPM")
	}
	sealed, err := blob.MarshalText()
	if err != nil {
		return err
	}
	files := []fileset.File{
		{Name: "master.sealed", Data: sealed, Perm: 0o600},
		{Name: "master.pub", Data: m.Public().Marshal(), Perm: 0o644},
	}
	switch {
	case escrow != nil:
		files = append(files, fileset.File{Name: "master.recovery", Data: escrow, Perm: 0o600})
	case dropEscrow:
		files = append(files, fileset.File{Name: "master.recovery", Remove: true})
	}
	return fileset.Commit(g.state, masterJournal, append(files, also...))
}

// tenantsArg is every tenant in the store, or the one named on the command line.
func tenantsArg(d keyStore, a []string) ([]string, error) {
	if len(a) == 1 {
		return a, keystore.ValidTenant(a[0])
	}
	return d.Tenants()
}

// eachKey reads the newest record of every key of tenants and hands it to
// f with the read error, if any.
func eachKey(d keyStore, tenants []string, f func(keystore.Entry, *keystore.Record, error)) error {
	for _, t := range tenants {
		es, err := d.Keys(t)
		if err != nil {
			return err
		}
		for _, e := range es {
			r, err := d.Read(e)
			f(e, r, err)
		}
	}
	return nil
}

// openTPM opens --tpm, saying so loudly when it protects nothing.
func (g *globals) openTPM() (*tpm.TPM, error) {
	t, err := tpm.Open(g.tpm)
	if err == nil && t.Insecure() {
		g.warn("using the INSECURE in-process TPM simulator (fixed seed); for tests and demos only")
	}
	return t, err
}
