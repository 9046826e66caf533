// Command derpload is a DERP relay load generator built on Tailscale's own derphttp client, so
// that relay figures do not rest on tailnetd's client alone. It behaves like a Tailscale node
// relaying through DERP: every packet is one derphttp.Client.Send (one frame written and flushed
// per packet, as magicsock's DERP writer does), at most -window packets of a pair in flight (32:
// magicsock's per-region write queue and the relays' per-destination queue), and receivers take
// whatever arrives with derphttp.Client.Recv.
//
// P sender→receiver pairs, S-byte packets carrying a sequence number and the send time
// (monotonic ns since the run started, little endian, the layout of benches/src/relay.rs), either
// closed loop (-window) or open loop at a total rate (-window 0 -rate R; latency then counts from
// each packet's scheduled send time, not the actual one, so a relay that pushes back is not
// flattered by coordinated omission; -rate 0 = as fast as possible). It prints
// one JSON object with the fields of `loadgen relay` (benches/src/relay.rs RelayReport), plus the
// generator's own CPU seconds (getrusage), so compare can report the client's CPU per delivered
// packet next to the server's.
//
// URLs: http:// (Upgrade: DERP), https:// (TLS; -ca trusts a PEM certificate or CA file).
// WebSocket needs derphttp's own WebSocket dialer, which Tailscale compiles in only with the
// build tag ts_debug_websockets; built with it, -ws sets TS_DEBUG_DERP_WS_CLIENT=1.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
)

// payloadHeader is the sequence number and send time at the start of every packet.
const payloadHeader = 16

// stallWait is how long a closed-loop sender waits for room before it writes its in-flight
// packets off as lost (the same 100 ms as loadgen relay).
const stallWait = 100 * time.Millisecond

type config struct {
	url       string
	pairs     int
	size      int
	rate      float64
	duration  float64
	warmup    float64
	window    uint64
	serverPID int
	label     string
	caFile    string
	ws        bool
}

// report has the field names of loadgen's RelayReport.
type report struct {
	Mode                  string   `json:"mode"`
	Label                 string   `json:"label"`
	Transport             string   `json:"transport"`
	Generator             string   `json:"generator"`
	Flush                 string   `json:"flush"`
	Pairs                 int      `json:"pairs"`
	Size                  int      `json:"size"`
	OfferedPPS            float64  `json:"offered_pps"`
	OfferedGbps           float64  `json:"offered_gbps"`
	ActualOfferedPPS      float64  `json:"actual_offered_pps"`
	Window                uint64   `json:"window"`
	WindowStalls          uint64   `json:"window_stalls"`
	DurationS             float64  `json:"duration_s"`
	SentWindow            uint64   `json:"sent_window"`
	ReceivedWindow        uint64   `json:"received_window"`
	SentTotal             uint64   `json:"sent_total"`
	ReceivedTotal         uint64   `json:"received_total"`
	Drops                 uint64   `json:"drops"`
	Loss                  float64  `json:"loss"`
	DeliveredGbps         float64  `json:"delivered_gbps"`
	DeliveredPPS          float64  `json:"delivered_pps"`
	LatencyP50us          float64  `json:"latency_p50_us"`
	LatencyP99us          float64  `json:"latency_p99_us"`
	LatencyP999us         float64  `json:"latency_p999_us"`
	LatencyMaxus          float64  `json:"latency_max_us"`
	ServerCPUs            *float64 `json:"server_cpu_s"`
	ServerCPUUtil         *float64 `json:"server_cpu_util"`
	ServerPeakRSS         *uint64  `json:"server_peak_rss_bytes"`
	GbpsPerCore           *float64 `json:"gbps_per_core"`
	LoadgenCPUUtil        *float64 `json:"loadgen_cpu_util"`
	LoadgenCPUs           *float64 `json:"loadgen_cpu_s"`
	ServerCPUusPerPacket  *float64 `json:"server_cpu_us_per_packet"`
	LoadgenCPUusPerPacket *float64 `json:"loadgen_cpu_us_per_packet"`
	Errors                uint64   `json:"errors"`
}

