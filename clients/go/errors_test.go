package skykitagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/skykit/skykit-agent/clients/go/skykitagentv1"
)

func tokenErr(t *testing.T, client *Client, opts ...TokenOption) error {
	t.Helper()
	tok, err := client.Token(context.Background(), opts...)
	if err == nil {
		t.Fatalf("Token succeeded (%v), want an error", tok)
	}
	if !errors.Is(err, ErrAgent) {
		t.Errorf("errors.Is(%v, ErrAgent) = false", err)
	}
	return err
}

func unreachable(t *testing.T, err error) *UnreachableError {
	t.Helper()
	var ue *UnreachableError
	if !errors.As(err, &ue) {
		t.Fatalf("error %v (%T) is not an *UnreachableError", err, err)
	}
	if !errors.Is(err, ErrUnreachable) || errors.Is(err, ErrNotFound) {
		t.Errorf("errors.Is(ErrUnreachable) = %v, errors.Is(ErrNotFound) = %v", errors.Is(err, ErrUnreachable), errors.Is(err, ErrNotFound))
	}
	if !strings.HasPrefix(err.Error(), "cannot reach skykit-agent; tried:\n") {
		t.Errorf("message does not start with the CLI's words: %q", err.Error())
	}
	return ue
}

func TestUnreachableMissingSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.sock")
	client, err := New(WithSocket(path))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	err = tokenErr(t, client)
	ue := unreachable(t, err)
	if len(ue.Attempts) != 1 || ue.Attempts[0].Candidate != (Candidate{path, "WithSocket"}) ||
		ue.Attempts[0].Reason != "does not exist" || !errors.Is(ue.Attempts[0].Err, syscall.ENOENT) {
		t.Fatalf("attempts = %+v", ue.Attempts)
	}
	if want := "\n  " + path + " (WithSocket): does not exist\n"; !strings.Contains(err.Error(), want) {
		t.Errorf("message %q does not contain %q", err.Error(), want)
	}
}

func TestUnreachableNothingDiscovered(t *testing.T) {
	xdg := t.TempDir()
	client, err := New(WithEnv(envOf(map[string]string{EnvXDGRuntimeDir: xdg})))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	err = tokenErr(t, client)
	ue := unreachable(t, err)
	want := filepath.Join(xdg, "skykit-agent", "agent.sock")
	if len(ue.Attempts) == 0 || ue.Attempts[0].Candidate != (Candidate{want, "$XDG_RUNTIME_DIR"}) || ue.Attempts[0].Reason != "does not exist" {
		t.Fatalf("attempts = %+v", ue.Attempts)
	}
	if !strings.Contains(err.Error(), "\n  "+want+" ($XDG_RUNTIME_DIR): does not exist\n") {
		t.Errorf("message: %q", err.Error())
	}
	// The system socket is tried second (it does not exist on a test machine).
	if _, statErr := os.Lstat(SystemSocket); errors.Is(statErr, os.ErrNotExist) {
		if len(ue.Attempts) != 2 || ue.Attempts[1].Candidate != (Candidate{SystemSocket, "system default"}) || ue.Attempts[1].Reason != "does not exist" {
			t.Fatalf("attempts = %+v", ue.Attempts)
		}
		if !strings.Contains(err.Error(), "\n  "+SystemSocket+" (system default): does not exist\n") {
			t.Errorf("message: %q", err.Error())
		}
	}
}

// staleSocket leaves a socket file that nothing listens on, as an agent
// that died without cleaning up does.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("the stale socket file is gone: %v", err)
	}
}

func TestUnreachableStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stale.sock")
	staleSocket(t, path)
	client, err := New(WithSocket(path))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	err = tokenErr(t, client)
	ue := unreachable(t, err)
	if len(ue.Attempts) != 1 || ue.Attempts[0].Candidate.Path != path || !errors.Is(ue.Attempts[0].Err, syscall.ECONNREFUSED) {
		t.Fatalf("attempts = %+v", ue.Attempts)
	}
	reason := ue.Attempts[0].Reason
	if !strings.Contains(reason, "nothing is listening") || !strings.Contains(reason, "connection refused") {
		t.Errorf("reason = %q, want nothing listening (connection refused)", reason)
	}
	if !strings.Contains(err.Error(), "\n  "+path+" (WithSocket): nothing is listening") {
		t.Errorf("message: %q", err.Error())
	}

	// Discovered: the first existing path is tried, and a stale one ends
	// the search (the system socket is not tried after it).
	xdg := t.TempDir()
	if err := os.MkdirAll(filepath.Join(xdg, "skykit-agent"), 0o700); err != nil {
		t.Fatal(err)
	}
	staleSocket(t, filepath.Join(xdg, "skykit-agent", "agent.sock"))
	client2, err := New(WithEnv(envOf(map[string]string{EnvXDGRuntimeDir: xdg})))
	if err != nil {
		t.Fatal(err)
	}
	defer client2.Close()
	ue = unreachable(t, tokenErr(t, client2))
	if len(ue.Attempts) != 1 || ue.Attempts[0].Candidate.NamedBy != NamedByXDG || !strings.Contains(ue.Attempts[0].Reason, "connection refused") {
		t.Fatalf("attempts = %+v", ue.Attempts)
	}
}

func TestPermissionDeniedReason(t *testing.T) {
	err := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.EACCES)}
	want := fmt.Sprintf("permission denied for uid %d", os.Getuid())
	if got := describe(err); !strings.HasPrefix(got, want) {
		t.Fatalf("describe(EACCES) = %q, want it to start with %q", got, want)
	}
}

