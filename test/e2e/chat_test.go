package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/demomodel/demomodeltest"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

func chatRequest(msgs ...*loraplexv1.ChatMessage) *loraplexv1.GenerateRequest {
	return &loraplexv1.GenerateRequest{
		Prompt:   &loraplexv1.GenerateRequest_Chat{Chat: &loraplexv1.ChatMessages{Messages: msgs}},
		Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 48},
	}
}

func turn(role, content string) *loraplexv1.ChatMessage {
	return &loraplexv1.ChatMessage{Role: role, Content: content}
}

// TestChatDemoModel: a chat request to the demo model, through the router and straight to a shard,
// unary and streamed, is rendered by the model's chat template into the echo prompt: it answers
// the last user message exactly as the text prompt "<input> =>" does, with the same prompt tokens
// (one BOS). Without the generation prompt the prompt lacks " =>". Bad roles and a conversation
// the template refuses answer INVALID_ARGUMENT naming the field or carrying the template's message.
func TestChatDemoModel(t *testing.T) {
	checkLeaks(t)
	modelDir, adapterDir, err := demomodel.Extract(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.Load(filepath.Join(modelDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	held, err := demomodeltest.LoadHeldOut()
	if err != nil {
		t.Fatal(err)
	}
	x := extracted{modelDir: modelDir, adapterDir: adapterDir, tok: tok}
	c := startCluster(t, x, clusterOptions{shards: 1})
	input, want := held.Inputs[0], held.Expected["echo"][0]
	ctx := context.Background()
	for _, tg := range []target{c.routerTarget(t), c.shardTarget(t, 0)} {
		text, err := generate(ctx, tg.cl, greedyRequest("", "", demomodel.Prompt(input), 48))
		if err != nil {
			t.Fatalf("%s: text prompt: %v", tg.name, err)
		}
		req := chatRequest(turn("system", "You echo."), turn("user", "something else"), turn("assistant", "something else"), turn("user", input))
		chat, err := generate(ctx, tg.cl, req)
		if err != nil {
			t.Fatalf("%s: chat: %v", tg.name, err)
		}
		if strings.TrimSpace(chat.text) != want || chat.text != text.text {
			t.Errorf("%s: chat answered %q, text prompt %q, want the echo %q", tg.name, chat.text, text.text, want)
		}
		if chat.usage.GetPromptTokens() != text.usage.GetPromptTokens() || int(chat.usage.GetPromptTokens()) != x.promptTokens(t, demomodel.Prompt(input)) {
			t.Errorf("%s: chat prompt of %d tokens, text prompt %d, want %d", tg.name, chat.usage.GetPromptTokens(),
				text.usage.GetPromptTokens(), x.promptTokens(t, demomodel.Prompt(input)))
		}
		stream, err := generateStream(ctx, tg.cl, &loraplexv1.GenerateStreamRequest{
			Prompt:   &loraplexv1.GenerateStreamRequest_Chat{Chat: req.GetChat()},
			Stopping: req.GetStopping(),
		})
		if err != nil || stream.text != chat.text {
			t.Errorf("%s: streamed chat %q, %v; unary %q", tg.name, stream.text, err, chat.text)
		}

		noPrompt := chatRequest(turn("user", input))
		noPrompt.GetChat().AddGenerationPrompt = proto.Bool(false)
		res, err := generate(ctx, tg.cl, noPrompt)
		if err != nil || int(res.usage.GetPromptTokens()) != x.promptTokens(t, input) {
			t.Errorf("%s: without the generation prompt: %d prompt tokens, %v; want %d", tg.name, res.usage.GetPromptTokens(), err, x.promptTokens(t, input))
		}

		for _, bad := range []struct {
			name string
			req  *loraplexv1.GenerateRequest
			has  []string
		}{
			{"tool role", chatRequest(turn("user", "a"), turn("tool", "{}")), []string{"chat.messages[1].role", `"tool"`}},
			{"no messages", chatRequest(), []string{"chat.messages", "empty"}},
			{"template refuses", chatRequest(turn("system", "only a system message")), []string{"the demo model answers the last user message"}},
		} {
			_, err := generate(ctx, tg.cl, bad.req)
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("%s: %s: %v, want InvalidArgument", tg.name, bad.name, err)
				continue
			}
			for _, h := range bad.has {
				if !strings.Contains(status.Convert(err).Message(), h) {
					t.Errorf("%s: %s: %q does not mention %q", tg.name, bad.name, status.Convert(err).Message(), h)
				}
			}
		}
	}
}

// TestChatWithoutTemplate: a model without a chat template (the tiny Llama) answers a chat request
// with INVALID_ARGUMENT that says so, and still serves text.
func TestChatWithoutTemplate(t *testing.T) {
	checkLeaks(t)
	c := startCluster(t, extract(t), clusterOptions{shards: 1})
	for _, tg := range []target{c.routerTarget(t), c.shardTarget(t, 0)} {
		_, err := generate(context.Background(), tg.cl, chatRequest(turn("user", "hi")))
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "no chat template") {
			t.Errorf("%s: %v, want InvalidArgument saying the model has no chat template", tg.name, err)
		}
		if _, err := generate(context.Background(), tg.cl, greedyRequest("", "", "hello", 2)); err != nil {
			t.Errorf("%s: text after a refused chat: %v", tg.name, err)
		}
	}
}
