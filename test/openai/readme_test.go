package openai

import (
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"

	routerapp "github.com/loraplex/loraplex/router/app"
)

// readmeCommands are the curl commands of the README's OpenAI section, continuation lines joined.
func readmeCommands(t *testing.T) []string {
	t.Helper()
	data, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(data), "\n## OpenAI-compatible HTTP API\n")
	if !ok {
		t.Fatal("README.md has no OpenAI-compatible HTTP API section")
	}
	_, block, ok := strings.Cut(section, "```sh\n")
	block, _, ok2 := strings.Cut(block, "```")
	if !ok || !ok2 {
		t.Fatal("the README's OpenAI section has no sh block")
	}
	var cmds []string
	for _, c := range strings.Split(strings.ReplaceAll(block, "\\\n", " "), "\n") {
		if c = strings.TrimSpace(c); c != "" {
			cmds = append(cmds, c)
		}
	}
	return cmds
}

// TestREADMECurl runs the README's curl examples as written, against a router whose HTTP address
// replaces the README's, and checks each answer.
func TestREADMECurl(t *testing.T) {
	checkLeaks(t)
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("no curl on PATH")
	}
	cmds := readmeCommands(t)
	if len(cmds) != 3 {
		t.Fatalf("%d commands in the README's OpenAI section, this test checks 3: %q", len(cmds), cmds)
	}
	c := startCluster(t, clusterOptions{router: func(cfg *routerapp.Config) { cfg.HTTP.ServedModelName = routerapp.DefaultConfig().HTTP.ServedModelName }})
	run := func(cmd string) string {
		t.Helper()
		if !strings.HasPrefix(cmd, "curl ") || !strings.Contains(cmd, "http://127.0.0.1:8000/v1/") {
			t.Fatalf("README command %q: want curl on http://127.0.0.1:8000/v1/", cmd)
		}
		cmd = strings.Replace(cmd, "curl ", curl+" --fail-with-body --max-time 30 ", 1)
		cmd = strings.ReplaceAll(cmd, "http://127.0.0.1:8000/v1/", c.base)
		out, err := exec.Command("bash", "-c", cmd).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", cmd, err, out)
		}
		return string(out)
	}

	var list struct {
		Data []struct{ ID, Parent string }
	}
	if err := json.Unmarshal([]byte(run(cmds[0])), &list); err != nil || len(list.Data) == 0 || list.Data[0].ID != "base" {
		t.Errorf("models: %+v, %v", list, err)
	}
	var compl struct {
		Choices []struct{ Text string }
	}
	if err := json.Unmarshal([]byte(run(cmds[1])), &compl); err != nil || len(compl.Choices) != 1 || compl.Choices[0].Text != " book 7 reads fox old the" {
		t.Errorf("completion: %+v, %v; want the reversed words", compl, err)
	}
	events := strings.Split(strings.TrimSpace(run(cmds[2])), "\n\n")
	var text strings.Builder
	for _, e := range events[:len(events)-1] {
		var ch struct {
			Choices []struct{ Delta struct{ Content string } }
		}
		if err := json.Unmarshal([]byte(strings.TrimPrefix(e, "data: ")), &ch); err != nil || len(ch.Choices) != 1 {
			t.Fatalf("event %q: %v", e, err)
		}
		text.WriteString(ch.Choices[0].Delta.Content)
	}
	if events[len(events)-1] != "data: [DONE]" || !strings.Contains(text.String(), "four") {
		t.Errorf("chat stream: %q ending %q; want the digits spelled and [DONE]", text.String(), events[len(events)-1])
	}
}
