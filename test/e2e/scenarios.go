package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyfs/keyfs/internal/audit"
)

type result struct {
	name   string
	ok     bool
	detail string
	took   time.Duration
}

// scenarioState is what one scenario leaves for the next.
type scenarioState struct {
	value  string      // acme/openai's current value
	reader *corev1.Pod // acme/reader, running, watching /keys/acme/openai
	target string      // its volume's target path on the host

	clusterValue string      // acme/openai's value in the API
	readerB      *corev1.Pod // acme/reader-b on node-b, watching /keys/acme/openai
}

const keyFile = "/keys/acme/openai"

var errNoReader = errors.New("no running reader pod (the scenario \"a pod in acme reads its key\" failed)")

func (h *harness) runScenarios(ctx context.Context) {
	if !h.check(ctx, "keyfs deploys from its image and kustomize manifests", h.deploy) {
		return
	}
	h.check(ctx, "a pod in namespace acme reads /keys/acme/openai: exactly the stored value", h.acmeReads)
	h.check(ctx, "keyfs put: the running pod reads the new value within 2 s", h.putShows)
	h.check(ctx, "keyfs rm --all-versions: the file vanishes from the running pod within 2 s", h.rmRemoves)
	h.check(ctx, "the audit log has the reading pod's UID on its open events", h.auditHasPod)
	h.check(ctx, "a pod in namespace intruder asking for tenant acme never starts", h.intruderRefused)
	h.check(ctx, "a policy ConfigMap grant reaches a pod in acme-jobs without restarting keyfs", h.policyGrant)
	h.check(ctx, "deleting the pod unpublishes its volume: no mount, no target directory", h.unpublish)
	h.check(ctx, "running pods read on through every restart of keyfs: 0 failed reads", h.restartSurvival)
}

// check runs one named scenario and prints PASS or FAIL with its detail.
func (h *harness) check(ctx context.Context, name string, f func(context.Context) (string, error)) bool {
	t := time.Now()
	h.logf("RUN   %s", name)
	var detail string
	err := ctx.Err()
	if err == nil {
		detail, err = f(ctx)
	} else {
		err = fmt.Errorf("not run: %w", err)
	}
	r := result{name: name, ok: err == nil, detail: detail, took: time.Since(t)}
	if err != nil {
		r.detail = err.Error()
		if detail != "" {
			r.detail = detail + "\n" + err.Error()
		}
	}
	h.results = append(h.results, r)
	verdict := "PASS"
	if !r.ok {
		verdict = "FAIL"
	}
	h.logf("%s  %s (%s)", verdict, name, r.took.Round(100*time.Millisecond))
	for _, l := range strings.Split(r.detail, "\n") {
		if l != "" {
			fmt.Printf("          %s\n", l)
		}
	}
	return r.ok
}

func (h *harness) summary() (failed bool) {
	pass, fail := 0, 0
	fmt.Println()
	fmt.Printf("cluster start: %s\n", h.clusterStart.Round(100*time.Millisecond))
	fmt.Printf("nodes: %d (%s)\n", len(h.nodes), strings.Join(h.nodes, ", "))
	for _, r := range h.results {
		v := "PASS"
		if r.ok {
			pass++
		} else {
			v = "FAIL"
			fail++
		}
		fmt.Printf("%s  %6.1fs  %s\n", v, r.took.Seconds(), r.name)
		if !r.ok {
			for _, l := range strings.Split(r.detail, "\n") {
				fmt.Printf("                %s\n", l)
			}
		}
	}
	fmt.Printf("total: %s\n", since(h.start))
	fmt.Printf("e2e: %d passed, %d failed\n", pass, fail)
	return fail > 0 || pass == 0
}

func randomValue(what string) string {
	b := make([]byte, 16)
	rand.Read(b)
	return "sk-e2e-" + what + "-" + hex.EncodeToString(b)
}

func sum(v string) string {
	s := sha256.Sum256([]byte(v))
	return hex.EncodeToString(s[:])
}

// keyfs runs the host keyfs binary (the one in the image) on the state
// directory the DaemonSet uses: put seals with master.pub, no TPM needed.
func (h *harness) keyfs(stdin string, args ...string) error {
	_, err := h.runKeyfs(stdin, append([]string{"--state=" + h.stateDir()}, args...)...)
	return err
}

