// The Go client (client/go/muonclient) against a real muon-server
// (MUON_SERVER_BIN, CPU engine, 127.0.0.1:0): health, CreateSession, one
// whole step whose updates must equal, byte for byte, those the C++ client
// got for the same gradients on a session of the same parameters
// (MUON_REFERENCE_STEP runs cpp/reference_step.cc), and DeleteSession.
package gotest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	muonv1 "muon/v1"
	"muonclient"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// The same parameters, in the same order, as cpp/reference_step.cc's SessionRequest.
func sessionRequest() *muonv1.CreateSessionRequest {
	param := func(name string, kind muonv1.OptimizerKind, shape ...int64) *muonv1.ParameterSpec {
		return &muonv1.ParameterSpec{Name: name, Shape: shape, Dtype: muonv1.DType_DTYPE_FLOAT32, Kind: kind}
	}
	return &muonv1.CreateSessionRequest{
		Name: "go-client",
		Params: []*muonv1.ParameterSpec{
			param("tall", muonv1.OptimizerKind_OPTIMIZER_KIND_MUON, 96, 40),
			param("wide", muonv1.OptimizerKind_OPTIMIZER_KIND_MUON, 24, 200),
			param("bias", muonv1.OptimizerKind_OPTIMIZER_KIND_ADAMW, 40),
		},
		HyperParams:      &muonv1.HyperParams{Lr: proto.Float64(0.02), WeightDecay: proto.Float64(0.1)},
		AdamwHyperParams: &muonv1.HyperParams{Lr: proto.Float64(3e-4)},
	}
}

// startServer runs muon-server on a free loopback port until the test ends.
func startServer(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("MUON_SERVER_BIN")
	if bin == "" {
		t.Fatal("set MUON_SERVER_BIN to the built muon-server")
	}
	portFile := filepath.Join(t.TempDir(), "port")
	server := exec.Command(bin, "--listen=127.0.0.1:0", "--port_file="+portFile, "--metrics_listen=",
		"--engine=cpu")
	server.Stderr = os.Stderr
	if err := server.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- server.Wait() }()
	t.Cleanup(func() {
		_ = server.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(60 * time.Second):
			_ = server.Process.Kill()
			<-exited
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if port, err := os.ReadFile(portFile); err == nil && len(bytes.TrimSpace(port)) > 0 {
			return "127.0.0.1:" + string(bytes.TrimSpace(port))
		}
		select {
		case err := <-exited:
			t.Fatalf("muon-server exited before listening: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatal("muon-server did not write its port file within 60 s")
	return ""
}

func read(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestHealthSessionStepDelete(t *testing.T) {
	address := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()

	client, err := muonclient.Dial(address)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	// Chunks smaller than every tensor but one: several chunks per
	// parameter, and one parameter sent whole.
	client.ChunkBytes = 4096

	health, err := client.Health(ctx)
	if err != nil || health != "SERVING" {
		t.Fatalf("Health: %q, %v; want SERVING", health, err)
	}

	reference := t.TempDir()
	cpp := exec.CommandContext(ctx, os.Getenv("MUON_REFERENCE_STEP"), "--server="+address, "--out="+reference)
	if out, err := cpp.CombinedOutput(); err != nil {
		t.Fatalf("the C++ client's step (MUON_REFERENCE_STEP): %v\n%s", err, out)
	}

	request := sessionRequest()
	session, err := client.CreateSession(ctx, request)
	if err != nil {
		t.Fatalf("CreateSession: %v", err)
	}
	if session.ID == "" || session.Token == "" || session.Step != 0 {
		t.Fatalf("CreateSession returned id %q, token %q, step %d", session.ID, session.Token, session.Step)
	}
	if got := len(session.Info.GetParams()); got != len(request.Params) {
		t.Fatalf("session has %d parameters, want %d", got, len(request.Params))
	}

	var grads []muonclient.Gradient
	for i := range request.Params {
		grads = append(grads, muonclient.Gradient{ParamIndex: uint32(i),
			Data: read(t, filepath.Join(reference, "grad_"+strconv.Itoa(i)+".bin"))})
	}
	result, err := client.Step(ctx, session, session.Step+1, grads)
	if err != nil {
		t.Fatalf("Step: %v", err)
	}
	if result.Summary.GetStep() != 1 || result.Summary.GetReplayed() {
		t.Fatalf("summary: step %d replayed %v; want step 1, not replayed",
			result.Summary.GetStep(), result.Summary.GetReplayed())
	}
	if len(result.Updates) != len(request.Params) {
		t.Fatalf("%d updates, want %d", len(result.Updates), len(request.Params))
	}
	for i, u := range result.Updates {
		want := read(t, filepath.Join(reference, "update_"+strconv.Itoa(i)+".bin"))
		if u.ParamIndex != uint32(i) || u.DType != muonv1.DType_DTYPE_FLOAT32 ||
			u.Content != muonv1.UpdateContent_UPDATE_CONTENT_UPDATE {
			t.Errorf("update %d: index %d, dtype %v, content %v", i, u.ParamIndex, u.DType, u.Content)
		}
		if len(want) != len(grads[i].Data) || bytes.Count(want, []byte{0}) == len(want) {
			t.Fatalf("the C++ update of parameter %d has %d bytes or is all zero", i, len(want))
		}
		if !bytes.Equal(u.Data, want) {
			t.Errorf("parameter %d (%s): the Go client's update differs from the C++ client's",
				i, request.Params[i].Name)
		}
		wantDecay, err := strconv.ParseFloat(strings.TrimSpace(string(read(t,
			filepath.Join(reference, "decay_"+strconv.Itoa(i)+".txt")))), 64)
		if err != nil || u.Decay != wantDecay || u.Decay >= 1 {
			t.Errorf("parameter %d: decay %v, the C++ client's %v (%v); want equal and below 1 (weight decay)",
				i, u.Decay, wantDecay, err)
		}
	}

	// A replay of the committed step applies nothing and says so.
	replay, err := client.Step(ctx, session, 1, grads)
	if err != nil {
		t.Errorf("replaying step 1: %v", err)
	} else if !replay.Summary.GetReplayed() {
		t.Errorf("replaying step 1: the summary does not say replayed")
	}

	if err := client.DeleteSession(ctx, session); err != nil {
		t.Fatalf("DeleteSession: %v", err)
	}
	if _, err := client.GetSession(ctx, session); status.Code(err) != codes.NotFound {
		t.Fatalf("GetSession after DeleteSession: %v; want NOT_FOUND", err)
	}
	if _, err := client.Step(ctx, session, 2, grads); status.Code(err) != codes.NotFound {
		t.Fatalf("Step on the deleted session: %v; want NOT_FOUND", err)
	}
}
