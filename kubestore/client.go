package kubestore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/keyfs/keyfs/keystore"
)

// DefaultNamespace is where manifests/ put keyfs and its SealedKeys.
const DefaultNamespace = "keyfs-system"

// Config finds the API server: the kubeconfig file given, else KUBECONFIG
// or ~/.kube/config, else the pod's in-cluster service account.
func Config(kubeconfig string) (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = kubeconfig
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("find the Kubernetes API: %w (give --kubeconfig, set KUBECONFIG, or run in a pod)", err)
	}
	return cfg, nil
}

// Client reads and writes keyfs objects; SealedKeys in one namespace.
type Client struct {
	rest      rest.Interface
	namespace string
	timeout   time.Duration

	// One listing serves Tenants, Keys and Read (ls, verify): the
	// namespace's SealedKeys by tenant, records parsed; a write drops it.
	mu     sync.Mutex
	listed map[string][]*SealedKey
}

// New makes a client of cfg for SealedKeys in namespace.
func New(cfg *rest.Config, namespace string) (*Client, error) {
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &GroupVersion
	c.APIPath = "/apis"
	c.NegotiatedSerializer = codecs.WithoutConversion()
	c.ContentType = "application/json"
	if c.UserAgent == "" {
		c.UserAgent = "keyfs"
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return &Client{rest: rc, namespace: namespace, timeout: 30 * time.Second}, nil
}

// Namespace is where the client's SealedKeys live.
func (c *Client) Namespace() string { return c.namespace }

func (c *Client) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), c.timeout)
}

