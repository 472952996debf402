//go:build !simulator

package tpm

import (
	"fmt"

	"github.com/google/go-tpm/tpm2/transport"
)

// The cgo simulator stays out of production binaries.
func openSimulator() (transport.TPMCloser, error) {
	return nil, fmt.Errorf("%w: this keyfs binary has no TPM simulator; "+
		"rebuild with `go build -tags simulator` (or `make build`) to use the simulator", ErrNoDevice)
}
