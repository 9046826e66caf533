package harness

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"
)

// childModeEnv makes the test binary act as the child process of the Process tests (see
// runChild): the harness's own mechanics are checked here without tailnetd; the suites in
// interop/* check it against the real binary.
const childModeEnv = "HARNESS_TEST_CHILD_MODE"

func TestMain(m *testing.M) {
	if mode := os.Getenv(childModeEnv); mode != "" {
		os.Exit(runChild(mode))
	}
	os.Exit(m.Run())
}

const childAnnouncement = `{"role":"derp","http_addr":"127.0.0.1:4242","https_addr":null,"stun_addr":"127.0.0.1:4243","derp_public_key":"nodekey:00ff","base_url":"http://127.0.0.1:4242"}`

func runChild(mode string) int {
	switch mode {
	case "drain": // announce, log, exit 0 on SIGTERM
		term := make(chan os.Signal, 1)
		signal.Notify(term, syscall.SIGTERM)
		fmt.Fprintln(os.Stderr, "\x1b[32mINFO\x1b[0m listening")
		fmt.Println(childAnnouncement)
		fmt.Println("late stdout line")
		<-term
		fmt.Fprintln(os.Stderr, "INFO draining")
		return 0
	case "stubborn": // announce, then ignore SIGTERM
		signal.Ignore(syscall.SIGTERM)
		fmt.Println(childAnnouncement)
		time.Sleep(time.Minute)
		return 0
	case "die": // exit before announcing
		fmt.Fprintln(os.Stderr, "ERROR address in use")
		return 3
	case "garbage": // announce something that is not JSON
		fmt.Println("listening on 127.0.0.1:4242")
		time.Sleep(time.Minute)
		return 0
	}
	return 2
}

// childProcess is a Process running this test binary in the given child mode.
func childProcess(t *testing.T, mode string, opts Options) *Process {
	t.Setenv(childModeEnv, mode)
	opts.StartTimeout, opts.StopTimeout = 10*time.Second, 2*time.Second
	p := &Process{bin: os.Args[0], opts: opts, logs: NewRing(10)}
	t.Cleanup(func() { _ = p.Stop() })
	return p
}

func TestProcessAnnouncesLogsAndDrains(t *testing.T) {
	p := childProcess(t, "drain", Options{Require: []string{"derp_public_key", "stun_addr"}})
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	if got := p.Announcement(); got.HTTPAddr != "127.0.0.1:4242" || got.STUNAddr != "127.0.0.1:4243" || got.HTTPSAddr != "" {
		t.Fatalf("announcement %+v", got)
	}
	if p.AnnouncementLine() != childAnnouncement {
		t.Fatalf("announcement line %q", p.AnnouncementLine())
	}
	if err := p.Stop(); err != nil {
		t.Fatalf("Stop after a clean drain: %v", err)
	}
	if err := p.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	log := strings.Join(p.Log().Lines(), "\n")
	for _, want := range []string{"INFO listening", "[harness] announcement: " + childAnnouncement,
		"[stdout, after the announcement] late stdout line", "INFO draining"} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
	if strings.Contains(log, "\x1b[") {
		t.Errorf("log keeps ANSI codes:\n%q", log)
	}
}

func TestProcessRequiredFieldMissing(t *testing.T) {
	p := childProcess(t, "drain", Options{Require: []string{"https_addr"}})
	err := p.start()
	if err == nil || !strings.Contains(err.Error(), "lacks https_addr") {
		t.Fatalf("start = %v, want an error naming https_addr", err)
	}
	if p.running() {
		t.Fatal("a process with a bad announcement is left running")
	}
}

func TestProcessExitsBeforeAnnouncing(t *testing.T) {
	p := childProcess(t, "die", Options{})
	err := p.start()
	if err == nil || !strings.Contains(err.Error(), "exited before announcing") || !strings.Contains(err.Error(), "address in use") {
		t.Fatalf("start = %v, want the exit and the log tail", err)
	}
}

func TestProcessAnnouncementNotJSON(t *testing.T) {
	p := childProcess(t, "garbage", Options{})
	err := p.start()
	if err == nil || !strings.Contains(err.Error(), "not JSON") {
		t.Fatalf("start = %v, want a not-JSON error", err)
	}
	if p.running() {
		t.Fatal("a process with a bad announcement is left running")
	}
}

func TestProcessKilledAfterStopTimeout(t *testing.T) {
	p := childProcess(t, "stubborn", Options{})
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	started := time.Now()
	err := p.Stop()
	var killed *stopTimeoutError
	if !errors.As(err, &killed) {
		t.Fatalf("Stop = %v, want a stop timeout", err)
	}
	if d := time.Since(started); d < p.opts.StopTimeout {
		t.Fatalf("killed after %v, before the %v stop timeout", d, p.opts.StopTimeout)
	}
}

