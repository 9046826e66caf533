package coder

import (
	_ "github.com/coder/coder/v2/codersdk"
	_ "github.com/coder/coder/v2/codersdk/agentsdk"
	_ "github.com/coder/coder/v2/codersdk/workspacesdk"
	_ "github.com/coder/coder/v2/coderd/jwtutils"
	_ "github.com/coder/coder/v2/tailnet"
	_ "github.com/coder/coder/v2/tailnet/proto"
	_ "github.com/coder/coder/v2/tailnet/test"
)
