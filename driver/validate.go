package driver

import (
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/keyfs/keyfs/fusefs"
	"github.com/keyfs/keyfs/keystore"
)

// Volume context keys kubelet fills in (CSIDriver podInfoOnMount: true and
// volumeLifecycleModes: [Ephemeral]).
const (
	ctxPrefix         = "csi.storage.k8s.io/"
	ctxEphemeral      = ctxPrefix + "ephemeral"
	ctxPodNamespace   = ctxPrefix + "pod.namespace"
	ctxPodName        = ctxPrefix + "pod.name"
	ctxPodUID         = ctxPrefix + "pod.uid"
	ctxServiceAccount = ctxPrefix + "serviceAccount.name"
)

// Volume attributes a pod may set.
const (
	attrTenants = "tenants"
	attrKeys    = "keys"
	attrUID     = "uid"
	attrGID     = "gid"
	attrMode    = "mode"
)

var knownAttrs = []string{attrTenants, attrKeys, attrUID, attrGID, attrMode}

// podIdentity is the pod a volume serves, as kubelet reported it.
type podIdentity struct {
	Namespace      string `json:"namespace"`
	Name           string `json:"name"`
	UID            string `json:"uid"`
	ServiceAccount string `json:"service_account"`
}

// volumeParams is the parsed, canonical form of a volume's attributes.
type volumeParams struct {
	All      bool     // tenants: "*"
	Tenants  []string // sorted; nil with All
	Keys     []string // sorted; nil = every key
	UID, GID uint32
	Mode     uint32
}

func (p volumeParams) equal(q volumeParams) bool {
	return p.All == q.All && slices.Equal(p.Tenants, q.Tenants) &&
		(p.Keys == nil) == (q.Keys == nil) && slices.Equal(p.Keys, q.Keys) &&
		p.UID == q.UID && p.GID == q.GID && p.Mode == q.Mode
}

// publishRequest is a NodePublishVolumeRequest that passed validation.
type publishRequest struct {
	volumeID string
	target   string
	attrs    map[string]string // the user's attributes, as sent
	pod      podIdentity
	params   volumeParams
}

// validatePublish checks everything that does not depend on policy or on
// what is mounted. Every error is meant for an InvalidArgument status.
func (d *Driver) validatePublish(r *csi.NodePublishVolumeRequest) (*publishRequest, error) {
	vc := r.GetVolumeContext()
	switch {
	case r.GetVolumeId() == "":
		return nil, fmt.Errorf("volume id is required")
	case r.GetTargetPath() == "":
		return nil, fmt.Errorf("target path is required")
	case r.GetVolumeCapability() == nil:
		return nil, fmt.Errorf("volume capability is required: keyfs accepts a mount volume, read-only")
	}
	if err := d.checkTarget(r.GetTargetPath()); err != nil {
		return nil, err
	}
	if err := checkCapability(r.GetVolumeCapability()); err != nil {
		return nil, err
	}
	switch {
	case !r.GetReadonly():
		return nil, fmt.Errorf("keyfs volumes are read-only: set readOnly: true in the pod's csi volume source")
	case vc[ctxEphemeral] != "true":
		return nil, fmt.Errorf("keyfs serves only CSI ephemeral inline volumes (%s=true, CSIDriver volumeLifecycleModes: [Ephemeral]), not persistent volumes", ctxEphemeral)
	}
	pod, err := podFromContext(vc)
	if err != nil {
		return nil, err
	}
	attrs := map[string]string{}
	for k, v := range vc {
		if !strings.HasPrefix(k, ctxPrefix) {
			attrs[k] = v
		}
	}
	params, err := parseAttributes(attrs, pod)
	if err != nil {
		return nil, err
	}
	return &publishRequest{volumeID: r.GetVolumeId(), target: r.GetTargetPath(), attrs: attrs, pod: pod, params: params}, nil
}

// checkTarget accepts only a clean absolute path under the kubelet
// directory, so a request cannot mount or remove anything elsewhere.
func (d *Driver) checkTarget(p string) error {
	switch {
	case !filepath.IsAbs(p):
		return fmt.Errorf("target path %q is not absolute", p)
	case filepath.Clean(p) != p || slices.Contains(strings.Split(p, "/"), ".."):
		return fmt.Errorf("target path %q is not clean: it must have no '..', '.', '//' or trailing '/'", p)
	case !strings.HasPrefix(p, d.kubeletDir+"/"):
		return fmt.Errorf("target path %q is not under the kubelet directory %s", p, d.kubeletDir)
	}
	return nil
}

