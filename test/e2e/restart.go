package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// restartSurvival runs two reader pods (each polls its key every 50 ms;
// one with the default mount propagation, one with HostToContainer)
// through every way keyfs restarts, and requires that no read fails; it
// reports the longest stall of each. Afterwards a put still reaches a
// running pod and a new pod reads its key.
func (h *harness) restartSurvival(ctx context.Context) (string, error) {
	hostToContainer := corev1.MountPropagationHostToContainer
	readers := []*corev1.Pod{
		readerPod("acme", "survivor", "acme", "", nil, keyFile),
		readerPod("acme", "survivor-h2c", "acme", "", &hostToContainer, keyFile),
	}
	for i, r := range readers {
		p, err := h.createPod(ctx, r)
		if err != nil {
			return "", err
		}
		if _, err := h.waitLine(ctx, p, 120*time.Second, p.Name+" reads its key", func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(h.s.value) }); err != nil {
			return "", fmt.Errorf("%w\n%s", err, h.describePod(ctx, p))
		}
		readers[i] = p
	}
	since := time.Now()
	if err := h.waitHolderConnected(ctx, since.Add(-time.Hour)); err != nil {
		return "", err
	}
	cases := []struct {
		name string
		do   func(context.Context) (string, error)
	}{
		{"kill -9 of the keyfs worker in the DaemonSet container", h.killWorker},
		{"kubectl delete pod of keyfs-node", h.deleteNodePod},
		{"a rolling update of the DaemonSet (a changed pod template)", h.rollNode},
		{"deleting the fd-holder pod, then the keyfs-node pod", h.replaceHolderThenNode},
	}
	var out []string
	for _, c := range cases {
		t := time.Now()
		how, err := c.do(ctx)
		if err != nil {
			return strings.Join(out, "\n"), fmt.Errorf("%s: %w", c.name, err)
		}
		time.Sleep(time.Second) // reads after keyfs is back
		line, err := h.survived(ctx, readers, t)
		out = append(out, fmt.Sprintf("%s (%s): %s", c.name, how, line))
		if err != nil {
			return strings.Join(out, "\n"), fmt.Errorf("%s: %w", c.name, err)
		}
	}
	v := randomValue("acme-openai-after-restarts")
	if err := h.keyfs(v, "put", "acme/openai"); err != nil {
		return strings.Join(out, "\n"), err
	}
	for _, r := range readers {
		if _, err := h.waitLine(ctx, r, 15*time.Second, r.Name+" reads the value put after the restarts", func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(v) }); err != nil {
			return strings.Join(out, "\n"), err
		}
	}
	h.s.value = v
	out = append(out, "a keyfs put after the restarts reached both running pods")
	np, err := h.createPod(ctx, readerPod("acme", "after-restart", "acme", "", nil, keyFile))
	if err != nil {
		return strings.Join(out, "\n"), err
	}
	if _, err := h.waitLine(ctx, np, 120*time.Second, "a pod created after the restarts reads its key", func(l watchLine) bool { return l.State == "ok" && l.SHA256 == sum(v) }); err != nil {
		return strings.Join(out, "\n"), fmt.Errorf("%w\n%s", err, h.describePod(ctx, np))
	}
	out = append(out, "a pod created after the restarts reads its key")
	return strings.Join(out, "\n"), nil
}

// survived checks what the readers saw since t: every read the value,
// none failed. It returns the longest stall.
func (h *harness) survived(ctx context.Context, readers []*corev1.Pod, t time.Time) (string, error) {
	var longest int64
	var bad []string
	for _, r := range readers {
		ls, err := h.podLines(ctx, r)
		if err != nil {
			return "", fmt.Errorf("%s's lines: %w", r.Name, err)
		}
		for _, l := range ls {
			if l.MS < t.UnixMilli() {
				continue
			}
			longest = max(longest, l.Stall)
			if l.State != "ok" || l.SHA256 != sum(h.s.value) {
				bad = append(bad, fmt.Sprintf("%s at +%.2fs: %s", r.Name, l.Time().Sub(t).Seconds(), l))
			}
		}
	}
	line := fmt.Sprintf("longest stall %d ms (reads under 100 ms count as none)", longest)
	if len(bad) > 0 {
		return line, fmt.Errorf("running pods failed reads: %s", strings.Join(bad, "; "))
	}
	return "0 failed reads, " + line, nil
}

