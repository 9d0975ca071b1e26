package chart

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

const monitoringAPI = "monitoring.coreos.com/v1"

// expect is what a values set must render.
type expect struct {
	consul         bool
	tls            bool  // probes use the plaintext health port
	metricsPort    int32 // 0: metrics off
	serviceMonitor bool
	networkPolicy  bool
	hpa            bool
	connect, istio bool
	dashboard      bool
	routerReplicas int32 // 0: left to the HPA
	shardReplicas  int32
	// claims are the PVC names the shards mount, by volume; created lists those the chart makes.
	claims  map[string]string
	created []string
}

type chartCase struct {
	name        string
	values      string // file in testdata, "" for the defaults
	apiVersions []string
	want        expect
}

var defaultClaims = map[string]string{"model": "lp-loraplex-model", "adapters": "lp-loraplex-adapters"}

var cases = []chartCase{
	{name: "defaults", want: expect{networkPolicy: true, hpa: true, shardReplicas: 2,
		claims: defaultClaims, created: []string{"lp-loraplex-model", "lp-loraplex-adapters"}}},
	{name: "defaults with the monitoring API but metrics off", apiVersions: []string{monitoringAPI},
		want: expect{networkPolicy: true, hpa: true, shardReplicas: 2, claims: defaultClaims, created: []string{"lp-loraplex-model", "lp-loraplex-adapters"}}},
	{name: "consul ACL and TLS, app mTLS", values: "consul-acl-tls.yaml", want: expect{consul: true, tls: true, networkPolicy: true, hpa: true,
		shardReplicas: 2, claims: defaultClaims, created: []string{"lp-loraplex-model", "lp-loraplex-adapters"}}},
	{name: "consul connect, metrics without the monitoring API", values: "connect.yaml", want: expect{consul: true, connect: true, metricsPort: 9090,
		networkPolicy: true, hpa: true, shardReplicas: 2, claims: defaultClaims, created: []string{"lp-loraplex-model", "lp-loraplex-adapters"}}},
	{name: "istio", values: "istio.yaml", want: expect{consul: true, istio: true, networkPolicy: true, routerReplicas: 3, shardReplicas: 4,
		claims: defaultClaims, created: []string{"lp-loraplex-model", "lp-loraplex-adapters"}}},
	{name: "existing claims", values: "existing-claims.yaml", want: expect{networkPolicy: true, hpa: true, shardReplicas: 2,
		claims: map[string]string{"model": "llama-3-8b", "adapters": "lora-store"}}},
	{name: "metrics and ServiceMonitor", values: "metrics.yaml", apiVersions: []string{monitoringAPI}, want: expect{metricsPort: 9100,
		serviceMonitor: true, dashboard: true, networkPolicy: true, hpa: true, shardReplicas: 2, claims: defaultClaims,
		created: []string{"lp-loraplex-model", "lp-loraplex-adapters"}}},
	{name: "network policy off", values: "no-networkpolicy.yaml", want: expect{hpa: true, shardReplicas: 2,
		claims: map[string]string{"model": "lp-loraplex-model"}, created: []string{"lp-loraplex-model"}}},
}

func TestLint(t *testing.T) {
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := []string{"lint", "--strict", "--kube-version", kubeVersion, "--namespace", namespace, chartDir(t)}
			if c.values != "" {
				args = append(args, "-f", filepath.Join("testdata", c.values))
			}
			if out, err := runHelm(t, args...); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
		})
	}
}

func TestTemplate(t *testing.T) {
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := render(t, c.values, c.apiVersions)
			checkWorkloads(t, o, c.want)
			checkServices(t, o, c.want)
			checkDisruptionAndScaling(t, o, c.want)
			checkNetworkPolicies(t, o, c.want)
			checkMonitoring(t, o, c.want)
			checkClaims(t, o, c.want)
		})
	}
}

// pod is a workload's pod template with the binary it runs.
type pod struct {
	workload  string
	component string
	replicas  int32
	names     []string // the pod names the workload would create (one sample for a Deployment)
	spec      corev1.PodSpec
	meta      metav1.ObjectMeta
}

