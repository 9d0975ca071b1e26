// Package cluster holds the multi-process proofs of Loraplex's distributed layer: real shard and
// router binaries, built by the tests, registered with a real Consul dev agent
// (pkg/discovery/consultest), killed, drained and cut off from Consul while serving the embedded
// tiny Llama. The tests are behind the integration build tag:
//
//	go test -tags integration ./test/cluster/
//
// It has no code of its own besides this comment; nothing imports it.
package cluster
