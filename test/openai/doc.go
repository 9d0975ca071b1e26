// Package openai holds the end-to-end tests of the router's OpenAI-compatible HTTP edge: a real
// router and CPU shards serving the embedded demo model (pkg/demomodel) on loopback, driven by the
// official Go client (github.com/openai/openai-go/v3), by curl-equivalent raw HTTP (the README's
// examples) and, through scripts in test/node, by the official Node client. It has no code of its
// own besides this comment; nothing imports it.
package openai