func pods(t *testing.T, o objects) []pod {
	t.Helper()
	var out []pod
	for _, d := range typed[*appsv1.Deployment](o) {
		r := int32(0)
		if d.Spec.Replicas != nil {
			r = *d.Spec.Replicas
		}
		checkSelector(t, "Deployment "+d.Name, d.Spec.Selector, d.Spec.Template.Labels)
		out = append(out, pod{workload: "Deployment " + d.Name, component: d.Spec.Template.Labels["app.kubernetes.io/component"],
			replicas: r, names: []string{d.Name + "-5d9c7b8f6-x2x4z"}, spec: d.Spec.Template.Spec, meta: d.Spec.Template.ObjectMeta})
	}
	for _, s := range typed[*appsv1.StatefulSet](o) {
		if s.Spec.Replicas == nil {
			t.Fatalf("StatefulSet %s: no replicas", s.Name)
		}
		checkSelector(t, "StatefulSet "+s.Name, s.Spec.Selector, s.Spec.Template.Labels)
		p := pod{workload: "StatefulSet " + s.Name, component: s.Spec.Template.Labels["app.kubernetes.io/component"],
			replicas: *s.Spec.Replicas, spec: s.Spec.Template.Spec, meta: s.Spec.Template.ObjectMeta}
		for i := range *s.Spec.Replicas {
			p.names = append(p.names, fmt.Sprintf("%s-%d", s.Name, i))
		}
		out = append(out, p)
	}
	return out
}

func checkSelector(t *testing.T, what string, sel *metav1.LabelSelector, podLabels map[string]string) {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil || s.Empty() {
		t.Errorf("%s: bad selector %v: %v", what, sel, err)
		return
	}
	if !s.Matches(labels.Set(podLabels)) {
		t.Errorf("%s: selector %v does not match its pod labels %v", what, sel, podLabels)
	}
}

func checkWorkloads(t *testing.T, o objects, want expect) {
	t.Helper()
	ps := pods(t, o)
	var router, shard *pod
	for i := range ps {
		switch ps[i].component {
		case "router":
			router = &ps[i]
		case "shard":
			shard = &ps[i]
		default:
			t.Errorf("%s: unknown component %q", ps[i].workload, ps[i].component)
		}
	}
	if router == nil || shard == nil || len(ps) != 2 {
		t.Fatalf("want one router Deployment and one shard StatefulSet, got %d workloads", len(ps))
	}
	if !strings.HasPrefix(router.workload, "Deployment ") || !strings.HasPrefix(shard.workload, "StatefulSet ") {
		t.Errorf("router is a %s, shard a %s", router.workload, shard.workload)
	}
	if router.replicas != want.routerReplicas {
		t.Errorf("router replicas %d, want %d (0: left to the HPA)", router.replicas, want.routerReplicas)
	}
	if shard.replicas != want.shardReplicas {
		t.Errorf("shard replicas %d, want %d", shard.replicas, want.shardReplicas)
	}
	args := map[string]*parsed{}
	for _, p := range ps {
		args[p.component] = checkPod(t, p, want)
	}
	if t.Failed() {
		return
	}
	r, s := args["router"], args["shard"]
	if want.consul {
		if r.router.Discovery.Addr == "" || s.shard.Discovery.Addr == "" || len(r.router.Shards) != 0 {
			t.Errorf("consul: router -consul=%q -shards=%v, shard -consul=%q", r.router.Discovery.Addr, r.router.Shards, s.shard.Discovery.Addr)
		}
	} else {
		checkStaticShards(t, o, r.router.Shards, shard)
	}
	if want.tls {
		if r.router.ShardTLS.CAFile == "" || r.router.ShardTLS.ServerNameOverride == "" || r.router.GRPC.TLS.CertFile == "" || s.shard.GRPC.TLS.CertFile == "" {
			t.Errorf("tls: router %+v %+v, shard %+v", r.router.GRPC.TLS, r.router.ShardTLS, s.shard.GRPC.TLS)
		}
		if s.shard.GRPC.TLS.ClientCAFile != "" && r.router.ShardTLS.CertFile == "" {
			t.Error("shards require client certificates but the router presents none")
		}
	}
}

