package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/loraplex/loraplex/cmd/internal/cmdline"
	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

const adaptersSynopsis = `list [--json] [--store] | load ID [--tier host|device] | unload ID | pin ID | unpin ID

  list works against a router (every shard's adapters) or a shard; --store lists the adapter
  store too (every page; through a router, one shard's view of it); load, unload, pin and unpin
  go to a shard's address and need its admin token when it has one (--token, --token-file or
  $` + tokenEnv + `).`

func (c *cli) adapters(args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprintf(c.stderr, "Usage: loraplex adapters %s\n", adaptersSynopsis)
		if len(args) == 0 {
			return fmt.Errorf("%w: adapters needs a subcommand: list, load, unload, pin or unpin", cmdline.ErrUsage)
		}
		return nil
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "list", "ls":
		return c.adaptersList(args)
	case "load", "unload", "pin", "unpin":
		return c.adaptersAdmin(sub, args)
	}
	return fmt.Errorf("%w: unknown adapters subcommand %q; want list, load, unload, pin or unpin", cmdline.ErrUsage, sub)
}

func (c *cli) listAdapters(o *conn) (*loraplexv1.ListAdaptersResponse, error) {
	return c.listAdaptersPages(o, false)
}

// listAdaptersPages lists what the shards hold, and with store every page of the adapter store
// too, gathered into one response.
func (c *cli) listAdaptersPages(o *conn, store bool) (*loraplexv1.ListAdaptersResponse, error) {
	cc, err := o.dial()
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	ctx, cancel, err := o.context()
	if err != nil {
		return nil, err
	}
	defer cancel()
	cl := loraplexv1.NewAdaptersServiceClient(cc)
	req := &loraplexv1.ListAdaptersRequest{IncludeStore: store, PageSize: storePageSize}
	resp, err := cl.ListAdapters(ctx, req, o.callOptions()...)
	if err != nil {
		return nil, o.explain(err)
	}
	for tok := resp.GetNextPageToken(); tok != ""; {
		req.PageToken = tok
		page, err := cl.ListAdapters(ctx, req, o.callOptions()...)
		if err != nil {
			return nil, o.explain(err)
		}
		resp.Adapters = append(resp.Adapters, page.GetAdapters()...)
		tok = page.GetNextPageToken()
	}
	resp.NextPageToken = ""
	return resp, nil
}

// storePageSize is the largest page a shard serves.
const storePageSize = 1000

func (c *cli) adaptersList(args []string) error {
	fs := c.newFlagSet("adapters list", "[flags]")
	o := c.connFlags(fs, 10*time.Second)
	asJSON := fs.Bool("json", false, "print the ListAdapters response as JSON (protojson)")
	store := fs.Bool("store", false, "list the adapter store too: adapters held nowhere show tier store")
	pos, err := cmdline.ParseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: adapters list takes no arguments (got %q)", cmdline.ErrUsage, pos)
	}
	resp, err := c.listAdaptersPages(o, *store)
	if err != nil {
		return err
	}
	if *asJSON {
		b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(resp)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.stdout, "%s\n", b)
		return nil
	}
	writeAdapterTable(c.stdout, resp.GetAdapters(), true, time.Now())
	fmt.Fprintf(c.stdout, "device tier: %s of %s used · host tier: %s of %s used%s\n",
		bytesString(resp.GetDeviceBytesUsed()), bytesString(resp.GetDeviceBytesBudget()),
		bytesString(resp.GetHostBytesUsed()), bytesString(resp.GetHostBytesBudget()), shardNote(resp))
	return nil
}

func shardNote(resp *loraplexv1.ListAdaptersResponse) string {
	if resp.GetShardId() != "" {
		return " (shard " + resp.GetShardId() + ")"
	}
	return " (all shards that answered)"
}

