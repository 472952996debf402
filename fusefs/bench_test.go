package fusefs

import (
	"fmt"
	"path/filepath"
	"syscall"
	"testing"
)

// BenchmarkOpenRead times open+read-to-EOF+close of a 64-byte key through
// a mount, from this process.
func BenchmarkOpenRead(b *testing.B) {
	for _, tenants := range []int{1, 1000} {
		b.Run(fmt.Sprintf("tenants=%d", tenants), func(b *testing.B) {
			e := newEnv(b)
			value := "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
			for i := range tenants {
				e.put(fmt.Sprintf("t%04d", i), "openai", value)
			}
			_, mnt := e.mount(Options{})
			f := filepath.Join(mnt, "t0000", "openai")
			buf := make([]byte, 4096)
			b.ResetTimer()
			for b.Loop() {
				fd, err := syscall.Open(f, syscall.O_RDONLY, 0)
				if err != nil {
					b.Fatal(err)
				}
				n, _ := syscall.Read(fd, buf)
				m, _ := syscall.Read(fd, buf[n:])
				syscall.Close(fd)
				if n+m != len(value) {
					b.Fatalf("read %d bytes", n+m)
				}
			}
		})
	}
}