// checkPod checks one pod template and returns its parsed args.
func checkPod(t *testing.T, p pod, want expect) *parsed {
	t.Helper()
	spec := p.spec
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: %d containers, want 1", p.workload, len(spec.Containers))
	}
	c := spec.Containers[0]
	what := p.workload + " container " + c.Name

	// Security.
	psc := spec.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: pod securityContext %+v: want runAsNonRoot and seccomp RuntimeDefault", p.workload, psc)
	}
	if psc != nil && psc.RunAsUser != nil && *psc.RunAsUser == 0 {
		t.Errorf("%s: runAsUser 0", p.workload)
	}
	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Errorf("%s: no securityContext", what)
	case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot:
		t.Errorf("%s: runAsNonRoot not true", what)
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Errorf("%s: root filesystem writable", what)
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Errorf("%s: privilege escalation allowed", what)
	case sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) != 0:
		t.Errorf("%s: capabilities %+v, want drop ALL and add none", what, sc.Capabilities)
	case sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
		t.Errorf("%s: seccomp %+v", what, sc.SeccompProfile)
	case sc.Privileged != nil && *sc.Privileged:
		t.Errorf("%s: privileged", what)
	}

	// Resources.
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, okReq := c.Resources.Requests[r]
		lim, okLim := c.Resources.Limits[r]
		if !okReq || !okLim || req.IsZero() || lim.Cmp(req) < 0 {
			t.Errorf("%s: %s request %v limit %v: want both, limit >= request", what, r, req.String(), lim.String())
		}
	}
	gpu := c.Resources.Limits["nvidia.com/gpu"]
	if p.component == "shard" && !gpu.Equal(resource.MustParse("1")) {
		t.Errorf("%s: nvidia.com/gpu limit %v, want 1", what, gpu.String())
	}
	if p.component == "router" && !gpu.IsZero() {
		t.Errorf("%s: the router asks for a GPU", what)
	}

	// Args, parsed by the binary's flags for every pod the workload creates.
	var args *parsed
	for _, name := range p.names {
		env := containerEnv(c, name)
		a, err := parseArgs(p.component, c, env)
		if err != nil {
			t.Fatalf("%s (pod %s): %v", what, name, err)
		}
		args = a
		if p.component == "shard" {
			if a.shard.ShardID != name {
				t.Errorf("%s: -shard-id %q, want the pod name %q", what, a.shard.ShardID, name)
			}
			if want := net.JoinHostPort(fakePodIP, strconv.Itoa(int(a.listenPort))); a.shard.Advertise != want {
				t.Errorf("%s: -advertise %q, want %q (pod IP and the -listen port)", what, a.shard.Advertise, want)
			}
		}
	}

	// Ports: the grpc port is the -listen port; the metrics port is -metrics-listen's.
	ports := map[string]int32{}
	for _, cp := range c.Ports {
		ports[cp.Name] = cp.ContainerPort
	}
	if ports["grpc"] != args.listenPort {
		t.Errorf("%s: container port grpc %d, -listen port %d", what, ports["grpc"], args.listenPort)
	}
	if want.metricsPort == 0 {
		if args.metricsListen != "" {
			t.Errorf("%s: -metrics-listen=%s with metrics off", what, args.metricsListen)
		}
		if _, ok := ports["http-metrics"]; ok {
			t.Errorf("%s: metrics port with metrics off", what)
		}
	} else {
		_, mp, err := net.SplitHostPort(args.metricsListen)
		if err != nil || mp != strconv.Itoa(int(want.metricsPort)) || ports["http-metrics"] != want.metricsPort {
			t.Errorf("%s: -metrics-listen=%q, container port http-metrics %d, want %d", what, args.metricsListen, ports["http-metrics"], want.metricsPort)
		}
	}
	if len(ports) != len(c.Ports) {
		t.Errorf("%s: duplicate port names %v", what, c.Ports)
	}

	// Probes: the kubelet's gRPC probe on the -listen port; with TLS on, on the plaintext
	// -health-listen port (the kubelet cannot speak TLS), exposed as grpc-health.
	if want.tls {
		if args.healthPort == 0 || ports["grpc-health"] != args.healthPort {
			t.Errorf("%s: TLS on: -health-listen port %d, container port grpc-health %d", what, args.healthPort, ports["grpc-health"])
		}
	} else if args.healthPort != 0 {
		t.Errorf("%s: -health-listen without TLS", what)
	}
	for kind, pr := range map[string]*corev1.Probe{"startup": c.StartupProbe, "readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		switch {
		case pr == nil:
			t.Errorf("%s: no %s probe", what, kind)
		case want.tls:
			if pr.GRPC == nil || pr.GRPC.Port != args.healthPort || pr.TCPSocket != nil || pr.Exec != nil || pr.HTTPGet != nil {
				t.Errorf("%s: %s probe %+v: want grpc on the health port %d with TLS on", what, kind, pr.ProbeHandler, args.healthPort)
			}
		default:
			if pr.GRPC == nil || pr.GRPC.Port != args.listenPort || pr.Exec != nil || pr.HTTPGet != nil || pr.TCPSocket != nil {
				t.Errorf("%s: %s probe %+v: want grpc on port %d", what, kind, pr.ProbeHandler, args.listenPort)
			}
		}
	}

	// Draining: preStop sleep, then SIGTERM and -drain-timeout, all inside the grace period.
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil {
		t.Fatalf("%s: no preStop sleep", what)
	}
	drain := int64(args.drain.Seconds()) + c.Lifecycle.PreStop.Sleep.Seconds
	if spec.TerminationGracePeriodSeconds == nil {
		t.Fatalf("%s: no terminationGracePeriodSeconds", what)
	}
	if grace := *spec.TerminationGracePeriodSeconds; grace <= drain {
		t.Errorf("%s: terminationGracePeriodSeconds %d, want more than preStop + -drain-timeout = %ds", what, grace, drain)
	}

	// Volumes: every mount has a volume, every path flag lies under a mount.
	vols := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		vols[v.Name] = v
	}
	for _, m := range c.VolumeMounts {
		if _, ok := vols[m.Name]; !ok {
			t.Errorf("%s: mount %s has no volume", what, m.Name)
		}
	}
	for flagName, path := range args.paths {
		m := mountOf(c, path)
		if m == nil {
			t.Errorf("%s: -%s=%s lies under no volume mount", what, flagName, path)
			continue
		}
		if v := vols[m.Name]; v.Secret != nil && strings.Contains(flagName, "file") && !m.ReadOnly {
			t.Errorf("%s: secret %s mounted writable", what, v.Secret.SecretName)
		}
	}
	if p.component == "shard" {
		for vol, claim := range want.claims {
			v, ok := vols[vol]
			if !ok || v.PersistentVolumeClaim == nil || v.PersistentVolumeClaim.ClaimName != claim {
				t.Errorf("%s: volume %s %+v, want claim %s", what, vol, v.VolumeSource, claim)
			}
		}
		if m := mountOf(c, args.shard.ModelDir); m == nil || !m.ReadOnly || m.Name != "model" {
			t.Errorf("%s: -model=%s not on the read-only model volume", what, args.shard.ModelDir)
		}
		if _, ok := want.claims["adapters"]; ok != (args.shard.AdapterDir != "") {
			t.Errorf("%s: -adapters=%q with adapter claim %v", what, args.shard.AdapterDir, ok)
		}
	}
	if mountOf(c, "/tmp/x") == nil {
		t.Errorf("%s: no writable /tmp with a read-only root filesystem", what)
	}

	// Scheduling and identity.
	if len(spec.TopologySpreadConstraints) == 0 {
		t.Errorf("%s: no topologySpreadConstraints", what)
	}
	for _, tsc := range spec.TopologySpreadConstraints {
		checkSelector(t, what+" topology spread", tsc.LabelSelector, p.meta.Labels)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken != want.connect {
		t.Errorf("%s: automountServiceAccountToken %v, want %v (only Consul Connect needs it)", what, spec.AutomountServiceAccountToken, want.connect)
	}
	if got := p.meta.Annotations["consul.hashicorp.com/connect-inject"] == "true"; got != want.connect {
		t.Errorf("%s: connect-inject %v, want %v", what, got, want.connect)
	}
	if want.connect && p.meta.Annotations["consul.hashicorp.com/connect-service"] != spec.ServiceAccountName {
		t.Errorf("%s: Connect service %q must match the service account %q", what, p.meta.Annotations["consul.hashicorp.com/connect-service"], spec.ServiceAccountName)
	}
	if got := p.meta.Labels["sidecar.istio.io/inject"] == "true"; got != want.istio {
		t.Errorf("%s: istio injection %v, want %v", what, got, want.istio)
	}
	if want.istio {
		var cfg struct {
			Hold  bool   `json:"holdApplicationUntilProxyStarts"`
			Drain string `json:"terminationDrainDuration"`
		}
		if err := json.Unmarshal([]byte(p.meta.Annotations["proxy.istio.io/config"]), &cfg); err != nil || !cfg.Hold || cfg.Drain != fmt.Sprintf("%ds", *spec.TerminationGracePeriodSeconds) {
			t.Errorf("%s: proxy.istio.io/config %q (%v): want the proxy up first and kept for the grace period", what, p.meta.Annotations["proxy.istio.io/config"], err)
		}
	}
	return args
}

