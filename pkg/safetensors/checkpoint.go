package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strings"
)

// The file names a Hugging Face model folder uses for its weights.
const (
	SingleFileName = "model.safetensors"
	IndexFileName  = "model.safetensors.index.json"
)

// maxIndexSize bounds model.safetensors.index.json; real ones are a few MB.
const maxIndexSize = 64 << 20

// Checkpoint is a model's weights, in one file or sharded over several with
// an index. Like File, it is safe for concurrent reads but not concurrent
// with Close.
type Checkpoint struct {
	shards []*File
	where  map[string]*File // tensor name -> its shard
	names  []string         // sorted
}

// OpenCheckpoint opens the weights in dir with default Options.
func OpenCheckpoint(dir string) (*Checkpoint, error) { return Options{}.OpenCheckpoint(dir) }

// OpenCheckpoint opens dir/model.safetensors, or else the shards listed in
// dir/model.safetensors.index.json. Shard names must be plain *.safetensors
// file names and are opened through an os.Root, so neither names nor
// symlinks can reach outside dir. Every tensor the index maps must exist in
// its shard, and every tensor in a shard must be mapped to that shard.
func (o Options) OpenCheckpoint(dir string) (*Checkpoint, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()

	if f, err := o.openInRoot(root, SingleFileName); err == nil {
		c := &Checkpoint{shards: []*File{f}, where: map[string]*File{}, names: f.Names()}
		for _, n := range c.names {
			c.where[n] = f
		}
		return c, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}

	idx, err := OpenRegularIn(root, IndexFileName)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s has neither %s nor %s", ErrNoCheckpoint, dir, SingleFileName, IndexFileName)
	}
	if err != nil {
		return nil, err
	}
	data, err := io.ReadAll(io.LimitReader(idx, maxIndexSize+1))
	idx.Close()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", IndexFileName, err)
	}
	if len(data) > maxIndexSize {
		return nil, fmt.Errorf("%w: %s is larger than %d bytes", ErrInvalidIndex, IndexFileName, maxIndexSize)
	}
	weightMap, err := parseIndex(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	c, err := o.openShards(root, weightMap)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	return c, nil
}

func (o Options) openInRoot(root *os.Root, name string) (*File, error) {
	fh, err := OpenRegularIn(root, name)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	f, err := o.OpenFile(fh)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return f, nil
}

// parseIndex returns the weight_map of an index file.
func parseIndex(data []byte) (map[string]string, error) {
	weightMap := map[string]string{}
	found := false
	err := eachMember(data, func(key string, raw json.RawMessage) error {
		if key != "weight_map" {
			return nil // "metadata" and anything else carry no tensor locations
		}
		found = true
		return eachMember(raw, func(name string, v json.RawMessage) error {
			var file string
			if len(v) == 0 || v[0] != '"' || json.Unmarshal(v, &file) != nil {
				return fmt.Errorf("%w: weight_map[%q] must be a file name string, got %s", ErrInvalidIndex, name, abbreviate(v))
			}
			if err := checkShardName(file); err != nil {
				return fmt.Errorf("%w: weight_map[%q]: %w", ErrInvalidIndex, name, err)
			}
			weightMap[name] = file
			return nil
		})
	})
	if err != nil {
		if errors.Is(err, ErrInvalidHeader) && !errors.Is(err, ErrInvalidIndex) {
			return nil, fmt.Errorf("%w: %s: %w", ErrInvalidIndex, IndexFileName, err)
		}
		return nil, err
	}
	if !found {
		return nil, fmt.Errorf("%w: %s has no weight_map", ErrInvalidIndex, IndexFileName)
	}
	if len(weightMap) == 0 {
		return nil, fmt.Errorf("%w: %s has an empty weight_map", ErrInvalidIndex, IndexFileName)
	}
	return weightMap, nil
}

// checkShardName accepts a plain file name ending in .safetensors: no
// directories, no parent references, no hidden or absolute names.
func checkShardName(name string) error {
	switch {
	case name == "":
		return errors.New("empty shard name")
	case strings.ContainsAny(name, `/\`+"\x00"):
		return fmt.Errorf("shard %q must be a file name inside the checkpoint folder, not a path", name)
	case strings.HasPrefix(name, "."):
		return fmt.Errorf("shard %q must not start with '.'", name)
	case !strings.HasSuffix(name, ".safetensors") || name == ".safetensors":
		return fmt.Errorf("shard %q is not a .safetensors file", name)
	}
	return nil
}

func (o Options) openShards(root *os.Root, weightMap map[string]string) (*Checkpoint, error) {
	byShard := map[string][]string{}
	for name, shard := range weightMap {
		byShard[shard] = append(byShard[shard], name)
	}
	shardNames := make([]string, 0, len(byShard))
	for s := range byShard {
		shardNames = append(shardNames, s)
	}
	slices.Sort(shardNames)

	c := &Checkpoint{where: make(map[string]*File, len(weightMap))}
	for _, s := range shardNames {
		f, err := o.openInRoot(root, s)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("%w: %w", ErrInvalidIndex, err)
		}
		c.shards = append(c.shards, f)
		for _, name := range byShard[s] {
			if _, ok := f.tensors[name]; !ok {
				c.Close()
				return nil, fmt.Errorf("%w: tensor %q is mapped to %s, which does not hold it", ErrInvalidIndex, name, s)
			}
			c.where[name] = f
		}
		for _, name := range f.names {
			if weightMap[name] != s {
				c.Close()
				return nil, fmt.Errorf("%w: shard %s holds tensor %q, which the index does not map to it", ErrInvalidIndex, s, name)
			}
		}
	}
	for name := range c.where {
		c.names = append(c.names, name)
	}
	slices.Sort(c.names)
	return c, nil
}

// Close unmaps every shard.
func (c *Checkpoint) Close() error {
	var errs []error
	for _, f := range c.shards {
		errs = append(errs, f.Close())
	}
	return errors.Join(errs...)
}

// Names lists every tensor across shards in sorted order.
func (c *Checkpoint) Names() []string { return slices.Clone(c.names) }

// Info describes the named tensor; Offset is within its shard file.
func (c *Checkpoint) Info(name string) (TensorInfo, bool) {
	f, ok := c.where[name]
	if !ok {
		return TensorInfo{}, false
	}
	return f.Info(name)
}

// Bytes returns the named tensor's raw bytes; see File.Bytes.
func (c *Checkpoint) Bytes(name string) ([]byte, error) {
	f, ok := c.where[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return f.Bytes(name)
}

// Float32 returns the named tensor converted to float32; see File.Float32.
func (c *Checkpoint) Float32(name string) ([]float32, error) {
	f, ok := c.where[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return f.Float32(name)
}
