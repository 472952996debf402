package driver

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"

	"google.golang.org/grpc"
	reg "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// ServeRegistration answers kubelet's plugin registration for DriverName on
// dir/keyfs.csi.dev-reg.sock (kubelet's plugin watcher finds it there), so
// the DaemonSet needs no node-driver-registrar sidecar. It serves until ctx
// ends and removes the socket then, which tells kubelet the plugin is gone.
// csiEndpoint is the CSI socket: a path, or unix:///path.
func ServeRegistration(ctx context.Context, dir, csiEndpoint string, log *slog.Logger) error {
	sock, err := SocketPath(csiEndpoint)
	if err != nil {
		return err
	}
	path := filepath.Join(dir, DriverName+"-reg.sock")
	l, err := listenUnix(path)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	s := grpc.NewServer()
	reg.RegisterRegistrationServer(s, &registrar{endpoint: sock, log: log})
	log.Info("plugin registration serving", "socket", path)
	return serveUntil(ctx, s, l)
}

type registrar struct {
	reg.UnimplementedRegistrationServer
	endpoint string // a plain path: what kubelet wants
	log      *slog.Logger
}

// GetInfo tells kubelet what the plugin is and where its CSI socket is.
func (r *registrar) GetInfo(context.Context, *reg.InfoRequest) (*reg.PluginInfo, error) {
	r.log.Info("kubelet asked for plugin info", "endpoint", r.endpoint)
	return &reg.PluginInfo{
		Type:              reg.CSIPlugin,
		Name:              DriverName,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

// NotifyRegistrationStatus logs kubelet's verdict: a refusal is the one
// place an operator learns why kubelet will not call the driver.
func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *reg.RegistrationStatus) (*reg.RegistrationStatusResponse, error) {
	if s.GetPluginRegistered() {
		r.log.Info("registered with kubelet")
	} else {
		r.log.Error("kubelet refused registration", "err", s.GetError())
	}
	return &reg.RegistrationStatusResponse{}, nil
}
