// Package bench is the load generator of `loraplex bench` and `loraplex-dev compare`: a seeded
// open-loop trace (Poisson arrivals, Zipf adapter popularity), its replay against a router, latency
// and throughput summaries, adapter cache hit rates, and the JSON and PNG report. It links no
// server code; only cmd/... imports it.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

// Spec is the load: the same spec and seed give the same trace.
type Spec struct {
	Rate          float64  `json:"rate_per_s"`
	Duration      string   `json:"duration,omitempty"`
	Requests      int      `json:"requests,omitempty"`
	Concurrency   int      `json:"concurrency"`
	Adapters      []string `json:"adapters"`
	ZipfS         float64  `json:"zipf_s"`
	BaseFraction  float64  `json:"base_fraction"`
	PromptTokens  intRange `json:"prompt_tokens"`
	MaxNewTokens  intRange `json:"max_new_tokens"`
	IgnoreEOS     bool     `json:"ignore_eos"`
	Seed          uint64   `json:"seed"`
	Timeout       string   `json:"request_timeout"`
	duration      time.Duration
	timeout       time.Duration
	adapterPrefix string
	adapterCount  int
	adapterList   string
}

// intRange is "N" or "LO-HI" (uniform).
type intRange struct {
	Lo int `json:"lo"`
	Hi int `json:"hi"`
}

func (r *intRange) String() string {
	if r.Lo == r.Hi {
		return strconv.Itoa(r.Lo)
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}

func (r *intRange) Set(s string) error {
	lo, hi, ok := strings.Cut(s, "-")
	if !ok {
		hi = lo
	}
	a, err1 := strconv.Atoi(strings.TrimSpace(lo))
	b, err2 := strconv.Atoi(strings.TrimSpace(hi))
	if err1 != nil || err2 != nil || a < 1 || b < a {
		return fmt.Errorf("want N or LO-HI with 1 <= LO <= HI, got %q", s)
	}
	r.Lo, r.Hi = a, b
	return nil
}

func (r intRange) draw(rng *rand.Rand) int { return r.Lo + rng.IntN(r.Hi-r.Lo+1) }

// AddFlags binds the spec to fs; the current values are the defaults.
func (s *Spec) AddFlags(fs *flag.FlagSet) {
	fs.Float64Var(&s.Rate, "rate", s.Rate, "mean arrival rate, requests/s (Poisson arrivals)")
	fs.DurationVar(&s.duration, "duration", s.duration, "how long requests keep arriving (ignored with --requests)")
	fs.IntVar(&s.Requests, "requests", s.Requests, "number of requests to send (0: as many as --duration brings)")
	fs.IntVar(&s.Concurrency, "concurrency", s.Concurrency, "most requests in flight; arrivals beyond it wait for a slot (the wait is reported) (0: no cap)")
	fs.IntVar(&s.adapterCount, "adapters", s.adapterCount, "number of adapter ids: PREFIX00, PREFIX01, ... (most popular first)")
	fs.StringVar(&s.adapterPrefix, "adapter-prefix", s.adapterPrefix, "adapter id prefix (with --adapters)")
	fs.StringVar(&s.adapterList, "adapter-list", "", "comma-separated adapter ids, most popular first (instead of --adapters and --adapter-prefix)")
	fs.Float64Var(&s.ZipfS, "zipf-s", s.ZipfS, "Zipf exponent of adapter popularity: adapter k is drawn with weight 1/(k+1)^s (0: uniform)")
	fs.Float64Var(&s.BaseFraction, "base-fraction", s.BaseFraction, "fraction of requests for the base model (no adapter)")
	fs.Var(&s.PromptTokens, "prompt-tokens", "prompt length in tokens, N or LO-HI uniform (synthetic text, approximate; the measured count is reported)")
	fs.Var(&s.MaxNewTokens, "max-new-tokens", "output length, N or LO-HI uniform")
	fs.BoolVar(&s.IgnoreEOS, "ignore-eos", s.IgnoreEOS, "generate max-new-tokens even past end-of-sequence, so output lengths follow the distribution")
	fs.Uint64Var(&s.Seed, "seed", s.Seed, "trace seed: arrivals, adapters, lengths and prompts")
	fs.DurationVar(&s.timeout, "request-timeout", s.timeout, "deadline of each request")
}

// DefaultSpec is the load `loraplex bench` sends unless told otherwise.
func DefaultSpec() Spec {
	return Spec{Rate: 10, duration: 30 * time.Second, Concurrency: 64, adapterCount: 24, adapterPrefix: "adapter-",
		ZipfS: 1.1, PromptTokens: intRange{16, 64}, MaxNewTokens: intRange{8, 32}, IgnoreEOS: true, Seed: 1, timeout: time.Minute}
}

// SetLoad sets the arrival rate and how long requests arrive (flags still override them).
func (s *Spec) SetLoad(rate float64, d time.Duration) { s.Rate, s.duration = rate, d }

// Validate checks the flags and resolves the adapter ids.
func (s *Spec) Validate() error {
	if s.adapterList != "" {
		s.Adapters = nil
		for _, id := range strings.Split(s.adapterList, ",") {
			if id = strings.TrimSpace(id); id != "" {
				s.Adapters = append(s.Adapters, id)
			}
		}
	} else {
		if s.adapterCount < 0 {
			return errors.New("--adapters must not be negative")
		}
		s.Adapters = adapterIDs(s.adapterPrefix, s.adapterCount)
	}
	switch {
	case !(s.Rate > 0) || math.IsInf(s.Rate, 0):
		return fmt.Errorf("--rate %v: want a positive rate", s.Rate)
	case s.Requests < 0 || (s.Requests == 0 && s.duration <= 0):
		return errors.New("give a positive --duration or --requests")
	case s.Concurrency < 0:
		return errors.New("--concurrency must not be negative")
	case s.ZipfS < 0:
		return errors.New("--zipf-s must not be negative")
	case s.BaseFraction < 0 || s.BaseFraction > 1:
		return errors.New("--base-fraction must be within [0, 1]")
	case len(s.Adapters) == 0 && s.BaseFraction < 1:
		return errors.New("no adapter ids: give --adapters N or --adapter-list, or --base-fraction 1")
	case s.timeout <= 0:
		return errors.New("--request-timeout must be positive")
	}
	if s.Requests == 0 {
		s.Duration = s.duration.String()
	}
	s.Timeout = s.timeout.String()
	return nil
}

func adapterIDs(prefix string, n int) []string {
	width := len(strconv.Itoa(max(n-1, 0)))
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s%0*d", prefix, width, i)
	}
	return ids
}

