package proc

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"
)

func TestCPU(t *testing.T) {
	before := CPU(os.Getpid())
	for deadline := time.Now().Add(100 * time.Millisecond); time.Now().Before(deadline); {
	}
	if got := CPU(os.Getpid()) - before; got < 50*time.Millisecond {
		t.Errorf("CPU grew %v over 100 ms of spinning", got)
	}
	if s := SelfCPU(); s < 50*time.Millisecond {
		t.Errorf("SelfCPU = %v after spinning", s)
	}
	if CPU(-1) != 0 {
		t.Error("CPU of no process is not 0")
	}
}

func TestFind(t *testing.T) {
	cmd := exec.Command("sleep", "31.415")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if got := Find("sleep", "31.415"); got != cmd.Process.Pid {
		t.Errorf("Find = %d, want %d", got, cmd.Process.Pid)
	}
	if got := Find("no such command line 5b1e"); got != 0 {
		t.Errorf("Find of nothing = %d", got)
	}
}

func TestChild(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 27.18; true") // sh forks sleep
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var got int
	for end := time.Now().Add(5 * time.Second); got == 0 && time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		got = Child(cmd.Process.Pid)
	}
	if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", got)); got == 0 || string(b) != "sleep\x0027.18\x00" {
		t.Errorf("Child = %d (%q), want the sleep sh started", got, b)
	}
	if got := Child(got); got != 0 {
		t.Errorf("Child of the sleep = %d, want 0", got)
	}
}
