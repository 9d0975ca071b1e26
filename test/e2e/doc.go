// Package e2e holds Loraplex's end-to-end tests: real routers and shards serving the embedded tiny
// Llama (test/tinyllama) on loopback ports, driven over real gRPC, with real adapter folders on disk.
// It has no code of its own besides this comment; nothing imports it.
package e2e
