package openai

import (
	"math"
	"strconv"
	"unicode/utf8"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// encoder writes one request's responses in OpenAI's JSON: the whole completion, or its stream of
// server-sent events. It appends into one buffer that lives as long as the request, so a streamed
// chunk costs its own bytes and no allocation per token (BenchmarkChunk checks).
type encoder struct {
	buf      []byte
	head     []byte // {"id":...,"object":...,"created":...,"model":...,"choices":[ of every chunk
	chat     bool
	logprobs bool
	started  bool // chat: the first delta carried the role
	offset   int  // completions: text_offset of the next token
}

// newEncoder prepares the fields every response of the request repeats.
func newEncoder(chat, stream, logprobs bool, requestID, model string, created int64) *encoder {
	e := &encoder{chat: chat, logprobs: logprobs, buf: make([]byte, 0, 512)}
	prefix, object := "cmpl-", "text_completion"
	switch {
	case chat && stream:
		prefix, object = "chatcmpl-", "chat.completion.chunk"
	case chat:
		prefix, object = "chatcmpl-", "chat.completion"
	}
	h := append([]byte(nil), `{"id":`...)
	h = appendString(h, prefix+requestID)
	h = append(h, `,"object":"`...)
	h = append(h, object...)
	h = append(h, `","created":`...)
	h = strconv.AppendInt(h, created, 10)
	h = append(h, `,"model":`...)
	h = appendString(h, model)
	e.head = append(h, `,"choices":[`...)
	return e
}

// finishReason is OpenAI's name for why generation ended ("" while it goes on).
func finishReason(f loraplexv1.FinishReason) string {
	switch f {
	case loraplexv1.FinishReason_FINISH_REASON_UNSPECIFIED:
		return ""
	case loraplexv1.FinishReason_FINISH_REASON_LENGTH, loraplexv1.FinishReason_FINISH_REASON_CONTEXT_LENGTH:
		return "length"
	}
	return "stop"
}

// chunk is the event for one shard message: its tokens' text (and log-probabilities), and the
// finish reason on the last.
func (e *encoder) chunk(m *loraplexv1.GenerateStreamResponse) []byte {
	b := append(e.buf[:0], "data: "...)
	b = e.choice(append(b, e.head...), m.GetTokens(), m.GetFinishReason(), true)
	e.buf = append(b, "]}\n\n"...)
	return e.buf
}

// usageChunk is the last event when stream_options.include_usage is set: no choices, the usage.
func (e *encoder) usageChunk(u *loraplexv1.Usage) []byte {
	b := append(e.buf[:0], "data: "...)
	b = append(b, e.head...)
	b = appendUsage(append(b, "],"...), u)
	e.buf = append(b, "}\n\n"...)
	return e.buf
}

// done ends a stream.
var done = []byte("data: [DONE]\n\n")

// whole is the response of a request that did not stream.
func (e *encoder) whole(tokens []*loraplexv1.Token, finish loraplexv1.FinishReason, u *loraplexv1.Usage) []byte {
	b := e.choice(append(e.buf[:0], e.head...), tokens, finish, false)
	b = appendUsage(append(b, "],"...), u)
	e.buf = append(b, "}\n"...)
	return e.buf
}

// choice appends the one choice: text or message/delta, logprobs, finish_reason.
func (e *encoder) choice(b []byte, tokens []*loraplexv1.Token, finish loraplexv1.FinishReason, stream bool) []byte {
	b = append(b, `{"index":0,`...)
	switch {
	case !e.chat:
		b = append(b, `"text":`...)
	case stream && !e.started:
		e.started = true
		b = append(b, `"delta":{"role":"assistant","content":`...)
	case stream:
		b = append(b, `"delta":{"content":`...)
	default:
		b = append(b, `"message":{"role":"assistant","content":`...)
	}
	b = append(b, '"')
	for _, t := range tokens {
		b = appendEscaped(b, t.GetText())
	}
	b = append(b, '"')
	if e.chat {
		b = append(b, '}')
	}
	b = append(b, `,"logprobs":`...)
	switch {
	case !e.logprobs:
		b = append(b, "null"...)
	case e.chat:
		b = e.chatLogprobs(b, tokens)
	default:
		b = e.completionLogprobs(b, tokens)
	}
	b = append(b, `,"finish_reason":`...)
	if r := finishReason(finish); r != "" {
		b = append(append(append(b, '"'), r...), '"')
	} else {
		b = append(b, "null"...)
	}
	return append(b, '}')
}

// chatLogprobs: {"content":[{"token","logprob","bytes","top_logprobs":[{"token","logprob","bytes"}]}]}.
func (e *encoder) chatLogprobs(b []byte, tokens []*loraplexv1.Token) []byte {
	b = append(b, `{"content":[`...)
	for i, t := range tokens {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendTokenLogprob(b, t.GetText(), t.GetLogprob())
		b = append(b[:len(b)-1], `,"top_logprobs":[`...)
		for j, alt := range t.GetTopLogprobs() {
			if j > 0 {
				b = append(b, ',')
			}
			b = appendTokenLogprob(b, alt.GetText(), alt.GetLogprob())
		}
		b = append(b, "]}"...)
	}
	return append(b, "]}"...)
}

// appendTokenLogprob appends {"token":...,"logprob":...,"bytes":[...]}.
func appendTokenLogprob(b []byte, text string, lp float32) []byte {
	b = append(b, `{"token":`...)
	b = appendString(b, text)
	b = appendLogprob(append(b, `,"logprob":`...), lp)
	b = append(b, `,"bytes":[`...)
	for i := 0; i < len(text); i++ {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendUint(b, uint64(text[i]), 10)
	}
	return append(b, "]}"...)
}

// completionLogprobs: {"tokens":[...],"token_logprobs":[...],"top_logprobs":[{text: logprob}],"text_offset":[...]}.
func (e *encoder) completionLogprobs(b []byte, tokens []*loraplexv1.Token) []byte {
	b = append(b, `{"tokens":[`...)
	for i, t := range tokens {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, t.GetText())
	}
	b = append(b, `],"token_logprobs":[`...)
	for i, t := range tokens {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendLogprob(b, t.GetLogprob())
	}
	b = append(b, `],"top_logprobs":[`...)
	for i, t := range tokens {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, '{')
		for j, alt := range t.GetTopLogprobs() {
			if j > 0 {
				b = append(b, ',')
			}
			b = appendLogprob(append(appendString(b, alt.GetText()), ':'), alt.GetLogprob())
		}
		b = append(b, '}')
	}
	b = append(b, `],"text_offset":[`...)
	for i, t := range tokens {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, int64(e.offset), 10)
		e.offset += len(t.GetText())
	}
	return append(b, "]}"...)
}

