// Package chattemplate renders a model's chat template into a prompt the way transformers'
// apply_chat_template does, so that a chat request to Loraplex yields the same prompt text as the
// model's own tooling: the template comes from chat_template.jinja beside the tokenizer, else from
// tokenizer_config.json's chat_template (a string, or the list of {name, template} whose "default"
// entry is used); it sees messages, add_generation_prompt, the special tokens of
// tokenizer_config.json (bos_token, eos_token, ...) and raise_exception; Jinja runs with
// transformers' trim_blocks and lstrip_blocks. The caller tokenizes the result without adding
// special tokens: the template places them. Imported by the shard.
//
// The Jinja engine is github.com/ardanlabs/jinja (pinned at v1.8.0, the last release for Go 1.26).
// github.com/nikolalohinski/gonja/v2 was tried on the same testdata and lost: it could not parse
// a Gemma-style template (a parenthesised concatenation in an output tag), its tojson sorts keys and
// drops Python's ", " / ": " separators, and trim_blocks/lstrip_blocks are off unless configured,
// so its renders differed from transformers' on every template; ardanlabs/jinja matched them byte
// for byte (testdata/reference.json) and has no dependencies.
package chattemplate

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/ardanlabs/jinja"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// Errors. ErrNoTemplate: the model has no chat template (or several without a default); ErrRaised:
// the template called raise_exception (the message is the template's); ErrRender: the template
// failed otherwise while rendering this conversation; ErrInvalid: a template or tokenizer_config.json
// that cannot be used at all (found at load).
var (
	ErrNoTemplate = errors.New("the model has no chat template")
	ErrRaised     = errors.New("the chat template refused the conversation")
	ErrRender     = errors.New("the chat template failed on this conversation")
	ErrInvalid    = errors.New("invalid chat template")
)

// File names beside tokenizer.json, as transformers reads them.
const (
	JinjaFile  = "chat_template.jinja"
	ConfigFile = "tokenizer_config.json"
)

// maxFileBytes bounds what Load reads of either file (a tokenizer_config.json can list every added
// token, so it is allowed the size of a large tokenizer).
const maxFileBytes = 64 << 20

// Message is one turn of a conversation; Name is passed to the template only when set.
type Message struct {
	Role, Content, Name string
}

// Template is a compiled chat template with the model's special tokens. The zero value and nil
// are a model without a template. Safe for concurrent use.
type Template struct {
	tmpl    *jinja.Template
	origin  string            // where the template came from, for errors and logs
	missing string            // why there is no template, when tmpl is nil
	tokens  map[string]string // bos_token, eos_token, ... from tokenizer_config.json
}

// Load reads the chat template of the model in dir and compiles it. A model without one is not an
// error: the Template answers every Render with ErrNoTemplate. Unreadable or malformed files and
// templates that do not compile are errors (wrapping ErrInvalid for the latter two).
func Load(dir string) (*Template, error) {
	t := &Template{tokens: map[string]string{}}
	cfgPath := filepath.Join(dir, ConfigFile)
	var cfg map[string]json.RawMessage
	data, err := readFile(cfgPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, err
	default:
		if err := json.Unmarshal(data, &cfg); err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrInvalid, cfgPath, err)
		}
		t.tokens = specialTokens(cfg)
	}
	// transformers lets chat_template.jinja override the config's chat_template.
	jinjaPath := filepath.Join(dir, JinjaFile)
	src, err := readFile(jinjaPath)
	switch {
	case err == nil:
		return t, t.compile(string(src), jinjaPath)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, err
	}
	raw, ok := cfg["chat_template"]
	if !ok || string(raw) == "null" {
		t.missing = fmt.Sprintf("no %s and no chat_template in %s", JinjaFile, ConfigFile)
		return t, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return t, t.compile(s, cfgPath+": chat_template")
	}
	var named []struct{ Name, Template string }
	if err := json.Unmarshal(raw, &named); err != nil {
		return nil, fmt.Errorf("%w: %s: chat_template is neither a string nor a list of {name, template}: %w", ErrInvalid, cfgPath, err)
	}
	var names []string
	for _, n := range named {
		if n.Name == "default" {
			return t, t.compile(n.Template, cfgPath+`: chat_template "default"`)
		}
		names = append(names, n.Name)
	}
	t.missing = fmt.Sprintf("%s names chat templates %q but none \"default\"", ConfigFile, names)
	return t, nil
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxFileBytes {
		return nil, fmt.Errorf("%w: %s is over %d bytes", ErrInvalid, path, maxFileBytes)
	}
	return data, nil
}