// mountOf is the container's mount holding path.
func mountOf(c corev1.Container, path string) *corev1.VolumeMount {
	for i, m := range c.VolumeMounts {
		if path == m.MountPath || strings.HasPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/") {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

// checkStaticShards: without Consul the router lists every StatefulSet pod by its stable DNS name,
// with the pod name as the shard id the shard itself uses.
func checkStaticShards(t *testing.T, o objects, shards []string, shard *pod) {
	t.Helper()
	sts := typed[*appsv1.StatefulSet](o)[0]
	if len(shards) != len(shard.names) {
		t.Fatalf("router -shards %v, want the %d StatefulSet pods", shards, len(shard.names))
	}
	for i, e := range shards {
		id, addr, _ := strings.Cut(e, "=")
		want := fmt.Sprintf("%s.%s.%s.svc.cluster.local", shard.names[i], sts.Spec.ServiceName, namespace)
		host, port, err := net.SplitHostPort(addr)
		if id != shard.names[i] || host != want || err != nil || port != strconv.Itoa(int(shard.spec.Containers[0].Ports[0].ContainerPort)) {
			t.Errorf("router -shards entry %q, want %s=%s:<shard port>", e, shard.names[i], want)
		}
	}
	for _, svc := range typed[*corev1.Service](o) {
		if svc.Name == sts.Spec.ServiceName {
			if svc.Spec.ClusterIP != corev1.ClusterIPNone {
				t.Errorf("StatefulSet service %s is not headless", svc.Name)
			}
			return
		}
	}
	t.Errorf("no Service %s for the StatefulSet's pod DNS names", sts.Spec.ServiceName)
}

func checkServices(t *testing.T, o objects, want expect) {
	t.Helper()
	ps := pods(t, o)
	metricsSvc := 0
	for _, svc := range typed[*corev1.Service](o) {
		sel := labels.SelectorFromSet(svc.Spec.Selector)
		var selected []pod
		for _, p := range ps {
			if len(svc.Spec.Selector) > 0 && sel.Matches(labels.Set(p.meta.Labels)) {
				selected = append(selected, p)
			}
		}
		if len(selected) == 0 {
			t.Errorf("Service %s selects no pods", svc.Name)
		}
		for _, sp := range svc.Spec.Ports {
			if sp.TargetPort.String() != sp.Name {
				t.Errorf("Service %s port %s targets %s: target the container port by name", svc.Name, sp.Name, sp.TargetPort.String())
			}
			for _, p := range selected {
				if !slices.ContainsFunc(p.spec.Containers[0].Ports, func(cp corev1.ContainerPort) bool { return cp.Name == sp.TargetPort.StrVal }) {
					t.Errorf("Service %s port %s: %s has no container port %s", svc.Name, sp.Name, p.workload, sp.TargetPort.StrVal)
				}
			}
			// Istio picks the protocol from the name prefix or appProtocol.
			switch {
			case strings.HasPrefix(sp.Name, "grpc"):
				if sp.AppProtocol == nil || *sp.AppProtocol != "grpc" {
					t.Errorf("Service %s port %s: appProtocol %v, want grpc", svc.Name, sp.Name, sp.AppProtocol)
				}
			case sp.Name == "http": // the OpenAI-compatible API
				if sp.AppProtocol == nil || *sp.AppProtocol != "http" {
					t.Errorf("Service %s port %s: appProtocol %v, want http", svc.Name, sp.Name, sp.AppProtocol)
				}
			case sp.Name == "http-metrics":
				metricsSvc++
				if sp.Port != want.metricsPort {
					t.Errorf("Service %s metrics port %d, want %d", svc.Name, sp.Port, want.metricsPort)
				}
			default:
				t.Errorf("Service %s port %q: name it grpc*, http or http-metrics", svc.Name, sp.Name)
			}
		}
	}
	if (metricsSvc > 0) != (want.metricsPort != 0) {
		t.Errorf("%d metrics Service ports with metrics port %d", metricsSvc, want.metricsPort)
	}
	if want.istio {
		for _, svc := range typed[*corev1.Service](o) {
			if svc.Labels["app.kubernetes.io/component"] == "router" && svc.Spec.Type != corev1.ServiceTypeLoadBalancer {
				t.Errorf("router Service type %s, want the values' LoadBalancer", svc.Spec.Type)
			}
		}
	}
}

func checkDisruptionAndScaling(t *testing.T, o objects, want expect) {
	t.Helper()
	ps := pods(t, o)
	pdbs := typed[*policyv1.PodDisruptionBudget](o)
	if len(pdbs) != 2 {
		t.Errorf("%d PodDisruptionBudgets, want one each for router and shards", len(pdbs))
	}
	for _, pdb := range pdbs {
		n := 0
		for _, p := range ps {
			s, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
			if err == nil && s.Matches(labels.Set(p.meta.Labels)) {
				n++
			}
		}
		if n != 1 || (pdb.Spec.MaxUnavailable == nil && pdb.Spec.MinAvailable == nil) {
			t.Errorf("PodDisruptionBudget %s selects %d workloads, budget %v/%v", pdb.Name, n, pdb.Spec.MaxUnavailable, pdb.Spec.MinAvailable)
		}
	}
	hpas := typed[*autoscalingv2.HorizontalPodAutoscaler](o)
	if (len(hpas) == 1) != want.hpa || len(hpas) > 1 {
		t.Fatalf("%d HorizontalPodAutoscalers, want hpa=%v", len(hpas), want.hpa)
	}
	for _, h := range hpas {
		deps := typed[*appsv1.Deployment](o)
		ref := h.Spec.ScaleTargetRef
		if ref.Kind != "Deployment" || ref.APIVersion != "apps/v1" || ref.Name != deps[0].Name || deps[0].Spec.Template.Labels["app.kubernetes.io/component"] != "router" {
			t.Errorf("HPA targets %+v, want the router Deployment", ref)
		}
		if h.Spec.MinReplicas == nil || *h.Spec.MinReplicas < 1 || h.Spec.MaxReplicas < *h.Spec.MinReplicas || len(h.Spec.Metrics) == 0 {
			t.Errorf("HPA %s: bounds %v..%d, %d metrics", h.Name, h.Spec.MinReplicas, h.Spec.MaxReplicas, len(h.Spec.Metrics))
		}
	}
}

func checkNetworkPolicies(t *testing.T, o objects, want expect) {
	t.Helper()
	nps := typed[*networkingv1.NetworkPolicy](o)
	if !want.networkPolicy {
		if len(nps) != 0 {
			t.Errorf("%d NetworkPolicies with networkPolicy.enabled false", len(nps))
		}
		return
	}
	if len(nps) != 2 {
		t.Fatalf("%d NetworkPolicies, want one each for router and shards", len(nps))
	}
	for _, p := range pods(t, o) {
		var np *networkingv1.NetworkPolicy
		for _, x := range nps {
			s, err := metav1.LabelSelectorAsSelector(&x.Spec.PodSelector)
			if err == nil && !s.Empty() && s.Matches(labels.Set(p.meta.Labels)) {
				np = x
			}
		}
		if np == nil {
			t.Errorf("%s: no NetworkPolicy selects it", p.workload)
			continue
		}
		open := map[int32]bool{}
		for _, rule := range np.Spec.Ingress {
			for _, port := range rule.Ports {
				open[int32(port.Port.IntValue())] = true
			}
			if p.component == "shard" && slices.Contains(portsOf(rule), p.spec.Containers[0].Ports[0].ContainerPort) {
				routerAllowed := slices.ContainsFunc(rule.From, func(peer networkingv1.NetworkPolicyPeer) bool {
					return peer.PodSelector != nil && peer.PodSelector.MatchLabels["app.kubernetes.io/component"] == "router"
				})
				if !routerAllowed || len(rule.From) == 0 {
					t.Errorf("shard NetworkPolicy gRPC rule %+v: want it open to the routers only (and named peers)", rule.From)
				}
			}
		}
		for _, cp := range p.spec.Containers[0].Ports {
			if !open[cp.ContainerPort] {
				t.Errorf("NetworkPolicy %s leaves container port %s (%d) closed", np.Name, cp.Name, cp.ContainerPort)
			}
		}
	}
}

func portsOf(rule networkingv1.NetworkPolicyIngressRule) []int32 {
	var out []int32
	for _, p := range rule.Ports {
		out = append(out, int32(p.Port.IntValue()))
	}
	return out
}

// checkMonitoring: a ServiceMonitor only with metrics on and the monitoring API present, scraping
// the metrics Service's port; the dashboard ConfigMap with Grafana's label.
func checkMonitoring(t *testing.T, o objects, want expect) {
	t.Helper()
	sms := typed[*monitoringv1.ServiceMonitor](o)
	if (len(sms) > 0) != want.serviceMonitor || len(sms) > 1 {
		t.Fatalf("%d ServiceMonitors, want %v", len(sms), want.serviceMonitor)
	}
	for _, sm := range sms {
		s, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, svc := range typed[*corev1.Service](o) {
			if !s.Matches(labels.Set(svc.Labels)) {
				continue
			}
			n++
			for _, ep := range sm.Spec.Endpoints {
				if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == ep.Port && p.Port == want.metricsPort }) {
					t.Errorf("ServiceMonitor endpoint port %q is not Service %s's metrics port", ep.Port, svc.Name)
				}
			}
		}
		if n != 1 || len(sm.Spec.Endpoints) == 0 || !slices.Equal(sm.Spec.NamespaceSelector.MatchNames, []string{namespace}) {
			t.Errorf("ServiceMonitor selects %d Services, %d endpoints, namespaces %v", n, len(sm.Spec.Endpoints), sm.Spec.NamespaceSelector.MatchNames)
		}
		if sm.Labels["release"] != "kube-prometheus-stack" {
			t.Errorf("ServiceMonitor labels %v lack the values' release label", sm.Labels)
		}
	}
	var dashboards []*corev1.ConfigMap
	for _, cm := range typed[*corev1.ConfigMap](o) {
		if cm.Labels["grafana_dashboard"] == "1" {
			dashboards = append(dashboards, cm)
		}
	}
	if (len(dashboards) == 1) != want.dashboard || len(dashboards) > 1 {
		t.Fatalf("%d dashboard ConfigMaps, want %v", len(dashboards), want.dashboard)
	}
	for _, cm := range dashboards {
		checkDashboard(t, []byte(cm.Data["loraplex.json"]))
	}
}

