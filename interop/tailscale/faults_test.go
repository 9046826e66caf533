package tailscale

// Faults injected with Tailscale's own derphttp clients on the other side: the relay killed
// with SIGKILL, a client that stops reading, slowloris on the HTTP edge and on the WebSocket
// upgrade, and ten thousand connections opened at once.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tailnetd.test/interop/harness"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

// scrape returns the sum of every sample of the metric family name (all label sets) on s's
// metrics listener; a family that is absent is an error.
func scrape(t testing.TB, s *tailnetd, name string) float64 {
	t.Helper()
	addr := s.Process.Announcement().MetricsAddr
	if addr == "" {
		t.Fatalf("scrape %s: tailnetd was started without a metrics listener", name)
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", name, err)
	}
	defer resp.Body.Close()
	sum, found := 0.0, false
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		series := fields[0]
		if series != name && !strings.HasPrefix(series, name+"{") {
			continue
		}
		v, err := strconv.ParseFloat(fields[1], 64)
		if err != nil {
			t.Fatalf("scrape %s: bad sample %q", name, line)
		}
		sum += v
		found = true
	}
	if !found {
		t.Fatalf("scrape: no metric %s", name)
	}
	return sum
}

// TestFaultRelayKilled: Go clients relay through tailnetd; the relay is killed with SIGKILL (no
// drain, no ServerRestarting) and started again on the same ports with the same key file. The
// clients notice on their own, reconnect and relay again within 5 s of the new process being
// ready.
func TestFaultRelayKilled(t *testing.T) {
	e := newEnv(t)
	// Fixed ports, so that the process started again listens where the clients redial.
	s := e.start(serverOpts{httpAddr: harness.FreeTCPAddr(t), stunAddr: harness.FreeUDPAddr(t)})
	a := e.plainClient("alice", s, key.NewNode())
	b := e.plainClient("bob", s, key.NewNode())
	a.connect(t, s)
	b.connect(t, s)
	exchange(t, a, b, 1400)

	s.Kill()
	for _, p := range []*peer{a, b} {
		p.waitFor(t, 10*time.Second, "the connection to break after SIGKILL", true, func(ev event) bool { return ev.err != nil })
	}
	s.StartAgain(t)
	ready := time.Now()
	if got := s.Process.Announcement().DERPPublicKey; got != s.info.DERPPublicKey {
		t.Fatalf("server key changed across the kill: %s -> %s", s.info.DERPPublicKey, got)
	}

	// Both readers are back on a second connection, and packets flow both ways, within 5 s.
	for _, p := range []*peer{a, b} {
		p.waitFor(t, 5*time.Second, "a message on a new connection", true, func(ev event) bool {
			return ev.err == nil && ev.gen > 1
		})
	}
	pkt := payload(1400)
	deadline := ready.Add(5 * time.Second)
	for _, dir := range [][2]*peer{{a, b}, {b, a}} {
		from, to := dir[0], dir[1]
		from.send(t, to.pub, pkt)
		to.waitFor(t, time.Until(deadline), "a packet after the restart", false, func(ev event) bool {
			p, ok := ev.msg.(derp.ReceivedPacket)
			return ok && p.Source == from.pub && len(p.Data) == len(pkt)
		})
	}
	t.Logf("relaying again %v after the restarted relay was ready", time.Since(ready).Round(time.Millisecond))
}

