// Package muonclient is a small Go client of muon-server, on the stubs that
// protoc-gen-go and protoc-gen-go-grpc generate from proto/muon/v1 (import
// path "muon/v1", the proto's go_package). It covers health, sessions and
// whole steps; docs/api.md is the protocol it follows.
package muonclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"

	muonv1 "muon/v1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
)

// DefaultChunkBytes is the gradient chunk size: the server accepts any size
// up to its message limit; 1 MiB is what the other clients send.
const DefaultChunkBytes = 1 << 20

// Client is one channel to a muon-server.
type Client struct {
	conn   *grpc.ClientConn
	stub   muonv1.OptimizerClient
	health grpc_health_v1.HealthClient
	// ChunkBytes is the size of each gradient chunk a Step sends.
	ChunkBytes int
}

// Dial opens a plaintext channel to target (host:port). The connection is
// made lazily: an unreachable server shows up as UNAVAILABLE on the first call.
func Dial(target string, opts ...grpc.DialOption) (*Client, error) {
	if target == "" {
		return nil, errors.New("muonclient: empty target; pass host:port of a muon-server")
	}
	conn, err := grpc.Dial(target, append([]grpc.DialOption{grpc.WithInsecure()}, opts...)...)
	if err != nil {
		return nil, fmt.Errorf("muonclient: dial %s: %w", target, err)
	}
	return &Client{
		conn:       conn,
		stub:       muonv1.NewOptimizerClient(conn),
		health:     grpc_health_v1.NewHealthClient(conn),
		ChunkBytes: DefaultChunkBytes,
	}, nil
}

// Close closes the channel.
func (c *Client) Close() error { return c.conn.Close() }

// Health is the grpc.health.v1 status of the whole server: SERVING,
// NOT_SERVING (draining) or UNKNOWN.
func (c *Client) Health(ctx context.Context) (string, error) {
	resp, err := c.health.Check(ctx, &grpc_health_v1.HealthCheckRequest{})
	if err != nil {
		return "", err
	}
	return resp.GetStatus().String(), nil
}

// Session names a session on every call.
type Session struct {
	ID    string
	Token string
	// Step is the last committed step when the session was returned.
	Step uint64
	// Info is the session as created, every hyper-parameter resolved.
	Info *muonv1.SessionInfo
}

// CreateSession registers req.Params with their hyper-parameters.
func (c *Client) CreateSession(ctx context.Context, req *muonv1.CreateSessionRequest) (*Session, error) {
	resp, err := c.stub.CreateSession(ctx, req)
	if err != nil {
		return nil, err
	}
	return &Session{ID: resp.GetSessionId(), Token: resp.GetToken(), Step: resp.GetStep(),
		Info: resp.GetSession()}, nil
}

// GetSession returns the session with its parameters and step.
func (c *Client) GetSession(ctx context.Context, s *Session) (*muonv1.SessionInfo, error) {
	return c.stub.GetSession(ctx, &muonv1.GetSessionRequest{SessionId: s.ID, Token: s.Token})
}

// DeleteSession drops the session and its state.
func (c *Client) DeleteSession(ctx context.Context, s *Session) error {
	_, err := c.stub.DeleteSession(ctx, &muonv1.DeleteSessionRequest{SessionId: s.ID, Token: s.Token})
	return err
}

// Gradient is one parameter's whole gradient: little-endian, row-major bytes
// in the parameter's registered dtype.
type Gradient struct {
	ParamIndex uint32
	Data       []byte
}

// Update is one parameter's committed update: W ← Decay·W + Data (UPDATE) or
// W ← Data (WEIGHTS, parameter-server sessions).
type Update struct {
	ParamIndex uint32
	DType      muonv1.DType
	Content    muonv1.UpdateContent
	Decay      float64
	Data       []byte
}

// StepResult holds the updates by ascending ParamIndex and the server's summary.
type StepResult struct {
	Updates []Update
	Summary *muonv1.StepSummary
}

