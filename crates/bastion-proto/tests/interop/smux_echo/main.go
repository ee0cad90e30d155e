// Command smux_echo is the peer of tests/smux_interop.rs: a smux v1 *server* built on
// the real github.com/xtaci/smux library (Debian package golang-github-xtaci-smux-dev,
// the same v1.5.16 the session-manager-plugin vendors).
//
// It listens on 127.0.0.1:0, prints "port <n>", and serves every TCP connection as a
// smux server session. Each accepted stream starts with an 8-byte little-endian
// length N:
//
//   - N < 2^64-1: echo exactly N bytes back, print "done <sid> <n> <sha256>", then
//     Close the stream (FIN).
//   - N = 2^64-1: echo until EOF (the peer's FIN), print "eof <sid> <n> <sha256>",
//     then Close the stream.
//
// When a session ends it prints "session-closed <error>".
//
// Flags: -keepalive <duration> enables smux keepalive with that interval and a
// timeout of 3x; without it keepalive is disabled (as the SSM agent does for current
// clients).
//
// Build offline: GO111MODULE=off GOPATH=/usr/share/gocode go build.
package main

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"sync"

	"github.com/xtaci/smux"
)

var (
	keepalive = flag.Duration("keepalive", 0, "smux keepalive interval (timeout = 3x); 0 disables keepalive")
	outMu     sync.Mutex
)

func say(format string, args ...interface{}) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Fprintf(os.Stdout, format+"\n", args...)
}

func main() {
	flag.Parse()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	say("port %d", ln.Addr().(*net.TCPAddr).Port)
	for {
		conn, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "accept:", err)
			os.Exit(1)
		}
		go serve(conn)
	}
}

func serve(conn net.Conn) {
	cfg := smux.DefaultConfig()
	if *keepalive > 0 {
		cfg.KeepAliveInterval = *keepalive
		cfg.KeepAliveTimeout = 3 * *keepalive
	} else {
		cfg.KeepAliveDisabled = true
	}
	sess, err := smux.Server(conn, cfg)
	if err != nil {
		say("session-closed %v", err)
		return
	}
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			say("session-closed %v", err)
			sess.Close()
			return
		}
		go echo(st)
	}
}

func echo(st *smux.Stream) {
	defer st.Close()
	var hdr [8]byte
	if _, err := io.ReadFull(st, hdr[:]); err != nil {
		say("error %d header: %v", st.ID(), err)
		return
	}
	n := binary.LittleEndian.Uint64(hdr[:])
	h := sha256.New()
	w := io.MultiWriter(st, h)
	if n == math.MaxUint64 {
		// Stream.WriteTo returns io.EOF once the peer's FIN is seen.
		c, err := io.Copy(w, st)
		if err != nil && err != io.EOF {
			say("error %d copy: %v", st.ID(), err)
			return
		}
		say("eof %d %d %s", st.ID(), c, hex.EncodeToString(h.Sum(nil)))
		return
	}
	c, err := io.CopyN(w, st, int64(n))
	if err != nil {
		say("error %d copy after %d bytes: %v", st.ID(), c, err)
		return
	}
	say("done %d %d %s", st.ID(), c, hex.EncodeToString(h.Sum(nil)))
}
