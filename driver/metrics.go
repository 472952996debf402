package driver

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyfs/keyfs/fusefs"
	"github.com/keyfs/keyfs/keystore"
)

type metrics struct {
	publishes, unpublishes prometheus.Counter
	errors, denials        *prometheus.CounterVec
	reads, decryptErrors   *prometheus.CounterVec
	readSeconds            prometheus.Histogram
	mounted                prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, pol *Policy) (*metrics, error) {
	m := &metrics{
		publishes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keyfs_csi_publishes_total", Help: "Volumes published (NodePublishVolume that mounted a view).",
		}),
		unpublishes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "keyfs_csi_unpublishes_total", Help: "Volumes unpublished.",
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keyfs_csi_errors_total", Help: "Failed CSI calls, by reason (denials are counted apart).",
		}, []string{"reason"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keyfs_csi_denials_total", Help: "Publishes refused by the tenant policy, by reason.",
		}, []string{"reason"}),
		reads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keyfs_reads_total", Help: "Key opens served through CSI volumes, by tenant.",
		}, []string{"tenant"}),
		decryptErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keyfs_decrypt_errors_total", Help: "Key opens that failed to read or decrypt the record, by tenant.",
		}, []string{"tenant"}),
		readSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "keyfs_read_duration_seconds",
			Help:    "Time to open (read and decrypt) a key.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 14), // 50µs .. 400ms
		}),
		mounted: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keyfs_csi_mounted_volumes", Help: "Volumes currently mounted by this daemon.",
		}),
	}
	reloads := func(result string, n *atomic.Uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "keyfs_policy_reloads_total", Help: "Policy file changes seen: applied, or rejected (the last good policy stays).",
			ConstLabels: prometheus.Labels{"result": result},
		}, func() float64 { return float64(n.Load()) })
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.publishes, m.unpublishes, m.errors, m.denials, m.reads, m.decryptErrors, m.readSeconds, m.mounted,
			reloads("applied", &pol.applied), reloads("rejected", &pol.rejected)} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// onRead is the fusefs OnRead hook. A key removed meanwhile
// (keystore.ErrNotFound) is not a decrypt error; anything else that kept
// a record from opening is.
func (m *metrics) onRead(tenant string, d time.Duration, err error) {
	m.readSeconds.Observe(d.Seconds())
	switch {
	case err == nil:
		m.reads.WithLabelValues(tenant).Inc()
	case !errors.Is(err, keystore.ErrNotFound) && !errors.Is(err, fusefs.ErrAuditFailed):
		m.decryptErrors.WithLabelValues(tenant).Inc()
	}
}
