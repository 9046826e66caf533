// Command coordload puts the coordinator workload of `loadgen coordinator` on a server with
// Coder's own Go client stack: every peer dials the WebSocket with github.com/coder/websocket and
// speaks dRPC through tailnet.NewDRPCClient (yamux underneath), as codersdk's WebsocketDialer
// does, and runs the Coordinate stream of proto.DRPCTailnetClient. It exists to cross-check the
// Rust load generator's lean client (issue 17): at the same offered load on the same server, the
// two must see the same deliveries and latencies and cost the server the same CPU per update.
//
// The workload is the load generator's: A agents and C clients per agent; every client tunnels to
// its agent; clients send update_self at -rate per second (reaching their agent), agents at
// -agent-rate (fanned out to their C clients). The scheduled send time (wall clock) travels in
// the node's as_of, so latency is stamped at the scheduled time, not the actual one (no
// coordinated omission), and a NODE update counts as delivered once per (receiver, sender,
// stamp) when its stamp falls in the measurement window.
//
// Prints one JSON line with the same field names as `loadgen coordinator` (those it measures).
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cdr.dev/slog/v3"
	"github.com/coder/websocket"
	"github.com/google/uuid"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"
)

type agentCred struct {
	ID    uuid.UUID `json:"id"`
	Token uuid.UUID `json:"token"`
}

type authFile struct {
	Agents      []agentCred `json:"agents"`
	ClientToken string      `json:"client_token"`
}

type report struct {
	Mode                   string  `json:"mode"`
	Client                 string  `json:"client"`
	Agents                 int     `json:"agents"`
	ClientsPerAgent        int     `json:"clients_per_agent"`
	Peers                  int     `json:"peers"`
	Rate                   float64 `json:"rate"`
	AgentRate              float64 `json:"agent_rate"`
	DurationS              float64 `json:"duration_s"`
	OfferedDeliveriesPerS  float64 `json:"offered_deliveries_per_s"`
	DeliveredUpdatesPerS   float64 `json:"delivered_updates_per_s"`
	DuplicateUpdates       uint64  `json:"duplicate_updates"`
	FanoutP50Ms            float64 `json:"fanout_p50_ms"`
	FanoutP99Ms            float64 `json:"fanout_p99_ms"`
	ToAgentP50Ms           float64 `json:"to_agent_p50_ms"`
	ToAgentP99Ms           float64 `json:"to_agent_p99_ms"`
	FailedStreams          uint64  `json:"failed_streams"`
	ServerCPUUtil          float64 `json:"server_cpu_util,omitempty"`
	ServerCPUUsPerDelivery float64 `json:"server_cpu_us_per_update,omitempty"`
	LoadgenCPUUtil         float64 `json:"loadgen_cpu_util"`
}

// peer is one connected agent or client.
type peer struct {
	id      uuid.UUID
	agent   bool
	agentID uuid.UUID
	stream  proto.DRPCTailnet_CoordinateClient
	// seen dedups deliveries by (sender, stamp); only the receive goroutine touches it.
	seen map[[24]byte]struct{}
}

// tally is what every receiver adds to.
type tally struct {
	mu         sync.Mutex
	fanout     []float64 // ms, agent → client
	toAgent    []float64 // ms, client → agent
	delivered  uint64
	duplicates uint64
	failed     atomic.Uint64
	winStart   atomic.Int64 // unix ns; 0 until the window opens
	winEnd     atomic.Int64
}

