package kubestore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	"github.com/keyfs/keyfs/keystore"
)

// Index is a namespace's SealedKeys as a keystore.Store: one informer (a
// list, then one watch) for the whole daemon, whose cache holds each
// record parsed, and a snapshot rebuilt for the tenants each change
// touches.
type Index struct {
	keystore.Published
	c     *Client
	log   *slog.Logger
	inf   cache.SharedIndexInformer
	check func(*keystore.Record) error
	// refused counts SealedKeys whose record was refused (each version once).
	refused atomic.Uint64

	mu    sync.Mutex // guards what follows and orders Publish calls
	dirty map[string]bool
	keys  map[string]indexed // by object name
	err   error              // the watch's last error, until it recovers

	kick   chan struct{}
	cancel context.CancelFunc
	done   chan struct{}
}

type indexed struct {
	rv  string
	key *keystore.Key
}

// tenantIndex indexes the informer's cache by spec.tenant.
const tenantIndex = "tenant"

// syncTimeout bounds the first list: a daemon that cannot list SealedKeys
// says so rather than serving an empty tree.
const syncTimeout = 60 * time.Second

// Watch lists c's SealedKeys and keeps the index current until Close.
// check, if not nil, vets each record (its kid, say) as it arrives: an
// object that does not parse, belongs elsewhere or fails check stays
// listed, so only its own file fails to read (EIO), and is reported once
// per version in the log and as a Kubernetes event naming the object.
//
// onChange, if not nil, hears of every SealedKey added, updated or deleted
// after the first list ("add", "update", "delete"), with the object as
// cached: for the audit trail.
func Watch(c *Client, log *slog.Logger, check func(*keystore.Record) error, onChange func(change string, o *SealedKey)) (*Index, error) {
	if log == nil {
		log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	x := &Index{c: c, log: log, check: check,
		dirty: map[string]bool{}, keys: map[string]indexed{}, kick: make(chan struct{}, 1), cancel: cancel, done: make(chan struct{})}
	r := c.rest
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			var l SealedKeyList
			err := r.Get().Namespace(c.namespace).Resource("sealedkeys").VersionedParams(&o, parameterCodec).Do(ctx).Into(&l)
			return &l, err
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.Watch = true
			return r.Get().Namespace(c.namespace).Resource("sealedkeys").VersionedParams(&o, parameterCodec).Watch(ctx)
		},
	}
	x.inf = cache.NewSharedIndexInformer(lw, &SealedKey{}, 0, cache.Indexers{tenantIndex: func(obj any) ([]string, error) {
		return []string{obj.(*SealedKey).Spec.Tenant}, nil
	}})
	// The cache holds names and parsed ciphertext only: no managedFields,
	// no last-applied annotation, no armor text, no other metadata.
	x.inf.SetTransform(func(obj any) (any, error) {
		o, ok := obj.(*SealedKey)
		if !ok {
			return obj, nil
		}
		slim := &SealedKey{TypeMeta: o.TypeMeta, Spec: SealedKeySpec{Tenant: o.Spec.Tenant, Name: o.Spec.Name},
			ObjectMeta: metav1.ObjectMeta{Name: o.Name, Namespace: o.Namespace, UID: o.UID, ResourceVersion: o.ResourceVersion}}
		slim.rec, slim.recErr = recordOf(o)
		slim.parsed = true
		slim.writer = lastWriter(o)
		return slim, nil
	})
	x.inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		x.mu.Lock()
		first := x.err == nil
		x.err = err
		x.mu.Unlock()
		if first {
			log.Warn("cannot watch SealedKeys; serving what was listed before", "namespace", c.namespace, "err", err)
		}
	})
	var synced atomic.Bool
	tell := func(change string, obj any) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		if o, ok := obj.(*SealedKey); ok && onChange != nil && synced.Load() {
			onChange(change, o)
		}
	}
	x.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { x.touch(obj); tell("add", obj) },
		UpdateFunc: func(old, obj any) { x.touch(old); x.touch(obj); tell("update", obj) },
		DeleteFunc: func(obj any) { x.touch(obj); tell("delete", obj) },
	})
	go func() {
		defer close(x.done)
		x.inf.RunWithContext(ctx)
	}()
	sctx, scancel := context.WithTimeout(ctx, syncTimeout)
	defer scancel()
	if !cache.WaitForCacheSync(sctx.Done(), x.inf.HasSynced) {
		x.mu.Lock()
		err := x.err
		x.mu.Unlock()
		x.Close()
		if err == nil {
			err = errors.New("no answer")
		}
		return nil, fmt.Errorf("list SealedKeys in namespace %s within %s: %w", c.namespace, syncTimeout, err)
	}
	x.mu.Lock()
	x.rebuild(true)
	x.mu.Unlock()
	synced.Store(true)
	go x.loop(ctx)
	return x, nil
}

// touch marks obj's tenant for the next rebuild.
func (x *Index) touch(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	o, ok := obj.(*SealedKey)
	if !ok {
		return
	}
	x.mu.Lock()
	x.dirty[o.Spec.Tenant] = true
	x.err = nil // an event: the watch works
	x.mu.Unlock()
	select {
	case x.kick <- struct{}{}:
	default:
	}
}

func (x *Index) loop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-x.kick:
			x.mu.Lock()
			x.rebuild(false)
			x.mu.Unlock()
		}
	}
}

