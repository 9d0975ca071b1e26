package loraplexv1_test

import (
	"fmt"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// messageDiff lists how two messages' fields and oneofs differ: names, numbers, kinds, labels,
// presence, message and enum types, oneof membership and defaults. Empty: they are the same shape.
func messageDiff(a, b protoreflect.MessageDescriptor) []string {
	var diff []string
	fieldsOf := func(m protoreflect.MessageDescriptor) map[protoreflect.FieldNumber]protoreflect.FieldDescriptor {
		out := map[protoreflect.FieldNumber]protoreflect.FieldDescriptor{}
		for i := range m.Fields().Len() {
			out[m.Fields().Get(i).Number()] = m.Fields().Get(i)
		}
		return out
	}
	fa, fb := fieldsOf(a), fieldsOf(b)
	numbers := map[protoreflect.FieldNumber]bool{}
	for n := range fa {
		numbers[n] = true
	}
	for n := range fb {
		numbers[n] = true
	}
	sorted := make([]protoreflect.FieldNumber, 0, len(numbers))
	for n := range numbers {
		sorted = append(sorted, n)
	}
	slices.Sort(sorted)
	for _, n := range sorted {
		x, y := fa[n], fb[n]
		if x == nil || y == nil {
			only := a.Name()
			if x == nil {
				only = b.Name()
			}
			diff = append(diff, fmt.Sprintf("field %d: only in %s", n, only))
			continue
		}
		if sx, sy := fieldShape(x), fieldShape(y); sx != sy {
			diff = append(diff, fmt.Sprintf("field %d: %s vs %s", n, sx, sy))
		}
	}
	oneofsOf := func(m protoreflect.MessageDescriptor) []string {
		var out []string
		for i := range m.Oneofs().Len() {
			o := m.Oneofs().Get(i)
			s := fmt.Sprintf("%s synthetic=%v {", o.Name(), o.IsSynthetic())
			for j := range o.Fields().Len() {
				s += fmt.Sprintf(" %d", o.Fields().Get(j).Number())
			}
			out = append(out, s+" }")
		}
		return out
	}
	if oa, ob := oneofsOf(a), oneofsOf(b); !slices.Equal(oa, ob) {
		diff = append(diff, fmt.Sprintf("oneofs %v vs %v", oa, ob))
	}
	return diff
}

// fieldShape is everything about a field that a client sees, except the message it belongs to.
func fieldShape(f protoreflect.FieldDescriptor) string {
	s := fmt.Sprintf("%s json=%s %v %v presence=%v packed=%v", f.Name(), f.JSONName(), f.Cardinality(), f.Kind(), f.HasPresence(), f.IsPacked())
	switch {
	case f.Message() != nil:
		s += " " + string(f.Message().FullName())
	case f.Enum() != nil:
		s += " " + string(f.Enum().FullName())
	}
	if o := f.ContainingOneof(); o != nil {
		s += " oneof=" + string(o.Name())
	}
	if f.HasDefault() {
		s += fmt.Sprintf(" default=%v", f.Default())
	}
	return s
}

// TestGenerateMessagesAgree: GenerateRequest and GenerateStreamRequest repeat each other's fields
// (the API has one message per RPC); they must stay identical, or code that treats them alike
// (genreq.Request, the router's proxy) silently drops a field on one RPC.
func TestGenerateMessagesAgree(t *testing.T) {
	unary := (&loraplexv1.GenerateRequest{}).ProtoReflect().Descriptor()
	stream := (&loraplexv1.GenerateStreamRequest{}).ProtoReflect().Descriptor()
	if unary.Fields().Len() == 0 {
		t.Fatal("GenerateRequest has no fields")
	}
	for _, d := range messageDiff(unary, stream) {
		t.Errorf("GenerateRequest and GenerateStreamRequest differ: %s", d)
	}
}

// TestMessageDiffCatchesDrift edits GenerateStreamRequest in a copy of the file's descriptor, one
// way at a time, and expects messageDiff to report each edit: the check above can fail.
func TestMessageDiffCatchesDrift(t *testing.T) {
	base := protodesc.ToFileDescriptorProto(loraplexv1.File_loraplex_v1_generation_proto)
	field := func(fd *descriptorpb.FileDescriptorProto, name string) *descriptorpb.FieldDescriptorProto {
		for _, m := range fd.MessageType {
			if m.GetName() != "GenerateStreamRequest" {
				continue
			}
			for _, f := range m.Field {
				if f.GetName() == name {
					return f
				}
			}
		}
		t.Fatalf("no field %s", name)
		return nil
	}
	cases := []struct {
		name string
		edit func(fd *descriptorpb.FileDescriptorProto)
	}{
		{"renamed", func(fd *descriptorpb.FileDescriptorProto) {
			f := field(fd, "request_id")
			f.Name, f.JsonName = proto.String("id"), proto.String("id")
		}},
		{"renumbered", func(fd *descriptorpb.FileDescriptorProto) { field(fd, "output").Number = proto.Int32(900) }},
		{"retyped", func(fd *descriptorpb.FileDescriptorProto) {
			field(fd, "adapter_id").Type = descriptorpb.FieldDescriptorProto_TYPE_BYTES.Enum()
		}},
		{"repeated", func(fd *descriptorpb.FileDescriptorProto) {
			field(fd, "adapter_id").Label = descriptorpb.FieldDescriptorProto_LABEL_REPEATED.Enum()
		}},
		{"other message type", func(fd *descriptorpb.FileDescriptorProto) {
			field(fd, "stopping").TypeName = proto.String(".loraplex.v1.SamplingParams")
		}},
		{"out of the oneof", func(fd *descriptorpb.FileDescriptorProto) { field(fd, "text").OneofIndex = nil }},
		{"added", func(fd *descriptorpb.FileDescriptorProto) {
			for _, m := range fd.MessageType {
				if m.GetName() == "GenerateStreamRequest" {
					m.Field = append(m.Field, &descriptorpb.FieldDescriptorProto{
						Name: proto.String("extra"), JsonName: proto.String("extra"), Number: proto.Int32(901),
						Type: descriptorpb.FieldDescriptorProto_TYPE_BOOL.Enum(), Label: descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(),
					})
				}
			}
		}},
	}
	for _, c := range cases {
		fd := proto.Clone(base).(*descriptorpb.FileDescriptorProto)
		fd.Name = proto.String("drift/" + c.name + ".proto") // a file of its own, apart from the registered one
		c.edit(fd)
		file, err := protodesc.NewFile(fd, protoregistry.GlobalFiles)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		unary := file.Messages().ByName("GenerateRequest")
		stream := file.Messages().ByName("GenerateStreamRequest")
		if d := messageDiff(unary, stream); len(d) == 0 {
			t.Errorf("%s: no difference reported", c.name)
		}
	}
}
