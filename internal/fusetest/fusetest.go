// Package fusetest holds what tests that mount FUSE file systems share.
package fusetest

import (
	"fmt"
	"os"
	"testing"

	"github.com/moby/sys/mountinfo"
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
	msg := fmt.Sprintf("needs root and /dev/fuse (euid %d, %v)", os.Geteuid(), err)
	if os.Getenv("CI") != "" {
		t.Fatal(msg + "; CI is set, so not skipping")
	}
	t.Skip(msg)
}

// Mounted reports whether something is mounted exactly at path. It reads
// the mount table and never touches path, so a dead FUSE mount counts.
func Mounted(path string) bool {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(path))
	return err == nil && len(ms) > 0
}
