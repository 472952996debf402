package driver

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyfs/keyfs/internal/syncbuf"
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
	var logs syncbuf.Buffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- ServeRegistration(ctx, dir, "unix://"+csiSock, log) }()
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
	if strings.Contains(logs.String(), "registered with kubelet") {
		t.Error("registration logged before kubelet sent a verdict")
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &reg.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), `"level":"INFO","msg":"registered with kubelet"`) {
		t.Errorf("kubelet's acceptance not logged:\n%s", logs.String())
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &reg.RegistrationStatus{PluginRegistered: false, Error: "version mismatch"}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), `"level":"ERROR","msg":"kubelet refused registration","err":"version mismatch"`) {
		t.Errorf("kubelet's refusal not logged with its reason:\n%s", logs.String())
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
