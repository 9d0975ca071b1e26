//go:build !race

package routingsim_test

const raceEnabled = false
