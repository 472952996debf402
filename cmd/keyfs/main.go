// Command keyfs seals per-tenant API keys to this node's TPM and serves them
// as read-only files.
package main

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"

	"github.com/keyfs/keyfs/keystore"
	"github.com/keyfs/keyfs/kubestore"
	"github.com/keyfs/keyfs/tpm"
	"github.com/spf13/cobra"
)

// Exit codes, documented in README.md.
const (
	exitOK        = 0
	exitError     = 1 // anything not below
	exitUsage     = 2 // bad flags, arguments, names or values
	exitNotFound  = 3 // no such key, tenant, state or file
	exitTPM       = 4 // TPM missing, not answering, refusing or locked out
	exitIntegrity = 5 // tampered, truncated, foreign or wrong-key data
	exitPerm      = 6 // permission denied / not root
)

// usageError marks a mistake in how keyfs was called.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

func exitCode(err error) int {
	var pcr *tpm.PCRPolicyError
	var ue usageError
	var we workerExit
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &we):
		return we.code
	case errors.As(err, &ue), errors.Is(err, keystore.ErrInvalidName), errors.Is(err, keystore.ErrInvalidValue):
		return exitUsage
	case errors.Is(err, tpm.ErrNoDevice), errors.Is(err, tpm.ErrTimeout), errors.Is(err, tpm.ErrWrongTPM), errors.Is(err, tpm.ErrSRKMismatch),
		errors.Is(err, tpm.ErrLockout), errors.As(err, &pcr):
		return exitTPM
	case errors.Is(err, keystore.ErrIntegrity):
		return exitIntegrity
	case errors.Is(err, keystore.ErrNotFound), errors.Is(err, fs.ErrNotExist):
		return exitNotFound
	case errors.Is(err, fs.ErrPermission), errors.Is(err, errNotRoot):
		return exitPerm
	}
	return exitError
}

var errNotRoot = errors.New("permission denied")

func main() {
	root, g := newRoot()
	err := root.Execute()
	if err != nil && !errors.As(err, new(workerExit)) { // a worker said why
		if g.log != nil {
			g.log.Error("stopped", "err", err)
		} else {
			fmt.Fprintln(os.Stderr, "keyfs:", err)
		}
	}
	os.Exit(exitCode(err))
}

type globals struct {
	state  string
	tpm    string
	stdin  *os.File
	stdout *os.File
	// log is set by the daemons (serve, mount): every line they write,
	// their final error included, goes through it. Other commands write
	// plain "keyfs: ..." lines.
	log *slog.Logger
	// command is the running subcommand ("keyfs put"), for the audit trail.
	command string

	storeKind, kubeconfig, namespace string
	node                             string   // this node's name in the cluster (serve --node-id)
	autoApprove                      []string // EK hashes enrolled without an admin (--auto-approve-ek)
	autoApproveCA                    string   // a CA bundle whose EK certificates enroll without an admin
	kubeClient                       *kubestore.Client
}

// info says what a command did along the way, through the daemon's log
// when there is one.
func (g *globals) info(msg string) {
	if g.log != nil {
		g.log.Info(msg)
		return
	}
	fmt.Fprintln(os.Stderr, "keyfs: "+msg)
}

// warn says something a user must not miss, through the daemon's log when
// there is one.
func (g *globals) warn(msg string) {
	if g.log != nil {
		g.log.Warn(msg)
		return
	}
	fmt.Fprintln(os.Stderr, "keyfs: WARNING: "+msg)
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func newRoot() (*cobra.Command, *globals) {
	g := &globals{stdin: os.Stdin, stdout: os.Stdout}
	root := &cobra.Command{
		Use:   "keyfs",
		Short: "TPM-sealed per-tenant API keys, served as read-only files",
		Long: `keyfs keeps per-tenant API keys encrypted on disk, in Git and in backups,
and serves them as plain files (/keys/<tenant>/<name>) that decrypt on read.
The master key is sealed to this node's TPM. Values are read from stdin,
never from arguments, and are never printed or logged.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version(),
	}
	root.PersistentFlags().StringVar(&g.state, "state", envOr("KEYFS_STATE", "/var/lib/keyfs"), "state directory (env KEYFS_STATE)")
	root.PersistentFlags().StringVar(&g.tpm, "tpm", envOr("KEYFS_TPM", tpm.DefaultDevice), "TPM: a device path, swtpm:HOST:PORT, or sim (test builds only) (env KEYFS_TPM)")
	root.PersistentFlags().StringVar(&g.storeKind, "store", envOr("KEYFS_STORE", storeLocal), "where records live: local (STATE/store) or kubernetes (SealedKey objects) (env KEYFS_STORE)")
	root.PersistentFlags().StringVar(&g.kubeconfig, "kubeconfig", "", "kubeconfig file for --store kubernetes (default: KUBECONFIG, ~/.kube/config, or in-cluster)")
	root.PersistentFlags().StringVar(&g.namespace, "namespace", envOr("KEYFS_NAMESPACE", kubestore.DefaultNamespace), "namespace of the SealedKeys, with --store kubernetes (env KEYFS_NAMESPACE)")
	root.PersistentPreRunE = func(c *cobra.Command, _ []string) error {
		g.command = c.CommandPath()
		return g.checkStore()
	}
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%w (see %s --help)", err, c.CommandPath())}
	})
	root.AddCommand(
		initCmd(g), pubkeyCmd(g), sealCmd(g), putCmd(g), importCmd(g), lsCmd(g), rmCmd(g), verifyCmd(g),
		recoveryKeygenCmd(g), recoverCmd(g), masterCmd(g), auditCmd(g), mountCmd(g), serveCmd(g), holdCmd(g), nodeCmd(g),
	)
	return root, g
}

// args wraps a cobra argument rule so that its errors are usage errors.
func args(rule cobra.PositionalArgs) cobra.PositionalArgs {
	return func(c *cobra.Command, a []string) error {
		if err := rule(c, a); err != nil {
			return usageError{fmt.Errorf("%w: usage: %s", err, c.UseLine())}
		}
		return nil
	}
}
