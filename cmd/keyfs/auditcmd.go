package main

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/keyfs/keyfs/internal/audit"
	"github.com/keyfs/keyfs/keystore"
	"github.com/spf13/cobra"
)

func auditCmd(g *globals) *cobra.Command {
	var key, tenant, output string
	var since time.Duration
	c := &cobra.Command{
		Use:   "audit [--key T/N] [--tenant T] [--since DURATION] [-o table|json]",
		Short: "Show who opened which key: the answer to \"who read this key since it leaked\"",
		Args:  args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			evs, err := g.queryAudit(key, tenant, since, output)
			if err != nil {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(g.stdout)
				for _, e := range evs {
					if err := enc.Encode(e); err != nil {
						return err
					}
				}
				return nil
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "TIME\tEVENT\tKEY\tVERSION\tPID\tUID\tPOD\tREASON")
			for _, e := range evs {
				ref := e.Tenant
				if e.Key != "" {
					ref += "/" + e.Key
				}
				pod := e.PodUID
				if e.PodNamespace != "" {
					pod = e.PodNamespace + "/" + e.PodName
					if e.PodUID != "" {
						pod += " (" + e.PodUID + ")"
					}
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Time.Local().Format(time.DateTime), e.Event, ref,
					blank(e.Version), blank(e.PID), ptr(e.UID), pod, e.Reason)
			}
			return w.Flush()
		},
	}
	c.Flags().StringVar(&key, "key", "", "only this key, TENANT/NAME")
	c.Flags().StringVar(&tenant, "tenant", "", "only this tenant")
	c.Flags().DurationVar(&since, "since", 0, "only events this recent, e.g. 72h")
	c.Flags().StringVarP(&output, "output", "o", "table", "table or json")
	c.AddCommand(auditVerifyCmd(g), auditReportCmd(g))
	return c
}

// queryAudit reads the events that --key, --tenant and --since select,
// after checking them and -o.
func (g *globals) queryAudit(key, tenant string, since time.Duration, output string) ([]audit.Event, error) {
	f, err := filterFlags(key, tenant, since)
	if err != nil {
		return nil, err
	}
	if output != "table" && output != "json" {
		return nil, usagef("-o %q: want table or json", output)
	}
	return audit.Query(g.path("audit.log"), f)
}

// filterFlags parses --key and --tenant into a filter.
func filterFlags(key, tenant string, since time.Duration) (audit.Filter, error) {
	var f audit.Filter
	if key != "" {
		t, n, err := keystore.ParseRef(key)
		if err != nil {
			return f, err
		}
		f.Tenant, f.Key = t, n
	}
	if tenant != "" {
		if err := keystore.ValidTenant(tenant); err != nil {
			return f, err
		}
		if f.Tenant != "" && f.Tenant != tenant {
			return f, usagef("--key %s and --tenant %s name different tenants", key, tenant)
		}
		f.Tenant = tenant
	}
	if since > 0 {
		f.Since = time.Now().Add(-since)
	}
	return f, nil
}

// verifyTrail checks the audit trail's chain and, with the master key
// ring from the TPM, its checkpoints.
func (g *globals) verifyTrail() (*audit.Verified, error) {
	m, err := g.unseal()
	if err != nil {
		return nil, fmt.Errorf("checking audit checkpoints needs the master key: %w", err)
	}
	defer m.Close()
	return audit.Verify(g.path("audit.log"), m.CheckAuditMAC)
}

func auditVerifyCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "verify",
		Short: "Check that the audit trail is what keyfs wrote: every link of its chain and every checkpoint",
		Long: `verify walks the audit trail (rotated files included) and finds an edited,
inserted, deleted or reordered event, a cut tail or a dropped file, and
says where. Checkpoints carry a MAC only the master key can make, so it
unseals the master key with the TPM. It cannot tell what a root user on
the node stopped from being written: only that what was written is intact.`,
		Args: args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			v, err := g.verifyTrail()
			if err != nil {
				return err
			}
			fmt.Fprintf(g.stdout, "%d events in %d files, seq %d to %d, %d checkpoints", v.Events, len(v.Files), v.FirstSeq, v.LastSeq, v.Checkpoints)
			if v.FirstSeq > 1 {
				fmt.Fprintf(g.stdout, " (events before seq %d were rotated out)", v.FirstSeq)
			}
			fmt.Fprintln(g.stdout)
			if v.Unanchored > 0 {
				fmt.Fprintf(g.stdout, "the last %d events come after the last checkpoint (seq %d): a running daemon anchors them within %v\n", v.Unanchored, v.LastCheckpoint, checkpointEvery)
			}
			if v.OK() {
				fmt.Fprintln(g.stdout, "chain intact")
				return nil
			}
			for _, p := range v.Problems {
				fmt.Fprintln(g.stdout, p)
			}
			return fmt.Errorf("%w: the audit trail was altered in %d places (listed above)", keystore.ErrIntegrity, len(v.Problems))
		},
	}
}