func TestRingKeepsTheLastLines(t *testing.T) {
	r := NewRing(3)
	if got := r.Lines(); len(got) != 0 {
		t.Fatalf("empty ring has lines %q", got)
	}
	r.Add("a")
	r.Add("b")
	if got := strings.Join(r.Lines(), ","); got != "a,b" {
		t.Fatalf("Lines = %q", got)
	}
	for _, l := range []string{"c", "d", "\x1b[1;31me\x1b[0m"} {
		r.Add(l)
	}
	if got := strings.Join(r.Lines(), ","); got != "c,d,e" {
		t.Fatalf("Lines = %q, want c,d,e", got)
	}
	if r.Total() != 5 {
		t.Fatalf("Total = %d, want 5", r.Total())
	}
	lines, earlier := r.Tail(2)
	if strings.Join(lines, ",") != "d,e" || earlier != 3 {
		t.Fatalf("Tail(2) = %q, %d; want d,e and 3 earlier", lines, earlier)
	}
	if got, want := r.String(), "  ... (2 earlier lines)\n  c\n  d\n  e\n"; got != want {
		t.Fatalf("String = %q, want %q", got, want)
	}
	r.Logf("x=%d\n", 1)
	if last := r.Lines()[2]; !strings.HasSuffix(last, " x=1") || len(last) != len("15:04:05.000 x=1") {
		t.Fatalf("Logf line %q", last)
	}
}

func TestParseAnnouncement(t *testing.T) {
	dev := `{"agent_id":"5d1f","agent_token":"t1","base_url":"http://127.0.0.1:3000","client_token":"t2",` +
		`"derp_public_key":"nodekey:ab12","derp_url":"http://127.0.0.1:3000/derp","http_addr":"127.0.0.1:3000",` +
		`"https_addr":null,"role":"dev","stun_addr":"[::1]:3478"}`
	a, err := ParseAnnouncement(dev)
	if err != nil {
		t.Fatal(err)
	}
	want := Announcement{Role: "dev", HTTPAddr: "127.0.0.1:3000", STUNAddr: "[::1]:3478", DERPPublicKey: "nodekey:ab12",
		BaseURL: "http://127.0.0.1:3000", DERPURL: "http://127.0.0.1:3000/derp", AgentID: "5d1f", AgentToken: "t1", ClientToken: "t2"}
	if a != want {
		t.Fatalf("parsed %+v, want %+v", a, want)
	}
	if err := a.Require("base_url", "agent_id", "agent_token", "client_token", "derp_url", "derp_public_key", "stun_addr"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ fields, wantErr string }{
		{"https_addr", "lacks https_addr"},
		{"no_such_field", `no field "no_such_field"`},
	} {
		if err := a.Require(tc.fields); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("Require(%s) = %v, want %q", tc.fields, err, tc.wantErr)
		}
	}
	for _, tc := range []struct{ line, wantErr string }{
		{`listening`, "not JSON"},
		{`{"http_addr":"127.0.0.1:1"} trailing`, "not JSON"},
		{`null`, "lacks http_addr"},
		{`{"role":"derp"}`, "lacks http_addr"},
		{`{"http_addr":"127.0.0.1:0"}`, "bad http_addr"},
		{`{"http_addr":"127.0.0.1"}`, "bad http_addr"},
		{`{"http_addr":":80"}`, "bad http_addr"},
		{`{"http_addr":"127.0.0.1:1","derp_public_key":"ab12"}`, ""},
	} {
		_, err := ParseAnnouncement(tc.line)
		if tc.wantErr == "" {
			if err != nil {
				t.Errorf("ParseAnnouncement(%s) = %v", tc.line, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("ParseAnnouncement(%s) = %v, want %q", tc.line, err, tc.wantErr)
		}
	}
	bad := Announcement{HTTPAddr: "127.0.0.1:1", DERPPublicKey: "ab12", STUNAddr: "127.0.0.1:99999"}
	if err := bad.Require("derp_public_key"); err == nil || !strings.Contains(err.Error(), "nodekey:") {
		t.Errorf("Require(derp_public_key) on %q = %v", bad.DERPPublicKey, err)
	}
	if err := bad.Require("stun_addr"); err == nil || !strings.Contains(err.Error(), "bad stun_addr") {
		t.Errorf("Require(stun_addr) on %q = %v", bad.STUNAddr, err)
	}
}