// specialTokens returns the config's "<x>_token" entries that name a token, written either as a
// string or as an AddedToken object ({"content": ...}), as transformers passes them to templates.
func specialTokens(cfg map[string]json.RawMessage) map[string]string {
	out := map[string]string{}
	for k, raw := range cfg {
		if !strings.HasSuffix(k, "_token") || string(raw) == "null" { // null: unset, undefined in the template
			continue
		}
		var s string
		if json.Unmarshal(raw, &s) == nil {
			out[k] = s
			continue
		}
		var obj struct {
			Content *string `json:"content"`
		}
		if json.Unmarshal(raw, &obj) == nil && obj.Content != nil {
			out[k] = *obj.Content
		}
	}
	return out
}

// New compiles a template given as source, with the special tokens it sees (nil: none).
func New(source string, tokens map[string]string) (*Template, error) {
	t := &Template{tokens: map[string]string{}}
	for k, v := range tokens {
		t.tokens[k] = v
	}
	if err := t.compile(source, "template"); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *Template) compile(src, origin string) error {
	tmpl, err := jinja.Compile(src)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrInvalid, origin, err)
	}
	t.tmpl, t.origin = tmpl, origin
	return nil
}

// Origin says where the template came from ("" for a model without one).
func (t *Template) Origin() string {
	if t == nil {
		return ""
	}
	return t.origin
}

// Render renders a conversation. Errors wrap ErrNoTemplate, ErrRaised (with the template's
// message) or ErrRender.
func (t *Template) Render(msgs []Message, addGenerationPrompt bool) (string, error) {
	if t == nil || t.tmpl == nil {
		why := "no template was loaded"
		if t != nil && t.missing != "" {
			why = t.missing
		}
		return "", fmt.Errorf("%w (%s): send the prompt as text or token_ids", ErrNoTemplate, why)
	}
	list := make([]jinja.Value, len(msgs))
	for i, m := range msgs {
		// An ordered dict (role, content, name), as a Python caller writes it: tojson keeps the order.
		d := jinja.NewDict()
		d.AsDict().Set("role", jinja.NewString(m.Role))
		d.AsDict().Set("content", jinja.NewString(m.Content))
		if m.Name != "" {
			d.AsDict().Set("name", jinja.NewString(m.Name))
		}
		list[i] = d
	}
	data := make(map[string]jinja.Value, len(t.tokens)+3)
	for k, v := range t.tokens {
		data[k] = jinja.NewString(v)
	}
	data["messages"] = jinja.NewList(list)
	data["add_generation_prompt"] = jinja.NewBool(addGenerationPrompt)
	// transformers defines both (None without tools or documents); templates test them.
	data["tools"], data["documents"] = jinja.None(), jinja.None()
	// raise_exception is ours, not the engine's, so that a refusal is told apart from a failure.
	var raised *string
	data["raise_exception"] = jinja.NewCallable("raise_exception", func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
		msg := "raise_exception called"
		if len(args) > 0 {
			msg = args[0].String()
		}
		raised = &msg
		return jinja.Undefined(), errors.New(msg)
	})
	out, err := t.tmpl.RenderValues(data)
	switch {
	case raised != nil:
		return "", fmt.Errorf("%w: %s", ErrRaised, *raised)
	case err != nil:
		return "", fmt.Errorf("%w: %s: %w", ErrRender, t.origin, err)
	}
	return out, nil
}

// RenderChat renders a loraplex.v1 chat prompt; add_generation_prompt defaults to true.
func (t *Template) RenderChat(c *loraplexv1.ChatMessages) (string, error) {
	msgs := make([]Message, len(c.GetMessages()))
	for i, m := range c.GetMessages() {
		msgs[i] = Message{Role: m.GetRole(), Content: m.GetContent(), Name: m.GetName()}
	}
	agp := c == nil || c.AddGenerationPrompt == nil || c.GetAddGenerationPrompt()
	return t.Render(msgs, agp)
}

// TokenNames lists the special tokens the template sees, sorted (for logs).
func (t *Template) TokenNames() []string {
	if t == nil {
		return nil
	}
	names := make([]string, 0, len(t.tokens))
	for k := range t.tokens {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// Encoder is the tokenizer a rendered prompt goes through (pkg/tokenizer's Tokenizer).
type Encoder interface {
	Encode(text string, addSpecial bool) ([]int, error)
}

// Encode renders a loraplex.v1 chat prompt and tokenizes it without adding special tokens, as
// apply_chat_template(tokenize=True) does: the template already placed them (a BOS included).
func (t *Template) Encode(tok Encoder, c *loraplexv1.ChatMessages) ([]int, error) {
	text, err := t.RenderChat(c)
	if err != nil {
		return nil, err
	}
	ids, err := tok.Encode(text, false)
	if err != nil {
		return nil, fmt.Errorf("%w: tokenizing the rendered prompt: %w", ErrRender, err)
	}
	return ids, nil
}
