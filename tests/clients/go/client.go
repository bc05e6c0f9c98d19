// Unmodified golang.org/x/oauth2/google and cloud.google.com/go/compute/metadata (Debian's
// golang-golang-x-oauth2-google-dev and golang-google-cloud-compute-metadata-dev), pointed at wlidd only
// through GCE_METADATA_HOST: run by tests/test_clients_go.py, built offline with
// GO111MODULE=off GOPATH=/usr/share/gocode.
//
//	client adc [SCOPE...]      {"project", "token_sha256", "token_type", "expires_in_s"}
//	                           google.FindDefaultCredentials(ctx, scopes...) and its TokenSource
//	client metadata            {"on_gce", "project", "numeric_project", "email", "scopes"}  compute/metadata
//	client id-token AUDIENCE   {"claims": {aud, exp, iss, email}}  the metadata identity endpoint, asked
//	                           as google.golang.org/api/idtoken asks it on GCE (metadata.Get, format=full)
//
// One JSON line on stdout; on failure {"error": "..."} and exit status 1. Tokens are never printed: an
// access token as its SHA-256, an ID token as its decoded claims (tests/conftest.py checks the output).
package main

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"cloud.google.com/go/compute/metadata"
	"golang.org/x/oauth2/google"
)

func adc(scopes []string) (map[string]interface{}, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	creds, err := google.FindDefaultCredentials(ctx, scopes...)
	if err != nil {
		return nil, err
	}
	token, err := creds.TokenSource.Token()
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(token.AccessToken))
	return map[string]interface{}{
		"project":      creds.ProjectID,
		"token_sha256": hex.EncodeToString(sum[:]),
		"token_type":   token.Type(),
		"expires_in_s": int(time.Until(token.Expiry).Seconds()),
	}, nil
}

func info() (map[string]interface{}, error) {
	project, err := metadata.ProjectID()
	if err != nil {
		return nil, err
	}
	numeric, err := metadata.NumericProjectID()
	if err != nil {
		return nil, err
	}
	email, err := metadata.Email("")
	if err != nil {
		return nil, err
	}
	scopes, err := metadata.Scopes("")
	if err != nil {
		return nil, err
	}
	return map[string]interface{}{
		"on_gce": metadata.OnGCE(), "project": project, "numeric_project": numeric, "email": email, "scopes": scopes,
	}, nil
}

func idToken(audience string) (map[string]interface{}, error) {
	v := url.Values{}
	v.Set("audience", audience)
	v.Set("format", "full")
	jwt, err := metadata.Get("instance/service-accounts/default/identity?" + v.Encode())
	if err != nil {
		return nil, err
	}
	parts := strings.Split(strings.TrimSpace(jwt), ".")
	if len(parts) != 3 {
		return nil, errors.New("the identity endpoint did not answer a JWT")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, fmt.Errorf("the ID token's payload: %v", err)
	}
	var claims struct {
		Aud   string `json:"aud"`
		Exp   int64  `json:"exp"`
		Iss   string `json:"iss"`
		Email string `json:"email"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return nil, fmt.Errorf("the ID token's claims: %v", err)
	}
	return map[string]interface{}{"claims": claims}, nil
}

func main() {
	var result map[string]interface{}
	err := errors.New("usage: client adc [SCOPE...] | metadata | id-token AUDIENCE")
	switch {
	case len(os.Args) >= 2 && os.Args[1] == "adc":
		result, err = adc(os.Args[2:])
	case len(os.Args) == 2 && os.Args[1] == "metadata":
		result, err = info()
	case len(os.Args) == 3 && os.Args[1] == "id-token":
		result, err = idToken(os.Args[2])
	}
	if err != nil {
		message := err.Error()
		if len(message) > 1500 {
			message = message[:1500]
		}
		result = map[string]interface{}{"error": message}
		defer os.Exit(1)
	}
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
}
