package tailscale

// Thin wrappers that run the real tailscale.com derphttp client: one reader
// goroutine per client loops on RecvDetail (which is also what makes Ping
// work and what reconnects after errors, as magicsock does) and hands copies
// of the messages to the test.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// event is one result of derphttp.Client.RecvDetail.
type event struct {
	msg derp.ReceivedMessage // copied; never aliases client memory
	gen int                  // connection generation (1 = first connection)
	err error
	at  time.Time
}

func (ev event) String() string {
	if ev.err != nil {
		return fmt.Sprintf("gen %d: error %v", ev.gen, ev.err)
	}
	return fmt.Sprintf("gen %d: %s", ev.gen, describe(ev.msg))
}

func describe(m derp.ReceivedMessage) string {
	switch m := m.(type) {
	case derp.ReceivedPacket:
		return fmt.Sprintf("ReceivedPacket{from %s, %d bytes}", m.Source.ShortString(), len(m.Data))
	case derp.PeerGoneMessage:
		return fmt.Sprintf("PeerGoneMessage{%s, reason %#x}", m.Peer.ShortString(), byte(m.Reason))
	case nil:
		return "<nil>"
	default:
		return fmt.Sprintf("%T%+v", m, m)
	}
}

// peer is a derphttp.Client plus its reader goroutine.
type peer struct {
	name   string
	e      *env
	c      *derphttp.Client
	priv   key.NodePrivate
	pub    key.NodePublic
	events chan event
	done   chan struct{}
	exited chan struct{}
}

func newNetMon() *netmon.Monitor { return netmon.NewStatic() }

// urlClient dials a DERP URL (http:// for plain Upgrade: DERP, https:// for TLS).
func (e *env) urlClient(name, url string, priv key.NodePrivate) *peer {
	e.t.Helper()
	c, err := derphttp.NewClient(priv, url, prefixLogf(e.logf, name), newNetMon())
	if err != nil {
		e.t.Fatalf("derphttp.NewClient(%q): %v", url, err)
	}
	return e.run(name, c, priv)
}

// plainClient uses http://<http_addr>/derp (HTTP/1.1 Upgrade: DERP, no TLS).
func (e *env) plainClient(name string, s *tailnetd, priv key.NodePrivate) *peer {
	e.t.Helper()
	return e.urlClient(name, "http://"+s.info.HTTPAddr+"/derp", priv)
}

// testRegion is a one-node DERP region pointing at s's TLS port, trusting
// its self-signed certificate via InsecureForTests, as Tailscale's own
// integration tests do.
func testRegion(t testing.TB, s *tailnetd) *tailcfg.DERPRegion {
	return &tailcfg.DERPRegion{
		RegionID:   900,
		RegionCode: "tailnetd-test",
		RegionName: "tailnetd interop",
		Nodes: []*tailcfg.DERPNode{{
			Name:             "900a",
			RegionID:         900,
			HostName:         "localhost",
			IPv4:             "127.0.0.1",
			IPv6:             "none",
			DERPPort:         port(t, s.info.HTTPSAddr),
			STUNPort:         port(t, s.info.STUNAddr),
			InsecureForTests: true,
		}},
	}
}

// regionClient uses derphttp.NewRegionClient against s's TLS listener.
func (e *env) regionClient(name string, s *tailnetd, priv key.NodePrivate) *peer {
	e.t.Helper()
	return e.regionClientFor(name, testRegion(e.t, s), priv)
}

// regionClientFor uses derphttp.NewRegionClient with the given region.
func (e *env) regionClientFor(name string, reg *tailcfg.DERPRegion, priv key.NodePrivate) *peer {
	e.t.Helper()
	c := derphttp.NewRegionClient(priv, prefixLogf(e.logf, name), newNetMon(), func() *tailcfg.DERPRegion { return reg })
	return e.run(name, c, priv)
}

func prefixLogf(logf func(string, ...any), name string) func(string, ...any) {
	return func(format string, args ...any) { logf("["+name+"] "+format, args...) }
}

func (e *env) run(name string, c *derphttp.Client, priv key.NodePrivate) *peer {
	p := &peer{
		name:   name,
		e:      e,
		c:      c,
		priv:   priv,
		pub:    priv.Public(),
		events: make(chan event, 256),
		done:   make(chan struct{}),
		exited: make(chan struct{}),
	}
	go p.readLoop()
	e.t.Cleanup(p.close)
	return p
}

func (p *peer) readLoop() {
	defer close(p.exited)
	for {
		m, gen, err := p.c.RecvDetail()
		if errors.Is(err, derphttp.ErrClientClosed) {
			return
		}
		ev := event{msg: copyMsg(m), gen: gen, err: err, at: time.Now()}
		if err != nil {
			p.e.logf("[%s] Recv error: %v", p.name, err)
		}
		select {
		case p.events <- ev:
		case <-p.done:
			return
		}
		if err != nil {
			// derphttp reconnects on the next call; don't spin while the
			// server is down.
			select {
			case <-time.After(100 * time.Millisecond):
			case <-p.done:
				return
			}
		}
	}
}

func copyMsg(m derp.ReceivedMessage) derp.ReceivedMessage {
	if pkt, ok := m.(derp.ReceivedPacket); ok {
		pkt.Data = bytes.Clone(pkt.Data)
		return pkt
	}
	return m
}

// close closes the client and waits for its reader to stop.
func (p *peer) close() {
	select {
	case <-p.done:
		return
	default:
	}
	close(p.done)
	p.c.Close()
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
	}
}

