package peft

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// allLinear is PEFT's shorthand for every linear layer but the output head.
const allLinear = "all-linear"

// maxRankValue bounds r so that later size arithmetic cannot overflow.
const maxRankValue = 1 << 20

// Config is the part of a PEFT LoRA adapter_config.json that decides which
// modules carry LoRA weights and how they are scaled. Build it with
// ParseConfig; the zero value matches nothing.
type Config struct {
	PeftType  string // always "LORA"
	BaseModel string // base_model_name_or_path, informational
	TaskType  string // informational
	R         int
	LoraAlpha float64
	UseRSLoRA bool

	// TargetModules holds target_modules given as a list: a module is
	// targeted when its full name equals an entry or ends in "."+entry.
	// TargetRegex holds target_modules given as a string instead: a regular
	// expression that must match the whole module name, or "all-linear".
	TargetModules []string
	TargetRegex   string
	// ExcludeModules and ExcludeRegex follow the same rules and win over
	// the targets.
	ExcludeModules []string
	ExcludeRegex   string

	// RankPattern and AlphaPattern override R and LoraAlpha for modules
	// whose name matches (.*\.)?(Pattern)$; the first rule in file order wins.
	RankPattern  []RankRule
	AlphaPattern []AlphaRule

	// LayersToTransform restricts list targets to these layer indices (nil:
	// all layers). LayersPattern names the module list holding the layers
	// (for example "layers"); empty means any.
	LayersToTransform []int
	LayersPattern     []string

	allLinear           bool
	targetRe, excludeRe *regexp.Regexp
	rankRe, alphaRe     []*regexp.Regexp
	layerRe             []*regexp.Regexp
}

// RankRule is one rank_pattern entry.
type RankRule struct {
	Pattern string
	Rank    int
}

// AlphaRule is one alpha_pattern entry.
type AlphaRule struct {
	Pattern string
	Alpha   float64
}

// ParseConfig decodes and checks a PEFT adapter_config.json. It refuses,
// with ErrUnsupported naming the option, anything that would change what
// the adapter computes and that Loraplex does not implement, and it refuses
// unknown keys unless their value is null, false or empty. Regular
// expressions use Go's RE2 syntax; Python-only syntax (look-around,
// backreferences) is refused.
func ParseConfig(data []byte) (*Config, error) {
	c := &Config{}
	have := map[string]bool{}
	err := eachMember(data, func(key string, raw json.RawMessage) error {
		have[key] = true
		return c.setField(key, raw)
	})
	if err != nil {
		return nil, err
	}
	for _, k := range []string{"peft_type", "r", "lora_alpha", "target_modules"} {
		if !have[k] {
			return nil, fmt.Errorf("%w: missing %s", ErrInvalidConfig, k)
		}
	}
	if err := c.compile(); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Config) setField(key string, raw json.RawMessage) error {
	switch key {
	case "peft_type":
		s, err := decodeString(key, raw)
		if err != nil {
			return err
		}
		if s != "LORA" {
			return fmt.Errorf("%w: peft_type %q: only LORA adapters are supported", ErrUnsupported, s)
		}
		c.PeftType = s
	case "r":
		r, err := decodeRank(key, raw)
		if err != nil {
			return err
		}
		c.R = r
	case "lora_alpha":
		a, err := decodeFloat(key, raw)
		if err != nil {
			return err
		}
		c.LoraAlpha = a
	case "use_rslora":
		b, err := decodeBool(key, raw)
		if err != nil {
			return err
		}
		c.UseRSLoRA = b
	case "target_modules":
		if isNull(raw) {
			return fmt.Errorf("%w: target_modules is null; name the modules explicitly", ErrInvalidConfig)
		}
		list, re, err := decodeStringOrList(key, raw)
		if err != nil {
			return err
		}
		c.TargetModules, c.TargetRegex = list, re
	case "exclude_modules":
		list, re, err := decodeStringOrList(key, raw)
		if err != nil {
			return err
		}
		c.ExcludeModules, c.ExcludeRegex = list, re
	case "rank_pattern":
		return eachMemberOrNull(key, raw, func(k string, v json.RawMessage) error {
			r, err := decodeRank(fmt.Sprintf("rank_pattern[%q]", k), v)
			if err != nil {
				return err
			}
			c.RankPattern = append(c.RankPattern, RankRule{Pattern: k, Rank: r})
			return nil
		})
	case "alpha_pattern":
		return eachMemberOrNull(key, raw, func(k string, v json.RawMessage) error {
			a, err := decodeFloat(fmt.Sprintf("alpha_pattern[%q]", k), v)
			if err != nil {
				return err
			}
			c.AlphaPattern = append(c.AlphaPattern, AlphaRule{Pattern: k, Alpha: a})
			return nil
		})
	case "layers_to_transform":
		layers, err := decodeLayers(key, raw)
		if err != nil {
			return err
		}
		c.LayersToTransform = layers
	case "layers_pattern":
		list, s, err := decodeStringOrList(key, raw)
		if err != nil {
			return err
		}
		if s != "" {
			list = []string{s}
		}
		c.LayersPattern = list
	case "base_model_name_or_path", "task_type":
		if isNull(raw) {
			return nil
		}
		s, err := decodeString(key, raw)
		if err != nil {
			return err
		}
		if key == "task_type" {
			c.TaskType = s
		} else {
			c.BaseModel = s
		}

	// Informational, training-only or initialisation-only settings: they do
	// not change what a trained adapter computes.
	case "revision", "inference_mode", "peft_version", "auto_mapping", "lora_dropout",
		"megatron_config", "megatron_core", "runtime_config", "qalora_group_size",
		"ensure_weight_tying", "eva_config", "corda_config", "loftq_config":

	case "init_lora_weights":
		return checkInit(raw)
	case "bias":
		if isNull(raw) {
			return nil
		}
		s, err := decodeString(key, raw)
		if err != nil {
			return err
		}
		if s != "none" {
			return fmt.Errorf("%w: bias %q: only \"none\" is supported", ErrUnsupported, s)
		}
	case "use_dora", "fan_in_fan_out", "use_qalora", "lora_bias", "use_bdlora":
		b, err := decodeBool(key, raw)
		if err != nil {
			return err
		}
		if b {
			return fmt.Errorf("%w: %s is true", ErrUnsupported, key)
		}
	case "modules_to_save", "target_parameters", "trainable_token_indices",
		"alora_invocation_tokens", "layer_replication":
		if !isEmpty(raw) {
			return fmt.Errorf("%w: %s is set (%s)", ErrUnsupported, key, abbreviate(raw))
		}
	default:
		if !isEmpty(raw) {
			return fmt.Errorf("%w: unknown option %s = %s", ErrUnsupported, key, abbreviate(raw))
		}
	}
	return nil
}

