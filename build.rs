//! Embeds the web client: every file under `web/` becomes an entry of a static table
//! (path, bytes, content hash) that `src/web.rs` serves, so the binary carries the
//! whole client and `cargo build` stays the whole build. Cargo reruns this when
//! anything under `web/` changes.

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let web = root.join("web");
    println!("cargo:rerun-if-changed=web");
    let mut found = Vec::new();
    files(&web, &mut found);
    let mut table = String::from("/// Every file under `web/`: (path, body, ETag).\n");
    table.push_str("pub static ASSETS: &[(&str, &[u8], &str)] = &[\n");
    for path in found {
        let Ok(rel) = path.strip_prefix(&web) else {
            continue;
        };
        let rel = rel.to_string_lossy().replace('\\', "/");
        let body = std::fs::read(&path).unwrap_or_default();
        // DefaultHasher::new() has fixed keys: the same bytes give the same tag.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        body.hash(&mut h);
        let _ = writeln!(
            table,
            "    ({rel:?}, include_bytes!({:?}), \"\\\"{:016x}\\\"\"),",
            path.display().to_string(),
            h.finish()
        );
    }
    table.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("web_assets.rs");
    if let Err(e) = std::fs::write(&out, table) {
        panic!("writing {}: {e}", out.display());
    }
}
