package grpcserver

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// grpc-go turns every codec Unmarshal error into INTERNAL, so a client sending a string field that is
// not UTF-8 (which proto3 forbids) would be answered with a server fault and logged as one. The
// server's codec instead decodes such a request leniently (the invalid bytes replaced) and notes the
// first bad field; the interceptors then answer INVALID_ARGUMENT naming it before any handler runs.

// utf8Codec is the server codec: the proto codec, plus the lenient retry above.
type utf8Codec struct {
	base encoding.CodecV2
	// bad maps a decoded request message (its pointer) to the path of its first non-UTF-8 field,
	// until the interceptor reads it. Entries live from the codec's Unmarshal to the interceptor,
	// which runs on every method of this server.
	bad sync.Map
}

func newUTF8Codec() *utf8Codec { return &utf8Codec{base: encoding.GetCodecV2(protocodec.Name)} }

func (c *utf8Codec) Name() string { return c.base.Name() }

func (c *utf8Codec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }

func (c *utf8Codec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.base.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	m, ok := v.(proto.Message)
	if !ok {
		return err
	}
	fixed, path, ok := sanitizeUTF8(data.Materialize(), m.ProtoReflect().Descriptor(), "", 0)
	if !ok || path == "" {
		return err // malformed for another reason: grpc-go's answer stands
	}
	if perr := proto.Unmarshal(fixed, m); perr != nil {
		return err
	}
	c.bad.Store(m, path)
	return nil
}

// check reports the bad field recorded for req, once.
func (c *utf8Codec) check(req any) error {
	if path, ok := c.bad.LoadAndDelete(req); ok {
		return status.Errorf(codes.InvalidArgument, "field %s is not valid UTF-8", path)
	}
	return nil
}

func (c *utf8Codec) unary() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if err := c.check(req); err != nil {
			return nil, err
		}
		return h(ctx, req)
	}
}

func (c *utf8Codec) stream() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		return h(srv, &utf8Stream{ServerStream: ss, c: c})
	}
}

type utf8Stream struct {
	grpc.ServerStream
	c *utf8Codec
}

func (s *utf8Stream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return s.c.check(m)
}

// maxNesting bounds the message nesting the lenient decoder walks (protobuf-go's default limit).
const maxNesting = 10000

// sanitizeUTF8 rewrites the wire-format message b of type md with every string field made valid
// UTF-8 (invalid bytes become U+FFFD) and returns the path of the first field it changed ("" when
// none), as "stopping.stop_sequences[1]". ok is false when b is not well-formed or nests messages
// deeper than maxNesting (proto's own decoder refuses deeper ones too).
func sanitizeUTF8(b []byte, md protoreflect.MessageDescriptor, prefix string, depth int) (out []byte, first string, ok bool) {
	if depth > maxNesting {
		return nil, "", false
	}
	out = make([]byte, 0, len(b))
	seen := map[protowire.Number]int{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, "", false
		}
		fd := md.Fields().ByNumber(num)
		if typ != protowire.BytesType || fd == nil || (fd.Kind() != protoreflect.StringKind && fd.Kind() != protoreflect.MessageKind) {
			m := protowire.ConsumeFieldValue(num, typ, b[n:])
			if m < 0 {
				return nil, "", false
			}
			out = append(out, b[:n+m]...)
			b = b[n+m:]
			continue
		}
		v, m := protowire.ConsumeBytes(b[n:])
		if m < 0 {
			return nil, "", false
		}
		b = b[n+m:]
		name := prefix + string(fd.Name())
		if fd.IsList() || fd.IsMap() {
			name = fmt.Sprintf("%s[%d]", name, seen[num])
			seen[num]++
		}
		out = protowire.AppendTag(out, num, typ)
		if fd.Kind() == protoreflect.MessageKind {
			sub, bad, ok := sanitizeUTF8(v, fd.Message(), name+".", depth+1)
			if !ok {
				return nil, "", false
			}
			if first == "" {
				first = bad
			}
			out = protowire.AppendBytes(out, sub)
			continue
		}
		if !utf8.Valid(v) {
			if first == "" {
				first = name
			}
			v = []byte(strings.ToValidUTF8(string(v), "\uFFFD"))
		}
		out = protowire.AppendBytes(out, v)
	}
	return out, first, true
}
