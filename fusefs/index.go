package fusefs

import "github.com/keyfs/keyfs/keystore"

// A mount is a view of the store's shared snapshot: the tenants Allow lets
// it see and, with Options.Keys, only those key names. The helpers below
// are that filter; nothing here reads the store.

// key returns tenant t's key name if this mount shows it, else nil.
func (s *Server) key(t *keystore.Tenant, name string) *keystore.Key {
	if s.keys != nil && !s.keys[name] {
		return nil
	}
	return t.Key(name)
}

// keyNames lists the keys of t this mount shows, sorted.
func (s *Server) keyNames(t *keystore.Tenant) []string {
	if s.keys == nil {
		return t.Names()
	}
	var out []string
	for _, n := range t.Names() {
		if s.keys[n] {
			out = append(out, n)
		}
	}
	return out
}

// visible says whether this mount shows tenant name (t in its snapshot):
// allowed, and holding at least one key the mount shows.
func (s *Server) visible(name string, t *keystore.Tenant) bool {
	if t == nil || !s.allow(name) {
		return false
	}
	if s.keys == nil {
		return len(t.Names()) > 0
	}
	for k := range s.keys {
		if t.Key(k) != nil {
			return true
		}
	}
	return false
}

// visibleTenant returns the tenant if this mount shows it now, else nil.
func (s *Server) visibleTenant(name string) *keystore.Tenant {
	t := s.snap.Load().Tenant(name)
	if !s.visible(name, t) {
		return nil
	}
	return t
}
