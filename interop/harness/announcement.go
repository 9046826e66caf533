package harness

import (
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Announcement is the one JSON line tailnetd prints on stdout once every listener is bound (the
// binary's contract with operators and harnesses). A field the process does not have (no HTTPS
// listener, no relay, not `dev`) is null or absent, and empty here.
type Announcement struct {
	Role          string `json:"role"`
	HTTPAddr      string `json:"http_addr"`
	HTTPSAddr     string `json:"https_addr"`
	STUNAddr      string `json:"stun_addr"`
	DERPPublicKey string `json:"derp_public_key"`
	BaseURL       string `json:"base_url"`
	DERPURL       string `json:"derp_url"`
	AgentID       string `json:"agent_id"`
	AgentToken    string `json:"agent_token"`
	ClientToken   string `json:"client_token"`
	MetricsAddr   string `json:"metrics_addr"`
}

// ParseAnnouncement decodes an announcement line. The line must be one JSON object with a bound
// http_addr (host:port, port not 0), which every tailnetd subcommand has.
func ParseAnnouncement(line string) (Announcement, error) {
	var a Announcement
	if err := json.Unmarshal([]byte(line), &a); err != nil {
		return a, fmt.Errorf("announcement line %q is not JSON: %w", line, err)
	}
	if err := a.Require("http_addr"); err != nil {
		return a, err
	}
	return a, nil
}

// Require checks that each named field (its JSON name) is present and well formed: the addresses
// (http_addr, https_addr, stun_addr) are bound host:port pairs (port not 0), derp_public_key is
// "nodekey:<hex>", and every other field is non-empty. An unknown name is an error.
func (a Announcement) Require(fields ...string) error {
	for _, name := range fields {
		value, ok := a.field(name)
		if !ok {
			return fmt.Errorf("announcement has no field %q", name)
		}
		if value == "" {
			return fmt.Errorf("announcement lacks %s: %+v", name, a)
		}
		switch name {
		case "http_addr", "https_addr", "stun_addr", "metrics_addr":
			if err := checkBoundAddr(value); err != nil {
				return fmt.Errorf("announcement: bad %s %q: %w", name, value, err)
			}
		case "derp_public_key":
			if !strings.HasPrefix(value, "nodekey:") || len(value) == len("nodekey:") {
				return fmt.Errorf("announcement: derp_public_key must be \"nodekey:<hex>\", got %q", value)
			}
		}
	}
	return nil
}

func (a Announcement) field(name string) (string, bool) {
	switch name {
	case "role":
		return a.Role, true
	case "http_addr":
		return a.HTTPAddr, true
	case "https_addr":
		return a.HTTPSAddr, true
	case "stun_addr":
		return a.STUNAddr, true
	case "derp_public_key":
		return a.DERPPublicKey, true
	case "base_url":
		return a.BaseURL, true
	case "derp_url":
		return a.DERPURL, true
	case "agent_id":
		return a.AgentID, true
	case "agent_token":
		return a.AgentToken, true
	case "client_token":
		return a.ClientToken, true
	case "metrics_addr":
		return a.MetricsAddr, true
	}
	return "", false
}

// checkBoundAddr accepts host:port with a non-empty host and a port in 1..65535.
func checkBoundAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if host == "" {
		return fmt.Errorf("no host")
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not a bound port", port)
	}
	return nil
}
