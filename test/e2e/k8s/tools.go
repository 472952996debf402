//go:build tools

// Package k8s only pins, for go mod tidy, the Kubernetes commands the e2e
// harness builds (see ../cluster.go).
package k8s

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