// Item is one request of the trace.
type Item struct {
	At      time.Duration
	Adapter string
	Prompt  string
	MaxNew  int
}

// promptWords make synthetic prompts.
var promptWords = strings.Fields(`the a of to and in is it that for on with as was at by this be from or have an
	not are but all were when we there can which their if will each about how up out them then she many some so
	these would other into has more her two like him see time could no make than first been its who now people
	my made over did down only way find use may water long little very after words called just where most know
	def return import class self value list print range len data file open path error string int float`)

// tokensPerWord calibrates the synthetic prompts: the embedded model's tokenizer spends about 1.75
// tokens per word of promptWords (measured, the BOS token included).
const tokensPerWord = 1.75

func syntheticPrompt(rng *rand.Rand, tokens int) string {
	n := max(1, int(math.Round(float64(tokens)/tokensPerWord)))
	words := make([]string, n)
	for i := range words {
		words[i] = promptWords[rng.IntN(len(promptWords))]
	}
	return strings.Join(words, " ")
}

// zipf draws ranks 0..n-1 with weight 1/(k+1)^s.
type zipf struct{ cdf []float64 }

func newZipf(n int, s float64) zipf {
	cdf := make([]float64, n)
	var sum float64
	for k := range n {
		sum += 1 / math.Pow(float64(k+1), s)
		cdf[k] = sum
	}
	for k := range cdf {
		cdf[k] /= sum
	}
	return zipf{cdf: cdf}
}

func (z zipf) draw(rng *rand.Rand) int {
	return min(sort.SearchFloat64s(z.cdf, rng.Float64()), len(z.cdf)-1)
}

