package skykitagent

// Test support: one real skykit-agent (from $SKYKIT_AGENT_BIN) for the
// whole package, started on first use and stopped with SIGTERM after the
// tests; and verification of every token with the agent's public key.

import (
	"bytes"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const testIssuer = "test@example.com"

type testAgent struct {
	dir    string
	xdg    string // XDG_RUNTIME_DIR whose skykit-agent/agent.sock is socket
	socket string
	pub    *rsa.PublicKey
	keyID  string
	cmd    *exec.Cmd
	exited chan struct{}
	stderr string
}

var (
	agentOnce sync.Once
	shared    *testAgent
	sharedErr error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if shared != nil {
		if err := shared.stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stopping the test agent:", err)
			if code == 0 {
				code = 1
			}
		}
	}
	os.Exit(code)
}

// agent returns the shared running agent, failing the test loudly when it
// cannot be started (SKYKIT_AGENT_BIN unset or wrong).
func agent(t *testing.T) *testAgent {
	t.Helper()
	agentOnce.Do(func() { shared, sharedErr = startAgent() })
	if sharedErr != nil {
		t.Fatalf("cannot start the test agent: %v", sharedErr)
	}
	return shared
}

func agentBin() (string, error) {
	bin := os.Getenv("SKYKIT_AGENT_BIN")
	if bin == "" {
		return "", errors.New("SKYKIT_AGENT_BIN is not set: build the agent (`cargo build` in the repo root) and export SKYKIT_AGENT_BIN=$PWD/target/debug/skykit-agent")
	}
	info, err := os.Stat(bin)
	if err != nil {
		return "", fmt.Errorf("SKYKIT_AGENT_BIN=%s: %w (build it with `cargo build`)", bin, err)
	}
	if info.IsDir() || info.Mode()&0o111 == 0 {
		return "", fmt.Errorf("SKYKIT_AGENT_BIN=%s is not an executable file", bin)
	}
	return bin, nil
}

