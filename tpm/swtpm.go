package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"
)

// swtpmConn speaks the MS-simulator framing on swtpm's server port. go-tpm's
// tcp transport has no deadlines, and swtpm serves one client at a time, so a
// second client would otherwise hang forever.
type swtpmConn struct {
	conn    net.Conn
	addr    string
	timeout time.Duration
	broken  error // set once a command failed mid-flight: the stream is out of step
}

const (
	mssimSendCommand = 8
	maxResponse      = 1 << 16
)

func dialSWTPM(addr string, timeout time.Duration) (*swtpmConn, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, netError(addr, timeout, err)
	}
	return &swtpmConn{conn: c, addr: addr, timeout: timeout}, nil
}

func (s *swtpmConn) Send(cmd []byte) ([]byte, error) {
	if s.broken != nil {
		return nil, s.broken
	}
	rsp, err := s.roundTrip(cmd)
	if err != nil {
		s.broken = netError(s.addr, s.timeout, err)
		return nil, s.broken
	}
	return rsp, nil
}

func (s *swtpmConn) roundTrip(cmd []byte) ([]byte, error) {
	if err := s.conn.SetDeadline(time.Now().Add(s.timeout)); err != nil {
		return nil, err
	}
	msg := make([]byte, 9, 9+len(cmd))
	binary.BigEndian.PutUint32(msg[0:], mssimSendCommand)
	msg[4] = 0 // locality
	binary.BigEndian.PutUint32(msg[5:], uint32(len(cmd)))
	if _, err := s.conn.Write(append(msg, cmd...)); err != nil {
		return nil, err
	}
	var n [4]byte
	if _, err := io.ReadFull(s.conn, n[:]); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(n[:])
	if size < 10 || size > maxResponse {
		return nil, fmt.Errorf("bad response length %d", size)
	}
	rsp := make([]byte, size+4) // the response, then a 4-byte acknowledgement
	if _, err := io.ReadFull(s.conn, rsp); err != nil {
		return nil, err
	}
	return rsp[:size], nil
}

func (s *swtpmConn) Close() error { return s.conn.Close() }

// netError says what went wrong talking to swtpm and what to check.
func netError(addr string, timeout time.Duration, err error) error {
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return fmt.Errorf("%w: no answer from swtpm at %s within %v (%w); check that swtpm is running "+
			"and that no other process is connected to it (swtpm serves one client at a time)", ErrTimeout, addr, timeout, err)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w: nothing listening at %s (%w); start swtpm there "+
			"(swtpm socket --tpm2 --server type=tcp,port=PORT ...) or choose another --tpm", ErrNoDevice, addr, err)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		return fmt.Errorf("swtpm at %s closed the connection (%w); check that swtpm is still running", addr, err)
	}
	return fmt.Errorf("swtpm at %s: %w", addr, err)
}