// usage is one reader's use of a key, for the impact report.
type usage struct {
	Tenant       string    `json:"tenant"`
	Key          string    `json:"key"`
	PodNamespace string    `json:"pod_namespace,omitempty"`
	PodName      string    `json:"pod_name,omitempty"`
	PodUID       string    `json:"pod_uid,omitempty"`
	Node         string    `json:"node,omitempty"`
	PID          int       `json:"pid,omitempty"`
	UID          *uint32   `json:"uid,omitempty"`
	Versions     []uint64  `json:"versions"`
	Opens        int       `json:"opens"`
	First        time.Time `json:"first"`
	Last         time.Time `json:"last"`
}

func auditReportCmd(g *globals) *cobra.Command {
	var key, tenant, output string
	var since time.Duration
	c := &cobra.Command{
		Use:   "report --key T/N | --tenant T [--since 72h] [-o table|json]",
		Short: "Impact report: every pod, node, process and uid that opened a key, which versions, how often, first and last",
		Args:  args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			if key == "" && tenant == "" {
				return usagef("name the leaked key with --key TENANT/NAME, or --tenant T")
			}
			evs, err := g.queryAudit(key, tenant, since, output)
			if err != nil {
				return err
			}
			chain := "verified"
			if v, err := g.verifyTrail(); err != nil {
				chain = "NOT verified: " + err.Error()
			} else if !v.OK() {
				chain = fmt.Sprintf("NOT intact: %d problems (keyfs audit verify lists them)", len(v.Problems))
			} else if v.Unanchored > 0 {
				chain = fmt.Sprintf("verified up to seq %d; the last %d events are not anchored yet", v.LastCheckpoint, v.Unanchored)
			}
			byReader := map[string]*usage{}
			var order []string
			for _, e := range evs {
				if e.Event != "open" {
					continue
				}
				id := fmt.Sprintf("%s/%s|%s/%s/%s|%s|%d|%s", e.Tenant, e.Key, e.PodNamespace, e.PodName, e.PodUID, e.Node, e.PID, ptr(e.UID))
				u := byReader[id]
				if u == nil {
					u = &usage{Tenant: e.Tenant, Key: e.Key, PodNamespace: e.PodNamespace, PodName: e.PodName, PodUID: e.PodUID, Node: e.Node, PID: e.PID, UID: e.UID, First: e.Time}
					byReader[id] = u
					order = append(order, id)
				}
				u.Opens++
				u.Last = e.Time
				if !slices.Contains(u.Versions, e.Version) {
					u.Versions = append(u.Versions, e.Version)
				}
			}
			if output == "json" {
				us := make([]*usage, 0, len(order))
				for _, id := range order {
					us = append(us, byReader[id])
				}
				return json.NewEncoder(g.stdout).Encode(struct {
					Chain   string   `json:"chain"`
					Readers []*usage `json:"readers"`
				}{chain, us})
			}
			fmt.Fprintf(g.stdout, "audit chain: %s\n", chain)
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "KEY\tPOD\tNODE\tPID\tUID\tVERSIONS\tOPENS\tFIRST\tLAST")
			for _, id := range order {
				u := byReader[id]
				pod := "-"
				if u.PodNamespace != "" || u.PodUID != "" {
					pod = u.PodNamespace + "/" + u.PodName
					if u.PodUID != "" {
						pod += " (" + u.PodUID + ")"
					}
				}
				vs := make([]string, len(u.Versions))
				for i, v := range u.Versions {
					vs[i] = fmt.Sprint(v)
				}
				fmt.Fprintf(w, "%s/%s\t%s\t%s\t%d\t%s\t%s\t%d\t%s\t%s\n", u.Tenant, u.Key, pod, blank(u.Node), u.PID, ptr(u.UID),
					strings.Join(vs, ","), u.Opens, u.First.Local().Format(time.DateTime), u.Last.Local().Format(time.DateTime))
			}
			return w.Flush()
		},
	}
	c.Flags().StringVar(&key, "key", "", "the key, TENANT/NAME")
	c.Flags().StringVar(&tenant, "tenant", "", "every key of this tenant")
	c.Flags().DurationVar(&since, "since", 0, "only opens this recent, e.g. 72h")
	c.Flags().StringVarP(&output, "output", "o", "table", "table or json")
	return c
}

func blank[T comparable](v T) string {
	var zero T
	if v == zero {
		return "-"
	}
	return fmt.Sprint(v)
}

func ptr(p *uint32) string {
	if p == nil {
		return "-"
	}
	return fmt.Sprint(*p)
}
