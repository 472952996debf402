//go:build simulator

package tpm

import (
	"fmt"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"
)

// simSeed fixes the simulator's hierarchy seeds, so blobs sealed by one run
// of a test or demo binary unseal in the next. Anyone can do the same:
// the simulator protects nothing.
const simSeed = 0x6b657966 // "keyf"

func openSimulator() (transport.TPMCloser, error) {
	// One simulator per process: this blocks until a previous one is closed.
	s, err := simulator.GetWithFixedSeedInsecure(simSeed)
	if err != nil {
		return nil, fmt.Errorf("start TPM simulator: %w", err)
	}
	return transport.FromReadWriteCloser(s), nil
}
