package skykitagent

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
)

// countingClient is a client of the shared agent that counts its GetToken
// calls and whose clock can be moved forward.
type countingClient struct {
	*Client
	calls  atomic.Int64
	offset atomic.Int64 // added to time.Now, in nanoseconds
}

func newCountingClient(t *testing.T, a *testAgent) *countingClient {
	t.Helper()
	cc := &countingClient{}
	count := grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		conn *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		cc.calls.Add(1)
		return invoker(ctx, method, req, reply, conn, opts...)
	})
	clock := withClock(func() time.Time { return time.Now().Add(time.Duration(cc.offset.Load())) })
	client, err := New(WithSocket(a.socket), WithDialOptions(count), clock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	cc.Client = client
	return cc
}

func (cc *countingClient) wantCalls(t *testing.T, want int64, when string) {
	t.Helper()
	if got := cc.calls.Load(); got != want {
		t.Fatalf("%s: the agent was called %d times, want %d", when, got, want)
	}
}

func TestTokenVerifiesWithThePublicKey(t *testing.T) {
	a := agent(t)
	client, err := New(WithSocket(a.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx := context.Background()

	tok, err := client.Token(ctx)
	if err != nil {
		t.Fatalf("Token(): %v", err)
	}
	verifyToken(t, a, tok, 0) // the default lifetime: 1h

	for _, lifetime := range []time.Duration{time.Minute, 10 * time.Minute, time.Hour} {
		tok, err := client.Token(ctx, WithLifetime(lifetime))
		if err != nil {
			t.Fatalf("Token(WithLifetime(%v)): %v", lifetime, err)
		}
		verifyToken(t, a, tok, lifetime)
	}

	// The default identity by name is the same identity.
	tok, err = client.Token(ctx, WithIdentity("default"), WithLifetime(5*time.Minute))
	if err != nil {
		t.Fatalf("Token(WithIdentity(default)): %v", err)
	}
	verifyToken(t, a, tok, 5*time.Minute)
}

func TestTokenIsCachedUntilRefreshAfter(t *testing.T) {
	a := agent(t)
	cc := newCountingClient(t, a)
	ctx := context.Background()
	const lifetime = 15 * time.Minute

	first, err := cc.Token(ctx, WithLifetime(lifetime))
	if err != nil {
		t.Fatal(err)
	}
	verifyToken(t, a, first, lifetime)
	cc.wantCalls(t, 1, "first Token")

	// A hot loop is served from the cache.
	for i := 0; i < 200; i++ {
		tok, err := cc.Token(ctx, WithLifetime(lifetime))
		if err != nil {
			t.Fatal(err)
		}
		if tok.Token != first.Token {
			t.Fatalf("call %d: a different token before refresh_after", i)
		}
	}
	cc.wantCalls(t, 1, "200 more Token calls before refresh_after")

	// The returned Token is a copy: changing it does not change the cache.
	first.Token = "changed"
	again, err := cc.Token(ctx, WithLifetime(lifetime))
	if err != nil {
		t.Fatal(err)
	}
	verifyToken(t, a, again, lifetime)

	// The cache is per (identity, lifetime).
	other, err := cc.Token(ctx, WithLifetime(lifetime+time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	verifyToken(t, a, other, lifetime+time.Minute)
	cc.wantCalls(t, 2, "a different lifetime")

	// Just before refresh_after: still cached; once it has passed: the agent.
	cc.offset.Store(int64(time.Until(again.RefreshAfter) - time.Second))
	if _, err := cc.Token(ctx, WithLifetime(lifetime)); err != nil {
		t.Fatal(err)
	}
	cc.wantCalls(t, 2, "a second before refresh_after")
	cc.offset.Store(int64(time.Until(again.RefreshAfter) + time.Second))
	refreshed, err := cc.Token(ctx, WithLifetime(lifetime))
	if err != nil {
		t.Fatal(err)
	}
	verifyToken(t, a, refreshed, lifetime)
	cc.wantCalls(t, 3, "after refresh_after")
}

func TestMinValidFor(t *testing.T) {
	a := agent(t)
	cc := newCountingClient(t, a)
	ctx := context.Background()
	const lifetime = 20 * time.Minute

	first, err := cc.Token(ctx, WithLifetime(lifetime))
	if err != nil {
		t.Fatal(err)
	}
	verifyToken(t, a, first, lifetime)
	cc.wantCalls(t, 1, "first Token")

	// The cached token meets a min_valid_for of half its lifetime.
	tok, err := cc.Token(ctx, WithLifetime(lifetime), WithMinValidFor(lifetime/2))
	if err != nil {
		t.Fatal(err)
	}
	if tok.Token != first.Token {
		t.Fatal("min_valid_for the cached token meets: got a different token")
	}
	cc.wantCalls(t, 1, "min_valid_for the cached token meets")

	// In a later wall-clock second the cached token cannot stay valid for
	// its whole lifetime: the agent signs a new one.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Unix() <= first.IssuedAt.Unix() {
		if time.Now().After(deadline) {
			t.Fatalf("the clock did not pass the first token's iat %v", first.IssuedAt)
		}
		time.Sleep(5 * time.Millisecond)
	}
	second, err := cc.Token(ctx, WithLifetime(lifetime), WithMinValidFor(lifetime))
	if err != nil {
		t.Fatal(err)
	}
	verifyToken(t, a, second, lifetime)
	cc.wantCalls(t, 2, "min_valid_for = lifetime in a later second")
	if !second.IssuedAt.After(first.IssuedAt) {
		t.Fatalf("re-signed token IssuedAt %v is not after the first's %v", second.IssuedAt, first.IssuedAt)
	}
	if second.Token == first.Token {
		t.Fatal("min_valid_for = lifetime returned the old token")
	}

	// The new token replaced the cached one.
	third, err := cc.Token(ctx, WithLifetime(lifetime))
	if err != nil {
		t.Fatal(err)
	}
	if third.Token != second.Token {
		t.Fatal("the cache did not keep the re-signed token")
	}
	cc.wantCalls(t, 2, "after the re-signed token")
}

func TestTokenNeverPrintsTheTokenString(t *testing.T) {
	a := agent(t)
	client, err := New(WithSocket(a.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	tok, err := client.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	signature := tok.Token[strings.LastIndex(tok.Token, ".")+1:]
	var outputs []string
	for _, format := range []string{"%v", "%+v", "%#v", "%s", "%q", "%d", "%x", "%X", "%20v"} {
		outputs = append(outputs, fmt.Sprintf(format, tok), fmt.Sprintf(format, *tok))
	}
	outputs = append(outputs, tok.String(), tok.GoString(), fmt.Sprint(tok), fmt.Sprint([]*Token{tok}),
		fmt.Sprintf("%+v", struct{ T Token }{*tok}))
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("got", "token", tok, "value", *tok)
	outputs = append(outputs, logged.String())
	for _, out := range outputs {
		if strings.Contains(out, signature) || strings.Contains(out, tok.Token[:20]) {
			t.Errorf("printed output shows the token: %s", out)
		}
		if !strings.Contains(out, "redacted") {
			t.Errorf("printed output does not say the token is redacted: %s", out)
		}
	}
	if s := tok.String(); !strings.Contains(s, tok.KeyID) || !strings.Contains(s, testIssuer) {
		t.Errorf("String() = %s, want the key id and issuer in it", s)
	}
}

func TestClose(t *testing.T) {
	a := agent(t)
	client, err := New(WithSocket(a.socket))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := client.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := client.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := client.Token(context.Background()); err != ErrClosed {
		t.Fatalf("Token after Close: %v, want ErrClosed", err)
	}
}
