package main

import (
	"encoding/json"
	"fmt"
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
			var f audit.Filter
			if key != "" {
				t, n, err := keystore.ParseRef(key)
				if err != nil {
					return err
				}
				f.Tenant, f.Key = t, n
			}
			if tenant != "" {
				if err := keystore.ValidTenant(tenant); err != nil {
					return err
				}
				if f.Tenant != "" && f.Tenant != tenant {
					return usagef("--key %s and --tenant %s name different tenants", key, tenant)
				}
				f.Tenant = tenant
			}
			if since > 0 {
				f.Since = time.Now().Add(-since)
			}
			if output != "table" && output != "json" {
				return usagef("-o %q: want table or json", output)
			}
			evs, err := audit.Query(g.path("audit.log"), f)
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
