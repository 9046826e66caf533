//go:build ts_debug_websockets

package main

// wsCompiled: derphttp's WebSocket dialer is compiled in (Tailscale's build tag).
const wsCompiled = true
