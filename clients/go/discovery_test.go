package skykitagent

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

func envOf(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

// The shared table in clients/testdata, read at test time.
func TestDiscoveryTable(t *testing.T) {
	path := filepath.Join("..", "testdata", "socket-discovery.json")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading the shared discovery table: %v", err)
	}
	var table struct {
		Cases []struct {
			Name       string            `json:"name"`
			Argument   *string           `json:"argument"`
			Env        map[string]string `json:"env"`
			Candidates []string          `json:"candidates"`
		} `json:"cases"`
	}
	if err := json.Unmarshal(data, &table); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if len(table.Cases) == 0 {
		t.Fatalf("%s has no cases", path)
	}
	for _, tc := range table.Cases {
		t.Run(tc.Name, func(t *testing.T) {
			argument := ""
			if tc.Argument != nil {
				argument = *tc.Argument
			}
			var got []string
			for _, c := range Candidates(argument, envOf(tc.Env)) {
				got = append(got, c.Path)
			}
			if !reflect.DeepEqual(got, tc.Candidates) {
				t.Errorf("Candidates(%q, %v) = %q, want %q", argument, tc.Env, got, tc.Candidates)
			}
		})
	}
}

func TestCandidatesNameWhatNamedThem(t *testing.T) {
	all := envOf(map[string]string{EnvSocket: "/e.sock", EnvXDGRuntimeDir: "/x"})
	cases := []struct {
		argument string
		env      func(string) string
		want     []Candidate
	}{
		{"/a.sock", all, []Candidate{{"/a.sock", "WithSocket"}}},
		{"", all, []Candidate{{"/e.sock", "$SKYKIT_AGENT_SOCKET"}}},
		{"", envOf(map[string]string{EnvXDGRuntimeDir: "/x"}), []Candidate{
			{"/x/skykit-agent/agent.sock", "$XDG_RUNTIME_DIR"},
			{"/run/skykit-agent/agent.sock", "system default"},
		}},
		{"", nil, []Candidate{{"/run/skykit-agent/agent.sock", "system default"}}},
	}
	for _, tc := range cases {
		if got := Candidates(tc.argument, tc.env); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Candidates(%q) = %v, want %v", tc.argument, got, tc.want)
		}
	}
}

// The real thing: no argument, no SKYKIT_AGENT_SOCKET, and XDG_RUNTIME_DIR
// pointing at a dir whose skykit-agent/agent.sock is a live agent.
func TestDiscoveryFindsTheAgentThroughXDGRuntimeDir(t *testing.T) {
	a := agent(t)
	client, err := New(WithEnv(envOf(map[string]string{EnvXDGRuntimeDir: a.xdg, EnvSocket: ""})))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	tok, err := client.Token(context.Background())
	if err != nil {
		t.Fatalf("Token through $XDG_RUNTIME_DIR: %v", err)
	}
	verifyToken(t, a, tok, 0)
}

func TestDiscoveryUsesSkykitAgentSocket(t *testing.T) {
	a := agent(t)
	client, err := New(WithEnv(envOf(map[string]string{EnvSocket: a.socket})))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	tok, err := client.Token(context.Background(), WithLifetime(2*time.Minute))
	if err != nil {
		t.Fatalf("Token through $SKYKIT_AGENT_SOCKET: %v", err)
	}
	verifyToken(t, a, tok, 2*time.Minute)
}

// A relative WithSocket path is made absolute at New.
func TestWithSocketRelativePath(t *testing.T) {
	a := agent(t)
	t.Chdir(filepath.Dir(a.socket))
	client, err := New(WithSocket("agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	tok, err := client.Token(context.Background())
	if err != nil {
		t.Fatalf("Token with a relative socket path: %v", err)
	}
	verifyToken(t, a, tok, 0)
}
