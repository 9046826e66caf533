//go:build ts_debug_websockets

package tailscale

import (
	"crypto/tls"
	"log"
	"net/http"
	"strings"
	"testing"
	"time"

	"tailnetd.test/interop/harness"
	"tailscale.com/types/key"
)

// TestWebSocketTagged: DERP over WebSocket (Sec-WebSocket-Protocol: derp,
// binary messages as a byte stream) with derphttp's own WebSocket dialer
// (build tag ts_debug_websockets + env TS_DEBUG_DERP_WS_CLIENT=1), plain and
// over TLS. Run through TestWebSocket in the default build.
func TestWebSocketTagged(t *testing.T) {
	t.Setenv("TS_DEBUG_DERP_WS_CLIENT", "1")
	t.Run("Plain", func(t *testing.T) {
		e := newEnv(t)
		captureStdLog(t, e)
		s := e.start(serverOpts{})
		url := "http://" + s.info.HTTPAddr + "/derp"
		a := e.urlClient("alice", url, key.NewNode())
		b := e.urlClient("bob", url, key.NewNode())
		a.connect(t, s)
		b.connect(t, s)
		requireWebSocket(t, e)
		exchange(t, a, b, 1, 1400)
		t.Run("64KiB", func(t *testing.T) { exchangeLarge(t, a, b) })
	})
	t.Run("TLS", func(t *testing.T) {
		e := newEnv(t)
		captureStdLog(t, e)
		cert := harness.SelfSignedCert(t, e.dir)
		s := e.start(serverOpts{tls: cert})
		// derphttp's WebSocket dialer uses coder/websocket with its default
		// HTTP client, i.e. http.DefaultTransport: trust the test cert there.
		tr := http.DefaultTransport.(*http.Transport)
		old := tr.TLSClientConfig
		tr.TLSClientConfig = &tls.Config{RootCAs: cert.Pool}
		t.Cleanup(func() {
			tr.TLSClientConfig = old
			tr.CloseIdleConnections()
		})
		url := "https://localhost:" + portString(s.info.HTTPSAddr) + "/derp"
		a := e.urlClient("alice", url, key.NewNode())
		b := e.urlClient("bob", url, key.NewNode())
		a.connect(t, s)
		b.connect(t, s)
		requireWebSocket(t, e)
		exchange(t, a, b, 1, 1400)
		if err := a.c.Ping(ctxTimeout(t, 5*time.Second)); err != nil {
			t.Fatalf("Ping over WebSocket: %v", err)
		}
		t.Run("64KiB", func(t *testing.T) { exchangeLarge(t, a, b) })
	})
}

// exchangeLarge sends 65536-byte packets both ways. The Go client writes
// such a frame as one ~64 KiB WebSocket message, and reads with
// coder/websocket's default 32768-byte per-message limit (net/wsconn never
// raises it), so the server must accept big messages and must split what it
// sends into messages of at most 32768 bytes. Go's derper fails this case
// (its own read limit is also 32768 bytes).
func exchangeLarge(t *testing.T, a, b *peer) {
	t.Helper()
	exchange(t, a, b, 65536)
	for _, p := range []*peer{a, b} {
		if err := p.c.Ping(ctxTimeout(t, 5*time.Second)); err != nil {
			t.Fatalf("%s: Ping after 64 KiB packets: %v", p.name, err)
		}
	}
}

// captureStdLog routes the standard logger (derphttp's WebSocket dialer
// logs with log.Printf) into the test's client log.
func captureStdLog(t *testing.T, e *env) {
	old := log.Writer()
	log.SetOutput(logWriter{e})
	t.Cleanup(func() { log.SetOutput(old) })
}

type logWriter struct{ e *env }

func (w logWriter) Write(p []byte) (int, error) {
	w.e.logf("[stdlog] %s", p)
	return len(p), nil
}

// requireWebSocket makes sure the clients really dialed WebSocket (and did
// not silently fall back to Upgrade: DERP).
func requireWebSocket(t *testing.T, e *env) {
	t.Helper()
	logs := e.clientLog.String()
	if !strings.Contains(logs, "connecting websocket to") || !strings.Contains(logs, "websocket: connected to") {
		t.Fatalf("derphttp did not use its WebSocket dialer (is the ts_debug_websockets tag set?)")
	}
}

func portString(addr string) string {
	i := strings.LastIndexByte(addr, ':')
	return addr[i+1:]
}
