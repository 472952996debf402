package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
)

// testNamespaces are the namespaces the scenarios make pods in.
var testNamespaces = []string{"acme", "intruder", "acme-jobs"}

func ptr[T any](v T) *T { return &v }

// readerPod is a pod of the e2e tools image that mounts a keyfs inline
// volume at /keys and watches files in it (e2etool watch), the way an
// application would use keyfs: hostNetwork (this node has no pod network)
// and pinned to the node (no scheduling needed).
func readerPod(ns, name, tenants, keys string, propagation *corev1.MountPropagationMode, files ...string) *corev1.Pod {
	attrs := map[string]string{"tenants": tenants}
	if keys != "" {
		attrs["keys"] = keys
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": "keyfs-e2e"}},
		Spec: corev1.PodSpec{
			NodeName:                      nodeName,
			HostNetwork:                   true,
			RestartPolicy:                 corev1.RestartPolicyNever,
			AutomountServiceAccountToken:  ptr(false),
			EnableServiceLinks:            ptr(false),
			TerminationGracePeriodSeconds: ptr[int64](2),
			Containers: []corev1.Container{{
				Name:            "app",
				Image:           toolsRef,
				ImagePullPolicy: corev1.PullNever,
				Command:         append([]string{"/e2etool", "watch"}, files...),
				VolumeMounts:    []corev1.VolumeMount{{Name: "keys", MountPath: "/keys", ReadOnly: true, MountPropagation: propagation}},
			}},
			Volumes: []corev1.Volume{{
				Name: "keys",
				VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
					Driver: driverName, ReadOnly: ptr(true), VolumeAttributes: attrs,
				}},
			}},
		},
	}
}

// onNode pins p to node.
func onNode(p *corev1.Pod, node string) *corev1.Pod {
	p.Spec.NodeName = node
	return p
}

