package skykitagent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Names of the environment variables the discovery rule reads.
const (
	EnvSocket        = "SKYKIT_AGENT_SOCKET"
	EnvXDGRuntimeDir = "XDG_RUNTIME_DIR"
	// SystemSocket is the socket of the system-wide agent.
	SystemSocket = "/run/skykit-agent/agent.sock"
)

// What named a candidate (Candidate.NamedBy).
const (
	NamedByArgument = "WithSocket"
	NamedByEnv      = "$" + EnvSocket
	NamedByXDG      = "$" + EnvXDGRuntimeDir
	NamedBySystem   = "system default"
)

// Candidate is a socket path to try and what named it.
type Candidate struct {
	Path    string
	NamedBy string
}

// Candidates returns the ordered socket paths a client considers: the
// explicit argument, else $SKYKIT_AGENT_SOCKET, else
// $XDG_RUNTIME_DIR/skykit-agent/agent.sock (when XDG_RUNTIME_DIR is set)
// followed by /run/skykit-agent/agent.sock. An empty argument or an empty
// variable counts as unset. It is pure: it reads the environment only
// through getenv (nil means an empty environment) and touches no file.
//
// A client uses the argument or $SKYKIT_AGENT_SOCKET whether or not it
// exists, and otherwise the first of the discovered paths that exists.
func Candidates(argument string, getenv func(string) string) []Candidate {
	if getenv == nil {
		getenv = func(string) string { return "" }
	}
	if argument != "" {
		return []Candidate{{Path: argument, NamedBy: NamedByArgument}}
	}
	if path := getenv(EnvSocket); path != "" {
		return []Candidate{{Path: path, NamedBy: NamedByEnv}}
	}
	var candidates []Candidate
	if dir := getenv(EnvXDGRuntimeDir); dir != "" {
		candidates = append(candidates, Candidate{
			Path:    filepath.Join(dir, "skykit-agent", "agent.sock"),
			NamedBy: NamedByXDG,
		})
	}
	return append(candidates, Candidate{Path: SystemSocket, NamedBy: NamedBySystem})
}

// named reports whether the candidates are one path the user named, which
// is tried whether or not it exists.
func named(candidates []Candidate) bool {
	return len(candidates) == 1 && candidates[0].NamedBy != NamedBySystem
}

// probeTimeout bounds one connect to a candidate socket.
const probeTimeout = 5 * time.Second

// resolve follows the discovery rule: it returns the first candidate that
// accepts a connection, or an *UnreachableError listing every path tried.
// Like the Rust CLI it stops at the first discovered path that exists.
func resolve(candidates []Candidate) (Candidate, error) {
	isNamed := named(candidates)
	var attempts []Attempt
	for _, candidate := range candidates {
		if !isNamed {
			if _, err := os.Lstat(candidate.Path); err != nil {
				attempts = append(attempts, Attempt{Candidate: candidate, Reason: "does not exist", Err: err})
				continue
			}
		}
		conn, err := net.DialTimeout("unix", candidate.Path, probeTimeout)
		if err == nil {
			_ = conn.Close()
			return candidate, nil
		}
		attempts = append(attempts, Attempt{Candidate: candidate, Reason: describe(err), Err: err})
		return Candidate{}, &UnreachableError{Attempts: attempts}
	}
	return Candidate{}, &UnreachableError{Attempts: attempts}
}

// describe says why a connect failed, in the words of the Rust CLI.
func describe(err error) string {
	switch {
	case errors.Is(err, syscall.ENOENT):
		return "does not exist"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "nothing is listening (connection refused: a socket file left by an agent that stopped)"
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Sprintf("permission denied for uid %d: ask the agent's operator for access to the socket", os.Getuid())
	default:
		return err.Error()
	}
}
