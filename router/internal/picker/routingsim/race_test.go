//go:build race

package routingsim_test

// raceEnabled: the race detector slows the simulation tenfold, and its runs share no memory.
const raceEnabled = true