// ensureNamespace makes ns and waits for its default service account
// (made by the ServiceAccount controller; pods need it to be admitted).
func (h *harness) ensureNamespace(ctx context.Context, ns string) error {
	_, err := h.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return waitFor(ctx, 30*time.Second, "service account "+ns+"/default", func() (bool, error) {
		_, err := h.kube.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
}

func (h *harness) createPod(ctx context.Context, p *corev1.Pod) (*corev1.Pod, error) {
	if err := h.ensureNamespace(ctx, p.Namespace); err != nil {
		return nil, err
	}
	return h.kube.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
}

// watchLine is one line of e2etool watch (see e2etool/main.go).
type watchLine struct {
	MS     int64  `json:"ms"`
	File   string `json:"file"`
	State  string `json:"state"`
	SHA256 string `json:"sha256"`
	Len    int    `json:"len"`
	Errno  string `json:"errno"`
	Err    string `json:"err"`
	Stall  int64  `json:"stall_ms"`
}

func (l watchLine) Time() time.Time { return time.UnixMilli(l.MS) }

func (l watchLine) String() string {
	switch l.State {
	case "ok":
		if l.Stall > 0 {
			return fmt.Sprintf("reads %d bytes, sha256 %.12s…, after a %d ms stall", l.Len, l.SHA256, l.Stall)
		}
		return fmt.Sprintf("reads %d bytes, sha256 %.12s…", l.Len, l.SHA256)
	case "missing":
		return "ENOENT (no such file)"
	}
	return fmt.Sprintf("%s (%s)", l.Errno, l.Err)
}

// podLines reads the pod's e2etool lines through the API server's log
// endpoint (which kubelet serves).
func (h *harness) podLines(ctx context.Context, p *corev1.Pod) ([]watchLine, error) {
	b, err := h.podLog(ctx, p, "app", false, 0)
	if err != nil {
		return nil, err
	}
	var out []watchLine
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var l watchLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.State != "" {
			out = append(out, l)
		}
	}
	return out, nil
}

// waitLine waits for the pod to log a line satisfying f.
func (h *harness) waitLine(ctx context.Context, p *corev1.Pod, timeout time.Duration, what string, f func(watchLine) bool) (watchLine, error) {
	var found watchLine
	var last []watchLine
	err := waitFor(ctx, timeout, what, func() (bool, error) {
		ls, err := h.podLines(ctx, p)
		if err != nil {
			return false, nil
		}
		last = ls
		for _, l := range ls {
			if f(l) {
				found = l
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil && len(last) > 0 {
		err = fmt.Errorf("%w; last seen: %s", err, last[len(last)-1])
	}
	return found, err
}

// podEvents lists the events about a pod, oldest first.
func (h *harness) podEvents(ctx context.Context, p *corev1.Pod) ([]corev1.Event, error) {
	l, err := h.kube.CoreV1().Events(p.Namespace).List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("involvedObject.uid", string(p.UID)).String(),
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(l.Items, func(i, j int) bool { return l.Items[i].LastTimestamp.Before(&l.Items[j].LastTimestamp) })
	return l.Items, nil
}

// everRan says whether any container of the pod has started.
func everRan(p *corev1.Pod) bool {
	for _, s := range p.Status.ContainerStatuses {
		if s.State.Running != nil || s.State.Terminated != nil || s.LastTerminationState.Terminated != nil || (s.Started != nil && *s.Started) {
			return true
		}
	}
	return false
}

func (h *harness) waitPodGone(ctx context.Context, p *corev1.Pod, timeout time.Duration) error {
	return waitFor(ctx, timeout, "pod "+p.Namespace+"/"+p.Name+" gone", func() (bool, error) {
		_, err := h.kube.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
}

// deleteAllPods deletes the test pods, then the DaemonSets and their pods
// (there is no garbage collector controller to do it), and waits.
func (h *harness) deleteAllPods(ctx context.Context) error {
	del := func(ns string) {
		h.kube.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
	}
	wait := func(nss ...string) error {
		return waitFor(ctx, 60*time.Second, "pods deleted in "+strings.Join(nss, ", "), func() (bool, error) {
			for _, ns := range nss {
				l, err := h.kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
				if err != nil || len(l.Items) > 0 {
					return false, nil
				}
			}
			return true, nil
		})
	}
	for _, ns := range testNamespaces {
		del(ns)
	}
	err := wait(testNamespaces...)
	for _, ds := range []string{keyfsDaemonSet, keyfsHolderDaemonSet} {
		h.kube.AppsV1().DaemonSets(keyfsNamespace).Delete(ctx, ds, metav1.DeleteOptions{})
	}
	del(keyfsNamespace)
	return errors.Join(err, wait(keyfsNamespace))
}

// describePod is a short kubectl describe: phase, container states, events.
func (h *harness) describePod(ctx context.Context, p *corev1.Pod) string {
	if q, err := h.kube.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{}); err == nil {
		p = q
	}
	var b strings.Builder
	fmt.Fprintf(&b, "    pod %s/%s uid %s: phase %s", p.Namespace, p.Name, p.UID, p.Status.Phase)
	for _, s := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
		st, _ := json.Marshal(s.State)
		fmt.Fprintf(&b, "\n      container %s: ready=%v restarts=%d state=%s", s.Name, s.Ready, s.RestartCount, st)
	}
	evs, _ := h.podEvents(ctx, p)
	for _, e := range evs {
		fmt.Fprintf(&b, "\n      event %s %s (x%d): %s", e.Type, e.Reason, e.Count, e.Message)
	}
	return b.String()
}

// dumpDiagnostics prints what a failed run needs for a diagnosis: the
// keyfs DaemonSet pod's logs and kubelet's lines about CSI.
func (h *harness) dumpDiagnostics() {
	fmt.Println("---- diagnostics")
	if h.kube != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		l, err := h.kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
		if err == nil {
			for i := range l.Items {
				fmt.Println(h.describePod(ctx, &l.Items[i]))
			}
		}
		for _, n := range h.nodes {
			p, err := h.dsPodOn(ctx, n)
			if err != nil {
				continue
			}
			for _, c := range []string{"init", "keyfs"} {
				for _, prev := range []bool{false, true} {
					b, err := h.podLog(ctx, p, c, prev, 40)
					if err == nil && len(b) > 0 {
						fmt.Printf("---- keyfs-node on %s: %s container log (previous=%v), last 40 lines\n%s", n, c, prev, b)
					}
				}
			}
		}
	}
	for _, f := range []struct{ log, grep string }{
		{"kubelet", "csi|keyfs|plugin|E[0-9]{4}"}, {"containerd", "level=error"}, {"kube-apiserver", "^E[0-9]{4}"},
		{"node-b-kubelet", "csi|keyfs|plugin|E[0-9]{4}"}, {"node-b-containerd", "level=error"},
		{"kube-scheduler", "^E[0-9]{4}"}, {"kube-controller-manager", "^E[0-9]{4}"},
	} {
		out, _ := command("bash", "-c", fmt.Sprintf("grep -E %q %q | tail -25", f.grep, h.path("logs", f.log+".log")))
		if out != "" {
			fmt.Printf("---- %s.log, last lines matching %s\n%s", f.log, f.grep, out)
		}
	}
	if b, err := os.ReadFile(h.path("logs", "swtpm.log")); err == nil && len(b) > 0 {
		fmt.Printf("---- swtpm.log\n%s\n", b)
	}
}
