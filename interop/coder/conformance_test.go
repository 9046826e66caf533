package coder

// Coder's coordinator conformance cases (github.com/coder/coder/v2/tailnet/test) run against
// tailnetd. They take a tailnet.CoordinatorV2; coordAdapter is one whose Coordinate opens a real
// Coordinate RPC on tailnetd (WebSocket → yamux → dRPC, Coder's client code) and pumps the two
// channels. Identity comes from the HTTP layer, as in production:
//
//   - AgentCoordinateeAuth{ID}: /api/v2/workspaceagents/me/rpc with the agent token configured
//     for ID (so only ids from the static config work);
//   - ClientCoordinateeAuth{AgentID}: /api/v2/workspaceagents/{AgentID}/coordinate with the user
//     token, plus a resume token minted by Coder's own tailnet.NewResumeTokenKeyProvider with the
//     key tailnetd is configured with, so the peer gets exactly the id the case chose;
//   - SingleTailnetCoordinateeAuth (coderd's in-process auth; no HTTP endpoint grants it): the
//     user-scoped /api/v2/tailnet endpoint with a minted resume token. The static user may reach
//     "all" agents, so add_tunnel to any id passes, which is what Single allows; what Single
//     allows and this does not is ready_for_handshake (clients may not send it).
//
// After each client dial the adapter asks RefreshResumeToken for the id tailnetd assigned and
// verifies it with Coder's verifier, so a case never runs under a wrong identity.

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"golang.org/x/xerrors"

	"cdr.dev/slog/v3"
	"github.com/coder/coder/v2/coderd/jwtutils"
	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"
	"github.com/coder/coder/v2/tailnet/test"
	"github.com/coder/quartz"
	"github.com/coder/websocket"

	"tailnetd.test/interop/harness"
)

type coordAdapter struct {
	t           testing.TB
	logger      slog.Logger
	baseURL     *url.URL
	agentTokens map[uuid.UUID]string
	userToken   string
	// resume mints and verifies tokens with tailnetd's configured key; nil when unknown (dev).
	resume tailnet.ResumeTokenProvider
	// agentEndpoint overrides where agents dial (default: /me/rpc?version=2.10&role=agent).
	agentEndpoint string

	mu      sync.Mutex
	closers []func()
}

var _ tailnet.CoordinatorV2 = (*coordAdapter)(nil)

func newCoordAdapter(t *testing.T, baseURL string, agentTokens map[uuid.UUID]string, userToken string, resume tailnet.ResumeTokenProvider) *coordAdapter {
	u, err := url.Parse(baseURL)
	if err != nil {
		t.Fatal(err)
	}
	logger, _ := testLogger(t)
	a := &coordAdapter{t: t, logger: logger.Named("adapter"), baseURL: u, agentTokens: agentTokens,
		userToken: userToken, resume: resume}
	t.Cleanup(func() { _ = a.Close() })
	return a
}

func staticResumeProvider(cfg staticConfig) tailnet.ResumeTokenProvider {
	return tailnet.NewResumeTokenKeyProvider(jwtutils.StaticKey{ID: cfg.ResumeKeyID, Key: cfg.ResumeKey},
		quartz.NewReal(), tailnet.DefaultResumeTokenExpiry)
}

func (*coordAdapter) ServeHTTPDebug(w http.ResponseWriter, _ *http.Request) {
	http.Error(w, "not available through the HTTP endpoints", http.StatusNotFound)
}

// Node is an in-process query of the coordinator; tailnetd has no HTTP equivalent.
func (*coordAdapter) Node(uuid.UUID) *tailnet.Node { return nil }

func (a *coordAdapter) Close() error {
	a.mu.Lock()
	closers := a.closers
	a.closers = nil
	a.mu.Unlock()
	for _, c := range closers {
		c()
	}
	return nil
}

// dialed is one open Coordinate RPC and the means to tear its connection down.
type dialed struct {
	stream proto.DRPCTailnet_CoordinateClient
	close  func()
}

