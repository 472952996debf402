package keystore

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
)

// ErrIntegrity marks data that is not what it claims to be: garbage,
// truncated, tampered, moved, or sealed to another key.
var ErrIntegrity = errors.New("integrity check failed")

// armor is the text form shared by records, public keys and escrow blobs:
//
//	keyfs-<kind> v1
//	key: value          (fixed keys, fixed order)
//	<blank line>
//	base64 body, 64 columns
//	end keyfs-<kind>
//
// It survives Git, YAML block scalars and terminals; the end line makes
// truncation detectable before any crypto runs.
type armor struct {
	kind    string
	headers []header
	body    []byte
}

type header struct{ key, value string }

const armorVersion = "v1"

// headerText is the canonical first line and headers; records use it as
// AEAD additional data, so every header byte is authenticated.
func (a *armor) headerText() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "keyfs-%s %s\n", a.kind, armorVersion)
	for _, h := range a.headers {
		fmt.Fprintf(&b, "%s: %s\n", h.key, h.value)
	}
	return b.Bytes()
}

func (a *armor) marshal() []byte {
	b := bytes.NewBuffer(a.headerText())
	b.WriteByte('\n')
	enc := base64.StdEncoding.EncodeToString(a.body)
	for len(enc) > 64 {
		b.WriteString(enc[:64])
		b.WriteByte('\n')
		enc = enc[64:]
	}
	if enc != "" {
		b.WriteString(enc)
		b.WriteByte('\n')
	}
	fmt.Fprintf(b, "end keyfs-%s\n", a.kind)
	return b.Bytes()
}

// parseArmor reads an armor of the given kind whose headers are exactly keys,
// in order. CRLF line ends are accepted (Git on Windows).
func parseArmor(data []byte, kind string, keys ...string) (*armor, error) {
	text := strings.ReplaceAll(string(data), "\r\n", "\n")
	lines := strings.Split(strings.TrimRight(text, "\n"), "\n")
	first := fmt.Sprintf("keyfs-%s %s", kind, armorVersion)
	if len(lines) == 0 || lines[0] != first {
		got := ""
		if len(lines) > 0 {
			got = lines[0]
		}
		if v, ok := strings.CutPrefix(got, "keyfs-"+kind+" v"); ok && len(v) < 4 {
			return nil, fmt.Errorf("%w: keyfs %s format v%s is not supported; this keyfs reads %s: upgrade keyfs", ErrIntegrity, kind, v, armorVersion)
		}
		return nil, fmt.Errorf("%w: not a keyfs %s: the first line must be %q", ErrIntegrity, kind, first)
	}
	a := &armor{kind: kind}
	i := 1
	for _, k := range keys {
		if i >= len(lines) || lines[i] == "" {
			return nil, fmt.Errorf("%w: keyfs %s is missing its %q header (truncated or edited)", ErrIntegrity, kind, k)
		}
		hk, hv, ok := strings.Cut(lines[i], ": ")
		if !ok || hk != k {
			return nil, fmt.Errorf("%w: keyfs %s line %d: want the %q header", ErrIntegrity, kind, i+1, k)
		}
		// Clone: a substring would pin the whole file text in memory.
		a.headers = append(a.headers, header{hk, strings.Clone(hv)})
		i++
	}
	if i >= len(lines) || lines[i] != "" {
		return nil, fmt.Errorf("%w: keyfs %s line %d: want a blank line after the headers", ErrIntegrity, kind, i+1)
	}
	i++
	last := "end keyfs-" + kind
	if lines[len(lines)-1] != last {
		return nil, fmt.Errorf("%w: keyfs %s is truncated: no %q line at the end", ErrIntegrity, kind, last)
	}
	body, err := base64.StdEncoding.DecodeString(strings.Join(lines[i:len(lines)-1], ""))
	if err != nil {
		return nil, fmt.Errorf("%w: keyfs %s body is not valid base64: %w", ErrIntegrity, kind, err)
	}
	a.body = body
	return a, nil
}

func (a *armor) get(key string) string {
	for _, h := range a.headers {
		if h.key == key {
			return h.value
		}
	}
	return ""
}
