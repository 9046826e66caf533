package coderdinterop

// One scenario = one PostgreSQL database, one coderd (restartable on the same database and the
// same address), tailnetd in front of it, a user, a template whose echo-provisioned agent has
// an app, a metadata item and a start-up script, a workspace, and a real agent from Coder's
// agent package that knows tailnetd's URL only.

import (
	"context"
	"database/sql"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"cdr.dev/slog/v3"
	"cdr.dev/slog/v3/sloggers/slogtest"
	"github.com/coder/serpent"
	"github.com/coder/websocket"
	"github.com/google/uuid"
	"tailscale.com/tailcfg"

	"github.com/coder/coder/v2/agent"
	"github.com/coder/coder/v2/agent/agenttest"
	"github.com/coder/coder/v2/coderd"
	"github.com/coder/coder/v2/coderd/coderdtest"
	"github.com/coder/coder/v2/coderd/database"
	"github.com/coder/coder/v2/coderd/telemetry"
	"github.com/coder/coder/v2/codersdk"
	"github.com/coder/coder/v2/provisioner/echo"
	"github.com/coder/coder/v2/provisionersdk/proto"

	"github.com/coder/coder/v2/tailnet"
	"tailnetd.test/interop/harness"

	"tailnetd.test/interop/coderd/pgtest"
)

// Names in the template; the app and the metadata item are looked up by them.
const (
	agentName        = "main"
	appSlug          = "hello"
	appBody          = "hello from the workspace app"
	metadataKey      = "marker"
	metadataValue    = "metadata-through-tailnetd"
	startupLogMarker = "startup-log-through-tailnetd"
)

var pgServer *pgtest.Server

// TestMain starts the one PostgreSQL server of this test binary. It also makes the results
// uncacheable: they depend on the tailnetd binary, which go test's cache cannot see; opening a
// file written a moment ago makes go test refuse to cache the run ("file too new").
func TestMain(m *testing.M) {
	harness.Prepare()
	// The checks mostly wait (on coderd, the agent, the network), so run them all at once
	// rather than GOMAXPROCS at a time, unless -parallel is given.
	flag.Parse()
	parallelGiven := false
	flag.Visit(func(f *flag.Flag) { parallelGiven = parallelGiven || f.Name == "test.parallel" })
	if !parallelGiven {
		_ = flag.Set("test.parallel", "32")
	}
	s, err := pgtest.Start()
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting PostgreSQL: %v\n", err)
		os.Exit(1)
	}
	pgServer = s
	code := m.Run()
	if err := s.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "stopping PostgreSQL: %v\n", err)
	}
	os.Exit(code)
}

// logLevel is the level of coderd's and the agent's logs in the test output
// (CODERD_TEST_LOG=debug for everything).
func logLevel() slog.Level {
	if os.Getenv("CODERD_TEST_LOG") == "debug" {
		return slog.LevelDebug
	}
	return slog.LevelInfo
}

// recordingTelemetry is coderd's telemetry reporter: it keeps the network events coderd
// reports (those come from PostTelemetry calls, batched by coderd).
type recordingTelemetry struct {
	mu     sync.Mutex
	events []telemetry.NetworkEvent
}

func (r *recordingTelemetry) Report(s *telemetry.Snapshot) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, s.NetworkEvents...)
}
func (*recordingTelemetry) Enabled() bool { return true }
func (*recordingTelemetry) Close()        {}

func (r *recordingTelemetry) networkEvents() []telemetry.NetworkEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]telemetry.NetworkEvent(nil), r.events...)
}

type scenario struct {
	t *testing.T

	store     database.Store
	telemetry *recordingTelemetry
	fwd       *tcpForwarder // coderd's stable address, tailnetd's --upstream

	tailnetd    *tailnetdProcess
	tailnetdURL *url.URL
	derpMapPath string
	// frontURL is what the agent and the users are given: tailnetd's URL, or coderd's own in
	// the control scenario.
	frontURL *url.URL

	coderdMu sync.Mutex
	coderd   *coderdInstance

	// client is the owner's SDK client pointed at frontURL only.
	client     *codersdk.Client
	username   string
	workspace  codersdk.Workspace
	agentID    uuid.UUID
	agentToken string
	agent      agent.Agent

	// appAddr serves the workspace app; echoAddr echoes TCP (both on the agent's side: the
	// agent runs in this process, on this host).
	appAddr  string
	echoAddr string
}

type coderdInstance struct {
	api         *coderd.API
	cancel      context.CancelFunc
	provisioner io.Closer
	url         *url.URL
	closeOnce   sync.Once
}

// frontDoor says whom the agent and the users talk to.
type frontDoor int

const (
	// viaTailnetd: tailnetd's address only (the deployment under test).
	viaTailnetd frontDoor = iota
	// directToCoderd: coderd's own address (the control: coderd coordinates everything itself,
	// tailnetd is only the relay). It shows the checks pass when coderd can reach the agent.
	directToCoderd
)

