//! Weights loaded when they are written, one tensor at a time.
//!
//! The model is traced over [`Deferred`]: every parameter it asks for is checked against the
//! checkpoint's shape and handed out as a placeholder (a zero broadcast from a scalar: no memory).
//! The graph records which weight each initializer is ([`Weight`]); the writer loads it from the real
//! source — merging adapters, packing q/k/v — encodes it and drops it before the next. So an export
//! holds one weight at a time instead of the model, and a quantized export of a 3B model needs less
//! memory than its output.

use candle_core::{DType, Device, Tensor};
use models::loader::WeightSource;
use models::ops::Param;
use models::{Error, Result};

/// A source of placeholders over `src`: shapes and keys are checked now, data is read by
/// [`Weight::load`].
pub struct Deferred<'a> {
    src: &'a dyn WeightSource,
    dtype: DType,
}

impl<'a> Deferred<'a> {
    /// Placeholders of `dtype` (the model's compute type) for the weights of `src`.
    pub fn new(src: &'a dyn WeightSource, dtype: DType) -> Self {
        Self { src, dtype }
    }
}

impl WeightSource for Deferred<'_> {
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.src.shape(key)
    }

    fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        match self.src.shape(key) {
            None => return Err(Error::MissingKey { key: key.to_string() }),
            Some(found) if found != expected => {
                return Err(Error::ShapeMismatch { key: key.to_string(), expected: expected.to_vec(), found })
            }
            Some(_) => {}
        }
        // A one-element weight cannot be told from its placeholder, and costs nothing: load it.
        if expected.iter().product::<usize>() <= 1 {
            return self.src.get(key, expected);
        }
        Ok(Tensor::zeros((), self.dtype, &Device::Cpu)?.broadcast_as(expected)?)
    }
}

/// The source of a graph built from weights already in memory: it has nothing to load.
pub struct InMemory;

impl WeightSource for InMemory {
    fn shape(&self, _: &str) -> Option<Vec<usize>> {
        None
    }
    fn get(&self, key: &str, _: &[usize]) -> Result<Tensor> {
        Err(Error::MissingKey { key: key.to_string() })
    }
}

/// Whether `t` is a [`Deferred`] placeholder rather than data.
pub fn is_placeholder(t: &Tensor) -> bool {
    t.elem_count() > 1 && t.stride().iter().all(|&s| s == 0)
}

/// One block of a [`Weight::Packed`].
#[derive(Debug, Clone)]
pub enum Part {
    Param(Param),
    /// An absent bias: `rows` zeros.
    Zeros {
        rows: usize,
        dtype: DType,
    },
}

/// What an initializer holds, as the writer will load it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A model parameter (data, or a placeholder read from the source by key).
    Param(Param),
    /// Parts (q, k, v weights or biases [H·hd, …]) stacked along rows, each head's rows zero-padded
    /// from `hd` to `dp` (the `--fused` decoder's packed projection).
    Packed { key: String, parts: Vec<Part>, heads: usize, hd: usize, dp: usize },
}

impl Weight {
    /// The initializer's base name.
    pub fn key(&self) -> &str {
        match self {
            Weight::Param(p) => &p.key,
            Weight::Packed { key, .. } => key,
        }
    }

    /// Dims of the loaded tensor, known without loading it.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Param(p) => p.dims().to_vec(),
            Weight::Packed { parts, heads, dp, .. } => {
                let rest = parts
                    .iter()
                    .find_map(|p| match p {
                        Part::Param(p) => Some(p.dims()[1..].to_vec()),
                        Part::Zeros { .. } => None,
                    })
                    .unwrap_or_default();
                let mut dims = vec![parts.len() * heads * dp];
                dims.extend(rest);
                dims
            }
        }
    }

    /// The tensor, read from `src` where the model holds a placeholder.
    pub fn load(&self, src: &dyn WeightSource) -> Result<Tensor> {
        let param = |p: &Param| if is_placeholder(&p.t) { src.get(&p.key, p.dims()) } else { Ok(p.t.clone()) };
        match self {
            Weight::Param(p) => param(p),
            Weight::Packed { parts, heads, hd, dp, .. } => {
                let mut blocks = Vec::with_capacity(parts.len());
                for part in parts {
                    let t = match part {
                        Part::Param(p) => param(p)?,
                        Part::Zeros { rows, dtype } => Tensor::zeros(*rows, *dtype, &Device::Cpu)?,
                    };
                    blocks.push(pad_heads(&t, *heads, *hd, *dp)?);
                }
                Ok(Tensor::cat(&blocks, 0)?)
            }
        }
    }
}

