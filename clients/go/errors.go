package skykitagent

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Every error this package returns matches errors.Is(err, ErrAgent); the
// more specific sentinels below match it too, for example
// errors.Is(ErrNotFound, ErrAgent) is true.
var (
	// ErrAgent is the base of every error of this package.
	ErrAgent = errors.New("skykit-agent")
	// ErrUnreachable: no agent listens on any socket tried. The error is an
	// *UnreachableError that lists them.
	ErrUnreachable = fmt.Errorf("%w: unreachable", ErrAgent)
	// ErrInvalidArgument: the agent rejected the request (lifetime outside
	// 60s..3600s, a duration that is not whole seconds, min_valid_for longer
	// than the lifetime).
	ErrInvalidArgument = fmt.Errorf("%w: invalid argument", ErrAgent)
	// ErrNotFound: the agent has no such identity.
	ErrNotFound = fmt.Errorf("%w: not found", ErrAgent)
	// ErrPermissionDenied: the agent does not let this process have the token.
	ErrPermissionDenied = fmt.Errorf("%w: permission denied", ErrAgent)
	// ErrUnavailable: the agent is up but could not sign a token.
	ErrUnavailable = fmt.Errorf("%w: unavailable", ErrAgent)
)

// Error is an error the agent answered with. Its Message is the agent's own
// message; errors.Is matches the sentinel of its Code (ErrInvalidArgument,
// ErrNotFound, ErrPermissionDenied, ErrUnavailable, else just ErrAgent).
// status.Code(err) gives the gRPC code.
type Error struct {
	Code    codes.Code
	Message string

	kind  error // the sentinel for Code
	cause error // the gRPC status error, and the context's error if it ended
}

func (e *Error) Error() string {
	if e.Message == "" {
		return e.kind.Error()
	}
	return e.kind.Error() + ": " + e.Message
}

// Unwrap returns the sentinel, the gRPC status error and, when the call's
// context ended, the context's error (so errors.Is(err,
// context.DeadlineExceeded) works).
func (e *Error) Unwrap() []error {
	errs := []error{e.kind}
	if e.cause != nil {
		errs = append(errs, e.cause)
	}
	return errs
}

// GRPCStatus lets status.FromError and status.Code read the agent's status.
func (e *Error) GRPCStatus() *status.Status { return status.New(e.Code, e.Message) }

func fromStatus(ctx context.Context, err error) *Error {
	st, _ := status.FromError(err)
	kind := ErrAgent
	switch st.Code() {
	case codes.InvalidArgument:
		kind = ErrInvalidArgument
	case codes.NotFound:
		kind = ErrNotFound
	case codes.PermissionDenied:
		kind = ErrPermissionDenied
	case codes.Unavailable:
		kind = ErrUnavailable
	}
	cause := err
	if ctxErr := ctx.Err(); ctxErr != nil {
		cause = errors.Join(err, ctxErr)
	}
	return &Error{Code: st.Code(), Message: st.Message(), kind: kind, cause: cause}
}

// Attempt is one socket path that was tried and why it did not work.
type Attempt struct {
	Candidate Candidate
	// Reason: "does not exist", "nothing is listening (connection
	// refused: ...)", "permission denied for uid N: ...", or the error.
	Reason string
	// Err is the underlying error (from lstat or connect).
	Err error
}

// UnreachableError says that no agent could be reached, and lists every
// path tried. It matches errors.Is(err, ErrUnreachable).
type UnreachableError struct {
	Attempts []Attempt
}

func (e *UnreachableError) Error() string {
	var b strings.Builder
	b.WriteString("cannot reach skykit-agent; tried:")
	for _, a := range e.Attempts {
		fmt.Fprintf(&b, "\n  %s (%s): %s", a.Candidate.Path, a.Candidate.NamedBy, a.Reason)
	}
	fmt.Fprintf(&b, "\nstart the agent (`skykit-agent serve`, or `systemctl start skykit-agent`), or name its socket with WithSocket or %s", EnvSocket)
	return b.String()
}

// Unwrap makes errors.Is(err, ErrUnreachable) and errors.Is(err, ErrAgent)
// true.
func (e *UnreachableError) Unwrap() error { return ErrUnreachable }
