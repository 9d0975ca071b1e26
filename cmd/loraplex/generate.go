package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/loraplex/loraplex/cmd/internal/cmdline"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// optionalUint64 is a flag that remembers whether it was set.
type optionalUint64 struct {
	v   uint64
	set bool
}

func (o *optionalUint64) String() string {
	if !o.set {
		return ""
	}
	return strconv.FormatUint(o.v, 10)
}

func (o *optionalUint64) Set(s string) error {
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return err
	}
	o.v, o.set = v, true
	return nil
}

// generateRequestFlags are the request's fields as flags.
type generateRequestFlags struct {
	adapter     string
	requestID   string
	maxNew      uint
	temperature float64
	topP        float64
	topK        uint
	seed        optionalUint64
	repetition  float64
	stop        stringList
	ignoreEOS   bool
	logprobs    uint
	special     bool
	chat        bool
	system      string
}

func (g *generateRequestFlags) addFlags(fs *flag.FlagSet) {
	fs.StringVar(&g.adapter, "adapter", "", "LoRA adapter id (empty: the base model)")
	fs.StringVar(&g.requestID, "request-id", "", "request id echoed in responses and logs (default: the server picks one)")
	fs.UintVar(&g.maxNew, "max-new-tokens", 0, "most tokens to generate (0: the server default)")
	fs.Float64Var(&g.temperature, "temperature", 0, "sampling temperature (0: greedy)")
	fs.Float64Var(&g.topP, "top-p", 0, "nucleus sampling probability mass (0 or 1: off)")
	fs.UintVar(&g.topK, "top-k", 0, "keep only the k most likely tokens (0: off)")
	fs.Var(&g.seed, "seed", "sampling seed (default: the server picks one)")
	fs.Float64Var(&g.repetition, "repetition-penalty", 0, "penalty for tokens already seen (0 or 1: off)")
	fs.Var(&g.stop, "stop", "stop sequence (repeatable)")
	fs.BoolVar(&g.ignoreEOS, "ignore-eos", false, "keep generating past end-of-sequence tokens")
	fs.UintVar(&g.logprobs, "logprobs", 0, "alternatives with log-probabilities per token, 0 to 5 (printed after the text)")
	fs.BoolVar(&g.special, "special-tokens", false, "keep special tokens in the text")
	fs.BoolVar(&g.chat, "chat", false, "send PROMPT as a user message, rendered by the model's chat template")
	fs.StringVar(&g.system, "system", "", "a system message before the user message (implies --chat)")
}

func (g *generateRequestFlags) request(prompt string) *loraplexv1.GenerateStreamRequest {
	r := &loraplexv1.GenerateStreamRequest{
		RequestId: g.requestID, AdapterId: g.adapter,
		Prompt: &loraplexv1.GenerateStreamRequest_Text{Text: prompt},
		Sampling: &loraplexv1.SamplingParams{Temperature: float32(g.temperature), TopP: float32(g.topP), TopK: uint32(g.topK),
			RepetitionPenalty: float32(g.repetition)},
		Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: uint32(g.maxNew), StopSequences: g.stop, IgnoreEos: g.ignoreEOS},
		Output:   &loraplexv1.OutputOptions{TopLogprobs: uint32(g.logprobs), IncludeSpecialTokens: g.special},
	}
	if g.seed.set {
		r.Sampling.Seed = &g.seed.v
	}
	if g.chat || g.system != "" {
		var msgs []*loraplexv1.ChatMessage
		if g.system != "" {
			msgs = append(msgs, &loraplexv1.ChatMessage{Role: "system", Content: g.system})
		}
		msgs = append(msgs, &loraplexv1.ChatMessage{Role: "user", Content: prompt})
		r.Prompt = &loraplexv1.GenerateStreamRequest_Chat{Chat: &loraplexv1.ChatMessages{Messages: msgs}}
	}
	return r
}

