package tpm

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/google/go-tpm/tpm2"
)

// Errors a user can act on. Match them with errors.Is; the wrapping error
// names the device or address and the underlying TPM response code.
var (
	ErrNoDevice = errors.New("no TPM found")
	ErrTimeout  = errors.New("TPM not answering")
	ErrWrongTPM = errors.New("the key was sealed by a different TPM (or the TPM was cleared); restore with `keyfs recover`")
	ErrLockout  = errors.New("the TPM is in dictionary-attack lockout; wait for the lockout to expire " +
		"(or reset it with the lockout authorization, e.g. `tpm2_dictionarylockout --clear-lockout`) and retry")
)

// ErrSRKMismatch marks a TPM whose storage root key is not the one a blob
// was sealed under. Match it with errors.Is; the error is an *SRKMismatchError.
var ErrSRKMismatch = errors.New("the TPM's storage root key is not the one the key was sealed under")

// SRKMismatchError names the pinned SRK and the one the TPM presented.
// Nothing secret was sent to it.
type SRKMismatchError struct{ Pinned, Got []byte }

func (e *SRKMismatchError) Error() string {
	return fmt.Sprintf("%v: sealed under SRK %x, this TPM presents SRK %x. This is another TPM, a TPM whose owner hierarchy was cleared, "+
		"or something between keyfs and the TPM answering in its place; nothing secret was sent. "+
		"If the TPM was replaced or cleared, restore with `keyfs recover`; otherwise check what sits between keyfs and the TPM",
		ErrSRKMismatch, e.Pinned, e.Got)
}

func (e *SRKMismatchError) Is(target error) bool { return target == ErrSRKMismatch }

// PCRPolicyError reports that Unseal was refused because at least one of the
// PCRs the key is bound to no longer holds the value it had at Seal time.
type PCRPolicyError struct {
	PCRs []int
	err  error // the TPM's response, for errors.Is(err, tpm2.TPMRCPolicyFail)
}

func (e *PCRPolicyError) Error() string {
	return fmt.Sprintf("PCR policy not satisfied: PCRs %s changed since the key was sealed (sha256 bank); "+
		"boot into the state the key was sealed in, or restore with `keyfs recover` and seal again", formatPCRs(e.PCRs))
}

func (e *PCRPolicyError) Unwrap() error { return e.err }

// classify turns a TPM response code into one of the package's errors.
// op names the step ("load", "unseal", ...) for the message.
func classify(op string, pcrs []int, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, tpm2.TPMRCLockout):
		return fmt.Errorf("tpm %s: %w: %w", op, err, ErrLockout)
	case op == "load" && errors.Is(err, tpm2.TPMRCIntegrity):
		// The private part's outer HMAC is keyed by the parent (SRK) seed:
		// another TPM, or a cleared owner hierarchy, cannot verify it.
		return fmt.Errorf("tpm %s: %w: %w", op, err, ErrWrongTPM)
	case op == "unseal" && len(pcrs) > 0 && errors.Is(err, tpm2.TPMRCPolicyFail):
		return &PCRPolicyError{PCRs: append([]int(nil), pcrs...), err: err}
	}
	return fmt.Errorf("tpm %s: %w", op, err)
}

func formatPCRs(pcrs []int) string {
	s := make([]string, len(pcrs))
	for i, p := range pcrs {
		s[i] = strconv.Itoa(p)
	}
	return strings.Join(s, ",")
}
