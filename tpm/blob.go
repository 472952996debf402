package tpm

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/google/go-tpm/tpm2"
)

const blobHeader = "keyfs-tpm-blob v1"

// MarshalText encodes b as a few lines of text, safe to keep in git:
//
//	keyfs-tpm-blob v1
//	pcrs: 7,16
//	srk: <hex name of the SRK it was sealed under>
//	public: <base64>
//	private: <base64>
//
// Blobs written before SRK pinning have no srk line.
func (b *Blob) MarshalText() ([]byte, error) {
	if err := checkPCRs(b.PCRs); err != nil {
		return nil, err
	}
	if _, _, err := b.decode(); err != nil {
		return nil, fmt.Errorf("marshal TPM blob: %w", err)
	}
	var buf bytes.Buffer
	buf.WriteString(blobHeader + "\n")
	buf.WriteString(strings.TrimSpace("pcrs: "+formatPCRs(sortedPCRs(b.PCRs))) + "\n")
	if b.SRKName != nil {
		if err := checkName(b.SRKName); err != nil {
			return nil, fmt.Errorf("marshal TPM blob: srk: %w", err)
		}
		buf.WriteString("srk: " + hex.EncodeToString(b.SRKName) + "\n")
	}
	buf.WriteString("public: " + base64.StdEncoding.EncodeToString(b.Public) + "\n")
	buf.WriteString("private: " + base64.StdEncoding.EncodeToString(b.Private) + "\n")
	return buf.Bytes(), nil
}

// ParseBlob decodes the output of MarshalText.
func ParseBlob(data []byte) (*Blob, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("bad TPM blob: "+format+"; restore the file from a backup or with `keyfs recover`", a...)
	}
	lines := strings.Split(strings.ReplaceAll(string(data), "\r\n", "\n"), "\n")
	for len(lines) > 0 && strings.TrimSpace(lines[len(lines)-1]) == "" {
		lines = lines[:len(lines)-1]
	}
	if len(lines) == 0 {
		return nil, bad("the file is empty")
	}
	if lines[0] != blobHeader {
		return nil, bad("first line is %q, want %q", truncate(lines[0]), blobHeader)
	}
	fields := map[string]string{}
	for i, line := range lines[1:] {
		key, val, ok := strings.Cut(line, ":")
		switch {
		case !ok:
			return nil, bad("line %d has no \"key: value\"", i+2)
		case key != "pcrs" && key != "srk" && key != "public" && key != "private":
			return nil, bad("line %d: unknown key %q", i+2, truncate(key))
		}
		if _, dup := fields[key]; dup {
			return nil, bad("line %d: %q given twice", i+2, key)
		}
		fields[key] = strings.TrimSpace(val)
	}
	for _, key := range []string{"pcrs", "public", "private"} {
		if _, ok := fields[key]; !ok {
			return nil, bad("no %q line (truncated file?)", key)
		}
	}
	pcrs, err := ParsePCRs(fields["pcrs"])
	if err != nil {
		return nil, bad("%v", err)
	}
	b := &Blob{PCRs: pcrs}
	if v, ok := fields["srk"]; ok {
		if b.SRKName, err = hex.DecodeString(v); err != nil {
			return nil, bad("srk: not hex")
		}
		if err := checkName(b.SRKName); err != nil {
			return nil, bad("srk: %v", err)
		}
	}
	if b.Public, err = base64.StdEncoding.Strict().DecodeString(fields["public"]); err != nil {
		return nil, bad("public: %v (truncated file?)", err)
	}
	if b.Private, err = base64.StdEncoding.Strict().DecodeString(fields["private"]); err != nil {
		return nil, bad("private: %v (truncated file?)", err)
	}
	if _, _, err := b.decode(); err != nil {
		return nil, bad("%v", err)
	}
	return b, nil
}

// decode checks and unmarshals the TPM structures in b.
func (b *Blob) decode() (*tpm2.TPM2BPublic, *tpm2.TPM2BPrivate, error) {
	if err := check2B(b.Public); err != nil {
		return nil, nil, fmt.Errorf("public part: %w", err)
	}
	if err := check2B(b.Private); err != nil {
		return nil, nil, fmt.Errorf("private part: %w", err)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](b.Public)
	if err != nil {
		return nil, nil, fmt.Errorf("public part: %w", err)
	}
	contents, err := pub.Contents()
	if err != nil {
		return nil, nil, fmt.Errorf("public part: %w", err)
	}
	if contents.Type != tpm2.TPMAlgKeyedHash {
		return nil, nil, errors.New("public part is not a sealed data object")
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](b.Private)
	if err != nil {
		return nil, nil, fmt.Errorf("private part: %w", err)
	}
	return pub, priv, nil
}

// checkName checks that n is a sha256 object name: the algorithm id, then
// the digest.
func checkName(n []byte) error {
	if len(n) != 34 || binary.BigEndian.Uint16(n) != uint16(tpm2.TPMAlgSHA256) {
		return fmt.Errorf("not a sha256 TPM object name (%d bytes)", len(n))
	}
	return nil
}

// check2B checks that data is exactly one TPM2B: a 2-byte size, then that many bytes.
func check2B(data []byte) error {
	if len(data) < 2 {
		return fmt.Errorf("%d bytes, too short", len(data))
	}
	if n := int(binary.BigEndian.Uint16(data)); n == 0 || n != len(data)-2 {
		return fmt.Errorf("size field says %d bytes, %d present (truncated?)", n, len(data)-2)
	}
	return nil
}

const maxPCR = 23

// ParsePCRs parses a comma-separated list of PCR indexes such as "7,16".
// The empty string means no PCRs. The result is sorted.
func ParsePCRs(s string) ([]int, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var pcrs []int
	for _, f := range strings.Split(s, ",") {
		p, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, pcrRuleError(fmt.Sprintf("%q is not a number", truncate(f)))
		}
		pcrs = append(pcrs, p)
	}
	if err := checkPCRs(pcrs); err != nil {
		return nil, err
	}
	return sortedPCRs(pcrs), nil
}

func checkPCRs(pcrs []int) error {
	seen := map[int]bool{}
	for _, p := range pcrs {
		if p < 0 || p > maxPCR {
			return pcrRuleError(fmt.Sprintf("%d is out of range", p))
		}
		if seen[p] {
			return pcrRuleError(fmt.Sprintf("%d is listed twice", p))
		}
		seen[p] = true
	}
	return nil
}

func pcrRuleError(what string) error {
	return fmt.Errorf("bad PCR list: %s; PCRs are comma-separated numbers 0 to %d, each at most once, e.g. \"7,16\"", what, maxPCR)
}

func sortedPCRs(pcrs []int) []int {
	if len(pcrs) == 0 {
		return nil
	}
	s := slices.Clone(pcrs)
	slices.Sort(s)
	return s
}

// truncate keeps user-supplied garbage out of error messages.
func truncate(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}
