package k8s

// Rendering: Helm's own loader, values coalescing, engine and manifest sorter (what `helm
// template` runs, without a cluster), then a strict decode of every object into k8s.io/api types.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	chartv2 "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	chartv2util "helm.sh/helm/v4/pkg/chart/v2/util"
	"helm.sh/helm/v4/pkg/engine"
	releaseutil "helm.sh/helm/v4/pkg/release/v1/util"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/yaml"

	"tailnetd.test/interop/harness"
)

// The release namespace of every render.
const namespace = "tailnetd"

// The Kubernetes release rendered for (`helm template --kube-version`): the one of the k8s.io/api
// types the objects are decoded into.
const kubeVersion = "v1.37.0"

// scheme knows every API group the chart may render; a kind outside it fails the decode.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, appsv1.AddToScheme, policyv1.AddToScheme, networkingv1.AddToScheme,
	} {
		if err := add(s); err != nil {
			panic(err)
		}
	}
	return s
}()

// chartDir is deploy/helm/tailnetd in the repository.
func chartDir(t testing.TB) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "deploy", "helm", "tailnetd")
}

func loadChart(t testing.TB) *chartv2.Chart {
	t.Helper()
	c, err := loader.Load(chartDir(t))
	if err != nil {
		t.Fatalf("loading the chart: %v", err)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("chart metadata: %v", err)
	}
	return c
}

// object is one rendered manifest decoded into its Kubernetes type.
type object struct {
	source string // the template it came from
	gvk    schema.GroupVersionKind
	name   string
	obj    runtime.Object
}

// rendered is one release rendered from one values file.
type rendered struct {
	values  common.Values // the chart's defaults with the file's values on top
	objects []object
}

// render renders the chart as release `release` with the values in `valuesYAML` (the file's
// text) and decodes every object strictly. Errors are returned, not fatal, so that tests can
// expect a refusal.
func render(c *chartv2.Chart, release, valuesYAML string) (*rendered, error) {
	return renderWith(c, release, valuesYAML, false)
}

// renderWith is render, optionally without the values schema (`helm template
// --skip-schema-validation`).
func renderWith(c *chartv2.Chart, release, valuesYAML string, skipSchema bool) (*rendered, error) {
	vals, err := common.ReadValues([]byte(valuesYAML))
	if err != nil {
		return nil, fmt.Errorf("reading values: %w", err)
	}
	caps := common.DefaultCapabilities.Copy()
	kv, err := common.ParseKubeVersion(kubeVersion)
	if err != nil {
		return nil, err
	}
	caps.KubeVersion = *kv
	if c.Metadata.KubeVersion != "" && !chartv2util.IsCompatibleRange(c.Metadata.KubeVersion, caps.KubeVersion.String()) {
		return nil, fmt.Errorf("chart requires kubeVersion %s, rendering for %s", c.Metadata.KubeVersion, caps.KubeVersion.String())
	}
	opts := common.ReleaseOptions{Name: release, Namespace: namespace, Revision: 1, IsInstall: true}
	top, err := util.ToRenderValuesWithSchemaValidation(c, vals, opts, caps, skipSchema)
	if err != nil {
		return nil, err
	}
	files, err := engine.Render(c, top)
	if err != nil {
		return nil, err
	}
	for name := range files {
		if strings.HasSuffix(name, "NOTES.txt") {
			delete(files, name)
		}
	}
	_, manifests, err := releaseutil.SortManifests(files, caps.APIVersions, releaseutil.InstallOrder)
	if err != nil {
		return nil, fmt.Errorf("splitting the manifests: %w", err)
	}
	out := &rendered{}
	if v, ok := top["Values"].(common.Values); ok {
		out.values = v
	} else if m, ok := top["Values"].(map[string]any); ok {
		out.values = m
	}
	for _, m := range manifests {
		o, err := decodeStrict(m.Name, m.Content)
		if err != nil {
			return nil, err
		}
		out.objects = append(out.objects, o)
	}
	return out, nil
}

// decodeStrict decodes one manifest into the type its apiVersion and kind name, refusing unknown
// and duplicate fields.
func decodeStrict(source, content string) (object, error) {
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	if err := yaml.Unmarshal([]byte(content), &head); err != nil {
		return object{}, fmt.Errorf("%s: not YAML: %w\n%s", source, err, content)
	}
	gv, err := schema.ParseGroupVersion(head.APIVersion)
	if err != nil {
		return object{}, fmt.Errorf("%s: apiVersion %q: %w", source, head.APIVersion, err)
	}
	gvk := gv.WithKind(head.Kind)
	obj, err := scheme.New(gvk)
	if err != nil {
		return object{}, fmt.Errorf("%s: %s is not a kind of Kubernetes' API this test knows: %w", source, gvk, err)
	}
	if err := yaml.UnmarshalStrict([]byte(content), obj); err != nil {
		return object{}, fmt.Errorf("%s: %s %q does not decode strictly into %T: %w\n%s", source, gvk.Kind, head.Metadata.Name, obj, err, content)
	}
	if head.Metadata.Name == "" {
		return object{}, fmt.Errorf("%s: %s without a name", source, gvk.Kind)
	}
	return object{source: source, gvk: gvk, name: head.Metadata.Name, obj: obj}, nil
}

// exampleValues reads deploy/helm/tailnetd/examples/<name>.yaml.
func exampleValues(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(chartDir(t), "examples", name+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// only returns the single object of type T, failing t unless there is exactly one.
func only[T runtime.Object](t testing.TB, r *rendered) T {
	t.Helper()
	var found []T
	for _, o := range r.objects {
		if v, ok := o.obj.(T); ok {
			found = append(found, v)
		}
	}
	if len(found) != 1 {
		var zero T
		t.Fatalf("want exactly one %T, rendered %d", zero, len(found))
	}
	return found[0]
}

// all returns every object of type T.
func all[T runtime.Object](r *rendered) []T {
	var found []T
	for _, o := range r.objects {
		if v, ok := o.obj.(T); ok {
			found = append(found, v)
		}
	}
	return found
}