func writeAdapterTable(w io.Writer, ads []*loraplexv1.AdapterInfo, withShard bool, now time.Time) {
	if len(ads) == 0 {
		fmt.Fprintln(w, "no adapters resident")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	head := "ADAPTER\tSHARD\tTIER\tBYTES\tRANK\tPINNED\tIN USE\tLOADS\tHITS\tLAST USED"
	if !withShard {
		head = strings.Replace(head, "SHARD\t", "", 1)
	}
	fmt.Fprintln(tw, head)
	for _, a := range ads {
		row := []string{a.GetAdapterId()}
		if withShard {
			row = append(row, orDash(a.GetShardId()))
		}
		row = append(row, tierString(a), bytesString(adapterBytes(a)), fmt.Sprint(a.GetRank()), yesNo(a.GetPinned()),
			fmt.Sprint(a.GetInUse()), fmt.Sprint(a.GetLoads()), fmt.Sprint(a.GetHits()), lastUsed(a, now))
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	tw.Flush()
}

func tierString(a *loraplexv1.AdapterInfo) string {
	switch {
	case a.GetTier() == loraplexv1.Tier_TIER_DEVICE:
		return "device"
	case a.GetTier() == loraplexv1.Tier_TIER_HOST:
		if a.GetLoading() {
			return "host (loading)"
		}
		return "host"
	case a.GetTier() == loraplexv1.Tier_TIER_DISK:
		return "disk"
	case a.GetTier() == loraplexv1.Tier_TIER_STORE:
		return "store"
	case a.GetLoading():
		return "loading"
	}
	return "-"
}

func adapterBytes(a *loraplexv1.AdapterInfo) uint64 {
	return max(a.GetDeviceBytes(), a.GetHostBytes())
}

func lastUsed(a *loraplexv1.AdapterInfo, now time.Time) string {
	if a.GetLastUsed() == nil {
		return "-"
	}
	d := now.Sub(a.GetLastUsed().AsTime())
	if d < 0 {
		d = 0
	}
	if d < time.Second {
		return "just now"
	}
	return d.Truncate(time.Second).String() + " ago"
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func bytesString(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

func (c *cli) adaptersAdmin(verb string, args []string) error {
	fs := c.newFlagSet("adapters "+verb, "[flags] ADAPTER_ID")
	o := c.connFlags(fs, 30*time.Second)
	o.adminFlags(fs)
	tier := "device"
	if verb == "load" {
		fs.StringVar(&tier, "tier", tier, "tier to load into: device or host")
	}
	pos, err := cmdline.ParseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: adapters %s takes one ADAPTER_ID (got %d arguments)", cmdline.ErrUsage, verb, len(pos))
	}
	id := pos[0]
	var ptier loraplexv1.Tier
	switch tier {
	case "device":
		ptier = loraplexv1.Tier_TIER_DEVICE
	case "host":
		ptier = loraplexv1.Tier_TIER_HOST
	default:
		return fmt.Errorf("%w: --tier %q: want device or host", cmdline.ErrUsage, tier)
	}
	cc, err := o.dial()
	if err != nil {
		return err
	}
	defer cc.Close()
	ctx, cancel, err := o.context()
	if err != nil {
		return err
	}
	defer cancel()
	cl := loraplexv1.NewAdaptersServiceClient(cc)
	var info *loraplexv1.AdapterInfo
	switch verb {
	case "load":
		var r *loraplexv1.LoadAdapterResponse
		if r, err = cl.LoadAdapter(ctx, &loraplexv1.LoadAdapterRequest{AdapterId: id, Tier: ptier}, o.callOptions()...); err == nil {
			info = r.GetAdapter()
		}
	case "pin":
		var r *loraplexv1.PinAdapterResponse
		if r, err = cl.PinAdapter(ctx, &loraplexv1.PinAdapterRequest{AdapterId: id}, o.callOptions()...); err == nil {
			info = r.GetAdapter()
		}
	case "unload":
		_, err = cl.UnloadAdapter(ctx, &loraplexv1.UnloadAdapterRequest{AdapterId: id}, o.callOptions()...)
	case "unpin":
		_, err = cl.UnpinAdapter(ctx, &loraplexv1.UnpinAdapterRequest{AdapterId: id}, o.callOptions()...)
	}
	if err != nil {
		return o.explain(err)
	}
	past := map[string]string{"load": "loaded", "unload": "unloaded", "pin": "pinned", "unpin": "unpinned"}[verb]
	if info == nil {
		fmt.Fprintf(c.stdout, "%s %s on %s\n", past, id, o.addr)
		return nil
	}
	fmt.Fprintf(c.stdout, "%s %s on %s: %s, %s, rank %d%s\n", past, id, orDash(info.GetShardId()), tierString(info),
		bytesString(adapterBytes(info)), info.GetRank(), map[bool]string{true: ", pinned"}[info.GetPinned()])
	return nil
}

// shards prints the router's aggregated ListAdapters grouped by shard.
func (c *cli) shards(args []string) error {
	fs := c.newFlagSet("shards", "[flags]   (--addr is the router)")
	o := c.connFlags(fs, 10*time.Second)
	pos, err := cmdline.ParseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: shards takes no arguments (got %q)", cmdline.ErrUsage, pos)
	}
	resp, err := c.listAdapters(o)
	if err != nil {
		return err
	}
	byShard := map[string][]*loraplexv1.AdapterInfo{}
	for _, a := range resp.GetAdapters() {
		id := a.GetShardId()
		if id == "" {
			id = resp.GetShardId()
		}
		byShard[id] = append(byShard[id], a)
	}
	ids := make([]string, 0, len(byShard))
	for id := range byShard {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	if resp.GetShardId() != "" {
		fmt.Fprintf(c.stdout, "note: %s is shard %s, not a router: this is its own view only\n\n", o.addr, resp.GetShardId())
	}
	now := time.Now()
	for _, id := range ids {
		ads := byShard[id]
		var dev, host, loading int
		var devBytes uint64
		for _, a := range ads {
			switch {
			case a.GetTier() == loraplexv1.Tier_TIER_DEVICE:
				dev++
				devBytes += a.GetDeviceBytes()
			case a.GetTier() == loraplexv1.Tier_TIER_HOST:
				host++
			}
			if a.GetLoading() {
				loading++
			}
		}
		fmt.Fprintf(c.stdout, "%s: %d on the device (%s), %d in host memory, %d loading\n", orDash(id), dev, bytesString(devBytes), host, loading)
		var b strings.Builder
		writeAdapterTable(&b, ads, false, now)
		for _, line := range strings.Split(strings.TrimRight(b.String(), "\n"), "\n") {
			fmt.Fprintf(c.stdout, "  %s\n", line)
		}
	}
	if len(ids) == 0 {
		fmt.Fprintln(c.stdout, "no shard holds an adapter")
	}
	fmt.Fprintf(c.stdout, "\nall shards: device %s of %s, host %s of %s (shards that hold no adapter, or did not answer, are not listed)\n",
		bytesString(resp.GetDeviceBytesUsed()), bytesString(resp.GetDeviceBytesBudget()),
		bytesString(resp.GetHostBytesUsed()), bytesString(resp.GetHostBytesBudget()))
	return nil
}