/// `t` [H·hd, …] with each head's rows zero-padded to `dp`.
fn pad_heads(t: &Tensor, heads: usize, hd: usize, dp: usize) -> Result<Tensor> {
    if dp == hd {
        return Ok(t.clone());
    }
    let rest: Vec<usize> = t.dims()[1..].to_vec();
    let mut shape = vec![heads, hd];
    shape.extend(&rest);
    let x = t.reshape(shape.clone())?;
    shape[1] = dp - hd;
    let z = Tensor::zeros(shape.as_slice(), t.dtype(), t.device())?;
    let mut out = vec![heads * dp];
    out.extend(&rest);
    Ok(Tensor::cat(&[&x, &z], 1)?.reshape(out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A source holding tensors in memory.
    struct Mem(HashMap<String, Tensor>);
    impl WeightSource for Mem {
        fn shape(&self, key: &str) -> Option<Vec<usize>> {
            self.0.get(key).map(|t| t.dims().to_vec())
        }
        fn get(&self, key: &str, _: &[usize]) -> Result<Tensor> {
            self.0.get(key).cloned().ok_or(Error::MissingKey { key: key.into() })
        }
    }

    fn arange(n: usize, rows: usize) -> Tensor {
        Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap().reshape((rows, n / rows)).unwrap()
    }

    #[test]
    fn placeholders_are_checked_now_and_loaded_when_written() {
        let mem = Mem(HashMap::from([("w".to_string(), arange(6, 2)), ("s".to_string(), arange(1, 1))]));
        let d = Deferred::new(&mem, DType::F32);
        let w = d.get("w", &[2, 3]).unwrap();
        assert!(is_placeholder(&w));
        assert_eq!(w.dims(), &[2, 3]);
        // One element is loaded at once: its placeholder would look like data.
        assert!(!is_placeholder(&d.get("s", &[1, 1]).unwrap()));
        assert!(matches!(d.get("w", &[3, 2]), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(d.get("absent", &[2]), Err(Error::MissingKey { .. })));
        let loaded = Weight::Param(Param::new("w", w)).load(&mem).unwrap();
        assert_eq!(loaded.to_vec2::<f32>().unwrap(), vec![vec![0., 1., 2.], vec![3., 4., 5.]]);
    }

    #[test]
    fn packed_parts_are_stacked_with_padded_heads() {
        // Biases of two heads of 2 rows, padded to 3: q and k stored, v absent (zeros).
        let bias = || Tensor::arange(0f32, 4.0, &Device::Cpu).unwrap();
        let mem = Mem(HashMap::from([("q".to_string(), bias()), ("k".to_string(), bias())]));
        let d = Deferred::new(&mem, DType::F32);
        let q = Param::new("q", d.get("q", &[4]).unwrap());
        let k = Param::new("k", d.get("k", &[4]).unwrap());
        let parts = vec![Part::Param(q), Part::Param(k), Part::Zeros { rows: 4, dtype: DType::F32 }];
        let w = Weight::Packed { key: "qkv".into(), parts, heads: 2, hd: 2, dp: 3 };
        assert_eq!(w.dims(), vec![18]);
        let t = w.load(&mem).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let head = |a: f32, b: f32| [a, b, 0.0];
        let want: Vec<f32> =
            [head(0., 1.), head(2., 3.), head(0., 1.), head(2., 3.), head(0., 0.), head(0., 0.)].concat();
        assert_eq!(t, want);
    }
}
