package main

import (
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"testing"
	"time"

	"tailnetd.test/interop/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

// TestRunAgainstTailnetd runs the generator for one second, closed loop and open loop, plain
// and over TLS, against a real tailnetd relay and checks that it delivered packets through it
// and reported them.
func TestRunAgainstTailnetd(t *testing.T) {
	dir := t.TempDir()
	cert := harness.SelfSignedCert(t, dir)
	certFile, keyFile := cert.CertFile, cert.KeyFile
	p := harness.Start(t, harness.Options{
		Args: []string{"derp",
			"--http-addr", "127.0.0.1:0",
			"--https-addr", "127.0.0.1:0",
			"--tls-cert", certFile,
			"--tls-key", keyFile,
			"--stun-addr", "",
			"--metrics-addr", "",
			"--key-file", filepath.Join(dir, "derp.key"),
		},
		LogFilter: "warn",
		Require:   []string{"https_addr"},
	})
	a := p.Announcement()
	_, httpsPort, err := net.SplitHostPort(a.HTTPSAddr)
	if err != nil {
		t.Fatal(err)
	}
	plain, tls := "http://"+a.HTTPAddr+"/derp", "https://localhost:"+httpsPort+"/derp"
	for _, tc := range []struct {
		name, url, ca, transport string
		window                   uint64
		rate                     float64
		ws                       bool
	}{
		{"closed-loop", plain, "", "derp", 32, 0, false},
		{"open-loop", plain, "", "derp", 0, 2000, false},
		{"tls-closed-loop", tls, certFile, "tls", 32, 0, false},
		// Run by TestWebSocket (a child go test with Tailscale's WebSocket build tag).
		{"ws-closed-loop", plain, "", "ws", 32, 0, true},
		{"wss-closed-loop", tls, certFile, "wss", 32, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.ws && !wsCompiled {
				t.Skip("needs -tags ts_debug_websockets (TestWebSocket runs it)")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			r, err := run(ctx, config{
				url: tc.url, pairs: 4, size: 1400, rate: tc.rate, duration: 1, warmup: 0.2,
				window: tc.window, caFile: tc.ca, ws: tc.ws,
			})
			if err != nil {
				t.Fatal(err)
			}
			js, _ := json.Marshal(r)
			t.Logf("%s", js)
			if r.Transport != tc.transport {
				t.Fatalf("transport %q, want %q", r.Transport, tc.transport)
			}
			if r.ReceivedWindow == 0 || r.DeliveredPPS <= 0 {
				t.Fatalf("delivered nothing: %+v", *r)
			}
			if r.ReceivedTotal > r.SentTotal || r.Errors != 0 {
				t.Fatalf("received %d of %d sent, %d errors", r.ReceivedTotal, r.SentTotal, r.Errors)
			}
			if tc.window > 0 && r.Drops != 0 {
				t.Fatalf("closed loop lost %d packets (%d stalls)", r.Drops, r.WindowStalls)
			}
			if tc.rate > 0 && (r.ActualOfferedPPS < tc.rate/2 || r.ActualOfferedPPS > tc.rate*1.5) {
				t.Fatalf("offered %.0f pps, asked for %.0f", r.ActualOfferedPPS, tc.rate)
			}
			if r.LatencyP50us <= 0 || r.LoadgenCPUs == nil || *r.LoadgenCPUs <= 0 {
				t.Fatalf("no latency or CPU figure: %+v", *r)
			}
		})
	}
}

func TestHistQuantiles(t *testing.T) {
	var h hist
	for v := uint64(1); v <= 100000; v++ {
		h.record(v)
	}
	for _, q := range []float64{0.5, 0.99} {
		got, want := float64(h.quantile(q)), q*100000
		if got < want*0.97 || got > want*1.01 {
			t.Errorf("quantile(%v) = %v, want ≈ %v", q, got, want)
		}
	}
	if h.max != 100000 {
		t.Errorf("max %d", h.max)
	}
}
