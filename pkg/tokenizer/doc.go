// Package tokenizer turns text into token ids and ids back into text for the
// byte-pair-encoding tokenizers that Hugging Face tokenizer.json files describe:
// byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece-style BPE with byte
// fallback (Llama 2, Mistral). It is pure Go.
//
// For the components it supports it reproduces the ids and the decoded text of
// the Hugging Face tokenizers library:
//
//   - model: BPE (merges as "a b" strings or ["a", "b"] pairs, ignore_merges,
//     byte_fallback, unk_token, fuse_unk, continuing_subword_prefix,
//     end_of_word_suffix);
//   - normalizers: NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Strip,
//     StripAccents, ByteLevel, Sequence;
//   - pre-tokenizers: ByteLevel, Split, Metaspace, Digits, Punctuation,
//     Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit,
//     Sequence;
//   - decoders: ByteLevel, ByteFallback, Fuse, Strip, Replace, Metaspace,
//     BPEDecoder, Sequence;
//   - post-processors: TemplateProcessing (single sequences), ByteLevel,
//     RobertaProcessing, BertProcessing, Sequence;
//   - added tokens with single_word, lstrip, rstrip, normalized and special.
//
// Anything else is refused by Parse with ErrUnsupported and the component's
// name. Split regexes run on github.com/dlclark/regexp2/v2, except the GPT-2,
// Llama 3 and Qwen 2 patterns, which have faster hand-written scanners.
//
// A Tokenizer is immutable and safe for concurrent use; a Stream belongs to one
// generation at a time. Any package may import this one.
package tokenizer
