package main

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/keyfs/keyfs/internal/fdhold"
)

// holdCmd is the node's fd holder: the pod that keeps the volumes' FUSE
// connections alive while the keyfs-node pod is replaced. It holds no
// keys, opens no TPM, store or network: only descriptors, for root.
func holdCmd(g *globals) *cobra.Command {
	var socket string
	var orphanAfter time.Duration
	c := &cobra.Command{
		Use:   "hold --socket PATH",
		Short: "Keep the volumes' FUSE connections alive while keyfs serve restarts (the fd-holder DaemonSet)",
		Long: `hold keeps a copy of the FUSE connection of every volume keyfs serve
deposits on --socket, and hands them back to the next keyfs serve, which
takes the volumes over: running pods see a stall instead of errors while
the keyfs pod is replaced. The socket is root's only (0600 in a 0700
directory, and every peer's uid is checked): whoever can collect a
connection can answer its readers. Keep this DaemonSet on
updateStrategy OnDelete; deleting its pod while keyfs serve runs is safe
(keyfs deposits everything again), deleting both at once loses the
volumes of running pods, as without it. When no keyfs has been connected
for --orphan-timeout, the held connections are closed: their readers then
fail instead of waiting for a keyfs that is gone for good.`,
		Args: args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			if socket == "" {
				return usagef("--socket is required")
			}
			if err := requireRoot("hold"); err != nil {
				return err
			}
			g.log = slog.New(slog.NewJSONHandler(os.Stderr, nil))
			log := g.log
			l, err := fdhold.Listen(socket)
			if err != nil {
				return err
			}
			h := &fdhold.Holder{}
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
			go func() {
				s := <-sig
				log.Info("stopping: the connections are keyfs serve's alone now", "signal", s.String(), "held", len(h.Sessions()))
				l.Close()
			}()
			log.Info("holding", "socket", socket, "version", version())
			err = h.ServeListener(l, log, orphanAfter)
			h.Close()
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		},
	}
	c.Flags().StringVar(&socket, "socket", "/run/keyfs-holder/holder.sock", "unix socket keyfs serve --holder-socket connects to")
	c.Flags().DurationVar(&orphanAfter, "orphan-timeout", 10*time.Minute, "close the held connections when no keyfs has been connected this long (their readers then fail instead of hanging); 0: never")
	return c
}
