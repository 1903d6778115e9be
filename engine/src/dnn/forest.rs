//! Tree-ensemble evaluator shared by the XGBoost and LightGBM readers: flat
//! node arrays, each library's missing-value rule, rows spread over the cores.
use rayon::prelude::*;

/// How a split treats a missing (NaN) or zero feature, per LightGBM's
/// `decision_type`; XGBoost's rule is `Nan` (NaN takes the default branch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// NaN counts as 0.0 and is compared like any value.
    None,
    /// 0.0 (and NaN, read as 0.0) takes the default branch.
    Zero,
    /// NaN takes the default branch.
    Nan,
}

/// One node: a split (`feature`, go left when `value <= threshold`) or, when
/// `feature == LEAF`, a leaf whose value is `threshold`.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub threshold: f64,
    pub feature: u32,
    pub left: u32,
    pub right: u32,
    pub default_left: bool,
    pub missing: Missing,
}

pub const LEAF: u32 = u32::MAX;

impl Node {
    pub fn leaf(value: f64) -> Self {
        Self {
            threshold: value,
            feature: LEAF,
            left: 0,
            right: 0,
            default_left: false,
            missing: Missing::None,
        }
    }
}

/// What turns summed margins into predictions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    Identity,
    /// `1 / (1 + exp(-scale * x))`, per output.
    Sigmoid(f64),
    /// Softmax across the groups (classes) of a row.
    Softmax,
    Exp,
    /// 1.0 when the margin is positive, else 0.0 (XGBoost's `binary:hinge`).
    Step,
}

#[derive(Debug, Clone)]
pub struct Forest {
    /// Each tree's nodes; node 0 is the root.
    pub trees: Vec<Vec<Node>>,
    /// The output group (class) each tree adds to.
    pub tree_group: Vec<usize>,
    pub num_groups: usize,
    /// Starting margin per group.
    pub base_margin: Vec<f64>,
    pub num_features: usize,
    pub transform: Transform,
    /// Divide the sums by the trees per group (LightGBM random forests).
    pub average: bool,
}

const ZERO_THRESHOLD: f64 = 1e-35;

#[inline]
fn leaf_value(tree: &[Node], row: &[f32]) -> f64 {
    let mut i = 0usize;
    loop {
        let n = &tree[i];
        if n.feature == LEAF {
            return n.threshold;
        }
        let v = row[n.feature as usize] as f64;
        let left = match n.missing {
            Missing::Nan if v.is_nan() => n.default_left,
            Missing::Nan => v <= n.threshold,
            Missing::Zero | Missing::None => {
                let v = if v.is_nan() { 0.0 } else { v };
                if n.missing == Missing::Zero && v.abs() <= ZERO_THRESHOLD {
                    n.default_left
                } else {
                    v <= n.threshold
                }
            }
        };
        i = if left { n.left } else { n.right } as usize;
    }
}

/// Rows per task: small enough to spread a batch over the cores, large
/// enough that each tree's nodes stay in cache while a block walks it.
const BLOCK_ROWS: usize = 64;