func (a *coordAdapter) dial(ctx context.Context, id uuid.UUID, auth tailnet.CoordinateeAuth) (*dialed, error) {
	var (
		path, token string
		q           = url.Values{}
		wantID      = false
	)
	switch au := auth.(type) {
	case tailnet.AgentCoordinateeAuth:
		if au.ID != id {
			return nil, xerrors.Errorf("agent auth for %s on peer %s: an agent's peer id is its own id", au.ID, id)
		}
		tok, ok := a.agentTokens[id]
		if !ok {
			return nil, xerrors.Errorf("agent %s is not in tailnetd's configuration: over HTTP an agent's id is fixed by its token", id)
		}
		path, token = "/api/v2/workspaceagents/me/rpc", tok
		q.Set("version", "2.10")
		q.Set("role", "agent")
		if a.agentEndpoint != "" {
			ep, err := url.Parse(a.agentEndpoint)
			if err != nil {
				return nil, err
			}
			path, q = ep.Path, ep.Query()
		}
	case tailnet.ClientCoordinateeAuth:
		path, token, wantID = "/api/v2/workspaceagents/"+au.AgentID.String()+"/coordinate", a.userToken, true
		q.Set("version", "2.0")
	case tailnet.SingleTailnetCoordinateeAuth:
		path, token, wantID = "/api/v2/tailnet", a.userToken, true
		q.Set("version", "2.3")
	default:
		return nil, xerrors.Errorf("auth %T has no HTTP endpoint", auth)
	}
	if wantID {
		if a.resume == nil {
			return nil, xerrors.New("client peers need tailnetd's resume key to choose their id")
		}
		tok, err := a.resume.GenerateResumeToken(ctx, id)
		if err != nil {
			return nil, err
		}
		q.Set("resume_token", tok.Token)
	}
	u := *a.baseURL
	u.Path = path
	u.RawQuery = q.Encode()

	// The same WebSocket → yamux → dRPC stack Coder's clients and agents use
	// (workspacesdk.WebsocketDialer, agentsdk.Client.ConnectRPC*).
	ws, res, err := websocket.Dial(ctx, u.String(), &websocket.DialOptions{
		HTTPHeader:      http.Header{codersdk.SessionTokenHeader: []string{token}},
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		if res != nil {
			return nil, xerrors.Errorf("dial %s: %w", path, codersdk.ReadBodyAsError(res))
		}
		return nil, xerrors.Errorf("dial %s: %w", path, err)
	}
	_, nc := codersdk.WebsocketNetConn(context.Background(), ws, websocket.MessageBinary)
	client, err := tailnet.NewDRPCClient(nc, a.logger)
	if err != nil {
		_ = nc.Close()
		return nil, err
	}
	var once sync.Once
	closeAll := func() {
		once.Do(func() {
			_ = client.DRPCConn().Close()
			_ = nc.Close()
		})
	}
	if wantID {
		resp, err := client.RefreshResumeToken(ctx, &proto.RefreshResumeTokenRequest{})
		if err != nil {
			closeAll()
			return nil, xerrors.Errorf("RefreshResumeToken: %w", err)
		}
		got, err := a.resume.VerifyResumeToken(ctx, resp.Token)
		if err != nil {
			closeAll()
			return nil, xerrors.Errorf("tailnetd's resume token does not verify with Coder's verifier: %w", err)
		}
		if got != id {
			closeAll()
			return nil, xerrors.Errorf("tailnetd assigned peer id %s, the resume token asked for %s", got, id)
		}
	}
	stream, err := client.Coordinate(context.Background())
	if err != nil {
		closeAll()
		return nil, xerrors.Errorf("Coordinate: %w", err)
	}
	return &dialed{stream: stream, close: closeAll}, nil
}

// Coordinate mirrors the in-memory coordinator's contract: requests in, responses out, the
// response channel closes when the server ends the stream; cancelling ctx (or closing the request
// channel) drops the connection without a Disconnect, which the server must treat as LOST.
func (a *coordAdapter) Coordinate(ctx context.Context, id uuid.UUID, _ string, auth tailnet.CoordinateeAuth) (chan<- *proto.CoordinateRequest, <-chan *proto.CoordinateResponse) {
	reqs := make(chan *proto.CoordinateRequest, tailnet.RequestBufferSize)
	resps := make(chan *proto.CoordinateResponse, tailnet.ResponseBufferSize)
	d, err := a.dial(ctx, id, auth)
	if err != nil {
		a.t.Errorf("adapter: cannot coordinate as %s (%T): %v", id, auth, err)
		close(resps)
		return reqs, resps
	}
	a.mu.Lock()
	a.closers = append(a.closers, d.close)
	a.mu.Unlock()
	go func() {
		defer d.close()
		for {
			select {
			case <-ctx.Done():
				return
			case req, ok := <-reqs:
				if !ok {
					return
				}
				if err := d.stream.Send(req); err != nil {
					a.logger.Debug(ctx, "send failed", slog.Error(err))
					<-ctx.Done()
					return
				}
			}
		}
	}()
	go func() {
		defer close(resps)
		for {
			resp, err := d.stream.Recv()
			if err != nil {
				a.logger.Debug(ctx, "coordinate stream ended", slog.F("peer", id), slog.Error(err))
				return
			}
			select {
			case resps <- resp:
			case <-ctx.Done():
				return
			}
		}
	}()
	return reqs, resps
}

type coordCase struct {
	name string
	run  func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2)
	skip string
}