// MakeTrace draws the arrivals (exponential gaps), adapters (Zipf) and lengths.
func MakeTrace(s Spec) []Item {
	rng := rand.New(rand.NewPCG(s.Seed, s.Seed^0x9e3779b97f4a7c15))
	z := newZipf(len(s.Adapters), s.ZipfS)
	var trace []Item
	var at float64
	for {
		at += rng.ExpFloat64() / s.Rate
		d := time.Duration(at * float64(time.Second))
		if s.Requests > 0 && len(trace) == s.Requests || s.Requests == 0 && d >= s.duration {
			return trace
		}
		it := Item{At: d}
		if len(s.Adapters) > 0 && rng.Float64() >= s.BaseFraction {
			it.Adapter = s.Adapters[z.draw(rng)]
		}
		it.Prompt = syntheticPrompt(rng, s.PromptTokens.draw(rng))
		it.MaxNew = s.MaxNewTokens.draw(rng)
		trace = append(trace, it)
	}
}

// Result is what one request measured; times are milliseconds from the client's view.
type Result struct {
	Index        int     `json:"i"`
	Adapter      string  `json:"adapter"`
	Shard        string  `json:"shard,omitempty"`
	ArrivalMs    float64 `json:"arrival_ms"`
	WaitMs       float64 `json:"wait_ms"`
	TTFTMs       float64 `json:"ttft_ms"`
	TPOTMs       float64 `json:"tpot_ms"`
	E2EMs        float64 `json:"e2e_ms"`
	ShardTTFTMs  float64 `json:"shard_ttft_ms"`
	PromptTokens int     `json:"prompt_tokens"`
	OutputTokens int     `json:"output_tokens"`
	Error        string  `json:"error,omitempty"`
	ErrorMessage string  `json:"error_message,omitempty"`
	sent         bool
	// reached: the request got to the server (a transport stream was opened), whatever it answered.
	reached bool
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// Replay replays the trace open-loop: each request starts at its arrival time whatever the others
// do (up to the concurrency cap). It returns the results of the requests that were sent.
func Replay(ctx context.Context, gen loraplexv1.GenerationServiceClient, name string, trace []Item, s Spec, progress io.Writer) ([]Result, time.Duration) {
	var sem chan struct{}
	if s.Concurrency > 0 {
		sem = make(chan struct{}, s.Concurrency)
	}
	results := make([]Result, len(trace))
	var done, failed atomic.Int64
	start := time.Now()
	stopTicker := make(chan struct{})
	var tickerDone sync.WaitGroup
	if progress != nil {
		tickerDone.Go(func() {
			t := time.NewTicker(5 * time.Second)
			defer t.Stop()
			for {
				select {
				case <-t.C:
					fmt.Fprintf(progress, "  %s %3.0fs: %d of %d done, %d errors\n", name, time.Since(start).Seconds(), done.Load(), len(trace), failed.Load())
				case <-stopTicker:
					return
				}
			}
		})
	}
	var wg sync.WaitGroup
	timer := time.NewTimer(0)
	<-timer.C
arrivals:
	for i, it := range trace {
		if d := time.Until(start.Add(it.At)); d > 0 {
			timer.Reset(d)
			select {
			case <-timer.C:
			case <-ctx.Done():
				break arrivals
			}
		}
		results[i].sent = true
		wg.Go(func() {
			results[i] = oneRequest(ctx, gen, fmt.Sprintf("bench-%s-%d", name, i), it, sem, s)
			results[i].Index, results[i].ArrivalMs, results[i].sent = i, ms(it.At), true
			if done.Add(1); results[i].Error != "" {
				failed.Add(1)
			}
		})
	}
	wg.Wait()
	wall := time.Since(start)
	close(stopTicker)
	tickerDone.Wait()
	out := results[:0]
	for _, r := range results {
		if r.sent {
			out = append(out, r)
		}
	}
	return out, wall
}

func oneRequest(ctx context.Context, gen loraplexv1.GenerationServiceClient, id string, it Item, sem chan struct{}, s Spec) (r Result) {
	r.Adapter = it.Adapter
	arrived := time.Now()
	if sem != nil {
		select {
		case sem <- struct{}{}:
			defer func() { <-sem }()
		case <-ctx.Done():
			r.Error, r.ErrorMessage = "Canceled", ctx.Err().Error()
			return r
		}
	}
	sent := time.Now()
	r.WaitMs = ms(sent.Sub(arrived))
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var server peer.Peer
	fail := func(err error) Result {
		st := status.Convert(err)
		r.Error, r.ErrorMessage, r.reached = st.Code().String(), st.Message(), server.Addr != nil
		return r
	}
	st, err := gen.GenerateStream(ctx, &loraplexv1.GenerateStreamRequest{
		RequestId: id, AdapterId: it.Adapter, Prompt: &loraplexv1.GenerateStreamRequest_Text{Text: it.Prompt},
		Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: uint32(it.MaxNew), IgnoreEos: s.IgnoreEOS},
	}, grpc.Peer(&server))
	if err != nil {
		return fail(err)
	}
	var first time.Duration
	for {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fail(err)
		}
		if first == 0 && len(m.GetTokens()) > 0 {
			first = time.Since(sent)
		}
		if m.GetShardId() != "" {
			r.Shard = m.GetShardId()
		}
		if u := m.GetUsage(); u != nil {
			r.PromptTokens, r.OutputTokens = int(u.GetPromptTokens()), int(u.GetGeneratedTokens())
			r.ShardTTFTMs = ms(m.GetTimings().GetTimeToFirstToken().AsDuration())
		}
	}
	e2e := time.Since(sent)
	r.reached = true
	r.TTFTMs, r.E2EMs = ms(first), ms(e2e)
	if r.OutputTokens > 1 {
		r.TPOTMs = ms(e2e-first) / float64(r.OutputTokens-1)
	}
	return r
}

