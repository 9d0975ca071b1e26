// Package chart holds the tests of the Helm chart in charts/loraplex: helm lint and helm template
// over several values sets, every rendered object decoded strictly into its Kubernetes API type,
// and the container args parsed by the router's and shard's own flag sets. It has no code of its
// own besides this comment; nothing imports it. The tests find helm through $HELM, PATH or
// $(go env GOPATH)/bin and skip without one; a $HELM that names no binary fails them (CI sets it).
package chart