// checkInit refuses initialisations that rewrite the base weights (PiSSA,
// OLoRA, CorDA, LoftQ): such an adapter, saved without PEFT's conversion,
// only works on the rewritten base model.
func checkInit(raw json.RawMessage) error {
	if isNull(raw) || string(raw) == "true" || string(raw) == "false" {
		return nil
	}
	s, err := decodeString("init_lora_weights", raw)
	if err != nil {
		return err
	}
	switch {
	case s == "gaussian" || s == "eva" || s == "orthogonal":
		return nil
	case strings.HasPrefix(s, "pissa") || s == "olora" || s == "corda" || s == "loftq":
		return fmt.Errorf("%w: init_lora_weights %q modifies the base weights; convert the adapter to plain LoRA "+
			"(save_pretrained with path_initial_model_for_weight_conversion)", ErrUnsupported, s)
	}
	return fmt.Errorf("%w: init_lora_weights %q", ErrUnsupported, s)
}

func (c *Config) compile() error {
	if c.TargetRegex == "" && len(c.TargetModules) == 0 {
		return fmt.Errorf("%w: target_modules is empty", ErrInvalidConfig)
	}
	if c.TargetRegex != "" && (c.LayersToTransform != nil || len(c.LayersPattern) > 0) {
		return fmt.Errorf("%w: layers_to_transform and layers_pattern need target_modules as a list, not a string", ErrInvalidConfig)
	}
	if len(c.LayersPattern) > 0 && c.LayersToTransform == nil {
		return fmt.Errorf("%w: layers_pattern is set without layers_to_transform", ErrInvalidConfig)
	}
	var err error
	c.allLinear = strings.EqualFold(c.TargetRegex, allLinear)
	if c.TargetRegex != "" && !c.allLinear {
		if c.targetRe, err = compileRegex("target_modules", `^(?:`+c.TargetRegex+`)$`); err != nil {
			return err
		}
	}
	if c.ExcludeRegex != "" {
		if c.excludeRe, err = compileRegex("exclude_modules", `^(?:`+c.ExcludeRegex+`)$`); err != nil {
			return err
		}
	}
	for _, rule := range c.RankPattern {
		re, err := compileRegex(fmt.Sprintf("rank_pattern key %q", rule.Pattern), `^(.*\.)?(`+rule.Pattern+`)$`)
		if err != nil {
			return err
		}
		c.rankRe = append(c.rankRe, re)
	}
	for _, rule := range c.AlphaPattern {
		re, err := compileRegex(fmt.Sprintf("alpha_pattern key %q", rule.Pattern), `^(.*\.)?(`+rule.Pattern+`)$`)
		if err != nil {
			return err
		}
		c.alphaRe = append(c.alphaRe, re)
	}
	if c.LayersToTransform != nil {
		if len(c.LayersPattern) == 0 {
			c.layerRe = []*regexp.Regexp{regexp.MustCompile(`^.*\.[^.]*\.(\d+)\.`)}
		}
		for _, p := range c.LayersPattern {
			re, err := compileRegex(fmt.Sprintf("layers_pattern %q", p), `^(?:.*\.`+p+`\.(\d+)\.)`)
			if err != nil {
				return err
			}
			c.layerRe = append(c.layerRe, re)
		}
	}
	return nil
}

