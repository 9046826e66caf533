// Package coderdinterop runs Coder's own server (coderd, from Coder's packages at the pinned
// release, through Coder's test server coderdtest on a real PostgreSQL), a workspace with a
// real agent from Coder's agent package, and tailnetd in front of coderd in sidecar mode
// (`tailnetd serve --upstream`). Agents and clients talk to tailnetd's address only, as users
// would; the tests check that the features coderd implements by reaching agents itself (web
// terminal, listening ports, workspace apps) and the ones tailnetd serves (client tunnels,
// agent status, metadata, logs) keep working, also across restarts of either server.
// pgcoord_test.go runs Coder's HA coordinator (pgcoord) in-process next to tailnetd's replica
// store on one database and checks that the two share one peer graph.
//
// Everything lives in _test.go files except pgtest, the PostgreSQL helper; see README.md.
package coderdinterop
