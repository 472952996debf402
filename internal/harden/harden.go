// Package harden keeps a process's secrets out of swap and core dumps.
package harden

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrMemoryNotLocked marks a failed mlockall: the process's memory may be
// swapped out. keyfs's daemons refuse to run then, unless told otherwise.
var ErrMemoryNotLocked = errors.New("memory not locked")

// Process disables core dumps and ptrace attach by other users (the
// process becomes non-dumpable), then locks all current and future memory.
// Any error but one wrapping ErrMemoryNotLocked means the process is not
// protected from dumps.
func Process() error {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("disable dumps (prctl PR_SET_DUMPABLE): %w", err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{}); err != nil {
		return fmt.Errorf("disable core files (setrlimit RLIMIT_CORE): %w", err)
	}
	// MCL_ONFAULT (Linux 4.4) locks each page as it is first touched, not
	// every mapping in full when made: the Go runtime maps its heap in
	// 64 MB arenas, which would otherwise all be resident from the start.
	// A page is locked before anything is written to it either way.
	if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT); err != nil {
		hint := ""
		if errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.EPERM) {
			hint = ": raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK"
		}
		return fmt.Errorf("%w: mlockall: %w%s; secrets may reach swap", ErrMemoryNotLocked, err, hint)
	}
	return nil
}
