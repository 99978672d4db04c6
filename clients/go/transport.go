package skykitagent

import (
	"net/http"
	"sync"
	"time"
)

// Transport is an http.RoundTripper that adds "Authorization: Bearer
// <token>" with a token from the agent to every request, so
//
//	httpClient := &http.Client{Transport: &skykitagent.Transport{}}
//
// calls the Skykit API without any token code. Tokens come from Client's
// cache, so most requests do not reach the agent. The request passed in is
// not modified (a clone carries the header). Use a *Transport; do not copy
// one after first use.
type Transport struct {
	// Base sends the requests; nil means http.DefaultTransport.
	Base http.RoundTripper
	// Client gets the tokens; nil means a client made on first use with
	// New() (socket discovery from the process environment).
	Client *Client
	// Identity, Lifetime and MinValidFor are passed to Client.Token
	// (zero: the agent's defaults).
	Identity    string
	Lifetime    time.Duration
	MinValidFor time.Duration

	once          sync.Once
	defaultClient *Client
	defaultErr    error
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	client, err := t.client()
	var tok *Token
	if err == nil {
		tok, err = client.Token(req.Context(),
			WithIdentity(t.Identity), WithLifetime(t.Lifetime), WithMinValidFor(t.MinValidFor))
	}
	if err != nil {
		// A RoundTripper must close the body, even on errors.
		if req.Body != nil {
			_ = req.Body.Close()
		}
		return nil, err
	}
	out := req.Clone(req.Context())
	out.Header.Set("Authorization", "Bearer "+tok.Token)
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	return base.RoundTrip(out)
}

func (t *Transport) client() (*Client, error) {
	if t.Client != nil {
		return t.Client, nil
	}
	t.once.Do(func() { t.defaultClient, t.defaultErr = New() })
	return t.defaultClient, t.defaultErr
}

// CloseIdleConnections closes idle connections of Base (http.Client calls
// it) and, for a client the Transport made itself, nothing else: the
// connection to the agent stays for the next request.
func (t *Transport) CloseIdleConnections() {
	type closeIdler interface{ CloseIdleConnections() }
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	if c, ok := base.(closeIdler); ok {
		c.CloseIdleConnections()
	}
}