func main() {
	var c config
	flag.StringVar(&c.url, "url", "", "DERP URL: http://host:port/derp or https://host:port/derp")
	flag.IntVar(&c.pairs, "pairs", 10, "sender/receiver pairs")
	flag.IntVar(&c.size, "size", 1400, "packet (payload) size in bytes, ≥ 16")
	flag.Float64Var(&c.rate, "rate", 0, "total offered packets/s over all pairs; 0 = as fast as possible")
	flag.Float64Var(&c.duration, "duration", 5, "measurement window, seconds")
	flag.Float64Var(&c.warmup, "warmup", 1, "warm-up before the window, seconds")
	flag.Uint64Var(&c.window, "window", 32, "closed loop: most packets of a pair in flight; 0 = open loop")
	flag.IntVar(&c.serverPID, "server-pid", 0, "server process id: its CPU seconds in the window and peak RSS")
	flag.StringVar(&c.label, "label", "", "free-form label copied into the JSON")
	flag.StringVar(&c.caFile, "ca", "", "PEM file of certificates to trust for https:// (a self-signed leaf or a CA)")
	flag.BoolVar(&c.ws, "ws", false, "DERP over WebSocket (needs the build tag ts_debug_websockets)")
	flag.Parse()
	r, err := run(context.Background(), c)
	if err != nil {
		fmt.Fprintf(os.Stderr, "derpload: %v\n", err)
		os.Exit(1)
	}
	out, err := json.Marshal(r)
	if err != nil {
		fmt.Fprintf(os.Stderr, "derpload: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(string(out))
	fmt.Fprintf(os.Stderr, "derpload %s P=%d S=%d offered=%.0fpps: %.3f Gbit/s %.0f pps loss %.2f%% p50 %.0fµs p99 %.0fµs stalls %d client cpu %s µs/pkt server cpu %s µs/pkt\n",
		r.Transport, r.Pairs, r.Size, r.OfferedPPS, r.DeliveredGbps, r.DeliveredPPS, r.Loss*100,
		r.LatencyP50us, r.LatencyP99us, r.WindowStalls, fmtOpt(r.LoadgenCPUusPerPacket), fmtOpt(r.ServerCPUusPerPacket))
}

func fmtOpt(v *float64) string {
	if v == nil {
		return "-"
	}
	return strconv.FormatFloat(*v, 'f', 2, 64)
}

// pair is one sender→receiver flow's shared bookkeeping.
type pair struct {
	tx, rx    *derphttp.Client
	received  atomic.Uint64
	sentFinal atomic.Uint64 // packets sent, published when the sender stops (MaxUint64 before)
	room      chan struct{} // receiver → closed-loop sender: something arrived
}

type counters struct {
	sentTotal, sentWindow, recvTotal, recvWindow, stalls, errors atomic.Uint64
}

func newClient(c config, tlsConf *tls.Config) (*derphttp.Client, error) {
	dc, err := derphttp.NewClient(key.NewNode(), c.url, func(string, ...any) {}, netmon.NewStatic())
	if err != nil {
		return nil, err
	}
	dc.TLSConfig = tlsConf
	return dc, nil
}

func run(ctx context.Context, c config) (*report, error) {
	if c.size < payloadHeader {
		return nil, fmt.Errorf("-size must be at least %d", payloadHeader)
	}
	if c.pairs < 1 {
		return nil, errors.New("-pairs must be at least 1")
	}
	if c.url == "" {
		return nil, errors.New("-url is required")
	}
	transport := "derp"
	var tlsConf *tls.Config
	if strings.HasPrefix(c.url, "https://") {
		transport = "tls"
		if c.caFile != "" {
			pem, err := os.ReadFile(c.caFile)
			if err != nil {
				return nil, err
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("no certificate in %s", c.caFile)
			}
			tlsConf = &tls.Config{RootCAs: pool}
		}
	}
	if c.ws {
		if !wsCompiled {
			return nil, errors.New("-ws needs a build with -tags ts_debug_websockets (derphttp's WebSocket dialer)")
		}
		os.Setenv("TS_DEBUG_DERP_WS_CLIENT", "1")
		// derphttp's WebSocket dialer (coder/websocket) uses the default HTTP client, i.e.
		// http.DefaultTransport, not the client's TLSConfig: trust -ca there too.
		if tr, ok := http.DefaultTransport.(*http.Transport); ok && tlsConf != nil {
			tr.TLSClientConfig = tlsConf.Clone()
		}
		transport = map[string]string{"derp": "ws", "tls": "wss"}[transport]
	}

	// Connect every pair, receivers first so nothing is sent to an unknown key.
	pairs := make([]*pair, c.pairs)
	var wg sync.WaitGroup
	errc := make(chan error, c.pairs)
	sem := make(chan struct{}, 32)
	for i := range pairs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			p := &pair{room: make(chan struct{}, 1)}
			p.sentFinal.Store(^uint64(0))
			var err error
			if p.rx, err = newClient(c, tlsConf); err == nil {
				err = p.rx.Connect(ctx)
			}
			if err == nil {
				if p.tx, err = newClient(c, tlsConf); err == nil {
					err = p.tx.Connect(ctx)
				}
			}
			if err != nil {
				errc <- fmt.Errorf("connecting pair %d: %w", i, err)
				return
			}
			pairs[i] = p
		}(i)
	}
	wg.Wait()
	close(errc)
	defer func() {
		for _, p := range pairs {
			if p != nil {
				p.tx.Close()
				p.rx.Close()
			}
		}
	}()
	if err := <-errc; err != nil {
		return nil, err
	}
	// Servers register a client just after ServerInfo; give them a moment (as loadgen does).
	time.Sleep(300 * time.Millisecond)

	start := time.Now()
	winStart := time.Duration(c.warmup * float64(time.Second))
	winEnd := winStart + time.Duration(c.duration*float64(time.Second))
	end := winEnd + 2*time.Second
	perSender := c.rate / float64(c.pairs)
	var cnt counters
	hists := make([]hist, c.pairs)

	var senders, receivers sync.WaitGroup
	for i, p := range pairs {
		senders.Add(1)
		go func() {
			defer senders.Done()
			send(c, p, start, winStart, winEnd, perSender, &cnt)
		}()
		receivers.Add(1)
		go func() {
			defer receivers.Done()
			receive(p, start, winStart, winEnd, end, &hists[i], &cnt)
		}()
	}

	time.Sleep(time.Until(start.Add(winStart)))
	srv0, srvOK0 := serverCPU(c.serverPID)
	own0 := ownCPU()
	time.Sleep(time.Until(start.Add(winEnd)))
	srv1, srvOK1 := serverCPU(c.serverPID)
	own1 := ownCPU()
	senders.Wait()
	receivers.Wait()

	var h hist
	for i := range hists {
		h.merge(&hists[i])
	}
	secs := c.duration
	sent, recv := cnt.sentTotal.Load(), cnt.recvTotal.Load()
	recvWin := cnt.recvWindow.Load()
	r := &report{
		Mode:             "relay",
		Label:            c.label,
		Transport:        transport,
		Generator:        "derphttp",
		Flush:            "per-packet",
		Pairs:            c.pairs,
		Size:             c.size,
		OfferedPPS:       c.rate,
		OfferedGbps:      c.rate * float64(c.size) * 8 / 1e9,
		ActualOfferedPPS: float64(cnt.sentWindow.Load()) / secs,
		Window:           c.window,
		WindowStalls:     cnt.stalls.Load(),
		DurationS:        secs,
		SentWindow:       cnt.sentWindow.Load(),
		ReceivedWindow:   recvWin,
		SentTotal:        sent,
		ReceivedTotal:    recv,
		DeliveredGbps:    float64(recvWin) * float64(c.size) * 8 / secs / 1e9,
		DeliveredPPS:     float64(recvWin) / secs,
		LatencyP50us:     float64(h.quantile(0.5)) / 1e3,
		LatencyP99us:     float64(h.quantile(0.99)) / 1e3,
		LatencyP999us:    float64(h.quantile(0.999)) / 1e3,
		LatencyMaxus:     float64(h.max) / 1e3,
		Errors:           cnt.errors.Load(),
	}
	if sent > recv {
		r.Drops = sent - recv
		r.Loss = float64(r.Drops) / float64(sent)
	}
	own := own1 - own0
	ownUtil := own / secs
	r.LoadgenCPUs, r.LoadgenCPUUtil = &own, &ownUtil
	if recvWin > 0 {
		per := own / float64(recvWin) * 1e6
		r.LoadgenCPUusPerPacket = &per
	}
	if srvOK0 && srvOK1 {
		s := srv1 - srv0
		util := s / secs
		r.ServerCPUs, r.ServerCPUUtil = &s, &util
		if util > 0 {
			g := r.DeliveredGbps / util
			r.GbpsPerCore = &g
		}
		if recvWin > 0 {
			per := s / float64(recvWin) * 1e6
			r.ServerCPUusPerPacket = &per
		}
		if rss, ok := peakRSS(c.serverPID); ok {
			r.ServerPeakRSS = &rss
		}
	}
	return r, nil
}

