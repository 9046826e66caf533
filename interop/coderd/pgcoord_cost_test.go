package coderdinterop

// Database cost of Coder's pgcoord under the workload of tailnetd's benches/src/bin/ha_cost.rs,
// for the table in benches/results/ha.md: PostgreSQL statements per connect and per node update,
// counted with pg_stat_statements (track = top) in the test's database, with one agent on
// pgcoord replica A and N clients (each with a tunnel to it) on replica B, both in-process.
//
//	go test -run '^$' -bench PGCoordStatements -benchtime 1x ./   (in interop/coderd)
//
// Heartbeats are excluded: each is one UpsertTailnetCoordinator plus one pg_notify, so twice the
// upserts are taken off the write count.

import (
	"context"
	"database/sql"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cdr.dev/slog/v3"
	"github.com/coder/coder/v2/coderd/database"
	"github.com/coder/coder/v2/coderd/database/pubsub"
	entailnet "github.com/coder/coder/v2/enterprise/tailnet"
	"github.com/coder/coder/v2/tailnet"
	"github.com/coder/coder/v2/tailnet/proto"
	"github.com/google/uuid"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func costCoordinator(ctx context.Context, b testing.TB, pgURL string) tailnet.Coordinator {
	b.Helper()
	logger := slog.Make()
	sqlDB, err := sql.Open("postgres", pgURL)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = sqlDB.Close() })
	ps, err := pubsub.New(ctx, logger, sqlDB, pgURL)
	if err != nil {
		b.Fatalf("pubsub: %v", err)
	}
	b.Cleanup(func() { _ = ps.Close() })
	coord, err := entailnet.NewPGCoord(ctx, logger, ps, database.New(sqlDB))
	if err != nil {
		b.Fatalf("NewPGCoord: %v", err)
	}
	b.Cleanup(func() { _ = coord.Close() })
	return coord
}

type stmtCount struct{ writes, reads int64 }

func countStatements(ctx context.Context, db *sql.DB) (stmtCount, error) {
	var w, r, hb int64
	err := db.QueryRowContext(ctx, `
		SELECT
		  coalesce(sum(calls) FILTER (WHERE query ~* '(\m(insert|update|delete)\M|pg_notify)'), 0)::int8,
		  coalesce(sum(calls) FILTER (WHERE NOT query ~* '(\m(insert|update|delete)\M|pg_notify)'), 0)::int8,
		  coalesce(sum(calls) FILTER (WHERE query LIKE '%name: UpsertTailnetCoordinator%'), 0)::int8
		FROM pg_stat_statements
		WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND query NOT LIKE '%pg_stat_statements%'
		  AND query !~* '^\s*(begin|commit|rollback|set|show|listen|unlisten|discard)'`).Scan(&w, &r, &hb)
	return stmtCount{writes: w - 2*hb, reads: r}, err
}