func appendUsage(b []byte, u *loraplexv1.Usage) []byte {
	b = append(b, `"usage":{"prompt_tokens":`...)
	b = strconv.AppendUint(b, uint64(u.GetPromptTokens()), 10)
	b = append(b, `,"completion_tokens":`...)
	b = strconv.AppendUint(b, uint64(u.GetGeneratedTokens()), 10)
	b = append(b, `,"total_tokens":`...)
	b = strconv.AppendUint(b, uint64(u.GetPromptTokens())+uint64(u.GetGeneratedTokens()), 10)
	return append(b, '}')
}

// appendLogprob writes a log-probability; JSON has no infinities, so -Inf becomes -9999 (what
// OpenAI reports for an impossible token).
func appendLogprob(b []byte, lp float32) []byte {
	if math.IsInf(float64(lp), 0) || math.IsNaN(float64(lp)) {
		return append(b, "-9999.0"...)
	}
	return strconv.AppendFloat(b, float64(lp), 'g', -1, 32)
}

// appendString appends s as a JSON string.
func appendString(b []byte, s string) []byte {
	return append(appendEscaped(append(b, '"'), s), '"')
}

const hex = "0123456789abcdef"

// appendEscaped appends s's JSON escaping without quotes; invalid UTF-8 becomes U+FFFD, and U+2028
// and U+2029 are escaped as encoding/json does.
func appendEscaped(b []byte, s string) []byte {
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 || r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			switch r {
			case utf8.RuneError:
				b = append(b, `\ufffd`...)
			default:
				b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
			}
			i += size
			start = i
			continue
		}
		i += size
	}
	return append(b, s[start:]...)
}