func newScenario(t *testing.T, door frontDoor) *scenario {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	s := &scenario{t: t, telemetry: &recordingTelemetry{}}
	connURL := pgServer.NewDatabase(t)
	sqlDB, err := sql.Open("postgres", connURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sqlDB.Close() })
	s.store = database.New(sqlDB)

	s.appAddr = serveHTTP(t, appBody)
	s.echoAddr = serveEcho(t)

	// tailnetd first (coderd is "down" behind the forwarder until it starts), so that coderd
	// can be configured with tailnetd's own DERP map.
	s.fwd = newTCPForwarder(t)
	var relayArgs []string
	if door == directToCoderd {
		// In the control coderd coordinates the agent and its clients, so tailnetd's
		// coordinator never learns their node keys: its relay must admit any key, or it drops
		// them when the admission grace (10 s) runs out and a slow run fails.
		relayArgs = []string{"--relay-admit-any-key", "true"}
	}
	s.tailnetd = startTailnetdServe(t, harness.FreeTCPAddr(t), "http://"+s.fwd.addr(), relayArgs...)
	s.tailnetdURL, err = url.Parse(s.tailnetd.announcement().BaseURL)
	if err != nil {
		t.Fatal(err)
	}
	s.frontURL = s.tailnetdURL
	if door == directToCoderd {
		s.frontURL = &url.URL{Scheme: "http", Host: s.fwd.addr()}
	}
	if door == directToCoderd {
		// The control: coderd's own clients would point an "embedded" relay at coderd, which
		// has none, so coderd gets a copy of tailnetd's map with the relay marked external.
		s.derpMapPath = filepath.Join(t.TempDir(), "derpmap.json")
		s.writeTailnetdDERPMap(ctx)
	}

	s.startCoderd()
	s.createWorkspace(ctx)
	s.startAgent()
	s.waitAgentConnected(ctx, time.Time{})
	return s
}

// writeTailnetdDERPMap reads tailnetd's DERP map from its legacy /api/v2/derp-map stream and
// writes it where coderd's DERP.Config.Path points, so coderd's server tailnet uses tailnetd's
// relay (coderd's embedded relay and STUN are off).
func (s *scenario) writeTailnetdDERPMap(ctx context.Context) {
	t := s.t
	u := *s.tailnetdURL
	u.Path = "/api/v2/derp-map"
	conn, resp, err := websocket.Dial(ctx, u.String(), nil)
	if err != nil {
		t.Fatalf("reading tailnetd's DERP map: %v (%v)", err, resp)
	}
	defer conn.Close(websocket.StatusNormalClosure, "")
	_, raw, err := conn.Read(ctx)
	if err != nil {
		t.Fatalf("reading tailnetd's DERP map: %v", err)
	}
	var m tailcfg.DERPMap
	if err := json.Unmarshal(raw, &m); err != nil || len(m.Regions) == 0 {
		t.Fatalf("tailnetd's DERP map %q: %v", raw, err)
	}
	// tailnetd marks its relay as the deployment's embedded one, which makes Coder's clients
	// point it at the URL they were given. For coderd it is an external relay at a fixed
	// address (coderd's own relay is off).
	for _, r := range m.Regions {
		r.EmbeddedRelay = false
	}
	out, err := json.Marshal(&m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.derpMapPath, out, 0o600); err != nil {
		t.Fatal(err)
	}
}

// startCoderd starts a coderd on the scenario's database and points the forwarder at it.
func (s *scenario) startCoderd() {
	t := s.t
	logger := slogtest.Make(t, &slogtest.Options{IgnoreErrors: true}).Leveled(logLevel()).Named("coderd")
	opts := &coderdtest.Options{
		Database:          s.store,
		AccessURL:         s.frontURL,
		Logger:            &logger,
		TelemetryReporter: s.telemetry,
		DeploymentValues: coderdtest.DeploymentValues(t, func(dv *codersdk.DeploymentValues) {
			// tailnetd is the only relay: coderd's embedded one and its STUN server are off,
			// and coderd's DERP map is tailnetd's (region ids cannot clash).
			dv.DERP.Server.Enable = false
			dv.DERP.Server.STUNAddresses = []string{tailnet.DisableSTUN}
			if s.derpMapPath != "" {
				dv.DERP.Config.Path = serpent.String(s.derpMapPath)
			} else {
				// The sidecar recipe (README): coderd reads tailnetd's map from its JSON
				// endpoint, once, at start-up (CODER_DERP_CONFIG_URL).
				dv.DERP.Config.URL = serpent.String(s.tailnetdURL.String() + "/tailnetd/derp-map.json")
			}
		}),
	}
	setHandler, cancel, serverURL, coderdOpts := coderdtest.NewOptions(t, opts)
	// PostTelemetry batches reach the reporter within a second instead of a minute.
	coderdOpts.NetworkTelemetryBatchFrequency = 500 * time.Millisecond
	api := coderd.New(coderdOpts)
	setHandler(api.RootHandler)
	prov := coderdtest.NewTaggedProvisionerDaemon(t, api, "test-daemon", nil)
	inst := &coderdInstance{api: api, cancel: cancel, provisioner: prov, url: serverURL}
	t.Cleanup(inst.close)
	s.coderdMu.Lock()
	s.coderd = inst
	s.coderdMu.Unlock()
	s.fwd.setTarget(serverURL.Host)
}

