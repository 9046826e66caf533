package coder

// Real Coder peers: a workspace agent and a `coder ssh`-style client, each a tailnet.Conn driven
// by Coder's own tailnet.Controller and sub-controllers. The only code here is glue: choosing
// URLs and tokens, a ControlProtocolDialer for the agent (Coder's agent wires the same pieces by
// hand in agent/agent.go), and wrappers that record what the libraries did.

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/google/uuid"
	"golang.org/x/xerrors"

	"cdr.dev/slog/v3"
	"cdr.dev/slog/v3/sloggers/slogtest"
	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/codersdk/agentsdk"
	"github.com/coder/coder/v2/codersdk/workspacesdk"
	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"
	"github.com/coder/quartz"
	"github.com/coder/websocket"

	"tailnetd.test/interop/harness"
)

// libErrors records every Error/Critical entry Coder's libraries log, so that a test can report
// them (they usually point at a protocol disagreement) without failing on benign teardown noise.
type libErrors struct {
	mu      sync.Mutex
	entries []string
}

func (e *libErrors) LogEntry(_ context.Context, ent slog.SinkEntry) {
	if ent.Level < slog.LevelError {
		return
	}
	var fields []string
	for _, f := range ent.Fields {
		fields = append(fields, f.Name+"="+fmtValue(f.Value))
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.entries = append(e.entries, strings.Join(ent.LoggerNames, ".")+": "+ent.Message+" "+strings.Join(fields, " "))
}

func fmtValue(v any) (s string) {
	// Libraries log typed-nil errors (e.g. a nil *codersdk.Error); don't crash on them.
	defer func() {
		if recover() != nil {
			s = fmt.Sprintf("%T(nil)", v)
		}
	}()
	if err, ok := v.(error); ok {
		return err.Error()
	}
	return strings.ReplaceAll(strings.TrimSpace(fmt.Sprint(v)), "\n", " ")
}

func (*libErrors) Sync() {}

func (e *libErrors) snapshot() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.entries...)
}

// testLogger logs Coder's libraries into the test log (Info, or Debug with TAILNET_TEST_DEBUG=1)
// and records their errors. Errors never fail the test by themselves: restarts make the libraries
// log errors by design. Tests that must not see errors check errs.snapshot().
func testLogger(t *testing.T) (slog.Logger, *libErrors) {
	errs := &libErrors{}
	level := slog.LevelInfo
	if os.Getenv("TAILNET_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	l := slogtest.Make(t, &slogtest.Options{IgnoreErrors: true}).Leveled(level).AppendSinks(errs)
	t.Cleanup(func() {
		if got := errs.snapshot(); len(got) > 0 {
			t.Logf("Coder libraries logged %d error(s) in %s:\n  %s", len(got), t.Name(), strings.Join(got, "\n  "))
		}
	})
	return l, errs
}

// agentDialer is the agent's ControlProtocolDialer: Coder's agentsdk dials
// /api/v2/workspaceagents/me/rpc?version=2.10&role=agent (WebSocket → yamux → dRPC) exactly as
// a current agent does, then opens Coordinate and StreamDERPMaps on it.
type agentDialer struct {
	client *agentsdk.Client
	// hardCtx bounds the connections' lifetime, not the controller's run context: like the
	// agent's hardCtx (agent/agent.go), it outlives a graceful shutdown so that the Disconnect
	// can still be written after the controller's context is cancelled.
	hardCtx context.Context

	mu    sync.Mutex
	dials int
}

func (d *agentDialer) Dial(_ context.Context, _ tailnet.ResumeTokenController) (tailnet.ControlProtocolClients, error) {
	_, tAPI, err := d.client.ConnectRPC210WithRole(d.hardCtx, "agent")
	if err != nil {
		return tailnet.ControlProtocolClients{}, err
	}
	coord, err := tAPI.Coordinate(context.Background())
	if err != nil {
		_ = tAPI.DRPCConn().Close()
		return tailnet.ControlProtocolClients{}, xerrors.Errorf("coordinate: %w", err)
	}
	derps := &tailnet.DERPFromDRPCWrapper{}
	derps.Client, err = tAPI.StreamDERPMaps(context.Background(), &proto.StreamDERPMapsRequest{})
	if err != nil {
		_ = tAPI.DRPCConn().Close()
		return tailnet.ControlProtocolClients{}, xerrors.Errorf("stream DERP maps: %w", err)
	}
	d.mu.Lock()
	d.dials++
	d.mu.Unlock()
	return tailnet.ControlProtocolClients{
		Closer:      tAPI.DRPCConn(),
		Coordinator: coord,
		DERP:        derps,
		Telemetry:   tAPI,
	}, nil
}

func (d *agentDialer) dialCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.dials
}

