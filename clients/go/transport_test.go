package skykitagent

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// skykitAPI is a stand-in for the Skykit API: it accepts a request only
// with "Authorization: Bearer <token>" whose token verifies with the
// agent's public key and has the right claims.
type skykitAPI struct {
	*httptest.Server
	mu     sync.Mutex
	tokens []string
}

func newSkykitAPI(t *testing.T, a *testAgent, lifetime time.Duration) *skykitAPI {
	t.Helper()
	api := &skykitAPI{}
	api.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		auth := r.Header.Get("Authorization")
		token, ok := strings.CutPrefix(auth, "Bearer ")
		if !ok {
			http.Error(w, fmt.Sprintf("no bearer token (Authorization: %q)", auth), http.StatusUnauthorized)
			return
		}
		c, err := verifyJWT(a.pub, token, lifetime)
		if err != nil {
			http.Error(w, "bad token: "+err.Error(), http.StatusUnauthorized)
			return
		}
		if now := time.Now().Unix(); c.Iat > now+1 || c.Exp <= now {
			http.Error(w, fmt.Sprintf("token not valid now: iat %d exp %d now %d", c.Iat, c.Exp, now), http.StatusUnauthorized)
			return
		}
		body, _ := io.ReadAll(r.Body)
		api.mu.Lock()
		api.tokens = append(api.tokens, token)
		api.mu.Unlock()
		fmt.Fprintf(w, "hello %s: %s %s %s", c.Iss, r.Method, r.URL.Path, body)
	}))
	t.Cleanup(api.Close)
	return api
}

func (api *skykitAPI) seen() []string {
	api.mu.Lock()
	defer api.mu.Unlock()
	return append([]string(nil), api.tokens...)
}

func get(t *testing.T, hc *http.Client, req *http.Request) string {
	t.Helper()
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %s: %s", req.Method, req.URL, resp.Status, body)
	}
	return string(body)
}

func TestTransportAddsAVerifiedBearerToken(t *testing.T) {
	a := agent(t)
	const lifetime = 25 * time.Minute
	api := newSkykitAPI(t, a, lifetime)
	cc := newCountingClient(t, a)

	hc := &http.Client{Transport: &Transport{Client: cc.Client, Lifetime: lifetime}}

	req, _ := http.NewRequest(http.MethodGet, api.URL+"/v1/screens", nil)
	req.Header.Set("X-Caller", "test")
	if got, want := get(t, hc, req), "hello "+testIssuer+": GET /v1/screens "; got != want {
		t.Fatalf("response %q, want %q", got, want)
	}
	if req.Header.Get("Authorization") != "" {
		t.Fatal("the Transport modified the caller's request")
	}

	for i := 0; i < 5; i++ {
		req, _ := http.NewRequest(http.MethodPost, api.URL+"/v1/playlists", strings.NewReader(fmt.Sprintf("body %d", i)))
		if got, want := get(t, hc, req), fmt.Sprintf("hello %s: POST /v1/playlists body %d", testIssuer, i); got != want {
			t.Fatalf("response %q, want %q", got, want)
		}
	}
	cc.wantCalls(t, 1, "six requests through the Transport")

	seen := api.seen()
	if len(seen) != 6 {
		t.Fatalf("the API saw %d tokens, want 6", len(seen))
	}
	tok, err := cc.Token(t.Context(), WithLifetime(lifetime))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range seen {
		if s != tok.Token {
			t.Fatal("the API saw a token other than the client's cached one")
		}
	}
}

// The zero Transport finds the agent by the discovery rule from the
// process environment.
func TestZeroTransportUsesTheEnvironment(t *testing.T) {
	a := agent(t)
	api := newSkykitAPI(t, a, 0)
	t.Setenv(EnvSocket, "")
	t.Setenv(EnvXDGRuntimeDir, a.xdg)
	tr := &Transport{}
	defer func() {
		if tr.defaultClient != nil {
			_ = tr.defaultClient.Close()
		}
	}()
	hc := &http.Client{Transport: tr}
	req, _ := http.NewRequest(http.MethodGet, api.URL+"/v1/me", nil)
	if got, want := get(t, hc, req), "hello "+testIssuer+": GET /v1/me "; got != want {
		t.Fatalf("response %q, want %q", got, want)
	}
}

type trackedBody struct {
	io.Reader
	closed bool
}

func (b *trackedBody) Close() error { b.closed = true; return nil }

func TestTransportErrors(t *testing.T) {
	a := agent(t)
	api := newSkykitAPI(t, a, 0)

	// Unreachable: the request fails with the agent's error and its body
	// is closed, as a RoundTripper must.
	missing, err := New(WithSocket(filepath.Join(t.TempDir(), "missing.sock")))
	if err != nil {
		t.Fatal(err)
	}
	defer missing.Close()
	hc := &http.Client{Transport: &Transport{Client: missing}}
	body := &trackedBody{Reader: strings.NewReader("data")}
	req, _ := http.NewRequest(http.MethodPost, api.URL+"/v1/x", body)
	_, err = hc.Do(req)
	var ue *UnreachableError
	if !errors.As(err, &ue) || !errors.Is(err, ErrUnreachable) {
		t.Fatalf("request through an unreachable agent: %v, want an *UnreachableError", err)
	}
	if !body.closed {
		t.Error("the request body was not closed")
	}
	if len(api.seen()) != 0 {
		t.Error("the request reached the API without a token")
	}

	// The agent's refusal comes back as the request's error.
	client, err := New(WithSocket(a.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	hc = &http.Client{Transport: &Transport{Client: client, Lifetime: 10 * time.Second}}
	req, _ = http.NewRequest(http.MethodGet, api.URL+"/v1/x", nil)
	if _, err = hc.Do(req); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("request with a bad lifetime: %v, want ErrInvalidArgument", err)
	}
}
