package chart

import (
	"flag"
	"fmt"
	"io"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/loraplex/loraplex/pkg/telemetry"
	routerapp "github.com/loraplex/loraplex/router/app"
	shardapp "github.com/loraplex/loraplex/shard/app"
)

// parsed is a container's args as its binary reads them.
type parsed struct {
	listenPort    int32
	healthPort    int32 // -health-listen's port (0: none)
	drain         time.Duration
	metricsListen string
	router        *routerapp.Config
	shard         *shardapp.Config
	// paths are the flag values that name files or folders in the container.
	paths map[string]string
}

// flagSet builds the flag set the binary's main builds: the app's flags, telemetry's, and
// -drain-timeout (declared in main, so mirrored here).
func flagSet(component string) (*flag.FlagSet, *parsed) {
	fs := flag.NewFlagSet(component, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	p := &parsed{}
	switch component {
	case "router":
		cfg := routerapp.DefaultConfig()
		cfg.AddFlags(fs)
		p.router = &cfg
	case "shard":
		cfg := shardapp.DefaultConfig()
		cfg.AddFlags(fs)
		p.shard = &cfg
	}
	tel := telemetry.DefaultOptions()
	tel.AddFlags(fs)
	fs.DurationVar(&p.drain, "drain-timeout", 30*time.Second, "")
	return fs, p
}

var pathFlags = regexp.MustCompile(`^(model|adapters|.*-file|(shard-)?tls-(cert|key|ca|client-ca))$`)

// parseArgs expands $(VAR) references like the kubelet and parses the args with the binary's
// flags, then runs the binary's own validation.
func parseArgs(component string, c corev1.Container, env map[string]string) (*parsed, error) {
	fs, p := flagSet(component)
	args := make([]string, len(c.Args))
	for i, a := range c.Args {
		x, err := expand(a, env)
		if err != nil {
			return nil, err
		}
		args[i] = x
	}
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("%s args %q: %w", component, args, err)
	}
	if fs.NArg() != 0 {
		return nil, fmt.Errorf("%s args: stray positional arguments %q", component, fs.Args())
	}
	var listen string
	switch component {
	case "router":
		if err := p.router.Validate(); err != nil {
			return nil, err
		}
		listen = p.router.Listen
	case "shard":
		if err := p.shard.Validate(); err != nil {
			return nil, err
		}
		listen = p.shard.Listen
	}
	_, port, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, fmt.Errorf("-listen %q: %w", listen, err)
	}
	n, err := strconv.ParseInt(port, 10, 32)
	if err != nil || n <= 0 {
		return nil, fmt.Errorf("-listen %q: no fixed port", listen)
	}
	p.listenPort = int32(n)
	p.metricsListen = fs.Lookup("metrics-listen").Value.String()
	if hl := fs.Lookup("health-listen").Value.String(); hl != "" {
		_, hp, err := net.SplitHostPort(hl)
		if err != nil {
			return nil, fmt.Errorf("-health-listen %q: %w", hl, err)
		}
		n, err := strconv.ParseInt(hp, 10, 32)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("-health-listen %q: no fixed port", hl)
		}
		p.healthPort = int32(n)
	}
	p.paths = map[string]string{}
	fs.Visit(func(f *flag.Flag) {
		if pathFlags.MatchString(f.Name) {
			p.paths[f.Name] = f.Value.String()
		}
	})
	return p, nil
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// expand replaces $(VAR) with the container's env; the kubelet would leave an undefined
// reference as it is, which is always a chart bug here.
func expand(s string, env map[string]string) (string, error) {
	var missing string
	out := varRef.ReplaceAllStringFunc(s, func(m string) string {
		name := varRef.FindStringSubmatch(m)[1]
		v, ok := env[name]
		if !ok {
			missing = name
		}
		return v
	})
	if missing != "" {
		return "", fmt.Errorf("arg %q refers to $(%s), which the container's env does not define", s, missing)
	}
	return out, nil
}

// Values the downward API would give a pod in the tests.
const (
	fakePodIP  = "10.20.30.40"
	fakeHostIP = "10.20.0.1"
)

// containerEnv resolves the container's env as the kubelet would for a pod named podName.
func containerEnv(c corev1.Container, podName string) map[string]string {
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil:
			switch e.ValueFrom.FieldRef.FieldPath {
			case "metadata.name":
				env[e.Name] = podName
			case "metadata.namespace":
				env[e.Name] = namespace
			case "status.podIP":
				env[e.Name] = fakePodIP
			case "status.hostIP":
				env[e.Name] = fakeHostIP
			}
		default:
			env[e.Name] = "from-" + e.Name
		}
	}
	return env
}

// TestShardCUDAArgs checks the CUDA backend's switches reach the shard: on by default, settable from
// values, and absent with the cpu backend.
func TestShardCUDAArgs(t *testing.T) {
	for _, c := range []struct {
		name          string
		set           []string
		backend       string
		graphs, fused bool
		staging       int64
		kv            string
		invariant     bool
		clusters      bool
	}{
		{"defaults", nil, "cuda", true, true, 0, "bf16", false, true},
		{"switched off", []string{"shard.cuda.stepGraphs=false", "shard.cuda.fusion=false", "shard.cuda.stagingBytes=67108864",
			"shard.cuda.kvDtype=f32", "shard.cuda.batchInvariant=true", "shard.cuda.clusters=false"}, "cuda", false, false, 64 << 20, "f32", true, false},
		{"cpu", []string{"shard.backend=cpu", "shard.cuda.stepGraphs=false"}, "cpu", true, true, 0, "bf16", false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := render(t, "", nil, c.set...)
			found := false
			for _, p := range pods(t, o) {
				if p.component != "shard" {
					continue
				}
				found = true
				ct := p.spec.Containers[0]
				a, err := parseArgs("shard", ct, containerEnv(ct, p.names[0]))
				if err != nil {
					t.Fatal(err)
				}
				s := a.shard
				if s.Backend != c.backend || s.CUDA.StepGraphs != c.graphs || s.CUDA.Fusion != c.fused || s.CUDA.StagingBytes != c.staging ||
					s.CUDA.KVDType != c.kv || s.CUDA.BatchInvariant != c.invariant || s.CUDA.Clusters != c.clusters {
					t.Errorf("shard parsed -backend %s, cuda %+v; want %s, graphs %v, fusion %v, staging %d, clusters %v (args %v)",
						s.Backend, s.CUDA, c.backend, c.graphs, c.fused, c.staging, c.clusters, ct.Args)
				}
				if c.backend == "cpu" && slices.ContainsFunc(ct.Args, func(a string) bool { return strings.HasPrefix(a, "-cuda-") }) {
					t.Errorf("cpu shard gets cuda flags: %v", ct.Args)
				}
			}
			if !found {
				t.Fatal("no shard workload rendered")
			}
		})
	}
}
