//! IQA label files: a CSV whose header names an image column and a mean-opinion-score column (other
//! columns ignored), optionally a `split` column. One reader for `qadapt-train eval --labels` and
//! `qadapt-run eval --iqa`, so both score the same rows of the same file.

use std::path::Path;

use serde::Serialize;

use crate::{Error, Result};

/// Header names accepted for the image column (case-insensitive), as the public IQA sets spell it.
pub const IMAGE_COLUMNS: [&str; 4] = ["image", "image_name", "img_path", "filename"];
/// Header names accepted for the score column.
pub const MOS_COLUMNS: [&str; 3] = ["mos", "score", "dmos"];

/// One IQA label: an image and its mean opinion score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Label {
    /// Image path relative to the images directory.
    pub image: String,
    /// Mean opinion score.
    pub mos: f64,
}

/// Reads the labels of `path`; with `split`, only the rows whose `split` column equals it (an error
/// if the file has no such column). Quoted fields (commas in file names) are read as CSV quotes them.
pub fn read_labels(path: &Path, split: Option<&str>) -> Result<Vec<Label>> {
    let bad = |msg: String| Error::Labels { path: path.to_path_buf(), msg };
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .from_path(path)
        .map_err(|e| bad(e.to_string()))?;
    let header: Vec<String> = r.headers().map_err(|e| bad(e.to_string()))?.iter().map(str::to_lowercase).collect();
    let col = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
    let ic = col(&IMAGE_COLUMNS)
        .ok_or_else(|| bad(format!("no image column in the header (one of {})", IMAGE_COLUMNS.join(", "))))?;
    let mc = col(&MOS_COLUMNS)
        .ok_or_else(|| bad(format!("no mos column in the header (one of {})", MOS_COLUMNS.join(", "))))?;
    let sc = match (split, col(&["split"])) {
        (Some(_), None) => return Err(bad("a split was asked for but the file has no split column".into())),
        (_, c) => c,
    };
    let mut out = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| bad(e.to_string()))?;
        let line = rec.position().map_or(0, |p| p.line());
        if rec.iter().all(str::is_empty) {
            continue;
        }
        let get = |c: usize| rec.get(c).ok_or_else(|| bad(format!("line {line}: too few columns")));
        if let (Some(want), Some(c)) = (split, sc) {
            if get(c)? != want {
                continue;
            }
        }
        let raw = get(mc)?;
        let mos: f64 = raw
            .parse()
            .ok()
            .filter(|m: &f64| m.is_finite())
            .ok_or_else(|| bad(format!("line {line}: bad mos {raw:?}")))?;
        let image = get(ic)?;
        if image.is_empty() {
            return Err(bad(format!("line {line}: empty image name")));
        }
        out.push(Label { image: image.to_string(), mos });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, split: Option<&str>) -> Result<Vec<Label>> {
        let dir = tempfile_dir();
        let p = dir.join("labels.csv");
        std::fs::write(&p, text).expect("write");
        let r = read_labels(&p, split);
        std::fs::remove_dir_all(&dir).ok();
        r
    }

    fn tempfile_dir() -> std::path::PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "qadapt-labels-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn l(image: &str, mos: f64) -> Label {
        Label { image: image.into(), mos }
    }

    #[test]
    fn columns_by_header_name_and_split_filter() {
        let text = "split,MOS,strength,Image\ntest,3.5,1,a.png\ntrain,1.0,2,b.png\n\ntest, 2 ,0,\"c, d.png\"\n";
        assert_eq!(read(text, None).expect("all"), vec![l("a.png", 3.5), l("b.png", 1.0), l("c, d.png", 2.0)]);
        assert_eq!(read(text, Some("test")).expect("test"), vec![l("a.png", 3.5), l("c, d.png", 2.0)]);
        assert_eq!(read(text, Some("val")).expect("none"), vec![]);
    }

    #[test]
    fn bad_files_name_the_fault() {
        let msg = |text: &str, split: Option<&str>| read(text, split).expect_err(text).to_string();
        assert!(msg("file,quality\na.png,3\n", None).contains("no image column"));
        assert!(msg("image,quality\na.png,3\n", None).contains("no mos column"));
        assert!(msg("image,mos\na.png,3\n", Some("test")).contains("no split column"));
        assert!(msg("image,mos\na.png,high\n", None).contains("line 2: bad mos \"high\""));
        assert!(msg("image,mos\na.png,NaN\n", None).contains("bad mos"));
        assert!(msg("image,mos,split\nb.png,1,train\na.png\n", None).contains("line 3: too few columns"));
        assert!(msg("image,mos\n,3\n", None).contains("empty image name"));
        assert!(msg("", None).contains("no image column"));
        assert!(read_labels(Path::new("/nonexistent/labels.csv"), None)
            .expect_err("missing")
            .to_string()
            .contains("/nonexistent/labels.csv"));
    }
}