// apiError says what the API refused, wrapping keystore's error kinds.
func apiError(what string, err error) error {
	switch {
	case apierrors.IsNotFound(err):
		return fmt.Errorf("%s: %w: %w", what, keystore.ErrNotFound, err)
	case apierrors.IsForbidden(err):
		return fmt.Errorf("%s: %w (the keyfs-sealedkey-writer ClusterRole in manifests/cluster grants what keyfs put, rm and import need)", what, err)
	case apierrors.IsConflict(err), apierrors.IsAlreadyExists(err):
		return fmt.Errorf("%s: %w: %w", what, keystore.ErrConflict, err)
	case apierrors.IsInvalid(err):
		return fmt.Errorf("%s: %w: %w", what, keystore.ErrIntegrity, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// GetSealedKey returns tenant/name's object.
func (c *Client) GetSealedKey(tenant, name string) (*SealedKey, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	var o SealedKey
	err := c.rest.Get().Namespace(c.namespace).Resource("sealedkeys").Name(ObjectName(tenant, name)).Do(ctx).Into(&o)
	if err != nil {
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("%w: no key %s/%s in namespace %s (keyfs ls --store kubernetes lists what is stored)", keystore.ErrNotFound, tenant, name, c.namespace)
		}
		return nil, apiError("get SealedKey "+ObjectName(tenant, name), err)
	}
	return &o, nil
}

// ListSealedKeys lists every SealedKey of the namespace.
func (c *Client) ListSealedKeys(opts metav1.ListOptions) (*SealedKeyList, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	var l SealedKeyList
	if err := c.rest.Get().Namespace(c.namespace).Resource("sealedkeys").VersionedParams(&opts, parameterCodec).Do(ctx).Into(&l); err != nil {
		return nil, apiError("list SealedKeys in "+c.namespace, err)
	}
	return &l, nil
}

// NewSealedKey is the object holding r, in namespace: what
// `keyfs seal -o yaml` prints and `keyfs put` writes.
func NewSealedKey(namespace string, r *keystore.Record) *SealedKey {
	return &SealedKey{
		TypeMeta: sealedKeyType,
		ObjectMeta: metav1.ObjectMeta{Name: ObjectName(r.Tenant, r.Name), Namespace: namespace,
			Labels: map[string]string{"keyfs.dev/tenant": r.Tenant}},
		Spec: SealedKeySpec{Tenant: r.Tenant, Name: r.Name, Record: string(r.Marshal())},
	}
}

// write stores r as its key's object: created, or replacing old (nil:
// none) only if old is still current.
func (c *Client) write(r *keystore.Record, old *SealedKey) error {
	c.forget()
	ctx, cancel := c.ctx()
	defer cancel()
	o := NewSealedKey(c.namespace, r)
	var err error
	if old == nil {
		err = c.rest.Post().Namespace(c.namespace).Resource("sealedkeys").Body(o).Do(ctx).Error()
	} else {
		o.ResourceVersion = old.ResourceVersion
		err = c.rest.Put().Namespace(c.namespace).Resource("sealedkeys").Name(o.Name).Body(o).Do(ctx).Error()
	}
	if err != nil {
		return apiError("write SealedKey "+o.Name, err)
	}
	return nil
}

// recordOf parses o's record and checks that it belongs where it is stored.
func recordOf(o *SealedKey) (*keystore.Record, error) {
	if o.parsed {
		return o.rec, o.recErr
	}
	if want := ObjectName(o.Spec.Tenant, o.Spec.Name); o.Name != want {
		return nil, fmt.Errorf("%w: SealedKey %s/%s holds %s/%s, whose object is named %s", keystore.ErrIntegrity, o.Namespace, o.Name, o.Spec.Tenant, o.Spec.Name, want)
	}
	r, err := keystore.ParseRecord([]byte(o.Spec.Record))
	if err != nil {
		return nil, fmt.Errorf("SealedKey %s/%s: %w", o.Namespace, o.Name, err)
	}
	if r.Tenant != o.Spec.Tenant || r.Name != o.Spec.Name {
		return nil, fmt.Errorf("%w: SealedKey %s/%s for %s/%s holds the record of %s/%s: records cannot be moved or renamed",
			keystore.ErrIntegrity, o.Namespace, o.Name, o.Spec.Tenant, o.Spec.Name, r.Tenant, r.Name)
	}
	return r, nil
}

// versionOf is o's record version, 0 when it does not parse.
func versionOf(o *SealedKey) uint64 {
	if r, err := recordOf(o); err == nil {
		return r.Version
	}
	return 0
}

// retries bounds the optimistic-concurrency loop of Put and Import:
// another writer won the race this many times in a row.
const retries = 5

// Put seals a new version of tenant/name and stores it: the larger of the
// stored version + 1 and the current Unix time, as the local store does.
func (c *Client) Put(tenant, name string, seal func(version uint64) (*keystore.Record, error)) (*keystore.Record, error) {
	return c.replace(tenant, name, func(old *SealedKey) (*keystore.Record, error) {
		v := uint64(time.Now().Unix())
		if old != nil {
			v = max(v, versionOf(old)+1)
		}
		return seal(v)
	})
}

// Import stores a record sealed elsewhere; its version must be newer than
// the stored one.
func (c *Client) Import(r *keystore.Record) error {
	_, err := c.replace(r.Tenant, r.Name, func(old *SealedKey) (*keystore.Record, error) {
		if old != nil {
			if v := versionOf(old); v >= r.Version {
				return nil, fmt.Errorf("%w: %s/%s already has version %d, not older than the record's %d: seal it again (keyfs seal uses the current time as its version)",
					keystore.ErrConflict, r.Tenant, r.Name, v, r.Version)
			}
		}
		return r, nil
	})
	return err
}

// replace stores next(the stored object, nil if none) as tenant/name's
// object, again from a fresh read while another writer wins the race.
func (c *Client) replace(tenant, name string, next func(old *SealedKey) (*keystore.Record, error)) (*keystore.Record, error) {
	for range retries {
		old, err := c.GetSealedKey(tenant, name)
		if err != nil && !errors.Is(err, keystore.ErrNotFound) {
			return nil, err
		}
		r, err := next(old)
		if err != nil {
			return nil, err
		}
		if err := c.write(r, old); !errors.Is(err, keystore.ErrConflict) {
			return r, err
		}
	}
	return nil, fmt.Errorf("%w: %s/%s changed under %d writes in a row; try again", keystore.ErrConflict, tenant, name, retries)
}

// Create stores r as a new key's object; an error wrapping ErrConflict if
// the key exists. For bulk loads: Put and Import read the stored version
// first.
func (c *Client) Create(r *keystore.Record) error { return c.write(r, nil) }

// Remove deletes tenant/name's object. The API keeps one version per
// key, so all makes no difference: the key is gone.
func (c *Client) Remove(tenant, name string, _ bool) ([]uint64, error) {
	old, err := c.GetSealedKey(tenant, name)
	if err != nil {
		return nil, err
	}
	c.forget()
	ctx, cancel := c.ctx()
	defer cancel()
	pre := metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &old.UID, ResourceVersion: &old.ResourceVersion}}
	if err := c.rest.Delete().Namespace(c.namespace).Resource("sealedkeys").Name(old.Name).Body(&pre).Do(ctx).Error(); err != nil {
		return nil, apiError("delete SealedKey "+old.Name, err)
	}
	return []uint64{versionOf(old)}, nil
}

