//! File-system helpers shared by the commands that write model, run and export directories.

use std::io::{Error, ErrorKind};
use std::path::Path;

/// Tokenizer files a model directory may carry, copied verbatim between directories.
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

fn ctx(e: Error, what: impl std::fmt::Display) -> Error {
    Error::new(e.kind(), format!("{what}: {e}"))
}

/// Writes a directory under a temporary name and renames it into place, so that a kill or a failed
/// `fill` leaves either the old directory or the new one, never half of one (a failed `fill`'s
/// temporary directory is removed).
pub fn write_dir_atomic<E: From<Error>>(dir: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("{}: directory without a name", dir.display())))?
        .to_string_lossy()
        .to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| ctx(e, format!("creating {}", parent.display())))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| ctx(e, format!("creating {}", tmp.display())))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| ctx(e, format!("moving aside {}", dir.display())))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| ctx(e, format!("renaming into {}", dir.display())))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to).map_err(|e| ctx(e, format!("creating {}", to.display())))?;
    for e in std::fs::read_dir(from).map_err(|e| ctx(e, format!("reading {}", from.display())))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .map_err(|err| ctx(err, format!("copying {}", e.path().display())))?;
        }
    }
    Ok(())
}

/// Copies the tokenizer files (and the `qformer/` folder) of a model directory; returns whether any
/// LLM tokenizer file was there.
pub fn copy_tokenizers(from: &Path, to: &Path) -> std::io::Result<bool> {
    let mut any = false;
    for f in TOKENIZER_FILES {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f))
                .map_err(|e| ctx(e, format!("copying {f} from {}", from.display())))?;
            any = true;
        }
    }
    if from.join("qformer").is_dir() {
        copy_tree(&from.join("qformer"), &to.join("qformer"))?;
    }
    Ok(any)
}
