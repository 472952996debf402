// Package packaging holds keyfs's host install: the systemd unit, its
// default configuration and the Debian package's scripts (make deb). Its
// tests check the unit with systemd-analyze and run its command line.
package packaging
