package keystore

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrNotFound marks a tenant or key the store does not hold.
var ErrNotFound = errors.New("not found")

// DefaultKeep is how many versions of a key the store keeps.
const DefaultKeep = 3

// Dir is the local store: ROOT/<tenant>/<name>@<version>.rec, files 0600 in
// directories 0700. Writers in any process serialize on ROOT/.lock and bump
// ROOT/.gen after every change, so a reader can poll one small file to learn
// that something changed.
type Dir struct {
	root string
	Keep int
}

// Entry names one stored record version.
type Entry struct {
	Tenant, Name string
	Version      uint64
	Path         string
}

// OpenDir opens (creating if needed) a store rooted at root.
func OpenDir(root string) (*Dir, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	if err := os.Chmod(root, 0o700); err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	return &Dir{root: root, Keep: DefaultKeep}, nil
}

// Root is the store's directory.
func (d *Dir) Root() string { return d.root }

// Gen changes whenever the store changes; "" before the first write.
func (d *Dir) Gen() (string, error) {
	b, err := os.ReadFile(filepath.Join(d.root, ".gen"))
	if errors.Is(err, fs.ErrNotExist) {
		if _, serr := os.Stat(d.root); serr != nil {
			return "", fmt.Errorf("store: %w", serr) // the store itself is gone
		}
		return "", nil
	}
	return string(b), err
}

// Tenants lists the tenant directories, sorted. Remove deletes a tenant's
// directory with its last key, so each holds at least one key, except one
// left empty by a crash or an older keyfs: Keys lists nothing for it, and
// neither ls nor a mount shows it.
func (d *Dir) Tenants() ([]string, error) {
	des, err := os.ReadDir(d.root)
	if err != nil {
		return nil, fmt.Errorf("list tenants: %w", err)
	}
	var ts []string
	for _, de := range des {
		if de.IsDir() && ValidTenant(de.Name()) == nil {
			ts = append(ts, de.Name())
		}
	}
	return ts, nil
}

func parseFileName(fn string) (name string, version uint64, ok bool) {
	base, ok := strings.CutSuffix(fn, ".rec")
	if !ok {
		return "", 0, false
	}
	name, v, ok := strings.Cut(base, "@")
	if !ok || ValidKeyName(name) != nil {
		return "", 0, false
	}
	version, err := strconv.ParseUint(v, 10, 64)
	return name, version, err == nil && version > 0
}

// versions lists every stored version of tenant's keys, newest first per name.
func (d *Dir) versions(tenant string) ([]Entry, error) {
	if err := ValidTenant(tenant); err != nil {
		return nil, err
	}
	dir := filepath.Join(d.root, tenant)
	des, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", tenant, err)
	}
	var es []Entry
	for _, de := range des {
		if name, v, ok := parseFileName(de.Name()); ok {
			es = append(es, Entry{Tenant: tenant, Name: name, Version: v, Path: filepath.Join(dir, de.Name())})
		}
	}
	slices.SortFunc(es, func(a, b Entry) int {
		if c := strings.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return -cmpUint(a.Version, b.Version)
	})
	return es, nil
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Keys lists the newest version of each of tenant's keys, sorted by name.
func (d *Dir) Keys(tenant string) ([]Entry, error) {
	all, err := d.versions(tenant)
	if err != nil {
		return nil, err
	}
	var es []Entry
	for _, e := range all {
		if len(es) == 0 || es[len(es)-1].Name != e.Name {
			es = append(es, e)
		}
	}
	return es, nil
}

// Versions lists the stored versions of tenant/name, newest first.
func (d *Dir) Versions(tenant, name string) ([]Entry, error) {
	if err := ValidKeyName(name); err != nil {
		return nil, err
	}
	all, err := d.versions(tenant)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(all, func(e Entry) bool { return e.Name != name }), nil
}

// Newest returns the newest version of tenant/name, or ErrNotFound.
func (d *Dir) Newest(tenant, name string) (Entry, error) {
	vs, err := d.Versions(tenant, name)
	if err != nil {
		return Entry{}, err
	}
	if len(vs) == 0 {
		return Entry{}, fmt.Errorf("%w: no key %s/%s (keyfs ls lists what is stored)", ErrNotFound, tenant, name)
	}
	return vs[0], nil
}

