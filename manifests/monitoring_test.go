package manifests_test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/keyfs/keyfs/internal/testenv"
)

// exported is every metric keyfs serves on /metrics (driver/metrics.go and
// cmd/keyfs/serve.go); histograms add _bucket, _sum and _count.
var exported = []string{
	"keyfs_csi_publishes_total", "keyfs_csi_unpublishes_total", "keyfs_csi_errors_total", "keyfs_csi_denials_total",
	"keyfs_reads_total", "keyfs_decrypt_errors_total", "keyfs_read_duration_seconds", "keyfs_csi_mounted_volumes",
	"keyfs_policy_reloads_total", "keyfs_insecure_unlocked_memory", "keyfs_audit_write_failures_total",
	"keyfs_sealedkeys_refused_total", "keyfs_node_enrolled", // cluster mode
}

var metricRE = regexp.MustCompile(`\bkeyfs_[a-z_]+`)

func checkMetrics(t *testing.T, where, expr string) {
	t.Helper()
	for _, m := range metricRE.FindAllString(expr, -1) {
		base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(m, "_bucket"), "_sum"), "_count")
		if !slices.Contains(exported, m) && !slices.Contains(exported, base) {
			t.Errorf("%s uses %s, which keyfs does not export", where, m)
		}
	}
}

// TestMonitoringComponent renders the base with the monitoring component,
// checks the alert rules with promtool (syntax, and a unit test per
// alert), and the dashboard's JSON and metric names.
func TestMonitoringComponent(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		testenv.Missing(t, fmt.Sprintf("promtool not found: %v; apt-get install prometheus", err))
	}
	fs := filesys.MakeFsInMemory()
	for _, dir := range []string{".", "base", "monitoring"} {
		des, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, de := range des {
			if de.IsDir() || strings.HasSuffix(de.Name(), ".go") {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, de.Name()))
			if err != nil {
				t.Fatal(err)
			}
			fs.WriteFile(filepath.Join("/base", dir, de.Name()), b)
		}
	}
	fs.WriteFile("/site/kustomization.yaml", []byte("resources: [../base]\ncomponents: [../base/monitoring]\n"))
	rm, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(fs, "/site")
	if err != nil {
		t.Fatalf("render with the monitoring component: %v", err)
	}
	var rule map[string]any
	var dashboard string
	for _, r := range rm.Resources() {
		b, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		switch r.GetKind() {
		case "PrometheusRule":
			if err := yaml.Unmarshal(b, &rule); err != nil {
				t.Fatal(err)
			}
			if r.GetNamespace() != "keyfs-system" {
				t.Errorf("PrometheusRule in namespace %q", r.GetNamespace())
			}
		case "ConfigMap":
			if r.GetName() == "keyfs-dashboard" {
				data, _ := r.GetDataMap()["keyfs.json"]
				dashboard = data
				if r.GetLabels()["grafana_dashboard"] != "1" || r.GetNamespace() != "keyfs-system" {
					t.Errorf("dashboard ConfigMap in %q, labels %v", r.GetNamespace(), r.GetLabels())
				}
			}
		}
	}
	if rule == nil || dashboard == "" {
		t.Fatalf("the component renders no PrometheusRule (%v) or dashboard (%d bytes)", rule != nil, len(dashboard))
	}

	dir := t.TempDir()
	spec, err := yaml.Marshal(rule["spec"])
	if err != nil {
		t.Fatal(err)
	}
	rules := filepath.Join(dir, "rules.yaml")
	os.WriteFile(rules, spec, 0o644)
	checkMetrics(t, "the alert rules", string(spec))
	if out, err := exec.Command(promtool, "check", "rules", rules).CombinedOutput(); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	tests, err := os.ReadFile("monitoring/rules_test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	testFile := filepath.Join(dir, "tests.yaml")
	os.WriteFile(testFile, []byte(strings.ReplaceAll(string(tests), "RULES", rules)), 0o644)
	if out, err := exec.Command(promtool, "test", "rules", testFile).CombinedOutput(); err != nil {
		t.Fatalf("promtool test rules: %v\n%s", err, out)
	}
	// Every alert has its unit test.
	for _, a := range regexp.MustCompile(`alert: (\w+)`).FindAllStringSubmatch(string(spec), -1) {
		if !strings.Contains(string(tests), "alertname: "+a[1]) {
			t.Errorf("alert %s has no promtool unit test", a[1])
		}
	}

	var d struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal([]byte(dashboard), &d); err != nil {
		t.Fatalf("dashboard is not valid JSON: %v", err)
	}
	if len(d.Panels) == 0 {
		t.Fatal("dashboard has no panels")
	}
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, q := range p.Targets {
			checkMetrics(t, "dashboard panel "+p.Title, q.Expr)
		}
	}
}
