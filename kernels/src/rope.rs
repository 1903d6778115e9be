//! Rotary position embedding applied in place to `[tokens, heads, head_dim]`
//! rows, each token at its own position (a flattened batch has many sequences).

/// `cos`/`sin` tables, `[positions, head_dim / 2]`.
pub struct RopeTables {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTables {
    /// Tables for the given inverse frequencies (one per rotated pair), with
    /// cos and sin multiplied by `factor` (YaRN's attention factor; 1
    /// otherwise).
    pub fn from_frequencies(freqs: &[f32], factor: f32, positions: usize) -> Self {
        let half = freqs.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &freq in freqs {
                let angle = p as f32 * freq;
                cos.push(angle.cos() * factor);
                sin.push(angle.sin() * factor);
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates every head of token `t` by the angle of `positions[t]`. With
    /// `interleaved`, pairs are `(x[2i], x[2i+1])` (GGUF llama); otherwise
    /// `(x[i], x[i + d/2])` (Hugging Face layout).
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[u32], interleaved: bool) {
        let (half, d) = (self.half, self.half * 2);
        assert_eq!(x.len(), positions.len() * heads * d, "rope input");
        for (token, &p) in x.chunks_exact_mut(heads * d).zip(positions) {
            let cos = &self.cos[p as usize * half..][..half];
            let sin = &self.sin[p as usize * half..][..half];
            for head in token.chunks_exact_mut(d) {
                for i in 0..half {
                    let (a, b) = if interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let (x1, x2) = (head[a], head[b]);
                    head[a] = x1 * cos[i] - x2 * sin[i];
                    head[b] = x1 * sin[i] + x2 * cos[i];
                }
            }
        }
    }
}