func checkCapability(c *csi.VolumeCapability) error {
	if c.GetBlock() != nil {
		return fmt.Errorf("block volumes are not supported: keyfs is a mount volume")
	}
	m := c.GetMount()
	if m == nil {
		return fmt.Errorf("volume capability must be a mount volume")
	}
	switch m.GetFsType() {
	case "", "keyfs", "fuse.keyfs":
	default:
		return fmt.Errorf("fsType %q is not supported: leave it empty (keyfs is its own filesystem)", m.GetFsType())
	}
	for _, f := range m.GetMountFlags() {
		if f != "ro" {
			return fmt.Errorf("mount option %q is not supported: keyfs accepts none (ownership and mode come from the uid, gid and mode attributes)", f)
		}
	}
	// Kubelet sends SINGLE_NODE_WRITER for every inline volume, so the
	// readonly flag, not the access mode, is what says read-only.
	if c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_UNKNOWN {
		return fmt.Errorf("volume capability has no access mode")
	}
	return nil
}

func podFromContext(vc map[string]string) (podIdentity, error) {
	pod := podIdentity{
		Namespace:      vc[ctxPodNamespace],
		Name:           vc[ctxPodName],
		UID:            vc[ctxPodUID],
		ServiceAccount: vc[ctxServiceAccount],
	}
	for k, v := range map[string]string{ctxPodNamespace: pod.Namespace, ctxPodName: pod.Name, ctxPodUID: pod.UID, ctxServiceAccount: pod.ServiceAccount} {
		if v == "" {
			return pod, fmt.Errorf("volume context lacks %s: the keyfs CSIDriver object must set podInfoOnMount: true", k)
		}
	}
	if err := validDNSLabel(pod.Namespace); err != nil {
		return pod, fmt.Errorf("pod namespace %q: %v", pod.Namespace, err)
	}
	if err := validDNSSubdomain(pod.ServiceAccount); err != nil {
		return pod, fmt.Errorf("service account %q: %v", pod.ServiceAccount, err)
	}
	return pod, nil
}

// parseAttributes turns a volume's attributes into volumeParams. Defaults:
// the pod's own namespace as tenant, every key, uid 0, gid 0, mode 0444.
func parseAttributes(attrs map[string]string, pod podIdentity) (volumeParams, error) {
	p := volumeParams{Mode: 0o444}
	for k := range attrs {
		if !slices.Contains(knownAttrs, k) {
			return p, fmt.Errorf("unknown volume attribute %q: keyfs accepts %s", k, strings.Join(knownAttrs, ", "))
		}
	}
	if s, ok := attrs[attrTenants]; !ok {
		p.Tenants = []string{pod.Namespace}
	} else if strings.TrimSpace(s) == "*" {
		p.All = true
	} else {
		ts, err := splitList(attrTenants, s, keystore.ValidTenant)
		if err != nil {
			return p, fmt.Errorf("%w (or \"*\" for every tenant the pod is granted)", err)
		}
		p.Tenants = ts
	}
	if s, ok := attrs[attrKeys]; ok {
		ks, err := splitList(attrKeys, s, keystore.ValidKeyName)
		if err != nil {
			return p, err
		}
		p.Keys = ks
	}
	var err error
	if p.UID, err = parseID(attrs, attrUID); err != nil {
		return p, err
	}
	if p.GID, err = parseID(attrs, attrGID); err != nil {
		return p, err
	}
	if s, ok := attrs[attrMode]; ok {
		if p.Mode, err = fusefs.ParseFileMode(s); err != nil {
			return p, err
		}
	}
	return p, nil
}

// splitList parses a comma list, checking each item, sorted and deduplicated.
func splitList(attr, s string, valid func(string) error) ([]string, error) {
	out, err := keystore.SplitNames(s, valid)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", attr, err)
	}
	return out, nil
}

func parseID(attrs map[string]string, attr string) (uint32, error) {
	s, ok := attrs[attr]
	if !ok {
		return 0, nil
	}
	n, err := strconv.ParseUint(s, 10, 31)
	if err != nil {
		return 0, fmt.Errorf("%s %q: want a decimal number 0..2147483647", attr, s)
	}
	return uint32(n), nil
}

func validDNSLabel(s string) error {
	if keystore.ValidTenant(s) != nil {
		return fmt.Errorf("not a DNS-1123 label (1-63 characters of a-z, 0-9 and '-')")
	}
	return nil
}

// validDNSSubdomain is the rule for service account names.
func validDNSSubdomain(s string) error {
	if len(s) > 253 {
		return fmt.Errorf("longer than 253 characters")
	}
	for part := range strings.SplitSeq(s, ".") {
		if validDNSLabel(part) != nil {
			return fmt.Errorf("not a DNS-1123 subdomain (dot-separated labels of a-z, 0-9 and '-')")
		}
	}
	return nil
}
