package proc

import (
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