// send writes one packet per derphttp Send (one frame, one flush) until the window ends.
func send(c config, p *pair, start time.Time, winStart, winEnd time.Duration, perSender float64, cnt *counters) {
	dst := p.rx.SelfPublicKey()
	payload := make([]byte, c.size)
	var seq, writtenOff uint64
	defer func() { p.sentFinal.Store(seq) }()
	for {
		now := time.Since(start)
		if now >= winEnd {
			return
		}
		if c.window > 0 {
			if int64(seq-writtenOff)-int64(p.received.Load()) >= int64(c.window) {
				select {
				case <-p.room:
				case <-time.After(stallWait):
					// Lost in the relay: stop waiting for them.
					writtenOff = seq - p.received.Load()
					cnt.stalls.Add(1)
				}
				continue
			}
		}
		stamp := now
		if c.window == 0 && perSender > 0 {
			next := time.Duration(float64(seq) / perSender * float64(time.Second))
			if next > now {
				time.Sleep(next - now)
				continue
			}
			// Open loop: latency counts from the scheduled send time, so a sender that fell
			// behind (a slow relay pushing back) shows up in the latency (no coordinated omission).
			stamp = next
		}
		binary.LittleEndian.PutUint64(payload[0:8], seq)
		binary.LittleEndian.PutUint64(payload[8:16], uint64(stamp.Nanoseconds()))
		if err := p.tx.Send(dst, payload); err != nil {
			cnt.errors.Add(1)
			return
		}
		seq++
		cnt.sentTotal.Add(1)
		if now >= winStart {
			cnt.sentWindow.Add(1)
		}
	}
}

