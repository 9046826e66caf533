package tailscale

import (
	"bytes"
	"os"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/types/key"
)

// TestRestart: Go clients connected; tailnetd gets SIGTERM (must exit 0);
// a new tailnetd on the same ports with the same key file comes up; the
// clients reconnect by themselves (derphttp reconnects on the next
// Send/Recv after an error), packets flow again and the server key is
// unchanged.
func TestRestart(t *testing.T) {
	e := newEnv(t)
	s1 := e.start(serverOpts{})
	keyBefore, err := os.ReadFile(s1.opts.keyFile)
	if err != nil {
		t.Fatalf("key file %s not written by tailnetd: %v", s1.opts.keyFile, err)
	}
	a := e.plainClient("alice", s1, key.NewNode())
	b := e.plainClient("bob", s1, key.NewNode())
	a.connect(t, s1)
	b.connect(t, s1)
	pkt := payload(1400)
	a.send(t, b.pub, pkt)
	b.waitPacket(t, a.pub, pkt)
	serverKey := a.c.ServerPublicKey()

	if err := s1.Stop(); err != nil {
		t.Errorf("tailnetd after SIGTERM: %v (binary contract: SIGTERM drains and exits 0)", err)
	}
	// Both readers must notice the connection ending (EOF, or a
	// ServerRestarting frame first).
	for _, p := range []*peer{a, b} {
		p.waitFor(t, 10*time.Second, "the connection to end after SIGTERM", true, func(ev event) bool {
			if _, ok := ev.msg.(derp.ServerRestartingMessage); ok {
				e.logf("[%s] got ServerRestartingMessage %+v", p.name, ev.msg)
			}
			return ev.err != nil
		})
	}

	s2 := e.start(serverOpts{
		httpAddr: s1.info.HTTPAddr,
		stunAddr: s1.info.STUNAddr,
		keyFile:  s1.opts.keyFile,
	})
	if s2.info.DERPPublicKey != s1.info.DERPPublicKey {
		t.Fatalf("server key changed across restart with the same key file: %s -> %s", s1.info.DERPPublicKey, s2.info.DERPPublicKey)
	}
	if s2.info.HTTPAddr != s1.info.HTTPAddr {
		t.Fatalf("restarted on %s, asked for %s", s2.info.HTTPAddr, s1.info.HTTPAddr)
	}
	keyAfter, err := os.ReadFile(s1.opts.keyFile)
	if err != nil || !bytes.Equal(keyBefore, keyAfter) {
		t.Errorf("key file rewritten across restart (err %v)", err)
	}

	// Both readers reconnect on their own (their loop keeps calling Recv);
	// the first message on the new connection must be ServerInfo again.
	for _, p := range []*peer{a, b} {
		ev := p.waitFor(t, 15*time.Second, "a message on a new connection", true, func(ev event) bool {
			return ev.err == nil && ev.gen > 1
		})
		if _, ok := ev.msg.(derp.ServerInfoMessage); !ok {
			t.Fatalf("%s: first message after reconnect is %s, want ServerInfoMessage", p.name, describe(ev.msg))
		}
	}
	if got := a.c.ServerPublicKey(); got != serverKey {
		t.Fatalf("alice sees server key %s after restart, %s before", got, serverKey)
	}

	// Packets flow again, both ways.
	for _, dir := range [][2]*peer{{a, b}, {b, a}} {
		from, to := dir[0], dir[1]
		pkt := payload(1400)
		deadline := time.Now().Add(10 * time.Second)
		for {
			if err := from.c.Send(to.pub, pkt); err != nil {
				e.logf("[%s] Send after restart: %v", from.name, err)
			}
			ev, ok := tryWaitPacket(to, pkt, 300*time.Millisecond)
			if ok {
				if rp := ev.msg.(derp.ReceivedPacket); rp.Source != from.pub {
					t.Fatalf("%s: packet source %s, want %s", to.name, rp.Source, from.pub)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s -> %s: no packet delivered within 10s after restart", from.name, to.name)
			}
		}
	}
}

// tryWaitPacket waits up to d for packet data on p, ignoring other events.
func tryWaitPacket(p *peer, data []byte, d time.Duration) (event, bool) {
	deadline := time.After(d)
	for {
		select {
		case ev := <-p.events:
			if rp, ok := ev.msg.(derp.ReceivedPacket); ok && bytes.Equal(rp.Data, data) {
				return ev, true
			}
		case <-deadline:
			return event{}, false
		}
	}
}
