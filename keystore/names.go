package keystore

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// ErrInvalidName marks a tenant or key name that breaks the naming rules.
var ErrInvalidName = errors.New("invalid name")

var (
	tenantRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	keyRE    = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
)

// ValidTenant checks that s is a DNS-1123 label, the same rule as a
// Kubernetes namespace, so a namespace can name its tenant.
func ValidTenant(s string) error {
	if len(s) > 63 || !tenantRE.MatchString(s) {
		return fmt.Errorf("%w: tenant %q: a tenant is 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit", ErrInvalidName, s)
	}
	return nil
}

// ValidKeyName checks a key name: a file name in the mounted tree.
func ValidKeyName(s string) error {
	if !keyRE.MatchString(s) || s == "." || s == ".." {
		return fmt.Errorf("%w: key name %q: a key name is 1-63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit", ErrInvalidName, s)
	}
	return nil
}

// ParseRef splits "tenant/name" and validates both parts.
func ParseRef(ref string) (tenant, name string, err error) {
	tenant, name, ok := strings.Cut(ref, "/")
	if !ok {
		return "", "", fmt.Errorf("%w: %q: want TENANT/NAME, for example acme/openai", ErrInvalidName, ref)
	}
	if err := ValidTenant(tenant); err != nil {
		return "", "", err
	}
	if err := ValidKeyName(name); err != nil {
		return "", "", err
	}
	return tenant, name, nil
}

// SplitNames parses a comma-separated list of tenants or key names (valid
// is ValidTenant or ValidKeyName), sorted and without duplicates. An empty
// string is an empty list; an empty item is an error.
func SplitNames(s string, valid func(string) error) ([]string, error) {
	if s == "" {
		return nil, nil
	}
	var out []string
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			return nil, fmt.Errorf("%w: %q: want a comma-separated list with no empty items", ErrInvalidName, s)
		}
		if err := valid(item); err != nil {
			return nil, err
		}
		out = append(out, item)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}
