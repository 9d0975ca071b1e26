package cuda

import (
	"os"
	"reflect"
	"regexp"
	"testing"
)

// TestEveryLibFunctionIsBound: each function field of Lib is bound to exactly one symbol, each
// symbol once, and each symbol is declared by the ABI header (without loading the library, so it
// runs on machines without a GPU).
func TestEveryLibFunctionIsBound(t *testing.T) {
	header, err := os.ReadFile("../../../../kernels/loraplex_kernels.h")
	if err != nil {
		t.Fatal(err)
	}
	l := &Lib{}
	bound := map[uintptr]string{}
	names := map[string]bool{}
	syms := l.symbols()
	if syms[0].name != "lp_abi_version" {
		t.Errorf("first symbol %s, want lp_abi_version (checked before the others)", syms[0].name)
	}
	for _, s := range syms {
		p := reflect.ValueOf(s.fn)
		if p.Kind() != reflect.Pointer || p.Elem().Kind() != reflect.Func {
			t.Errorf("%s: bound to %T, want a pointer to a function field", s.name, s.fn)
			continue
		}
		if prev, dup := bound[p.Pointer()]; dup {
			t.Errorf("one field bound to %s and %s", prev, s.name)
		}
		bound[p.Pointer()] = s.name
		if names[s.name] {
			t.Errorf("%s bound twice", s.name)
		}
		names[s.name] = true
		if !regexp.MustCompile(`\b` + s.name + `\s*\(`).Match(header) {
			t.Errorf("%s is not declared in kernels/loraplex_kernels.h", s.name)
		}
	}
	v := reflect.ValueOf(l).Elem()
	for i := range v.NumField() {
		f := v.Field(i)
		if f.Kind() != reflect.Func {
			continue
		}
		if _, ok := bound[f.Addr().Pointer()]; !ok {
			t.Errorf("Lib.%s is bound to no symbol", v.Type().Field(i).Name)
		}
	}
}
