// Package fileset replaces several files of one directory as one change:
// after a crash at any point, readers see the old set or the new set,
// never a mix. The new set is written whole into a journal directory and
// marked complete before any file moves; Settle, run before the files are
// read, finishes a complete journal or discards an incomplete one. Commit
// and Settle hold an exclusive lock on dir/JOURNAL.lock, so that another
// process settling never takes a journal being written for a crashed one.
package fileset

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// File is one member of a set: its new content, or its removal.
type File struct {
	Name   string // base name in the directory
	Data   []byte
	Perm   os.FileMode
	Remove bool // delete Name instead of writing it
}

const (
	complete      = ".complete"
	removalSuffix = ".remove"
)

// lock takes the set's lock; the returned func releases it.
func lock(dir, journal string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, journal+".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// Commit replaces files in dir together, journaling in dir/journal.
func Commit(dir, journal string, files []File) error {
	unlock, err := lock(dir, journal)
	if err != nil {
		return err
	}
	defer unlock()
	if err := settle(dir, journal); err != nil {
		return err
	}
	j := filepath.Join(dir, journal)
	if err := os.Mkdir(j, 0o700); err != nil {
		return fmt.Errorf("start %s: %w", j, err)
	}
	for _, f := range files {
		if strings.HasPrefix(f.Name, ".") || strings.HasSuffix(f.Name, removalSuffix) || filepath.Base(f.Name) != f.Name {
			return fmt.Errorf("fileset: bad file name %q", f.Name)
		}
		name, data, perm := f.Name, f.Data, f.Perm
		if f.Remove {
			name, data, perm = f.Name+removalSuffix, nil, 0o600
		}
		if err := writeSynced(filepath.Join(j, name), data, perm); err != nil {
			return err
		}
	}
	if err := syncDir(j); err != nil {
		return err
	}
	// The commit point: from here on the new set wins.
	if err := writeSynced(filepath.Join(j, complete), nil, 0o600); err != nil {
		return err
	}
	if err := syncDir(j); err != nil {
		return err
	}
	return rollForward(dir, j)
}

// Settle finishes or discards a journal a crashed Commit left in dir.
func Settle(dir, journal string) error {
	j := filepath.Join(dir, journal)
	if _, err := os.Lstat(j); errors.Is(err, fs.ErrNotExist) {
		return nil // the common case: no lock needed
	}
	unlock, err := lock(dir, journal)
	if err != nil {
		return err
	}
	defer unlock()
	return settle(dir, journal)
}

func settle(dir, journal string) error {
	j := filepath.Join(dir, journal)
	if _, err := os.Lstat(j); errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(j, complete)); err == nil {
		return rollForward(dir, j)
	}
	if err := os.RemoveAll(j); err != nil {
		return fmt.Errorf("discard the incomplete %s: %w", j, err)
	}
	return syncDir(dir)
}

// rollForward moves every journaled file into place; it can be repeated
// after a crash, since each move happens once and the mark goes last.
func rollForward(dir, j string) error {
	des, err := os.ReadDir(j)
	if err != nil {
		return err
	}
	for _, de := range des {
		n := de.Name()
		switch {
		case n == complete:
			continue
		case strings.HasSuffix(n, removalSuffix):
			if err := os.Remove(filepath.Join(dir, strings.TrimSuffix(n, removalSuffix))); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			if err := syncDir(dir); err != nil {
				return err
			}
			if err := os.Remove(filepath.Join(j, n)); err != nil {
				return err
			}
		default:
			if err := os.Rename(filepath.Join(j, n), filepath.Join(dir, n)); err != nil {
				return err
			}
		}
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(j, complete)); err != nil {
		return err
	}
	if err := os.Remove(j); err != nil {
		return err
	}
	return syncDir(dir)
}

func writeSynced(path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm) // umask must not loosen or tighten it
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
