package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
)

func nodeCmd(g *globals) *cobra.Command {
	c := &cobra.Command{
		Use:   "node",
		Short: "Cluster nodes' enrollment: list, approve, and this TPM's EK hash",
		Long: `In cluster mode every node's daemon must hold the cluster master key. A node
that does not registers its TPM's endorsement key (EK) in its KeyfsNode and
waits; after keyfs node approve, a node holding the master wraps it to that
EK, and only that TPM can import it. Compare the EK hash keyfs node ls shows
with keyfs node ek on the node before approving.`,
	}
	c.AddCommand(nodeEKCmd(g), nodeLsCmd(g), nodeApproveCmd(g))
	return c
}

func nodeEKCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "ek",
		Short: "Print this TPM's endorsement key hash (what keyfs node approve approves)",
		Args:  args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			t, err := g.openTPM()
			if err != nil {
				return err
			}
			defer t.Close()
			ek, err := t.EK()
			if err != nil {
				return err
			}
			fmt.Fprintln(g.stdout, ek.Hash())
			if ek.Cert == nil {
				g.info("this TPM holds no EK certificate: approve it by its hash")
			}
			return nil
		},
	}
}

func nodeLsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List the KeyfsNodes: node, EK hash, state, since, what it says",
		Args:  args(cobra.NoArgs),
		RunE: func(*cobra.Command, []string) error {
			c, err := g.kube()
			if err != nil {
				return err
			}
			nodes, err := c.ListNodes()
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NODE\tEK HASH\tSTATE\tSINCE\tMESSAGE")
			for _, o := range nodes {
				since := ""
				if o.Status.Since != nil {
					since = o.Status.Since.UTC().Format(time.RFC3339)
				}
				state := o.Status.State
				if state == "" {
					state = "-"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", o.Name, o.Spec.EKHash, state, since, o.Status.Message)
			}
			return w.Flush()
		},
	}
}

func nodeApproveCmd(g *globals) *cobra.Command {
	var ekHash string
	c := &cobra.Command{
		Use:   "approve NODE [--ek-hash HASH]",
		Short: "Approve a node's TPM: a node holding the cluster master then enrolls it",
		Long: `approve records that NODE's TPM, by the EK hash it registered, may receive
the cluster master. Compare the hash printed here with keyfs node ek on that
node, or pass it as --ek-hash to have approve check it.`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(_ *cobra.Command, a []string) error {
			c, err := g.kube()
			if err != nil {
				return err
			}
			o, err := c.Approve(a[0], ekHash)
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "keyfs: approved node %s with EK hash %s; a node holding the cluster master enrolls it within seconds (keyfs node ls)\n", o.Name, o.Spec.ApprovedEKHash)
			return nil
		},
	}
	c.Flags().StringVar(&ekHash, "ek-hash", "", "the EK hash expected (from keyfs node ek on the node)")
	return c
}