// settle waits for done, then until the count stays put for 1 s.
func settle(ctx context.Context, b testing.TB, db *sql.DB, what string, done func() bool) stmtCount {
	b.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !done() {
		if time.Now().After(deadline) {
			b.Fatalf("%s: not converged within 60 s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	last, err := countStatements(ctx, db)
	if err != nil {
		b.Fatal(err)
	}
	for {
		time.Sleep(time.Second)
		now, err := countStatements(ctx, db)
		if err != nil {
			b.Fatal(err)
		}
		if now == last {
			return now
		}
		last = now
	}
}

func costNode(addr netip.Prefix, derp int32) *proto.Node {
	key := make([]byte, 32)
	copy(key, uuid.New().NodeID())
	return &proto.Node{
		Id:            7,
		AsOf:          timestamppb.Now(),
		Key:           key,
		Disco:         "discokey:" + uuid.NewString(),
		PreferredDerp: derp,
		Addresses:     []string{addr.String()},
		AllowedIps:    []string{addr.String()},
	}
}

func BenchmarkPGCoordStatements(b *testing.B) {
	clients, rounds := 100, 10
	if v, err := strconv.Atoi(os.Getenv("PGCOORD_COST_CLIENTS")); err == nil {
		clients = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	pgURL := pgServer.NewDatabase(b)
	db, err := sql.Open("postgres", pgURL)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"); err != nil {
		b.Fatalf("pg_stat_statements: %v", err)
	}
	coordA := costCoordinator(ctx, b, pgURL)
	coordB := costCoordinator(ctx, b, pgURL)

	agentID := uuid.New()
	agentAddr := tailnet.TailscaleServicePrefix.PrefixFromUUID(agentID)
	var mu sync.Mutex
	agentSaw := map[uuid.UUID]int32{}
	agentReq, agentResp := coordA.Coordinate(ctx, agentID, "agent", tailnet.AgentCoordinateeAuth{ID: agentID})
	go func() {
		for r := range agentResp {
			for _, u := range r.GetPeerUpdates() {
				if u.GetKind() == proto.CoordinateResponse_PeerUpdate_NODE {
					id, _ := uuid.FromBytes(u.GetId())
					mu.Lock()
					agentSaw[id] = u.GetNode().GetPreferredDerp()
					mu.Unlock()
				}
			}
		}
	}()
	agentReq <- &proto.CoordinateRequest{UpdateSelf: &proto.CoordinateRequest_UpdateSelf{Node: costNode(agentAddr, 1)}}
	time.Sleep(500 * time.Millisecond)
	base := settle(ctx, b, db, "agent", func() bool { return true })
	agentCount := func(derp int32) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, d := range agentSaw {
			if d == derp {
				n++
			}
		}
		return n
	}

	b.ResetTimer()
	type client struct {
		req  chan<- *proto.CoordinateRequest
		addr netip.Prefix
		view *atomic.Int32
	}
	cs := make([]client, 0, clients)
	for i := 0; i < clients; i++ {
		id := uuid.New()
		req, resp := coordB.Coordinate(ctx, id, "client", tailnet.ClientCoordinateeAuth{AgentID: agentID})
		view := &atomic.Int32{}
		go func() {
			for r := range resp {
				for _, u := range r.GetPeerUpdates() {
					if u.GetKind() == proto.CoordinateResponse_PeerUpdate_NODE && string(u.GetId()) == string(agentID[:]) {
						view.Store(u.GetNode().GetPreferredDerp())
					}
				}
			}
		}()
		addr := netip.PrefixFrom(tailnet.TailscaleServicePrefix.RandomAddr(), 128)
		req <- &proto.CoordinateRequest{AddTunnel: &proto.CoordinateRequest_Tunnel{Id: agentID[:]}}
		req <- &proto.CoordinateRequest{UpdateSelf: &proto.CoordinateRequest_UpdateSelf{Node: costNode(addr, 1000)}}
		cs = append(cs, client{req: req, addr: addr, view: view})
	}
	afterConnect := settle(ctx, b, db, "connect", func() bool {
		if agentCount(1000) != clients {
			return false
		}
		for _, c := range cs {
			if c.view.Load() != 1 {
				return false
			}
		}
		return true
	})

	prev := afterConnect
	var clientCost, agentCost stmtCount
	for r := 0; r < rounds; r++ {
		derp := int32(2000 + r)
		for _, c := range cs {
			c.req <- &proto.CoordinateRequest{UpdateSelf: &proto.CoordinateRequest_UpdateSelf{Node: costNode(c.addr, derp)}}
		}
		now := settle(ctx, b, db, "client round", func() bool { return agentCount(derp) == clients })
		clientCost.writes += now.writes - prev.writes
		clientCost.reads += now.reads - prev.reads
		prev = now
	}
	for r := 0; r < rounds; r++ {
		derp := int32(3000 + r)
		agentReq <- &proto.CoordinateRequest{UpdateSelf: &proto.CoordinateRequest_UpdateSelf{Node: costNode(agentAddr, derp)}}
		now := settle(ctx, b, db, "agent round", func() bool {
			for _, c := range cs {
				if c.view.Load() != derp {
					return false
				}
			}
			return true
		})
		agentCost.writes += now.writes - prev.writes
		agentCost.reads += now.reads - prev.reads
		prev = now
	}
	b.StopTimer()

	n, u := float64(clients), float64(clients*rounds)
	b.ReportMetric(float64(afterConnect.writes-base.writes)/n, "connect_writes")
	b.ReportMetric(float64(afterConnect.reads-base.reads)/n, "connect_reads")
	b.ReportMetric(float64(clientCost.writes)/u, "client_update_writes")
	b.ReportMetric(float64(clientCost.reads)/u, "client_update_reads")
	b.ReportMetric(float64(agentCost.writes)/float64(rounds), "agent_update_writes")
	b.ReportMetric(float64(agentCost.reads)/float64(rounds), "agent_update_reads")

	rows, err := db.QueryContext(ctx, `SELECT calls, left(regexp_replace(query, '\s+', ' ', 'g'), 110) FROM pg_stat_statements
		WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY calls DESC LIMIT 15`)
	if err == nil {
		for rows.Next() {
			var calls int64
			var q string
			if rows.Scan(&calls, &q) == nil {
				b.Logf("%8d  %s", calls, q)
			}
		}
		_ = rows.Close()
	}
}
