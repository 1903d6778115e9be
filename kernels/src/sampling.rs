//! Numeric helpers for token sampling over one row of logits: stable softmax,
//! log-softmax, argmax and partial top-k selection.

/// Index of the largest value; the first one wins ties. Empty input gives 0.
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Natural-log softmax, computed with the max subtracted for stability.
pub fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = xs.iter().map(|&x| (x - max).exp()).sum();
    let log_z = max + sum.ln();
    xs.iter().map(|&x| x - log_z).collect()
}

/// Softmax in place; `-inf` entries become exactly 0.
pub fn softmax_in_place(xs: &mut [f32]) {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in xs.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in xs.iter_mut() {
        *x /= sum;
    }
}

/// Indices of the `k` largest values, largest first (ties by lower index).
pub fn top_k_indices(xs: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(xs.len());
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    let cmp = |a: &usize, b: &usize| xs[*b].total_cmp(&xs[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_sums_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, -1.0]);
        let total: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(argmax(&lp), 2);
    }

    #[test]
    fn top_k_is_sorted_and_stable() {
        let xs = [0.5, 3.0, 3.0, -2.0, 1.0];
        assert_eq!(top_k_indices(&xs, 3), vec![1, 2, 4]);
        assert_eq!(top_k_indices(&xs, 10).len(), 5);
        assert!(top_k_indices(&xs, 0).is_empty());
    }

    #[test]
    fn softmax_zeroes_masked_entries() {
        let mut xs = [0.0, f32::NEG_INFINITY, 0.0];
        softmax_in_place(&mut xs);
        assert_eq!(xs, [0.5, 0.0, 0.5]);
    }
}
