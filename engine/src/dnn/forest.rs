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

/// Which values a categorical split sends down the not-in-set branch before
/// looking at the set: each library's rule for negative categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negative {
    /// Any value below 0.0 (XGBoost: -0.5 is not category 0).
    BelowZero,
    /// Values that truncate below 0, i.e. at or below -1.0 (LightGBM casts
    /// to int first, so -0.5 is category 0).
    TruncatedBelowZero,
}

/// One node: a split (`feature`, go left when `value <= threshold`) or, when
/// `feature == LEAF`, a leaf whose value is `threshold`. A categorical split
/// (`categories` = an index into `Trees::category_sets`) goes left when the
/// value's category is in the set; NaN follows `default_left`.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub threshold: f64,
    pub feature: u32,
    pub left: u32,
    pub right: u32,
    pub default_left: bool,
    pub missing: Missing,
    pub categories: Option<(u32, Negative)>,
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
            categories: None,
        }
    }
}

/// A set of categories as a bitset (bit `c % 32` of word `c / 32`).
pub fn category_bitset(categories: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut words = Vec::new();
    for c in categories {
        let w = c as usize / 32;
        if words.len() <= w {
            words.resize(w + 1, 0);
        }
        words[w] |= 1 << (c % 32);
    }
    words
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

/// A tree ensemble as a reader parses it; `compile` checks it and builds
/// the `Forest` that predicts.
#[derive(Debug, Clone)]
pub struct Trees {
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
    /// The categorical splits' sets, as `category_bitset` makes them.
    pub category_sets: Vec<Vec<u32>>,
}

/// A checked ensemble, every tree's nodes in one array, 16 bytes each: an
/// f32 threshold (exact for f32 features, see `f32_floor`), the feature with
/// the split's flags in its top bits, and the children. A leaf points to
/// itself, so walking a tree for its depth always ends on a leaf: rows step
/// in lockstep, branch-free.
#[derive(Debug, Clone)]
pub struct Forest {
    nodes: Vec<PackedNode>,
    roots: Vec<u32>,
    depths: Vec<u32>,
    /// Leaf values by node index (0.0 for splits).
    values: Vec<f64>,
    /// Whether any split uses LightGBM's zero rule.
    zero_rule: bool,
    /// Categorical splits' sets, each `[words, bits...]`; a categorical
    /// node's threshold holds its offset here (as f32 bits).
    bitsets: Vec<u32>,
    tree_group: Vec<usize>,
    pub num_groups: usize,
    base_margin: Vec<f64>,
    pub num_features: usize,
    pub transform: Transform,
    average: bool,
}

#[derive(Debug, Clone, Copy)]
struct PackedNode {
    threshold: f32,
    flags: u32,
    left: u32,
    right: u32,
}

/// Where NaN goes, decided at compile time from the missing rule.
const NAN_LEFT: u32 = 1 << 30;
/// LightGBM's zero rule: (near) 0.0 takes the default branch.
const ZERO_RULE: u32 = 1 << 29;
const DEFAULT_LEFT: u32 = 1 << 28;
/// A categorical split; with `CAT_TRUNCATE`, LightGBM's negative rule.
const CATEGORICAL: u32 = 1 << 31;
const CAT_TRUNCATE: u32 = 1 << 27;
const FEATURE: u32 = (1 << 27) - 1;

/// The largest f32 at or below `t`: for any f32 `x`, `x as f64 <= t` exactly
/// when `x <= f32_floor(t)`.
fn f32_floor(t: f64) -> f32 {
    let f = t as f32;
    if (f as f64) > t {
        f.next_down()
    } else {
        f
    }
}

/// LightGBM's `kZeroThreshold` (the f32 literal 1e-35f, widened).
const ZERO_THRESHOLD: f64 = 1e-35f32 as f64;

/// One step down the tree from node `i` for `row` (a leaf stays put).
/// `ZERO` is whether any split of the forest has LightGBM's zero rule.
#[inline(always)]
fn step<const ZERO: bool>(nodes: &[PackedNode], bitsets: &[u32], i: u32, row: &[f32]) -> u32 {
    debug_assert!((i as usize) < nodes.len());
    // SAFETY: `compile` checked that every child index lies inside `nodes`, and
    // roots are node indices, so `i` is always in bounds.
    let n = unsafe { *nodes.get_unchecked(i as usize) };
    let f = (n.flags & FEATURE) as usize;
    debug_assert!(f < row.len());
    // SAFETY: `compile` checked every split's feature against `num_features`,
    // leaves read feature 0 of a forest with splits, and rows hold
    // `num_features` values.
    let v = unsafe { *row.get_unchecked(f) };
    if n.flags & CATEGORICAL != 0 {
        let left = if v.is_nan() {
            n.flags & NAN_LEFT != 0
        } else {
            in_set(
                bitsets,
                n.threshold.to_bits(),
                v,
                n.flags & CAT_TRUNCATE != 0,
            )
        };
        return if left { n.left } else { n.right };
    }
    // NaN compares false, so `v <= t` alone sends it right.
    let mut left = if n.flags & NAN_LEFT != 0 {
        (v <= n.threshold) | v.is_nan()
    } else {
        v <= n.threshold
    };
    if ZERO && n.flags & ZERO_RULE != 0 && (v as f64).abs() <= ZERO_THRESHOLD {
        left = n.flags & DEFAULT_LEFT != 0;
    }
    if left {
        n.left
    } else {
        n.right
    }
}

/// Whether the category of `v` (not NaN) is in the set at `offset`.
#[inline(always)]
fn in_set(bitsets: &[u32], offset: u32, v: f32, truncate: bool) -> bool {
    let negative = if truncate { v <= -1.0 } else { v < 0.0 };
    if negative {
        return false;
    }
    // Saturates for huge values, which then lie past the set.
    let c = v as u32;
    let at = offset as usize;
    let words = bitsets[at] as usize;
    let w = (c / 32) as usize;
    w < words && bitsets[at + 1 + w] & (1 << (c % 32)) != 0
}

/// Rows per task: small enough to spread a batch over the cores, large
/// enough that each tree's nodes stay in cache while a block walks it.
const BLOCK_ROWS: usize = 64;

impl Trees {
    /// Checks that every child index and feature lies inside the model,
    /// then packs the nodes `Forest::predict` walks.
    pub fn compile(self) -> Result<Forest, String> {
        self.validate()?;
        if self.num_features > FEATURE as usize {
            return Err(format!(
                "{} features is more than this evaluator takes",
                self.num_features
            ));
        }
        let mut f = Forest {
            nodes: Vec::new(),
            roots: Vec::new(),
            depths: Vec::new(),
            values: Vec::new(),
            zero_rule: false,
            bitsets: Vec::new(),
            tree_group: self.tree_group,
            num_groups: self.num_groups,
            base_margin: self.base_margin,
            num_features: self.num_features,
            transform: self.transform,
            average: self.average,
        };
        for tree in &self.trees {
            let base = f.nodes.len() as u32;
            f.roots.push(base);
            // Children come after parents (checked above), so one forward pass finds every depth.
            let mut depth = vec![0u32; tree.len()];
            for (i, n) in tree.iter().enumerate() {
                if n.feature != LEAF {
                    depth[n.left as usize] = depth[i] + 1;
                    depth[n.right as usize] = depth[i] + 1;
                }
            }
            f.depths.push(depth.iter().copied().max().unwrap_or(0));
            for (i, n) in tree.iter().enumerate() {
                let here = base + i as u32;
                if n.feature == LEAF {
                    f.nodes.push(PackedNode {
                        threshold: 0.0,
                        flags: 0,
                        left: here,
                        right: here,
                    });
                    f.values.push(n.threshold);
                    continue;
                }
                f.values.push(0.0);
                if let Some((set, negative)) = n.categories {
                    let words = &self.category_sets[set as usize];
                    let offset = f.bitsets.len() as u32;
                    f.bitsets.push(words.len() as u32);
                    f.bitsets.extend(words);
                    let mut flags = n.feature | CATEGORICAL;
                    if n.default_left {
                        flags |= NAN_LEFT;
                    }
                    if negative == Negative::TruncatedBelowZero {
                        flags |= CAT_TRUNCATE;
                    }
                    f.nodes.push(PackedNode {
                        threshold: f32::from_bits(offset),
                        flags,
                        left: base + n.left,
                        right: base + n.right,
                    });
                    continue;
                }
                let nan_left = match n.missing {
                    Missing::Nan | Missing::Zero => n.default_left,
                    Missing::None => 0.0 <= n.threshold,
                };
                let mut flags = n.feature;
                if nan_left {
                    flags |= NAN_LEFT;
                }
                if n.missing == Missing::Zero {
                    flags |= ZERO_RULE;
                    f.zero_rule = true;
                }
                if n.default_left {
                    flags |= DEFAULT_LEFT;
                }
                f.nodes.push(PackedNode {
                    threshold: f32_floor(n.threshold),
                    flags,
                    left: base + n.left,
                    right: base + n.right,
                });
            }
        }
        Ok(f)
    }

    fn validate(&self) -> Result<(), String> {
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
                if let Some((set, _)) = n.categories {
                    if set as usize >= self.category_sets.len() {
                        return Err(format!("tree {t} node {i} names category set {set}"));
                    }
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
}

impl Forest {
    pub fn num_trees(&self) -> usize {
        self.roots.len()
    }

    /// Transformed predictions, `rows × num_groups`, for row-major features.
    pub fn predict(&self, features: &[f32], rows: usize) -> Vec<f64> {
        let nf = self.num_features;
        let ng = self.num_groups;
        let mut out = vec![0f64; rows * ng];
        let per_group = if self.average {
            (self.num_trees() / ng).max(1) as f64
        } else {
            1.0
        };
        let work = |(block, out): (usize, &mut [f64])| {
            let first = block * BLOCK_ROWS;
            let n = out.len() / ng;
            let rows = &features[first * nf..(first + n) * nf];
            let mut at = [0u32; BLOCK_ROWS];
            let at = &mut at[..n];
            for ((&root, &depth), &g) in self.roots.iter().zip(&self.depths).zip(&self.tree_group) {
                at.fill(root);
                for _ in 0..depth {
                    for (i, row) in at.iter_mut().zip(rows.chunks_exact(nf)) {
                        *i = if self.zero_rule {
                            step::<true>(&self.nodes, &self.bitsets, *i, row)
                        } else {
                            step::<false>(&self.nodes, &self.bitsets, *i, row)
                        };
                    }
                }
                for (r, &i) in at.iter().enumerate() {
                    out[r * ng + g] += self.values[i as usize];
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
        if rows * self.num_trees() >= 4096 {
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
            categories: None,
        }
    }

    fn stump(node: Node) -> Trees {
        Trees {
            trees: vec![vec![node, Node::leaf(-1.0), Node::leaf(1.0)]],
            tree_group: vec![0],
            num_groups: 1,
            base_margin: vec![0.5],
            num_features: 1,
            transform: Transform::Identity,
            average: false,
            category_sets: Vec::new(),
        }
    }

    #[test]
    fn categorical_splits_follow_each_librarys_rules() {
        let mut node = split(0, 0.0, Missing::Nan, true);
        node.categories = Some((0, Negative::BelowZero));
        let mut t = stump(node);
        t.category_sets = vec![category_bitset([1, 40])];
        let xgb = t.clone().compile().unwrap();
        let rows = [1.0, 1.7, 40.0, 2.0, 0.0, -0.5, f32::NAN, 1e12, 39.0];
        // In the set: left (-1 + 0.5); NaN: default (left); the rest right.
        assert_eq!(
            xgb.predict(&rows, rows.len()),
            vec![-0.5, -0.5, -0.5, 1.5, 1.5, 1.5, -0.5, 1.5, 1.5]
        );
        t.trees[0][0].categories = Some((0, Negative::TruncatedBelowZero));
        t.trees[0][0].default_left = false;
        t.category_sets = vec![category_bitset([0])];
        let lgbm = t.clone().compile().unwrap();
        // -0.5 truncates to category 0; -1.0 is negative; NaN goes right.
        assert_eq!(
            lgbm.predict(&[-0.5, -1.0, 0.0, f32::NAN, 3.0], 5),
            vec![-0.5, 1.5, -0.5, 1.5, 1.5]
        );
        t.trees[0][0].categories = Some((1, Negative::BelowZero));
        assert!(t.compile().unwrap_err().contains("category set 1"));
    }

    #[test]
    fn missing_value_rules() {
        let nan = stump(split(0, 2.0, Missing::Nan, false)).compile().unwrap();
        assert_eq!(nan.predict(&[2.0, 2.5, f32::NAN], 3), vec![-0.5, 1.5, 1.5]);
        let zero = stump(split(0, -1.0, Missing::Zero, true))
            .compile()
            .unwrap();
        assert_eq!(
            zero.predict(&[0.0, f32::NAN, 3.0, -2.0], 4),
            vec![-0.5, -0.5, 1.5, -0.5]
        );
        let none = stump(split(0, 0.5, Missing::None, false))
            .compile()
            .unwrap();
        assert_eq!(none.predict(&[f32::NAN, 1.0], 2), vec![-0.5, 1.5]);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_blocks_agree_with_single_rows() {
        let mut t = stump(split(0, 0.0, Missing::Nan, true));
        t.trees.push(t.trees[0].clone());
        t.tree_group = vec![0, 1];
        t.num_groups = 2;
        t.base_margin = vec![0.0, 0.3];
        t.transform = Transform::Softmax;
        let f = t.clone().compile().unwrap();
        let xs: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) / 7.0).collect();
        let all = f.predict(&xs, xs.len());
        for (r, x) in xs.iter().enumerate() {
            let one = f.predict(&[*x], 1);
            assert_eq!(&all[r * 2..r * 2 + 2], one.as_slice());
            assert!((one[0] + one[1] - 1.0).abs() < 1e-12);
        }
        t.trees[0][0].feature = 3;
        assert!(t.compile().unwrap_err().contains("feature 3"));
    }
}
