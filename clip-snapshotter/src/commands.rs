//! The subcommands.

use crate::cli::human;
use crate::cli::{
    CacheArgs, CatArgs, Cli, Command, FillArgs, GlobalArgs, IndexArgs, InspectArgs, MountArgs,
    ProfileArgs, UmountArgs, WarmArgs,
};
use crate::node::{default_root, open_node, serve_metrics, Node};
use anyhow::{Context, Result};
use clip_core::image::{self, LayerReport};
use clip_core::index::{EntryKind, ImageView};
use clip_core::reader::{LayerReader, ReadPath};
use clip_core::registry::ResolvedImage;
use clip_core::Reference;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub async fn run(cli: Cli) -> Result<()> {
    if let Command::Snapshotter(a) = cli.command {
        // Merges its configuration file into the flags first (metrics address included).
        return crate::daemon::run(&cli.global, a).await;
    }
    serve_metrics(cli.global.metrics_address)?;
    match cli.command {
        Command::Index(a) => index(&cli.global, a).await,
        Command::Inspect(a) => inspect(&cli.global, a).await,
        Command::Cat(a) => cat(&cli.global, a).await,
        Command::Warm(a) => warm(&cli.global, a).await,
        Command::Fill(a) => fill(&cli.global, a).await,
        Command::Mount(a) => mount(&cli.global, a).await,
        Command::Umount(a) => umount(a),
        Command::Pull(a) => crate::pull::pull(&cli.global, a).await,
        Command::Profile(a) => profile(&cli.global, a).await,
        Command::Gc(a) => crate::gc::command(&cli.global, a).await,
        Command::Snapshotter(_) => unreachable!("handled above"),
        Command::FuseKeeper(_) => unreachable!("handled in main"),
    }
}

async fn resolve(ctx: &Node, reference: &str) -> Result<ResolvedImage> {
    let r: Reference = reference.parse()?;
    ctx.client
        .resolve(&r)
        .await
        .with_context(|| format!("resolving {r}"))
}

fn short(d: &clip_core::Digest) -> String {
    d.to_string()[..19].to_string()
}

struct Totals {
    compressed: u64,
    uncompressed: u64,
    index: u64,
    windows: u64,
    entries: usize,
}

fn totals(reports: &[LayerReport]) -> Totals {
    Totals {
        compressed: reports.iter().map(|r| r.index.compressed_size).sum(),
        uncompressed: reports.iter().map(|r| r.index.uncompressed_size).sum(),
        index: reports.iter().map(|r| r.encoded.len() as u64).sum(),
        windows: reports.iter().map(|r| r.index.windows.size).sum(),
        entries: reports.iter().map(|r| r.index.entries.len()).sum(),
    }
}

fn summary_json(
    image: &ResolvedImage,
    reports: &[LayerReport],
    view: &ImageView,
) -> serde_json::Value {
    let t = totals(reports);
    json!({
        "reference": image.reference.to_string(),
        "manifest_digest": image.manifest_digest.to_string(),
        "layers": reports.iter().map(|r| json!({
            "digest": r.descriptor.digest.to_string(),
            "diff_id": r.index.diff_id.to_string(),
            "compressed_bytes": r.index.compressed_size,
            "uncompressed_bytes": r.index.uncompressed_size,
            "entries": r.index.entries.len(),
            "files": r.index.file_count(),
            "spans": r.index.spans.len(),
            "span_size": r.index.span_size,
            "index_bytes": r.encoded.len(),
            "index_digest": r.encoded_ref().digest.to_string(),
            "checkpoint_bytes": r.index.windows.size,
        })).collect::<Vec<_>>(),
        "files": view.file_count(),
        "paths": view.nodes.len(),
        "entries": t.entries,
        "compressed_bytes": t.compressed,
        "uncompressed_bytes": t.uncompressed,
        "index_bytes": t.index,
        "checkpoint_bytes": t.windows,
    })
}

fn print_layers(reports: &[LayerReport]) {
    println!(
        "{:>3}  {:<19}  {:>10}  {:>12}  {:>7}  {:>5}  {:>9}  {:>9}",
        "#", "layer", "compressed", "uncompressed", "entries", "spans", "index", "windows"
    );
    for (i, r) in reports.iter().enumerate() {
        println!(
            "{:>3}  {:<19}  {:>10}  {:>12}  {:>7}  {:>5}  {:>9}  {:>9}",
            i + 1,
            short(&r.descriptor.digest),
            human(r.index.compressed_size),
            human(r.index.uncompressed_size),
            r.index.entries.len(),
            r.index.spans.len(),
            human(r.encoded.len() as u64),
            human(r.index.windows.size),
        );
    }
}

