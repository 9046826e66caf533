// Package pgtest runs one throw-away PostgreSQL server for a test binary and hands every test a
// fresh database with Coder's schema on it.
//
// Why it exists: Coder's own test server (coderdtest) needs a real PostgreSQL, and Coder's
// helper for that (dbtestutil) either expects a server on 127.0.0.1:5432 or starts one in
// Docker. Neither is available in CI here, so the interop suites start the PostgreSQL binaries
// installed on the machine themselves: one server per test binary (Start in TestMain, Stop at
// the end), one database per test (NewDatabase), Coder's migrations applied by Coder's own
// migrations.Up. The server listens on 127.0.0.1 on a free port, with trust authentication, and
// its data lives in a temporary directory that Stop removes.
//
// PostgreSQL refuses to run as root. When the tests run as root (CI does), the server runs as
// the `postgres` system user (created by the distribution's package), and the data directory is
// handed to that user.
//
// Where the binaries come from, in order: $PG_BIN_DIR (a directory holding initdb and postgres),
// the newest /usr/lib/postgresql/<version>/bin, then initdb and postgres on $PATH.
package pgtest

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/coder/v2/coderd/database/migrations"
	_ "github.com/lib/pq" // the "postgres" database/sql driver (Coder's fork, via replace)
)

const (
	// startTimeout bounds initdb plus the server becoming ready.
	startTimeout = 60 * time.Second
	// stopTimeout bounds a fast shutdown before the server is killed.
	stopTimeout = 15 * time.Second
	superuser   = "postgres"
)

// Server is one running PostgreSQL server owned by the test binary.
type Server struct {
	baseDir string // removed by Stop
	port    int
	cmd     *exec.Cmd
	exited  chan struct{}
	logPath string

	mu      sync.Mutex
	stopped bool
	nextDB  atomic.Int64
}

// Start initialises a data directory under a new temporary directory and starts PostgreSQL on
// 127.0.0.1 on a free port. Call Stop when the test binary is done (TestMain).
func Start() (*Server, error) {
	binDir, err := findBinDir()
	if err != nil {
		return nil, err
	}
	base, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		return nil, err
	}
	// The postgres user must be able to reach the data directory inside.
	if err := os.Chmod(base, 0o755); err != nil {
		_ = os.RemoveAll(base)
		return nil, err
	}
	s := &Server{baseDir: base, logPath: filepath.Join(base, "postgres.log"), exited: make(chan struct{})}
	if err := s.start(binDir); err != nil {
		_ = os.RemoveAll(base)
		return nil, err
	}
	return s, nil
}

func findBinDir() (string, error) {
	has := func(dir string) bool {
		for _, b := range []string{"initdb", "postgres"} {
			if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
				return false
			}
		}
		return true
	}
	if dir := os.Getenv("PG_BIN_DIR"); dir != "" {
		if !has(dir) {
			return "", fmt.Errorf("PG_BIN_DIR=%s lacks initdb or postgres", dir)
		}
		return dir, nil
	}
	versions, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(versions, func(i, j int) bool { return pgVersion(versions[i]) > pgVersion(versions[j]) })
	for _, dir := range versions {
		if has(dir) {
			return dir, nil
		}
	}
	initdb, err1 := exec.LookPath("initdb")
	_, err2 := exec.LookPath("postgres")
	if err1 == nil && err2 == nil {
		return filepath.Dir(initdb), nil
	}
	return "", errors.New("PostgreSQL not found: set PG_BIN_DIR, or install it (Debian/Ubuntu: apt-get install -y postgresql)")
}

