//! The merged root filesystem of an image, computed from its layers' indexes.
//!
//! Layers are applied bottom to top the way containerd's overlay applier does: an entry replaces
//! the same path from lower layers (a non-directory replacing anything drops what was below it);
//! `.wh.NAME` deletes a lower path and everything under it; `.wh..wh..opq` hides what lower layers
//! put in a directory; parents a layer omits are implied (mode 0755, root-owned). A hard link is
//! resolved when it is applied, so it keeps pointing at the file's bytes even if a higher layer
//! later deletes the link's target name.

use super::{show_path, Entry, EntryKind, IndexError, LayerIndex};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Marks a directory no layer lists (its parent of something a layer lists).
pub const IMPLIED: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    /// The layer (0 = bottom) whose entry defines this path.
    pub layer: u32,
    /// The entry in that layer, or [`IMPLIED`].
    pub entry: u32,
    /// For hard links: the (layer, entry) of the regular file whose bytes and metadata they share.
    pub data: Option<(u32, u32)>,
}

impl Node {
    /// A directory: implied, or a directory entry of its layer.
    fn is_dir(&self, layers: &[Arc<LayerIndex>]) -> bool {
        self.entry == IMPLIED
            || layers
                .get(self.layer as usize)
                .and_then(|l| l.entries.get(self.entry as usize))
                .is_some_and(|e| e.kind == EntryKind::Dir)
    }
}

pub struct ImageView {
    pub layers: Vec<Arc<LayerIndex>>,
    /// Every path of the merged tree (`""` is the root), sorted.
    pub nodes: BTreeMap<Vec<u8>, Node>,
}

/// The nodes strictly under `dir`: the keys in `[dir + "/", dir + "0")` ('0' follows '/'), or
/// every key but the root's when `dir` is the root.
fn under<'a>(
    nodes: &'a BTreeMap<Vec<u8>, Node>,
    dir: &[u8],
) -> Box<dyn Iterator<Item = (&'a Vec<u8>, &'a Node)> + 'a> {
    if dir.is_empty() {
        return Box::new(nodes.iter().filter(|(k, _)| !k.is_empty()));
    }
    let mut lo = dir.to_vec();
    lo.push(b'/');
    let mut hi = dir.to_vec();
    hi.push(b'0');
    Box::new(nodes.range(lo..hi))
}

/// Removes the nodes under `dir` that `keep` does not keep; returns how many were removed.
fn remove_under(
    nodes: &mut BTreeMap<Vec<u8>, Node>,
    dir: &[u8],
    keep: impl Fn(&Node) -> bool,
) -> usize {
    let doomed: Vec<Vec<u8>> = under(nodes, dir)
        .filter(|(_, n)| !keep(n))
        .map(|(k, _)| k.clone())
        .collect();
    for k in &doomed {
        nodes.remove(k);
    }
    doomed.len()
}

/// The keys strictly under `dir`.
fn keys_under(nodes: &BTreeMap<Vec<u8>, Node>, dir: &[u8]) -> Vec<Vec<u8>> {
    under(nodes, dir).map(|(k, _)| k.clone()).collect()
}

fn parent(path: &[u8]) -> Option<&[u8]> {
    if path.is_empty() {
        return None;
    }
    Some(
        path.iter()
            .rposition(|&b| b == b'/')
            .map_or(&path[..0], |i| &path[..i]),
    )
}

impl ImageView {
    pub fn build(layers: Vec<Arc<LayerIndex>>) -> Result<Self, IndexError> {
        let mut nodes: BTreeMap<Vec<u8>, Node> = BTreeMap::new();
        nodes.insert(
            Vec::new(),
            Node {
                layer: 0,
                entry: IMPLIED,
                data: None,
            },
        );
        for (li, layer) in layers.iter().enumerate() {
            let li = li as u32;
            for (ei, e) in layer.entries.iter().enumerate() {
                let ei = ei as u32;
                // The root is always a directory: an index (hostile or broken) that names it with
                // anything else is ignored for the root, never allowed to remove it.
                if e.path.is_empty() && !matches!(e.kind, EntryKind::Dir | EntryKind::Opaque) {
                    continue;
                }
                match &e.kind {
                    EntryKind::Whiteout => {
                        let lower = |n: &Node| n.layer >= li;
                        let mut removed = 0;
                        if nodes.get(&e.path).is_some_and(|n| n.layer < li) {
                            nodes.remove(&e.path);
                            removed += 1;
                        }
                        removed += remove_under(&mut nodes, &e.path, lower);
                        if removed > 0 {
                            Self::reparent_under(&layers, &mut nodes, &e.path, li);
                        }
                        continue;
                    }
                    EntryKind::Opaque => {
                        let removed = remove_under(&mut nodes, &e.path, |n| n.layer >= li);
                        // The directory itself stays (or is implied).
                        Self::imply_parents(&layers, &mut nodes, &e.path, li, true);
                        if removed > 0 {
                            Self::reparent_under(&layers, &mut nodes, &e.path, li);
                        }
                        continue;
                    }
                    _ => {}
                }
                let data = match &e.kind {
                    EntryKind::Hardlink { target } => {
                        Some(Self::resolve_link(&layers, &nodes, target, &e.path)?)
                    }
                    _ => None,
                };
                // What it replaces can only have something under it if it is a directory (a
                // path's parent always exists and is one).
                if e.kind != EntryKind::Dir && nodes.get(&e.path).is_some_and(|n| n.is_dir(&layers))
                {
                    remove_under(&mut nodes, &e.path, |_| false);
                }
                Self::imply_parents(&layers, &mut nodes, &e.path, li, false);
                nodes.insert(
                    e.path.clone(),
                    Node {
                        layer: li,
                        entry: ei,
                        data,
                    },
                );
            }
        }
        Ok(ImageView { layers, nodes })
    }

