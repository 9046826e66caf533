package k8s

import (
	"testing"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
)

// TestHelmLintStrict runs Helm's own linter (what `helm lint --strict --kube-version` runs) with
// each example values file: a warning fails as an error does; information lines are logged.
func TestHelmLintStrict(t *testing.T) {
	kv, err := common.ParseKubeVersion(kubeVersion)
	if err != nil {
		t.Fatal(err)
	}
	for _, ex := range examples {
		t.Run(ex.file, func(t *testing.T) {
			vals, err := common.ReadValues([]byte(exampleValues(t, ex.file)))
			if err != nil {
				t.Fatal(err)
			}
			result := lint.RunAll(chartDir(t), vals, namespace, lint.WithKubeVersion(kv))
			for _, m := range result.Messages {
				if m.Severity >= support.WarningSev {
					t.Error(m.Error())
				} else {
					t.Log(m.Error())
				}
			}
		})
	}
}
