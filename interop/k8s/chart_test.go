package k8s

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/labels"

	"tailnetd.test/interop/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

// The settings file inside the pod (the chart's tailnetd.configPath).
const configPath = "/etc/tailnetd/tailnetd.toml"

// Stands in for the PostgreSQL URL that the pods read from their Secret.
const placeholderPostgresURL = "postgres://tailnetd:hunter2@db.tailnetd.svc:5432/tailnet"

// How `tailnetd --check` shows it: the password never appears.
const shownPostgresURL = "postgres://tailnetd:(secret)@db.tailnetd.svc:5432/tailnet"

// example is one values file of deploy/helm/tailnetd/examples and what it must produce.
type example struct {
	file, release, role, kind string
}

var examples = []example{
	{file: "sidecar", release: "tailnetd", role: "serve", kind: "Deployment"},
	{file: "relay", release: "relay-fra", role: "derp", kind: "DaemonSet"},
	{file: "replicas", release: "coord", role: "coordinator", kind: "Deployment"},
}

// TestExamples renders each example values file, decodes every object strictly into Kubernetes'
// types, checks the properties the deployment relies on, and runs tailnetd --check on the
// rendered settings with the container's own arguments and environment.
func TestExamples(t *testing.T) {
	c := loadChart(t)
	for _, ex := range examples {
		t.Run(ex.file, func(t *testing.T) {
			r, err := render(c, ex.release, exampleValues(t, ex.file))
			if err != nil {
				t.Fatal(err)
			}
			pod := checkCommon(t, r, ex)
			settings := checkSettings(t, r, pod, ex)
			switch ex.file {
			case "sidecar":
				checkSidecar(t, r, pod, settings)
			case "relay":
				checkRelay(t, r, pod, settings)
			case "replicas":
				checkReplicas(t, r, pod, settings)
			}
		})
	}
}