// realAgent is a workspace agent's networking: its tailnet.Conn (both service addresses, as
// agent/agent.go sets them) coordinated by the agent coordination controller (which sends
// ReadyForHandshake) and fed DERP maps by the basic DERP controller.
type realAgent struct {
	ID     uuid.UUID
	Conn   *tailnet.Conn
	dialer *agentDialer
	ctrl   *tailnet.Controller
	cancel context.CancelFunc
	// hardCancel ends the control connections once the controller has finished.
	hardCancel context.CancelFunc
	Errs       *libErrors
	Coord      *coordRecorder
	// net carries the agent's control-plane connections (not DERP); kill() cuts them.
	net *killableNet
}

// peerOpts are the few knobs the tests turn on Coder's peers.
type peerOpts struct {
	// derpForceWebSockets makes the DERP client use DERP-over-WebSocket (Coder's
	// derp_force_websockets) instead of the Upgrade: DERP request.
	derpForceWebSockets bool
}

func startRealAgent(t *testing.T, baseURL string, agentID uuid.UUID, agentToken string, opts peerOpts) *realAgent {
	t.Helper()
	logger, errs := testLogger(t)
	logger = logger.Named("agent")
	u, err := url.Parse(baseURL)
	if err != nil {
		t.Fatal(err)
	}
	knet := newKillableNet()
	client := agentsdk.New(u, agentsdk.WithFixedToken(agentToken), codersdk.WithLogger(logger.Named("sdk")),
		codersdk.WithHTTPClient(&http.Client{Transport: &http.Transport{DialContext: knet.DialContext}}))
	conn, err := tailnet.NewConn(&tailnet.Options{
		ID: agentID,
		Addresses: []netip.Prefix{
			tailnet.TailscaleServicePrefix.PrefixFromUUID(agentID),
			tailnet.CoderServicePrefix.PrefixFromUUID(agentID),
		},
		Logger:              logger.Named("net.tailnet"),
		BlockEndpoints:      true, // every packet through tailnetd's DERP relay
		DERPForceWebSockets: opts.derpForceWebSockets,
		ClientType:          proto.TelemetryEvent_AGENT,
	})
	if err != nil {
		t.Fatalf("agent tailnet.NewConn: %v", err)
	}
	hardCtx, hardCancel := context.WithCancel(context.Background())
	dialer := &agentDialer{client: client, hardCtx: hardCtx}
	coordRec := &coordRecorder{}
	ctrl := tailnet.NewController(logger.Named("controller"),
		recordingDialer{inner: dialer, coord: coordRec, tel: &telemetryRecorder{}})
	ctrl.CoordCtrl = tailnet.NewAgentCoordinationController(logger.Named("coord"), conn)
	ctrl.DERPCtrl = tailnet.NewBasicDERPController(logger.Named("derp"), client, conn)
	ctx, cancel := context.WithCancel(context.Background())
	ctrl.Run(ctx)
	a := &realAgent{ID: agentID, Conn: conn, dialer: dialer, ctrl: ctrl, cancel: cancel, hardCancel: hardCancel,
		Errs: errs, Coord: coordRec, net: knet}
	t.Cleanup(func() { a.close() })
	return a
}

// close is the agent's graceful shutdown: the controller sends Disconnect and waits (1 s at most)
// for the server to end the stream; then the connections and the Conn are closed.
// It returns how long the controller took.
func (a *realAgent) close() time.Duration {
	start := time.Now()
	a.cancel()
	select {
	case <-a.ctrl.Closed():
	case <-time.After(10 * time.Second):
	}
	took := time.Since(start)
	a.hardCancel()
	_ = a.Conn.Close()
	return took
}

