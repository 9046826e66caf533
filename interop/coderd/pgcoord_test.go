package coderdinterop

// Interop with Coder's own HA coordinator (pgcoord, enterprise/tailnet at the pinned release):
// pgcoord runs in-process against a fresh database with Coder's migrations, tailnetd runs as
// `serve` with static auth (no upstream, so the bridge is off) on the same database, and real
// tailnet.Conns carry TCP across the two coordinators over tailnetd's relay.

import (
	"context"
	"crypto/rand"
	"database/sql"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"cdr.dev/slog/v3"
	"cdr.dev/slog/v3/sloggers/slogtest"
	"github.com/coder/coder/v2/coderd/database"
	"github.com/coder/coder/v2/coderd/database/pubsub"
	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/codersdk/agentsdk"
	"github.com/coder/coder/v2/codersdk/workspacesdk"
	entailnet "github.com/coder/coder/v2/enterprise/tailnet"
	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"
	"github.com/coder/websocket"
	"github.com/google/uuid"
	"tailscale.com/tailcfg"

	"tailnetd.test/interop/harness"
)

const pgcoordEchoPort = 4242

// startTailnetdReplica runs `tailnetd serve` with static auth on the database at pgURL.
func startTailnetdReplica(t *testing.T, pgURL string, agentID, agentToken uuid.UUID, userToken string) *harness.Process {
	t.Helper()
	dir := t.TempDir()
	cfg := fmt.Sprintf("[[auth.agents]]\ntoken = %q\nid = %q\n\n[[auth.users]]\ntoken = %q\nagents = \"all\"\n",
		agentToken, agentID, userToken)
	cfgPath := filepath.Join(dir, "tailnetd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return harness.Start(t, harness.Options{
		Args: []string{"serve",
			"--config", cfgPath,
			"--postgres-url", pgURL,
			"--http-addr", harness.FreeTCPAddr(t),
			"--stun-addr", "",
			"--key-file", filepath.Join(dir, "derp.key"),
			"--metrics-addr", "",
		},
		LogFilter:    "info,coordinator=debug",
		Require:      []string{"base_url"},
		StartTimeout: 30 * time.Second,
		StopTimeout:  15 * time.Second,
	})
}

// startPGCoord runs Coder's pgcoord in-process on the database at pgURL.
func startPGCoord(ctx context.Context, t *testing.T, logger slog.Logger, pgURL string) tailnet.Coordinator {
	t.Helper()
	sqlDB, err := sql.Open("postgres", pgURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sqlDB.Close() })
	ps, err := pubsub.New(ctx, logger.Named("pubsub"), sqlDB, pgURL)
	if err != nil {
		t.Fatalf("pubsub: %v", err)
	}
	t.Cleanup(func() { _ = ps.Close() })
	coord, err := entailnet.NewPGCoord(ctx, logger.Named("pgcoord"), ps, database.New(sqlDB))
	if err != nil {
		t.Fatalf("NewPGCoord: %v", err)
	}
	t.Cleanup(func() { _ = coord.Close() })
	return coord
}