// TestFaultClientStopsReading: a client that stops reading while a sender floods it. derper's
// rule: a frame the server cannot write within 2 s ends that client's connection. Meanwhile
// another pair's packets flow, and the flooded client's packets are dropped, not queued without
// bound.
func TestFaultClientStopsReading(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{metrics: true})

	// The stalled client: connected, then never read from.
	stalledPriv := key.NewNode()
	stalled, err := derphttp.NewClient(stalledPriv, "http://"+s.info.HTTPAddr+"/derp", prefixLogf(e.logf, "stalled"), newNetMon())
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := stalled.Connect(ctx); err != nil {
		t.Fatalf("stalled client connect: %v", err)
	}

	flooder := e.plainClient("flooder", s, key.NewNode())
	a := e.plainClient("alice", s, key.NewNode())
	b := e.plainClient("bob", s, key.NewNode())
	for _, p := range []*peer{flooder, a, b} {
		p.connect(t, s)
	}

	timeoutsBefore := scrape(t, s, "derp_sclient_write_timeouts")
	stop := make(chan struct{})
	var sent atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		big := payload(64 * 1024)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := flooder.c.Send(stalledPriv.Public(), big); err != nil {
				return
			}
			sent.Add(1)
		}
	}()

	// Everyone else's traffic flows while the flood goes on.
	flowUntil := time.Now().Add(4 * time.Second)
	for i := 0; time.Now().Before(flowUntil); i++ {
		exchange(t, a, b, 1400)
		time.Sleep(50 * time.Millisecond)
	}

	// The server gives up on the stalled client after its 2 s write deadline.
	waitCtx, waitCancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer waitCancel()
	for scrape(t, s, "derp_sclient_write_timeouts") <= timeoutsBefore {
		if waitCtx.Err() != nil {
			t.Fatalf("the stalled client was not disconnected for its write deadline (%d 64 KiB packets sent at it)", sent.Load())
		}
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if dropped := scrape(t, s, "derp_packets_dropped"); dropped == 0 {
		t.Errorf("a flood at a client that does not read dropped nothing (%d packets sent)", sent.Load())
	}

	// Its connection is over: reading now finds the end after at most what was in flight.
	readDeadline := time.Now().Add(10 * time.Second)
	for {
		if time.Now().After(readDeadline) {
			t.Fatal("the stalled client's connection is still delivering 10 s after the server dropped it")
		}
		_, gen, err := stalled.RecvDetail()
		if err != nil || gen > 1 {
			break
		}
	}
	exchange(t, a, b, 1400)
	t.Logf("flood of %d × 64 KiB; stalled client disconnected by the write deadline; others unaffected", sent.Load())
}

// slowlorisConn opens a connection and writes head, the beginning of a request head, then one
// more byte per second until the connection ends. It returns when the server closes it (or
// after limit), with the time that took.
func slowlorisConn(from, addr, head string, limit time.Duration) (time.Duration, error) {
	start := time.Now()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if _, err := io.WriteString(c, head); err != nil {
		return time.Since(start), nil
	}
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		buf := make([]byte, 4096)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
		}
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-closed:
			return time.Since(start), nil
		case <-tick.C:
			if time.Since(start) > limit {
				return time.Since(start), fmt.Errorf("still open after %v", limit)
			}
			if _, err := io.WriteString(c, "X"); err != nil {
				<-closed
				return time.Since(start), nil
			}
		}
	}
}

