// Package tokenizer turns text into token ids and ids back into text for the
// byte-pair-encoding tokenizers that Hugging Face tokenizer.json files describe:
// byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece-style BPE with byte
// fallback (Llama 2, Mistral). It is pure Go.
//
// For the components it supports it reproduces the ids and the decoded text of
// the Hugging Face tokenizers library; any other component is refused at load
// time with ErrUnsupported and the component's name. A Tokenizer is immutable
// and safe for concurrent use; a Stream belongs to one generation at a time.
//
// Any package may import it: it depends only on the standard library,
// golang.org/x/text and github.com/dlclark/regexp2/v2.
package tokenizer