async fn index(g: &GlobalArgs, a: IndexArgs) -> Result<()> {
    let ctx = open_node(g)?;
    let image = resolve(&ctx, &a.reference).await?;
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("indexing {} layers", image.layers.len()));
    let progress: image::Progress = {
        let bar = bar.clone();
        Arc::new(move |n| bar.inc(n))
    };
    let opts = clip_core::index::BuildOptions {
        span_size: a.span_size,
        ..Default::default()
    };
    let start = Instant::now();
    let reports = image::index_image(
        &ctx.client,
        &ctx.store,
        &image,
        &opts,
        progress,
        a.force,
        a.jobs,
    )
    .await;
    bar.finish_and_clear();
    let reports = reports.with_context(|| format!("indexing {}", image.reference))?;
    let elapsed = start.elapsed();
    let built: Vec<&LayerReport> = reports.iter().filter(|r| r.built).collect();
    let built_bytes: u64 = built.iter().map(|r| r.index.uncompressed_size).sum();
    let layers: Vec<Arc<_>> = reports.iter().map(|r| r.index.clone()).collect();
    let view = ImageView::build(layers).context("merging the layers")?;
    let artifact = if a.push {
        Some(
            image::publish(&ctx.client, &ctx.store, &image, &reports)
                .await
                .context("publishing the index")?,
        )
    } else {
        None
    };
    let t = totals(&reports);
    if a.json {
        let mut j = summary_json(&image, &reports, &view);
        j["seconds"] = json!(elapsed.as_secs_f64());
        j["built_layers"] = json!(built.len());
        j["artifact"] = json!(artifact.map(|d| d.to_string()));
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("{}", image.reference);
    print_layers(&reports);
    println!(
        "total: {} layers, {} files, {} compressed, {} uncompressed; index {} ({:.3}% of compressed), checkpoint windows {}",
        reports.len(),
        view.file_count(),
        human(t.compressed),
        human(t.uncompressed),
        human(t.index),
        100.0 * t.index as f64 / t.compressed.max(1) as f64,
        human(t.windows),
    );
    if built.is_empty() {
        println!(
            "all {} layer indexes were already in {} (use --force to rebuild)",
            reports.len(),
            ctx.store.root().display()
        );
    } else {
        println!(
            "indexed {} of {} layers in {:.2}s ({:.0} MB/s of uncompressed tar)",
            built.len(),
            reports.len(),
            elapsed.as_secs_f64(),
            built_bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9),
        );
    }
    if let Some(d) = artifact {
        println!(
            "pushed index artifact {d} (referring to {})",
            image.manifest_digest
        );
    }
    Ok(())
}

fn kind_name(k: Option<&EntryKind>) -> &'static str {
    match k {
        None | Some(EntryKind::Dir) => "directory",
        Some(EntryKind::File { .. }) => "file",
        Some(EntryKind::Symlink { .. }) => "symlink",
        Some(EntryKind::Hardlink { .. }) => "hardlink",
        Some(EntryKind::CharDevice { .. }) => "char-device",
        Some(EntryKind::BlockDevice { .. }) => "block-device",
        Some(EntryKind::Fifo) => "fifo",
        Some(EntryKind::Whiteout) => "whiteout",
        Some(EntryKind::Opaque) => "opaque",
    }
}

