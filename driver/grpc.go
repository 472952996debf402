package driver

import (
	"context"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Listen makes the CSI socket of endpoint (unix:///path/csi.sock): once it
// returns, kubelet's calls queue until Serve answers them.
func (d *Driver) Listen(endpoint string) (net.Listener, error) {
	path, err := SocketPath(endpoint)
	if err != nil {
		return nil, err
	}
	return listenUnix(path)
}

// Serve serves Identity and Node on l (from Listen) until ctx ends, then
// stops gracefully, giving calls in flight a few seconds, and removes the
// socket.
func (d *Driver) Serve(ctx context.Context, l net.Listener) error {
	defer os.Remove(l.Addr().String())
	s := grpc.NewServer(grpc.UnaryInterceptor(d.interceptor))
	csi.RegisterIdentityServer(s, d)
	csi.RegisterNodeServer(s, d)
	d.log.Info("CSI driver serving", "driver", d.name, "endpoint", l.Addr().String(), "node", d.nodeID)
	return serveUntil(ctx, s, l)
}

func serveUntil(ctx context.Context, s *grpc.Server, l net.Listener) error {
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() { s.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		s.Stop()
		<-stopped
	}
	<-done
	return nil
}

// SocketPath returns the file of a unix endpoint: unix:///p, unix:/p or /p.
func SocketPath(endpoint string) (string, error) {
	p := endpoint
	if rest, ok := strings.CutPrefix(endpoint, "unix://"); ok {
		p = rest
	} else if rest, ok := strings.CutPrefix(endpoint, "unix:"); ok {
		p = rest
	}
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("endpoint %q: want unix:///absolute/path.sock", endpoint)
	}
	return p, nil
}

// listenUnix listens on path, replacing a socket file nobody serves (left
// by a killed daemon) but never another kind of file or a live socket.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	// Whoever can connect can mount views: root (kubelet) only.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// interceptor logs every call with secrets stripped and turns a panic in a
// handler into Internal, so one bad request cannot take the daemon down.
func (d *Driver) interceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
	start := time.Now()
	defer func() {
		if p := recover(); p != nil {
			d.m.errors.WithLabelValues("panic").Inc()
			d.log.Error("panic in CSI handler", "method", info.FullMethod, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			resp, err = nil, status.Errorf(codes.Internal, "internal error in %s (logged by the keyfs daemon)", info.FullMethod)
		}
		level := slog.LevelInfo
		if strings.HasPrefix(info.FullMethod, "/csi.v1.Identity/") || strings.HasSuffix(info.FullMethod, "GetCapabilities") {
			level = slog.LevelDebug // kubelet and probes ask often
		}
		attrs := []any{"method", info.FullMethod, "request", protosanitizer.StripSecrets(req).String(), "duration", time.Since(start)}
		if err != nil {
			level = max(level, slog.LevelWarn)
			attrs = append(attrs, "code", status.Code(err).String(), "err", status.Convert(err).Message())
		}
		d.log.Log(ctx, level, "CSI call", attrs...)
	}()
	return h(ctx, req)
}
