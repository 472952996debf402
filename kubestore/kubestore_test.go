package kubestore

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keyfs/keyfs/internal/kubetest"
	"github.com/keyfs/keyfs/keystore"
)

func TestMain(m *testing.M) { kubetest.Main(m) }

func master(t *testing.T) *keystore.MasterKey {
	t.Helper()
	seed := make([]byte, keystore.SeedSize)
	rand.Read(seed)
	m, err := keystore.NewMasterKey(seed)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

// client returns a client for a new namespace of the shared API server.
func client(t *testing.T) (*Client, *kubetest.Cluster) {
	t.Helper()
	k := kubetest.Start(t)
	c, err := New(k.Config("admin"), k.Namespace(t))
	if err != nil {
		t.Fatal(err)
	}
	return c, k
}

func put(t *testing.T, c *Client, pub *keystore.PublicKey, tenant, name, value string) *keystore.Record {
	t.Helper()
	r, err := c.Put(tenant, name, func(v uint64) (*keystore.Record, error) { return keystore.Seal(pub, tenant, name, v, []byte(value)) })
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestObjectName(t *testing.T) {
	names := []string{"openai", "azure-openai", "openai_2", "openai-2", "gpt.4o", "gpt-4o", "a--b", "a-", "a_", "a.", "a-h", "a--h", "x_y.z-w", "0"}
	seen := map[string]string{}
	for _, n := range names {
		o := ObjectName("acme", n)
		if prev, ok := seen[o]; ok {
			t.Errorf("%q and %q share the object name %q", prev, n, o)
		}
		seen[o] = n
		if !strings.HasPrefix(o, "acme.") || strings.ContainsAny(o, "_") || strings.HasSuffix(o, "-") || strings.Contains(o, ".-") || strings.Contains(o, "-.") {
			t.Errorf("ObjectName(acme, %q) = %q: not a DNS subdomain", n, o)
		}
	}
	if o := ObjectName("acme", "openai"); o != "acme.openai" {
		t.Errorf("a plain name is escaped: %q", o)
	}
}

// TestSchema: the CRD accepts what keyfs writes, for every name form, and
// refuses bad names, a name that is not the rule's, and a non-record.
func TestSchema(t *testing.T) {
	c, _ := client(t)
	m := master(t)
	for _, n := range []string{"openai", "azure-openai", "openai_2", "gpt.4o", "a--b", "key-"} {
		r, err := keystore.Seal(m.Public(), "acme", n, 1, []byte("v"))
		if err != nil {
			t.Fatal(err)
		}
		if err := c.write(r, nil); err != nil {
			t.Errorf("the API refused the SealedKey of acme/%s (%s): %v", n, ObjectName("acme", n), err)
		}
	}
	r, _ := keystore.Seal(m.Public(), "acme", "gemini", 1, []byte("v"))
	good := NewSealedKey(c.namespace, r)
	for what, mutate := range map[string]func(o *SealedKey){
		"a name not of the rule":  func(o *SealedKey) { o.Name = "acme.gemini2" },
		"an upper-case tenant":    func(o *SealedKey) { o.Spec.Tenant, o.Name = "Acme", "Acme.gemini" },
		"a key name with a slash": func(o *SealedKey) { o.Spec.Name, o.Name = "a/b", "acme.a--hb" },
		"a record that is not":    func(o *SealedKey) { o.Spec.Record = "sk-live-plaintext\n" },
		"no record":               func(o *SealedKey) { o.Spec.Record = "" },
	} {
		o := good.DeepCopyObject().(*SealedKey)
		mutate(o)
		ctx, cancel := c.ctx()
		err := c.rest.Post().Namespace(c.namespace).Resource("sealedkeys").Body(o).Do(ctx).Error()
		cancel()
		if !apierrors.IsInvalid(err) {
			t.Errorf("%s: want Invalid, got %v", what, err)
		}
	}
	if l, _ := c.ListSealedKeys(metav1.ListOptions{}); len(l.Items) != 6 {
		t.Errorf("%d objects stored, want the 6 good ones", len(l.Items))
	}
}

func TestClient(t *testing.T) {
	c, _ := client(t)
	m := master(t)
	r1 := put(t, c, m.Public(), "acme", "openai", "sk-one")
	r2 := put(t, c, m.Public(), "acme", "openai", "sk-two")
	if r2.Version <= r1.Version {
		t.Errorf("put versions %d then %d", r1.Version, r2.Version)
	}
	put(t, c, m.Public(), "beta", "gemini_1", "sk-beta")
	ts, err := c.Tenants()
	if err != nil || strings.Join(ts, ",") != "acme,beta" {
		t.Fatalf("tenants %v %v", ts, err)
	}
	es, err := c.Keys("acme")
	if err != nil || len(es) != 1 || es[0].Version != r2.Version {
		t.Fatalf("keys %+v %v", es, err)
	}
	rec, err := c.Read(es[0])
	if err != nil {
		t.Fatal(err)
	}
	if v, err := m.Open(rec, "acme", "openai"); err != nil || string(v) != "sk-two" {
		t.Fatalf("open %q %v", v, err)
	}
	// An import no newer than what is stored changes nothing.
	old, _ := keystore.Seal(m.Public(), "acme", "openai", r2.Version, []byte("sk-old"))
	if err := c.Import(old); !errors.Is(err, keystore.ErrConflict) {
		t.Errorf("import of an old version: %v", err)
	}
	newer, _ := keystore.Seal(m.Public(), "acme", "openai", r2.Version+10, []byte("sk-three"))
	if err := c.Import(newer); err != nil {
		t.Fatal(err)
	}
	if e, err := c.Newest("acme", "openai"); err != nil || e.Version != r2.Version+10 {
		t.Errorf("newest after import %+v %v", e, err)
	}
	if vs, err := c.Remove("acme", "openai", false); err != nil || len(vs) != 1 || vs[0] != r2.Version+10 {
		t.Errorf("remove %v %v", vs, err)
	}
	if _, err := c.Newest("acme", "openai"); !errors.Is(err, keystore.ErrNotFound) {
		t.Errorf("after remove: %v", err)
	}
	if _, err := c.Remove("acme", "openai", true); !errors.Is(err, keystore.ErrNotFound) || !strings.Contains(err.Error(), "no key acme/openai") {
		t.Errorf("remove of a missing key: %v", err)
	}
}

// TestConcurrentPut: writers racing on one key each store a version, and
// the newest wins.
func TestConcurrentPut(t *testing.T) {
	c, _ := client(t)
	m := master(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := range 4 {
		wg.Go(func() {
			_, err := c.Put("acme", "openai", func(v uint64) (*keystore.Record, error) {
				return keystore.Seal(m.Public(), "acme", "openai", v, fmt.Appendf(nil, "sk-%d", i))
			})
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// TestBootstrapRace: of nodes racing to create the KeyfsCluster, one wins
// and all agree on its kid; a replacement of the key in place is refused.
func TestBootstrapRace(t *testing.T) {
	c, _ := client(t)
	type result struct {
		won bool
		kid string
		err error
	}
	res := make(chan result, 5)
	kids := map[string]bool{}
	var wg sync.WaitGroup
	for i := range 5 {
		m := master(t)
		kids[m.KID()] = true
		wg.Go(func() {
			o, pub, won, err := c.Bootstrap(m.Public(), fmt.Sprintf("node-%d", i))
			if err == nil && o.Spec.KID != pub.KID {
				err = fmt.Errorf("kid %s, public key of %s", o.Spec.KID, pub.KID)
			}
			kid := ""
			if pub != nil {
				kid = pub.KID
			}
			res <- result{won, kid, err}
		})
	}
	wg.Wait()
	close(res)
	winners, agreed := 0, ""
	for r := range res {
		if r.err != nil {
			t.Fatal(r.err)
		}
		if r.won {
			winners++
		}
		if agreed == "" {
			agreed = r.kid
		}
		if r.kid != agreed || !kids[r.kid] {
			t.Errorf("kid %s, others %s", r.kid, agreed)
		}
	}
	if winners != 1 {
		t.Fatalf("%d nodes created the KeyfsCluster", winners)
	}
	o, _, err := c.Cluster()
	if err != nil {
		t.Fatal(err)
	}
	o.Spec.PublicKey = string(master(t).Public().Marshal())
	ctx, cancel := c.ctx()
	defer cancel()
	if err := c.rest.Put().Resource("keyfsclusters").Name(ClusterName).Body(o).Do(ctx).Error(); !apierrors.IsInvalid(err) {
		t.Errorf("replacing the cluster key in place: want Invalid, got %v", err)
	}
	ctx2, cancel2 := c.ctx()
	defer cancel2()
	if err := c.rest.Delete().Resource("keyfsclusters").Name(ClusterName).Do(ctx2).Error(); err != nil {
		t.Fatal(err) // other tests bootstrap again
	}
}

func waitSnap(t *testing.T, x *Index, what string, cond func(*keystore.Snapshot) bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		s := x.Snapshot()
		if cond(s) {
			return time.Since(start)
		}
		select {
		case <-s.Superseded():
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: not within 5 s", what)
		}
	}
}

// TestIndex: the informer-backed store sees puts and removes within a
// second, reuses untouched tenants, refuses a moved record for that key
// only, and keeps no managedFields.
func TestIndex(t *testing.T) {
	c, _ := client(t)
	m := master(t)
	put(t, c, m.Public(), "acme", "openai", "sk-1")
	put(t, c, m.Public(), "beta", "gemini", "sk-b")
	kidCheck := func(r *keystore.Record) error {
		if r.KID != m.KID() {
			return &keystore.KIDMismatchError{Record: r.KID, Have: m.KID()}
		}
		return nil
	}
	var changes []string
	var changesMu sync.Mutex
	x, err := Watch(c, nil, kidCheck, func(change string, o *SealedKey) {
		changesMu.Lock()
		defer changesMu.Unlock()
		changes = append(changes, change+" "+o.Name+" "+o.Writer())
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(x.Close)
	s := x.Snapshot()
	if strings.Join(s.Tenants(), ",") != "acme,beta" || s.Tenant("acme").Key("openai") == nil {
		t.Fatalf("first snapshot: %v", s.Tenants())
	}
	beta := s.Tenant("beta")
	r2 := put(t, c, m.Public(), "acme", "openai", "sk-2")
	d := waitSnap(t, x, "put", func(s *keystore.Snapshot) bool {
		k := s.Tenant("acme").Key("openai")
		return k != nil && k.Version == r2.Version
	})
	if d > time.Second {
		t.Errorf("a put took %s to reach the index", d)
	}
	s = x.Snapshot()
	if s.Tenant("beta") != beta {
		t.Error("a put to acme rebuilt beta")
	}
	rec, err := s.Tenant("acme").Key("openai").Record()
	if err != nil {
		t.Fatal(err)
	}
	if v, err := m.Open(rec, "acme", "openai"); err != nil || string(v) != "sk-2" {
		t.Fatalf("open through the index: %q %v", v, err)
	}
	// A record of beta/gemini stored as acme/stolen: listed, refused.
	moved, _ := keystore.Seal(m.Public(), "beta", "gemini", 5, []byte("x"))
	o := NewSealedKey(c.namespace, moved)
	o.Name, o.Spec.Tenant, o.Spec.Name = "acme.stolen", "acme", "stolen"
	ctx, cancel := c.ctx()
	defer cancel()
	if err := c.rest.Post().Namespace(c.namespace).Resource("sealedkeys").Body(o).Do(ctx).Error(); err != nil {
		t.Fatal(err)
	}
	waitSnap(t, x, "moved record listed", func(s *keystore.Snapshot) bool { return s.Tenant("acme").Key("stolen") != nil })
	s = x.Snapshot()
	if _, err := s.Tenant("acme").Key("stolen").Record(); !errors.Is(err, keystore.ErrIntegrity) || !strings.Contains(err.Error(), "cannot be moved") {
		t.Errorf("a moved record: %v", err)
	}
	if _, err := s.Tenant("acme").Key("openai").Record(); err != nil {
		t.Errorf("a bad neighbour broke acme/openai: %v", err)
	}
	// A record sealed to another master: listed, refused, reported.
	other, _ := keystore.Seal(master(t).Public(), "acme", "foreign", 1, []byte("x"))
	if err := c.write(other, nil); err != nil {
		t.Fatal(err)
	}
	waitSnap(t, x, "foreign record listed", func(s *keystore.Snapshot) bool { return s.Tenant("acme").Key("foreign") != nil })
	if _, err := x.Snapshot().Tenant("acme").Key("foreign").Record(); !errors.Is(err, keystore.ErrIntegrity) || !strings.Contains(err.Error(), "sealed to kid "+other.KID) {
		t.Errorf("a record sealed to another master: %v", err)
	}
	if n := x.Refused(); n != 2 {
		t.Errorf("%d refused objects counted, want 2 (moved, foreign)", n)
	}
	var evs struct {
		Items []struct {
			Reason, Message, Type string
			InvolvedObject        struct{ Kind, Name string }
		}
	}
	if !poll(5*time.Second, func() bool {
		ctx, cancel := c.ctx()
		defer cancel()
		b, err := c.rest.Get().AbsPath("/api/v1/namespaces", c.namespace, "events").DoRaw(ctx)
		return err == nil && json.Unmarshal(b, &evs) == nil && len(evs.Items) >= 2
	}) {
		t.Fatalf("no Kubernetes events for the refused objects: %+v", evs)
	}
	names := map[string]string{}
	for _, e := range evs.Items {
		if e.Type == "Warning" && e.Reason == "RecordRefused" && e.InvolvedObject.Kind == "SealedKey" {
			names[e.InvolvedObject.Name] = e.Message
		}
	}
	if !strings.Contains(names["acme.stolen"], "cannot be moved") || !strings.Contains(names["acme.foreign"], "sealed to kid") {
		t.Errorf("events do not name the objects and why: %v", names)
	}
	for _, obj := range x.inf.GetStore().List() {
		if _, ok := obj.(*cached); !ok {
			t.Errorf("the cache holds a %T, not slim", obj)
		}
	}
	if _, err := c.Remove("acme", "openai", true); err != nil {
		t.Fatal(err)
	}
	if d := waitSnap(t, x, "rm", func(s *keystore.Snapshot) bool { return s.Tenant("acme").Key("openai") == nil }); d > time.Second {
		t.Errorf("a remove took %s to reach the index", d)
	}
	if err := x.Refresh(); err != nil {
		t.Errorf("refresh: %v", err)
	}
	if !poll(5*time.Second, func() bool {
		changesMu.Lock()
		defer changesMu.Unlock()
		return strings.Contains(strings.Join(changes, "\n"), "delete acme.openai")
	}) {
		t.Fatalf("no delete heard: %v", changes)
	}
	changesMu.Lock()
	all := strings.Join(changes, "\n")
	changesMu.Unlock()
	for _, want := range []string{"update acme.openai field manager keyfs (Update at ", "add acme.stolen field manager keyfs", "add acme.foreign field manager keyfs"} {
		if !strings.Contains(all, want) {
			t.Errorf("changes heard lack %q:\n%s", want, all)
		}
	}
	if strings.Contains(all, "beta.gemini") {
		t.Errorf("the first list was reported as changes:\n%s", all)
	}
}

func poll(d time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(d); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

// TestListSlim: the informer's list, paged when the server pages (etcd
// honours a limit at resourceVersion ""), comes whole and slim, at the
// list's version; the decoder takes an empty list and refuses another kind.
func TestListSlim(t *testing.T) {
	c, _ := client(t)
	m := master(t)
	for i := range 5 {
		put(t, c, m.Public(), "acme", fmt.Sprintf("k%d", i), "v")
	}
	if p, err := c.ListSealedKeys(metav1.ListOptions{Limit: 2}); err != nil || p.Continue == "" {
		t.Fatalf("the API server does not page a list of 5 at limit 2 (%v): nothing to test", err)
	}
	l, err := c.listSlim(t.Context(), metav1.ListOptions{Limit: 2})
	if err != nil {
		t.Fatal(err)
	}
	full, err := c.ListSealedKeys(metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Items) != 5 || l.ResourceVersion == "" || l.Continue != "" {
		t.Fatalf("listed %d items at version %q (continue %q), want 5 at a version", len(l.Items), l.ResourceVersion, l.Continue)
	}
	for i, k := range l.Items {
		if o := full.Items[i]; k.name != o.Name || k.rv != o.ResourceVersion || k.uid != o.UID || k.rec == nil || k.rec.Name != o.Spec.Name || !strings.Contains(k.writer, "field manager keyfs") {
			t.Errorf("item %d: %+v, want %s at %s", i, k, o.Name, o.ResourceVersion)
		}
	}
	for _, tc := range []struct{ json, err string }{
		{`{"kind":"SealedKeyList","items":null,"metadata":{"resourceVersion":"7"}}`, ""},
		{`{"metadata":{"resourceVersion":"7"},"items":[],"apiVersion":"keyfs.dev/v1alpha1"}`, ""},
		{`{"kind":"Status","items":[]}`, "not a SealedKeyList"},
		{`{"items":{}}`, "want an array"},
		{`{"items":[{"metadata":{"name":"a.b"}}`, "EOF"},
	} {
		n := 0
		m, err := decodeList(strings.NewReader(tc.json), func(*SealedKey) { n++ })
		switch {
		case tc.err == "" && (err != nil || m.ResourceVersion != "7" || n != 0):
			t.Errorf("%s: %v, version %q, %d items", tc.json, err, m.ResourceVersion, n)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: error %v, want %q", tc.json, err, tc.err)
		}
	}
}