async fn inspect(g: &GlobalArgs, a: InspectArgs) -> Result<()> {
    let ctx = open_node(g)?;
    let image = resolve(&ctx, &a.reference).await?;
    // The node's rule for shared layers (trust = owner): an index another repository published
    // is not believed for this image; the layer is indexed here first.
    let reports = image::load_owned_indexes(&ctx.client, &ctx.store, &image, None).await?;
    let view = ImageView::build(reports.iter().map(|r| r.index.clone()).collect())
        .context("merging the layers")?;
    let Some(path) = a.path else {
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&summary_json(&image, &reports, &view))?
            );
        } else {
            let t = totals(&reports);
            println!("{}", image.reference);
            print_layers(&reports);
            println!(
                "total: {} files ({} paths), {} compressed, {} uncompressed, index {}, checkpoint windows {}",
                view.file_count(),
                view.nodes.len(),
                human(t.compressed),
                human(t.uncompressed),
                human(t.index),
                human(t.windows)
            );
        }
        return Ok(());
    };
    let norm = clip_core::index::builder::normalize(path.trim_start_matches('/').as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (node, entry) = view
        .get(&norm)
        .ok_or_else(|| anyhow::anyhow!("{path}: no such file in {}", image.reference))?;
    let layer = &reports[node.layer as usize];
    let mut j = json!({
        "path": format!("/{}", String::from_utf8_lossy(&norm)),
        "type": kind_name(entry.map(|e| &e.kind)),
        "layer": node.layer + 1,
        "layer_digest": layer.descriptor.digest.to_string(),
        "implied": entry.is_none(),
    });
    if let Some(e) = entry {
        j["mode"] = json!(format!("{:04o}", e.mode));
        j["uid"] = json!(e.uid);
        j["gid"] = json!(e.gid);
        j["mtime"] = json!(e.mtime);
        j["xattrs"] = json!(e
            .xattrs
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>());
        match &e.kind {
            EntryKind::Symlink { target } | EntryKind::Hardlink { target } => {
                j["target"] = json!(String::from_utf8_lossy(target));
            }
            EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
                j["device"] = json!(format!("{major}:{minor}"));
            }
            _ => {}
        }
    }
    if let Some((li, offset, size)) = view.file_data(&node) {
        let ix = &reports[li as usize].index;
        let spans = ix.spans_covering(offset, size);
        let (cs, _) = if spans.is_empty() {
            (0, 0)
        } else {
            ix.span_compressed_range(spans.start)
        };
        let (_, ce) = if spans.is_empty() {
            (0, 0)
        } else {
            ix.span_compressed_range(spans.end - 1)
        };
        j["data_layer"] = json!(li + 1);
        j["data_layer_digest"] = json!(reports[li as usize].descriptor.digest.to_string());
        j["size"] = json!(size);
        j["offset"] = json!(offset);
        j["spans"] = json!([spans.start, spans.end]);
        j["compressed_range"] = json!([cs, ce]);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    for (k, v) in j.as_object().expect("object") {
        println!(
            "{k:>18}: {}",
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        );
    }
    Ok(())
}

/// An image opened for lazy reads: its merged view and a reader per layer.
struct OpenImage {
    view: ImageView,
    readers: Vec<Arc<LayerReader>>,
    path: ReadPath,
}

/// How a command's reads switch a layer to bulk streaming: never for `cat` (one file is never
/// worth the rest of its layer) or `profile` (it notes what a command reads; the rest of the
/// layer would cost the publisher's CI the whole image); as a workload's for `mount`, `warm`,
/// `fill`.
fn bulk_for(one_command: bool) -> clip_core::fetch::BulkConfig {
    match one_command {
        true => clip_core::fetch::BulkConfig::off(),
        false => Default::default(),
    }
}

