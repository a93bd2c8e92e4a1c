//! `clip`: lazy container images. This binary hosts the command line (and, later, the
//! containerd snapshotter daemon).

mod cli;
mod commands;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let filter = match cli.global.verbose {
        0 => "warn",
        1 => "info,clip_core=info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLIP_LOG")
                .unwrap_or_else(|_| filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clip: error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(commands::run(cli)) {
        eprintln!("clip: error: {e:#}");
        std::process::exit(1);
    }
}
