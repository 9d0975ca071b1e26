package adaptersource

import (
	"cmp"
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"net"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"

	"github.com/loraplex/loraplex/pkg/peft"
)

// S3Options configure an S3-compatible source. Anything left empty comes from the standard AWS
// configuration chain: AWS_REGION, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and
// AWS_SECRET_ACCESS_KEY, the shared config and credentials files (AWS_PROFILE), web identity
// (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, as Kubernetes service accounts get them), and the
// instance role.
type S3Options struct {
	// Endpoint is the store's URL (MinIO, Ceph, GCS's S3 interface); "": the chain's, or AWS.
	Endpoint string
	// Region signs requests; "": the chain's, else us-east-1.
	Region string
	// PathStyle addresses buckets as <endpoint>/<bucket> instead of <bucket>.<endpoint>, as most
	// S3-compatible stores want.
	PathStyle bool
	// Credentials replace the chain's (tests); nil: the chain.
	Credentials aws.CredentialsProvider
}

// AddFlags registers the S3 flags.
func (o *S3Options) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.Endpoint, "s3-endpoint", o.Endpoint, "S3 endpoint URL for an s3:// -adapters source (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)")
	fs.StringVar(&o.Region, "s3-region", o.Region, "S3 region (default: $AWS_REGION or the shared config, else us-east-1)")
	fs.BoolVar(&o.PathStyle, "s3-path-style", o.PathStyle, "address buckets by path (<endpoint>/<bucket>), as MinIO, Ceph and most S3-compatible stores want")
}

// S3 is a source in an S3-compatible bucket: adapter X's files are <prefix>/X/<file>.
type S3 struct {
	client *s3.Client
	bucket string
	prefix string // "" or "p/" (with the slash)
}

var _ Source = (*S3)(nil)

// OpenS3 makes a source for bucket/prefix. It reads the configuration chain but does not contact
// the store (credentials are resolved at the first request).
func OpenS3(ctx context.Context, bucket, prefix string, o S3Options) (*S3, error) {
	var load []func(*config.LoadOptions) error
	if o.Region != "" {
		load = append(load, config.WithRegion(o.Region))
	}
	if o.Credentials != nil {
		load = append(load, config.WithCredentialsProvider(o.Credentials))
	}
	cfg, err := config.LoadDefaultConfig(ctx, load...)
	if err != nil {
		return nil, fmt.Errorf("adapter source s3://%s: AWS configuration: %w", bucket, err)
	}
	cfg.Credentials = chainCredentials{cfg.Credentials}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	client := s3.NewFromConfig(cfg, func(so *s3.Options) {
		if o.Endpoint != "" {
			so.BaseEndpoint = aws.String(o.Endpoint)
		}
		so.UsePathStyle = o.PathStyle
		// The disk tier retries with its own backoff and deadline; retries here would multiply them.
		so.Retryer = aws.NopRetryer{}
		// Integrity is checked against the stated length and MD5 ETag; S3-compatible stores often
		// send no flexible checksums, which the SDK would otherwise log about on every read.
		so.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		so.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
	})
	p := strings.Trim(prefix, "/")
	if p != "" {
		p += "/"
	}
	return &S3{client: client, bucket: bucket, prefix: p}, nil
}

func (s *S3) String() string { return "s3://" + s.bucket + "/" + s.prefix }

// Client is the S3 client (tests upload with it).
func (s *S3) Client() *s3.Client { return s.client }

// Key is the object key of an adapter's file.
func (s *S3) Key(id, name string) string { return s.prefix + id + "/" + name }

