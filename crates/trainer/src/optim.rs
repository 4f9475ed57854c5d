//! AdamW (torch's update rule, decoupled weight decay), the cosine schedule with linear warm-up,
//! and global-norm gradient clipping. The optimizer state is plain named tensors so that a
//! checkpoint can hold it and a resumed run continues bit for bit.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};

/// A trainable variable with the learning rate of its group.
pub struct Group {
    pub name: &'static str,
    pub lr: f64,
    pub vars: Vec<(String, Var)>,
}

/// torch.optim.AdamW.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Number of updates done.
    pub t: usize,
    state: HashMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(weight_decay: f64) -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, t: 0, state: HashMap::new() }
    }

    /// One update; `lr_mult` scales every group's base learning rate (the schedule).
    pub fn step(&mut self, groups: &[Group], grads: &HashMap<String, Tensor>, lr_mult: f64) -> candle_core::Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for g in groups {
            let lr = g.lr * lr_mult;
            for (key, var) in &g.vars {
                let Some(grad) = grads.get(key) else { continue };
                let grad = grad.to_dtype(DType::F32)?;
                let (m, v) = match self.state.remove(key) {
                    Some(s) => s,
                    None => (grad.zeros_like()?, grad.zeros_like()?),
                };
                let m = ((m * self.beta1)? + (&grad * (1.0 - self.beta1))?)?;
                let v = ((v * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
                let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
                let mut p = var.as_tensor().detach();
                if self.weight_decay != 0.0 {
                    p = (p * (1.0 - lr * self.weight_decay))?;
                }
                let p = (p - ((&m / denom)? * (lr / bc1))?)?;
                var.set(&p)?;
                self.state.insert(key.clone(), (m, v));
            }
        }
        Ok(())
    }

    /// Writes `m.{key}`, `v.{key}` and the step count.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (k, (m, v)) in &self.state {
            t.insert(format!("m.{k}"), m.clone());
            t.insert(format!("v.{k}"), v.clone());
        }
        t.insert("t".into(), Tensor::new(&[self.t as i64], &Device::Cpu)?);
        candle_core::safetensors::save(&t, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Restores what [`AdamW::save`] wrote.
    pub fn load(&mut self, path: &Path, device: &Device) -> anyhow::Result<()> {
        let t = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading optimizer state {}", path.display()))?;
        self.t = t.get("t").context("optimizer state lacks its step count")?.to_vec1::<i64>()?[0] as usize;
        for (k, m) in &t {
            if let Some(key) = k.strip_prefix("m.") {
                let v = t.get(&format!("v.{key}")).with_context(|| format!("optimizer state lacks v.{key}"))?;
                self.state.insert(key.to_string(), (m.clone(), v.clone()));
            }
        }
        Ok(())
    }
}

/// HF's `get_cosine_schedule_with_warmup` multiplier at `step` (0-based) of `total`.
pub fn cosine_with_warmup(step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> candle_core::Result<f64> {
    // Summed in key order: a HashMap's order changes from process to process, and so would the
    // last bits of the norm, the clipped gradients and every loss after them.
    let mut keys: Vec<&String> = grads.keys().collect();
    keys.sort();
    let mut sq = 0f64;
    for k in keys {
        sq += grads[k].to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One AdamW step against torch: p=[1,-2], g=[0.5,0.1], lr=0.1, wd=0.01 →
    /// `torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)` gives [0.8990, -2.0980].
    #[test]
    fn adamw_step_matches_torch() {
        let var = Var::new(&[1f32, -2.0], &Device::Cpu).unwrap();
        let groups = [Group { name: "all", lr: 0.1, vars: vec![("p".into(), var.clone())] }];
        let grads: HashMap<String, Tensor> =
            [("p".to_string(), Tensor::new(&[0.5f32, 0.1], &Device::Cpu).unwrap())].into();
        let mut opt = AdamW::new(0.01);
        opt.step(&groups, &grads, 1.0).unwrap();
        let p = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((p[0] - 0.8990).abs() < 1e-4 && (p[1] + 2.0980).abs() < 1e-4, "{p:?}");
    }

    #[test]
    fn schedule_and_clip() {
        assert!((cosine_with_warmup(0, 100, 10) - 0.1).abs() < 1e-12);
        assert!((cosine_with_warmup(10, 100, 10) - 1.0).abs() < 1e-12);
        assert!(cosine_with_warmup(99, 100, 10) < 0.01);
        let mut g: HashMap<String, Tensor> =
            [("a".to_string(), Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap())].into();
        let n = clip_global_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let v = g["a"].to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
    }
}