    /// The tree's invariant: the root exists and is a directory, and every other path's parent
    /// exists and is a directory. [`ImageView::build`] keeps it for any input; this checks it.
    pub fn check(&self) -> Result<(), String> {
        let is_dir = |p: &[u8]| self.nodes.get(p).is_some_and(|n| n.is_dir(&self.layers));
        if !is_dir(b"") {
            return Err("the root is missing or not a directory".into());
        }
        for path in self.nodes.keys() {
            if let Some(p) = parent(path) {
                if !is_dir(p) {
                    return Err(format!(
                        "{}: parent missing or not a directory",
                        show_path(path)
                    ));
                }
            }
        }
        Ok(())
    }

    /// After a whiteout or opaque directory removed lower layers' entries under `dir`, this
    /// layer's own entries there stay; their directories must then exist again (the merged tree
    /// never has an entry without a parent).
    fn reparent_under(
        layers: &[Arc<LayerIndex>],
        nodes: &mut BTreeMap<Vec<u8>, Node>,
        dir: &[u8],
        layer: u32,
    ) {
        for key in keys_under(nodes, dir) {
            let orphan = parent(&key).is_some_and(|p| !nodes.contains_key(p));
            if orphan && nodes.contains_key(&key) {
                Self::imply_parents(layers, nodes, &key, layer, false);
            }
        }
    }

    /// Makes every ancestor of `path` (and `path` itself if `include_self`) a directory: missing
    /// ones are implied; a non-directory in the way (a malformed image) is replaced. The walk
    /// up stops at the first directory: the ancestors of a directory are directories (the
    /// tree's invariant, which also holds for the ancestors of the orphans
    /// [`ImageView::reparent_under`] visits: it goes parents first).
    fn imply_parents(
        layers: &[Arc<LayerIndex>],
        nodes: &mut BTreeMap<Vec<u8>, Node>,
        path: &[u8],
        layer: u32,
        include_self: bool,
    ) {
        let mut todo = Vec::new();
        let mut p = if include_self {
            Some(path)
        } else {
            parent(path)
        };
        while let Some(dir) = p {
            let state = nodes.get(dir).map(|n| n.is_dir(layers));
            if state == Some(true) {
                break;
            }
            todo.push((dir, state));
            p = parent(dir);
        }
        for (dir, state) in todo.into_iter().rev() {
            if state == Some(false) {
                remove_under(nodes, dir, |_| false);
            }
            nodes.insert(
                dir.to_vec(),
                Node {
                    layer,
                    entry: IMPLIED,
                    data: None,
                },
            );
        }
    }

    fn resolve_link(
        layers: &[Arc<LayerIndex>],
        nodes: &BTreeMap<Vec<u8>, Node>,
        target: &[u8],
        path: &[u8],
    ) -> Result<(u32, u32), IndexError> {
        let err = |reason| IndexError::BadHardlink {
            path: show_path(path),
            target: show_path(target),
            reason,
        };
        let n = nodes.get(target).ok_or(err("does not exist"))?;
        if let Some(d) = n.data {
            return Ok(d);
        }
        if n.entry == IMPLIED {
            return Err(err("is not a regular file"));
        }
        match layers[n.layer as usize].entries[n.entry as usize].kind {
            EntryKind::File { .. } => Ok((n.layer, n.entry)),
            _ => Err(err("is not a regular file")),
        }
    }

    /// The node and its entry (`None` for implied directories) at `path` (normalised).
    pub fn get(&self, path: &[u8]) -> Option<(Node, Option<&Entry>)> {
        let n = *self.nodes.get(path)?;
        Some((n, self.entry(n.layer, n.entry)))
    }

    pub fn entry(&self, layer: u32, entry: u32) -> Option<&Entry> {
        if entry == IMPLIED {
            return None;
        }
        self.layers.get(layer as usize)?.entries.get(entry as usize)
    }

    /// For a regular file or hard link: (layer, offset, size) of its bytes.
    pub fn file_data(&self, node: &Node) -> Option<(u32, u64, u64)> {
        let (l, e) = node.data.unwrap_or((node.layer, node.entry));
        match self.entry(l, e)?.kind {
            EntryKind::File { offset, size } => Some((l, offset, size)),
            _ => None,
        }
    }

    /// Number of regular files (hard links included) in the merged tree.
    pub fn file_count(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| self.file_data(n).is_some())
            .count()
    }
}
