package tpm

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// fakeBlob builds well-formed TPM structures without a TPM.
func fakeBlob(pcrs []int) *Blob {
	pub := tpm2.Marshal(tpm2.New2B(tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgKeyedHash,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, NoDA: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash,
			&tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
	}))
	priv := tpm2.Marshal(tpm2.TPM2BPrivate{Buffer: bytes.Repeat([]byte{0xA5}, 126)})
	return &Blob{Public: pub, Private: priv, PCRs: pcrs}
}

func TestBlobText(t *testing.T) {
	srk := append([]byte{0x00, 0x0b}, bytes.Repeat([]byte{0x5a}, 32)...)
	for _, pcrs := range [][]int{nil, {7, 16}} {
		for _, pin := range [][]byte{nil, srk} {
			b := fakeBlob(pcrs)
			b.SRKName = pin
			text, err := b.MarshalText()
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(string(text), "\n")
			wantPCRs := "pcrs:"
			if pcrs != nil {
				wantPCRs = "pcrs: 7,16"
			}
			if pin != nil {
				if len(lines) != 6 || lines[2] != "srk: 000b"+strings.Repeat("5a", 32) {
					t.Fatalf("pinned blob text:\n%s", text)
				}
				lines = append(lines[:2], lines[3:]...)
			}
			if len(lines) != 5 || lines[0] != "keyfs-tpm-blob v1" || lines[1] != wantPCRs ||
				!strings.HasPrefix(lines[2], "public: ") || !strings.HasPrefix(lines[3], "private: ") || lines[4] != "" {
				t.Fatalf("unexpected text:\n%s", text)
			}
			got, err := ParseBlob(text)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Public, b.Public) || !bytes.Equal(got.Private, b.Private) || !slices.Equal(got.PCRs, b.PCRs) || !bytes.Equal(got.SRKName, pin) {
				t.Fatalf("round trip changed the blob: %+v", got)
			}
		}
		b := fakeBlob(pcrs)
		text, _ := b.MarshalText()
		for _, bad := range []string{"srk: 000b00", "srk: zz", "srk: 0004" + strings.Repeat("00", 32)} {
			if _, err := ParseBlob([]byte(strings.Replace(string(text), "public: ", bad+"\npublic: ", 1))); err == nil || !strings.Contains(err.Error(), "srk") {
				t.Errorf("blob with %q: %v", bad, err)
			}
		}
		// Git may turn line ends into CRLF.
		if _, err := ParseBlob(bytes.ReplaceAll(text, []byte("\n"), []byte("\r\n"))); err != nil {
			t.Fatalf("CRLF: %v", err)
		}
	}
}

func TestParseBlobTruncated(t *testing.T) {
	text, err := fakeBlob([]int{7}).MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	for n := range len(text) - 1 { // every prefix but the one missing only the final newline
		if _, err := ParseBlob(text[:n]); err == nil {
			t.Fatalf("ParseBlob accepted the first %d of %d bytes:\n%s", n, len(text), text[:n])
		} else if !strings.HasPrefix(err.Error(), "bad TPM blob: ") || !strings.HasSuffix(err.Error(), "`keyfs recover`") {
			t.Fatalf("unhelpful error for %d bytes: %v", n, err)
		}
	}
}

func TestParseBlobGarbage(t *testing.T) {
	good, _ := fakeBlob(nil).MarshalText()
	lines := strings.Split(string(good), "\n")
	tests := map[string]string{
		"empty":         "",
		"binary":        "\x00\x01\x02garbage",
		"json":          `{"public": "AAA="}`,
		"version 2":     "keyfs-tpm-blob v2\n" + strings.Join(lines[1:], "\n"),
		"no colon":      string(good) + "hello\n",
		"unknown key":   string(good) + "extra: 1\n",
		"duplicate":     string(good) + lines[3] + "\n",
		"bad pcrs":      strings.Replace(string(good), "pcrs:", "pcrs: 99", 1),
		"bad base64":    strings.Replace(string(good), "public: ", "public: !!", 1),
		"no pcrs line":  strings.Join(append([]string{lines[0]}, lines[2:]...), "\n"),
		"swapped parts": strings.Join([]string{lines[0], lines[1], "public:" + lines[3][len("private:"):], "private:" + lines[2][len("public:"):]}, "\n"),
	}
	for name, text := range tests {
		b, err := ParseBlob([]byte(text))
		if err == nil {
			t.Errorf("%s: accepted: %+v", name, b)
			continue
		}
		t.Logf("%s: %v", name, err)
	}
}

func TestParsePCRs(t *testing.T) {
	good := map[string][]int{
		"":          nil,
		"  ":        nil,
		"7":         {7},
		"7,16":      {7, 16},
		"16, 7":     {7, 16},
		"0,23":      {0, 23},
		"0,1,2,3,4": {0, 1, 2, 3, 4},
	}
	for in, want := range good {
		got, err := ParsePCRs(in)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("ParsePCRs(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"24", "-1", "7,7", "7,", ",", "a", "7;16", "7 16", "1e1", "0x10"} {
		_, err := ParsePCRs(in)
		if err == nil {
			t.Errorf("ParsePCRs(%q) succeeded", in)
		} else if !strings.Contains(err.Error(), `comma-separated numbers 0 to 23, each at most once, e.g. "7,16"`) {
			t.Errorf("ParsePCRs(%q): error does not state the rule: %v", in, err)
		}
	}
}