func main() {
	url := flag.String("url", "", "server base URL, http://127.0.0.1:PORT")
	authPath := flag.String("auth-file", "", "credentials (the load generator's auth.json); tailnetd flavour")
	flavor := flag.String("flavor", "tailnetd", "tailnetd or gocoord (no auth, interop/gocoord's routes)")
	agents := flag.Int("agents", 10, "agents")
	clientsPer := flag.Int("clients-per-agent", 100, "clients per agent")
	rate := flag.Float64("rate", 1, "update_self per second per client")
	agentRate := flag.Float64("agent-rate", 1, "update_self per second per agent")
	duration := flag.Float64("duration", 5, "measurement window, seconds")
	warmup := flag.Float64("warmup", 1, "warm-up before the window, seconds")
	serverPid := flag.Int("server-pid", 0, "server process: report its CPU during the window")
	flag.Parse()
	if *url == "" {
		log.Fatal("coordload: -url is required")
	}
	var auth authFile
	switch *flavor {
	case "tailnetd":
		b, err := os.ReadFile(*authPath)
		if err != nil {
			log.Fatalf("coordload: reading -auth-file: %v", err)
		}
		if err := json.Unmarshal(b, &auth); err != nil {
			log.Fatalf("coordload: parsing -auth-file: %v", err)
		}
		if len(auth.Agents) < *agents {
			log.Fatalf("coordload: -auth-file has %d agents, need %d", len(auth.Agents), *agents)
		}
	case "gocoord":
		for i := 0; i < *agents; i++ {
			auth.Agents = append(auth.Agents, agentCred{ID: uuid.New()})
		}
	default:
		log.Fatalf("coordload: unknown -flavor %q", *flavor)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	t := &tally{}
	var peers []*peer
	for a := 0; a < *agents; a++ {
		p, err := connect(ctx, *url, *flavor, auth, a, true)
		if err != nil {
			log.Fatalf("coordload: agent %d: %v", a, err)
		}
		peers = append(peers, p)
	}
	for a := 0; a < *agents; a++ {
		for c := 0; c < *clientsPer; c++ {
			p, err := connect(ctx, *url, *flavor, auth, a, false)
			if err != nil {
				log.Fatalf("coordload: client %d of agent %d: %v", c, a, err)
			}
			if err := p.stream.Send(&proto.CoordinateRequest{
				AddTunnel: &proto.CoordinateRequest_Tunnel{Id: p.agentID[:]},
			}); err != nil {
				log.Fatalf("coordload: add_tunnel: %v", err)
			}
			peers = append(peers, p)
		}
	}
	for _, p := range peers {
		go receive(p, t)
	}

	start := time.Now().Add(50 * time.Millisecond)
	winStart := start.Add(time.Duration(*warmup * float64(time.Second)))
	winEnd := winStart.Add(time.Duration(*duration * float64(time.Second)))
	t.winStart.Store(winStart.UnixNano())
	t.winEnd.Store(winEnd.UnixNano())
	stop := winEnd.Add(time.Second) // the window's last sends still arrive
	var senders sync.WaitGroup
	for _, p := range peers {
		r := *rate
		if p.agent {
			r = *agentRate
		}
		if r <= 0 {
			continue
		}
		senders.Add(1)
		go func(p *peer, r float64) {
			defer senders.Done()
			send(p, r, start, stop, t)
		}(p, r)
	}

	time.Sleep(time.Until(winStart))
	cpu0 := cpuSeconds(*serverPid)
	self0 := cpuSeconds(os.Getpid())
	time.Sleep(time.Until(winEnd))
	cpu1 := cpuSeconds(*serverPid)
	self1 := cpuSeconds(os.Getpid())
	senders.Wait()
	time.Sleep(500 * time.Millisecond)

	t.mu.Lock()
	defer t.mu.Unlock()
	rep := report{
		Mode:                  "coordinator",
		Client:                "coder-go",
		Agents:                *agents,
		ClientsPerAgent:       *clientsPer,
		Peers:                 len(peers),
		Rate:                  *rate,
		AgentRate:             *agentRate,
		DurationS:             *duration,
		OfferedDeliveriesPerS: float64(*agents*(*clientsPer))*(*rate) + float64(*agents*(*clientsPer))*(*agentRate),
		DeliveredUpdatesPerS:  float64(t.delivered) / *duration,
		DuplicateUpdates:      t.duplicates,
		FanoutP50Ms:           quantile(t.fanout, 0.50),
		FanoutP99Ms:           quantile(t.fanout, 0.99),
		ToAgentP50Ms:          quantile(t.toAgent, 0.50),
		ToAgentP99Ms:          quantile(t.toAgent, 0.99),
		FailedStreams:         t.failed.Load(),
		LoadgenCPUUtil:        (self1 - self0) / *duration,
	}
	if *serverPid != 0 {
		rep.ServerCPUUtil = (cpu1 - cpu0) / *duration
		if rep.DeliveredUpdatesPerS > 0 {
			rep.ServerCPUUsPerDelivery = rep.ServerCPUUtil * 1e6 / rep.DeliveredUpdatesPerS
		}
	}
	out, _ := json.Marshal(rep)
	fmt.Println(string(out))
}

// connect dials one peer the way codersdk does (WebSocket, then dRPC over yamux) and opens its
// Coordinate stream.
func connect(ctx context.Context, base, flavor string, auth authFile, agentIdx int, agent bool) (*peer, error) {
	cred := auth.Agents[agentIdx]
	p := &peer{agent: agent, agentID: cred.ID, seen: map[[24]byte]struct{}{}}
	var path string
	header := http.Header{}
	switch {
	case flavor == "tailnetd" && agent:
		p.id = cred.ID
		path = "/api/v2/workspaceagents/me/rpc?version=2.0"
		header.Set("Coder-Session-Token", cred.Token.String())
	case flavor == "tailnetd":
		p.id = uuid.New()
		path = fmt.Sprintf("/api/v2/workspaceagents/%s/coordinate?version=2.0", cred.ID)
		header.Set("Coder-Session-Token", auth.ClientToken)
	case agent:
		p.id = cred.ID
		path = fmt.Sprintf("/api/v2/workspaceagents/%s/coordinate?version=2.0&role=agent", cred.ID)
	default:
		p.id = uuid.New()
		path = fmt.Sprintf("/api/v2/workspaceagents/%s/coordinate?version=2.0&client=%s", cred.ID, p.id)
	}
	dialCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ws, res, err := websocket.Dial(dialCtx, strings.TrimRight(base, "/")+path, &websocket.DialOptions{
		HTTPHeader:      header,
		CompressionMode: websocket.CompressionDisabled,
	})
	if res != nil && res.Body != nil {
		_ = res.Body.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", path, err)
	}
	ws.SetReadLimit(1 << 20)
	client, err := tailnet.NewDRPCClient(websocket.NetConn(ctx, ws, websocket.MessageBinary), slog.Make())
	if err != nil {
		return nil, fmt.Errorf("dRPC client: %w", err)
	}
	stream, err := client.Coordinate(ctx)
	if err != nil {
		return nil, fmt.Errorf("Coordinate: %w", err)
	}
	p.stream = stream
	return p, nil
}

// send sends update_self at rate r from start until stop, each stamped with its scheduled time.
func send(p *peer, r float64, start, stop time.Time, t *tally) {
	interval := time.Duration(float64(time.Second) / r)
	// Spread the peers over one interval so that they do not all send at once.
	next := start.Add(time.Duration(rand.Int64N(int64(interval))))
	for next.Before(stop) {
		time.Sleep(time.Until(next))
		if err := p.stream.Send(&proto.CoordinateRequest{
			UpdateSelf: &proto.CoordinateRequest_UpdateSelf{Node: node(p, next)},
		}); err != nil {
			t.failed.Add(1)
			return
		}
		next = next.Add(interval)
	}
}

// receive counts the NODE updates this peer gets.
func receive(p *peer, t *tally) {
	for {
		resp, err := p.stream.Recv()
		if err != nil {
			if !strings.Contains(err.Error(), "context canceled") {
				t.failed.Add(1)
			}
			return
		}
		now := time.Now().UnixNano()
		for _, u := range resp.GetPeerUpdates() {
			if u.GetKind() != proto.CoordinateResponse_PeerUpdate_NODE || u.GetNode().GetAsOf() == nil {
				continue
			}
			stamp := u.GetNode().GetAsOf().AsTime().UnixNano()
			ws, we := t.winStart.Load(), t.winEnd.Load()
			if ws == 0 || stamp < ws || stamp >= we {
				continue
			}
			var key [24]byte
			copy(key[:16], u.GetId())
			binary.BigEndian.PutUint64(key[16:], uint64(stamp))
			dup := false
			if _, ok := p.seen[key]; ok {
				dup = true
			} else {
				p.seen[key] = struct{}{}
			}
			ms := float64(now-stamp) / 1e6
			t.mu.Lock()
			if dup {
				t.duplicates++
			} else {
				t.delivered++
				if p.agent {
					t.toAgent = append(t.toAgent, ms)
				} else {
					t.fanout = append(t.fanout, ms)
				}
			}
			t.mu.Unlock()
		}
	}
}

// node is a node the coordinator accepts for p (an agent's carries its Tailscale service
// address), stamped with at.
func node(p *peer, at time.Time) *proto.Node {
	var addr netip.Addr
	if p.agent {
		addr = tailnet.TailscaleServicePrefix.AddrFromUUID(p.id)
	} else {
		addr = tailnet.TailscaleServicePrefix.RandomAddr()
	}
	prefix := netip.PrefixFrom(addr, 128).String()
	key := make([]byte, 34)
	copy(key, "np")
	for i := 2; i < len(key); i++ {
		key[i] = byte(rand.IntN(256))
	}
	disco := make([]byte, 32)
	for i := range disco {
		disco[i] = byte(rand.IntN(256))
	}
	return &proto.Node{
		Id:            rand.Int64N(1<<31-1) + 1,
		AsOf:          timestamppb.New(at),
		Key:           key,
		Disco:         fmt.Sprintf("discokey:%x", disco),
		PreferredDerp: 1,
		DerpLatency:   map[string]float64{"1-v4": 0.01, "1-v6": 0.012},
		Addresses:     []string{prefix},
		AllowedIps:    []string{prefix},
		Endpoints:     []string{"192.0.2.10:41641", "[2001:db8::10]:41641"},
	}
}

// cpuSeconds is the user+system CPU time of pid from /proc (0 if pid is 0 or unreadable).
func cpuSeconds(pid int) float64 {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	sy, _ := strconv.ParseFloat(f[12], 64)
	return (u + sy) / 100 // USER_HZ
}

func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	i := int(q * float64(len(s)-1))
	return s[i]
}