func checkClaims(t *testing.T, o objects, want expect) {
	t.Helper()
	var got []string
	for _, pvc := range typed[*corev1.PersistentVolumeClaim](o) {
		got = append(got, pvc.Name)
		size := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
		if size.IsZero() || len(pvc.Spec.AccessModes) == 0 {
			t.Errorf("PVC %s: size %v, access modes %v", pvc.Name, size.String(), pvc.Spec.AccessModes)
		}
		if pvc.Annotations["helm.sh/resource-policy"] != "keep" {
			t.Errorf("PVC %s would be deleted with the release, and the model with it", pvc.Name)
		}
	}
	slices.Sort(got)
	wantCreated := slices.Sorted(slices.Values(want.created))
	if !slices.Equal(got, wantCreated) {
		t.Errorf("PVCs %v, want %v", got, wantCreated)
	}
}

// dashboardMetrics are the Prometheus names of the engine's OTel instruments the dashboard plots.
var dashboardMetrics = []string{
	"loraplex_engine_queue_depth", "loraplex_engine_running", "loraplex_engine_batch_tokens_bucket",
	"loraplex_engine_generated_tokens_total", "loraplex_engine_time_to_first_token_seconds_bucket",
	"loraplex_engine_time_per_output_token_seconds_bucket", "loraplex_engine_preemptions_total",
	"loraplex_kv_blocks_used", "loraplex_kv_blocks_free", "loraplex_engine_adapters_running",
}

