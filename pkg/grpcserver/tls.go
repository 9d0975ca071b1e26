package grpcserver

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// TLSOptions name the files of a server's TLS (and mTLS, with ClientCAFile) configuration.
type TLSOptions struct {
	CertFile, KeyFile string
	// ClientCAFile, when set, makes client certificates signed by it mandatory (mTLS).
	ClientCAFile string
}

// AddFlags registers the server TLS flags.
func (o *TLSOptions) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.CertFile, "tls-cert", o.CertFile, "server certificate (PEM); enables TLS")
	fs.StringVar(&o.KeyFile, "tls-key", o.KeyFile, "server private key (PEM)")
	fs.StringVar(&o.ClientCAFile, "tls-client-ca", o.ClientCAFile, "CA bundle that client certificates must chain to (enables mTLS)")
}

// ServerOption returns the credentials option, or nil when TLS is off.
func (o TLSOptions) ServerOption() (grpc.ServerOption, error) {
	if o.CertFile == "" && o.KeyFile == "" {
		if o.ClientCAFile != "" {
			return nil, errors.New("grpcserver: -tls-client-ca needs -tls-cert and -tls-key")
		}
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("grpcserver: TLS key pair: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if o.ClientCAFile != "" {
		pool, err := loadPool(o.ClientCAFile)
		if err != nil {
			return nil, err
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return grpc.Creds(credentials.NewTLS(cfg)), nil
}

// ClientTLSOptions configure how a binary dials others (the router dialing shards).
type ClientTLSOptions struct {
	CAFile             string
	CertFile, KeyFile  string // client certificate for mTLS
	ServerNameOverride string
}

// AddFlags registers the client TLS flags under prefix (e.g. "shard-").
func (o *ClientTLSOptions) AddFlags(fs *flag.FlagSet, prefix string) {
	fs.StringVar(&o.CAFile, prefix+"tls-ca", o.CAFile, "CA bundle to verify the peers' certificates; enables TLS")
	fs.StringVar(&o.CertFile, prefix+"tls-cert", o.CertFile, "client certificate presented to peers (mTLS)")
	fs.StringVar(&o.KeyFile, prefix+"tls-key", o.KeyFile, "client private key")
	fs.StringVar(&o.ServerNameOverride, prefix+"tls-server-name", o.ServerNameOverride, "expected server name in peers' certificates")
}

// DialOption returns transport credentials: TLS when a CA is set, otherwise plaintext.
func (o ClientTLSOptions) DialOption() (grpc.DialOption, error) {
	if o.CAFile == "" {
		if o.CertFile != "" {
			return nil, errors.New("grpcserver: a client certificate needs a CA (tls-ca) to verify peers")
		}
		return grpc.WithTransportCredentials(insecure.NewCredentials()), nil
	}
	pool, err := loadPool(o.CAFile)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{RootCAs: pool, ServerName: o.ServerNameOverride, MinVersion: tls.VersionTLS12}
	if o.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("grpcserver: client key pair: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(cfg)), nil
}

func loadPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("grpcserver: CA bundle: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("grpcserver: no certificate in %s", file)
	}
	return pool, nil
}
