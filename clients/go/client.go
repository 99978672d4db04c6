// Package skykitagent gets Skykit API access tokens from the local
// skykit-agent over its Unix socket, caches them until the agent says to
// refresh, and adds them to HTTP requests (Transport).
//
//	client, err := skykitagent.New()
//	tok, err := client.Token(ctx, skykitagent.WithLifetime(10*time.Minute))
//	httpClient := &http.Client{Transport: &skykitagent.Transport{Client: client}}
//
// The socket is found by the rule every skykit-agent client follows (see
// Candidates). The generated gRPC code is in the subpackage skykitagentv1.
package skykitagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/skykit/skykit-agent/clients/go/skykitagentv1"
)

// ErrClosed is returned by a Client after Close.
var ErrClosed = fmt.Errorf("%w: client is closed", ErrAgent)

// DefaultTimeout bounds one call to the agent unless WithTimeout says
// otherwise (a shorter deadline of the caller's context still wins).
const DefaultTimeout = 10 * time.Second

// Option configures New.
type Option func(*config)

type config struct {
	socket      string
	getenv      func(string) string
	timeout     time.Duration
	dialOptions []grpc.DialOption
	now         func() time.Time
}

// WithSocket names the agent's socket; it is used whether or not it exists,
// and the environment is not consulted.
func WithSocket(path string) Option { return func(c *config) { c.socket = path } }

// WithEnv replaces os.Getenv for socket discovery (SKYKIT_AGENT_SOCKET,
// XDG_RUNTIME_DIR); for tests and for programs that pass an environment
// explicitly.
func WithEnv(getenv func(string) string) Option { return func(c *config) { c.getenv = getenv } }

// WithTimeout bounds each call to the agent (default DefaultTimeout; 0 means
// only the caller's context bounds it).
func WithTimeout(d time.Duration) Option { return func(c *config) { c.timeout = d } }

// WithDialOptions adds gRPC dial options (interceptors, stats handlers) to
// the connection to the agent.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) { c.dialOptions = append(c.dialOptions, opts...) }
}

// withClock replaces time.Now for the cache (tests).
func withClock(now func() time.Time) Option { return func(c *config) { c.now = now } }

// Client gets tokens from the agent and caches them. It is safe for
// concurrent use. It connects lazily: New does not fail when the agent is
// not running yet; Token finds the socket (again, after a failure) by the
// discovery rule.
type Client struct {
	cfg config

	mu     sync.Mutex
	conn   *grpc.ClientConn
	stub   pb.TokenServiceClient
	cache  map[cacheKey]*Token
	closed bool
}

type cacheKey struct {
	identity string
	lifetime time.Duration
}

// New makes a client. Options: WithSocket, WithEnv, WithTimeout,
// WithDialOptions.
func New(opts ...Option) (*Client, error) {
	cfg := config{getenv: os.Getenv, timeout: DefaultTimeout, now: time.Now}
	for _, opt := range opts {
		opt(&cfg)
	}
	if cfg.getenv == nil {
		cfg.getenv = func(string) string { return "" }
	}
	if cfg.timeout < 0 {
		return nil, fmt.Errorf("%w: negative timeout %v", ErrAgent, cfg.timeout)
	}
	if cfg.socket != "" {
		abs, err := filepath.Abs(cfg.socket)
		if err != nil {
			return nil, fmt.Errorf("%w: socket path %q: %w", ErrAgent, cfg.socket, err)
		}
		cfg.socket = abs
	}
	return &Client{cfg: cfg, cache: make(map[cacheKey]*Token)}, nil
}

// TokenOption configures one Token call.
type TokenOption func(*tokenRequest)

type tokenRequest struct {
	identity    string
	lifetime    time.Duration
	minValidFor time.Duration
}

// WithIdentity asks for a token of the named identity (an [[identity]] in
// the agent's config); default: the agent's default identity.
func WithIdentity(name string) TokenOption { return func(r *tokenRequest) { r.identity = name } }

// WithLifetime asks for a token valid this long (exp - iat): whole seconds
// from 60s to 1h; default (0): the identity's configured lifetime.
func WithLifetime(d time.Duration) TokenOption { return func(r *tokenRequest) { r.lifetime = d } }