// next returns the next event or fails the test after timeout.
func (p *peer) next(t testing.TB, timeout time.Duration, what string) event {
	t.Helper()
	select {
	case ev := <-p.events:
		return ev
	case <-time.After(timeout):
		t.Fatalf("%s: nothing received within %v while waiting for %s", p.name, timeout, what)
		return event{}
	}
}

// connect waits for the connection to come up and checks the contract that
// the first message a client receives is ServerInfo, and that the server's
// key is the one tailnetd announced.
func (p *peer) connect(t testing.TB, s *tailnetd) {
	t.Helper()
	ev := p.next(t, 15*time.Second, "derp.ServerInfoMessage")
	if ev.err != nil {
		t.Fatalf("%s: connect/first Recv failed: %v", p.name, ev.err)
	}
	if _, ok := ev.msg.(derp.ServerInfoMessage); !ok {
		t.Fatalf("%s: first message after connect is %s, want derp.ServerInfoMessage", p.name, describe(ev.msg))
	}
	if got := p.c.ServerPublicKey().String(); got != s.info.DERPPublicKey {
		t.Fatalf("%s: server key seen by client %s != readiness line %s", p.name, got, s.info.DERPPublicKey)
	}
}

// waitFor returns the first message matching match, skipping KeepAlive and
// ignoring (but remembering) other messages. Any Recv error fails unless
// tolerateErrors is set.
func (p *peer) waitFor(t testing.TB, timeout time.Duration, what string, tolerateErrors bool, match func(event) bool) event {
	t.Helper()
	deadline := time.After(timeout)
	var seen []string
	for {
		select {
		case ev := <-p.events:
			if ev.err != nil && !tolerateErrors {
				t.Fatalf("%s: Recv error while waiting for %s: %v (seen before: %v)", p.name, what, ev.err, seen)
			}
			if match(ev) {
				return ev
			}
			if _, ka := ev.msg.(derp.KeepAliveMessage); !ka {
				seen = append(seen, ev.String())
			}
		case <-deadline:
			t.Fatalf("%s: no %s within %v; other events: %v", p.name, what, timeout, seen)
			return event{}
		}
	}
}

// waitPacket waits for a packet from src with exactly payload.
func (p *peer) waitPacket(t testing.TB, src key.NodePublic, payload []byte) {
	t.Helper()
	what := fmt.Sprintf("a %d-byte packet from %s", len(payload), src.ShortString())
	ev := p.waitFor(t, 10*time.Second, what, false, func(ev event) bool {
		pkt, ok := ev.msg.(derp.ReceivedPacket)
		return ok && len(pkt.Data) == len(payload)
	})
	pkt := ev.msg.(derp.ReceivedPacket)
	if pkt.Source != src {
		t.Fatalf("%s: packet source %s, want %s", p.name, pkt.Source, src)
	}
	if !bytes.Equal(pkt.Data, payload) {
		t.Fatalf("%s: %d-byte packet from %s has different content", p.name, len(payload), src.ShortString())
	}
}

// expectNoPacket fails if a data packet is queued or arrives within d.
func (p *peer) expectNoPacket(t testing.TB, d time.Duration) {
	t.Helper()
	check := func(ev event) {
		t.Helper()
		if ev.err != nil {
			t.Fatalf("%s: Recv error: %v", p.name, ev.err)
		}
		if pkt, ok := ev.msg.(derp.ReceivedPacket); ok {
			t.Fatalf("%s: unexpectedly received %d-byte packet from %s", p.name, len(pkt.Data), pkt.Source.ShortString())
		}
	}
	deadline := time.After(d)
	for {
		select {
		case ev := <-p.events: // drain what is already queued first
			check(ev)
			continue
		default:
		}
		select {
		case ev := <-p.events:
			check(ev)
		case <-deadline:
			return
		}
	}
}

// send sends b to dst and fails the test on error.
func (p *peer) send(t testing.TB, dst key.NodePublic, b []byte) {
	t.Helper()
	if err := p.c.Send(dst, b); err != nil {
		t.Fatalf("%s: Send(%d bytes to %s): %v", p.name, len(b), dst.ShortString(), err)
	}
}

// payload returns n random bytes that do not look like a disco packet.
func payload(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	b[0] = 0x04 // WireGuard transport-data message type
	return b
}

// discoMagic is disco.Magic ("TS" + U+1F4AC).
const discoMagic = "TS\xf0\x9f\x92\xac"

// discoPacket returns a minimal packet that derper classifies as disco:
// magic, 32-byte sender disco key, 24-byte nonce (62 bytes).
func discoPacket() []byte {
	b := make([]byte, 0, 62)
	b = append(b, discoMagic...)
	k := make([]byte, 32)
	rand.Read(k)
	b = append(b, k...)
	b = append(b, make([]byte, 24)...)
	return b
}

var packetSizes = []int{1, 1400, 65536}

// exchange sends packets of every size (default packetSizes) in both
// directions and checks them.
func exchange(t *testing.T, a, b *peer, sizes ...int) {
	t.Helper()
	if len(sizes) == 0 {
		sizes = packetSizes
	}
	for _, dir := range [][2]*peer{{a, b}, {b, a}} {
		from, to := dir[0], dir[1]
		for _, n := range sizes {
			pkt := payload(n)
			from.send(t, to.pub, pkt)
			to.waitPacket(t, from.pub, pkt)
		}
	}
}

// metaKeyHex extracts the hex of a "nodekey:<hex>" string.
func metaKeyHex(nodekey string) string { return strings.TrimPrefix(nodekey, "nodekey:") }

func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