func (c *coderdInstance) close() {
	c.closeOnce.Do(func() {
		c.cancel()
		_ = c.provisioner.Close()
		_ = c.api.Close()
	})
}

// restartCoderd stops coderd (every connection to it is cut), starts a new one on the same
// database behind the same address.
func (s *scenario) restartCoderd() {
	s.coderdMu.Lock()
	old := s.coderd
	s.coderdMu.Unlock()
	s.fwd.setTarget("")
	old.close()
	s.startCoderd()
}

func (s *scenario) createWorkspace(ctx context.Context) {
	t := s.t
	// The first user is created through tailnetd too: everything a user does goes there.
	s.client = codersdk.New(s.frontURL)
	first := coderdtest.CreateFirstUser(t, s.client)
	me, err := s.client.User(ctx, codersdk.Me)
	if err != nil {
		t.Fatal(err)
	}
	s.username = me.Username

	agentToken := uuid.NewString()
	version := coderdtest.CreateTemplateVersion(t, s.client, first.OrganizationID, &echo.Responses{
		Parse:         echo.ParseComplete,
		ProvisionPlan: echo.PlanComplete,
		ProvisionGraph: echo.ProvisionGraphWithAgent(agentToken, func(g *proto.GraphComplete) {
			a := g.Resources[0].Agents[0]
			a.Name = agentName
			a.Apps = []*proto.App{{
				Slug:         appSlug,
				DisplayName:  "Hello",
				Url:          "http://" + s.appAddr,
				SharingLevel: proto.AppSharingLevel_OWNER,
			}}
			a.Metadata = []*proto.Agent_Metadata{{
				Key:         metadataKey,
				DisplayName: "Marker",
				Script:      "echo " + metadataValue,
				Interval:    1,
				Timeout:     5,
			}}
			a.Scripts = []*proto.Script{{
				DisplayName: "startup",
				Script:      "echo " + startupLogMarker,
				RunOnStart:  true,
			}}
		}),
	})
	coderdtest.AwaitTemplateVersionJobCompleted(t, s.client, version.ID)
	template := coderdtest.CreateTemplate(t, s.client, first.OrganizationID, version.ID)
	s.workspace = coderdtest.CreateWorkspace(t, s.client, template.ID)
	coderdtest.AwaitWorkspaceBuildJobCompleted(t, s.client, s.workspace.LatestBuild.ID)
	ws, err := s.client.Workspace(ctx, s.workspace.ID)
	if err != nil {
		t.Fatal(err)
	}
	s.workspace = ws
	for _, r := range ws.LatestBuild.Resources {
		for _, a := range r.Agents {
			if a.Name == agentName {
				s.agentID = a.ID
			}
		}
	}
	if s.agentID == uuid.Nil {
		t.Fatalf("workspace %s has no agent %q", ws.Name, agentName)
	}
	s.agentToken = agentToken
}

func (s *scenario) startAgent() {
	logger := slogtest.Make(s.t, &slogtest.Options{IgnoreErrors: true}).Leveled(logLevel()).Named("agent")
	s.agent = agenttest.New(s.t, s.frontURL, s.agentToken, func(o *agent.Options) {
		o.Logger = logger
	})
}

// agentState is coderd's view of the agent (through tailnetd's proxy).
func (s *scenario) agentState(ctx context.Context) (codersdk.WorkspaceAgent, error) {
	return s.client.WorkspaceAgent(ctx, s.agentID)
}

// waitAgentConnected waits until coderd reports the agent connected with a last-connected time
// after notBefore.
func (s *scenario) waitAgentConnected(ctx context.Context, notBefore time.Time) codersdk.WorkspaceAgent {
	s.t.Helper()
	var last codersdk.WorkspaceAgent
	var lastErr error
	for {
		a, err := s.agentState(ctx)
		if err == nil {
			last = a
			if a.Status == codersdk.WorkspaceAgentConnected && a.LastConnectedAt != nil && !a.LastConnectedAt.Before(notBefore) {
				return a
			}
		}
		lastErr = err
		select {
		case <-ctx.Done():
			s.t.Fatalf("coderd never reported the agent connected (last connected after %v): last state %s, first %v, last %v, disconnected %v; last error %v",
				notBefore, last.Status, last.FirstConnectedAt, last.LastConnectedAt, last.DisconnectedAt, lastErr)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// serveHTTP serves body on 127.0.0.1 and returns the address.
func serveHTTP(t *testing.T, body string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, body)
	}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// serveEcho echoes every TCP connection on 127.0.0.1 and returns the address.
func serveEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { _ = ln.Close() })
	return ln.Addr().String()
}
