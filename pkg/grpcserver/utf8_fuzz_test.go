package grpcserver

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// FuzzSanitizeUTF8: the lenient decoder never panics; in a message proto accepts it finds no bad
// field; and whenever it names a bad field, its output has none left.
func FuzzSanitizeUTF8(f *testing.F) {
	good, _ := proto.Marshal(&loraplexv1.GenerateStreamRequest{RequestId: "r", Prompt: &loraplexv1.GenerateStreamRequest_Text{Text: "héllo"},
		Stopping: &loraplexv1.StoppingCriteria{StopSequences: []string{"a", "b"}, StopTokenIds: []uint32{1, 2}}})
	f.Add(good)
	f.Add([]byte{0x1a, 0x02, 0xff, 0xfe})                   // text: invalid UTF-8
	f.Add([]byte{0x32, 0x04, 0x12, 0x02, 0xc3, 0x28})       // stopping.stop_sequences[0]: invalid
	f.Add([]byte{0x32, 0x05, 0x12, 0x02, 0xc3, 0x28, 0x01}) // truncated nested message
	md := (&loraplexv1.GenerateStreamRequest{}).ProtoReflect().Descriptor()
	f.Fuzz(func(t *testing.T, b []byte) {
		out, bad, ok := sanitizeUTF8(b, md, "", 0)
		valid := proto.Unmarshal(b, &loraplexv1.GenerateStreamRequest{}) == nil
		if valid && (!ok || bad != "") {
			t.Fatalf("a valid message: ok %v, bad %q", ok, bad)
		}
		if ok && bad != "" {
			if again, left, ok := sanitizeUTF8(out, md, "", 0); !ok || left != "" || !bytes.Equal(again, out) {
				t.Fatalf("sanitized output still has a bad field: ok %v, %q", ok, left)
			}
		}
	})
}
