package legacy

// Peers built from Coder v2.15.0's own code. Only glue lives here: WebSocket dials, the
// v1 JSON exchange is tailnet.ServeCoordinator (byte-for-byte the function the v1-era agent and
// `coder ssh` used, unchanged since v0.27), v2 coordination is tailnet.NewRemoteCoordination over
// tailnet.NewDRPCClient / agentsdk.ConnectRPC, and the tunnel is a real tailnet.Conn.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"nhooyr.io/websocket"
	"tailscale.com/tailcfg"

	"cdr.dev/slog"
	"cdr.dev/slog/sloggers/slogtest"
	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/codersdk/agentsdk"
	"github.com/coder/coder/v2/codersdk/workspacesdk"
	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"
)

// dataPort is where the agent's tailnet.Conn accepts the test's TCP connection.
const dataPort = 4444

func testLogger(t testing.TB, name string) slog.Logger {
	level := slog.LevelInfo
	if os.Getenv("TAILNET_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	return slogtest.Make(t, &slogtest.Options{IgnoreErrors: true}).Leveled(level).Named(name)
}

func mustURL(t testing.TB, base, path string) *url.URL {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	u, err = u.Parse(path)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// fetchDERPMapV1 reads the first DERP map from the legacy `GET /api/v2/derp-map` WebSocket the
// way v1-era agents and clients did: one JSON-encoded tailcfg.DERPMap per binary message,
// decoded with a json.Decoder over the message stream.
func fetchDERPMapV1(ctx context.Context, t testing.TB, base string) *tailcfg.DERPMap {
	t.Helper()
	u := mustURL(t, base, "/api/v2/derp-map")
	ws, res, err := websocket.Dial(ctx, u.String(), &websocket.DialOptions{CompressionMode: websocket.CompressionDisabled})
	if res != nil && res.Body != nil {
		_ = res.Body.Close()
	}
	if err != nil {
		t.Fatalf("dial %s: %v", u, err)
	}
	defer ws.Close(websocket.StatusGoingAway, "")
	nc := websocket.NetConn(ctx, ws, websocket.MessageBinary)
	var m tailcfg.DERPMap
	if err := json.NewDecoder(nc).Decode(&m); err != nil {
		t.Fatalf("decode DERP map from /api/v2/derp-map: %v", err)
	}
	return &m
}

// checkDERPMap asserts the shape tailnetd promises: an embedded relay region 999 whose node is
// the plain-HTTP relay on loopback.
func checkDERPMap(t testing.TB, m *tailcfg.DERPMap, httpAddr string) {
	t.Helper()
	r := m.Regions[999]
	if r == nil || len(r.Nodes) == 0 {
		t.Fatalf("DERP map has no region 999 with nodes: %+v", m)
	}
	n := r.Nodes[0]
	if !r.EmbeddedRelay || !n.ForceHTTP || n.HostName != "127.0.0.1" || n.DERPPort <= 0 {
		t.Fatalf("region 999 node is not the embedded plain-HTTP loopback relay: region=%+v node=%+v", r, n)
	}
	if _, port, _ := net.SplitHostPort(httpAddr); port != fmt.Sprint(n.DERPPort) {
		t.Fatalf("region 999 DERPPort %d != tailnetd http port %s", n.DERPPort, port)
	}
}

// newConn builds a tailnet.Conn that never uses direct UDP paths, so every packet crosses
// tailnetd's DERP relay.
func newConn(t testing.TB, name string, id uuid.UUID, addrs []netip.Addr, m *tailcfg.DERPMap) *tailnet.Conn {
	t.Helper()
	var prefixes []netip.Prefix
	for _, a := range addrs {
		prefixes = append(prefixes, netip.PrefixFrom(a, 128))
	}
	conn, err := tailnet.NewConn(&tailnet.Options{
		ID:             id,
		Addresses:      prefixes,
		DERPMap:        m,
		BlockEndpoints: true,
		Logger:         testLogger(t, name),
	})
	if err != nil {
		t.Fatalf("%s: tailnet.NewConn: %v", name, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// agentAddrs are the addresses a v1-era agent listened on: the legacy fixed agent IP and the
// one derived from its UUID.
func agentAddrs(agentID uuid.UUID) []netip.Addr {
	return []netip.Addr{workspacesdk.AgentIP, tailnet.IPFromUUID(agentID)}
}

// v1Peer is one v1 JSON coordination session: the WebSocket, tailnet.ServeCoordinator on it,
// and the arrays of nodes received.
type v1Peer struct {
	name   string
	ws     *websocket.Conn
	errCh  <-chan error
	mu     sync.Mutex
	arrays [][]*tailnet.Node
	notify chan struct{}
}

// dialV1 opens a v1 coordination WebSocket the way v1-era Coder did: agents with the
// `coder_session_token` cookie on /me/coordinate, clients with the Coder-Session-Token header on
// /{agent}/coordinate, neither with a `version` query parameter.
func dialV1(ctx context.Context, t testing.TB, u *url.URL, token string, asAgent bool) (*websocket.Conn, net.Conn) {
	t.Helper()
	opts := &websocket.DialOptions{CompressionMode: websocket.CompressionDisabled, HTTPHeader: http.Header{}}
	if asAgent {
		opts.HTTPHeader.Set("Cookie", (&http.Cookie{Name: codersdk.SessionTokenCookie, Value: token}).String())
	} else {
		opts.HTTPHeader.Set(codersdk.SessionTokenHeader, token)
	}
	ws, res, err := websocket.Dial(ctx, u.String(), opts)
	if err != nil {
		if res != nil {
			t.Fatalf("dial %s: %v (%v)", u, err, codersdk.ReadBodyAsError(res))
		}
		t.Fatalf("dial %s: %v", u, err)
	}
	if res != nil && res.Body != nil {
		_ = res.Body.Close()
	}
	t.Cleanup(func() { _ = ws.Close(websocket.StatusGoingAway, "") })
	return ws, websocket.NetConn(ctx, ws, websocket.MessageBinary)
}

// serveV1 connects conn to a v1 coordination WebSocket. v1 arrays carry no peer UUIDs; a v1-era
// tailnet.Conn keyed peers by node key, so each node is handed to this release's Conn under
// peerID(node) (the agent's id on the client side, an id derived from the node key on the agent
// side) with the release's own v1→v2 conversion (tailnet.SingleNodeUpdate).
func serveV1(ctx context.Context, t testing.TB, name string, conn *tailnet.Conn, u *url.URL, token string,
	asAgent bool, peerID func(*tailnet.Node) uuid.UUID,
) *v1Peer {
	t.Helper()
	ws, nc := dialV1(ctx, t, u, token, asAgent)
	p := &v1Peer{name: name, ws: ws, notify: make(chan struct{}, 1)}
	sendNode, errCh := tailnet.ServeCoordinator(nc, func(nodes []*tailnet.Node) error {
		p.mu.Lock()
		p.arrays = append(p.arrays, nodes)
		p.mu.Unlock()
		select {
		case p.notify <- struct{}{}:
		default:
		}
		for _, n := range nodes {
			resp, err := tailnet.SingleNodeUpdate(peerID(n), n, "v1 node")
			if err != nil {
				return err
			}
			if err := conn.UpdatePeers(resp.GetPeerUpdates()); err != nil {
				return err
			}
		}
		return nil
	})
	p.errCh = errCh
	conn.SetNodeCallback(sendNode)
	return p
}

// err reports an error ServeCoordinator hit, if any, without blocking.
func (p *v1Peer) err() error {
	select {
	case err := <-p.errCh:
		return err
	default:
		return nil
	}
}

// sawKey reports whether some received array held a node with this key.
func (p *v1Peer) sawKey(k string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, a := range p.arrays {
		for _, n := range a {
			if n.Key.String() == k {
				return true
			}
		}
	}
	return false
}

func (p *v1Peer) received() [][]*tailnet.Node {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([][]*tailnet.Node(nil), p.arrays...)
}

// keyedID gives a v1 peer (known only by its node key) a stable UUID.
func keyedID(n *tailnet.Node) uuid.UUID {
	b, _ := n.Key.MarshalText()
	return uuid.NewSHA1(uuid.NameSpaceOID, b)
}

// recordingCoordinate wraps a Coordinate stream to record what the v2 side received; it
// forwards every call unchanged.
type recordingCoordinate struct {
	proto.DRPCTailnet_CoordinateClient
	mu    sync.Mutex
	resps []*proto.CoordinateResponse
}

func (r *recordingCoordinate) Recv() (*proto.CoordinateResponse, error) {
	resp, err := r.DRPCTailnet_CoordinateClient.Recv()
	if resp != nil {
		r.mu.Lock()
		r.resps = append(r.resps, resp)
		r.mu.Unlock()
	}
	return resp, err
}

func (r *recordingCoordinate) sawKind(kind proto.CoordinateResponse_PeerUpdate_Kind) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, resp := range r.resps {
		for _, u := range resp.GetPeerUpdates() {
			if u.GetKind() == kind {
				return true
			}
		}
	}
	return false
}

// v2Session is a Coder v2.15.0 Tailnet API session: DERP maps from StreamDERPMaps and a
// RemoteCoordination driving conn.
type v2Session struct {
	coord  tailnet.Coordination
	stream *recordingCoordinate
}

func firstDERPMapV2(ctx context.Context, t testing.TB, client proto.DRPCTailnetClient) *tailcfg.DERPMap {
	t.Helper()
	s, err := client.StreamDERPMaps(ctx, &proto.StreamDERPMapsRequest{})
	if err != nil {
		t.Fatalf("StreamDERPMaps: %v", err)
	}
	pm, err := s.Recv()
	if err != nil {
		t.Fatalf("StreamDERPMaps recv: %v", err)
	}
	return tailnet.DERPMapFromProto(pm)
}

// dialV2Client opens `coder ssh`'s v2.15 control connection: /{agent}/coordinate?version=2.0
// with the Coder-Session-Token header, then yamux + dRPC.
func dialV2Client(ctx context.Context, t testing.TB, base, token string, agentID uuid.UUID) proto.DRPCTailnetClient {
	t.Helper()
	u := mustURL(t, base, fmt.Sprintf("/api/v2/workspaceagents/%s/coordinate?version=2.0", agentID))
	ws, res, err := websocket.Dial(ctx, u.String(), &websocket.DialOptions{
		HTTPHeader:      http.Header{codersdk.SessionTokenHeader: []string{token}},
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		if res != nil {
			t.Fatalf("dial %s: %v (%v)", u, err, codersdk.ReadBodyAsError(res))
		}
		t.Fatalf("dial %s: %v", u, err)
	}
	t.Cleanup(func() { _ = ws.Close(websocket.StatusGoingAway, "") })
	client, err := tailnet.NewDRPCClient(websocket.NetConn(ctx, ws, websocket.MessageBinary), testLogger(t, "v2-client-drpc"))
	if err != nil {
		t.Fatalf("NewDRPCClient: %v", err)
	}
	return client
}

// dialV2Agent opens the v2.15 agent's control connection with agentsdk.ConnectRPC
// (/me/rpc?version=2.2, cookie auth), which serves both the Agent and Tailnet dRPC services.
func dialV2Agent(ctx context.Context, t testing.TB, base, token string) proto.DRPCTailnetClient {
	t.Helper()
	c := agentsdk.New(mustURL(t, base, "/"))
	c.SetSessionToken(token)
	dc, err := c.ConnectRPC(ctx)
	if err != nil {
		t.Fatalf("agentsdk ConnectRPC: %v", err)
	}
	t.Cleanup(func() { _ = dc.Close() })
	return proto.NewDRPCTailnetClient(dc)
}

// coordinateV2 starts this release's RemoteCoordination (tunnelTarget = agent for a client,
// uuid.Nil for an agent, which then acks every peer with ReadyForHandshake).
func coordinateV2(ctx context.Context, t testing.TB, name string, client proto.DRPCTailnetClient, conn *tailnet.Conn, tunnelTarget uuid.UUID) *v2Session {
	t.Helper()
	stream, err := client.Coordinate(ctx)
	if err != nil {
		t.Fatalf("%s: Coordinate: %v", name, err)
	}
	rec := &recordingCoordinate{DRPCTailnet_CoordinateClient: stream}
	coord := tailnet.NewRemoteCoordination(testLogger(t, name+"-coord"), rec, conn, tunnelTarget)
	t.Cleanup(func() { _ = coord.Close() })
	return &v2Session{coord: coord, stream: rec}
}

// serveData accepts TCP connections on the agent's tailnet.Conn. For each: read an 8-byte
// big-endian length n, then read n bytes while writing n random bytes, then write
// sha256(received). It reports sha256(sent) on sentHash.
func serveData(t testing.TB, conn *tailnet.Conn, sentHash chan<- [32]byte) {
	t.Helper()
	ln, err := conn.Listen("tcp", fmt.Sprintf(":%d", dataPort))
	if err != nil {
		t.Fatalf("agent listen: %v", err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				var hdr [8]byte
				if _, err := io.ReadFull(c, hdr[:]); err != nil {
					return
				}
				n := int(binary.BigEndian.Uint64(hdr[:]))
				if n < 0 || n > 1<<30 {
					return
				}
				payload := make([]byte, n)
				_, _ = rand.Read(payload)
				sentHash <- sha256.Sum256(payload)
				writeErr := make(chan error, 1)
				go func() { _, err := c.Write(payload); writeErr <- err }()
				h := sha256.New()
				if _, err := io.CopyN(h, c, int64(n)); err != nil {
					return
				}
				if err := <-writeErr; err != nil {
					return
				}
				_, _ = c.Write(h.Sum(nil))
			}(c)
		}
	}()
}

// exchange dials the agent over the tunnel and moves n bytes each way, checking both hashes.
func exchange(ctx context.Context, t testing.TB, client *tailnet.Conn, agentIP netip.Addr, n int, agentSent <-chan [32]byte) {
	t.Helper()
	start := time.Now()
	c, err := client.DialContextTCP(ctx, netip.AddrPortFrom(agentIP, dataPort))
	if err != nil {
		t.Fatalf("dial agent over the tunnel: %v", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	payload := make([]byte, n)
	_, _ = rand.Read(payload)
	want := sha256.Sum256(payload)
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(n))
	if _, err := c.Write(hdr[:]); err != nil {
		t.Fatalf("write length: %v", err)
	}
	writeErr := make(chan error, 1)
	go func() { _, err := c.Write(payload); writeErr <- err }()
	h := sha256.New()
	if _, err := io.CopyN(h, c, int64(n)); err != nil {
		t.Fatalf("read agent's %d bytes: %v", n, err)
	}
	var echoed [32]byte
	if _, err := io.ReadFull(c, echoed[:]); err != nil {
		t.Fatalf("read agent's hash of our bytes: %v", err)
	}
	if err := <-writeErr; err != nil {
		t.Fatalf("write %d bytes: %v", n, err)
	}
	if echoed != want {
		t.Fatalf("agent received different bytes: sha256 %x, sent %x", echoed, want)
	}
	var got [32]byte
	copy(got[:], h.Sum(nil))
	select {
	case sent := <-agentSent:
		if sent != got {
			t.Fatalf("client received different bytes: sha256 %x, agent sent %x", got, sent)
		}
	case <-ctx.Done():
		t.Fatal("agent never reported its hash")
	}
	el := time.Since(start)
	t.Logf("moved %d bytes each way in %v (%.1f MiB/s per direction)", n, el, float64(n)/(1<<20)/el.Seconds())
}

// pingViaDERP waits until peer is reachable and checks that the path is the relay.
func pingViaDERP(ctx context.Context, t testing.TB, from *tailnet.Conn, ip netip.Addr) {
	t.Helper()
	if !from.AwaitReachable(ctx, ip) {
		t.Fatalf("%s never became reachable", ip)
	}
	d, p2p, res, err := from.Ping(ctx, ip)
	if err != nil {
		t.Fatalf("ping %s: %v", ip, err)
	}
	if p2p || res == nil || res.DERPRegionID != 999 {
		t.Fatalf("ping %s went p2p=%v region=%v; want DERP region 999 only", ip, p2p, res)
	}
	t.Logf("ping %s via DERP region %d: %v", ip, res.DERPRegionID, d)
}

var errNoNode = errors.New("no node yet")

// waitNode waits for the Conn's own node to have a preferred DERP (the v1 peers send it then).
func waitNode(ctx context.Context, t testing.TB, conn *tailnet.Conn) *tailnet.Node {
	t.Helper()
	for {
		if n := conn.Node(); n != nil && n.PreferredDERP != 0 {
			return n
		}
		select {
		case <-ctx.Done():
			t.Fatalf("own node never got a preferred DERP: %v", errNoNode)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
