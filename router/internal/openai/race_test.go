//go:build race

package openai

// raceEnabled: the race detector changes allocation counts.
const raceEnabled = true
