//go:build !simulator

package tpm

import (
	"strings"
	"testing"
)

func TestNoSimulatorInThisBuild(t *testing.T) {
	_, err := Open("sim")
	if err == nil || !strings.Contains(err.Error(), "rebuild with `go build -tags simulator` (or `make build`) to use the simulator") {
		t.Fatalf("Open(sim) without the simulator tag = %v", err)
	}
}