// rebuild makes and publishes a snapshot with every dirty tenant listed
// again from the informer's cache (all of them when full). Under x.mu.
func (x *Index) rebuild(full bool) {
	old := x.Snapshot()
	tenants := map[string]*keystore.Tenant{}
	if old != nil && !full {
		for _, n := range old.Tenants() {
			tenants[n] = old.Tenant(n)
		}
	}
	if full {
		x.dirty = map[string]bool{}
		for _, t := range x.inf.GetIndexer().ListIndexFuncValues(tenantIndex) {
			x.dirty[t] = true
		}
		if old != nil {
			for _, n := range old.Tenants() {
				x.dirty[n] = true
			}
		}
	}
	if len(x.dirty) == 0 && old != nil {
		return
	}
	for t := range x.dirty {
		var prev *keystore.Tenant
		if old != nil {
			prev = old.Tenant(t)
		}
		tenants[t] = x.tenant(t, prev)
	}
	x.dirty = map[string]bool{}
	x.Publish(keystore.NewSnapshot(tenants))
}

// tenant builds tenant t from the cache, reusing prev when no object of
// it changed and each unchanged object's Key (and its cached record).
func (x *Index) tenant(t string, prev *keystore.Tenant) *keystore.Tenant {
	objs, _ := x.inf.GetIndexer().ByIndex(tenantIndex, t)
	var keys []*keystore.Key
	same := prev != nil && len(objs) == len(prev.Names())
	seen := map[string]bool{}
	for _, obj := range objs {
		o := obj.(*SealedKey)
		if want := ObjectName(o.Spec.Tenant, o.Spec.Name); o.Name != want || keystore.ValidTenant(o.Spec.Tenant) != nil || keystore.ValidKeyName(o.Spec.Name) != nil {
			// The CRD refuses these; an API without it may not.
			x.log.Warn("ignoring a SealedKey whose name does not match its tenant and key", "object", o.Namespace+"/"+o.Name, "want", want)
			same = false
			continue
		}
		seen[o.Name] = true
		if k, ok := x.keys[o.Name]; ok && k.rv == o.ResourceVersion {
			keys = append(keys, k.key)
			same = same && prev.Key(o.Spec.Name) == k.key
			continue
		}
		k := keystore.NewKey(entryOf(o), x.load) // the informer's cache holds the record
		x.keys[o.Name] = indexed{rv: o.ResourceVersion, key: k}
		if err := x.vet(o); err != nil {
			x.refuse(o, err)
		}
		keys = append(keys, k)
		same = false
	}
	for _, n := range prev.Names() {
		if name := ObjectName(t, n); !seen[name] {
			delete(x.keys, name)
		}
	}
	if same {
		return prev
	}
	return keystore.NewTenant(keys)
}

// vet is the error reading o's record would meet, nil for a good one.
func (x *Index) vet(o *SealedKey) error {
	r, err := recordOf(o)
	if err == nil && x.check != nil {
		err = x.check(r)
	}
	return err
}

// Refused counts the SealedKey versions refused since Watch.
func (x *Index) Refused() uint64 { return x.refused.Load() }

// refuse reports a bad object: a log line, a count, and a Warning event
// on the object, for whoever applied it (kubectl describe sealedkey).
func (x *Index) refuse(o *SealedKey, err error) {
	x.refused.Add(1)
	x.log.Error("refusing a SealedKey: its file reads as an I/O error; every other key is served", "object", o.Namespace+"/"+o.Name, "err", err)
	go x.c.event(o, "RecordRefused", err.Error())
}

// load reads e's record from the informer's cache.
func (x *Index) load(e keystore.Entry) (*keystore.Record, error) {
	obj, ok, err := x.inf.GetIndexer().GetByKey(x.c.namespace + "/" + ObjectName(e.Tenant, e.Name))
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: %s/%s was removed", keystore.ErrNotFound, e.Tenant, e.Name)
	}
	r, err := recordOf(obj.(*SealedKey))
	if err == nil && x.check != nil {
		err = x.check(r)
	}
	if err != nil {
		return nil, err
	}
	if r.Version != e.Version {
		return nil, fmt.Errorf("%w: %s/%s version %d was replaced by version %d", keystore.ErrNotFound, e.Tenant, e.Name, e.Version, r.Version)
	}
	return r, nil
}

// Recheck vets every record again, as new: for when what check accepts
// changed (a master retired). Keys are rebuilt, so records already read
// are checked again at their next open.
func (x *Index) Recheck() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.keys = map[string]indexed{}
	x.rebuild(true)
}

// Refresh publishes what the informer has seen and not yet indexed, and
// says why the watch fails, if it does.
func (x *Index) Refresh() error {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.rebuild(false)
	if x.err != nil {
		return fmt.Errorf("watch SealedKeys in namespace %s: %w", x.c.namespace, x.err)
	}
	return nil
}

// Close stops the informer. Snapshots stay readable.
func (x *Index) Close() {
	x.cancel()
	<-x.done
}

// lastWriter names the field manager of o's newest change, from its
// managedFields (the API keeps no user name in the object): what the
// audit trail can say of who wrote a record that arrived through the API.
func lastWriter(o *SealedKey) string {
	var w metav1.ManagedFieldsEntry
	for _, m := range o.ManagedFields {
		if w.Time == nil || (m.Time != nil && !m.Time.Before(w.Time)) {
			w = m
		}
	}
	if w.Manager == "" {
		return ""
	}
	s := "field manager " + w.Manager + " (" + string(w.Operation)
	if w.Time != nil {
		s += " at " + w.Time.UTC().Format(time.RFC3339)
	}
	return s + ")"
}

// Writer is what the API says of who last wrote o: its newest field
// manager, operation and time.
func (o *SealedKey) Writer() string { return o.writer }

// Version is o's record version, 0 when it does not parse.
func (o *SealedKey) Version() uint64 { return versionOf(o) }

// KID is the master o's record is sealed to, "" when it does not parse.
func (o *SealedKey) KID() string {
	if r, err := recordOf(o); err == nil {
		return r.KID
	}
	return ""
}