// TestFaultSlowloris: clients that trickle a request head one byte a second, to the HTTP edge
// and as a WebSocket upgrade, and upgraded connections that never send the DERP handshake. The
// per-address cap bounds how many one address holds, every held one is closed at its deadline
// (30 s for a request head, 10 s for the DERP handshake after the upgrade), and a Go client from
// another address relays all the while.
func TestFaultSlowloris(t *testing.T) {
	e := newEnv(t)
	const perAddressCap = 40
	s := e.start(serverOpts{metrics: true, extraArgs: []string{
		"--relay-max-connections-per-ip", strconv.Itoa(perAddressCap),
	}})
	// The attacker comes from 127.0.0.5 (and 127.0.0.3); the Go clients from 127.0.0.1.
	attacked := s.info.HTTPAddr

	heads := map[string]string{
		"http":      "GET /derp HTTP/1.1\r\nHost: derp.example\r\nUser-Agent: slow",
		"websocket": "GET /derp HTTP/1.1\r\nHost: derp.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: derp\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Slow: ",
	}
	const perKind = 30 // 60 in all, over the cap of 40
	type result struct {
		kind string
		took time.Duration
		err  error
	}
	results := make(chan result, 2*perKind)
	for kind, head := range heads {
		for i := 0; i < perKind; i++ {
			go func() {
				took, err := slowlorisConn("127.0.0.5", attacked, head, 45*time.Second)
				results <- result{kind, took, err}
			}()
		}
	}
	// Upgraded to DERP, then silent: the DERP handshake deadline ends these.
	const silentUpgrades = 5
	silent := make(chan result, silentUpgrades)
	for i := 0; i < silentUpgrades; i++ {
		go func() {
			start := time.Now()
			conn, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.3")}}).Dial("tcp", attacked)
			if err != nil {
				silent <- result{"silent", 0, err}
				return
			}
			defer conn.Close()
			io.WriteString(conn, "GET /derp HTTP/1.1\r\nHost: derp.example\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
			// The ServerKey frame, then nothing until the server closes (FIN or RST alike).
			_, _ = io.Copy(io.Discard, conn)
			silent <- result{"silent", time.Since(start), nil}
		}()
	}

	// Meanwhile a Go client pair from another address relays.
	time.Sleep(2 * time.Second)
	a := e.plainClient("alice", s, key.NewNode())
	b := e.plainClient("bob", s, key.NewNode())
	a.connect(t, s)
	b.connect(t, s)
	exchange(t, a, b, 1400)
	if held := scrape(t, s, "derp_listener_rejected_connections_total"); held < float64(2*perKind-perAddressCap) {
		t.Errorf("per-address cap: %v connections rejected, want at least %d of the %d slow ones", held, 2*perKind-perAddressCap, 2*perKind)
	}

	for i := 0; i < silentUpgrades; i++ {
		r := <-silent
		if r.err != nil {
			t.Errorf("silent DERP upgrade: %v", r.err)
		} else if r.took > 15*time.Second {
			t.Errorf("a DERP connection that never sent ClientInfo was held %v (handshake deadline 10 s)", r.took)
		}
	}
	var longest time.Duration
	for i := 0; i < 2*perKind; i++ {
		r := <-results
		if r.err != nil {
			t.Errorf("slowloris %s: %v", r.kind, r.err)
		}
		if r.took > longest {
			longest = r.took
		}
	}
	if longest > 35*time.Second {
		t.Errorf("a trickled request head was held %v (head deadline 30 s)", longest)
	}
	exchange(t, a, b, 1400)
	t.Logf("slowloris: the longest held connection lasted %v", longest.Round(time.Second))
}

// TestFaultTenThousandConnections: 10,000 connections opened at once from four addresses
// against a relay with an accept limit. The limiter holds (excess connections closed at once and
// counted), the process does not crash, and afterwards Go clients connect and relay.
func TestFaultTenThousandConnections(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{metrics: true, extraArgs: []string{
		"--relay-accept-connection-limit", "2000",
		"--relay-accept-connection-burst", "1000",
	}})
	_, port, _ := net.SplitHostPort(s.info.HTTPAddr)

	const total = 10000
	var (
		mu     sync.Mutex
		conns  []net.Conn
		failed int
		wg     sync.WaitGroup
	)
	start := time.Now()
	sem := make(chan struct{}, 512) // dials in flight from this process
	for i := 0; i < total; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			src := net.ParseIP(fmt.Sprintf("127.0.1.%d", 1+i%4))
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Timeout: 10 * time.Second}
			c, err := d.Dial("tcp", "127.0.0.1:"+port)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed++
				return
			}
			conns = append(conns, c)
		}(i)
	}
	wg.Wait()
	opened := time.Since(start)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// Let the server work through its accept queue.
	time.Sleep(2 * time.Second)
	rejected := scrape(t, s, "derp_listener_rejected_connections_total")
	accepted := scrape(t, s, "derp_listener_accepted_connections_total") // rejected ones included
	elapsed := time.Since(start).Seconds()
	t.Logf("%d connections in %v (%d failed to dial); server: %v accepted, %v of them closed at once", len(conns), opened.Round(time.Millisecond), failed, accepted, rejected)
	if rejected == 0 {
		t.Errorf("an accept limit of 2000/s with a burst of 1000 rejected none of %d connections", total)
	}
	if kept, max := accepted-rejected, 1000+2000*elapsed+64; kept > max {
		t.Errorf("accept limiter let %v connections through in %.1f s, at most %.0f allowed", kept, elapsed, max)
	}
	for _, c := range conns {
		c.Close()
	}
	conns = nil

	// The process is alive and serves: health, and Go clients relaying.
	resp, err := http.Get("http://" + s.info.HTTPAddr + "/healthz")
	if err != nil {
		t.Fatalf("/healthz after the flood: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/healthz after the flood: %s", resp.Status)
	}
	a := e.plainClient("alice", s, key.NewNode())
	b := e.plainClient("bob", s, key.NewNode())
	a.connect(t, s)
	b.connect(t, s)
	exchange(t, a, b, 1400)
}