func TestCoderCoordinatorConformance(t *testing.T) {
	cfg := newStaticConfig(2)
	srv := startServe(t, cfg)
	tokens := map[uuid.UUID]string{}
	for _, a := range cfg.Agents {
		tokens[a.ID] = a.Token.String()
	}
	coord := newCoordAdapter(t, srv.Announcement().BaseURL, tokens, cfg.UserToken, staticResumeProvider(cfg))
	agentID := cfg.Agents[0].ID

	cases := []coordCase{
		// tailnet/test/cases.go, unchanged.
		{name: "GracefulDisconnectTest", run: wrap(test.GracefulDisconnectTest)},
		{name: "LostTest", run: wrap(test.LostTest)},
		{name: "BidirectionalTunnels", run: wrap(test.BidirectionalTunnels)},
		{name: "ReadyForHandshakeTest", run: wrap(test.ReadyForHandshakeTest),
			skip: "p2 both adds a tunnel and sends ready_for_handshake under SingleTailnetCoordinateeAuth with a random id; over HTTP only clients add tunnels and only agents (whose id is fixed by their token) send ready_for_handshake. Ported below as Ported/AgentAck"},
		{name: "ReadyForHandshakeNoPermissionTest", run: wrap(test.ReadyForHandshakeNoPermissionTest),
			skip: "p2 sends ready_for_handshake under SingleTailnetCoordinateeAuth with a random id; over HTTP only agents may send it and an agent's id is fixed by its token. Ported below as Ported/AgentAck_NoPermission"},

		// tailnet/coordinator_test.go (TestCoordinator), ported: Coder's test.Peer helper and
		// Coder's error values, with agents on configured ids and clients on client auth.
		{name: "Ported/ClientWithoutAgent_InvalidIPBits", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			client := test.NewClient(ctx, t, coord, "client", uuid.New())
			defer client.Close(ctx)
			client.UpdateNode(&proto.Node{
				Addresses:     []string{netip.PrefixFrom(tailnet.TailscaleServicePrefix.RandomAddr(), 64).String()},
				PreferredDerp: 10,
			})
			client.AssertEventuallyResponsesClosed(
				tailnet.AuthorizationError{Wrapped: tailnet.InvalidAddressBitsError{Bits: 64}}.Error())
		}},
		{name: "Ported/AgentWithoutClients_InvalidIP", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			agent := newAgentPeer(ctx, t, coord, agentID)
			defer agent.Close(ctx)
			prefix := tailnet.TailscaleServicePrefix.RandomPrefix()
			agent.UpdateNode(&proto.Node{Addresses: []string{prefix.String()}, PreferredDerp: 10})
			agent.AssertEventuallyResponsesClosed(tailnet.AuthorizationError{
				Wrapped: xerrors.Errorf("Addresses: %w", tailnet.InvalidNodeAddressError{Addr: prefix.Addr().String()})}.Error())
		}},
		{name: "Ported/AgentWithoutClients_InvalidAllowedIP", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			agent := newAgentPeer(ctx, t, coord, agentID)
			defer agent.Close(ctx)
			victim := tailnet.TailscaleServicePrefix.PrefixFromUUID(uuid.New())
			agent.UpdateNode(&proto.Node{
				Addresses:     []string{tailnet.TailscaleServicePrefix.PrefixFromUUID(agentID).String()},
				AllowedIps:    []string{victim.String()},
				PreferredDerp: 10,
			})
			agent.AssertEventuallyResponsesClosed(tailnet.AuthorizationError{
				Wrapped: xerrors.Errorf("AllowedIps: %w", tailnet.InvalidNodeAddressError{Addr: victim.Addr().String()})}.Error())
		}},
		{name: "Ported/AgentWithoutClients_InvalidBits", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			agent := newAgentPeer(ctx, t, coord, agentID)
			defer agent.Close(ctx)
			agent.UpdateNode(&proto.Node{
				Addresses:     []string{netip.PrefixFrom(tailnet.TailscaleServicePrefix.AddrFromUUID(agentID), 64).String()},
				PreferredDerp: 10,
			})
			agent.AssertEventuallyResponsesClosed(tailnet.AuthorizationError{
				Wrapped: xerrors.Errorf("Addresses: %w", tailnet.InvalidAddressBitsError{Bits: 64})}.Error())
		}},
		{name: "Ported/AgentWithClient", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			agent := newAgentPeer(ctx, t, coord, agentID)
			defer agent.Close(ctx)
			agent.UpdateDERP(1)
			client := test.NewClient(ctx, t, coord, "client", agentID)
			defer client.Close(ctx)
			client.AssertEventuallyHasDERP(agentID, 1)
			client.UpdateDERP(2)
			agent.AssertEventuallyHasDERP(client.ID, 2)
			agent.UpdateDERP(3)
			client.AssertEventuallyHasDERP(agentID, 3)
			agent.Close(ctx)
			// A reconnecting agent gets the existing client node immediately.
			agent = newAgentPeer(ctx, t, coord, agentID)
			defer agent.Close(ctx)
			agent.AssertEventuallyHasDERP(client.ID, 2)
		}},
		{name: "Ported/AgentDoubleConnect", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			agent1 := newAgentPeer(ctx, t, coord, agentID)
			defer agent1.Close(ctx)
			agent1.UpdateDERP(1)
			client := test.NewClient(ctx, t, coord, "client", agentID)
			defer client.Close(ctx)
			client.AssertEventuallyHasDERP(agentID, 1)
			client.UpdateDERP(2)
			agent1.AssertEventuallyHasDERP(client.ID, 2)
			agent1.UpdateDERP(3)
			client.AssertEventuallyHasDERP(agentID, 3)
			agent2 := newAgentPeer(ctx, t, coord, agentID)
			defer agent2.Close(ctx)
			agent2.AssertEventuallyHasDERP(client.ID, 2)
			agent1.AssertEventuallyResponsesClosed(tailnet.CloseErrOverwritten)
		}},
		{name: "Ported/AgentAck", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			// ReadyForHandshakeTest in the shape real peers have: the client opens the tunnel,
			// the agent acknowledges.
			agent := newAgentPeer(ctx, t, coord, agentID)
			defer agent.Close(ctx)
			client := test.NewClient(ctx, t, coord, "client", agentID)
			defer client.Close(ctx)
			client.UpdateDERP(1)
			agent.UpdateDERP(2)
			client.AssertEventuallyHasDERP(agentID, 2)
			agent.AssertEventuallyHasDERP(client.ID, 1)
			agent.ReadyForHandshake(client.ID)
			client.AssertEventuallyReadyForHandshake(agentID)
		}},
		{name: "Ported/AgentAck_NoPermission", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			agent := newAgentPeer(ctx, t, coord, agentID)
			defer agent.Close(ctx)
			client := test.NewPeer(ctx, t, coord, "client", test.WithAuth(tailnet.ClientCoordinateeAuth{AgentID: agentID}))
			defer client.Close(ctx)
			client.UpdateDERP(1)
			agent.UpdateDERP(2)
			agent.ReadyForHandshake(client.ID)
			agent.AssertEventuallyGetsError(fmt.Sprintf("you do not share a tunnel with %q", client.ID.String()))
		}},

		// The rest of Coder's authorization table (tailnet/tunnel.go), with Coder's error texts.
		{name: "Auth/AgentCannotOpenTunnels", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			agent := newAgentPeer(ctx, t, coord, agentID)
			defer agent.Close(ctx)
			agent.AddTunnel(uuid.New())
			agent.AssertEventuallyResponsesClosed(tailnet.AuthorizationError{Wrapped: xerrors.New("agents cannot open tunnels")}.Error())
		}},
		{name: "Auth/ClientWrongAgent", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			other := cfg.Agents[1].ID
			client := test.NewPeer(ctx, t, coord, "client", test.WithAuth(tailnet.ClientCoordinateeAuth{AgentID: agentID}))
			defer client.Close(ctx)
			client.AddTunnel(other)
			client.AssertEventuallyResponsesClosed(tailnet.AuthorizationError{
				Wrapped: xerrors.Errorf("invalid agent id, expected %s, got %s", agentID.String(), other.String())}.Error())
		}},
		{name: "Auth/ClientUserNoPermission", run: func(ctx context.Context, t *testing.T, _ tailnet.CoordinatorV2) {
			// /api/v2/tailnet as a user who may reach only agent 0 (ClientUserCoordinateeAuth).
			restricted := newCoordAdapter(t, srv.Announcement().BaseURL, nil, cfg.RestrictedUserToken, staticResumeProvider(cfg))
			p := test.NewPeer(ctx, t, restricted, "desktop")
			defer p.Close(ctx)
			p.AddTunnel(agentID) // allowed
			p.UpdateDERP(1)
			p.AddTunnel(cfg.Agents[1].ID) // not allowed
			p.AssertEventuallyResponsesClosed(tailnet.AuthorizationError{
				Wrapped: xerrors.New("workspace agent not found or you do not have permission")}.Error())
		}},
		{name: "Auth/ClientReadyForHandshake", run: func(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2) {
			client := test.NewClient(ctx, t, coord, "client", agentID)
			defer client.Close(ctx)
			client.ReadyForHandshake(agentID)
			client.AssertEventuallyResponsesClosed(tailnet.AuthorizationError{
				Wrapped: xerrors.New("clients may not send ready_for_handshake")}.Error())
		}},
	}

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.skip != "" {
				t.Skip("cannot run through tailnetd's HTTP endpoints: " + c.skip)
			}
			harness.DumpLogsOnFailure(t, srv.Process)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c.run(ctx, t, coord)
		})
	}
}