// Newest names tenant/name's stored version.
func (c *Client) Newest(tenant, name string) (keystore.Entry, error) {
	o, err := c.GetSealedKey(tenant, name)
	if err != nil {
		return keystore.Entry{}, err
	}
	return entryOf(o), nil
}

func entryOf(o *SealedKey) keystore.Entry {
	return keystore.Entry{Tenant: o.Spec.Tenant, Name: o.Spec.Name, Version: versionOf(o), Path: "sealedkeys/" + o.Name}
}

// listing is the namespace's SealedKeys by tenant, listed once and kept
// until a write, each record parsed once.
func (c *Client) listing() (map[string][]*SealedKey, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.listed != nil {
		return c.listed, nil
	}
	l, err := c.ListSealedKeys(metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	byTenant := map[string][]*SealedKey{}
	for i := range l.Items {
		o := &l.Items[i]
		o.rec, o.recErr = recordOf(o)
		o.parsed = true
		byTenant[o.Spec.Tenant] = append(byTenant[o.Spec.Tenant], o)
	}
	c.listed = byTenant
	return byTenant, nil
}

func (c *Client) forget() {
	c.mu.Lock()
	c.listed = nil
	c.mu.Unlock()
}

// Tenants lists the tenants with at least one SealedKey, sorted.
func (c *Client) Tenants() ([]string, error) {
	l, err := c.listing()
	if err != nil {
		return nil, err
	}
	return slices.Sorted(maps.Keys(l)), nil
}

// Keys lists tenant's keys, sorted by name.
func (c *Client) Keys(tenant string) ([]keystore.Entry, error) {
	if err := keystore.ValidTenant(tenant); err != nil {
		return nil, err
	}
	l, err := c.listing()
	if err != nil {
		return nil, err
	}
	var es []keystore.Entry
	for _, o := range l[tenant] {
		es = append(es, entryOf(o))
	}
	slices.SortFunc(es, func(a, b keystore.Entry) int { return strings.Compare(a.Name, b.Name) })
	return es, nil
}

// Read checks and returns the record e names: from the listing that named
// it, else fetched.
func (c *Client) Read(e keystore.Entry) (*keystore.Record, error) {
	var o *SealedKey
	if l, err := c.listing(); err == nil {
		if i := slices.IndexFunc(l[e.Tenant], func(o *SealedKey) bool { return o.Spec.Name == e.Name }); i >= 0 {
			o = l[e.Tenant][i]
		}
	}
	if o == nil {
		var err error
		if o, err = c.GetSealedKey(e.Tenant, e.Name); err != nil {
			return nil, err
		}
	}
	r, err := recordOf(o)
	if err != nil {
		return nil, err
	}
	if r.Version != e.Version {
		return nil, fmt.Errorf("%w: %s/%s version %d was replaced by version %d", keystore.ErrNotFound, e.Tenant, e.Name, e.Version, r.Version)
	}
	return r, nil
}

// Cluster returns the KeyfsCluster; an error wrapping keystore.ErrNotFound
// when no node has bootstrapped one.
func (c *Client) Cluster() (*KeyfsCluster, *keystore.PublicKey, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	var o KeyfsCluster
	if err := c.rest.Get().Resource("keyfsclusters").Name(ClusterName).Do(ctx).Into(&o); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, nil, fmt.Errorf("%w: no KeyfsCluster %q: the first keyfs serve --store kubernetes creates it", keystore.ErrNotFound, ClusterName)
		}
		return nil, nil, apiError("get KeyfsCluster "+ClusterName, err)
	}
	pub, err := keystore.ParsePublicKey([]byte(o.Spec.PublicKey))
	if err != nil {
		return nil, nil, fmt.Errorf("KeyfsCluster %s: %w", ClusterName, err)
	}
	if pub.KID != o.Spec.KID {
		return nil, nil, fmt.Errorf("%w: KeyfsCluster %s says kid %s but holds the public key of kid %s", keystore.ErrIntegrity, ClusterName, o.Spec.KID, pub.KID)
	}
	return &o, pub, nil
}

// KIDs lists the cluster's masters: the current one first, then the older.
func (o *KeyfsCluster) KIDs() []string {
	ks := []string{o.Spec.KID}
	for _, m := range o.Spec.Older {
		ks = append(ks, m.KID)
	}
	return ks
}

