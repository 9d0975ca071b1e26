package chattemplate

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/loraplex/loraplex/pkg/demomodel"
	"github.com/loraplex/loraplex/pkg/tokenizer"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// demoModelDir is the demo model's folder in the repository (its template is one of the styles).
const demoModelDir = "../demomodel/model"

// folder writes a model folder holding the given files (name to content).
func folder(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestLoad: where the template comes from, as transformers reads a folder, and what is refused.
func TestLoad(t *testing.T) {
	user := []Message{{Role: "user", Content: "x"}}
	cases := []struct {
		name    string
		files   map[string]string
		want    string // the render of one user message "x"; "" with wantErr
		wantErr error  // from Load, or else from Render
		errHas  string
	}{
		{"config string", map[string]string{ConfigFile: `{"chat_template": "C{{ messages[0].content }}"}`}, "Cx", nil, ""},
		{"jinja file beats the config", map[string]string{
			ConfigFile: `{"chat_template": "C{{ messages[0].content }}"}`, JinjaFile: "F{{ messages[0].content }}",
		}, "Fx", nil, ""},
		{"jinja file without a config", map[string]string{JinjaFile: "F{{ bos_token is defined }}"}, "FFalse", nil, ""},
		{"list form takes default", map[string]string{ConfigFile: `{"chat_template": [
			{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages[0].content }}"}]}`}, "Dx", nil, ""},
		{"special tokens, string and AddedToken forms", map[string]string{ConfigFile: `{
			"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}, "pad_token": null, "add_bos_token": true,
			"chat_template": "{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ add_bos_token is defined }}"}`},
			"<s>|</s>|False|False", nil, ""},
		{"no template", map[string]string{ConfigFile: `{"bos_token": "<s>"}`}, "", ErrNoTemplate, "no chat_template.jinja and no chat_template"},
		{"null template", map[string]string{ConfigFile: `{"chat_template": null}`}, "", ErrNoTemplate, "no chat_template"},
		{"empty folder", nil, "", ErrNoTemplate, "no chat_template"},
		{"list without default", map[string]string{ConfigFile: `{"chat_template": [{"name": "tool_use", "template": "T"}]}`},
			"", ErrNoTemplate, `"tool_use"`},
		{"config not JSON", map[string]string{ConfigFile: `{"chat_template": `}, "", ErrInvalid, ConfigFile},
		{"template of another type", map[string]string{ConfigFile: `{"chat_template": 7}`}, "", ErrInvalid, "neither a string"},
		{"template does not compile", map[string]string{JinjaFile: "{% for m in messages %}no end"}, "", ErrInvalid, JinjaFile},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tmpl, err := Load(folder(t, c.files))
			if err == nil {
				var got string
				got, err = tmpl.Render(user, true)
				if err == nil && got != c.want {
					t.Errorf("rendered %q, want %q", got, c.want)
				}
			}
			switch {
			case c.wantErr == nil && err != nil:
				t.Errorf("unexpected error %v", err)
			case c.wantErr != nil && (!errors.Is(err, c.wantErr) || !strings.Contains(err.Error(), c.errHas)):
				t.Errorf("error %v, want %v mentioning %q", err, c.wantErr, c.errHas)
			}
		})
	}
}

// TestRenderErrors: a refusal carries the template's message; other failures are ErrRender; a
// Template that was never loaded has no template.
func TestRenderErrors(t *testing.T) {
	compile := func(src string) *Template {
		tmpl, err := New(src, nil)
		if err != nil {
			t.Fatal(err)
		}
		return tmpl
	}
	msgs := []Message{{Role: "assistant", Content: "hi"}}
	cases := []struct {
		name   string
		tmpl   *Template
		want   error
		errHas string
	}{
		{"raise", compile(`{% if messages[0].role != 'user' %}{{ raise_exception('first ' ~ messages[0].role ~ ' must be user') }}{% endif %}ok`),
			ErrRaised, "first assistant must be user"},
		{"raise in a loop after output", compile(`start{% for m in messages %}{{ raise_exception("no " + m.role) }}{% endfor %}`),
			ErrRaised, "no assistant"},
		{"failure", compile(`{{ messages[0].content | no_such_filter }}`), ErrRender, "no_such_filter"},
		{"nil", nil, ErrNoTemplate, "text or token_ids"},
		{"zero", &Template{}, ErrNoTemplate, "no template was loaded"},
	}
	for _, c := range cases {
		got, err := c.tmpl.Render(msgs, true)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.errHas) || got != "" {
			t.Errorf("%s: %q, %v; want %v mentioning %q", c.name, got, err, c.want, c.errHas)
		}
	}
}