// IP is the address clients use for the agent (workspacesdk's agentConn.agentAddress).
func (a *realAgent) IP() netip.Addr { return tailnet.TailscaleServicePrefix.AddrFromUUID(a.ID) }

// recordingResumeCtrl wraps Coder's basic resume token controller and records every token the
// server hands out (one RefreshResumeToken per control connection, then on refresh_in).
type recordingResumeCtrl struct {
	tailnet.ResumeTokenController

	mu     sync.Mutex
	tokens []*proto.RefreshResumeTokenResponse
	errs   []error
}

func (r *recordingResumeCtrl) New(client tailnet.ResumeTokenClient) tailnet.CloserWaiter {
	return r.ResumeTokenController.New(recordingResumeClient{client, r})
}

type recordingResumeClient struct {
	inner tailnet.ResumeTokenClient
	r     *recordingResumeCtrl
}

func (c recordingResumeClient) RefreshResumeToken(ctx context.Context, in *proto.RefreshResumeTokenRequest) (*proto.RefreshResumeTokenResponse, error) {
	resp, err := c.inner.RefreshResumeToken(ctx, in)
	c.r.mu.Lock()
	defer c.r.mu.Unlock()
	if err != nil {
		c.r.errs = append(c.r.errs, err)
	} else {
		c.r.tokens = append(c.r.tokens, resp)
	}
	return resp, err
}

func (r *recordingResumeCtrl) received() []*proto.RefreshResumeTokenResponse {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*proto.RefreshResumeTokenResponse(nil), r.tokens...)
}

// recordingTransport records the status and URL of every HTTP request (WebSocket dials included).
type recordingTransport struct {
	inner http.RoundTripper
	mu    sync.Mutex
	urls  []string
}

// RoundTrip records "<status> <url>" ("ERR <url>" when no response arrived).
func (rt *recordingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	res, err := rt.inner.RoundTrip(req)
	status := "ERR"
	if res != nil {
		status = fmt.Sprint(res.StatusCode)
	}
	rt.mu.Lock()
	rt.urls = append(rt.urls, status+" "+req.URL.String())
	rt.mu.Unlock()
	return res, err
}

func (rt *recordingTransport) requests() []string {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return append([]string(nil), rt.urls...)
}

// realClient is what `coder ssh` runs (workspacesdk.Client.DialAgent minus the
// /connection REST call, which tailnetd does not serve): Coder's WebsocketDialer on
// /api/v2/workspaceagents/{agent}/coordinate, a tunnel-source coordination controller with the
// agent as destination, DERP maps from StreamDERPMaps, resume tokens and telemetry.
type realClient struct {
	Conn      *tailnet.Conn
	IP        netip.Addr
	dialer    *workspacesdk.WebsocketDialer
	ctrl      *tailnet.Controller
	resume    *recordingResumeCtrl
	transport *recordingTransport
	net       *killableNet
	cancel    context.CancelFunc
	Errs      *libErrors
	Coord     *coordRecorder
	Telemetry *telemetryRecorder
	closeOnce sync.Once
}

func startRealClient(ctx context.Context, t *testing.T, baseURL string, agentID uuid.UUID, userToken string, opts peerOpts) *realClient {
	t.Helper()
	c := newRealClient(t, baseURL, agentID, userToken, opts)
	select {
	case <-ctx.Done():
		t.Fatalf("client: timed out waiting for the first control-plane dial")
	case err := <-c.dialer.Connected():
		if err != nil {
			t.Fatalf("client: first dial failed: %v", err)
		}
	}
	return c
}