async fn open_image(
    ctx: &Node,
    reference: &str,
    c: &CacheArgs,
    bulk: clip_core::fetch::BulkConfig,
) -> Result<(ResolvedImage, OpenImage)> {
    crate::config::check_budget(c.memory_budget)?;
    crate::config::apply_memory(c.memory_budget, c.index_memory);
    let image = resolve(ctx, reference).await?;
    // As the snapshotter's default (trust = owner): a layer whose index another repository
    // published is indexed here before this image reads it.
    let reports = image::load_owned_indexes(&ctx.client, &ctx.store, &image, None).await?;
    let cfg = crate::config::cache_config(c, ctx.store.root());
    let path = ReadPath::open(&cfg, bulk, &ctx.store).await?;
    let readers = reports
        .iter()
        .map(|r| {
            let windows = ctx.store.windows_for_reads(&r.index.windows);
            path.reader(&ctx.client, &image.reference, r.index.clone(), windows)
        })
        .collect();
    let view = ImageView::build(reports.iter().map(|r| r.index.clone()).collect())
        .context("merging the layers")?;
    Ok((
        image,
        OpenImage {
            view,
            readers,
            path,
        },
    ))
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn report_stats(o: &OpenImage, extra: serde_json::Value) {
    o.path.flush().await;
    let mut j = o.path.stats();
    j["peak_rss_bytes"] = json!(peak_rss());
    if let (Some(obj), Some(extra)) = (j.as_object_mut(), extra.as_object()) {
        obj.extend(extra.clone());
    }
    eprintln!("{j}");
}

async fn cat(g: &GlobalArgs, a: CatArgs) -> Result<()> {
    use std::io::Write;
    let ctx = open_node(g)?;
    let (image, o) = open_image(&ctx, &a.reference, &a.cache, bulk_for(true)).await?;
    let norm = clip_core::index::builder::normalize(a.path.trim_start_matches('/').as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (node, entry) = o
        .view
        .get(&norm)
        .ok_or_else(|| anyhow::anyhow!("{}: no such file in {}", a.path, image.reference))?;
    let (layer, offset, size) = o.view.file_data(&node).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: not a regular file ({})",
            a.path,
            kind_name(entry.map(|e| &e.kind))
        )
    })?;
    let reader = &o.readers[layer as usize];
    let mut out = std::io::stdout().lock();
    let chunk: u64 = 8 << 20;
    let mut pos = 0;
    let start = Instant::now();
    while pos < size {
        let n = chunk.min(size - pos);
        let data = reader
            .read(offset + pos, n)
            .await
            .with_context(|| format!("reading {}", a.path))?;
        anyhow::ensure!(data.len() as u64 == n, "short read of {} at {pos}", a.path);
        out.write_all(&data).context("writing to stdout")?;
        pos += n;
    }
    out.flush().context("writing to stdout")?;
    if a.cache.stats {
        report_stats(
            &o,
            json!({ "file_bytes": size, "seconds": start.elapsed().as_secs_f64() }),
        )
        .await;
    } else {
        o.path.flush().await;
    }
    Ok(())
}

async fn warm(g: &GlobalArgs, a: WarmArgs) -> Result<()> {
    use futures_util::StreamExt;
    let ctx = open_node(g)?;
    let (_image, o) = open_image(&ctx, &a.reference, &a.cache, bulk_for(false)).await?;
    let files: Vec<(u32, u64, u64)> = o
        .view
        .nodes
        .values()
        .filter_map(|n| o.view.file_data(n))
        .collect();
    let total: u64 = files.iter().map(|f| f.2).sum();
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("warming [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let chunk: u64 = 1 << 20;
    let results: Vec<Result<u64>> = futures_util::stream::iter(files.iter().copied())
        .map(|(layer, offset, size)| {
            let reader = o.readers[layer as usize].clone();
            let bar = bar.clone();
            async move {
                let mut pos = 0;
                while pos < size {
                    let n = chunk.min(size - pos);
                    reader.read(offset + pos, n).await?;
                    bar.inc(n);
                    pos += n;
                }
                Ok(size)
            }
        })
        .buffer_unordered(a.jobs.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let read: u64 = results
        .into_iter()
        .collect::<Result<Vec<_>>>()?
        .iter()
        .sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "read {} files, {} in {:.2}s",
        files.len(),
        human(read),
        secs
    );
    if a.cache.stats {
        report_stats(
            &o,
            json!({ "files": files.len(), "file_bytes": read, "seconds": secs }),
        )
        .await;
    } else {
        o.path.flush().await;
    }
    Ok(())
}

async fn fill(g: &GlobalArgs, a: FillArgs) -> Result<()> {
    let ctx = open_node(g)?;
    let (_image, o) = open_image(&ctx, &a.reference, &a.cache, bulk_for(false)).await?;
    let cancel = tokio_util::sync::CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopping the fill (what was fetched stays cached)");
                cancel.cancel();
            }
        });
    }
    let start = Instant::now();
    let mut fetched = 0;
    for (i, r) in o.readers.iter().enumerate() {
        if cancel.is_cancelled() {
            break;
        }
        let n = r
            .fill(a.rate, cancel.clone())
            .await
            .with_context(|| format!("filling layer {}", i + 1))?;
        eprintln!("layer {}: fetched {}", i + 1, human(n));
        fetched += n;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fetched {} in {:.2}s ({}/s){}",
        human(fetched),
        secs,
        human((fetched as f64 / secs.max(1e-9)) as u64),
        if cancel.is_cancelled() {
            " before being stopped"
        } else {
            ""
        }
    );
    if a.cache.stats {
        report_stats(&o, json!({ "fetched_bytes": fetched, "seconds": secs, "cancelled": cancel.is_cancelled() })).await;
    } else {
        o.path.flush().await;
    }
    Ok(())
}

