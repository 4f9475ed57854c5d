//! File-system helpers shared by the commands that write model and run directories.

use std::path::Path;

use anyhow::Context;

/// Tokenizer files a model directory may carry, copied verbatim between directories.
pub const TOKENIZER_FILES: [&str; 6] = ["tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"];

/// Writes a directory under a temporary name and renames it into place, so that a kill leaves
/// either the old directory or the new one, never half of one.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let name = dir.file_name().context("directory without a name")?.to_string_lossy().to_string();
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    fill(&tmp)?;
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).with_context(|| format!("moving aside {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming into {}", dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Copies the tokenizer files (and the `qformer/` folder) of a model directory; returns whether any
/// LLM tokenizer file was there.
pub fn copy_tokenizers(from: &Path, to: &Path) -> anyhow::Result<bool> {
    let mut any = false;
    for f in TOKENIZER_FILES {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f)).with_context(|| format!("copying {f} from {}", from.display()))?;
            any = true;
        }
    }
    if from.join("qformer").is_dir() {
        copy_tree(&from.join("qformer"), &to.join("qformer"))?;
    }
    Ok(any)
}
