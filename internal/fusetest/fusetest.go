// Package fusetest holds what tests that mount FUSE file systems share.
package fusetest

import (
	"fmt"
	"os"
	"testing"

	"github.com/moby/sys/mountinfo"

	"github.com/keyfs/keyfs/internal/testenv"
)

// Require skips a test without root or /dev/fuse, unless the CI
// environment variable is set: then it fails, so CI never hides a
// missing dependency.
func Require(t testing.TB) {
	t.Helper()
	_, err := os.Stat("/dev/fuse")
	if err == nil && os.Geteuid() == 0 {
		return
	}
	testenv.Missing(t, fmt.Sprintf("needs root and /dev/fuse (euid %d, %v)", os.Geteuid(), err))
}

// Mounted reports whether something is mounted exactly at path. It reads
// the mount table and never touches path, so a dead FUSE mount counts. A
// mount table it cannot read is an error, never "not mounted".
func Mounted(path string) (bool, error) {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(path))
	if err != nil {
		return false, fmt.Errorf("read the mount table for %s: %w", path, err)
	}
	return len(ms) > 0, nil
}

// MustMounted is Mounted that fails the test on an error.
func MustMounted(t testing.TB, path string) bool {
	t.Helper()
	m, err := Mounted(path)
	if err != nil {
		t.Fatal(err)
	}
	return m
}
