package grpcserver_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/loraplex/loraplex/pkg/grpcserver"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// generation echoes the request's text, unary and as a one-message stream.
type generation struct {
	loraplexv1.UnimplementedGenerationServiceServer
}

func (generation) Generate(_ context.Context, r *loraplexv1.GenerateRequest) (*loraplexv1.GenerateResponse, error) {
	return &loraplexv1.GenerateResponse{Text: r.GetText()}, nil
}

func (generation) GenerateStream(r *loraplexv1.GenerateStreamRequest, st loraplexv1.GenerationService_GenerateStreamServer) error {
	return st.Send(&loraplexv1.GenerateStreamResponse{Tokens: []*loraplexv1.Token{{Text: r.GetText()}}})
}

// rawCodec sends pre-encoded wire bytes (a Go client refuses to marshal invalid UTF-8) and decodes
// answers as usual.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	return proto.Unmarshal(data.Materialize(), v.(proto.Message))
}

// wire builds a message from (field number, string or nested message bytes) pairs.
func wire(fields ...any) []byte {
	var b []byte
	for i := 0; i < len(fields); i += 2 {
		b = protowire.AppendTag(b, protowire.Number(fields[i].(int)), protowire.BytesType)
		switch v := fields[i+1].(type) {
		case string:
			b = protowire.AppendString(b, v)
		case []byte:
			b = protowire.AppendBytes(b, v)
		}
	}
	return b
}

// TestInvalidUTF8 sends requests whose string fields are not UTF-8, over real gRPC, unary and
// streaming: each is answered INVALID_ARGUMENT naming the field (grpc-go alone answers INTERNAL),
// valid requests still pass, and nothing is logged at error level.
func TestInvalidUTF8(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	o := grpcserver.DefaultOptions()
	w := grpcserver.Wiring{Log: zap.New(core), AdminMethods: []string{loraplexv1.AdaptersService_LoadAdapter_FullMethodName}}
	s, _, err := grpcserver.New(o, w)
	if err != nil {
		t.Fatal(err)
	}
	loraplexv1.RegisterAdaptersServiceServer(s, adapters{})
	loraplexv1.RegisterGenerationServiceServer(s, generation{})
	conn := dial(t, listen(t, s), plain(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	unary := func(method string, req []byte, resp proto.Message) error {
		return conn.Invoke(ctx, method, &req, resp, grpc.ForceCodecV2(rawCodec{}))
	}
	stream := func(req []byte) (string, error) {
		st, err := conn.NewStream(ctx, &loraplexv1.GenerationService_ServiceDesc.Streams[0],
			loraplexv1.GenerationService_GenerateStream_FullMethodName, grpc.ForceCodecV2(rawCodec{}))
		if err != nil {
			return "", err
		}
		if err := st.SendMsg(&req); err != nil {
			return "", err
		}
		if err := st.CloseSend(); err != nil {
			return "", err
		}
		var r loraplexv1.GenerateStreamResponse
		if err := st.RecvMsg(&r); err != nil {
			return "", err
		}
		return r.GetTokens()[0].GetText(), nil
	}
	stopping := func(seqs ...string) []byte {
		var f []any
		for _, s := range seqs {
			f = append(f, 2, s)
		}
		return wire(f...)
	}
	for _, c := range []struct {
		name, field string // field "": a valid request, answered OK
		call        func() error
	}{
		{"unary admin", "adapter_id", func() error {
			return unary(loraplexv1.AdaptersService_LoadAdapter_FullMethodName, wire(1, "bad\xff"), &loraplexv1.LoadAdapterResponse{})
		}},
		{"unary text", "text", func() error {
			return unary(loraplexv1.GenerationService_Generate_FullMethodName, wire(1, "id", 3, "a\xc3("), &loraplexv1.GenerateResponse{})
		}},
		{"unary valid", "", func() error {
			return unary(loraplexv1.GenerationService_Generate_FullMethodName, wire(1, "id", 3, "héllo"), &loraplexv1.GenerateResponse{})
		}},
		{"stream text", "text", func() error { _, err := stream(wire(3, "\xfe")); return err }},
		{"stream nested repeated", "stopping.stop_sequences[1]", func() error {
			_, err := stream(wire(3, "ok", 6, stopping("fine", "\xed\xa0\x80", "\xff")))
			return err
		}},
		{"stream valid", "", func() error {
			got, err := stream(wire(3, "héllo", 6, stopping("a", "b")))
			if err == nil && got != "héllo" {
				t.Errorf("stream valid: echoed %q", got)
			}
			return err
		}},
	} {
		err := c.call()
		if c.field == "" {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
			continue
		}
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), c.field+" ") {
			t.Errorf("%s: %v, want INVALID_ARGUMENT naming %s", c.name, err, c.field)
		}
	}
	if n := logs.FilterLevelExact(zapcore.ErrorLevel).Len(); n != 0 {
		t.Errorf("%d error-level log lines for bad client input: %v", n, logs.FilterLevelExact(zapcore.ErrorLevel).All())
	}
}
