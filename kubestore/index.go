package kubestore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	kjson "sigs.k8s.io/json"

	"github.com/keyfs/keyfs/keystore"
)

// Index is a namespace's SealedKeys as a keystore.Store: one informer (a
// list, then one watch) for the whole daemon, whose cache holds each
// record parsed (a cached per object), and a snapshot rebuilt for the
// tenants each change touches.
type Index struct {
	keystore.Published
	c     *Client
	log   *slog.Logger
	inf   cache.SharedIndexInformer
	check func(*keystore.Record) error
	// refused counts SealedKeys whose record was refused (each version once).
	refused atomic.Uint64

	mu    sync.Mutex          // guards what follows and orders Publish calls
	dirty map[string][]string // tenant -> its objects changed since the last rebuild
	keys  map[string]indexed  // by object name
	err   error               // the watch's last error, until it recovers

	kick   chan struct{}
	cancel context.CancelFunc
	done   chan struct{}
}

type indexed struct {
	rv  string
	key *keystore.Key
}

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
		dirty: map[string][]string{}, keys: map[string]indexed{}, kick: make(chan struct{}, 1), cancel: cancel, done: make(chan struct{})}
	r := c.rest
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return c.listSlim(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.Watch = true
			return r.Get().Namespace(c.namespace).Resource("sealedkeys").VersionedParams(&o, parameterCodec).Watch(ctx)
		},
	}
	// No index by tenant: it would cost a map per tenant; a rebuild finds
	// a tenant's objects by name instead.
	x.inf = cache.NewSharedIndexInformer(lw, &SealedKey{}, 0, cache.Indexers{})
	x.inf.SetTransform(func(obj any) (any, error) {
		if o, ok := obj.(*SealedKey); ok {
			return c.slim(o), nil
		}
		// Slim already (listSlim's, or those a watch-list streamed, which
		// the informer transforms twice), or a tombstone.
		return obj, nil
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
	tell := func(change string, obj any) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		if k, ok := obj.(*cached); ok && onChange != nil {
			onChange(change, k.sealedKey())
		}
	}
	// The handler hears of the first list's objects after the cache holds
	// them, thousands of them late at 30,000 keys: they are no changes.
	reg, err := x.inf.AddEventHandler(cache.ResourceEventHandlerDetailedFuncs{
		AddFunc: func(obj any, initial bool) {
			x.touch(obj)
			if !initial {
				tell("add", obj)
			}
		},
		UpdateFunc: func(old, obj any) { x.touch(old); x.touch(obj); tell("update", obj) },
		DeleteFunc: func(obj any) { x.touch(obj); tell("delete", obj) },
	})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("watch SealedKeys in namespace %s: %w", c.namespace, err)
	}
	go func() {
		defer close(x.done)
		x.inf.RunWithContext(ctx)
	}()
	sctx, scancel := context.WithTimeout(ctx, syncTimeout)
	defer scancel()
	// Synced when the handler heard of every listed object, so the first
	// rebuild sees every tenant touched.
	if !cache.WaitForCacheSync(sctx.Done(), reg.HasSynced) {
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
	go x.loop(ctx)
	return x, nil
}