// killWorker kills the serving process inside the keyfs-node container;
// its supervisor starts another in the same container.
func (h *harness) killWorker(ctx context.Context) (string, error) {
	before, err := h.dsPod(ctx)
	if err != nil {
		return "", err
	}
	pid, err := workerPID()
	if err != nil {
		return "", err
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return "", err
	}
	t := time.Now()
	var next int
	if err := waitFor(ctx, 30*time.Second, "a new keyfs worker", func() (bool, error) {
		next, _ = workerPID()
		return next != 0 && next != pid, nil
	}); err != nil {
		return "", err
	}
	after, err := h.dsPod(ctx)
	if err != nil {
		return "", err
	}
	if after.UID != before.UID || restartCount(after) != restartCount(before) {
		return "", fmt.Errorf("the container restarted (pod %s→%s, restarts %d→%d): the supervisor should have started the worker", before.UID, after.UID, restartCount(before), restartCount(after))
	}
	return fmt.Sprintf("worker %d killed, worker %d running %s later, same container", pid, next, time.Since(t).Round(10*time.Millisecond)), nil
}

// workerPID finds the keyfs serve worker among the host's processes.
func workerPID() (int, error) {
	procs, _ := filepath.Glob("/proc/[0-9]*/environ")
	for _, p := range procs {
		env, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(env, []byte("\x00KEYFS_WORKER=1\x00")) && !bytes.HasPrefix(env, []byte("KEYFS_WORKER=1\x00")) {
			continue
		}
		dir := filepath.Dir(p)
		cmd, _ := os.ReadFile(filepath.Join(dir, "cmdline"))
		if f := bytes.Split(cmd, []byte{0}); len(f) > 1 && string(f[1]) == "serve" {
			return strconv.Atoi(filepath.Base(dir))
		}
	}
	return 0, errors.New("no keyfs serve worker process on the host")
}

func (h *harness) deleteNodePod(ctx context.Context) (string, error) {
	old, err := h.dsPod(ctx)
	if err != nil {
		return "", err
	}
	t := time.Now()
	if err := h.kube.CoreV1().Pods(keyfsNamespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		return "", err
	}
	return h.waitReplacement(ctx, old.UID, t)
}

func (h *harness) rollNode(ctx context.Context) (string, error) {
	old, err := h.dsPod(ctx)
	if err != nil {
		return "", err
	}
	t := time.Now()
	patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"keyfs.dev/e2e-rollout":"%d"}}}}}`, t.UnixNano())
	if _, err := h.kube.AppsV1().DaemonSets(keyfsNamespace).Patch(ctx, keyfsDaemonSet, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		return "", err
	}
	return h.waitReplacement(ctx, old.UID, t)
}

func (h *harness) replaceHolderThenNode(ctx context.Context) (string, error) {
	l, err := h.kube.CoreV1().Pods(keyfsNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=keyfs-holder"})
	if err != nil || len(l.Items) != 1 {
		return "", fmt.Errorf("want one keyfs-holder pod: %v (%d)", err, len(l.Items))
	}
	old := l.Items[0]
	t := time.Now()
	if err := h.kube.CoreV1().Pods(keyfsNamespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		return "", err
	}
	// keyfs-node notices, reconnects to the new holder and deposits again.
	if err := h.waitHolderConnected(ctx, t); err != nil {
		return "", err
	}
	held := time.Since(t)
	how, err := h.deleteNodePod(ctx)
	return fmt.Sprintf("new holder holding the volumes %s after its pod's delete; then %s", held.Round(100*time.Millisecond), how), err
}

// waitHolderConnected waits for keyfs-node's log line saying it deposited
// its volumes with a holder, after t.
func (h *harness) waitHolderConnected(ctx context.Context, t time.Time) error {
	return waitFor(ctx, 60*time.Second, "keyfs-node connected to the fd holder", func() (bool, error) {
		p, err := h.dsPod(ctx)
		if err != nil {
			return false, nil
		}
		st := metav1.NewTime(t)
		b, err := h.kube.CoreV1().Pods(keyfsNamespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: "keyfs", SinceTime: &st}).DoRaw(ctx)
		return err == nil && bytes.Contains(b, []byte("connected to the fd holder")), nil
	})
}

// waitReplacement waits for a keyfs-node pod other than old to be ready.
func (h *harness) waitReplacement(ctx context.Context, old types.UID, t time.Time) (string, error) {
	err := waitFor(ctx, 180*time.Second, "a replacement keyfs-node pod ready", func() (bool, error) {
		p, err := h.dsPod(ctx)
		if err != nil || p.UID == old {
			return false, nil
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return "", fmt.Errorf("%w%s", err, h.dsPodStatus(ctx))
	}
	ready := time.Since(t)
	if err := h.waitRegistered(ctx, 60*time.Second); err != nil {
		return "", err
	}
	return fmt.Sprintf("replacement ready %s after", ready.Round(100*time.Millisecond)), nil
}
