//! Picks the next token from one row of logits: penalties, temperature, top-k,
//! top-p and min-p, with a per-request seeded generator, and reports logprobs.
use super::guided::apply_mask;
use kernels::sampling::{argmax, log_softmax, softmax_in_place, top_k_indices};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use toktrie::SimpleVob;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// 1 means none; applied to tokens of the prompt and the output.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    /// Alternatives to report per token; `None` reports no logprobs at all.
    pub logprobs: Option<usize>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`:
    /// ±100 bans or forces a token); ids beyond the vocabulary are skipped.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

/// A chosen token with its log-probability under the model and the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Self { params, rng }
    }

    /// Samples from `logits` (modified in place). `banned` tokens (EOS before
    /// `min_tokens`) can never be picked, nor can any token outside
    /// `allowed` (a structured output's grammar). Logprobs are the model's,
    /// before any of these.
    ///
    /// A `draft` (speculative decoding's proposal, from a proposer certain
    /// of its token) is judged first: under greedy it is accepted when it is
    /// the argmax; otherwise with probability p(draft) under the final
    /// distribution (every parameter applied), and when refused the token is
    /// drawn from p with the draft removed. So each token has exactly
    /// probability p, as without a proposal (Leviathan et al.'s rule with q
    /// a point mass).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        output: &[u32],
        banned: &[u32],
        allowed: Option<&SimpleVob>,
        draft: Option<u32>,
    ) -> Sampled {
        let p = &self.params;
        let report = p.logprobs.map(|_| log_softmax(logits));
        if let Some(mask) = allowed {
            apply_mask(logits, mask);
        }
        apply_penalties(logits, prompt, output, p);
        for &(t, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        for &b in banned {
            if let Some(l) = logits.get_mut(b as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let token = if p.temperature <= 0.0 {
            argmax(logits)
        } else {
            logits.iter_mut().for_each(|l| *l /= p.temperature);
            mask_top_k(logits, p.top_k);
            let mut probs = logits.to_vec();
            softmax_in_place(&mut probs);
            mask_top_p(&mut probs, p.top_p);
            mask_min_p(&mut probs, p.min_p);
            match draft.map(|d| d as usize).filter(|&d| d < probs.len()) {
                Some(d) if self.rng.gen::<f32>() < probs[d] => d,
                Some(d) => {
                    probs[d] = 0.0;
                    renormalize(&mut probs);
                    draw(&probs, self.rng.gen::<f32>())
                }
                None => draw(&probs, self.rng.gen::<f32>()),
            }
        };
        match (report, p.logprobs) {
            (Some(lp), Some(n)) => Sampled {
                token: token as u32,
                logprob: lp[token],
                top: top_k_indices(&lp, n)
                    .into_iter()
                    .map(|i| (i as u32, lp[i]))
                    .collect(),
            },
            _ => Sampled {
                token: token as u32,
                logprob: f32::NAN,
                top: Vec::new(),
            },
        }
    }
}

/// OpenAI's frequency/presence penalties over the output, and the
/// multiplicative repetition penalty over prompt and output.
pub fn apply_penalties(logits: &mut [f32], prompt: &[u32], output: &[u32], p: &SamplingParams) {
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
    }
    if p.repetition_penalty != 1.0 {
        let mut seen = std::collections::HashSet::new();
        for &t in prompt.iter().chain(output) {
            if seen.insert(t) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
    }
}

/// Keeps the `k` largest logits (0 keeps all).
pub fn mask_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let keep = top_k_indices(logits, k);
    let threshold = logits[*keep.last().expect("k > 0")];
    let mut kept = 0;
    for l in logits.iter_mut() {
        if *l < threshold || (*l == threshold && kept >= k) {
            *l = f32::NEG_INFINITY;
        } else {
            kept += 1;
        }
    }
}

/// Keeps the smallest set of most likely tokens whose mass reaches `top_p`, renormalized.
pub fn mask_top_p(probs: &mut [f32], top_p: f32) {
    if top_p >= 1.0 {
        return;
    }
    let mut idx: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut mass = 0.0;
    let mut cut = idx.len();
    for (n, &i) in idx.iter().enumerate() {
        mass += probs[i];
        if mass >= top_p {
            cut = n + 1;
            break;
        }
    }
    for &i in &idx[cut..] {
        probs[i] = 0.0;
    }
    renormalize(probs);
}

/// Drops tokens less likely than `min_p` times the most likely one, renormalized.
pub fn mask_min_p(probs: &mut [f32], min_p: f32) {
    if min_p <= 0.0 {
        return;
    }
    let floor = min_p * probs.iter().copied().fold(0.0, f32::max);
    probs
        .iter_mut()
        .filter(|p| **p < floor)
        .for_each(|p| *p = 0.0);
    renormalize(probs);
}

fn renormalize(probs: &mut [f32]) {
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
}

/// Inverse-CDF draw with `u` in [0, 1).
fn draw(probs: &[f32], u: f32) -> usize {
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p;
            last = i;
            if u < acc {
                return i;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probs(logits: &[f32]) -> Vec<f32> {
        let mut p = logits.to_vec();
        softmax_in_place(&mut p);
        p
    }

    /// A grammar's mask leaves only its tokens to sample, greedy or not,
    /// while the logprobs reported stay the model's own.
    #[test]
    fn a_mask_keeps_sampling_inside_it() {
        let logits = vec![5.0, 1.0, 0.5, 2.0, 4.0];
        let mask = SimpleVob::from_slice(&[false, true, false, true, false]);
        let mut greedy = Sampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(1),
            ..SamplingParams::default()
        });
        let s = greedy.sample(&mut logits.clone(), &[], &[], &[], Some(&mask), None);
        assert_eq!(s.token, 3);
        let model = log_softmax(&logits);
        assert_eq!((s.logprob, s.top.clone()), (model[3], vec![(0, model[0])]));
        let mut hot = Sampler::new(SamplingParams {
            temperature: 2.0,
            seed: Some(1),
            ..SamplingParams::default()
        });
        let picks: Vec<u32> = (0..200)
            .map(|_| {
                hot.sample(&mut logits.clone(), &[], &[], &[], Some(&mask), None)
                    .token
            })
            .collect();
        assert!(picks.iter().all(|t| *t == 1 || *t == 3));
        assert!(picks.contains(&1) && picks.contains(&3));
    }

    #[test]
    fn logit_bias_forces_and_bans_before_sampling() {
        let logits = vec![3.0, 1.0, 0.5, 2.0];
        let pick = |bias: Vec<(u32, f32)>, temperature: f32| {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                seed: Some(7),
                logit_bias: bias,
                ..SamplingParams::default()
            });
            s.sample(&mut logits.clone(), &[], &[], &[], None, None)
                .token
        };
        assert_eq!(pick(vec![], 0.0), 0);
        // +100 forces token 2, greedy or sampled; −100 bans the argmax.
        assert_eq!(pick(vec![(2, 100.0)], 0.0), 2);
        assert!((0..20).all(|_| pick(vec![(2, 100.0)], 1.0) == 2));
        assert_eq!(pick(vec![(0, -100.0)], 0.0), 3);
        // An id beyond the vocabulary changes nothing.
        assert_eq!(pick(vec![(99, 100.0)], 0.0), 0);
    }

    #[test]
    fn top_k_keeps_k() {
        let mut l = vec![1.0, 5.0, 3.0, 4.0, 2.0];
        mask_top_k(&mut l, 2);
        assert_eq!(l.iter().filter(|x| x.is_finite()).count(), 2);
        assert!(l[1].is_finite() && l[3].is_finite());
    }

    #[test]
    fn top_p_keeps_smallest_covering_set() {
        let mut p = vec![0.5, 0.3, 0.15, 0.05];
        mask_top_p(&mut p, 0.8);
        assert_eq!(p[2], 0.0);
        assert_eq!(p[3], 0.0);
        assert!((p[0] - 0.625).abs() < 1e-6);
    }

    #[test]
    fn min_p_drops_unlikely() {
        let mut p = vec![0.6, 0.3, 0.05, 0.05];
        mask_min_p(&mut p, 0.2);
        assert_eq!(p[2], 0.0);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn penalties_follow_openai_and_hf() {
        let p = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 1.0,
            ..Default::default()
        };
        let mut l = vec![2.0, 2.0, 2.0];
        apply_penalties(&mut l, &[], &[0, 0, 1], &p);
        assert_eq!(l, vec![2.0 - 1.0 - 1.0, 2.0 - 0.5 - 1.0, 2.0]);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut l = vec![4.0, -4.0, 4.0];
        apply_penalties(&mut l, &[0], &[1, 1], &p);
        assert_eq!(l, vec![2.0, -8.0, 4.0]);
    }

    #[test]
    fn same_seed_same_tokens_and_greedy_is_argmax() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                temperature: 1.5,
                ..Default::default()
            });
            (0..32)
                .map(|_| {
                    s.sample(&mut logits.clone(), &[], &[], &[], None, None)
                        .token
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut g = Sampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(2),
            ..Default::default()
        });
        let s = g.sample(&mut logits.clone(), &[], &[], &[], None, None);
        assert_eq!(s.token as usize, argmax(&logits));
        assert_eq!(s.top.len(), 2);
        assert_eq!(s.top[0].0, s.token);
        assert!((s.logprob - probs(&logits)[s.token as usize].ln()).abs() < 1e-5);
    }

    #[test]
    fn banned_tokens_are_never_drawn() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(
            s.sample(&mut [0.0, 9.0, 1.0], &[], &[], &[1], None, None)
                .token,
            2
        );
    }

    #[test]
    fn sampling_respects_top_k_support() {
        let logits = vec![0.0, 1.0, 2.0, 3.0, 4.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..200 {
            let t = s
                .sample(&mut logits.clone(), &[], &[], &[], None, None)
                .token;
            assert!(t == 3 || t == 4, "{t}");
        }
    }

    /// The distribution sampling should follow, computed independently in
    /// f64: softmax(logits / T) over the top k, then the smallest head of it
    /// whose mass reaches top_p, then min_p; renormalized after each cut.
    fn expected(logits: &[f32], t: f64, top_k: usize, top_p: f64, min_p: f64) -> Vec<f64> {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let keep_k = if top_k == 0 { logits.len() } else { top_k };
        let mut p = vec![0f64; logits.len()];
        let max = logits[order[0]] as f64;
        for &i in &order[..keep_k] {
            p[i] = ((logits[i] as f64 - max) / t).exp();
        }
        let normalize = |p: &mut Vec<f64>| {
            let z: f64 = p.iter().sum();
            p.iter_mut().for_each(|v| *v /= z);
        };
        normalize(&mut p);
        let mut mass = 0.0;
        let mut cut = false;
        for &i in &order {
            if cut {
                p[i] = 0.0;
            }
            mass += p[i];
            cut |= mass >= top_p;
        }
        normalize(&mut p);
        let top = p.iter().cloned().fold(0.0, f64::max);
        p.iter_mut()
            .filter(|v| **v < min_p * top)
            .for_each(|v| *v = 0.0);
        normalize(&mut p);
        p
    }

    /// Pearson's χ² of `counts` against `want` over the tokens `want` allows;
    /// a draw of a token it forbids fails at once.
    fn chi_square(counts: &[u64], want: &[f64], n: u64) -> (f64, usize) {
        let mut stat = 0.0;
        let mut cells = 0;
        for (c, w) in counts.iter().zip(want) {
            if *w == 0.0 {
                assert_eq!(*c, 0, "a token outside the allowed set was drawn");
                continue;
            }
            let e = w * n as f64;
            stat += (*c as f64 - e).powi(2) / e;
            cells += 1;
        }
        (stat, cells - 1)
    }

    /// The χ² value a correct sampler exceeds with probability 0.001, by
    /// degrees of freedom (1 to 9).
    const CHI2_999: [f64; 9] = [
        10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88,
    ];

    /// Counts of 40,000 draws (each judging `draft` when there is one) fit
    /// the renormalized softmax: χ² below its 0.1% critical value. Returns
    /// the χ² counts of a sampler that always takes the draft would score.
    fn fits_softmax((t, top_k, top_p, min_p): (f64, usize, f64, f64), draft: Option<u32>) -> f64 {
        let logits = [2.0f32, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0, 0.9, 1.1];
        let n = 40_000u64;
        let mut sampler = Sampler::new(SamplingParams {
            temperature: t as f32,
            top_k,
            top_p: top_p as f32,
            min_p: min_p as f32,
            seed: Some(1234),
            ..Default::default()
        });
        let mut counts = vec![0u64; logits.len()];
        for _ in 0..n {
            let picked = sampler.sample(&mut logits.clone(), &[], &[], &[], None, draft);
            counts[picked.token as usize] += 1;
        }
        let want = expected(&logits, t, top_k, top_p, min_p);
        let (stat, df) = chi_square(&counts, &want, n);
        assert!(
            stat < CHI2_999[df - 1],
            "T={t} top_k={top_k} top_p={top_p} min_p={min_p} draft {draft:?}: χ² = {stat:.1} \
             with {df} d.f.; counts {counts:?}, expected {want:?}"
        );
        let mut always = vec![0u64; logits.len()];
        always[draft.unwrap_or(0) as usize] = n;
        chi_square(&always, &want, n).0 / CHI2_999[df - 1]
    }

    #[test]
    fn sampling_follows_the_renormalized_softmax() {
        for params in [
            (1.0, 0, 1.0, 0.0),
            (0.7, 0, 1.0, 0.0),
            (1.3, 5, 1.0, 0.0),
            (1.0, 0, 0.8, 0.0),
            (0.8, 6, 0.9, 0.0),
            (1.0, 0, 1.0, 0.2),
        ] {
            fits_softmax(params, None);
        }
    }

    /// Judging a proposed token keeps every token's probability under
    /// temperature, top-k, top-p and min-p; accepting every proposal would
    /// miss the distribution by far; greedy gives the argmax whatever is
    /// proposed.
    #[test]
    fn judging_a_proposal_keeps_the_distribution() {
        for (params, draft) in [
            ((1.0, 0, 1.0, 0.0), 0),
            ((1.0, 0, 1.0, 0.0), 6),
            ((0.8, 6, 0.9, 0.0), 2),
            ((1.0, 0, 1.0, 0.2), 9),
        ] {
            assert!(fits_softmax(params, Some(draft)) > 10.0);
        }
        let logits = [0.5f32, 2.0, 1.0];
        let mut greedy = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        });
        for draft in [Some(1), Some(2), None] {
            let picked = greedy.sample(&mut logits.to_vec(), &[], &[], &[], None, draft);
            assert_eq!(picked.token, 1);
        }
    }
}
