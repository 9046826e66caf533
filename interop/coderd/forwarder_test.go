package coderdinterop

// coderd's stable address. coderdtest binds every coderd it starts to a new ephemeral port, but
// tailnetd's --upstream is fixed at start-up, like a real deployment where coderd comes back on
// the same address after a restart. The forwarder is that address: a plain TCP splice to the
// current coderd. While coderd is "down" it accepts and immediately closes connections (what a
// client sees from a restarting server's load balancer), and going down cuts every spliced
// connection with a RST, as a dying process would.

import (
	"io"
	"net"
	"sync"
	"testing"
)

type tcpForwarder struct {
	ln net.Listener

	mu     sync.Mutex
	target string // "" while coderd is down
	conns  map[net.Conn]struct{}
}

func newTCPForwarder(t *testing.T) *tcpForwarder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &tcpForwarder{ln: ln, conns: map[net.Conn]struct{}{}}
	go f.acceptLoop()
	t.Cleanup(func() {
		_ = ln.Close()
		f.setTarget("")
	})
	return f
}

func (f *tcpForwarder) addr() string { return f.ln.Addr().String() }

// setTarget points new connections at addr; an empty addr takes coderd down and cuts every
// open connection.
func (f *tcpForwarder) setTarget(addr string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.target = addr
	if addr != "" {
		return
	}
	for c := range f.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = c.Close()
	}
	f.conns = map[net.Conn]struct{}{}
}

func (f *tcpForwarder) acceptLoop() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		go f.splice(c)
	}
}

func (f *tcpForwarder) track(cs ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.target == "" {
		return false
	}
	for _, c := range cs {
		f.conns[c] = struct{}{}
	}
	return true
}

func (f *tcpForwarder) untrack(cs ...net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range cs {
		delete(f.conns, c)
	}
}

func (f *tcpForwarder) splice(in net.Conn) {
	f.mu.Lock()
	target := f.target
	f.mu.Unlock()
	if target == "" {
		_ = in.Close()
		return
	}
	out, err := net.Dial("tcp", target)
	if err != nil {
		_ = in.Close()
		return
	}
	if !f.track(in, out) {
		_ = in.Close()
		_ = out.Close()
		return
	}
	defer f.untrack(in, out)
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go pipe(out, in)
	go pipe(in, out)
	<-done
	<-done
	_ = in.Close()
	_ = out.Close()
}
