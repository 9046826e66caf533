//go:build !ts_debug_websockets

package main

// wsCompiled: derphttp's WebSocket dialer is compiled in only with Tailscale's build tag
// ts_debug_websockets; without it -ws is refused rather than silently ignored.
const wsCompiled = false