func wrap(f func(context.Context, *testing.T, tailnet.CoordinatorV2)) func(context.Context, *testing.T, tailnet.CoordinatorV2) {
	return f
}

// newAgentPeer is test.NewAgent on a configured agent id (test.NewAgent picks a random one).
func newAgentPeer(ctx context.Context, t *testing.T, coord tailnet.CoordinatorV2, id uuid.UUID) *test.Peer {
	return test.NewPeer(ctx, t, coord, "agent", test.WithID(id), test.WithAuth(tailnet.AgentCoordinateeAuth{ID: id}))
}

// TestAgentCoordinateEndpointV2: /api/v2/workspaceagents/me/coordinate?version=2.0 serves the
// same v2 stack as /me/rpc (tailnetd's compatibility endpoint; coderd removed it in v2.13).
func TestAgentCoordinateEndpointV2(t *testing.T) {
	cfg := newStaticConfig(1)
	srv := startServe(t, cfg)
	coord := newCoordAdapter(t, srv.Announcement().BaseURL, map[uuid.UUID]string{cfg.Agents[0].ID: cfg.Agents[0].Token.String()},
		cfg.UserToken, staticResumeProvider(cfg))
	coord.agentEndpoint = "/api/v2/workspaceagents/me/coordinate?version=2.0"
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	agentID := cfg.Agents[0].ID
	agent := newAgentPeer(ctx, t, coord, agentID)
	defer agent.Close(ctx)
	client := test.NewClient(ctx, t, coord, "client", agentID)
	defer client.Close(ctx)
	client.UpdateDERP(1)
	agent.UpdateDERP(2)
	client.AssertEventuallyHasDERP(agentID, 2)
	agent.AssertEventuallyHasDERP(client.ID, 1)
	agent.ReadyForHandshake(client.ID)
	client.AssertEventuallyReadyForHandshake(agentID)
	agent.Disconnect()
	client.AssertEventuallyDisconnected(agentID)
	agent.AssertEventuallyResponsesClosed("")
}

