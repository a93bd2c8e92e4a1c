// containerd's own snapshotter test suite (snapshots/testsuite of containerd 1.6, from Debian's
// golang-github-containerd-containerd-dev) against the clip snapshotter daemon, through
// containerd's proxy snapshotter client: the same gRPC path containerd uses. A fresh daemon per
// case. Built and run by scripts/conformance.sh.
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func startClip(bin, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(root, "clip.sock")
	log, err := os.Create(filepath.Join(root, "clip.log"))
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "--root", filepath.Join(root, "clip"), "snapshotter",
		"--address", sock, "--no-handover")
	cmd.Env = append(os.Environ(), "CLIP_LOG=warn")
	cmd.Stdout = log
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(filepath.Join(root, "clip.log"))
			return nil, nil, fmt.Errorf("clip snapshotter exited (%v): %s", err, b)
		default:
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			return nil, nil, fmt.Errorf("clip snapshotter did not listen on %s", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
	if err != nil {
		cmd.Process.Kill()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "clip")
	cleanup := func() error {
		conn.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
			return nil
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			return fmt.Errorf("clip snapshotter did not stop on SIGTERM")
		}
	}
	return sn, cleanup, nil
}

func TestClipSnapshotter(t *testing.T) {
	bin := os.Getenv("CLIP_BIN")
	if bin == "" {
		t.Fatal("CLIP_BIN must name the clip binary")
	}
	testsuite.SnapshotterSuite(t, "clip", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startClip(bin, root)
	})
}