// Read reads and parses one stored record, checking that its headers match
// where it is stored.
func (d *Dir) Read(e Entry) (*Record, error) {
	b, err := os.ReadFile(e.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s/%s version %d was removed", ErrNotFound, e.Tenant, e.Name, e.Version)
	}
	if err != nil {
		return nil, err
	}
	r, err := ParseRecord(b)
	if err != nil {
		return nil, fmt.Errorf("%s/%s version %d: %w", e.Tenant, e.Name, e.Version, err)
	}
	if r.Tenant != e.Tenant || r.Name != e.Name || r.Version != e.Version {
		return nil, fmt.Errorf("%w: file for %s/%s version %d holds the record of %s/%s version %d: records cannot be moved or renamed",
			ErrIntegrity, e.Tenant, e.Name, e.Version, r.Tenant, r.Name, r.Version)
	}
	return r, nil
}

// Put seals and stores a new version of tenant/name. The version is the
// larger of newest+1 and the current Unix time, so versions sealed offline
// by `keyfs seal` (which uses the time) and by put interleave in order.
func (d *Dir) Put(tenant, name string, seal func(version uint64) (*Record, error)) (*Record, error) {
	var r *Record
	err := d.locked(func() error {
		v := uint64(time.Now().Unix())
		if e, err := d.Newest(tenant, name); err == nil {
			v = max(v, e.Version+1)
		} else if !errors.Is(err, ErrNotFound) {
			return err
		}
		var err error
		if r, err = seal(v); err != nil {
			return err
		}
		return d.write(r)
	})
	return r, err
}

// Import stores a record sealed elsewhere. Its version must be newer than
// any stored version of the key.
func (d *Dir) Import(r *Record) error {
	return d.locked(func() error {
		if e, err := d.Newest(r.Tenant, r.Name); err == nil && e.Version >= r.Version {
			return fmt.Errorf("%w: %s/%s already has version %d, not older than the record's %d: seal it again (keyfs seal uses the current time as its version)",
				ErrConflict, r.Tenant, r.Name, e.Version, r.Version)
		} else if err != nil && !errors.Is(err, ErrNotFound) {
			return err
		}
		return d.write(r)
	})
}

// Replace swaps the stored file of r's version for r: a reseal of the
// same value to another master (see Reseal). Readers see the old record
// or the new one; both hold the same value.
func (d *Dir) Replace(r *Record) error {
	return d.locked(func() error {
		vs, err := d.Versions(r.Tenant, r.Name)
		if err != nil {
			return err
		}
		i := slices.IndexFunc(vs, func(e Entry) bool { return e.Version == r.Version })
		if i < 0 {
			return fmt.Errorf("%w: no version %d of %s/%s to replace", ErrNotFound, r.Version, r.Tenant, r.Name)
		}
		if err := WriteFileAtomic(vs[i].Path, r.Marshal(), 0o600); err != nil {
			return fmt.Errorf("replace %s/%s version %d: %w", r.Tenant, r.Name, r.Version, err)
		}
		return d.bumpGen()
	})
}

// AllVersions lists every stored version of tenant's keys, newest first
// per name.
func (d *Dir) AllVersions(tenant string) ([]Entry, error) { return d.versions(tenant) }

// ErrConflict marks a write that would overwrite or go back in versions.
var ErrConflict = errors.New("conflict")

// Remove deletes the newest version of tenant/name (the previous kept
// version, if any, becomes current), or every version with all. It returns
// the versions it removed.
func (d *Dir) Remove(tenant, name string, all bool) ([]uint64, error) {
	var removed []uint64
	err := d.locked(func() error {
		vs, err := d.Versions(tenant, name)
		if err != nil {
			return err
		}
		if len(vs) == 0 {
			return fmt.Errorf("%w: no key %s/%s (keyfs ls lists what is stored)", ErrNotFound, tenant, name)
		}
		if !all {
			vs = vs[:1]
		}
		for _, e := range vs {
			if err := os.Remove(e.Path); err != nil {
				return fmt.Errorf("remove %s/%s version %d: %w", tenant, name, e.Version, err)
			}
			removed = append(removed, e.Version)
		}
		if err := syncDir(filepath.Join(d.root, tenant)); err != nil {
			return err
		}
		if err := d.removeIfEmpty(tenant); err != nil {
			return err
		}
		return d.bumpGen()
	})
	return removed, err
}