// newRealClient starts the client's controller without waiting for its first dial.
func newRealClient(t *testing.T, baseURL string, agentID uuid.UUID, userToken string, opts peerOpts) *realClient {
	t.Helper()
	logger, errs := testLogger(t)
	logger = logger.Named("client")
	u, err := url.Parse(baseURL)
	if err != nil {
		t.Fatal(err)
	}
	knet := newKillableNet()
	rt := &recordingTransport{inner: &http.Transport{DialContext: knet.DialContext}}
	sdk := codersdk.New(u, codersdk.WithSessionToken(userToken), codersdk.WithLogger(logger.Named("sdk")))
	sdk.HTTPClient = &http.Client{Transport: rt}
	wsOptions := &websocket.DialOptions{
		HTTPClient:      sdk.HTTPClient,
		CompressionMode: websocket.CompressionDisabled,
	}
	sdk.SessionTokenProvider.SetDialOption(wsOptions)
	coordinateURL, err := u.Parse("/api/v2/workspaceagents/" + agentID.String() + "/coordinate")
	if err != nil {
		t.Fatal(err)
	}
	dialer := workspacesdk.NewWebsocketDialer(logger.Named("dialer"), coordinateURL, wsOptions)
	coordRec, telRec := &coordRecorder{}, &telemetryRecorder{}
	ctrl := tailnet.NewController(logger.Named("controller"),
		recordingDialer{inner: dialer, coord: coordRec, tel: telRec})
	resume := &recordingResumeCtrl{ResumeTokenController: tailnet.NewBasicResumeTokenController(logger.Named("resume"), quartz.NewReal())}
	ctrl.ResumeTokenCtrl = resume
	telemetry := tailnet.NewBasicTelemetryController(logger.Named("telemetry"))
	ctrl.TelemetryCtrl = telemetry

	ip := tailnet.TailscaleServicePrefix.RandomAddr()
	conn, err := tailnet.NewConn(&tailnet.Options{
		Addresses:           []netip.Prefix{netip.PrefixFrom(ip, 128)},
		Logger:              logger.Named("net.tailnet"),
		BlockEndpoints:      true,
		DERPForceWebSockets: opts.derpForceWebSockets,
		ClientType:          proto.TelemetryEvent_CLI,
		TelemetrySink:       telemetry,
	})
	if err != nil {
		t.Fatalf("client tailnet.NewConn: %v", err)
	}
	coordCtrl := tailnet.NewTunnelSrcCoordController(logger.Named("coord"), conn)
	coordCtrl.AddDestination(agentID)
	ctrl.CoordCtrl = coordCtrl
	ctrl.DERPCtrl = tailnet.NewBasicDERPController(logger.Named("derp"), workspacesdk.New(sdk), conn)
	runCtx, cancel := context.WithCancel(context.Background())
	ctrl.Run(runCtx)
	c := &realClient{Conn: conn, IP: ip, dialer: dialer, ctrl: ctrl, resume: resume, transport: rt,
		net: knet, cancel: cancel, Errs: errs, Coord: coordRec, Telemetry: telRec}
	t.Cleanup(func() { c.close() })
	return c
}

// close is the graceful exit: cancel the controller (it sends Disconnect and waits up to its 1 s
// graceful timeout for the server to end the Coordinate stream), then close the Conn. It returns
// how long the controller took to finish.
func (c *realClient) close() time.Duration {
	var took time.Duration
	c.closeOnce.Do(func() {
		start := time.Now()
		c.cancel()
		select {
		case <-c.ctrl.Closed():
		case <-time.After(10 * time.Second):
		}
		took = time.Since(start)
		_ = c.Conn.Close()
	})
	return took
}

// peerID is the client's peer id as the server sees it: the `sub` of the newest resume token
// (RefreshResumeToken is the only place the server tells a client its id).
func (c *realClient) peerID(ctx context.Context, t *testing.T) uuid.UUID {
	t.Helper()
	var tok *proto.RefreshResumeTokenResponse
	harness.WaitFor(ctx, t, "a resume token from RefreshResumeToken", func() bool {
		got := c.resume.received()
		if len(got) == 0 {
			return false
		}
		tok = got[len(got)-1]
		return true
	})
	id, err := unverifiedTokenSubject(tok.Token)
	if err != nil {
		t.Fatalf("resume token %q: %v", tok.Token, err)
	}
	return id
}