// checkCommon checks what every release must have and returns the pod template.
func checkCommon(t *testing.T, r *rendered, ex example) corev1.PodTemplateSpec {
	t.Helper()
	var pod corev1.PodTemplateSpec
	var selector map[string]string
	switch ex.kind {
	case "Deployment":
		d := only[*appsv1.Deployment](t, r)
		if n := len(all[*appsv1.DaemonSet](r)); n != 0 {
			t.Fatalf("a Deployment release also renders %d DaemonSets", n)
		}
		pod, selector = d.Spec.Template, d.Spec.Selector.MatchLabels
	case "DaemonSet":
		d := only[*appsv1.DaemonSet](t, r)
		if n := len(all[*appsv1.Deployment](r)); n != 0 {
			t.Fatalf("a DaemonSet release also renders %d Deployments", n)
		}
		pod, selector = d.Spec.Template, d.Spec.Selector.MatchLabels
	}
	if len(selector) == 0 || !labels.SelectorFromSet(selector).Matches(labels.Set(pod.Labels)) {
		t.Fatalf("the selector %v does not select the pod labels %v", selector, pod.Labels)
	}

	spec := pod.Spec
	if psc := spec.SecurityContext; psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot ||
		psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Errorf("pod securityContext must run as a non-root user: %+v", psc)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Error("the service account token is mounted; tailnetd never uses the API")
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("want one container, got %d", len(spec.Containers))
	}
	ctr := spec.Containers[0]
	sc := ctr.SecurityContext
	switch {
	case sc == nil:
		t.Fatal("the container has no securityContext")
	case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot:
		t.Error("container: runAsNonRoot is not true")
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Error("container: readOnlyRootFilesystem is not true")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Error("container: allowPrivilegeEscalation is not false")
	case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0:
		t.Errorf("container: capabilities must drop ALL and add none: %+v", sc.Capabilities)
	case sc.Privileged != nil && *sc.Privileged:
		t.Error("container: privileged")
	}

	// The role and the settings file.
	want := []string{ex.role, "--config", configPath}
	if !slices.Equal(ctr.Args, want) {
		t.Errorf("container args %q, want %q", ctr.Args, want)
	}
	if len(ctr.Command) != 0 {
		t.Errorf("container command %q replaces the image's tailnetd entrypoint", ctr.Command)
	}

	// Probes on the plain HTTP listener the chart configures.
	httpPort := containerPort(t, ctr, "http")
	if httpPort.Protocol != corev1.ProtocolTCP {
		t.Errorf("http port protocol %s", httpPort.Protocol)
	}
	checkProbe(t, "readiness", ctr.ReadinessProbe, "/readyz")
	checkProbe(t, "liveness", ctr.LivenessProbe, "/healthz")

	// Memory from the measured cost per connection.
	checkResources(t, r, ctr, ex.role)

	// A PodDisruptionBudget over the same pods.
	pdb := only[*policyv1.PodDisruptionBudget](t, r)
	if pdb.Spec.Selector == nil || !labels.SelectorFromSet(pdb.Spec.Selector.MatchLabels).Matches(labels.Set(pod.Labels)) {
		t.Errorf("the PodDisruptionBudget does not select the pods: %+v", pdb.Spec.Selector)
	}
	if pdb.Spec.MaxUnavailable == nil && pdb.Spec.MinAvailable == nil {
		t.Error("the PodDisruptionBudget bounds nothing")
	}

	// Every Service selects the pods and targets ports the container has.
	for _, svc := range all[*corev1.Service](r) {
		if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(pod.Labels)) {
			t.Errorf("Service %s does not select the pods", svc.Name)
		}
		for _, p := range svc.Spec.Ports {
			cp := containerPort(t, ctr, p.TargetPort.String())
			if cp.Protocol != p.Protocol {
				t.Errorf("Service %s port %s is %s, the container's is %s", svc.Name, p.Name, p.Protocol, cp.Protocol)
			}
			if p.Name == "metrics" {
				t.Errorf("Service %s publishes /metrics", svc.Name)
			}
		}
	}

	// Every volume the container mounts exists, and the settings file comes from the chart's
	// Secret.
	for _, m := range ctr.VolumeMounts {
		if !slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == m.Name }) {
			t.Errorf("volume mount %s has no volume", m.Name)
		}
	}
	cfgMount := mountAt(t, ctr, configPath)
	cfgVolume := volume(t, spec, cfgMount.Name)
	if cfgVolume.Secret == nil || cfgVolume.Secret.SecretName != configSecret(t, r).Name || cfgMount.SubPath != "tailnetd.toml" {
		t.Errorf("the settings file is not the chart's Secret: %+v %+v", cfgVolume, cfgMount)
	}
	if _, ok := pod.Annotations["checksum/config"]; !ok {
		t.Error("no checksum/config annotation: a changed configuration would not roll the pods")
	}
	return pod
}

func checkProbe(t *testing.T, what string, p *corev1.Probe, path string) {
	t.Helper()
	switch {
	case p == nil:
		t.Errorf("no %s probe", what)
	case p.HTTPGet == nil:
		t.Errorf("%s probe is not an HTTP GET", what)
	case p.HTTPGet.Path != path || p.HTTPGet.Port.String() != "http":
		t.Errorf("%s probe GETs %s on port %s, want %s on http", what, p.HTTPGet.Path, p.HTTPGet.Port.String(), path)
	}
}

func containerPort(t *testing.T, c corev1.Container, name string) corev1.ContainerPort {
	t.Helper()
	for _, p := range c.Ports {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("the container has no port named %q: %+v", name, c.Ports)
	return corev1.ContainerPort{}
}

func mountAt(t *testing.T, c corev1.Container, path string) corev1.VolumeMount {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.MountPath == path {
			return m
		}
	}
	t.Fatalf("nothing is mounted at %s: %+v", path, c.VolumeMounts)
	return corev1.VolumeMount{}
}

