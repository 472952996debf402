// Package testenv says what a test does when this machine lacks what it
// needs: without CI set it skips, with CI set it fails, so CI never hides
// a missing dependency.
package testenv

import (
	"os"
	"testing"
)

// Missing ends t for want of what: a failure under CI, else a skip.
func Missing(t testing.TB, what string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatal(what + " (CI is set, so not skipping)")
	}
	t.Skip(what)
}
