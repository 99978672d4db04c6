package skykitagent_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
	"time"

	skykitagent "github.com/skykit/skykit-agent/clients/go"
)

// Calling the Skykit API: the Transport adds the Bearer token.
func ExampleTransport() {
	client, err := skykitagent.New() // socket discovery: $SKYKIT_AGENT_SOCKET, $XDG_RUNTIME_DIR, /run
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	httpClient := &http.Client{Transport: &skykitagent.Transport{Client: client}}
	resp, err := httpClient.Get("https://api.skykit.com/v1/...")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
}

// Getting the token itself, and telling the errors apart.
func ExampleClient_Token() {
	client, err := skykitagent.New(skykitagent.WithSocket("/run/skykit-agent/agent.sock"))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	tok, err := client.Token(context.Background(),
		skykitagent.WithLifetime(10*time.Minute), skykitagent.WithMinValidFor(time.Minute))
	var unreachable *skykitagent.UnreachableError
	switch {
	case errors.As(err, &unreachable):
		log.Fatal(unreachable) // lists each socket tried and why
	case errors.Is(err, skykitagent.ErrInvalidArgument), errors.Is(err, skykitagent.ErrNotFound):
		log.Fatal(err) // the agent's message
	case err != nil:
		log.Fatal(err)
	}
	fmt.Println("Authorization: Bearer " + tok.Token)
}