// Stat states the adapter's current version from HEAD requests; no file body is read.
func (s *S3) Stat(ctx context.Context, id string) (Version, error) {
	if err := peft.ValidateID(id); err != nil {
		return Version{}, err
	}
	v := Version{ID: id}
	var missing []string
	for _, name := range Files {
		out, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &s.bucket, Key: aws.String(s.Key(id, name))})
		if err != nil {
			err = s.classify(err, s.Key(id, name))
			if errors.Is(err, peft.ErrNotFound) {
				missing = append(missing, name)
				continue
			}
			return Version{}, err
		}
		f := File{Name: name, Size: aws.ToInt64(out.ContentLength), Tag: strings.Trim(aws.ToString(out.ETag), `"`)}
		v.Files = append(v.Files, f)
		if t := aws.ToTime(out.LastModified); t.After(v.Modified) {
			v.Modified = t
		}
	}
	switch {
	case len(missing) == len(Files):
		if s.exists(ctx, id, "adapter_model.bin") {
			return Version{}, fmt.Errorf("%w: adapter %q in %s has only adapter_model.bin; only safetensors weights are supported (pickle files are never loaded)",
				peft.ErrUnsupported, id, s)
		}
		return Version{}, fmt.Errorf("%w: adapter_id %q in %s", peft.ErrNotFound, id, s)
	case len(missing) > 0 && missing[0] == peft.WeightsFileName && s.exists(ctx, id, "adapter_model.bin"):
		return Version{}, fmt.Errorf("%w: adapter %q in %s has only adapter_model.bin; only safetensors weights are supported (pickle files are never loaded)",
			peft.ErrUnsupported, id, s)
	case len(missing) > 0:
		return Version{}, fmt.Errorf("%w: adapter %q in %s: missing %s", peft.ErrInvalidAdapter, id, s, strings.Join(missing, ", "))
	}
	v.Version = versionOf(v.Files)
	return v, nil
}

func (s *S3) exists(ctx context.Context, id, name string) bool {
	_, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &s.bucket, Key: aws.String(s.Key(id, name))})
	return err == nil
}

// Open reads one file of version v: the request carries the stated ETag (If-Match), so a changed
// object is ErrChanged rather than another version's bytes, and the body is checked against the
// stated length and, for single-part uploads, the ETag's MD5.
func (s *S3) Open(ctx context.Context, v Version, f File) (io.ReadCloser, error) {
	key := s.Key(v.ID, f.Name)
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.bucket, Key: &key, IfMatch: aws.String(`"` + f.Tag + `"`)})
	if err != nil {
		return nil, s.classify(err, key)
	}
	if n := aws.ToInt64(out.ContentLength); n != f.Size {
		out.Body.Close()
		return nil, fmt.Errorf("%w: s3://%s/%s is %d bytes, stated %d", ErrChanged, s.bucket, key, n, f.Size)
	}
	r := &checkedBody{s: s, key: key, body: out.Body, want: f.Size}
	if len(f.Tag) == 32 && !strings.Contains(f.Tag, "-") {
		r.md5, r.tag = md5.New(), f.Tag
	}
	return r, nil
}

// checkedBody reads exactly want bytes and fails a short or corrupt transfer.
type checkedBody struct {
	s    *S3
	key  string
	body io.ReadCloser
	want int64
	n    int64
	md5  hash.Hash
	tag  string
}

func (c *checkedBody) Read(p []byte) (int, error) {
	if rest := c.want - c.n; int64(len(p)) > rest+1 {
		p = p[:rest+1] // one byte past the stated length is enough to see an overlong body
	}
	n, err := c.body.Read(p)
	c.n += int64(n)
	if c.md5 != nil {
		c.md5.Write(p[:n])
	}
	switch {
	case c.n > c.want:
		return n, fmt.Errorf("%w: s3://%s/%s sent more than its stated %d bytes", ErrCorrupt, c.s.bucket, c.key, c.want)
	case err == io.EOF && c.n < c.want:
		return n, fmt.Errorf("%w: s3://%s/%s: the transfer broke off after %d of %d bytes", ErrUnavailable, c.s.bucket, c.key, c.n, c.want)
	case err == io.EOF && c.md5 != nil && hex.EncodeToString(c.md5.Sum(nil)) != c.tag:
		return n, fmt.Errorf("%w: s3://%s/%s: its MD5 differs from its ETag", ErrCorrupt, c.s.bucket, c.key)
	case err != nil && err != io.EOF:
		return n, c.s.classify(err, c.key)
	}
	return n, err
}

func (c *checkedBody) Close() error { return c.body.Close() }

