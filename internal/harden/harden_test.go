package harden

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestProcess hardens a child process (it cannot be undone) and checks
// what the kernel reports for it.
func TestProcess(t *testing.T) {
	if os.Getenv("KEYFS_HARDEN_CHILD") != "" {
		child()
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestProcess$")
	cmd.Env = append(os.Environ(), "KEYFS_HARDEN_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	got := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			got[k] = v
		}
	}
	if got["dumpable"] != "0" {
		t.Errorf("dumpable = %q, want 0", got["dumpable"])
	}
	if got["core"] != "0/0" {
		t.Errorf("RLIMIT_CORE = %q, want 0/0", got["core"])
	}
	switch got["err"] {
	case "":
		if n, _ := strconv.Atoi(got["vmlck_kb"]); n <= 0 {
			t.Errorf("VmLck = %q kB, want > 0", got["vmlck_kb"])
		}
	case "not-locked":
		if os.Geteuid() == 0 {
			t.Errorf("mlockall failed as root: %s", got["msg"])
		}
		t.Logf("memory not locked (expected without CAP_IPC_LOCK): %s", got["msg"])
	default:
		t.Errorf("Process: %s", got["msg"])
	}
}

func child() {
	err := Process()
	switch {
	case err == nil:
		fmt.Println("err=")
	case errors.Is(err, ErrMemoryNotLocked):
		fmt.Println("err=not-locked")
	default:
		fmt.Println("err=other")
	}
	if err != nil {
		fmt.Printf("msg=%v\n", err)
	}
	d, _ := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	fmt.Printf("dumpable=%d\n", d)
	var rl unix.Rlimit
	unix.Getrlimit(unix.RLIMIT_CORE, &rl)
	fmt.Printf("core=%d/%d\n", rl.Cur, rl.Max)
	f, _ := os.Open("/proc/self/status")
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmLck:"); ok {
			fmt.Printf("vmlck_kb=%s\n", strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		}
	}
}