// runKeyfs runs the host keyfs binary and returns its stdout.
func (h *harness) runKeyfs(stdin string, args ...string) (string, error) {
	cmd := exec.Command(h.keyfsBin, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("keyfs %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (h *harness) auditEvents() ([]audit.Event, error) {
	f, err := os.Open(filepath.Join(h.stateDir(), "audit.log"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var evs []audit.Event
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		var e audit.Event
		if json.Unmarshal(sc.Bytes(), &e) == nil {
			evs = append(evs, e)
		}
	}
	return evs, sc.Err()
}

// csiMounts lists the mounts under a pod's CSI volume directory.
func (h *harness) csiMounts(podUID string) []mount {
	return mountsUnder(filepath.Join(h.kubeletDir(), "pods", podUID, "volumes", "kubernetes.io~csi"))
}

func (h *harness) acmeReads(ctx context.Context) (string, error) {
	v := randomValue("acme-openai")
	if err := h.keyfs(v, "put", "acme/openai"); err != nil {
		return "", err
	}
	h.s.value = v
	t := time.Now()
	p, err := h.createPod(ctx, readerPod("acme", "reader", "acme", "openai", nil, keyFile))
	if err != nil {
		return "", err
	}
	l, err := h.waitLine(ctx, p, 120*time.Second, "pod acme/reader reads "+keyFile, func(l watchLine) bool { return l.State == "ok" })
	if err != nil {
		return "", fmt.Errorf("%w\n%s", err, h.describePod(ctx, p))
	}
	if l.SHA256 != sum(v) || l.Len != len(v) {
		return "", fmt.Errorf("the pod read %d bytes with sha256 %s; stored %d bytes with sha256 %s", l.Len, l.SHA256, len(v), sum(v))
	}
	ms := h.csiMounts(string(p.UID))
	if len(ms) != 1 {
		return "", fmt.Errorf("want one mount under the pod's CSI volume directory on the host, found %d: %+v", len(ms), ms)
	}
	h.s.reader, h.s.target = p, ms[0].Point
	return fmt.Sprintf("read %d bytes, sha256 equal to the stored value's, %s after the pod was created\nkubelet's target %s is a %s mount (propagated from the DaemonSet container)",
		l.Len, l.Time().Sub(t).Round(100*time.Millisecond), ms[0].Point, ms[0].FSType), nil
}

// change stores a new value (or removes the key) and times how long the
// running reader pod takes to see it.
func (h *harness) change(ctx context.Context, what string, do func() error, want func(watchLine) bool) (time.Duration, error) {
	if h.s.reader == nil {
		return 0, errNoReader
	}
	if err := do(); err != nil {
		return 0, err
	}
	return h.sees(ctx, h.s.reader, time.Now(), what, want)
}

// sees waits for pod p to log a line satisfying want, logged after done
// (less a second of clock slack), and says how long after done it was.
func (h *harness) sees(ctx context.Context, p *corev1.Pod, done time.Time, what string, want func(watchLine) bool) (time.Duration, error) {
	l, err := h.waitLine(ctx, p, 15*time.Second, what, func(l watchLine) bool { return l.MS >= done.UnixMilli()-1000 && want(l) })
	if err != nil {
		return 0, err
	}
	return max(0, l.Time().Sub(done)), nil
}

func (h *harness) putShows(ctx context.Context) (string, error) {
	v := randomValue("acme-openai-v2")
	d, err := h.change(ctx, "the pod reads the new value", func() error { return h.keyfs(v, "put", "acme/openai") },
		func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(v) })
	if err != nil {
		return "", err
	}
	h.s.value = v
	detail := fmt.Sprintf("the pod read the new value %s after keyfs put returned (the pod polls every 50 ms)", d.Round(10*time.Millisecond))
	if d > 2*time.Second {
		return detail, errors.New("slower than 2 s")
	}
	return detail, nil
}

func (h *harness) rmRemoves(ctx context.Context) (string, error) {
	d, err := h.change(ctx, "the file vanishes", func() error { return h.keyfs("", "rm", "--all-versions", "acme/openai") },
		func(l watchLine) bool { return l.State == "missing" })
	if err != nil {
		return "", err
	}
	detail := fmt.Sprintf("%s vanished (ENOENT) %s after keyfs rm --all-versions returned", keyFile, d.Round(10*time.Millisecond))
	// Put a value back for the scenarios after this one.
	v := randomValue("acme-openai-v3")
	d2, err := h.change(ctx, "the file comes back", func() error { return h.keyfs(v, "put", "acme/openai") },
		func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(v) })
	if err != nil {
		return detail, fmt.Errorf("putting a value back: %w", err)
	}
	h.s.value = v
	detail += fmt.Sprintf("\nput back: readable again after %s", d2.Round(10*time.Millisecond))
	if d > 2*time.Second {
		return detail, errors.New("slower than 2 s")
	}
	return detail, nil
}

func (h *harness) auditHasPod(ctx context.Context) (string, error) {
	if h.s.reader == nil {
		return "", errNoReader
	}
	evs, err := h.auditEvents()
	if err != nil {
		return "", err
	}
	uid := string(h.s.reader.UID)
	counts := map[string]int{}
	var sample audit.Event
	for _, e := range evs {
		if e.PodUID != uid {
			continue
		}
		counts[e.Event]++
		if e.Event == "open" {
			sample = e
		}
	}
	if counts["open"] == 0 {
		return "", fmt.Errorf("no open event with pod_uid %s among %d audit events (events for it by kind: %v)", uid, len(evs), counts)
	}
	if sample.Tenant != "acme" || sample.Key != "openai" || sample.PodNamespace != "acme" || sample.PodName != "reader" {
		return "", fmt.Errorf("open event for pod %s: tenant %q key %q pod %s/%s, want acme, openai, acme/reader", uid, sample.Tenant, sample.Key, sample.PodNamespace, sample.PodName)
	}
	return fmt.Sprintf("%d open events carry pod_uid %s (acme/reader, tenant acme, key openai, version %d, pid %d); events for the pod by kind: %v",
		counts["open"], uid, sample.Version, sample.PID, counts), nil
}

func (h *harness) intruderRefused(ctx context.Context) (string, error) {
	t := time.Now()
	p, err := h.createPod(ctx, readerPod("intruder", "thief", "acme", "", nil, keyFile))
	if err != nil {
		return "", err
	}
	ev, err := h.waitDenied(ctx, p, 60*time.Second)
	if err != nil {
		return "", err
	}
	denied := time.Since(t)
	for _, want := range []string{"intruder", "default", "acme"} {
		if !strings.Contains(ev.Message, want) {
			return "", fmt.Errorf("the refusal does not name %q (namespace, service account and tenant): %s", want, ev.Message)
		}
	}
	// The container must not start, then or later.
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); {
		q, err := h.kube.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return "", err
		}
		if everRan(q) {
			return "", fmt.Errorf("its container started:\n%s", h.describePod(ctx, q))
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	evs, err := h.auditEvents()
	if err != nil {
		return "", err
	}
	var deny *audit.Event
	for i, e := range evs {
		if e.Event == "deny" && e.PodUID == string(p.UID) {
			deny = &evs[i]
		}
	}
	if deny == nil {
		return "", fmt.Errorf("no audit deny event for pod uid %s", p.UID)
	}
	if deny.Tenant != "acme" || deny.PodNamespace != "intruder" {
		return "", fmt.Errorf("audit deny event: tenant %q namespace %q, want acme, intruder", deny.Tenant, deny.PodNamespace)
	}
	return fmt.Sprintf("refused %s after creation; the container never started (checked 5 s more)\nevent %s: %s\naudit: deny, tenant %s, pod %s/%s, reason %q",
		denied.Round(100*time.Millisecond), ev.Reason, clip(ev.Message, 400), deny.Tenant, deny.PodNamespace, deny.PodName, clip(deny.Reason, 200)), nil
}

// waitDenied waits for kubelet's FailedMount event carrying the driver's
// PermissionDenied.
func (h *harness) waitDenied(ctx context.Context, p *corev1.Pod, timeout time.Duration) (corev1.Event, error) {
	var found corev1.Event
	err := waitFor(ctx, timeout, "a FailedMount event with PermissionDenied for "+p.Namespace+"/"+p.Name, func() (bool, error) {
		evs, err := h.podEvents(ctx, p)
		if err != nil {
			return false, nil
		}
		for _, e := range evs {
			if e.Reason == "FailedMount" && strings.Contains(e.Message, "PermissionDenied") {
				found = e
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return found, fmt.Errorf("%w\n%s", err, h.describePod(ctx, p))
	}
	return found, nil
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func (h *harness) policyGrant(ctx context.Context) (string, error) {
	ds, err := h.dsPod(ctx)
	if err != nil {
		return "", err
	}
	restarts := restartCount(ds)
	p, err := h.createPod(ctx, readerPod("acme-jobs", "job", "acme", "", nil, keyFile))
	if err != nil {
		return "", err
	}
	if _, err := h.waitDenied(ctx, p, 60*time.Second); err != nil {
		return "", fmt.Errorf("before the grant: %w", err)
	}
	cm, err := h.kube.CoreV1().ConfigMaps(keyfsNamespace).Get(ctx, "keyfs-policy", metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	policy := "tenants:\n  acme:\n    namespaces: [acme-jobs]\n"
	cm.Data["policy.yaml"] = policy
	if _, err := h.kube.CoreV1().ConfigMaps(keyfsNamespace).Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return "", err
	}
	t := time.Now()
	// kubelet rewrites the ConfigMap volume of the DaemonSet pod on its
	// next sync; the harness sees the file on the host.
	policyFile := filepath.Join(h.kubeletDir(), "pods", string(ds.UID), "volumes", "kubernetes.io~configmap", "policy", "policy.yaml")
	var fileAt time.Duration
	var read watchLine
	err = waitFor(ctx, 180*time.Second, "the pod in acme-jobs reads the key", func() (bool, error) {
		if fileAt == 0 {
			if b, err := os.ReadFile(policyFile); err == nil && string(b) == policy {
				fileAt = time.Since(t)
			}
		}
		ls, err := h.podLines(ctx, p)
		if err != nil {
			return false, nil
		}
		for _, l := range ls {
			if l.State == "ok" {
				read = l
				return true, nil
			}
		}
		return false, nil
	})
	detail := ""
	if fileAt > 0 {
		detail = fmt.Sprintf("kubelet rewrote the policy file in the DaemonSet pod's ConfigMap volume %s after the ConfigMap update (Watch strategy, syncFrequency 3s)\n", fileAt.Round(100*time.Millisecond))
	}
	if err != nil {
		return detail, fmt.Errorf("%w\n%s", err, h.describePod(ctx, p))
	}
	if read.SHA256 != sum(h.s.value) {
		return detail, fmt.Errorf("the pod read sha256 %s, want the stored value's %s", read.SHA256, sum(h.s.value))
	}
	after, err := h.kube.CoreV1().Pods(keyfsNamespace).Get(ctx, ds.Name, metav1.GetOptions{})
	if err != nil {
		return detail, fmt.Errorf("the keyfs-node pod %s is gone: %w", ds.Name, err)
	}
	if after.UID != ds.UID || restartCount(after) != restarts {
		return detail, fmt.Errorf("keyfs restarted: pod uid %s→%s, restarts %d→%d", ds.UID, after.UID, restarts, restartCount(after))
	}
	return detail + fmt.Sprintf("the refused pod in acme-jobs read acme/openai %s after the ConfigMap update, with no restart of keyfs-node (uid %s, restarts %d); the rest is kubelet's back-off between mount retries",
		read.Time().Sub(t).Round(100*time.Millisecond), ds.UID, restarts), nil
}

func restartCount(p *corev1.Pod) int32 {
	var n int32
	for _, s := range p.Status.ContainerStatuses {
		n += s.RestartCount
	}
	return n
}

func (h *harness) unpublish(ctx context.Context) (string, error) {
	p, target := h.s.reader, h.s.target
	if p == nil {
		return "", errNoReader
	}
	if !mounted(target) {
		return "", fmt.Errorf("%s is not mounted before the pod is deleted", target)
	}
	t := time.Now()
	if err := h.kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
		return "", err
	}
	h.s.reader = nil
	if err := h.waitPodGone(ctx, p, 60*time.Second); err != nil {
		return "", err
	}
	gone := time.Since(t)
	if err := waitFor(ctx, 30*time.Second, "no mount and no target directory left", func() (bool, error) {
		_, err := os.Lstat(target)
		return len(h.csiMounts(string(p.UID))) == 0 && errors.Is(err, os.ErrNotExist), nil
	}); err != nil {
		return "", fmt.Errorf("%w: mounts %+v", err, h.csiMounts(string(p.UID)))
	}
	clean := time.Since(t)
	evs, _ := h.auditEvents()
	unpub := 0
	for _, e := range evs {
		if e.Event == "unpublish" && e.PodUID == string(p.UID) {
			unpub++
		}
	}
	detail := fmt.Sprintf("pod gone from the API %s after delete; mount and %s gone %s after delete; %d audit unpublish events for the pod",
		gone.Round(100*time.Millisecond), target, clean.Round(100*time.Millisecond), unpub)
	return detail, nil
}
func mounted(p string) bool {
	for _, m := range mountsUnder(p) {
		if m.Point == p {
			return true
		}
	}
	return false
}
