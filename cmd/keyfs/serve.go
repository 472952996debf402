package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/keyfs/keyfs/driver"
	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/internal/fdhold"
	"github.com/keyfs/keyfs/kubestore"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
)

func serveCmd(g *globals) *cobra.Command {
	var endpoint, nodeID, kubeletDir, regDir, policyPath, defaultRule, metricsAddr, auditPath, holderSocket string
	var allowUnprotected, auditRequired, auditStdout bool
	c := &cobra.Command{
		Use:   "serve",
		Short: "Run the CSI node driver: unseal once, mount a narrowed key view per pod volume",
		Long: `serve unseals the master key once, then serves the CSI Identity and Node
services on --csi-endpoint and registers itself with kubelet (no registrar
sidecar). Each pod volume becomes its own read-only FUSE mount showing only
the tenants the pod's namespace and service account are granted. /healthz
and Prometheus /metrics are served on --metrics-addr. Logs are JSON.`,
		Args: args(cobra.NoArgs),
		RunE: func(c *cobra.Command, _ []string) error {
			if defaultRule != driver.RuleNamespace && defaultRule != driver.RuleNone {
				return usagef("--default-rule %q: want %s or %s", defaultRule, driver.RuleNamespace, driver.RuleNone)
			}
			if nodeID == "" {
				h, err := os.Hostname()
				if err != nil {
					return usagef("--node-id is empty and the hostname is unknown: %v", err)
				}
				nodeID = h
			}
			sock, err := driver.SocketPath(endpoint)
			if err != nil {
				return usageError{err}
			}
			if err := requireRoot("serve"); err != nil {
				return err
			}
			g.log = slog.New(slog.NewJSONHandler(os.Stderr, nil))
			g.node = nodeID
			log := g.log
			w, err := asWorker()
			if err != nil {
				return err
			}
			if w == nil {
				return supervise(log)
			}
			protected, err := hardenProcess(log, "serve", allowUnprotected)
			if err != nil {
				return err
			}
			dm, err := g.startDaemon(daemonAudit{path: auditPath, stdout: auditStdout, required: auditRequired})
			if err != nil {
				return err
			}
			defer dm.close()
			store, key, al := dm.store, dm.key, dm.audit
			pol, err := driver.LoadPolicy(policyPath, defaultRule)
			if err != nil {
				return usageError{fmt.Errorf("--policy %s: %w", policyPath, err)}
			}
			reg := prometheus.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
				prometheus.NewGaugeFunc(prometheus.GaugeOpts{
					Name: "keyfs_insecure_unlocked_memory",
					Help: "1 when the daemon runs with memory it could not lock or protect from dumps (--insecure-allow-unlocked-memory).",
				}, func() float64 {
					if protected {
						return 0
					}
					return 1
				}),
				prometheus.NewCounterFunc(prometheus.CounterOpts{
					Name: "keyfs_audit_write_failures_total",
					Help: "Audit events that could not be written (with --audit-required, their opens failed).",
				}, func() float64 { return float64(al.Failures()) }))
			if x, ok := store.(*kubestore.Index); ok {
				reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
					Name: "keyfs_sealedkeys_refused_total",
					Help: "SealedKey versions refused (malformed, moved, or sealed to another master): each reads as EIO.",
				}, func() float64 { return float64(x.Refused()) }))
			}
			if dm.ready != nil {
				reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
					Name: "keyfs_node_enrolled",
					Help: "1 when this node holds the cluster master key; 0 while it waits for enrollment (keyfs node approve).",
				}, func() float64 {
					if dm.ready() != nil {
						return 0
					}
					return 1
				}))
			}
			// The supervisor holds every volume's connection across a crash
			// of this process, the node's fd holder across a replacement of
			// the pod.
			holders := []driver.Holder{w}
			var remote *fdhold.Remote
			if holderSocket != "" {
				remote = fdhold.Dial(holderSocket, log)
				defer remote.Close()
				holders = append(holders, remote)
			}
			d, err := driver.New(driver.Config{
				Version: version(), NodeID: nodeID, KubeletDir: kubeletDir, StateDir: g.state,
				Store: store, Key: key, Audit: al, AuditRequired: auditRequired, Log: log, Policy: pol, Registry: reg, Ready: dm.ready,
				Holders:     holders,
				LeaveMounts: func() bool { return remote != nil && remote.Connected() },
			})
			if err != nil {
				return err
			}
			defer d.Close()
			if err := d.Restore(); err != nil {
				log.Error("restoring volumes from before the restart", "err", err)
			}
			w.auditRestart(g, al)

			ctx, stop := signal.NotifyContext(c.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			go pol.Watch(ctx, time.Second, log, func() {
				al.Log(g.lifecycleEvent(audit.Event{Event: "policy", Reason: "reloaded " + policyPath}))
			})

			// The CSI socket first: /healthz, /metrics and kubelet's
			// registration say the driver is there only once it is.
			csiLn, err := d.Listen(endpoint)
			if err != nil {
				return err
			}
			ln, err := net.Listen("tcp", metricsAddr)
			if err != nil {
				return fmt.Errorf("--metrics-addr %s: %w", metricsAddr, err)
			}
			mux := http.NewServeMux()
			mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
			mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
				p, err := d.Probe(r.Context(), &csi.ProbeRequest{})
				if err != nil || !p.GetReady().GetValue() {
					http.Error(w, fmt.Sprintf("not ready: %v", err), http.StatusServiceUnavailable)
					return
				}
				fmt.Fprintln(w, "ok")
			})
			hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
			go hs.Serve(ln)
			defer hs.Close()

			if regDir != "" {
				go func() {
					if err := driver.ServeRegistration(ctx, regDir, sock, log); err != nil && ctx.Err() == nil {
						log.Error("kubelet plugin registration stopped; kubelet will not call this driver", "dir", regDir, "err", err)
					}
				}()
			}
			w.Ready()
			log.Info("serving", "driver", driver.DriverName, "version", version(), "node", nodeID, "kid", key.KID(),
				"endpoint", endpoint, "metrics", ln.Addr().String(), "policy", policyPath, "default_rule", defaultRule)
			err = d.Serve(ctx, csiLn)
			log.Info("stopped")
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		},
	}
	c.Flags().StringVar(&endpoint, "csi-endpoint", "unix:///csi/csi.sock", "CSI gRPC endpoint (unix socket)")
	c.Flags().StringVar(&nodeID, "node-id", os.Getenv("NODE_NAME"), "node id for NodeGetInfo (env NODE_NAME, else the hostname)")
	c.Flags().StringVar(&kubeletDir, "kubelet-dir", driver.DefaultKubeletDir, "kubelet root: every target path must be under it")
	c.Flags().StringVar(&regDir, "kubelet-registration-dir", "/var/lib/kubelet/plugins_registry", "kubelet plugin registration directory (empty: do not register)")
	c.Flags().StringVar(&policyPath, "policy", "", "policy file granting tenants to more namespaces or service accounts (reloaded on change)")
	c.Flags().StringVar(&defaultRule, "default-rule", driver.RuleNamespace, "namespace: pods may read the tenant named like their namespace; none: only what the policy grants")
	c.Flags().StringVar(&metricsAddr, "metrics-addr", "127.0.0.1:9810", "address for /healthz and /metrics")
	c.Flags().StringVar(&auditPath, "audit-log", "", "audit log file, or - for stdout (default STATE/audit.log)")
	c.Flags().StringVar(&holderSocket, "holder-socket", "", "socket of the node's fd holder (keyfs hold), which keeps the volumes alive while this pod is replaced")
	c.Flags().BoolVar(&allowUnprotected, insecureMemoryFlag, false, "run even when memory cannot be locked or dumps disabled (secrets may reach swap; shown in /metrics)")
	addEnrollFlags(c, g)
	c.Flags().BoolVar(&auditRequired, "audit-required", false, "fail an open (EIO) whose audit event cannot be written")
	c.Flags().BoolVar(&auditStdout, "audit-stdout", os.Getenv("KUBERNETES_SERVICE_HOST") != "", "also write every audit event to stdout as a JSON line (default: on in a Kubernetes pod)")
	return c
}