func checkDashboard(t *testing.T, b []byte) {
	t.Helper()
	var d struct {
		UID    string `json:"uid"`
		Title  string `json:"title"`
		Panels []struct {
			ID      int    `json:"id"`
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	if d.UID == "" || d.Title == "" || len(d.Panels) == 0 {
		t.Fatalf("dashboard uid %q title %q, %d panels", d.UID, d.Title, len(d.Panels))
	}
	ids := map[int]bool{}
	var exprs []string
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("dashboard panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type != "row" && len(p.Targets) == 0 {
			t.Errorf("dashboard panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	all := strings.Join(exprs, "\n")
	for _, m := range dashboardMetrics {
		if !strings.Contains(all, m) {
			t.Errorf("dashboard plots no %s", m)
		}
	}
}

// TestDashboardFile checks the shipped dashboard itself, helm or not.
func TestDashboardFile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "charts", "loraplex", "dashboards", "loraplex.json"))
	if err != nil {
		t.Fatal(err)
	}
	checkDashboard(t, b)
}

// TestValuesRejected: the schema and the templates refuse values that would deploy something
// broken.
func TestValuesRejected(t *testing.T) {
	for _, c := range []struct {
		name string
		set  []string
		want string
	}{
		{"unknown key", []string{"shard.replica=3"}, "additional properties 'replica' not allowed"},
		{"port out of range", []string{"router.port=0"}, "/router/port"},
		{"unknown backend", []string{"shard.backend=tpu"}, "/shard/backend"},
		{"root", []string{"securityContext.runAsNonRoot=false"}, "/securityContext/runAsNonRoot"},
		{"tls without secrets", []string{"tls.enabled=true"}, "/tls/router/existingSecret"},
		{"consul tls without a secret", []string{"consul.enabled=true", "consul.tls.enabled=true"}, "/consul/tls/existingSecret"},
		{"grace period shorter than the drain", []string{"shard.terminationGracePeriodSeconds=30"}, "must exceed preStopSleepSeconds + drainTimeoutSeconds"},
		{"resources without limits", []string{"router.resources.limits=null"}, "/router/resources"},
		{"no served model name", []string{"router.http.servedModelName="}, "/router/http/servedModelName"},
		{"a CORS origin with a comma", []string{`router.http.corsOrigins[0]=a\,b`}, "/router/http/corsOrigins/0"},
		{"HTTP port out of range", []string{"router.http.port=70000"}, "/router/http/port"},
	} {
		t.Run(c.name, func(t *testing.T) {
			out, err := runHelm(t, templateArgs(t, "", nil, c.set...)...)
			if err == nil {
				t.Fatalf("helm template accepted %v:\n%.300s", c.set, out)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want it to mention %q", err, c.want)
			}
		})
	}
}
