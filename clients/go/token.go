package skykitagent

import (
	"fmt"
	"log/slog"
	"time"

	pb "github.com/skykit/skykit-agent/clients/go/skykitagentv1"
)

// Token is a Skykit API access token and its times. Printing it (fmt with
// any verb, %#v included, or slog) never shows the token string itself.
type Token struct {
	// Token is the JWT (RS256, claims iss, iat, exp), ready for
	// "Authorization: Bearer " + Token.
	Token string
	// IssuedAt is the token's iat; ExpiresAt its exp.
	IssuedAt  time.Time
	ExpiresAt time.Time
	// RefreshAfter is when a cached token should be replaced by asking
	// the agent again.
	RefreshAfter time.Time
	// Issuer is the token's iss: the email the public key is registered with.
	Issuer string
	// Identity is the agent identity that signed it.
	Identity string
	// KeyID is the signing key's fingerprint (as `skykit-agent pubkey` prints).
	KeyID string
}

func tokenFrom(resp *pb.GetTokenResponse) *Token {
	return &Token{
		Token:        resp.GetToken(),
		IssuedAt:     resp.GetIssuedAt().AsTime(),
		ExpiresAt:    resp.GetExpiresAt().AsTime(),
		RefreshAfter: resp.GetRefreshAfter().AsTime(),
		Issuer:       resp.GetIssuer(),
		Identity:     resp.GetIdentity(),
		KeyID:        resp.GetKeyId(),
	}
}

const redacted = "[redacted]"

// String describes the token without the token string.
func (t Token) String() string {
	return fmt.Sprintf("Token{Identity: %s, Issuer: %s, KeyID: %s, IssuedAt: %s, ExpiresAt: %s, RefreshAfter: %s, Token: %s}",
		t.Identity, t.Issuer, t.KeyID,
		t.IssuedAt.UTC().Format(time.RFC3339), t.ExpiresAt.UTC().Format(time.RFC3339),
		t.RefreshAfter.UTC().Format(time.RFC3339), redacted)
}

// GoString is the %#v form, without the token string.
func (t Token) GoString() string {
	return fmt.Sprintf("skykitagent.Token{Token:%q, IssuedAt:%#v, ExpiresAt:%#v, RefreshAfter:%#v, Issuer:%q, Identity:%q, KeyID:%q}",
		redacted, t.IssuedAt, t.ExpiresAt, t.RefreshAfter, t.Issuer, t.Identity, t.KeyID)
}

// Format makes every fmt verb (%v, %+v, %#v, %s, %d, %x, ...) print String
// or GoString, never the fields one by one.
func (t Token) Format(f fmt.State, verb rune) {
	if verb == 'v' && f.Flag('#') {
		_, _ = f.Write([]byte(t.GoString()))
		return
	}
	_, _ = f.Write([]byte(t.String()))
}

// LogValue keeps the token string out of slog output.
func (t Token) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("identity", t.Identity),
		slog.String("issuer", t.Issuer),
		slog.String("key_id", t.KeyID),
		slog.Time("issued_at", t.IssuedAt),
		slog.Time("expires_at", t.ExpiresAt),
		slog.Time("refresh_after", t.RefreshAfter),
		slog.String("token", redacted),
	)
}