func startAgent() (*testAgent, error) {
	bin, err := agentBin()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "skykit-go-")
	if err != nil {
		return nil, err
	}
	a := &testAgent{
		dir:    dir,
		xdg:    filepath.Join(dir, "xdg"),
		stderr: filepath.Join(dir, "agent.stderr"),
		exited: make(chan struct{}),
	}
	a.socket = filepath.Join(a.xdg, "skykit-agent", "agent.sock")
	if err := os.MkdirAll(filepath.Dir(a.socket), 0o700); err != nil {
		return nil, err
	}
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}

	keygen := exec.Command(bin, "keygen", "--out", dir)
	keygen.Env = env
	if out, err := keygen.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("%s keygen --out %s: %v\n%s", bin, dir, err, out)
	}
	if a.pub, err = loadPublicKey(filepath.Join(dir, "public.pem")); err != nil {
		return nil, err
	}
	a.keyID = thumbprint(a.pub)

	stderr, err := os.Create(a.stderr)
	if err != nil {
		return nil, err
	}
	defer stderr.Close()
	a.cmd = exec.Command(bin, "serve", "--socket", a.socket,
		"--key", filepath.Join(dir, "private.pem"), "--issuer", testIssuer)
	a.cmd.Env = env
	a.cmd.Stderr = stderr
	if err := a.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s serve: %w", bin, err)
	}
	go func() { _ = a.cmd.Wait(); close(a.exited) }()

	deadline := time.Now().Add(20 * time.Second)
	for {
		conn, err := net.Dial("unix", a.socket)
		if err == nil {
			_ = conn.Close()
			return a, nil
		}
		select {
		case <-a.exited:
			return nil, fmt.Errorf("the agent exited before listening on %s (%v); its stderr:\n%s", a.socket, a.cmd.ProcessState, a.log())
		default:
		}
		if time.Now().After(deadline) {
			_ = a.cmd.Process.Kill()
			return nil, fmt.Errorf("the agent did not listen on %s within 20s; its stderr:\n%s", a.socket, a.log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (a *testAgent) log() string {
	b, _ := os.ReadFile(a.stderr)
	return string(b)
}

func (a *testAgent) stop() error {
	defer os.RemoveAll(a.dir)
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
		if !a.cmd.ProcessState.Success() {
			return fmt.Errorf("agent exited with %v after SIGTERM; its stderr:\n%s", a.cmd.ProcessState, a.log())
		}
		return nil
	case <-time.After(15 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.exited
		return errors.New("the agent did not stop within 15s of SIGTERM")
	}
}

func loadPublicKey(path string) (*rsa.PublicKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("%s: no PUBLIC KEY PEM block", path)
	}
	key, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	pub, ok := key.(*rsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%s: not an RSA key but %T", path, key)
	}
	return pub, nil
}

// thumbprint is the key_id: base64url(SHA-256(RFC 7638 JWK thumbprint input)).
func thumbprint(pub *rsa.PublicKey) string {
	b64 := base64.RawURLEncoding.EncodeToString
	e := big.NewInt(int64(pub.E)).Bytes()
	input := fmt.Sprintf(`{"e":"%s","kty":"RSA","n":"%s"}`, b64(e), b64(pub.N.Bytes()))
	sum := sha256.Sum256([]byte(input))
	return b64(sum[:])
}

const wantHeader = `{"alg":"RS256","typ":"JWT"}`

// claims holds a token's payload.
type claims struct {
	Iss string
	Iat int64
	Exp int64
}

// verifyJWT checks a token's RS256 signature with pub, its exact header
// bytes, that its payload has exactly iss, iat and exp, iss = testIssuer
// and exp - iat = lifetime (0: the default, 1h). Safe off the test goroutine.
func verifyJWT(pub *rsa.PublicKey, token string, lifetime time.Duration) (claims, error) {
	var c claims
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return c, fmt.Errorf("token has %d parts, want 3", len(parts))
	}
	header, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		return c, fmt.Errorf("header: %w", err)
	}
	if string(header) != wantHeader {
		return c, fmt.Errorf("header = %s, want exactly %s", header, wantHeader)
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return c, fmt.Errorf("signature: %w", err)
	}
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
		return c, fmt.Errorf("signature does not verify with the public key: %w", err)
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return c, fmt.Errorf("payload: %w", err)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(payload, &raw); err != nil {
		return c, fmt.Errorf("payload %s: %w", payload, err)
	}
	var keys []string
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if strings.Join(keys, ",") != "exp,iat,iss" {
		return c, fmt.Errorf("payload %s has claims %v, want exactly iss, iat, exp", payload, keys)
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("payload %s: %w", payload, err)
	}
	if c.Iss != testIssuer {
		return c, fmt.Errorf("iss = %q, want %q", c.Iss, testIssuer)
	}
	if lifetime == 0 {
		lifetime = time.Hour
	}
	if got := time.Duration(c.Exp-c.Iat) * time.Second; got != lifetime {
		return c, fmt.Errorf("exp - iat = %v, want %v", got, lifetime)
	}
	return c, nil
}

// verifyToken checks the JWT (verifyJWT) and that the Token's fields agree
// with it and with the agent's key.
func verifyToken(t *testing.T, a *testAgent, tok *Token, lifetime time.Duration) claims {
	t.Helper()
	if tok == nil {
		t.Fatal("nil token")
	}
	c, err := verifyJWT(a.pub, tok.Token, lifetime)
	if err != nil {
		t.Fatalf("token does not verify: %v", err)
	}
	if !tok.IssuedAt.Equal(time.Unix(c.Iat, 0)) || !tok.ExpiresAt.Equal(time.Unix(c.Exp, 0)) {
		t.Errorf("IssuedAt/ExpiresAt = %v/%v, want the claims iat/exp %d/%d", tok.IssuedAt, tok.ExpiresAt, c.Iat, c.Exp)
	}
	if tok.RefreshAfter.Before(tok.IssuedAt) || !tok.RefreshAfter.Before(tok.ExpiresAt) {
		t.Errorf("RefreshAfter %v not in [IssuedAt %v, ExpiresAt %v)", tok.RefreshAfter, tok.IssuedAt, tok.ExpiresAt)
	}
	if tok.Issuer != testIssuer {
		t.Errorf("Issuer = %q, want %q", tok.Issuer, testIssuer)
	}
	if tok.Identity != "default" {
		t.Errorf("Identity = %q, want the default identity %q", tok.Identity, "default")
	}
	if tok.KeyID != a.keyID {
		t.Errorf("KeyID = %q, want the public key's thumbprint %q", tok.KeyID, a.keyID)
	}
	return c
}
