// Package k8s checks the Helm chart in deploy/helm/tailnetd the way a cluster would see it.
//
// The tests render the chart in-process with Helm's own packages (helm.sh/helm/v4: the chart
// loader, values coalescing with the chart's defaults, the template engine and the manifest
// sorter that `helm template` uses) once per example values file in
// deploy/helm/tailnetd/examples, then:
//   - decode every rendered object in strict mode into Kubernetes' own API types (k8s.io/api
//     through sigs.k8s.io/yaml's UnmarshalStrict: an unknown or duplicated field, or a kind the
//     scheme does not know, fails);
//   - check what the deployment depends on: non-root, read-only root filesystem, no
//     capabilities, readiness on /readyz and liveness on /healthz, the STUN UDP port of a relay,
//     the PodDisruptionBudget, the PostgreSQL URL taken from a Secret, the container's arguments
//     for the role, and memory requests computed from the measured cost per connection;
//   - run the tailnetd binary on the rendered TOML file with the container's own arguments and
//     environment plus --check, so that every key the chart writes is one tailnetd accepts;
//   - run Helm's linter with each example (warnings fail, as with --strict), and check that values
//     the chart cannot honour are refused by values.schema.json or the templates.
//
// The binary comes from the shared harness (TAILNETD_BIN, or cargo builds it). No cluster and no
// helm command are needed.
package k8s