// removeIfEmpty deletes a tenant's directory once it holds no record, so
// Tenants lists only tenants with keys. Called under the store lock.
func (d *Dir) removeIfEmpty(tenant string) error {
	dir := filepath.Join(d.root, tenant)
	des, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("list %s: %w", tenant, err)
	}
	for _, de := range des {
		if strings.HasSuffix(de.Name(), ".rec") {
			return nil
		}
	}
	// A crashed writer's temp file keeps it: ENOTEMPTY is fine.
	if err := os.Remove(dir); err != nil && !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("remove the empty tenant %s: %w", tenant, err)
	}
	return syncDir(d.root)
}

// write stores r durably: a crash at any point leaves the old set of
// versions or the new one, never a partial record.
func (d *Dir) write(r *Record) error {
	dir := filepath.Join(d.root, r.Tenant)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.Mkdir(dir, 0o700); err != nil {
			return fmt.Errorf("store %s/%s: %w", r.Tenant, r.Name, err)
		}
		if err := syncDir(d.root); err != nil {
			return err
		}
	}
	final := filepath.Join(dir, fmt.Sprintf("%s@%d.rec", r.Name, r.Version))
	tmp, err := writeTemp(dir, r.Marshal())
	if err != nil {
		return fmt.Errorf("store %s/%s: %w", r.Tenant, r.Name, err)
	}
	defer os.Remove(tmp)
	// link, unlike rename, refuses to replace: a version is written once.
	if err := os.Link(tmp, final); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%w: %s/%s version %d already exists", ErrConflict, r.Tenant, r.Name, r.Version)
		}
		return fmt.Errorf("store %s/%s: %w", r.Tenant, r.Name, err)
	}
	if err := os.Remove(tmp); err != nil {
		return err
	}
	if err := d.prune(r.Tenant, r.Name); err != nil {
		return err
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	return d.bumpGen()
}

// prune drops versions beyond Keep, and temp files a crashed writer left.
func (d *Dir) prune(tenant, name string) error {
	vs, err := d.Versions(tenant, name)
	if err != nil {
		return err
	}
	keep := max(d.Keep, 1)
	for _, e := range vs[min(keep, len(vs)):] {
		if err := os.Remove(e.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	des, _ := os.ReadDir(filepath.Join(d.root, tenant))
	for _, de := range des {
		if strings.HasPrefix(de.Name(), ".tmp-") {
			if fi, err := de.Info(); err == nil && time.Since(fi.ModTime()) > time.Minute {
				os.Remove(filepath.Join(d.root, tenant, de.Name()))
			}
		}
	}
	return nil
}

func (d *Dir) bumpGen() error {
	b := make([]byte, 16)
	rand.Read(b)
	return WriteFileAtomic(filepath.Join(d.root, ".gen"), []byte(hex.EncodeToString(b)+"\n"), 0o600)
}

// locked runs f holding the store's cross-process write lock.
func (d *Dir) locked(f func() error) error {
	lf, err := os.OpenFile(filepath.Join(d.root, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("lock store: %w", err)
	}
	defer lf.Close()
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock store: %w", err)
	}
	return f()
}

func writeTemp(dir string, data []byte) (string, error) {
	f, err := os.CreateTemp(dir, ".tmp-")
	if err != nil {
		return "", err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// WriteFileAtomic replaces path with data durably: temp file, fsync,
// rename, fsync of the directory. Readers see the old file or the new one.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	tmp, err := writeTemp(filepath.Dir(path), data)
	if err != nil {
		return err
	}
	err = os.Chmod(tmp, perm)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(path))
}
