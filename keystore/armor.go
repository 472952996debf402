package keystore

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
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

const bodyColumns = 64

// headerText is the first line and headers; records use it as AEAD
// additional data. Since a record is accepted only in its canonical form
// (parseArmor, sameHeaders), every header byte on disk is authenticated.
// Exactly sized, as marshal's buffer: a daemon keeps one per key, and
// parseArmor marshals every armor it reads again.
func (a *armor) headerText() []byte {
	return a.appendHeaderText(make([]byte, 0, a.headerLen()))
}

func (a *armor) headerLen() int {
	n := len("keyfs-") + len(a.kind) + 1 + len(armorVersion) + 1
	for _, h := range a.headers {
		n += len(h.key) + len(": ") + len(h.value) + 1
	}
	return n
}

func (a *armor) appendHeaderText(b []byte) []byte {
	b = append(append(append(append(append(b, "keyfs-"...), a.kind...), ' '), armorVersion...), '\n')
	for _, h := range a.headers {
		b = append(append(append(append(b, h.key...), ": "...), h.value...), '\n')
	}
	return b
}

// bodyChunk is the body bytes of one full base64 line.
const bodyChunk = bodyColumns / 4 * 3

func (a *armor) marshal() []byte {
	enc := base64.StdEncoding.EncodedLen(len(a.body))
	lines := (enc + bodyColumns - 1) / bodyColumns
	b := a.appendHeaderText(make([]byte, 0, a.headerLen()+1+enc+lines+len("end keyfs-")+len(a.kind)+1))
	b = append(b, '\n')
	// Chunks of whole base64 groups: their encodings, one a line, are the
	// body's encoding cut at bodyColumns.
	for body := a.body; len(body) > 0; {
		n := min(len(body), bodyChunk)
		b = append(base64.StdEncoding.AppendEncode(b, body[:n]), '\n')
		body = body[n:]
	}
	return append(append(append(b, "end keyfs-"...), a.kind...), '\n')
}

// ErrNotCanonical marks an armor that is not byte for byte what keyfs writes
// (CRLF line ends, other base64 line lengths, a header such as "version:
// 007"). It always comes with ErrIntegrity: one value has one text, so
// what is authenticated is exactly what is on disk.
var ErrNotCanonical = errors.New("not in canonical form")

// parseArmor reads an armor of the given kind whose headers are exactly keys,
// in order, in the exact form marshal writes: LF line ends, one trailing
// newline, base64 in full 64-column lines. Callers check that each header
// value is the canonical text of what it means (sameHeaders).
func parseArmor(data []byte, kind string, keys ...string) (*armor, error) {
	text := string(data)
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	first := fmt.Sprintf("keyfs-%s %s", kind, armorVersion)
	if lines[0] != first {
		if lines[0] == first+"\r" {
			return nil, notCanonical(kind, 1, "has a CRLF line end; keyfs writes LF only (convert with dos2unix, or mark the file `-text` in .gitattributes)")
		}
		if v, ok := strings.CutPrefix(lines[0], "keyfs-"+kind+" v"); ok && len(v) < 4 {
			return nil, fmt.Errorf("%w: keyfs %s format v%s is not supported; this keyfs reads %s: upgrade keyfs", ErrIntegrity, kind, v, armorVersion)
		}
		return nil, fmt.Errorf("%w: not a keyfs %s: the first line must be %q", ErrIntegrity, kind, first)
	}
	for i, l := range lines {
		if strings.HasSuffix(l, "\r") {
			return nil, notCanonical(kind, i+1, "has a CRLF line end; keyfs writes LF only (convert with dos2unix, or mark the file `-text` in .gitattributes)")
		}
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
		if hv == "" || strings.TrimSpace(hv) != hv {
			return nil, notCanonical(kind, i+1, fmt.Sprintf("the %q value is empty or has extra spaces", k))
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
	end := slices.Index(lines[i:], last)
	if end < 0 {
		return nil, fmt.Errorf("%w: keyfs %s is truncated: no %q line at the end", ErrIntegrity, kind, last)
	}
	end += i
	if end != len(lines)-1 || !strings.HasSuffix(text, "\n") {
		return nil, notCanonical(kind, end+1, fmt.Sprintf("the %q line must end the text with exactly one newline", last))
	}
	body := lines[i:end]
	for j, l := range body {
		if len(l) != bodyColumns && (j < len(body)-1 || len(l) == 0 || len(l) > bodyColumns) {
			return nil, notCanonical(kind, i+j+1, fmt.Sprintf("base64 lines are %d columns, only the last may be shorter", bodyColumns))
		}
	}
	b, err := base64.StdEncoding.Strict().DecodeString(strings.Join(body, ""))
	if err != nil {
		return nil, fmt.Errorf("%w: keyfs %s body is not valid base64: %w", ErrIntegrity, kind, err)
	}
	a.body = b
	// Belt and braces: whatever the checks above missed, the text must be
	// exactly what marshal writes for what was read.
	if !bytes.Equal(a.marshal(), data) {
		return nil, fmt.Errorf("%w: %w: keyfs %s is not byte for byte what keyfs writes", ErrIntegrity, ErrNotCanonical, kind)
	}
	return a, nil
}

func notCanonical(kind string, line int, why string) error {
	return fmt.Errorf("%w: %w: keyfs %s line %d %s", ErrIntegrity, ErrNotCanonical, kind, line, why)
}

// sameHeaders checks that a parsed armor's header values are the canonical
// text of what they were parsed into: want is the armor re-built from the
// parsed fields.
func (a *armor) sameHeaders(want *armor) error {
	for i, h := range a.headers {
		if i >= len(want.headers) || want.headers[i] != h {
			w := ""
			if i < len(want.headers) {
				w = want.headers[i].value
			}
			return notCanonical(a.kind, i+2, fmt.Sprintf("%s %q is not canonical: keyfs writes %q", h.key, h.value, w))
		}
	}
	return nil
}

func (a *armor) get(key string) string {
	for _, h := range a.headers {
		if h.key == key {
			return h.value
		}
	}
	return ""
}