// pgVersion reads the major version out of /usr/lib/postgresql/<version>/bin.
func pgVersion(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// asPostgresUser makes cmd run as the postgres system user when this process is root.
func asPostgresUser(cmd *exec.Cmd) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if os.Geteuid() != 0 {
		return nil
	}
	u, err := user.Lookup(superuser)
	if err != nil {
		return fmt.Errorf("running as root, and PostgreSQL refuses to: need the %q system user: %w", superuser, err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	cmd.Env = append(os.Environ(), "HOME="+u.HomeDir, "USER="+u.Username, "LOGNAME="+u.Username)
	return nil
}

func chownToPostgres(path string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	u, err := user.Lookup(superuser)
	if err != nil {
		return err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return os.Chown(path, uid, gid)
}

func (s *Server) start(binDir string) error {
	dataDir := filepath.Join(s.baseDir, "data")
	sockDir := filepath.Join(s.baseDir, "sock")
	for _, d := range []string{dataDir, sockDir} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return err
		}
		if err := chownToPostgres(d); err != nil {
			return err
		}
	}
	logFile, err := os.Create(s.logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	if err := chownToPostgres(s.logPath); err != nil {
		return err
	}

	initdb := exec.Command(filepath.Join(binDir, "initdb"), "-D", dataDir, "-U", superuser,
		"--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
	if err := asPostgresUser(initdb); err != nil {
		return err
	}
	if out, err := initdb.CombinedOutput(); err != nil {
		return fmt.Errorf("initdb: %w\n%s", err, out)
	}

	port, err := freePort()
	if err != nil {
		return err
	}
	s.port = port
	// Settings for a disposable test server: no durability, room for many test connections.
	server := exec.Command(filepath.Join(binDir, "postgres"), "-D", dataDir,
		"-c", "listen_addresses=127.0.0.1",
		"-c", "port="+strconv.Itoa(port),
		"-c", "unix_socket_directories="+sockDir,
		"-c", "max_connections=500",
		"-c", "fsync=off",
		"-c", "synchronous_commit=off",
		"-c", "full_page_writes=off",
		// For BenchmarkPGCoordStatements (statement counts); part of the distribution's package.
		"-c", "shared_preload_libraries=pg_stat_statements",
	)
	if err := asPostgresUser(server); err != nil {
		return err
	}
	server.Stdout = logFile
	server.Stderr = logFile
	if err := server.Start(); err != nil {
		return fmt.Errorf("starting postgres: %w", err)
	}
	s.cmd = server
	go func() {
		_ = server.Wait()
		close(s.exited)
	}()

	deadline := time.Now().Add(startTimeout)
	for {
		db, err := sql.Open("postgres", s.url("postgres"))
		if err == nil {
			err = db.Ping()
			_ = db.Close()
		}
		if err == nil {
			return nil
		}
		select {
		case <-s.exited:
			return fmt.Errorf("postgres exited during start-up; log:\n%s", s.logTail())
		default:
		}
		if time.Now().After(deadline) {
			s.kill()
			return fmt.Errorf("postgres not ready within %v (%v); log:\n%s", startTimeout, err, s.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (s *Server) url(dbName string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User(superuser),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)),
		Path:     "/" + dbName,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

func (s *Server) logTail() string {
	b, _ := os.ReadFile(s.logPath)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}

func (s *Server) kill() {
	_ = s.cmd.Process.Kill()
	<-s.exited
}

// Stop shuts the server down (fast shutdown, then kill) and removes its data.
func (s *Server) Stop() error {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return nil
	}
	s.stopped = true
	s.mu.Unlock()
	_ = s.cmd.Process.Signal(syscall.SIGINT) // "fast shutdown"
	var err error
	select {
	case <-s.exited:
	case <-time.After(stopTimeout):
		err = fmt.Errorf("postgres did not stop within %v of SIGINT; killed", stopTimeout)
		s.kill()
	}
	if rmErr := os.RemoveAll(s.baseDir); rmErr != nil && err == nil {
		err = rmErr
	}
	return err
}

// NewDatabase creates an empty database, applies Coder's migrations to it and returns its
// connection URL. The database is dropped when the test ends.
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("coder_%d_%d", os.Getpid(), s.nextDB.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	admin, err := sql.Open("postgres", s.url("postgres"))
	if err != nil {
		t.Fatalf("pgtest: open admin connection: %v", err)
	}
	defer admin.Close()
	if _, err := admin.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("pgtest: create database %s: %v", name, err)
	}
	connURL := s.url(name)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		admin, err := sql.Open("postgres", s.url("postgres"))
		if err != nil {
			t.Logf("pgtest: drop %s: %v", name, err)
			return
		}
		defer admin.Close()
		// WITH (FORCE) ends connections a closed coderd may still hold (PostgreSQL 13+).
		if _, err := admin.ExecContext(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Logf("pgtest: drop %s: %v", name, err)
		}
	})
	db, err := sql.Open("postgres", connURL)
	if err != nil {
		t.Fatalf("pgtest: open %s: %v", name, err)
	}
	defer db.Close()
	if err := migrations.Up(db); err != nil {
		t.Fatalf("pgtest: Coder's migrations on %s: %v", name, err)
	}
	return connURL
}