// List returns up to limit adapter ids after the given one, in the order of their keys (id + "/").
func (s *S3) List(ctx context.Context, after string, limit int) ([]string, error) {
	var ids []string
	in := &s3.ListObjectsV2Input{Bucket: &s.bucket, Prefix: aws.String(s.prefix), Delimiter: aws.String("/")}
	if after != "" {
		// Past every key of after's folder ("\U0010FFFF" sorts after any file name).
		in.StartAfter = aws.String(s.prefix + after + "/\U0010FFFF")
	}
	if limit > 0 {
		in.MaxKeys = aws.Int32(int32(min(limit, 1000)))
	}
	p := s3.NewListObjectsV2Paginator(s.client, in)
	for p.HasMorePages() && (limit <= 0 || len(ids) < limit) {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, s.classify(err, s.prefix)
		}
		for _, cp := range page.CommonPrefixes {
			id := strings.TrimSuffix(strings.TrimPrefix(aws.ToString(cp.Prefix), s.prefix), "/")
			if peft.ValidateID(id) == nil && (limit <= 0 || len(ids) < limit) {
				ids = append(ids, id)
			}
		}
	}
	return ids, nil
}

// classify turns an SDK error into this package's sentinels with a message that names the object
// and what failed, never a credential.
func (s *S3) classify(err error, key string) error {
	where := "s3://" + s.bucket + "/" + key
	var se *v4.SigningError
	var nc noCredentials
	if errors.As(err, &se) || errors.As(err, &nc) {
		return fmt.Errorf("%w for %s: none in the AWS configuration chain (environment, shared config, web identity, instance role)", ErrNoCredentials, where)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %s: timed out: %w", ErrUnavailable, where, context.DeadlineExceeded)
	}
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("%s: %w", where, context.Canceled)
	}
	code := ""
	var ae smithy.APIError
	if errors.As(err, &ae) {
		code = ae.ErrorCode()
	}
	var re *awshttp.ResponseError
	if errors.As(err, &re) && re.HTTPStatusCode() != 0 { // 0: the request never got an answer
		status := re.HTTPStatusCode()
		what := fmt.Sprintf("HTTP %d %s", status, code)
		switch {
		case status == 404 || code == "NoSuchKey" || code == "NoSuchBucket":
			return fmt.Errorf("%w: %s (%s)", peft.ErrNotFound, where, what)
		case status == 401 || status == 403:
			return fmt.Errorf("%w: %s (%s: check the shard's credentials and the bucket policy)", ErrAccessDenied, where, what)
		case status == 412:
			return fmt.Errorf("%w: %s (%s)", ErrChanged, where, what)
		case status >= 500 || status == 429:
			return fmt.Errorf("%w: %s (%s)", ErrUnavailable, where, what)
		}
		return fmt.Errorf("adapter store: %s: %s", where, what)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w: %s: timed out", ErrUnavailable, where)
	}
	// Connection refused or reset, DNS, a broken body: the store is out of reach. The net error's
	// text names the endpoint and the syscall, nothing secret.
	var oe *net.OpError
	if errors.As(err, &oe) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %s: %s", ErrUnavailable, where, cmp.Or(opText(oe), "connection closed"))
	}
	return fmt.Errorf("%w: %s: %s", ErrUnavailable, where, err.Error())
}

func opText(oe *net.OpError) string {
	if oe == nil {
		return ""
	}
	return oe.Error()
}

// chainCredentials marks the chain's failure to produce credentials, which the SDK reports only as
// text, so classify can say "no credentials".
type chainCredentials struct{ p aws.CredentialsProvider }

type noCredentials struct{ err error }

func (e noCredentials) Error() string { return e.err.Error() }
func (e noCredentials) Unwrap() error { return e.err }

func (c chainCredentials) Retrieve(ctx context.Context) (aws.Credentials, error) {
	if c.p == nil {
		return aws.Credentials{}, noCredentials{errors.New("no credentials provider")}
	}
	cr, err := c.p.Retrieve(ctx)
	if err != nil && ctx.Err() == nil {
		return cr, noCredentials{err}
	}
	return cr, err
}

// Retryable reports whether another attempt may succeed (the store was out of reach, or the
// bytes broke off or arrived corrupt).
func Retryable(err error) bool {
	return errors.Is(err, ErrUnavailable) || errors.Is(err, ErrCorrupt)
}