// TestRenderChat: the proto form, names passed only when set, add_generation_prompt true unless
// set false.
func TestRenderChat(t *testing.T) {
	tmpl, err := New(`{% for m in messages %}{{ m | tojson }};{% endfor %}{{ add_generation_prompt }}`, nil)
	if err != nil {
		t.Fatal(err)
	}
	msgs := []*loraplexv1.ChatMessage{{Role: "user", Content: "a", Name: "n"}, {Role: "assistant", Content: "b"}}
	const body = `{"role": "user", "content": "a", "name": "n"};{"role": "assistant", "content": "b"};`
	for _, c := range []struct {
		agp  *bool
		want string
	}{{nil, body + "True"}, {proto.Bool(true), body + "True"}, {proto.Bool(false), body + "False"}} {
		got, err := tmpl.RenderChat(&loraplexv1.ChatMessages{Messages: msgs, AddGenerationPrompt: c.agp})
		if err != nil || got != c.want {
			t.Errorf("add_generation_prompt %v: %q, %v; want %q", c.agp, got, err, c.want)
		}
	}
}

// TestEncodeDemoModel: the demo model's chat prompt tokenizes to exactly the ids of its text
// prompt (one BOS, from the template; Encode adds none), and the echo answers the last user turn.
func TestEncodeDemoModel(t *testing.T) {
	tmpl, err := Load(demoModelDir)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(tmpl.Origin(), JinjaFile) || !slices.Contains(tmpl.TokenNames(), "bos_token") {
		t.Fatalf("demo template from %q with tokens %v", tmpl.Origin(), tmpl.TokenNames())
	}
	tok, err := tokenizer.Load(filepath.Join(demoModelDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	chat := &loraplexv1.ChatMessages{Messages: []*loraplexv1.ChatMessage{
		{Role: "system", Content: "echo"}, {Role: "user", Content: "first"}, {Role: "assistant", Content: "first"},
		{Role: "user", Content: "héllo wörld 42"},
	}}
	got, err := tmpl.Encode(tok, chat)
	if err != nil {
		t.Fatal(err)
	}
	want, err := tok.Encode(demomodel.Prompt("héllo wörld 42"), true)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("chat ids %v, text prompt ids %v", got, want)
	}
	_, err = tmpl.Encode(tok, &loraplexv1.ChatMessages{Messages: []*loraplexv1.ChatMessage{{Role: "system", Content: "x"}}})
	if !errors.Is(err, ErrRaised) || !strings.Contains(err.Error(), "no") {
		t.Errorf("no user message: %v, want ErrRaised", err)
	}
}

// BenchmarkRender: one render of a four-message conversation with the ChatML-style testdata
// template (what each chat request pays before tokenizing).
func BenchmarkRender(b *testing.B) {
	src, err := os.ReadFile("testdata/templates/chatml.jinja")
	if err != nil {
		b.Fatal(err)
	}
	tmpl, err := New(string(src), map[string]string{"bos_token": "<s>"})
	if err != nil {
		b.Fatal(err)
	}
	msgs := []Message{{Role: "system", Content: "You answer in one line."}, {Role: "user", Content: "What is LoRA?"},
		{Role: "assistant", Content: "A low-rank adapter."}, {Role: "user", Content: "And multi-LoRA?"}}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := tmpl.Render(msgs, true); err != nil {
			b.Fatal(err)
		}
	}
}