func volume(t *testing.T, spec corev1.PodSpec, name string) corev1.Volume {
	t.Helper()
	for _, v := range spec.Volumes {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no volume %q", name)
	return corev1.Volume{}
}

func configSecret(t *testing.T, r *rendered) *corev1.Secret {
	t.Helper()
	for _, s := range all[*corev1.Secret](r) {
		if _, ok := s.StringData["tailnetd.toml"]; ok {
			return s
		}
	}
	t.Fatal("no Secret holds tailnetd.toml")
	return nil
}

// checkResources recomputes the memory request from the values' measured figures (values.yaml,
// sizing) and compares it with what the chart rendered.
func checkResources(t *testing.T, r *rendered, c corev1.Container, role string) {
	t.Helper()
	sizing, _ := r.values["sizing"].(map[string]any)
	measured, _ := sizing["measured"].(map[string]any)
	num := func(m map[string]any, k string) int64 {
		f, ok := m[k].(float64)
		if !ok {
			t.Fatalf("sizing: %s is %T, not a number", k, m[k])
		}
		return int64(f)
	}
	bytes := num(measured, "baseBytes")
	if role == "serve" || role == "derp" {
		bytes += num(sizing, "relayConnections") * num(measured, "relayBytesPerConnection")
	}
	if role == "serve" || role == "coordinator" {
		bytes += num(sizing, "coordinatorPeers") * num(measured, "coordinatorBytesPerPeer")
	}
	bytes = bytes * (100 + num(sizing, "headroomPercent")) / 100
	mi := (bytes + 1<<20 - 1) >> 20
	want := resource.MustParse(fmt.Sprintf("%dMi", mi))
	got, ok := c.Resources.Requests[corev1.ResourceMemory]
	if !ok || got.Cmp(want) != 0 {
		t.Errorf("memory request %v, want %v from the measured figures", got.String(), want.String())
	}
	if lim, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok || lim.Cmp(got) < 0 {
		t.Errorf("memory limit %v below the request %v", lim.String(), got.String())
	}
	if _, ok := c.Resources.Requests[corev1.ResourceCPU]; !ok {
		t.Error("no CPU request")
	}
	t.Logf("%s: memory request %s (limit %s)", role, got.String(), c.Resources.Limits.Memory().String())
}

// settings is tailnetd's effective configuration as --check printed it: TOML key -> (value,
// origin).
type settings map[string]struct{ value, origin string }

// checkSettings parses the rendered TOML, runs tailnetd with the container's arguments and
// environment plus --check, and checks that every key of the file was taken from the file.
func checkSettings(t *testing.T, r *rendered, pod corev1.PodTemplateSpec, ex example) settings {
	t.Helper()
	text := configSecret(t, r).StringData["tailnetd.toml"]
	var file map[string]any
	if _, err := toml.Decode(text, &file); err != nil {
		t.Fatalf("the rendered settings are not TOML: %v\n%s", err, text)
	}
	out, err := runCheck(t, pod.Spec.Containers[0], text)
	if err != nil {
		t.Fatalf("%v\nrendered settings:\n%s", err, text)
	}
	got := parseCheck(out)
	if !strings.HasPrefix(out, "# tailnetd "+ex.role+":") {
		t.Errorf("--check ran another role:\n%s", out)
	}
	for _, key := range flatKeys(file) {
		s, ok := got[key]
		if !ok {
			t.Errorf("%s: in the rendered file, not in --check's output", key)
			continue
		}
		if s.origin != "file" {
			t.Errorf("%s: --check says it came from %q, not the file", key, s.origin)
		}
	}
	return got
}

// flatKeys lists the file's setting keys: top-level keys and section.key.
func flatKeys(file map[string]any) []string {
	var keys []string
	for k, v := range file {
		if sec, ok := v.(map[string]any); ok {
			for k2 := range sec {
				keys = append(keys, k+"."+k2)
			}
			continue
		}
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// runCheck runs `tailnetd <container args> --check` with the settings file in place of the
// mounted one and the container's environment (Secret references get stand-in values).
func runCheck(t *testing.T, c corev1.Container, text string) (string, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tailnetd.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	args := slices.Clone(c.Args)
	for i, a := range args {
		if a == configPath {
			args[i] = path
		}
	}
	args = append(args, "--check")
	cmd := exec.Command(harness.Binary(t), args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil && e.Name == "TAILNETD_POSTGRES_URL":
			cmd.Env = append(cmd.Env, e.Name+"="+placeholderPostgresURL)
		case e.ValueFrom != nil:
			t.Fatalf("env %s comes from %+v, which this test cannot stand in for", e.Name, e.ValueFrom)
		default:
			cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
		}
	}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("tailnetd %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

// parseCheck reads --check's output: `key = value  # origin` and `# key unset  # origin` lines
// under `[section]` headers.
func parseCheck(out string) settings {
	got := settings{}
	section := ""
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			continue
		case line == "" || strings.HasPrefix(line, "# tailnetd "):
			continue
		}
		i := strings.LastIndex(line, "  # ")
		if i < 0 {
			continue
		}
		body, origin := line[:i], line[i+4:]
		var key, value string
		if rest, ok := strings.CutPrefix(body, "# "); ok && strings.HasSuffix(rest, " unset") {
			key = strings.TrimSuffix(rest, " unset")
		} else if k, v, ok := strings.Cut(body, " = "); ok {
			key, value = k, v
		} else {
			continue
		}
		if section != "" {
			key = section + "." + key
		}
		got[key] = struct{ value, origin string }{value, origin}
	}
	return got
}

func (s settings) want(t *testing.T, key, value, origin string) {
	t.Helper()
	got, ok := s[key]
	switch {
	case !ok:
		t.Errorf("--check does not show %s", key)
	case got.value != value || got.origin != origin:
		t.Errorf("%s = %s (%s), want %s (%s)", key, got.value, got.origin, value, origin)
	}
}

func checkSidecar(t *testing.T, r *rendered, pod corev1.PodTemplateSpec, s settings) {
	t.Helper()
	s.want(t, "upstream.url", `"http://coder.coder.svc.cluster.local"`, "file")
	s.want(t, "public_url", `"https://coder.example.com"`, "file")
	s.want(t, "http_addr", `"0.0.0.0:8080"`, "file")
	s.want(t, "metrics_addr", `"0.0.0.0:2113"`, "file")
	s.want(t, "stun_addr", `""`, "file")
	s.want(t, "key_file", `"/var/lib/tailnetd/derp.key"`, "file")
	s.want(t, "relay.max_connections_per_ip", "0", "file")
	ctr := pod.Spec.Containers[0]
	for _, p := range ctr.Ports {
		if p.Protocol == corev1.ProtocolUDP {
			t.Errorf("STUN is off, yet the container has UDP port %s", p.Name)
		}
	}
	// The key file's directory is writable (the root filesystem is not).
	m := mountAt(t, ctr, "/var/lib/tailnetd")
	if v := volume(t, pod.Spec, m.Name); v.EmptyDir == nil || m.ReadOnly {
		t.Errorf("the relay key directory is not a writable emptyDir: %+v", v)
	}
	// The Ingress takes the public host and sends everything to tailnetd's Service.
	ing := only[*networkingv1.Ingress](t, r)
	svc := only[*corev1.Service](t, r)
	if len(ing.Spec.Rules) == 0 || ing.Spec.Rules[0].Host != "coder.example.com" {
		t.Fatalf("Ingress rules %+v", ing.Spec.Rules)
	}
	for _, rule := range ing.Spec.Rules {
		for _, p := range rule.HTTP.Paths {
			b := p.Backend.Service
			if b == nil || b.Name != svc.Name || b.Port.Number != svc.Spec.Ports[0].Port || p.Path != "/" {
				t.Errorf("Ingress %s%s goes to %+v, not to Service %s", rule.Host, p.Path, b, svc.Name)
			}
		}
	}
	if svc.Spec.Type != corev1.ServiceTypeClusterIP {
		t.Errorf("sidecar Service type %s", svc.Spec.Type)
	}
}

func checkRelay(t *testing.T, r *rendered, pod corev1.PodTemplateSpec, s settings) {
	t.Helper()
	ctr := pod.Spec.Containers[0]
	stun := containerPort(t, ctr, "stun")
	if stun.Protocol != corev1.ProtocolUDP || stun.ContainerPort != 3478 || stun.HostPort != 3478 {
		t.Errorf("STUN port %+v, want UDP 3478 on the node's 3478", stun)
	}
	https := containerPort(t, ctr, "https")
	if https.Protocol != corev1.ProtocolTCP || https.HostPort != 443 || https.ContainerPort < 1024 {
		t.Errorf("HTTPS port %+v, want TCP 443 on the node to an unprivileged container port", https)
	}
	svc := only[*corev1.Service](t, r)
	if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool {
		return p.Protocol == corev1.ProtocolUDP && p.Port == 3478 && p.TargetPort.String() == "stun"
	}) {
		t.Errorf("the Service has no UDP 3478 to the STUN port: %+v", svc.Spec.Ports)
	}
	s.want(t, "stun_addr", `"0.0.0.0:3478"`, "file")
	s.want(t, "https_addr", fmt.Sprintf(`"0.0.0.0:%d"`, https.ContainerPort), "file")
	s.want(t, "relay.queue_depth", "32", "file")
	s.want(t, "relay.verify_client_url_fail_open", "true", "file")
	// The TLS and mesh key files the settings name are where the Secrets are mounted.
	for key, volumeName := range map[string]string{"tls_cert": "tls", "tls_key": "tls", "mesh_psk_file": "mesh"} {
		path := strings.Trim(s[key].value, `"`)
		m := mountAt(t, ctr, filepath.Dir(path))
		v := volume(t, pod.Spec, m.Name)
		if m.Name != volumeName || v.Secret == nil || !m.ReadOnly {
			t.Errorf("%s = %s is not in a read-only Secret volume: %+v %+v", key, path, m, v)
		}
	}
	if pod.Spec.NodeSelector["tailnetd.dev/relay"] != "fra" {
		t.Errorf("nodeSelector %v", pod.Spec.NodeSelector)
	}
	if len(ctr.Env) != 0 {
		t.Errorf("a relay gets env %+v", ctr.Env)
	}
}

func checkReplicas(t *testing.T, r *rendered, pod corev1.PodTemplateSpec, s settings) {
	t.Helper()
	d := only[*appsv1.Deployment](t, r)
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 3 {
		t.Errorf("replicas %v, want 3", d.Spec.Replicas)
	}
	ctr := pod.Spec.Containers[0]
	i := slices.IndexFunc(ctr.Env, func(e corev1.EnvVar) bool { return e.Name == "TAILNETD_POSTGRES_URL" })
	if i < 0 {
		t.Fatal("no TAILNETD_POSTGRES_URL")
	}
	e := ctr.Env[i]
	if e.Value != "" || e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil ||
		e.ValueFrom.SecretKeyRef.Name != "tailnetd-pg" || e.ValueFrom.SecretKeyRef.Key != "url" {
		t.Errorf("TAILNETD_POSTGRES_URL is not taken from Secret tailnetd-pg/url: %+v", e)
	}
	s.want(t, "coordinator.postgres_url", `"`+shownPostgresURL+`"`, "environment")
	s.want(t, "upstream.url", `"http://coder.coder.svc.cluster.local"`, "file")
	if !strings.Contains(s["derp_map.regions"].value, `RegionID = 901`) || !strings.Contains(s["derp_map.regions"].value, "Nodes = 3") {
		t.Errorf("derp_map.regions = %s", s["derp_map.regions"].value)
	}
	s.want(t, "auth.resume_key", `{ id = "1", secret_hex = "(secret)" }`, "file")
	if _, ok := s["stun_addr"]; ok {
		t.Error("the coordinator role shows a STUN setting")
	}
	for _, p := range ctr.Ports {
		if p.Protocol == corev1.ProtocolUDP {
			t.Errorf("a coordinator has UDP port %s", p.Name)
		}
	}
	if secret := configSecret(t, r); strings.Contains(secret.StringData["tailnetd.toml"], "postgres") {
		t.Error("the PostgreSQL URL is in the settings file")
	}
}

// TestStrictDecodeRefusesUnknownFields shows the decode is strict: a misspelled field the chart
// passes through from the values (into the pod's securityContext) fails the render.
func TestStrictDecodeRefusesUnknownFields(t *testing.T) {
	c := loadChart(t)
	values := exampleValues(t, "relay") + "\npodSecurityContext:\n  runAsNonRoot: true\n  runAsUser: 10001\n  runAsUsr: 10001\n"
	_, err := render(c, "relay-fra", values)
	if err == nil || !strings.Contains(err.Error(), "runAsUsr") {
		t.Fatalf("want a strict-decoding error naming runAsUsr, got %v", err)
	}
}

// TestCheckRefusesUnknownSettings shows the --check step can fail: a misspelled key in config
// renders fine and tailnetd refuses it, naming it.
func TestCheckRefusesUnknownSettings(t *testing.T) {
	c := loadChart(t)
	r, err := render(c, "tailnetd", exampleValues(t, "sidecar")+"\nconfig:\n  relay:\n    queue_dept: 16\n")
	if err != nil {
		t.Fatal(err)
	}
	d := only[*appsv1.Deployment](t, r)
	_, err = runCheck(t, d.Spec.Template.Spec.Containers[0], configSecret(t, r).StringData["tailnetd.toml"])
	if err == nil || !strings.Contains(err.Error(), "relay.queue_dept") || !strings.Contains(err.Error(), "exit status 64") {
		t.Fatalf("want exit status 64 naming relay.queue_dept, got %v", err)
	}
}

// TestChartRefusesValuesThatCannotWork: the chart's own checks fail the render with a message.
func TestChartRefusesValuesThatCannotWork(t *testing.T) {
	c := loadChart(t)
	cases := []struct {
		name, values, want string
	}{
		// values.schema.json
		{"dev role", "role: dev\n", "at '/role': value must be one of 'serve', 'coordinator', 'derp'"},
		{"unknown kind", "kind: StatefulSet\n", "at '/kind': value must be one of 'Deployment', 'DaemonSet'"},
		{"misspelled value", "replicaCont: 2\n", "replicaCont"},
		{"misspelled nested value", "service:\n  tpye: LoadBalancer\n", "tpye"},
		{"float where an integer goes", "sizing:\n  relayConnections: 1.5\n", "relayConnections"},
		// the templates' own checks
		{"replicas without PostgreSQL", "role: coordinator\nreplicaCount: 2\n", "needs postgres.existingSecret"},
		{"PostgreSQL on a relay", "role: derp\npostgres:\n  existingSecret: pg\n", "only the serve and coordinator roles"},
		{"listener in config", "config:\n  http_addr: 0.0.0.0:9\n", "config.http_addr is set by the chart"},
		{"PostgreSQL URL in config", "role: coordinator\nconfig:\n  coordinator:\n    postgres_url: postgres://x@y/z\n", "put the URL in a Secret"},
		{"mesh on a sidecar", "mesh:\n  pskSecret: m\n", "mesh.pskSecret"},
		{"ingress without host", "ingress:\n  enabled: true\n", "ingress.host"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(c, "tailnetd", tc.values)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("want an error containing %q, got %v", tc.want, err)
			}
		})
	}
	// Without the schema (--skip-schema-validation) the templates still refuse a role or kind
	// they cannot render.
	for values, want := range map[string]string{
		"role: dev\n":         `role: "dev" is not one of serve, coordinator, derp`,
		"kind: StatefulSet\n": `kind: "StatefulSet" is neither Deployment nor DaemonSet`,
	} {
		_, err := renderWith(c, "tailnetd", values, true)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("without the schema, %q: want an error containing %q, got %v", values, want, err)
		}
	}
}

// TestDefaultsRenderEveryRole: the chart's defaults with only the role chosen render, decode and
// pass --check for each role, as Deployment and (with PostgreSQL where needed) DaemonSet.
func TestDefaultsRenderEveryRole(t *testing.T) {
	c := loadChart(t)
	for _, role := range []string{"serve", "coordinator", "derp"} {
		for _, kind := range []string{"Deployment", "DaemonSet"} {
			t.Run(role+"/"+kind, func(t *testing.T) {
				values := fmt.Sprintf("role: %s\nkind: %s\n", role, kind)
				if kind == "DaemonSet" && role != "derp" {
					values += "postgres:\n  existingSecret: pg\n"
				}
				r, err := render(c, "tailnetd", values)
				if err != nil {
					t.Fatal(err)
				}
				ex := example{file: "defaults", release: "tailnetd", role: role, kind: kind}
				pod := checkCommon(t, r, ex)
				checkSettings(t, r, pod, ex)
			})
		}
	}
}