/// `clip mount --daemon`: the same command again, without --daemon, in its own session with its
/// output in a log file; returns once the mount is up (or with the child's error if it is not).
fn mount_in_background(g: &GlobalArgs, a: &MountArgs) -> Result<()> {
    let root = g.root.clone().unwrap_or_else(default_root);
    let log = a.log.clone().unwrap_or_else(|| root.join("mount.log"));
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening the log {}", log.display()))?;
    let start = file.metadata().map(|m| m.len()).unwrap_or(0);
    // The same arguments without --daemon and --log (which only the parent uses).
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(x) = it.next() {
        if x == "--daemon" {
            continue;
        }
        if x == "--log" {
            it.next();
            continue;
        }
        if x.to_string_lossy().starts_with("--log=") {
            continue;
        }
        args.push(x);
    }
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let mut child = crate::os::own_session(&mut cmd)
        .spawn()
        .context("starting the background mount")?;
    let dir = a.dir.canonicalize().unwrap_or_else(|_| a.dir.clone());
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(g.registry_timeout + 60);
    loop {
        if crate::os::is_mounted(&dir) {
            eprintln!(
                "mounted {} at {} in the background (pid {}, log {}); `clip umount {}` stops it",
                a.reference,
                a.dir.display(),
                child.id(),
                log.display(),
                a.dir.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read(&log).unwrap_or_default();
            let tail = String::from_utf8_lossy(&text[(start as usize).min(text.len())..]);
            anyhow::bail!("the background mount exited ({status}): {}", tail.trim());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!(
                "the background mount did not come up; see {}",
                log.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

async fn mount(g: &GlobalArgs, a: MountArgs) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    anyhow::ensure!(a.dir.is_dir(), "{}: not a directory", a.dir.display());
    if a.daemon {
        return mount_in_background(g, &a);
    }
    let ctx = open_node(g)?;
    let (image, o) = open_image(&ctx, &a.reference, &a.cache, bulk_for(false)).await?;
    let mut fs = clip_fuse::ClipFs::new(&o.view, o.readers.clone())?;
    if let Some(store) = &o.path.files {
        fs = fs.with_passthrough(store.clone(), a.passthrough_min_size);
    }
    let opts = clip_fuse::MountOptions {
        allow_other: !a.no_allow_other,
        suid_dev: a.suid_dev,
        threads: a.threads,
        passthrough: o.path.files.is_some(),
        passthrough_min_size: a.passthrough_min_size,
        ..Default::default()
    };
    let session = clip_fuse::mount(fs, &a.dir, tokio::runtime::Handle::current(), &opts)
        .with_context(|| {
            format!(
                "mounting {} (FUSE needs root or /dev/fuse access)",
                a.dir.display()
            )
        })?;
    eprintln!(
        "mounted {} at {} ({} paths); Ctrl-C, SIGTERM or `clip umount` unmounts",
        image.reference,
        a.dir.display(),
        o.view.nodes.len()
    );
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    // Unmounted from outside (`clip umount`, umount): the session ends; so does this process.
    let ended = async {
        while !session.guard.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let unmounted = tokio::select! {
        _ = term.recv() => false,
        _ = int.recv() => false,
        _ = ended => true,
    };
    if unmounted {
        eprintln!("{} was unmounted", a.dir.display());
        o.path.flush().await;
        return Ok(());
    }
    eprintln!("unmounting {}", a.dir.display());
    o.path.flush().await;
    tokio::task::spawn_blocking(move || session.umount_and_join())
        .await
        .context("unmount task")?
        .context("unmounting")?;
    Ok(())
}

async fn profile(g: &GlobalArgs, a: ProfileArgs) -> Result<()> {
    use clip_core::profile::{LayerProfile, Profile, Recorder};
    let ctx = open_node(g)?;
    let (image, o) = open_image(&ctx, &a.reference, &a.cache, bulk_for(true)).await?;
    let window = Duration::from_secs(a.seconds.max(1));
    let recorders: Vec<Arc<Recorder>> = o
        .readers
        .iter()
        .map(|_| Arc::new(Recorder::new(window)))
        .collect();
    let readers: Vec<Arc<LayerReader>> = o
        .readers
        .iter()
        .zip(&recorders)
        .map(|(r, rec)| r.clone().recording(rec.clone()))
        .collect();
    // No passthrough: every read must reach the recorders.
    let fs = clip_fuse::ClipFs::new(&o.view, readers)?;
    let opts = clip_fuse::MountOptions {
        passthrough: false,
        ..Default::default()
    };
    let mnt = tempfile_dir(ctx.store.root(), "profile-root")?;
    let session = clip_fuse::mount(fs, &mnt, tokio::runtime::Handle::current(), &opts)
        .with_context(|| format!("mounting {} at {}", image.reference, mnt.display()))?;
    eprintln!(
        "recording {} while running {:?} (at most {} s after the first read)",
        image.reference,
        a.command.join(" "),
        window.as_secs()
    );
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork"]);
    if mnt.join("proc").is_dir() {
        cmd.arg(format!("--mount-proc={}", mnt.join("proc").display()));
    }
    cmd.arg("chroot").arg(&mnt).args(&a.command);
    // The command's output goes to stderr: stdout carries only the artifact digest.
    let to_stderr = {
        use std::os::fd::AsFd;
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stderr")?
    };
    let status = cmd
        .stdout(std::process::Stdio::from(to_stderr))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .status()
        .await
        .context("running the command (unshare and chroot from util-linux/coreutils)");
    tokio::task::spawn_blocking(move || session.umount_and_join())
        .await
        .context("unmount task")?
        .context("unmounting")?;
    let _ = std::fs::remove_dir(&mnt);
    let status = status?;
    let mut recorded = Profile::new(image.manifest_digest);
    let (mut read_u, mut read_c) = (0, 0);
    for (r, rec) in o.readers.iter().zip(&recorders) {
        let ranges = rec.ranges();
        let (u, c) = clip_core::profile::floor_bytes(r.index(), &ranges);
        (read_u, read_c) = (read_u + u, read_c + c);
        if !ranges.is_empty() {
            recorded.layers.push(LayerProfile {
                layer: r.index().layer,
                ranges,
            });
        }
    }
    // Machine-readable for benchmarks: the floor of a cold start is these compressed bytes.
    eprintln!("read: {read_u} bytes of files, {read_c} bytes compressed");
    anyhow::ensure!(
        !recorded.layers.is_empty(),
        "the command read no file of the image ({status}); nothing to record"
    );
    let mut merged = if a.no_push {
        ctx.store.get_profile(&image.manifest_digest)
    } else {
        clip_core::artifact::fetch_profile(&ctx.client, &image)
            .await
            .unwrap_or_else(|e| {
                eprintln!("ignoring the published profile: {e}");
                None
            })
    }
    .unwrap_or_else(|| Profile::new(image.manifest_digest));
    merged.merge(&recorded);
    ctx.store.put_profile(&merged).await?;
    let covered: u64 = merged
        .layers
        .iter()
        .flat_map(|l| l.ranges.iter().map(|r| r.1))
        .sum();
    let ranges: usize = merged.layers.iter().map(|l| l.ranges.len()).sum();
    eprintln!(
        "command {status} after {:.2}s; profile: {} layers, {ranges} ranges, {} of file data",
        started.elapsed().as_secs_f64(),
        merged.layers.len(),
        human(covered)
    );
    if !a.no_push {
        let d = clip_core::artifact::push_profile(&ctx.client, &image, &merged)
            .await
            .context("publishing the profile")?;
        println!("{d}");
    }
    Ok(())
}

/// A new private directory under `root`.
fn tempfile_dir(root: &std::path::Path, prefix: &str) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    for _ in 0..16 {
        let p = root.join(format!("{prefix}.{:08x}", rand::random::<u32>()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
        }
    }
    anyhow::bail!("no free directory name under {}", root.display())
}

fn umount(a: UmountArgs) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(a.dir.as_os_str().as_bytes()).context("mount point path")?;
    // SAFETY: path is a valid NUL-terminated string; umount2 has no other preconditions.
    let rc = unsafe { libc::umount2(path.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    // Not root: let fusermount3 do it.
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&a.dir)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        _ => Err(anyhow::anyhow!("unmounting {}: {err}", a.dir.display())),
    }
}