impl Forest {
    /// Checks that every child index and feature lies inside the model.
    pub fn validate(&self) -> Result<(), String> {
        if self.tree_group.len() != self.trees.len() {
            return Err("tree_info does not list every tree".into());
        }
        for (t, nodes) in self.trees.iter().enumerate() {
            if nodes.is_empty() {
                return Err(format!("tree {t} has no nodes"));
            }
            if self.tree_group[t] >= self.num_groups {
                return Err(format!(
                    "tree {t} adds to group {} of {}",
                    self.tree_group[t], self.num_groups
                ));
            }
            for (i, n) in nodes.iter().enumerate() {
                if n.feature == LEAF {
                    continue;
                }
                if n.feature as usize >= self.num_features {
                    return Err(format!(
                        "tree {t} node {i} splits on feature {} of {}",
                        n.feature, self.num_features
                    ));
                }
                // Children come after their parent in both formats, so every walk ends.
                for c in [n.left, n.right] {
                    if c as usize <= i || c as usize >= nodes.len() {
                        return Err(format!(
                            "tree {t} node {i} has child {c} out of order or range"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Transformed predictions, `rows × num_groups`, for row-major features.
    pub fn predict(&self, features: &[f32], rows: usize) -> Vec<f64> {
        let nf = self.num_features;
        let ng = self.num_groups;
        let mut out = vec![0f64; rows * ng];
        let per_group = if self.average {
            (self.trees.len() / ng).max(1) as f64
        } else {
            1.0
        };
        let work = |(block, out): (usize, &mut [f64])| {
            let first = block * BLOCK_ROWS;
            let n = out.len() / ng;
            for (tree, &g) in self.trees.iter().zip(&self.tree_group) {
                for r in 0..n {
                    let row = &features[(first + r) * nf..(first + r + 1) * nf];
                    out[r * ng + g] += leaf_value(tree, row);
                }
            }
            for r in 0..n {
                let margins = &mut out[r * ng..(r + 1) * ng];
                for (m, b) in margins.iter_mut().zip(&self.base_margin) {
                    *m = *m / per_group + b;
                }
                self.apply_transform(margins);
            }
        };
        let chunks = out.par_chunks_mut(BLOCK_ROWS * ng).enumerate();
        if rows * self.trees.len() >= 4096 {
            chunks.for_each(work);
        } else {
            out.chunks_mut(BLOCK_ROWS * ng).enumerate().for_each(work);
        }
        out
    }

    fn apply_transform(&self, m: &mut [f64]) {
        match self.transform {
            Transform::Identity => {}
            Transform::Sigmoid(s) => m
                .iter_mut()
                .for_each(|x| *x = 1.0 / (1.0 + (-s * *x).exp())),
            Transform::Exp => m.iter_mut().for_each(|x| *x = x.exp()),
            Transform::Step => m
                .iter_mut()
                .for_each(|x| *x = if *x > 0.0 { 1.0 } else { 0.0 }),
            Transform::Softmax => {
                let max = m.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for x in m.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                m.iter_mut().for_each(|x| *x /= sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(feature: u32, threshold: f64, missing: Missing, default_left: bool) -> Node {
        Node {
            threshold,
            feature,
            left: 1,
            right: 2,
            default_left,
            missing,
        }
    }

    fn stump(node: Node) -> Forest {
        Forest {
            trees: vec![vec![node, Node::leaf(-1.0), Node::leaf(1.0)]],
            tree_group: vec![0],
            num_groups: 1,
            base_margin: vec![0.5],
            num_features: 1,
            transform: Transform::Identity,
            average: false,
        }
    }

    #[test]
    fn missing_value_rules() {
        let nan = stump(split(0, 2.0, Missing::Nan, false));
        assert_eq!(nan.predict(&[2.0, 2.5, f32::NAN], 3), vec![-0.5, 1.5, 1.5]);
        let zero = stump(split(0, -1.0, Missing::Zero, true));
        assert_eq!(
            zero.predict(&[0.0, f32::NAN, 3.0, -2.0], 4),
            vec![-0.5, -0.5, 1.5, -0.5]
        );
        let none = stump(split(0, 0.5, Missing::None, false));
        assert_eq!(none.predict(&[f32::NAN, 1.0], 2), vec![-0.5, 1.5]);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_blocks_agree_with_single_rows() {
        let mut f = stump(split(0, 0.0, Missing::Nan, true));
        f.trees.push(f.trees[0].clone());
        f.tree_group = vec![0, 1];
        f.num_groups = 2;
        f.base_margin = vec![0.0, 0.3];
        f.transform = Transform::Softmax;
        let xs: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) / 7.0).collect();
        let all = f.predict(&xs, xs.len());
        for (r, x) in xs.iter().enumerate() {
            let one = f.predict(&[*x], 1);
            assert_eq!(&all[r * 2..r * 2 + 2], one.as_slice());
            assert!((one[0] + one[1] - 1.0).abs() < 1e-12);
        }
        assert!(f.validate().is_ok());
        f.trees[0][0].feature = 3;
        assert!(f.validate().unwrap_err().contains("feature 3"));
    }
}