// TestRealAgentGracefulAndLost: the client side (Coder's test.Peer on a client Coordinate
// stream) sees DISCONNECTED when a real agent shuts down gracefully and LOST when the agent's
// connections die.
func TestRealAgentGracefulAndLost(t *testing.T) {
	cfg := newStaticConfig(1)
	srv := startServe(t, cfg)
	info := srv.Announcement()
	a := cfg.Agents[0]
	coord := newCoordAdapter(t, info.BaseURL, nil, cfg.UserToken, staticResumeProvider(cfg))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	for _, graceful := range []bool{true, false} {
		name := map[bool]string{true: "Graceful", false: "Lost"}[graceful]
		t.Run(name, func(t *testing.T) {
			harness.DumpLogsOnFailure(t, srv.Process)
			pctx, pcancel := context.WithTimeout(ctx, 30*time.Second)
			defer pcancel()
			client := test.NewClient(pctx, t, coord, "client", a.ID)
			defer client.Close(ctx)
			client.UpdateDERP(999)
			agent := startRealAgent(t, info.BaseURL, a.ID, a.Token.String(), peerOpts{})
			region := awaitPreferredDERP(ctx, t, agent.Conn)
			client.AssertEventuallyHasDERP(a.ID, int32(region))
			if graceful {
				took := agent.close()
				client.AssertEventuallyDisconnected(a.ID)
				if took >= 900*time.Millisecond {
					t.Errorf("agent's graceful close took %v: tailnetd did not end the Coordinate stream promptly after Disconnect", took)
				}
				client.AssertNeverUpdateKind(a.ID, proto.CoordinateResponse_PeerUpdate_LOST)
			} else {
				agent.net.kill()
				client.AssertEventuallyLost(a.ID)
			}
		})
	}
}