// unverifiedTokenSubject reads `sub` from a JWS without checking the signature (used where the
// harness does not know the server's key, i.e. dev mode); it does check the shape Coder uses.
func unverifiedTokenSubject(token string) (uuid.UUID, error) {
	tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.HS512})
	if err != nil {
		return uuid.Nil, xerrors.Errorf("parse JWS: %w", err)
	}
	if len(tok.Headers) != 1 || tok.Headers[0].KeyID == "" {
		return uuid.Nil, xerrors.Errorf("want one signature with a kid header, got %+v", tok.Headers)
	}
	var claims jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&claims); err != nil {
		return uuid.Nil, xerrors.Errorf("claims: %w", err)
	}
	return uuid.Parse(claims.Subject)
}

// coordRecorder keeps every CoordinateRequest a peer's controller sent and every
// CoordinateResponse it received, across reconnects.
type coordRecorder struct {
	mu   sync.Mutex
	sent []*proto.CoordinateRequest
	recv []*proto.CoordinateResponse
}

// sawUpdate reports whether a response carried a peer update of kind about id.
func (r *coordRecorder) sawUpdate(id uuid.UUID, kind proto.CoordinateResponse_PeerUpdate_Kind) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, resp := range r.recv {
		for _, u := range resp.GetPeerUpdates() {
			if uid, err := uuid.FromBytes(u.GetId()); err == nil && uid == id && u.GetKind() == kind {
				return true
			}
		}
	}
	return false
}

// sentReadyForHandshake reports whether a request acknowledged id.
func (r *coordRecorder) sentReadyForHandshake(id uuid.UUID) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, req := range r.sent {
		for _, rfh := range req.GetReadyForHandshake() {
			if uid, err := uuid.FromBytes(rfh.GetId()); err == nil && uid == id {
				return true
			}
		}
	}
	return false
}

// errors returns the error strings the server sent.
func (r *coordRecorder) errors() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, resp := range r.recv {
		if resp.GetError() != "" {
			out = append(out, resp.GetError())
		}
	}
	return out
}

type recordingCoordClient struct {
	tailnet.CoordinatorClient
	r *coordRecorder
}

func (c recordingCoordClient) Send(req *proto.CoordinateRequest) error {
	c.r.mu.Lock()
	c.r.sent = append(c.r.sent, req)
	c.r.mu.Unlock()
	return c.CoordinatorClient.Send(req)
}

func (c recordingCoordClient) Recv() (*proto.CoordinateResponse, error) {
	resp, err := c.CoordinatorClient.Recv()
	if err == nil {
		c.r.mu.Lock()
		c.r.recv = append(c.r.recv, resp)
		c.r.mu.Unlock()
	}
	return resp, err
}

// telemetryRecorder counts PostTelemetry outcomes.
type telemetryRecorder struct {
	mu   sync.Mutex
	ok   int
	errs []error
}

func (r *telemetryRecorder) counts() (int, []error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ok, append([]error(nil), r.errs...)
}

type recordingTelemetryClient struct {
	tailnet.TelemetryClient
	r *telemetryRecorder
}

func (c recordingTelemetryClient) PostTelemetry(ctx context.Context, in *proto.TelemetryRequest) (*proto.TelemetryResponse, error) {
	resp, err := c.TelemetryClient.PostTelemetry(ctx, in)
	c.r.mu.Lock()
	defer c.r.mu.Unlock()
	if err != nil {
		c.r.errs = append(c.r.errs, err)
	} else {
		c.r.ok++
	}
	return resp, err
}

// recordingDialer wraps a ControlProtocolDialer so the harness sees the coordination and
// telemetry traffic the controllers exchange with tailnetd.
type recordingDialer struct {
	inner tailnet.ControlProtocolDialer
	coord *coordRecorder
	tel   *telemetryRecorder
}

func (d recordingDialer) Dial(ctx context.Context, r tailnet.ResumeTokenController) (tailnet.ControlProtocolClients, error) {
	c, err := d.inner.Dial(ctx, r)
	if err != nil {
		return c, err
	}
	if c.Coordinator != nil {
		c.Coordinator = recordingCoordClient{c.Coordinator, d.coord}
	}
	if c.Telemetry != nil {
		c.Telemetry = recordingTelemetryClient{c.Telemetry, d.tel}
	}
	return c, nil
}