// receive reads what arrives until everything sent has arrived after the window, or until end.
func receive(p *pair, start time.Time, winStart, winEnd, end time.Duration, h *hist, cnt *counters) {
	var total, inWindow uint64
	defer func() {
		cnt.recvTotal.Add(total)
		cnt.recvWindow.Add(inWindow)
	}()
	// Recv blocks: a watchdog closes the client at the end (or once drained), which ends it.
	done := make(chan struct{})
	defer close(done)
	go func() {
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				now := time.Since(start)
				drained := now >= winEnd && p.received.Load() >= p.sentFinal.Load()
				if drained || now >= end {
					p.rx.Close()
					return
				}
			}
		}
	}()
	winStartNs := uint64(winStart.Nanoseconds())
	for {
		m, err := p.rx.Recv()
		if err != nil {
			return
		}
		pkt, ok := m.(derp.ReceivedPacket)
		if !ok {
			continue
		}
		total++
		now := time.Since(start)
		if len(pkt.Data) >= payloadHeader && now >= winStart && now < winEnd {
			inWindow++
			sent := binary.LittleEndian.Uint64(pkt.Data[8:16])
			if sent >= winStartNs {
				h.record(uint64(now.Nanoseconds()) - min(sent, uint64(now.Nanoseconds())))
			}
		}
		p.received.Add(1)
		select {
		case p.room <- struct{}{}:
		default:
		}
	}
}

// ownCPU is this process's user+system CPU seconds so far.
func ownCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

// serverCPU is a process's utime+stime from /proc/PID/stat, in seconds (USER_HZ = 100).
func serverCPU(pid int) (float64, bool) {
	if pid <= 0 {
		return 0, false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(s[i+1:])
	// After the command: state is field 3, utime 14, stime 15 (1-based over the whole line).
	if len(f) < 13 {
		return 0, false
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return float64(u+st) / 100, true
}

// peakRSS is a process's VmHWM in bytes.
func peakRSS(pid int) (uint64, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) >= 1 {
				kb, err := strconv.ParseUint(f[0], 10, 64)
				if err == nil {
					return kb * 1024, true
				}
			}
		}
	}
	return 0, false
}
