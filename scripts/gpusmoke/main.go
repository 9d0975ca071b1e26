// Command client sends one prompt for several adapters to a shard or router and prints each
// completion; scripts/gpusmoke/check.sh uses it on the GPU machine, where the full CLI is too large to
// carry.
package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	loraplexv1 "github.com/loraplex/loraplex/proto/loraplex/v1"
)

func main() {
	conn, err := grpc.NewClient(os.Args[1], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	cl := loraplexv1.NewGenerationServiceClient(conn)
	for _, name := range strings.Split(os.Args[2], ",") {
		a := name
		if a == "base" {
			a = ""
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		r, err := cl.Generate(ctx, &loraplexv1.GenerateRequest{AdapterId: a, Prompt: &loraplexv1.GenerateRequest_Text{Text: os.Args[3]},
			Stopping: &loraplexv1.StoppingCriteria{MaxNewTokens: 64}})
		cancel()
		if err != nil {
			fmt.Printf("%s error: %v\n", name, err)
			continue
		}
		fmt.Printf("%s %q ttft=%v\n", name, strings.TrimSpace(r.Text), r.Timings.TimeToFirstToken.AsDuration())
	}
}