// tailnetdClient is a Coder client coordinating through tailnetd's
// /api/v2/workspaceagents/{agent}/coordinate, with DERP maps from tailnetd.
func tailnetdClient(t *testing.T, logger slog.Logger, baseURL string, agentID uuid.UUID, userToken string, updates *peerUpdates) *tailnet.Conn {
	t.Helper()
	u, err := url.Parse(baseURL)
	if err != nil {
		t.Fatal(err)
	}
	sdk := codersdk.New(u, codersdk.WithSessionToken(userToken))
	wsOptions := &websocket.DialOptions{CompressionMode: websocket.CompressionDisabled}
	sdk.SessionTokenProvider.SetDialOption(wsOptions)
	coordinateURL, err := u.Parse("/api/v2/workspaceagents/" + agentID.String() + "/coordinate")
	if err != nil {
		t.Fatal(err)
	}
	dialer := workspacesdk.NewWebsocketDialer(logger.Named("dialer"), coordinateURL, wsOptions)
	ctrl := tailnet.NewController(logger.Named("controller"), recordingUpdatesDialer{inner: dialer, updates: updates})
	conn, err := tailnet.NewConn(&tailnet.Options{
		Addresses:      []netip.Prefix{netip.PrefixFrom(tailnet.TailscaleServicePrefix.RandomAddr(), 128)},
		Logger:         logger.Named("net"),
		BlockEndpoints: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	coordCtrl := tailnet.NewTunnelSrcCoordController(logger.Named("coord"), conn)
	coordCtrl.AddDestination(agentID)
	ctrl.CoordCtrl = coordCtrl
	ctrl.DERPCtrl = tailnet.NewBasicDERPController(logger.Named("derp"), workspacesdk.New(sdk), conn)
	runCtx, cancel := context.WithCancel(context.Background())
	ctrl.Run(runCtx)
	t.Cleanup(func() { cancel(); _ = conn.Close() })
	return conn
}

// pgcoordAgent is a Coder agent's tailnet.Conn coordinating through pgcoord in-process, on the
// DERP map tailnetd served to the client.
func pgcoordAgent(t *testing.T, logger slog.Logger, coord tailnet.Coordinator, agentID uuid.UUID, dm *tailcfg.DERPMap) *tailnet.Conn {
	t.Helper()
	conn, err := tailnet.NewConn(&tailnet.Options{
		ID: agentID,
		Addresses: []netip.Prefix{
			tailnet.TailscaleServicePrefix.PrefixFromUUID(agentID),
			tailnet.CoderServicePrefix.PrefixFromUUID(agentID),
		},
		DERPMap:        dm,
		Logger:         logger.Named("net"),
		BlockEndpoints: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	client := tailnet.NewInMemoryCoordinatorClient(logger.Named("coordclient"), agentID,
		tailnet.AgentCoordinateeAuth{ID: agentID}, coord)
	cw := tailnet.NewAgentCoordinationController(logger.Named("coord"), conn).New(client)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = cw.Close(ctx)
		_ = conn.Close()
	})
	return conn
}

func awaitDERPMap(ctx context.Context, t *testing.T, conn *tailnet.Conn) *tailcfg.DERPMap {
	t.Helper()
	for {
		if dm := conn.DERPMap(); dm != nil && len(dm.Regions) > 0 {
			return dm
		}
		select {
		case <-ctx.Done():
			t.Fatal("client got no DERP map from tailnetd")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func serveTailnetEcho(t *testing.T, conn *tailnet.Conn) {
	t.Helper()
	ln, err := conn.Listen("tcp", fmt.Sprintf(":%d", pgcoordEchoPort))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) { defer c.Close(); _, _ = io.Copy(c, c) }(c)
		}
	}()
}

func echoOverTunnel(ctx context.Context, t *testing.T, client *tailnet.Conn, agentIP netip.Addr) {
	t.Helper()
	if !client.AwaitReachable(ctx, agentIP) {
		t.Fatalf("agent %s not reachable from the client", agentIP)
	}
	c, err := client.DialContextTCP(ctx, netip.AddrPortFrom(agentIP, pgcoordEchoPort))
	if err != nil {
		t.Fatalf("dial over the tunnel: %v", err)
	}
	defer c.Close()
	msg := []byte("hello across pgcoord and tailnetd")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("echo read: %v", err)
	}
	if string(got) != string(msg) {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
}

// TestPGCoordAgentTailnetdClient: an agent coordinating through Coder's pgcoord and a client
// through tailnetd, on one database, carry TCP over the tunnel; when the pgcoord replica stops,
// its agent is LOST to tailnetd's client.
func TestPGCoordAgentTailnetdClient(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	logger := slogtest.Make(t, &slogtest.Options{IgnoreErrors: true}).Leveled(logLevel())

	pgURL := pgServer.NewDatabase(t)
	agentID, agentToken, userToken := uuid.New(), uuid.New(), randomAPIKey()
	tnd := startTailnetdReplica(t, pgURL, agentID, agentToken, userToken)
	coord := startPGCoord(ctx, t, logger, pgURL)

	updates := newPeerUpdates()
	client := tailnetdClient(t, logger.Named("client"), tnd.Announcement().BaseURL, agentID, userToken, updates)
	dm := awaitDERPMap(ctx, t, client)
	agent := pgcoordAgent(t, logger.Named("agent"), coord, agentID, dm)
	serveTailnetEcho(t, agent)
	echoOverTunnel(ctx, t, client, tailnet.TailscaleServicePrefix.AddrFromUUID(agentID))
	if !updates.saw(agentID, proto.CoordinateResponse_PeerUpdate_NODE) {
		t.Errorf("the client never got the agent's NODE from tailnetd: %v", updates.all())
	}

	// The pgcoord replica stops (Close: what coderd does on shutdown): the agent it served is
	// LOST to the client coordinating through tailnetd.
	stopped := time.Now()
	if err := coord.Close(); err != nil {
		t.Fatalf("closing pgcoord: %v", err)
	}
	if !updates.await(ctx, agentID, proto.CoordinateResponse_PeerUpdate_LOST) {
		t.Fatalf("the client never got LOST for the agent after pgcoord stopped: %v", updates.all())
	}
	t.Logf("LOST at the tailnetd client %v after pgcoord stopped; updates: %v", time.Since(stopped).Round(time.Millisecond), updates.all())
}

// TestTailnetdAgentPGCoordClient is the reverse: an agent coordinating through tailnetd
// (/api/v2/workspaceagents/me/rpc with a static agent token) and a client through pgcoord.
func TestTailnetdAgentPGCoordClient(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	logger := slogtest.Make(t, &slogtest.Options{IgnoreErrors: true}).Leveled(logLevel())

	pgURL := pgServer.NewDatabase(t)
	agentID, agentToken, userToken := uuid.New(), uuid.New(), randomAPIKey()
	tnd := startTailnetdReplica(t, pgURL, agentID, agentToken, userToken)
	coord := startPGCoord(ctx, t, logger, pgURL)

	agent := tailnetdAgent(t, logger.Named("agent"), tnd.Announcement().BaseURL, agentID, agentToken.String())
	serveTailnetEcho(t, agent)
	dm := awaitDERPMap(ctx, t, agent)
	client := pgcoordClient(t, logger.Named("client"), coord, agentID, dm)
	echoOverTunnel(ctx, t, client, tailnet.TailscaleServicePrefix.AddrFromUUID(agentID))
}

// tailnetdAgent is a Coder agent's tailnet.Conn coordinating through tailnetd's
// /api/v2/workspaceagents/me/rpc (Coordinate and StreamDERPMaps), as the agent does.
func tailnetdAgent(t *testing.T, logger slog.Logger, baseURL string, agentID uuid.UUID, agentToken string) *tailnet.Conn {
	t.Helper()
	u, err := url.Parse(baseURL)
	if err != nil {
		t.Fatal(err)
	}
	sdk := agentsdk.New(u, agentsdk.WithFixedToken(agentToken))
	conn, err := tailnet.NewConn(&tailnet.Options{
		ID: agentID,
		Addresses: []netip.Prefix{
			tailnet.TailscaleServicePrefix.PrefixFromUUID(agentID),
			tailnet.CoderServicePrefix.PrefixFromUUID(agentID),
		},
		Logger:         logger.Named("net"),
		BlockEndpoints: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctrl := tailnet.NewController(logger.Named("controller"), agentRPCDialer{client: sdk})
	ctrl.CoordCtrl = tailnet.NewAgentCoordinationController(logger.Named("coord"), conn)
	ctrl.DERPCtrl = tailnet.NewBasicDERPController(logger.Named("derp"), sdk, conn)
	runCtx, cancel := context.WithCancel(context.Background())
	ctrl.Run(runCtx)
	t.Cleanup(func() { cancel(); _ = conn.Close() })
	return conn
}

// agentRPCDialer dials the agent's dRPC API on /api/v2/workspaceagents/me/rpc.
type agentRPCDialer struct{ client *agentsdk.Client }

func (d agentRPCDialer) Dial(ctx context.Context, _ tailnet.ResumeTokenController) (tailnet.ControlProtocolClients, error) {
	_, tAPI, err := d.client.ConnectRPC210WithRole(ctx, "agent")
	if err != nil {
		return tailnet.ControlProtocolClients{}, err
	}
	coord, err := tAPI.Coordinate(context.Background())
	if err != nil {
		_ = tAPI.DRPCConn().Close()
		return tailnet.ControlProtocolClients{}, fmt.Errorf("coordinate: %w", err)
	}
	derps := &tailnet.DERPFromDRPCWrapper{}
	derps.Client, err = tAPI.StreamDERPMaps(context.Background(), &proto.StreamDERPMapsRequest{})
	if err != nil {
		_ = tAPI.DRPCConn().Close()
		return tailnet.ControlProtocolClients{}, fmt.Errorf("stream DERP maps: %w", err)
	}
	return tailnet.ControlProtocolClients{Closer: tAPI.DRPCConn(), Coordinator: coord, DERP: derps, Telemetry: tAPI}, nil
}

// pgcoordClient is a Coder client's tailnet.Conn coordinating through pgcoord in-process (the
// way coderd's server tailnet does), with the agent as its tunnel destination.
func pgcoordClient(t *testing.T, logger slog.Logger, coord tailnet.Coordinator, agentID uuid.UUID, dm *tailcfg.DERPMap) *tailnet.Conn {
	t.Helper()
	clientID := uuid.New()
	conn, err := tailnet.NewConn(&tailnet.Options{
		ID:             clientID,
		Addresses:      []netip.Prefix{netip.PrefixFrom(tailnet.TailscaleServicePrefix.RandomAddr(), 128)},
		DERPMap:        dm,
		Logger:         logger.Named("net"),
		BlockEndpoints: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	coordCtrl := tailnet.NewTunnelSrcCoordController(logger.Named("coord"), conn)
	coordCtrl.AddDestination(agentID)
	client := tailnet.NewInMemoryCoordinatorClient(logger.Named("coordclient"), clientID,
		tailnet.ClientCoordinateeAuth{AgentID: agentID}, coord)
	cw := coordCtrl.New(client)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = cw.Close(ctx)
		_ = conn.Close()
	})
	return conn
}

// peerUpdates records the peer updates a client's Coordinate stream received.
type peerUpdates struct {
	mu      sync.Mutex
	seen    []string
	kinds   map[uuid.UUID]map[proto.CoordinateResponse_PeerUpdate_Kind]bool
	changed chan struct{} // closed and replaced on every update
}

func newPeerUpdates() *peerUpdates {
	return &peerUpdates{kinds: map[uuid.UUID]map[proto.CoordinateResponse_PeerUpdate_Kind]bool{}, changed: make(chan struct{})}
}

func (p *peerUpdates) record(resp *proto.CoordinateResponse) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, u := range resp.GetPeerUpdates() {
		id, err := uuid.FromBytes(u.GetId())
		if err != nil {
			p.seen = append(p.seen, fmt.Sprintf("bad id %x", u.GetId()))
			continue
		}
		p.seen = append(p.seen, fmt.Sprintf("%s %s %q", id, u.GetKind(), u.GetReason()))
		if p.kinds[id] == nil {
			p.kinds[id] = map[proto.CoordinateResponse_PeerUpdate_Kind]bool{}
		}
		p.kinds[id][u.GetKind()] = true
	}
	close(p.changed)
	p.changed = make(chan struct{})
}

func (p *peerUpdates) saw(id uuid.UUID, kind proto.CoordinateResponse_PeerUpdate_Kind) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.kinds[id][kind]
}

func (p *peerUpdates) await(ctx context.Context, id uuid.UUID, kind proto.CoordinateResponse_PeerUpdate_Kind) bool {
	for {
		p.mu.Lock()
		ok, changed := p.kinds[id][kind], p.changed
		p.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-changed:
		}
	}
}

func (p *peerUpdates) all() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.seen...)
}

