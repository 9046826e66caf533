// Command gocoord serves Coder's in-memory Go coordinator (tailnet.NewCoordinator) over the
// same v2 transport Coder uses (WebSocket → yamux → dRPC, via tailnet.NewClientService), so the
// benchmark suite can load it with exactly the workload it puts on tailnetd.
//
// Routes (no authentication; this is a benchmark harness, bound to loopback):
//
//	GET /api/v2/workspaceagents/{id}/coordinate?role=agent        agent {id}
//	GET /api/v2/workspaceagents/{id}/coordinate?client={uuid}     client {uuid} of agent {id}
//
// Agents get tailnet.AgentCoordinateeAuth and clients tailnet.ClientCoordinateeAuth, the same
// authorization rules coderd applies. Once listening it prints {"http_addr":"127.0.0.1:N"} on
// stdout, like tailnetd.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"cdr.dev/slog/v3"
	"github.com/coder/websocket"
	"github.com/google/uuid"
	"tailscale.com/tailcfg"

	"github.com/coder/coder/v2/tailnet"
	tailnetproto "github.com/coder/coder/v2/tailnet/proto"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	flag.Parse()

	logger := slog.Make() // discards everything, like a quiet coderd
	coord := tailnet.NewCoordinator(logger)
	var coordPtr atomic.Pointer[tailnet.Coordinator]
	coordPtr.Store(&coord)
	svc, err := tailnet.NewClientService(tailnet.ClientServiceOptions{
		Logger:                 logger,
		CoordPtr:               &coordPtr,
		DERPMapUpdateFrequency: 10 * time.Minute,
		DERPMapFn: func() *tailcfg.DERPMap {
			return &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{}}
		},
		NetworkTelemetryHandler: func(_ []*tailnetproto.TelemetryEvent) {},
		ResumeTokenProvider:     tailnet.NewInsecureTestResumeTokenProvider(),
	})
	if err != nil {
		log.Fatalf("client service: %v", err)
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v2/workspaceagents/{id}/coordinate", func(w http.ResponseWriter, r *http.Request) {
		agentID, err := uuid.Parse(r.PathValue("id"))
		if err != nil {
			http.Error(w, "bad agent id", http.StatusBadRequest)
			return
		}
		q := r.URL.Query()
		var sid tailnet.StreamID
		if q.Get("role") == "agent" {
			sid = tailnet.StreamID{Name: "agent", ID: agentID, Auth: tailnet.AgentCoordinateeAuth{ID: agentID}}
		} else {
			clientID, err := uuid.Parse(q.Get("client"))
			if err != nil {
				clientID = uuid.New()
			}
			sid = tailnet.StreamID{Name: "client", ID: clientID, Auth: tailnet.ClientCoordinateeAuth{AgentID: agentID}}
		}
		version := q.Get("version")
		if version == "" {
			version = "2.0"
		}
		conn, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		nc := websocket.NetConn(ctx, conn, websocket.MessageBinary)
		defer nc.Close()
		if err := svc.ServeClient(ctx, version, nc, sid); err != nil && !strings.Contains(err.Error(), "EOF") {
			_ = conn.Close(websocket.StatusInternalError, "serve failed")
		}
	})

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	line, _ := json.Marshal(map[string]string{"http_addr": ln.Addr().String()})
	fmt.Println(string(line))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		_ = coord.Close()
		_ = srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
		log.Fatalf("serve: %v", err)
	}
}
