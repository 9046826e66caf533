package tailscale

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"tailscale.com/net/stun"
)

// TestSTUN: a Tailscale binding request (stun.Request: SOFTWARE "tailnode",
// FINGERPRINT) to tailnetd's STUN port is answered; stun.ParseResponse
// returns our transaction id and our own 127.0.0.1:port.
func TestSTUN(t *testing.T) {
	e := newEnv(t)
	s := e.start(serverOpts{})
	raddr, err := net.ResolveUDPAddr("udp4", s.info.STUNAddr)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	local := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())

	for i := range 3 {
		txid := stun.NewTxID()
		req := stun.Request(txid)
		if !stun.Is(req) {
			t.Fatal("stun.Request output is not STUN according to stun.Is")
		}
		gotTx, addr, err := roundTrip(conn, raddr, req, txid)
		if err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
		if gotTx != txid {
			t.Fatalf("request %d: response txid %x, want %x", i+1, gotTx, txid)
		}
		if addr.Addr().Unmap() != local.Addr() || addr.Port() != local.Port() {
			t.Fatalf("request %d: XOR-MAPPED-ADDRESS %v, want our socket %v", i+1, addr, local)
		}
	}
}

// roundTrip sends req and waits for a STUN response, retransmitting like
// netcheck does (at 100 ms, then doubling) within 3 s.
func roundTrip(conn *net.UDPConn, raddr *net.UDPAddr, req []byte, txid stun.TxID) (stun.TxID, netip.AddrPort, error) {
	deadline := time.Now().Add(3 * time.Second)
	wait := 100 * time.Millisecond
	buf := make([]byte, 1500)
	for time.Now().Before(deadline) {
		if _, err := conn.WriteToUDP(req, raddr); err != nil {
			return stun.TxID{}, netip.AddrPort{}, err
		}
		conn.SetReadDeadline(time.Now().Add(wait))
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break
				}
				return stun.TxID{}, netip.AddrPort{}, err
			}
			if from.Port() != uint16(raddr.Port) {
				continue
			}
			if !stun.Is(buf[:n]) {
				return stun.TxID{}, netip.AddrPort{}, errors.New("reply is not a STUN packet")
			}
			tx, addr, err := stun.ParseResponse(buf[:n])
			if err != nil {
				return stun.TxID{}, netip.AddrPort{}, errors.New("stun.ParseResponse: " + err.Error())
			}
			if tx != txid {
				continue // a late reply to an earlier retransmit
			}
			return tx, addr, nil
		}
		wait *= 2
	}
	return stun.TxID{}, netip.AddrPort{}, errors.New("no STUN response within 3s (with retransmits)")
}