// touch marks obj (and its tenant) for the next rebuild.
func (x *Index) touch(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	k, ok := obj.(*cached)
	if !ok {
		return
	}
	x.mu.Lock()
	x.dirty[k.tenant] = append(x.dirty[k.tenant], k.name)
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

// rebuild makes and publishes a snapshot with every dirty tenant built
// again from the informer's cache (every tenant when full). Under x.mu.
func (x *Index) rebuild(full bool) {
	old := x.Snapshot()
	if !full && old != nil && len(x.dirty) == 0 {
		return
	}
	tenants := map[string]*keystore.Tenant{}
	if full || old == nil {
		byTenant := map[string][]*cached{}
		for _, obj := range x.inf.GetStore().List() {
			k := obj.(*cached)
			byTenant[k.tenant] = append(byTenant[k.tenant], k)
		}
		if old != nil {
			for _, t := range old.Tenants() {
				if _, ok := byTenant[t]; !ok {
					x.tenant(t, nil, old.Tenant(t)) // forgets its keys
				}
			}
		}
		for t, objs := range byTenant {
			var prev *keystore.Tenant
			if old != nil {
				prev = old.Tenant(t)
			}
			tenants[t] = x.tenant(t, objs, prev)
		}
	} else {
		for _, t := range old.Tenants() {
			tenants[t] = old.Tenant(t)
		}
		for t, changed := range x.dirty {
			prev := old.Tenant(t)
			tenants[t] = x.tenant(t, x.objects(t, prev, changed), prev)
		}
	}
	x.dirty = map[string][]string{}
	x.Publish(keystore.NewSnapshot(tenants))
}

// objects finds tenant t's objects in the cache: those of prev's keys,
// and those named in changed.
func (x *Index) objects(t string, prev *keystore.Tenant, changed []string) []*cached {
	names := map[string]bool{}
	for _, n := range prev.Names() {
		names[ObjectName(t, n)] = true
	}
	for _, n := range changed {
		names[n] = true
	}
	var objs []*cached
	for n := range names {
		obj, ok, _ := x.inf.GetStore().GetByKey(x.c.namespace + "/" + n)
		if k, _ := obj.(*cached); ok && k != nil && k.tenant == t {
			objs = append(objs, k)
		}
	}
	return objs
}

// tenant builds tenant t of objs, reusing prev when no object of it
// changed and each unchanged object's Key (and its cached record).
func (x *Index) tenant(t string, objs []*cached, prev *keystore.Tenant) *keystore.Tenant {
	var keys []*keystore.Key
	same := prev != nil && len(objs) == len(prev.Names())
	seen := map[string]bool{}
	for _, k := range objs {
		if want := ObjectName(k.tenant, k.key); k.name != want || keystore.ValidTenant(k.tenant) != nil || keystore.ValidKeyName(k.key) != nil {
			// The CRD refuses these; an API without it may not.
			x.log.Warn("ignoring a SealedKey whose name does not match its tenant and key", "object", k.namespace+"/"+k.name, "want", want)
			same = false
			continue
		}
		seen[k.name] = true
		if ix, ok := x.keys[k.name]; ok && ix.rv == k.rv {
			keys = append(keys, ix.key)
			same = same && prev.Key(k.key) == ix.key
			continue
		}
		key := keystore.NewKey(k.entry(), x.load) // the informer's cache holds the record
		x.keys[k.name] = indexed{rv: k.rv, key: key}
		if err := x.vet(k); err != nil {
			x.refuse(k, err)
		}
		keys = append(keys, key)
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

// vet is the error reading k's record would meet, nil for a good one.
func (x *Index) vet(k *cached) error {
	r, err := k.rec, k.recErr
	if err == nil && x.check != nil {
		err = x.check(r)
	}
	return err
}

// Refused counts the SealedKey versions refused since Watch.
func (x *Index) Refused() uint64 { return x.refused.Load() }

// refuse reports a bad object: a log line, a count, and a Warning event
// on the object, for whoever applied it (kubectl describe sealedkey).
func (x *Index) refuse(k *cached, err error) {
	x.refused.Add(1)
	x.log.Error("refusing a SealedKey: its file reads as an I/O error; every other key is served", "object", k.namespace+"/"+k.name, "err", err)
	go x.c.event(k.sealedKey(), "RecordRefused", err.Error())
}

// load reads e's record from the informer's cache.
func (x *Index) load(e keystore.Entry) (*keystore.Record, error) {
	obj, ok, err := x.inf.GetStore().GetByKey(x.c.namespace + "/" + ObjectName(e.Tenant, e.Name))
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: %s/%s was removed", keystore.ErrNotFound, e.Tenant, e.Name)
	}
	k := obj.(*cached)
	r, err := k.rec, k.recErr
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

// cached is what the informer's cache keeps of a SealedKey: its names
// and its record parsed. No managedFields, no last-applied annotation, no
// armor text, no other metadata: a SealedKey struct alone is 384 bytes, a
// cached 144.
type cached struct {
	name, rv    string
	uid         types.UID
	namespace   string // the client's: one string for every object
	tenant, key string // spec.tenant and spec.name
	writer      string // lastWriter
	rec         *keystore.Record
	recErr      error
}

// slim is what the informer's cache keeps of o.
func (c *Client) slim(o *SealedKey) *cached {
	k := &cached{name: o.Name, rv: o.ResourceVersion, uid: o.UID, namespace: o.Namespace,
		tenant: o.Spec.Tenant, key: o.Spec.Name, writer: lastWriter(o)}
	k.rec, k.recErr = recordOf(o)
	// One copy of each string for every object alike (the decoder makes
	// one per object).
	if k.namespace == c.namespace {
		k.namespace = c.namespace
	}
	if k.rec != nil { // same tenant and name: recordOf checked
		k.tenant, k.key = k.rec.Tenant, k.rec.Name
	}
	return k
}

// GetObjectMeta gives client-go's cache the names it keys and compares
// objects by.
func (k *cached) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Name: k.name, Namespace: k.namespace, UID: k.uid, ResourceVersion: k.rv}
}

func (k *cached) GetObjectKind() schema.ObjectKind { return schema.EmptyObjectKind }

func (k *cached) DeepCopyObject() runtime.Object {
	c := *k
	return &c
}

// sealedKey is k as a SealedKey: what onChange hears of and events name.
func (k *cached) sealedKey() *SealedKey {
	return &SealedKey{TypeMeta: sealedKeyType,
		ObjectMeta: metav1.ObjectMeta{Name: k.name, Namespace: k.namespace, UID: k.uid, ResourceVersion: k.rv},
		Spec:       SealedKeySpec{Tenant: k.tenant, Name: k.key},
		parsed:     true, rec: k.rec, recErr: k.recErr, writer: k.writer}
}

func (k *cached) entry() keystore.Entry {
	e := keystore.Entry{Tenant: k.tenant, Name: k.key, Path: "sealedkeys/" + k.name}
	if k.rec != nil {
		e.Version = k.rec.Version
	}
	return e
}

// listSlim lists the namespace's SealedKeys as the informer asks (o),
// each decoded as the response streams in and slimmed at once: read
// whole, the response and every full object in it would be in memory
// together (245 MB at 30,000 keys). Pages, if the server makes any (the
// watch cache ignores a limit at resourceVersion 0), are followed here.
func (c *Client) listSlim(ctx context.Context, o metav1.ListOptions) (*slimList, error) {
	out := &slimList{}
	for {
		body, err := c.rest.Get().Namespace(c.namespace).Resource("sealedkeys").VersionedParams(&o, parameterCodec).Stream(ctx)
		if err != nil {
			return nil, err // as it is: the reflector lists again on an expired version
		}
		m, err := decodeList(body, func(o *SealedKey) { out.Items = append(out.Items, c.slim(o)) })
		body.Close()
		if err != nil {
			return nil, fmt.Errorf("list SealedKeys in %s: %w", c.namespace, err)
		}
		out.ResourceVersion = m.ResourceVersion
		if m.Continue == "" {
			return out, nil
		}
		// A continued list takes its version from the token.
		o.Continue, o.ResourceVersion, o.ResourceVersionMatch = m.Continue, "", ""
	}
}

// decodeList reads a SealedKeyList's JSON from r, handing each item to
// each as it is decoded, and returns the list's metadata.
func decodeList(r io.Reader, each func(*SealedKey)) (metav1.ListMeta, error) {
	var m metav1.ListMeta
	d := kjson.NewDecoderCaseSensitivePreserveInts(r)
	if err := delim(d, '{'); err != nil {
		return m, err
	}
	for d.More() {
		t, err := d.Token()
		if err != nil {
			return m, err
		}
		switch t {
		case "metadata":
			err = d.Decode(&m)
		case "items":
			err = decodeItems(d, each)
		case "kind":
			var k string
			if err = d.Decode(&k); err == nil && k != "SealedKeyList" {
				err = fmt.Errorf("the API answered a %s, not a SealedKeyList", k)
			}
		default:
			var skip json.RawMessage
			err = d.Decode(&skip)
		}
		if err != nil {
			return m, err
		}
	}
	return m, delim(d, '}')
}

func decodeItems(d kjson.Decoder, each func(*SealedKey)) error {
	t, err := d.Token()
	if err != nil || t == nil { // null: no items
		return err
	}
	if t != json.Delim('[') {
		return fmt.Errorf("items: want an array, got %v", t)
	}
	for d.More() {
		var o SealedKey
		if err := d.Decode(&o); err != nil {
			return fmt.Errorf("item: %w", err)
		}
		each(&o)
	}
	return delim(d, ']')
}

func delim(d kjson.Decoder, want json.Delim) error {
	t, err := d.Token()
	if err == nil && t != want {
		err = fmt.Errorf("want %v, got %v", want, t)
	}
	return err
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
