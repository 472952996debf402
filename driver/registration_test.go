package driver

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	reg "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// TestRegistration plays kubelet's plugin watcher against the registration
// socket.
func TestRegistration(t *testing.T) {
	dir, err := os.MkdirTemp("", "kfsreg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	csiSock := "/var/lib/kubelet/plugins/keyfs.csi.dev/csi.sock"
	r := &Registrar{Endpoint: "unix://" + csiSock, Log: testLogger(t)}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- r.Serve(ctx, dir) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	sock := filepath.Join(dir, "keyfs.csi.dev-reg.sock")
	waitFor(t, 5*time.Second, "the registration socket", func() bool {
		_, err := os.Stat(sock)
		return err == nil
	})

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := reg.NewRegistrationClient(conn)
	info, err := c.GetInfo(ctx, &reg.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != reg.CSIPlugin || info.Name != "keyfs.csi.dev" || info.Endpoint != csiSock ||
		len(info.SupportedVersions) != 1 || info.SupportedVersions[0] != "1.0.0" {
		t.Errorf("GetInfo = %+v", info)
	}
	if _, _, ok := r.Status(); ok {
		t.Error("status recorded before kubelet sent one")
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &reg.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if ok, msg, got := r.Status(); !got || !ok || msg != "" {
		t.Errorf("Status = %v %q %v, want registered", ok, msg, got)
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &reg.RegistrationStatus{PluginRegistered: false, Error: "version mismatch"}); err != nil {
		t.Fatal(err)
	}
	if ok, msg, _ := r.Status(); ok || msg != "version mismatch" {
		t.Errorf("Status = %v %q, want the refusal recorded", ok, msg)
	}

	cancel()
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	served <- nil
	if _, err := os.Stat(sock); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("registration socket left after stop: %v", err)
	}
}

func TestServeRegistrationRefusesRelativeEndpoint(t *testing.T) {
	err := ServeRegistration(context.Background(), t.TempDir(), "csi.sock", testLogger(t))
	if err == nil {
		t.Fatal("relative CSI endpoint accepted")
	}
}