// Rotate makes next the cluster master, keeping from (the current one)
// in the ring; it fails if from is no longer current.
func (c *Client) Rotate(from, next *keystore.PublicKey) (*KeyfsCluster, error) {
	o, cur, err := c.Cluster()
	if err != nil {
		return nil, err
	}
	if cur.KID != from.KID {
		return nil, fmt.Errorf("%w: the cluster master is %s, not %s: rotate on a node that holds it", keystore.ErrConflict, cur.KID, from.KID)
	}
	o.Spec.Older = append([]OlderMaster{{KID: o.Spec.KID, PublicKey: o.Spec.PublicKey}}, o.Spec.Older...)
	o.Spec.KID, o.Spec.PublicKey = next.KID, string(next.Marshal())
	return c.updateCluster(o)
}

// Retire drops older master kid from the ring.
func (c *Client) Retire(kid string) (*KeyfsCluster, error) {
	o, _, err := c.Cluster()
	if err != nil {
		return nil, err
	}
	i := slices.IndexFunc(o.Spec.Older, func(m OlderMaster) bool { return m.KID == kid })
	if i < 0 {
		return nil, fmt.Errorf("%w: kid %s is not an older master of the cluster (%v)", keystore.ErrNotFound, kid, o.KIDs())
	}
	o.Spec.Older = slices.Delete(o.Spec.Older, i, i+1)
	return c.updateCluster(o)
}

func (c *Client) updateCluster(o *KeyfsCluster) (*KeyfsCluster, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	var out KeyfsCluster
	if err := c.rest.Put().Resource("keyfsclusters").Name(ClusterName).Body(o).Do(ctx).Into(&out); err != nil {
		return nil, apiError("update KeyfsCluster "+ClusterName, err)
	}
	return &out, nil
}

// Replace swaps the object of r's key for r if it still holds version
// r.Version: a reseal of the same value to another master.
func (c *Client) Replace(r *keystore.Record) error {
	old, err := c.GetSealedKey(r.Tenant, r.Name)
	if err != nil {
		return err
	}
	if v := versionOf(old); v != r.Version {
		return fmt.Errorf("%w: %s/%s is at version %d now, not %d", keystore.ErrConflict, r.Tenant, r.Name, v, r.Version)
	}
	return c.write(r, old)
}

// Bootstrap creates the KeyfsCluster from pub, if none exists. Of nodes
// racing, exactly one creates it; every caller gets the one that won.
func (c *Client) Bootstrap(pub *keystore.PublicKey, node string) (*KeyfsCluster, *keystore.PublicKey, bool, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	o := &KeyfsCluster{
		TypeMeta:   metav1.TypeMeta{APIVersion: GroupVersion.String(), Kind: "KeyfsCluster"},
		ObjectMeta: metav1.ObjectMeta{Name: ClusterName},
		Spec:       KeyfsClusterSpec{KID: pub.KID, PublicKey: string(pub.Marshal()), BootstrapNode: node},
	}
	err := c.rest.Post().Resource("keyfsclusters").Body(o).Do(ctx).Error()
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, nil, false, apiError("create KeyfsCluster "+ClusterName, err)
	}
	got, gotPub, gerr := c.Cluster()
	return got, gotPub, err == nil, gerr
}

// NodeName is this node's name: NODE_NAME (the DaemonSet sets it from
// spec.nodeName), else the host name.
func NodeName() string {
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n
	}
	h, _ := os.Hostname()
	return h
}

// event records a Warning event on o, best effort: what applied a bad
// object sees why in kubectl describe.
func (c *Client) event(o *SealedKey, reason, msg string) {
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	now := metav1.NewTime(time.Now())
	ev := map[string]any{
		"apiVersion": "v1", "kind": "Event",
		"metadata": map[string]any{"generateName": o.Name + ".", "namespace": o.Namespace},
		"involvedObject": map[string]any{"apiVersion": GroupVersion.String(), "kind": "SealedKey", "name": o.Name, "namespace": o.Namespace,
			"uid": string(o.UID), "resourceVersion": o.ResourceVersion},
		"reason": reason, "message": msg, "type": "Warning",
		"source":         map[string]any{"component": "keyfs", "host": NodeName()},
		"firstTimestamp": now, "lastTimestamp": now, "count": 1,
	}
	b, err := json.Marshal(ev)
	if err != nil {
		return
	}
	ctx, cancel := c.ctx()
	defer cancel()
	c.rest.Post().AbsPath("/api/v1/namespaces", o.Namespace, "events").SetHeader("Content-Type", "application/json").Body(b).Do(ctx)
}