func agentError(t *testing.T, err error, sentinel error, code codes.Code, parts ...string) *Error {
	t.Helper()
	var ae *Error
	if !errors.As(err, &ae) {
		t.Fatalf("error %v (%T) is not an *Error", err, err)
	}
	if !errors.Is(err, sentinel) || !errors.Is(err, ErrAgent) || errors.Is(err, ErrUnreachable) {
		t.Errorf("error %v: errors.Is(%v) = %v", err, sentinel, errors.Is(err, sentinel))
	}
	for _, other := range []error{ErrInvalidArgument, ErrNotFound, ErrPermissionDenied, ErrUnavailable} {
		if other != sentinel && errors.Is(err, other) {
			t.Errorf("error %v also matches %v", err, other)
		}
	}
	if ae.Code != code || status.Code(err) != code {
		t.Errorf("Code = %v, status.Code = %v, want %v", ae.Code, status.Code(err), code)
	}
	for _, part := range parts {
		if !strings.Contains(ae.Message, part) || !strings.Contains(err.Error(), part) {
			t.Errorf("message %q (error %q) does not contain %q", ae.Message, err.Error(), part)
		}
	}
	return ae
}

func TestInvalidArgument(t *testing.T) {
	a := agent(t)
	client, err := New(WithSocket(a.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	cases := []struct {
		name  string
		opts  []TokenOption
		parts []string // the limit and the value
	}{
		{"lifetime under 60s", []TokenOption{WithLifetime(30 * time.Second)}, []string{"30s", "60s"}},
		{"lifetime over 1h", []TokenOption{WithLifetime(3601 * time.Second)}, []string{"3601s"}},
		{"lifetime with nanos", []TokenOption{WithLifetime(90*time.Second + 500*time.Millisecond)}, nil},
		{"min_valid_for over lifetime", []TokenOption{WithLifetime(2 * time.Minute), WithMinValidFor(3 * time.Minute)}, []string{"120s", "180s"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tokenErr(t, client, tc.opts...)
			ae := agentError(t, err, ErrInvalidArgument, codes.InvalidArgument, tc.parts...)
			if !strings.HasPrefix(err.Error(), "skykit-agent: invalid argument: ") || ae.Message == "" {
				t.Errorf("error = %q", err.Error())
			}
		})
	}
}

func TestNotFound(t *testing.T) {
	a := agent(t)
	client, err := New(WithSocket(a.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	err = tokenErr(t, client, WithIdentity("no-such-identity"))
	agentError(t, err, ErrNotFound, codes.NotFound, `"no-such-identity"`)
	if !strings.HasPrefix(err.Error(), "skykit-agent: not found: ") {
		t.Errorf("error = %q", err.Error())
	}
}

// fakeAgent answers GetToken by identity: "denied" PERMISSION_DENIED (as the
// agent will with access control), "broken" UNAVAILABLE (signing failed),
// "slow" only when the call's context ends, anything else a token.
type fakeAgent struct {
	pb.UnimplementedTokenServiceServer
}

func (fakeAgent) GetToken(ctx context.Context, req *pb.GetTokenRequest) (*pb.GetTokenResponse, error) {
	switch req.GetIdentity() {
	case "denied":
		return nil, status.Errorf(codes.PermissionDenied, "uid %d may not use identity %q", os.Getuid(), "denied")
	case "broken":
		return nil, status.Error(codes.Unavailable, "signing failed: the key is gone")
	case "slow":
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	now := time.Now().Truncate(time.Second)
	return &pb.GetTokenResponse{
		Token:        "fake.token.value",
		IssuedAt:     timestamppb.New(now),
		ExpiresAt:    timestamppb.New(now.Add(time.Hour)),
		RefreshAfter: timestamppb.New(now.Add(30 * time.Minute)),
		Issuer:       testIssuer,
		Identity:     "default",
		KeyId:        "fake",
	}, nil
}

func serveFake(t *testing.T, path string) *grpc.Server {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	pb.RegisterTokenServiceServer(s, fakeAgent{})
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return s
}

func TestPermissionDeniedAndUnavailableFromTheAgent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fake.sock")
	serveFake(t, path)
	client, err := New(WithSocket(path))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	err = tokenErr(t, client, WithIdentity("denied"))
	agentError(t, err, ErrPermissionDenied, codes.PermissionDenied, `may not use identity "denied"`)
	if !strings.HasPrefix(err.Error(), "skykit-agent: permission denied: uid ") {
		t.Errorf("error = %q", err.Error())
	}

	// UNAVAILABLE from a live agent is the agent's error, not unreachable.
	err = tokenErr(t, client, WithIdentity("broken"))
	agentError(t, err, ErrUnavailable, codes.Unavailable, "signing failed: the key is gone")

	// The caller's deadline ends a call the agent does not answer.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = client.Token(ctx, WithIdentity("slow"))
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrAgent) || status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("slow agent: %v (%T), want a DeadlineExceeded skykit-agent error", err, err)
	}
}

// An agent that stops after the client connected is reported unreachable;
// once it is back the same client gets tokens again.
func TestAgentGoneAndBack(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fake.sock")
	s := serveFake(t, path)
	client, err := New(WithSocket(path))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Cached: still served with the agent gone.
	s.Stop()
	if _, err := client.Token(context.Background()); err != nil {
		t.Fatalf("cached token with the agent gone: %v", err)
	}
	// Not cached: unreachable, with the reason.
	ue := unreachable(t, tokenErr(t, client, WithLifetime(2*time.Minute)))
	if len(ue.Attempts) != 1 || ue.Attempts[0].Reason != "does not exist" {
		t.Fatalf("attempts = %+v", ue.Attempts)
	}
	serveFake(t, path)
	if _, err := client.Token(context.Background(), WithLifetime(2*time.Minute)); err != nil {
		t.Fatalf("the agent is back: %v", err)
	}
}
