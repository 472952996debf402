package main

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"
)

// The readers run in a child process, as pods do: the kernel path is the
// same as from goroutines, but the server's and readers' runtimes do not
// share a scheduler, and killing the bench cannot leave a server process
// stuck waiting on its own mount.

// result is what a reader child reports.
type result struct {
	Reads   int           `json:"reads"`
	Elapsed time.Duration `json:"elapsed"`
	P50     time.Duration `json:"p50"`
	P99     time.Duration `json:"p99"`
	Errors  int           `json:"errors"`
	First   string        `json:"first_error,omitempty"`
}

func (r result) perSec() float64 { return float64(r.Reads) / r.Elapsed.Seconds() }

const expectEnv = "KEYFS_BENCH_EXPECT"

// readOnce does what an application reading a key file does: open, read
// until EOF, close.
func readOnce(path string, buf []byte) ([]byte, error) {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	n := 0
	for {
		m, err := syscall.Read(fd, buf[n:])
		if err != nil {
			syscall.Close(fd)
			return nil, err
		}
		if m == 0 {
			break
		}
		n += m
	}
	return buf[:n], syscall.Close(fd)
}

// readerMain is the reader child: it reads as runReader does and reports
// the result as JSON.
func readerMain(mode, path string, conc int, dur time.Duration) error {
	want, err := hex.DecodeString(os.Getenv(expectEnv))
	if err != nil {
		return err
	}
	if len(want) == 0 {
		want = nil // walk: any content
	}
	res, err := runReader(mode, path, conc, dur, want)
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// runReader reads in mode latency (one reader, every read timed), round
// (latency going round keys), throughput (conc readers, counted) or walk
// (every file under path once).
func runReader(mode, path string, conc int, dur time.Duration, want []byte) (result, error) {
	var res result
	var mu sync.Mutex
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		res.Errors++
		if res.First == "" {
			res.First = err.Error()
		}
	}
	check := func(b []byte, err error) {
		if err == nil && want != nil && !bytes.Equal(b, want) {
			err = fmt.Errorf("read %d bytes, not the expected value", len(b))
		} else if err == nil && len(b) == 0 {
			err = fmt.Errorf("read nothing")
		}
		if err != nil {
			fail(err)
		}
	}
	start := time.Now()
	switch mode {
	case "latency", "round":
		// latency reads path; round goes round the openai keys of the
		// first conc tenants of the mount at path, as a gateway serving
		// many tenants from one volume does.
		paths := []string{path}
		if mode == "round" {
			paths = paths[:0]
			for i := range conc {
				paths = append(paths, filepath.Join(path, fmt.Sprintf("t%05d", i), "openai"))
			}
		}
		buf := make([]byte, 4096)
		for i := range 200 + len(paths) { // warm up caches and the server's threads
			check(readOnce(paths[i%len(paths)], buf))
		}
		lat := make([]time.Duration, 0, 1<<16)
		start = time.Now()
		for i := 0; time.Since(start) < dur; i++ {
			t := time.Now()
			b, err := readOnce(paths[i%len(paths)], buf)
			lat = append(lat, time.Since(t))
			check(b, err)
		}
		slices.Sort(lat)
		res.Reads = len(lat)
		res.P50 = lat[len(lat)/2]
		res.P99 = lat[len(lat)*99/100]
	case "throughput":
		var wg sync.WaitGroup
		counts := make([]int, conc)
		for i := range conc {
			wg.Go(func() {
				buf := make([]byte, 4096)
				for time.Since(start) < dur {
					check(readOnce(path, buf))
					counts[i]++
				}
			})
		}
		wg.Wait()
		for _, c := range counts {
			res.Reads += c
		}
	case "walk":
		buf := make([]byte, 4096)
		tenants, err := os.ReadDir(path)
		if err != nil {
			return res, err
		}
		for _, t := range tenants {
			keys, err := os.ReadDir(filepath.Join(path, t.Name()))
			if err != nil {
				fail(err)
				continue
			}
			for _, k := range keys {
				b, err := readOnce(filepath.Join(path, t.Name(), k.Name()), buf)
				if err == nil && len(b) == 0 {
					err = fmt.Errorf("%s/%s is empty", t.Name(), k.Name())
				}
				if err != nil {
					fail(err)
				}
				res.Reads++
			}
		}
	default:
		return res, fmt.Errorf("unknown reader mode %q", mode)
	}
	res.Elapsed = time.Since(start)
	return res, nil
}
