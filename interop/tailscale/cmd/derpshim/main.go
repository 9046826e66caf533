// Command derpshim runs Tailscale's own DERP server (derpserver) and STUN
// server behind the subset of tailnetd's CLI contract that the interop tests
// use (`derpshim derp --http-addr --https-addr --tls-cert --tls-key
// --stun-addr --key-file`, one JSON readiness line on stdout, SIGTERM exits
// 0). It exists only to check the tests themselves against the reference
// implementation:
//
//	go build -o /tmp/derpshim ./cmd/derpshim && TAILNETD_BIN=/tmp/derpshim go test ./...
//
// It is never shipped and never used by default.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"tailscale.com/derp/derpserver"
	"tailscale.com/net/stunserver"
	"tailscale.com/types/key"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] != "derp" {
		log.Fatal("usage: derpshim derp ...")
	}
	fs := flag.NewFlagSet("derp", flag.ExitOnError)
	httpAddr := fs.String("http-addr", "127.0.0.1:0", "")
	httpsAddr := fs.String("https-addr", "", "")
	certF := fs.String("tls-cert", "", "")
	keyF := fs.String("tls-key", "", "")
	stunAddr := fs.String("stun-addr", "", "")
	keyFile := fs.String("key-file", "", "")
	// Accepted for tailnetd's CLI contract; the shim serves no metrics.
	fs.String("metrics-addr", "", "")
	fs.Parse(os.Args[2:])
	var priv key.NodePrivate
	type cfg struct{ PrivateKey key.NodePrivate }
	if b, err := os.ReadFile(*keyFile); err == nil {
		var c cfg
		if err := json.Unmarshal(b, &c); err != nil {
			log.Fatal(err)
		}
		priv = c.PrivateKey
	} else {
		priv = key.NewNode()
		b, _ := json.Marshal(cfg{priv})
		os.WriteFile(*keyFile, b, 0600)
	}
	s := derpserver.New(priv, log.Printf)
	mux := http.NewServeMux()
	mux.Handle("/derp", derpserver.AddWebSocketSupport(s, derpserver.Handler(s)))
	mux.HandleFunc("/derp/probe", derpserver.ProbeHandler)
	mux.HandleFunc("/derp/latency-check", derpserver.ProbeHandler)
	mux.HandleFunc("/generate_204", derpserver.ServeNoContent)
	hl, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		log.Fatal(err)
	}
	go (&http.Server{Handler: mux}).Serve(hl)
	out := map[string]any{"http_addr": hl.Addr().String(), "https_addr": nil, "stun_addr": nil, "derp_public_key": priv.Public().String()}
	if *httpsAddr != "" {
		cert, err := tls.LoadX509KeyPair(*certF, *keyF)
		if err != nil {
			log.Fatal(err)
		}
		tc := &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil }, NextProtos: []string{"http/1.1"}}
		s.ModifyTLSConfigToAddMetaCert(tc)
		tl, err := net.Listen("tcp", *httpsAddr)
		if err != nil {
			log.Fatal(err)
		}
		srv := &http.Server{Handler: mux, TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){}}
		go srv.Serve(tls.NewListener(tl, tc))
		out["https_addr"] = tl.Addr().String()
	}
	if *stunAddr != "" {
		ss := stunserver.New(context.Background())
		if err := ss.Listen(*stunAddr); err != nil {
			log.Fatal(err)
		}
		go ss.Serve()
		out["stun_addr"] = strings.Replace(ss.LocalAddr().String(), "[::]", "127.0.0.1", 1)
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	<-ch
	s.Close()
	os.Exit(0)
}
