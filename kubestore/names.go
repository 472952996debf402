package kubestore

import (
	"regexp"
	"strings"
)

var labelRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// ObjectName is the SealedKey name of tenant/name: TENANT.NAME when name
// is a DNS label without "--", else TENANT.ESCAPED with '-', '_' and '.'
// written as "--h", "--u" and "--d". Escaped names hold "--" and plain
// ones do not, so no two keys share a name; the CRD checks the same rule.
func ObjectName(tenant, name string) string {
	if labelRE.MatchString(name) && !strings.Contains(name, "--") {
		return tenant + "." + name
	}
	r := strings.NewReplacer("-", "--h", "_", "--u", ".", "--d")
	return tenant + "." + r.Replace(name)
}
