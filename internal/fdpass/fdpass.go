// Package fdpass sends messages with file descriptors attached over unix
// sockets of type SOCK_SEQPACKET, which keep message boundaries: one
// message, its descriptors, no framing.
package fdpass

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// MaxMessage bounds a message; longer ones are refused on both ends.
const MaxMessage = 64 << 10

// maxFDs bounds the descriptors one message carries.
const maxFDs = 8

// Send writes msg with fds attached. The descriptors stay the caller's:
// the receiver gets its own copies of the same open files.
func Send(c *net.UnixConn, msg []byte, fds ...int) error {
	if len(msg) > MaxMessage || len(fds) > maxFDs {
		return fmt.Errorf("fdpass: message of %d bytes and %d descriptors is too large", len(msg), len(fds))
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := c.WriteMsgUnix(msg, oob, nil)
	return err
}

// ErrClosed is returned by Recv when the peer closed the socket.
var ErrClosed = errors.New("fdpass: peer closed the socket")

// Recv reads one message and the descriptors that came with it, which
// are the caller's to close (they are close-on-exec).
func Recv(c *net.UnixConn) ([]byte, []int, error) {
	buf := make([]byte, MaxMessage+1)
	oob := make([]byte, unix.CmsgSpace(4*maxFDs))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, nil, err
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, nil, fmt.Errorf("fdpass: %w", err)
		}
		for _, m := range msgs {
			got, err := unix.ParseUnixRights(&m)
			if err != nil {
				closeAll(fds)
				return nil, nil, fmt.Errorf("fdpass: %w", err)
			}
			fds = append(fds, got...)
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n > MaxMessage {
		closeAll(fds)
		return nil, nil, errors.New("fdpass: message truncated")
	}
	if n == 0 && len(fds) == 0 {
		return nil, nil, ErrClosed
	}
	return buf[:n:n], fds, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// Pair returns the two ends of a connected SOCK_SEQPACKET socket pair:
// one to keep, one (as a file) to hand to a child process.
func Pair() (*net.UnixConn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("fdpass: socketpair: %w", err)
	}
	mine := os.NewFile(uintptr(fds[0]), "fdpass")
	defer mine.Close()
	c, err := FileConn(mine)
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return c, os.NewFile(uintptr(fds[1]), "fdpass-peer"), nil
}

// FileConn makes a connection of a socket descriptor a parent passed
// down; f may be closed afterwards.
func FileConn(f *os.File) (*net.UnixConn, error) {
	fc, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("fdpass: %w", err)
	}
	c, ok := fc.(*net.UnixConn)
	if !ok {
		fc.Close()
		return nil, errors.New("fdpass: not a unix socket")
	}
	return c, nil
}