func compileRegex(what, expr string) (*regexp.Regexp, error) {
	re, err := regexp.Compile(expr)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is not a regular expression Go supports: %w", ErrUnsupported, what, err)
	}
	return re, nil
}

// Targets reports whether the config puts LoRA weights on the module with
// this full name (like "model.layers.3.self_attn.q_proj"), following PEFT's
// rules: exclusions first, then a full regex match for a string target, or
// for a list an exact or dotted-suffix match restricted to
// layers_to_transform.
func (c *Config) Targets(module string) bool {
	if c.excluded(module) {
		return false
	}
	if c.allLinear {
		return true // every linear layer the model has; callers only ask about those
	}
	if c.targetRe != nil {
		return c.targetRe.MatchString(module)
	}
	if c.TargetRegex != "" {
		return false // not compiled: the Config was not built by ParseConfig
	}
	if slices.Contains(c.TargetModules, module) {
		return true // named exactly: PEFT skips the layer filter
	}
	if !hasDottedSuffix(module, c.TargetModules) {
		return false
	}
	if c.LayersToTransform == nil {
		return true
	}
	for _, re := range c.layerRe {
		m := re.FindStringSubmatch(module)
		if m == nil {
			continue
		}
		idx, err := strconv.Atoi(m[1])
		return err == nil && slices.Contains(c.LayersToTransform, idx)
	}
	return false
}

func (c *Config) excluded(module string) bool {
	if c.excludeRe != nil {
		return c.excludeRe.MatchString(module)
	}
	return slices.Contains(c.ExcludeModules, module) || hasDottedSuffix(module, c.ExcludeModules)
}

func hasDottedSuffix(module string, names []string) bool {
	for _, n := range names {
		if strings.HasSuffix(module, "."+n) {
			return true
		}
	}
	return false
}

// RankAlpha returns the rank and alpha for the named module: from the first
// matching rank_pattern / alpha_pattern rule, else r / lora_alpha.
func (c *Config) RankAlpha(module string) (rank int, alpha float64) {
	rank, alpha = c.R, c.LoraAlpha
	for i, re := range c.rankRe {
		if re.MatchString(module) {
			rank = c.RankPattern[i].Rank
			break
		}
	}
	for i, re := range c.alphaRe {
		if re.MatchString(module) {
			alpha = c.AlphaPattern[i].Alpha
			break
		}
	}
	return rank, alpha
}

func scaling(r int, alpha float64, rslora bool) float32 {
	if r <= 0 {
		return 0
	}
	if rslora {
		return float32(alpha / math.Sqrt(float64(r)))
	}
	return float32(alpha / float64(r))
}

// JSON helpers. Every error names the key it is about.

func isNull(raw json.RawMessage) bool { return string(raw) == "null" }

// isEmpty reports a value that switches a feature off: null, false, "", [] or {}.
func isEmpty(raw json.RawMessage) bool {
	switch string(raw) {
	case "null", "false", `""`:
		return true
	}
	var v any
	if json.Unmarshal(raw, &v) != nil {
		return false
	}
	switch v := v.(type) {
	case []any:
		return len(v) == 0
	case map[string]any:
		return len(v) == 0
	}
	return false
}

func decodeString(key string, raw json.RawMessage) (string, error) {
	var s string
	if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &s) != nil {
		return "", fmt.Errorf("%w: %s must be a string, got %s", ErrInvalidConfig, key, abbreviate(raw))
	}
	return s, nil
}