// Step sends grads under step number step (the session's step + 1 for a new
// step) and returns the updates once the server has committed the step. On
// an error nothing is returned and, as the server commits a step only after
// its summary, calling Step again with the same arguments is safe.
func (c *Client) Step(ctx context.Context, s *Session, step uint64, grads []Gradient) (*StepResult, error) {
	if c.ChunkBytes <= 0 {
		return nil, fmt.Errorf("muonclient: ChunkBytes is %d; it must be positive", c.ChunkBytes)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.stub.Step(ctx)
	if err != nil {
		return nil, err
	}
	// Updates are read while gradients are still being sent, so neither side
	// waits on a full flow-control window.
	type received struct {
		result *StepResult
		err    error
	}
	done := make(chan received, 1)
	go func() {
		result, err := receiveUpdates(stream)
		done <- received{result, err}
	}()
	sendErr := sendStep(stream, s, step, grads, c.ChunkBytes)
	if sendErr != nil && sendErr != io.EOF {
		cancel()
		<-done
		return nil, sendErr
	}
	// io.EOF from a send means the server ended the stream; its status comes
	// from the receiving side.
	r := <-done
	return r.result, r.err
}

func sendStep(stream muonv1.Optimizer_StepClient, s *Session, step uint64, grads []Gradient, chunk int) error {
	header := &muonv1.StepRequest{Kind: &muonv1.StepRequest_Header{Header: &muonv1.StepHeader{
		SessionId: s.ID, Token: s.Token, Step: step}}}
	if err := stream.Send(header); err != nil {
		return err
	}
	indices := make([]uint32, 0, len(grads))
	for _, g := range grads {
		indices = append(indices, g.ParamIndex)
		for offset := 0; offset < len(g.Data); offset += chunk {
			end := offset + chunk
			if end > len(g.Data) {
				end = len(g.Data)
			}
			msg := &muonv1.StepRequest{Kind: &muonv1.StepRequest_Gradient{Gradient: &muonv1.TensorChunk{
				ParamIndex: g.ParamIndex, Offset: uint64(offset), Data: g.Data[offset:end]}}}
			if err := stream.Send(msg); err != nil {
				return err
			}
		}
	}
	end := &muonv1.StepRequest{Kind: &muonv1.StepRequest_End{End: &muonv1.StepEnd{ParamIndices: indices}}}
	if err := stream.Send(end); err != nil {
		return err
	}
	return stream.CloseSend()
}

func receiveUpdates(stream muonv1.Optimizer_StepClient) (*StepResult, error) {
	updates := map[uint32]*Update{}
	var summary *muonv1.StepSummary
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		if u := resp.GetUpdate(); u != nil {
			entry, ok := updates[u.GetParamIndex()]
			if !ok {
				entry = &Update{ParamIndex: u.GetParamIndex(), DType: u.GetDtype(), Content: u.GetContent(),
					Decay: u.GetDecay(), Data: make([]byte, u.GetTotalBytes())}
				updates[u.GetParamIndex()] = entry
			}
			if u.GetOffset()+uint64(len(u.GetData())) > uint64(len(entry.Data)) {
				return nil, fmt.Errorf("muonclient: update chunk of parameter %d at %d+%d overruns its %d bytes",
					u.GetParamIndex(), u.GetOffset(), len(u.GetData()), len(entry.Data))
			}
			copy(entry.Data[u.GetOffset():], u.GetData())
		} else if sm := resp.GetSummary(); sm != nil {
			summary = sm
		}
	}
	if summary == nil {
		return nil, errors.New("muonclient: step stream ended without a summary")
	}
	result := &StepResult{Summary: summary}
	for _, u := range updates {
		result.Updates = append(result.Updates, *u)
	}
	sort.Slice(result.Updates, func(i, j int) bool {
		return result.Updates[i].ParamIndex < result.Updates[j].ParamIndex
	})
	return result, nil
}
