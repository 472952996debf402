package driver

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"google.golang.org/grpc"
	reg "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// Registrar answers kubelet's plugin registration (the plugin watcher finds
// its socket in kubelet's plugins_registry directory), so the DaemonSet
// needs no node-driver-registrar sidecar.
type Registrar struct {
	Name     string // DriverName when empty
	Endpoint string // the CSI socket: a path, or unix:///path
	Log      *slog.Logger

	reg.UnimplementedRegistrationServer

	mu     sync.Mutex
	status *reg.RegistrationStatus
}

// ServeRegistration serves kubelet plugin registration for DriverName on
// dir/keyfs.csi.dev-reg.sock until ctx ends.
func ServeRegistration(ctx context.Context, dir, csiEndpointPath string, log *slog.Logger) error {
	return (&Registrar{Endpoint: csiEndpointPath, Log: log}).Serve(ctx, dir)
}

// SocketName is the registration socket's file name in dir.
func (r *Registrar) SocketName() string { return r.name() + "-reg.sock" }

func (r *Registrar) name() string {
	if r.Name == "" {
		return DriverName
	}
	return r.Name
}

func (r *Registrar) log() *slog.Logger {
	if r.Log == nil {
		return slog.Default()
	}
	return r.Log
}

// Serve listens on dir/<name>-reg.sock until ctx ends and removes the
// socket then, which tells kubelet the plugin is gone.
func (r *Registrar) Serve(ctx context.Context, dir string) error {
	if _, err := SocketPath(r.Endpoint); err != nil {
		return err
	}
	path := filepath.Join(dir, r.SocketName())
	l, err := listenUnix(path)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	s := grpc.NewServer()
	reg.RegisterRegistrationServer(s, r)
	r.log().Info("keyfs: plugin registration serving", "socket", path)
	return serveUntil(ctx, s, l)
}

// GetInfo tells kubelet what the plugin is and where its CSI socket is.
func (r *Registrar) GetInfo(context.Context, *reg.InfoRequest) (*reg.PluginInfo, error) {
	ep, _ := SocketPath(r.Endpoint) // kubelet wants a plain path
	r.log().Info("keyfs: kubelet asked for plugin info", "endpoint", ep)
	return &reg.PluginInfo{
		Type:              reg.CSIPlugin,
		Name:              r.name(),
		Endpoint:          ep,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

// NotifyRegistrationStatus records kubelet's verdict.
func (r *Registrar) NotifyRegistrationStatus(_ context.Context, s *reg.RegistrationStatus) (*reg.RegistrationStatusResponse, error) {
	r.mu.Lock()
	r.status = s
	r.mu.Unlock()
	if s.GetPluginRegistered() {
		r.log().Info("keyfs: registered with kubelet")
	} else {
		r.log().Error("keyfs: kubelet refused registration", "err", s.GetError())
	}
	return &reg.RegistrationStatusResponse{}, nil
}

// Status returns kubelet's last registration verdict; ok is false before
// kubelet has sent one.
func (r *Registrar) Status() (registered bool, errMsg string, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.status == nil {
		return false, "", false
	}
	return r.status.GetPluginRegistered(), r.status.GetError(), true
}
