package tpm

import (
	"encoding/binary"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// retrying resends commands the TPM did not start, as the Linux kernel
// driver does; swtpm and the simulator leave that to the client. A TPM says
// TPM_RC_RETRY, for one, on the first use of a DA-protected object after
// startup. Resending the same bytes is valid: no session state has moved.
type retrying struct {
	transport.TPMCloser
}

const maxRetries = 10

func (r retrying) Send(cmd []byte) ([]byte, error) {
	delay := 5 * time.Millisecond
	for i := 0; ; i++ {
		rsp, err := r.TPMCloser.Send(cmd)
		if err != nil || i == maxRetries || !notStarted(rsp) {
			return rsp, err
		}
		time.Sleep(delay)
		delay = min(2*delay, 500*time.Millisecond)
	}
}

func notStarted(rsp []byte) bool {
	if len(rsp) < 10 {
		return false
	}
	switch tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])) {
	case tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting:
		return true
	}
	return false
}
