// A minimal gRPC front for stargz-snapshotter's library, for clip's benchmarks only.
//
// Debian ships stargz-snapshotter's library (golang-github-containerd-stargz-snapshotter-dev)
// and its ctr-remote, but not its daemon, containerd-stargz-grpc. This program serves the
// library's snapshotter (service.NewStargzSnapshotterService, the daemon's own constructor, with
// its own defaults) on a unix socket as a containerd proxy plugin. scripts/bench/stargz.sh
// builds it from Debian's packaged Go sources.
//
// usage: stargz-grpc -address SOCK -root DIR [-config FILE]
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/pelletier/go-toml"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "", "unix socket to serve")
	root := flag.String("root", "", "state directory")
	configPath := flag.String("config", "", "stargz snapshotter config (TOML)")
	flag.Parse()
	if *address == "" || *root == "" {
		fmt.Fprintln(os.Stderr, "usage: stargz-grpc -address SOCK -root DIR [-config FILE]")
		os.Exit(2)
	}
	if err := run(*address, *root, *configPath); err != nil {
		fmt.Fprintln(os.Stderr, "stargz-grpc:", err)
		os.Exit(1)
	}
}

func run(address, root, configPath string) error {
	var cfg service.Config
	if configPath != "" {
		tree, err := toml.LoadFile(configPath)
		if err != nil {
			return fmt.Errorf("reading %s: %w", configPath, err)
		}
		if err := tree.Unmarshal(&cfg); err != nil {
			return fmt.Errorf("parsing %s: %w", configPath, err)
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return err
	}
	ctx := context.Background()
	sn, err := service.NewStargzSnapshotterService(ctx, root, &cfg)
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))
	_ = os.Remove(address)
	l, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		server.Stop()
	}()
	serveErr := server.Serve(l)
	if err := sn.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "stargz-grpc: closing:", err)
	}
	if serveErr != nil && serveErr != grpc.ErrServerStopped {
		return serveErr
	}
	return nil
}
