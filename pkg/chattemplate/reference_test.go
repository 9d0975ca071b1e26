package chattemplate

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/loraplex/loraplex/pkg/tokenizer"
)

// reference is what scripts/chat_template_reference.py recorded from transformers.
type reference struct {
	Transformers string `json:"transformers"`
	Renders      []struct {
		Template            string  `json:"template"`
		Conversation        string  `json:"conversation"`
		AddGenerationPrompt bool    `json:"add_generation_prompt"`
		Text                *string `json:"text"`
		Error               *string `json:"error"`
	} `json:"renders"`
	DemoIDs []struct {
		Conversation string  `json:"conversation"`
		IDs          []int   `json:"ids"`
		Error        *string `json:"error"`
	} `json:"demo_ids"`
	Loading map[string]string `json:"loading"`
}

// fromTransformers skips a test that needs what only transformers records (tokenize=True ids, how
// it loads a folder) when reference.json was made with --emulate.
func (r reference) fromTransformers(t *testing.T) {
	t.Helper()
	if strings.HasPrefix(r.Transformers, "emulated") {
		t.Skipf("reference.json is %s: rerun scripts/chat_template_reference.py with transformers", r.Transformers)
	}
}

func readReference(t *testing.T) reference {
	t.Helper()
	data, err := os.ReadFile("testdata/reference.json")
	if err != nil {
		t.Fatal(err)
	}
	var ref reference
	if err := json.Unmarshal(data, &ref); err != nil {
		t.Fatal(err)
	}
	if len(ref.Renders) == 0 {
		t.Fatal("reference.json holds no renders")
	}
	return ref
}

func conversations(t *testing.T) map[string][]Message {
	t.Helper()
	data, err := os.ReadFile("testdata/conversations.json")
	if err != nil {
		t.Fatal(err)
	}
	var convs map[string][]Message
	if err := json.Unmarshal(data, &convs); err != nil {
		t.Fatal(err)
	}
	return convs
}

// templates compiles the testdata templates, and the demo model's, with the demo model's tokens.
func templates(t *testing.T) map[string]*Template {
	t.Helper()
	demo, err := Load(demoModelDir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*Template{"demo": demo}
	files, err := filepath.Glob("testdata/templates/*.jinja")
	if err != nil || len(files) < 4 {
		t.Fatalf("testdata templates: %v, %v", files, err)
	}
	for _, f := range files {
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		tmpl, err := New(string(src), demo.tokens)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		out[strings.TrimSuffix(filepath.Base(f), ".jinja")] = tmpl
	}
	return out
}

// TestMatchesTransformers renders every testdata template (and the demo model's) over every
// conversation, with and without the generation prompt, and compares with transformers'
// apply_chat_template byte for byte; where transformers raised, Render must refuse with the same
// message (ErrRaised).
func TestMatchesTransformers(t *testing.T) {
	ref := readReference(t)
	convs := conversations(t)
	tmpls := templates(t)
	seen := map[string]bool{}
	for _, r := range ref.Renders {
		seen[r.Template] = true
		tmpl, conv := tmpls[r.Template], convs[r.Conversation]
		if tmpl == nil || conv == nil {
			t.Fatalf("reference names template %q / conversation %q that testdata lacks", r.Template, r.Conversation)
		}
		got, err := tmpl.Render(conv, r.AddGenerationPrompt)
		name := r.Template + "/" + r.Conversation
		if !r.AddGenerationPrompt {
			name += "/no generation prompt"
		}
		switch {
		case r.Error != nil:
			if !errors.Is(err, ErrRaised) || !strings.Contains(err.Error(), *r.Error) {
				t.Errorf("%s: transformers raised %q; got %q, %v", name, *r.Error, got, err)
			}
		case err != nil:
			t.Errorf("%s: %v", name, err)
		case got != *r.Text:
			t.Errorf("%s:\n got %q\nwant %q", name, got, *r.Text)
		}
	}
	for name := range tmpls {
		if !seen[name] {
			t.Errorf("template %s has no reference renders: rerun scripts/chat_template_reference.py", name)
		}
	}
}

// TestDemoIDsMatchTransformers: the demo model's chat prompts tokenize (no special tokens added) to
// the ids apply_chat_template(tokenize=True) gave.
func TestDemoIDsMatchTransformers(t *testing.T) {
	ref := readReference(t)
	ref.fromTransformers(t)
	convs := conversations(t)
	demo, err := Load(demoModelDir)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.Load(filepath.Join(demoModelDir, "tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(ref.DemoIDs) == 0 {
		t.Fatal("no demo ids in reference.json")
	}
	for _, r := range ref.DemoIDs {
		text, err := demo.Render(convs[r.Conversation], true)
		if r.Error != nil {
			if !errors.Is(err, ErrRaised) {
				t.Errorf("%s: transformers raised %q; got %v", r.Conversation, *r.Error, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", r.Conversation, err)
		}
		got, err := tok.Encode(text, false)
		if err != nil || !slices.Equal(got, r.IDs) {
			t.Errorf("%s: ids %v, %v; transformers %v", r.Conversation, got, err, r.IDs)
		}
	}
}

// TestLoadMatchesTransformers: the folders the reference script built (a jinja file beside a
// config template, the list form, special tokens, no template) load here as transformers loaded
// them.
func TestLoadMatchesTransformers(t *testing.T) {
	ref := readReference(t)
	ref.fromTransformers(t)
	conv := []Message{{Role: "user", Content: "x"}}
	cases := map[string]map[string]string{
		"jinja file and config string": {ConfigFile: `{"chat_template": "CONFIG{{ messages[0].content }}"}`, JinjaFile: "FILE{{ messages[0].content }}"},
		"config string only":           {ConfigFile: `{"chat_template": "CONFIG{{ messages[0].content }}"}`},
		"config list": {ConfigFile: `{"chat_template": [{"name": "tool_use", "template": "TOOL{{ messages[0].content }}"},
			{"name": "default", "template": "DEFAULT{{ messages[0].content }}"}]}`},
		"special tokens": {ConfigFile: `{"bos_token": "<|bos|>", "eos_token": "<|eos|>",
			"chat_template": "{{ bos_token }}|{{ eos_token }}|{{ unk_token is defined }}|{{ pad_token is defined }}"}`},
		"tools and documents": {ConfigFile: `{"chat_template": "{{ tools is defined }}|{{ tools is none }}|{{ documents is defined }}|{{ documents is none }}"}`},
		"no template":         {ConfigFile: `{"bos_token": "<|bos|>"}`},
	}
	for name, files := range cases {
		want, ok := ref.Loading[name]
		if !ok {
			t.Fatalf("reference has no loading case %q", name)
		}
		tmpl, err := Load(folder(t, files))
		if err != nil {
			t.Fatal(err)
		}
		got, err := tmpl.Render(conv, false)
		if strings.HasPrefix(want, "error: ") || want == "rendered" {
			if errors.Is(err, ErrNoTemplate) != strings.HasPrefix(want, "error: ") {
				t.Errorf("%s: transformers: %s; here: %q, %v", name, want, got, err)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("%s: %q, %v; transformers rendered %q", name, got, err, want)
		}
	}
}
