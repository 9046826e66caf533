package tailscale

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"tailnetd.test/interop/harness"
	"tailscale.com/derp/derphttp"
)

// TestHTTPSLatencyCheck: what netcheck does when UDP is blocked
// (netcheck.measureHTTPSLatency): derphttp.NewNetcheckClient().DialRegionTLS
// to the region, then `GET https://<HostName>/derp/latency-check` over that
// one TLS connection; any status above 299 counts as a failure.
func TestHTTPSLatencyCheck(t *testing.T) {
	e := newEnv(t)
	cert := harness.SelfSignedCert(t, e.dir)
	s := e.start(serverOpts{tls: cert})
	reg := testRegion(t, s)

	ctx := ctxTimeout(t, 10*time.Second)
	dc := derphttp.NewNetcheckClient(e.logf, newNetMon())
	defer dc.Close()
	tlsConn, tcpConn, node, err := dc.DialRegionTLS(ctx, reg)
	if err != nil {
		t.Fatalf("DialRegionTLS: %v", err)
	}
	defer tcpConn.Close()
	connc := make(chan *tls.Conn, 1)
	connc <- tlsConn
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(context.Context, string, string) (net.Conn, error) {
			return nil, errors.New("unexpected plain dial")
		},
		DialTLSContext: func(context.Context, string, string) (net.Conn, error) {
			select {
			case c := <-connc:
				return c, nil
			default:
				return nil, errors.New("only one conn expected")
			}
		},
	}}
	req, err := http.NewRequestWithContext(ctx, "GET", "https://"+node.HostName+"/derp/latency-check", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("GET /derp/latency-check: %v", err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 8<<10))
	resp.Body.Close()
	if resp.StatusCode > 299 {
		t.Fatalf("GET /derp/latency-check: %s; netcheck treats >299 as failure", resp.Status)
	}
}

// TestProbeEndpoints: /derp/probe and /derp/latency-check (GET and HEAD ->
// 200 with Access-Control-Allow-Origin: *; browsers' netcheck uses HEAD
// /derp/probe), /derp with no upgrade -> 426, and /generate_204 with the
// X-Tailscale-Challenge echo that net/captivedetection checks.
func TestProbeEndpoints(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	base := "http://" + s.info.HTTPAddr
	hc := &http.Client{Timeout: 5 * time.Second}
	for _, path := range []string{"/derp/probe", "/derp/latency-check"} {
		for _, method := range []string{"GET", "HEAD"} {
			req, _ := http.NewRequest(method, base+path, nil)
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatalf("%s %s: %v", method, path, err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Errorf("%s %s: %s, want 200", method, path, resp.Status)
			}
			if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "*" {
				t.Errorf("%s %s: Access-Control-Allow-Origin %q, want \"*\"", method, path, got)
			}
		}
	}
	resp, err := hc.Get(base + "/derp")
	if err != nil {
		t.Fatalf("GET /derp without upgrade: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Errorf("GET /derp without Upgrade: %s, want 426", resp.Status)
	}

	req, _ := http.NewRequest("GET", base+"/generate_204", nil)
	req.Header.Set("X-Tailscale-Challenge", "ts_localhost")
	resp, err = hc.Do(req)
	if err != nil {
		t.Fatalf("GET /generate_204: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Errorf("GET /generate_204: %s, want 204", resp.Status)
	}
	if got := resp.Header.Get("X-Tailscale-Response"); got != "response ts_localhost" {
		t.Errorf("GET /generate_204: X-Tailscale-Response %q, want %q", got, "response ts_localhost")
	}
}