func decodeBool(key string, raw json.RawMessage) (bool, error) {
	switch string(raw) {
	case "true":
		return true, nil
	case "false", "null":
		return false, nil
	}
	return false, fmt.Errorf("%w: %s must be a boolean, got %s", ErrInvalidConfig, key, abbreviate(raw))
}

func decodeFloat(key string, raw json.RawMessage) (float64, error) {
	var f float64
	if len(raw) == 0 || !(raw[0] == '-' || (raw[0] >= '0' && raw[0] <= '9')) || json.Unmarshal(raw, &f) != nil ||
		math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, fmt.Errorf("%w: %s must be a finite number, got %s", ErrInvalidConfig, key, abbreviate(raw))
	}
	return f, nil
}

func decodeRank(key string, raw json.RawMessage) (int, error) {
	f, err := decodeFloat(key, raw)
	if err != nil {
		return 0, err
	}
	if f != math.Trunc(f) || f < 1 || f > maxRankValue {
		return 0, fmt.Errorf("%w: %s must be an integer from 1 to %d, got %s", ErrInvalidConfig, key, maxRankValue, abbreviate(raw))
	}
	return int(f), nil
}

// decodeStringOrList accepts null, a string (returned as s) or a list of
// strings (returned as list).
func decodeStringOrList(key string, raw json.RawMessage) (list []string, s string, err error) {
	switch {
	case isNull(raw):
		return nil, "", nil
	case len(raw) > 0 && raw[0] == '"':
		s, err = decodeString(key, raw)
		return nil, s, err
	case len(raw) > 0 && raw[0] == '[':
		if json.Unmarshal(raw, &list) == nil {
			return list, "", nil
		}
	}
	return nil, "", fmt.Errorf("%w: %s must be a string or a list of strings, got %s", ErrInvalidConfig, key, abbreviate(raw))
}

// decodeLayers accepts null, one non-negative integer or a list of them;
// an empty list means all layers, as in PEFT.
func decodeLayers(key string, raw json.RawMessage) ([]int, error) {
	if isNull(raw) {
		return nil, nil
	}
	var elems []json.RawMessage
	if len(raw) > 0 && raw[0] == '[' {
		if json.Unmarshal(raw, &elems) != nil {
			return nil, fmt.Errorf("%w: %s must be an integer or a list of integers, got %s", ErrInvalidConfig, key, abbreviate(raw))
		}
		if len(elems) == 0 {
			return nil, nil
		}
	} else {
		elems = []json.RawMessage{raw}
	}
	out := make([]int, 0, len(elems))
	for _, e := range elems {
		n, err := strconv.Atoi(string(e))
		if err != nil || n < 0 {
			return nil, fmt.Errorf("%w: %s must hold non-negative integers, got %s", ErrInvalidConfig, key, abbreviate(e))
		}
		out = append(out, n)
	}
	return out, nil
}

func eachMemberOrNull(key string, raw json.RawMessage, fn func(string, json.RawMessage) error) error {
	if isNull(raw) {
		return nil
	}
	if len(raw) == 0 || raw[0] != '{' {
		return fmt.Errorf("%w: %s must be an object, got %s", ErrInvalidConfig, key, abbreviate(raw))
	}
	return eachMember(raw, fn)
}

// eachMember walks a JSON object's members in file order (which decides
// pattern precedence), refusing duplicate keys and trailing data.
func eachMember(data []byte, fn func(key string, value json.RawMessage) error) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("%w: expected a JSON object, got %s", ErrInvalidConfig, abbreviate(data))
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
		}
		key, ok := tok.(string)
		if !ok {
			return fmt.Errorf("%w: object key is not a string", ErrInvalidConfig)
		}
		if seen[key] {
			return fmt.Errorf("%w: duplicate key %q", ErrInvalidConfig, key)
		}
		seen[key] = true
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return fmt.Errorf("%w: value of %q: %w", ErrInvalidConfig, key, err)
		}
		if err := fn(key, raw); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if tok, err := dec.Token(); err == nil {
		return fmt.Errorf("%w: unexpected %v after the object", ErrInvalidConfig, tok)
	} else if !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: after the object: %w", ErrInvalidConfig, err)
	}
	return nil
}

// abbreviate quotes at most 60 bytes of a JSON fragment for error messages.
func abbreviate(b []byte) string {
	const limit = 60
	if len(b) > limit {
		return strconv.Quote(string(b[:limit]) + "...")
	}
	return strconv.Quote(string(b))
}