func (c *cli) generate(args []string) error {
	fs := c.newFlagSet("generate", "[flags] PROMPT   (PROMPT '-' or none: read stdin)")
	o := c.connFlags(fs, 2*time.Minute)
	var g generateRequestFlags
	g.addFlags(fs)
	asJSON := fs.Bool("json", false, "print each stream message as JSON (protojson), one per line")
	pos, err := cmdline.ParseArgs(fs, args)
	if err != nil {
		return err
	}
	var prompt string
	switch {
	case len(pos) > 1:
		return fmt.Errorf("%w: generate takes one PROMPT argument (quote it); got %d", cmdline.ErrUsage, len(pos))
	case len(pos) == 1 && pos[0] != "-":
		prompt = pos[0]
	case isTerminal(c.stdin):
		return fmt.Errorf("%w: give a PROMPT argument or pipe one on stdin", cmdline.ErrUsage)
	default:
		b, err := io.ReadAll(c.stdin)
		if err != nil {
			return fmt.Errorf("reading the prompt from stdin: %w", err)
		}
		// The newline that ends the piped line is not part of the prompt (echo, heredocs).
		prompt = trimNewline(string(b))
	}
	if prompt == "" {
		return fmt.Errorf("%w: give a PROMPT argument or pipe one on stdin", cmdline.ErrUsage)
	}

	cc, err := o.dial()
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel, err := o.context()
	if err != nil {
		return err
	}
	defer cancel()
	start := time.Now()
	st, err := loraplexv1.NewGenerationServiceClient(cc).GenerateStream(ctx, g.request(prompt), o.callOptions()...)
	if err != nil {
		return o.explain(err)
	}
	var (
		last      *loraplexv1.GenerateStreamResponse
		tokens    []*loraplexv1.Token
		firstAt   time.Duration
		endsInNL  = true
		marshaler = protojson.MarshalOptions{}
	)
	for {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			if !*asJSON && !endsInNL {
				fmt.Fprintln(c.stdout)
			}
			return o.explain(err)
		}
		if firstAt == 0 && len(m.GetTokens()) > 0 {
			firstAt = time.Since(start)
		}
		last = m
		if *asJSON {
			b, err := marshaler.Marshal(m)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.stdout, "%s\n", b)
			continue
		}
		for _, t := range m.GetTokens() {
			if t.GetText() != "" {
				io.WriteString(c.stdout, t.GetText())
				endsInNL = strings.HasSuffix(t.GetText(), "\n")
			}
		}
		if g.logprobs > 0 {
			tokens = append(tokens, m.GetTokens()...)
		}
	}
	if *asJSON {
		return nil
	}
	if !endsInNL {
		fmt.Fprintln(c.stdout)
	}
	if len(tokens) > 0 {
		printLogprobs(c.stderr, tokens)
	}
	if last == nil {
		return fmt.Errorf("%s: the stream ended without a message", o.addr)
	}
	fmt.Fprintln(c.stderr, finishLine(last, firstAt, time.Since(start)))
	return nil
}

// trimNewline drops one trailing "\n" or "\r\n".
func trimNewline(s string) string {
	if t, ok := strings.CutSuffix(s, "\r\n"); ok {
		return t
	}
	return strings.TrimSuffix(s, "\n")
}

func isTerminal(r io.Reader) bool {
	f, ok := r.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// finishLine summarizes the stream's last message: why it ended, tokens, timings and where it ran.
func finishLine(m *loraplexv1.GenerateStreamResponse, clientTTFT, total time.Duration) string {
	reason := strings.ToLower(strings.TrimPrefix(m.GetFinishReason().String(), "FINISH_REASON_"))
	if m.GetStopSequence() != "" {
		reason += fmt.Sprintf(" %q", m.GetStopSequence())
	}
	adapter := m.GetAdapterId()
	if adapter == "" {
		adapter = "(base model)"
	}
	tm := m.GetTimings()
	return fmt.Sprintf("finish: %s · %d prompt + %d generated tokens · TTFT %v on the shard (%v here), total %v · %s · adapter %s · request %s",
		reason, m.GetUsage().GetPromptTokens(), m.GetUsage().GetGeneratedTokens(),
		roundDur(tm.GetTimeToFirstToken().AsDuration()), roundDur(clientTTFT), roundDur(total), orDash(m.GetShardId()), adapter, m.GetRequestId())
}

func printLogprobs(w io.Writer, tokens []*loraplexv1.Token) {
	fmt.Fprintln(w, "token logprobs (alternatives):")
	for _, t := range tokens {
		var alts []string
		for _, a := range t.GetTopLogprobs() {
			alts = append(alts, fmt.Sprintf("%q %.3f", a.GetText(), a.GetLogprob()))
		}
		fmt.Fprintf(w, "  %-16q %8.3f   %s\n", t.GetText(), t.GetLogprob(), strings.Join(alts, ", "))
	}
}

func roundDur(d time.Duration) time.Duration {
	switch {
	case d >= time.Second:
		return d.Round(time.Millisecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Microsecond)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