// WithMinValidFor asks for a token that stays valid at least this long; a
// cached token that cannot is not returned. It must not exceed the lifetime.
func WithMinValidFor(d time.Duration) TokenOption {
	return func(r *tokenRequest) { r.minValidFor = d }
}

// Token returns a token for the request. A token this client got earlier
// for the same identity and lifetime is returned without asking the agent
// until its RefreshAfter has passed, as long as it stays valid for the
// requested WithMinValidFor. Errors: *UnreachableError, and *Error matching
// ErrInvalidArgument, ErrNotFound, ErrPermissionDenied or ErrUnavailable.
func (c *Client) Token(ctx context.Context, opts ...TokenOption) (*Token, error) {
	var req tokenRequest
	for _, opt := range opts {
		opt(&req)
	}
	key := cacheKey{identity: req.identity, lifetime: req.lifetime}

	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	cached := c.cache[key]
	c.mu.Unlock()
	if cached != nil {
		now := c.cfg.now()
		if now.Before(cached.RefreshAfter) && cached.ExpiresAt.Sub(now) >= req.minValidFor {
			tok := *cached
			return &tok, nil
		}
	}

	tok, err := c.fetch(ctx, req)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if !c.closed {
		c.cache[key] = tok
	}
	c.mu.Unlock()
	copied := *tok
	return &copied, nil
}

// fetch asks the agent. On UNAVAILABLE it checks the socket: nothing
// listening is an *UnreachableError; otherwise it reconnects once (the old
// connection may be waiting out a reconnect backoff after an agent restart)
// and reports the agent's own UNAVAILABLE if that happens again.
func (c *Client) fetch(ctx context.Context, req tokenRequest) (*Token, error) {
	msg := &pb.GetTokenRequest{Identity: req.identity}
	if req.lifetime != 0 {
		msg.Lifetime = durationpb.New(req.lifetime)
	}
	if req.minValidFor != 0 {
		msg.MinValidFor = durationpb.New(req.minValidFor)
	}
	if c.cfg.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.cfg.timeout)
		defer cancel()
	}

	for attempt := 0; ; attempt++ {
		conn, stub, err := c.connect()
		if err != nil {
			return nil, err
		}
		resp, err := stub.GetToken(ctx, msg)
		if err == nil {
			return tokenFrom(resp), nil
		}
		if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
			return nil, fromStatus(ctx, err)
		}
		c.drop(conn)
		if _, perr := resolve(c.candidates()); perr != nil {
			return nil, perr
		}
		if attempt > 0 {
			return nil, fromStatus(ctx, err)
		}
	}
}

func (c *Client) candidates() []Candidate { return Candidates(c.cfg.socket, c.cfg.getenv) }

// connect returns the connection to the agent, finding the socket first
// when there is none.
func (c *Client) connect() (*grpc.ClientConn, pb.TokenServiceClient, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, nil, ErrClosed
	}
	if c.conn != nil {
		return c.conn, c.stub, nil
	}
	candidate, err := resolve(c.candidates())
	if err != nil {
		return nil, nil, err
	}
	path := candidate.Path
	dialer := func(ctx context.Context, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(dialer),
		// HTTP/2 servers reject a path as the authority.
		grpc.WithAuthority("localhost"),
		// A local socket: come back quickly after an agent restart.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
	opts = append(opts, c.cfg.dialOptions...)
	conn, err := grpc.NewClient("passthrough:///localhost", opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrAgent, err)
	}
	c.conn, c.stub = conn, pb.NewTokenServiceClient(conn)
	return c.conn, c.stub, nil
}

// drop forgets conn so the next call finds the socket again.
func (c *Client) drop(conn *grpc.ClientConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == conn {
		c.conn, c.stub = nil, nil
		_ = conn.Close()
	}
}

// Close closes the connection and forgets the cached tokens. Token calls
// after Close fail with ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	c.cache = make(map[cacheKey]*Token)
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn, c.stub = nil, nil
	if err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