// dist summarizes a sample (milliseconds or tokens).
type dist struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Mean float64 `json:"mean"`
	Max  float64 `json:"max"`
}

func summarize(xs []float64) dist {
	if len(xs) == 0 {
		return dist{}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	var sum float64
	for _, x := range s {
		sum += x
	}
	return dist{N: len(s), P50: quantile(s, 0.5), P90: quantile(s, 0.9), P99: quantile(s, 0.99), Mean: sum / float64(len(s)), Max: s[len(s)-1]}
}

// quantile interpolates linearly between the order statistics of sorted s.
func quantile(s []float64, q float64) float64 {
	pos := q * float64(len(s)-1)
	lo := int(math.Floor(pos))
	hi := min(lo+1, len(s)-1)
	return s[lo] + (s[hi]-s[lo])*(pos-float64(lo))
}

// ShardRequests is how many requests one shard served.
type ShardRequests struct {
	Shard    string  `json:"shard"`
	Requests int     `json:"requests"`
	Share    float64 `json:"share"`
}

// Run is one run's report.
type Run struct {
	Name       string            `json:"name"`
	Routing    string            `json:"routing,omitempty"`
	Addr       string            `json:"addr"`
	Requests   int               `json:"requests"`
	Completed  int               `json:"completed"`
	Errors     map[string]int    `json:"errors"`
	ErrorCases map[string]string `json:"error_examples,omitempty"`
	WallS      float64           `json:"wall_s"`
	Throughput struct {
		RequestsPerS     float64 `json:"requests_per_s"`
		OutputTokensPerS float64 `json:"output_tokens_per_s"`
		TotalTokensPerS  float64 `json:"total_tokens_per_s"`
	} `json:"throughput"`
	TTFT         dist            `json:"ttft_ms"`
	TPOT         dist            `json:"tpot_ms"`
	E2E          dist            `json:"e2e_ms"`
	ShardTTFT    dist            `json:"shard_ttft_ms"`
	Wait         dist            `json:"client_wait_ms"`
	PromptTokens dist            `json:"prompt_tokens"`
	OutputTokens dist            `json:"output_tokens"`
	Shards       []ShardRequests `json:"shards"`
	ShardLoad    struct {
		Max         int     `json:"max"`
		Mean        float64 `json:"mean"`
		MaxOverMean float64 `json:"max_over_mean"`
	} `json:"shard_load"`
	// Cache comes from the router's ListAdapters, sampled during the run.
	Cache *CacheReport `json:"cache"`
	// CacheCounters are the shards' own cache counters (bench --compare, in process): exact.
	CacheCounters *CacheReport `json:"cache_counters,omitempty"`
	Results       []Result     `json:"requests_detail"`
}

// Report is the --out JSON.
type Report struct {
	Tool    string    `json:"tool"`
	Started time.Time `json:"started"`
	Spec    Spec      `json:"spec"`
	Trace   int       `json:"trace_requests"`
	Cluster any       `json:"cluster,omitempty"`
	Runs    []Run     `json:"runs"`
}

// NewRun summarizes results; shards lists shards known to exist (they count even with no request).
func NewRun(name, addr string, results []Result, wall time.Duration, shards []string) Run {
	run := Run{Name: name, Addr: addr, Requests: len(results), Errors: map[string]int{}, ErrorCases: map[string]string{},
		WallS: wall.Seconds(), Results: results}
	var ttft, tpot, e2e, sttft, wait, pt, ot []float64
	perShard := map[string]int{}
	for _, s := range shards {
		perShard[s] = 0
	}
	var outTok, allTok int
	for _, r := range results {
		wait = append(wait, r.WaitMs)
		if r.Error != "" {
			run.Errors[r.Error]++
			if _, ok := run.ErrorCases[r.Error]; !ok {
				run.ErrorCases[r.Error] = r.ErrorMessage
			}
			continue
		}
		run.Completed++
		perShard[r.Shard]++
		ttft, e2e, sttft = append(ttft, r.TTFTMs), append(e2e, r.E2EMs), append(sttft, r.ShardTTFTMs)
		if r.OutputTokens > 1 {
			tpot = append(tpot, r.TPOTMs)
		}
		pt, ot = append(pt, float64(r.PromptTokens)), append(ot, float64(r.OutputTokens))
		outTok += r.OutputTokens
		allTok += r.OutputTokens + r.PromptTokens
	}
	run.TTFT, run.TPOT, run.E2E, run.ShardTTFT, run.Wait = summarize(ttft), summarize(tpot), summarize(e2e), summarize(sttft), summarize(wait)
	run.PromptTokens, run.OutputTokens = summarize(pt), summarize(ot)
	if w := wall.Seconds(); w > 0 {
		run.Throughput.RequestsPerS = float64(run.Completed) / w
		run.Throughput.OutputTokensPerS = float64(outTok) / w
		run.Throughput.TotalTokensPerS = float64(allTok) / w
	}
	for s, n := range perShard {
		run.Shards = append(run.Shards, ShardRequests{Shard: s, Requests: n})
	}
	sort.Slice(run.Shards, func(i, j int) bool { return run.Shards[i].Shard < run.Shards[j].Shard })
	for i := range run.Shards {
		if run.Completed > 0 {
			run.Shards[i].Share = float64(run.Shards[i].Requests) / float64(run.Completed)
		}
		run.ShardLoad.Max = max(run.ShardLoad.Max, run.Shards[i].Requests)
	}
	if len(run.Shards) > 0 {
		run.ShardLoad.Mean = float64(run.Completed) / float64(len(run.Shards))
		if run.ShardLoad.Mean > 0 {
			run.ShardLoad.MaxOverMean = float64(run.ShardLoad.Max) / run.ShardLoad.Mean
		}
	}
	return run
}

// TierHits counts hits served by one tier.
type TierHits struct {
	Hits    uint64  `json:"hits"`
	HitRate float64 `json:"hit_rate"`
}

// ShardCache is one shard's adapter cache outcome.
type ShardCache struct {
	Shard      string  `json:"shard"`
	DeviceHits uint64  `json:"device_hits"`
	HostHits   uint64  `json:"host_hits"`
	Loads      uint64  `json:"loads"`
	HitRate    float64 `json:"hit_rate"`
}

// CacheReport is the adapter cache's outcome over a run: a hit is a request (acquire) served by a
// resident adapter, a load one that read the adapter store. Rates are hits / (hits + loads).
type CacheReport struct {
	Source  string              `json:"source"`
	Hits    uint64              `json:"hits"`
	Loads   uint64              `json:"loads"`
	HitRate float64             `json:"hit_rate"`
	Tiers   map[string]TierHits `json:"tiers"`
	Shards  []ShardCache        `json:"shards"`
}

// NewCacheReport totals the shards' outcomes and computes the rates.
func NewCacheReport(source string, shards map[string]*ShardCache) *CacheReport {
	r := &CacheReport{Source: source, Tiers: map[string]TierHits{}}
	var dev, host uint64
	for _, s := range shards {
		if t := s.DeviceHits + s.HostHits + s.Loads; t > 0 {
			s.HitRate = float64(s.DeviceHits+s.HostHits) / float64(t)
		}
		dev, host, r.Loads = dev+s.DeviceHits, host+s.HostHits, r.Loads+s.Loads
		r.Shards = append(r.Shards, *s)
	}
	sort.Slice(r.Shards, func(i, j int) bool { return r.Shards[i].Shard < r.Shards[j].Shard })
	r.Hits = dev + host
	if t := r.Hits + r.Loads; t > 0 {
		r.HitRate = float64(r.Hits) / float64(t)
		r.Tiers["device"] = TierHits{Hits: dev, HitRate: float64(dev) / float64(t)}
		r.Tiers["host"] = TierHits{Hits: host, HitRate: float64(host) / float64(t)}
	}
	return r
}

// Tracker estimates cache hits and loads from ListAdapters snapshots: per (shard, adapter) the
// growth of its hits and loads counters between snapshots. An adapter evicted between two snapshots
// takes its counts since the previous one with it, and one re-loaded is recognized only when its
// counters went down, so this undercounts under heavy churn; poll often.
type Tracker struct {
	last   map[string]*loraplexv1.AdapterInfo
	shards map[string]*ShardCache
	seen   map[string]bool
}

// NewTracker returns a tracker that has seen nothing.
func NewTracker() *Tracker {
	return &Tracker{last: map[string]*loraplexv1.AdapterInfo{}, shards: map[string]*ShardCache{}, seen: map[string]bool{}}
}

// Observe takes a snapshot; the first one is the baseline.
func (t *Tracker) Observe(resp *loraplexv1.ListAdaptersResponse, baseline bool) {
	for _, a := range resp.GetAdapters() {
		shard := a.GetShardId()
		if shard == "" {
			shard = resp.GetShardId()
		}
		t.seen[shard] = true
		key := shard + "\x00" + a.GetAdapterId()
		prev := t.last[key]
		t.last[key] = a
		if baseline {
			continue
		}
		dh, dl := a.GetHits(), a.GetLoads()
		if prev != nil && a.GetHits() >= prev.GetHits() && a.GetLoads() >= prev.GetLoads() {
			dh, dl = a.GetHits()-prev.GetHits(), a.GetLoads()-prev.GetLoads()
		}
		sc := t.shards[shard]
		if sc == nil {
			sc = &ShardCache{Shard: shard}
			t.shards[shard] = sc
		}
		sc.Loads += dl
		if a.GetTier() == loraplexv1.Tier_TIER_HOST {
			sc.HostHits += dh
		} else {
			sc.DeviceHits += dh
		}
	}
}

// ShardIDs lists the shards seen in any snapshot, sorted.
func (t *Tracker) ShardIDs() []string {
	var ids []string
	for id := range t.seen {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Poll observes ListAdapters every interval until stop is closed, then once more.
func Poll(list func() (*loraplexv1.ListAdaptersResponse, error), t *Tracker, every time.Duration, stop <-chan struct{}) {
	if every > 0 {
		tk := time.NewTicker(every)
		defer tk.Stop()
	loop:
		for {
			select {
			case <-tk.C:
				if resp, err := list(); err == nil {
					t.Observe(resp, false)
				}
			case <-stop:
				break loop
			}
		}
	} else {
		<-stop
	}
	if resp, err := list(); err == nil {
		t.Observe(resp, false)
	}
}

// Unreachable says whether every request failed before it reached the server (the connection
// itself failed), as opposed to the server answering with an error.
func Unreachable(rs []Result) bool {
	for _, r := range rs {
		if r.reached || r.Error != codes.Unavailable.String() {
			return false
		}
	}
	return len(rs) > 0
}

// Report returns the cache report of what the tracker observed.
func (t *Tracker) Report(source string) *CacheReport { return NewCacheReport(source, t.shards) }

// DefaultOut is --out's default; TIME becomes the UTC start time, so runs never overwrite each
// other, and bench-results/ is git-ignored.
const DefaultOut = "bench-results/TIME/bench.json"

// Output says where the report goes.
type Output struct {
	JSON, Chart string
}

// AddFlags binds --out and --chart; --out defaults to o.JSON, or DefaultOut when that is empty.
func (o *Output) AddFlags(fs *flag.FlagSet) {
	if o.JSON == "" {
		o.JSON = DefaultOut
	}
	fs.StringVar(&o.JSON, "out", o.JSON, "JSON report (\"none\" or empty: none); TIME is the start time")
	fs.StringVar(&o.Chart, "chart", "", "PNG chart (default: --out with .png; \"none\": no chart)")
}

// Resolve fills in the defaults: TIME in --out, and the chart beside the JSON.
func (o *Output) Resolve(now time.Time) {
	if o.JSON == "none" {
		o.JSON = ""
	}
	o.JSON = strings.ReplaceAll(o.JSON, "TIME", now.UTC().Format("20060102-150405"))
	if o.Chart == "" && o.JSON != "" {
		o.Chart = strings.TrimSuffix(o.JSON, filepath.Ext(o.JSON)) + ".png"
	}
	if o.Chart == "none" {
		o.Chart = ""
	}
}

// Write writes the JSON report and the chart, creating their folders, and says where on w.
func (o Output) Write(w io.Writer, rep *Report) error {
	if o.JSON != "" {
		b, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(o.JSON), 0o755); err != nil {
			return fmt.Errorf("bench: %w", err)
		}
		if err := os.WriteFile(o.JSON, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("bench: %w", err)
		}
		fmt.Fprintf(w, "wrote %s\n", o.JSON)
	}
	if o.Chart != "" {
		if err := os.MkdirAll(filepath.Dir(o.Chart), 0o755); err != nil {
			return fmt.Errorf("bench: chart: %w", err)
		}
		if err := writeChart(o.Chart, rep); err != nil {
			return fmt.Errorf("bench: chart: %w", err)
		}
		fmt.Fprintf(w, "wrote %s\n", o.Chart)
	}
	return nil
}

// PrintRun prints one run's summary.
func PrintRun(w io.Writer, spec Spec, r Run) {
	fmt.Fprintf(w, "%s (%s): %d requests, %d completed, errors %s, in %.1fs\n", r.Name, r.Addr, r.Requests, r.Completed, errorsString(r.Errors), r.WallS)
	fmt.Fprintf(w, "  load: Poisson %.3g req/s, %d adapters (Zipf s=%.2g), prompt ~%s tokens, %s new tokens, concurrency cap %d, seed %d\n",
		spec.Rate, len(spec.Adapters), spec.ZipfS, spec.PromptTokens.String(), spec.MaxNewTokens.String(), spec.Concurrency, spec.Seed)
	fmt.Fprintf(w, "  throughput: %.2f req/s, %.1f output tokens/s, %.1f total tokens/s\n",
		r.Throughput.RequestsPerS, r.Throughput.OutputTokensPerS, r.Throughput.TotalTokensPerS)
	fmt.Fprintf(w, "  %-22s %9s %9s %9s %9s %9s\n", "", "p50", "p90", "p99", "mean", "max")
	for _, row := range []struct {
		name string
		d    dist
	}{{"TTFT (ms)", r.TTFT}, {"time/output token (ms)", r.TPOT}, {"end to end (ms)", r.E2E}, {"TTFT on the shard (ms)", r.ShardTTFT},
		{"client wait (ms)", r.Wait}, {"prompt tokens", r.PromptTokens}, {"output tokens", r.OutputTokens}} {
		fmt.Fprintf(w, "  %-22s %9.2f %9.2f %9.2f %9.2f %9.2f\n", row.name, row.d.P50, row.d.P90, row.d.P99, row.d.Mean, row.d.Max)
	}
	var shards []string
	for _, s := range r.Shards {
		shards = append(shards, fmt.Sprintf("%s %d (%.0f%%)", orDash(s.Shard), s.Requests, 100*s.Share))
	}
	fmt.Fprintf(w, "  requests per shard: %s; max/mean %.2f\n", strings.Join(shards, ", "), r.ShardLoad.MaxOverMean)
	for _, cr := range []*CacheReport{r.CacheCounters, r.Cache} {
		if cr == nil {
			continue
		}
		var per []string
		for _, s := range cr.Shards {
			per = append(per, fmt.Sprintf("%s %.1f%%", s.Shard, 100*s.HitRate))
		}
		fmt.Fprintf(w, "  adapter hit rate (%s): %.1f%% (device %.1f%%, host %.1f%%; %d hits, %d loads); per shard: %s\n",
			cr.Source, 100*cr.HitRate, 100*cr.Tiers["device"].HitRate, 100*cr.Tiers["host"].HitRate, cr.Hits, cr.Loads, strings.Join(per, ", "))
	}
	for code, msg := range r.ErrorCases {
		fmt.Fprintf(w, "  error %s, e.g.: %s\n", code, msg)
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func errorsString(m map[string]int) string {
	if len(m) == 0 {
		return "none"
	}
	var parts []string
	for k, v := range m {
		parts = append(parts, fmt.Sprintf("%s %d", k, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}
