//! What the user typed. Resolved into settings in `commands`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "clip",
    version,
    about = "Start containers from OCI images without downloading them first"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// Directory for clip's database, indexes and cache.
    #[arg(long, env = "CLIP_ROOT", global = true)]
    pub root: Option<PathBuf>,
    /// A registry host (host[:port]) that may be reached over plain HTTP or unverified TLS.
    /// Repeatable. localhost and 127.0.0.0/8 may always use plain HTTP.
    #[arg(long = "insecure-registry", value_name = "HOST", global = true)]
    pub insecure: Vec<String>,
    /// containerd-style registry host configuration directory (HOST/hosts.toml files).
    #[arg(long, env = "CLIP_HOSTS_DIR", value_name = "DIR", global = true)]
    pub hosts_dir: Option<PathBuf>,
    /// Platform to select from multi-platform images (os/arch[/variant]); default: this machine.
    #[arg(long, global = true)]
    pub platform: Option<String>,
    /// Give up on a registry operation (including retries) after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, global = true)]
    pub registry_timeout: u64,
    /// Retry a registry response whose headers or next body chunk take longer than this.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, global = true)]
    pub stall_timeout: u64,
    /// More log output (-v: info, -vv: debug). CLIP_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build the index of an image (one streaming pass per layer) and store it locally.
    Index(IndexArgs),
    /// Show an image's layers, files and index sizes, or where one file's bytes are.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Image reference: [host[:port]/]repository[:tag][@digest].
    pub reference: String,
    /// Publish the index to the image's registry as an OCI artifact referring to the image.
    #[arg(long)]
    pub push: bool,
    /// Uncompressed bytes between checkpoints (e.g. 512KiB, 1MiB, 4MiB).
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pub span_size: u64,
    /// Rebuild indexes already in the local store.
    #[arg(long)]
    pub force: bool,
    /// Layers indexed in parallel.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Image reference.
    pub reference: String,
    /// A path in the image's root filesystem.
    pub path: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses sizes like `1048576`, `512KiB`, `1MiB`, `4M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("invalid size unit in {s:?} (use KiB, MiB or GiB)")),
    };
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))?;
    if !(64 << 10..=64 << 20).contains(&v) {
        return Err(format!("span size {s:?} out of range (64KiB to 64MiB)"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4m"), Ok(4 << 20));
        assert!(parse_size("1").is_err());
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("1GiB").is_err());
    }
}