// recordingUpdatesDialer hands the controller Coordinate streams whose responses are recorded.
type recordingUpdatesDialer struct {
	inner   tailnet.ControlProtocolDialer
	updates *peerUpdates
}

func (d recordingUpdatesDialer) Dial(ctx context.Context, r tailnet.ResumeTokenController) (tailnet.ControlProtocolClients, error) {
	c, err := d.inner.Dial(ctx, r)
	if err != nil {
		return c, err
	}
	c.Coordinator = recordingCoordinateStream{CoordinatorClient: c.Coordinator, updates: d.updates}
	return c, nil
}

type recordingCoordinateStream struct {
	tailnet.CoordinatorClient
	updates *peerUpdates
}

func (s recordingCoordinateStream) Recv() (*proto.CoordinateResponse, error) {
	resp, err := s.CoordinatorClient.Recv()
	if err == nil {
		s.updates.record(resp)
	}
	return resp, err
}

// randomAPIKey returns a token in Coder's API key shape: 10 chars, '-', 22 chars.
func randomAPIKey() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b[:10]) + "-" + string(b[10:])
}

// TestPGCoordReplicaCrashLost: a pgcoord replica that dies without a word (its database
// connections cut, so it can neither heartbeat nor mark its peers lost) has its agent turn LOST
// at tailnetd's client once its heartbeats are missed (README: within about 7 s).
func TestPGCoordReplicaCrashLost(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	logger := slogtest.Make(t, &slogtest.Options{IgnoreErrors: true}).Leveled(logLevel())

	pgURL := pgServer.NewDatabase(t)
	agentID, agentToken, userToken := uuid.New(), uuid.New(), randomAPIKey()
	tnd := startTailnetdReplica(t, pgURL, agentID, agentToken, userToken)

	// pgcoord reaches PostgreSQL through a forwarder, so that its connections can be cut.
	u, err := url.Parse(pgURL)
	if err != nil {
		t.Fatal(err)
	}
	fwd := newTCPForwarder(t)
	fwd.setTarget(u.Host)
	viaFwd := *u
	viaFwd.Host = fwd.addr()
	coord := startPGCoord(ctx, t, logger, viaFwd.String())

	updates := newPeerUpdates()
	client := tailnetdClient(t, logger.Named("client"), tnd.Announcement().BaseURL, agentID, userToken, updates)
	dm := awaitDERPMap(ctx, t, client)
	agent := pgcoordAgent(t, logger.Named("agent"), coord, agentID, dm)
	serveTailnetEcho(t, agent)
	echoOverTunnel(ctx, t, client, tailnet.TailscaleServicePrefix.AddrFromUUID(agentID))
	if updates.saw(agentID, proto.CoordinateResponse_PeerUpdate_LOST) {
		t.Fatalf("LOST before the crash: %v", updates.all())
	}

	crashed := time.Now()
	fwd.setTarget("")
	if !updates.await(ctx, agentID, proto.CoordinateResponse_PeerUpdate_LOST) {
		t.Fatalf("the client never got LOST for the agent after pgcoord crashed: %v", updates.all())
	}
	took := time.Since(crashed)
	t.Logf("LOST at the tailnetd client %v after pgcoord crashed; updates: %v", took.Round(time.Millisecond), updates.all())
	// tailnetd declares a replica dead after 6 s without heartbeats (pgcoord beats every 2 s).
	if took > 15*time.Second {
		t.Errorf("LOST took %v after the crash, want within 15 s", took)
	}
}
