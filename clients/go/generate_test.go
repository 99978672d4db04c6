package skykitagent

import (
	"os/exec"
	"testing"
)

// The checked-in skykitagentv1/*.pb.go must be what generate.sh makes from
// ../../proto now. Needs bash, go and a Python with grpcio-tools ($PYTHON,
// default the repo's .venv); without them this fails, it does not skip.
func TestGeneratedCodeIsFresh(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatalf("bash is required to run generate.sh --check: %v", err)
	}
	out, err := exec.Command(bash, "generate.sh", "--check").CombinedOutput()
	if err != nil {
		t.Fatalf("generate.sh --check failed (%v): the generated code in skykitagentv1 is stale, or it could not be regenerated; output:\n%s", err, out)
	}
	t.Logf("%s", out)
}
