//! Reads LightGBM's text model format (`Booster.save_model`) into a `Forest`:
//! `value <= threshold` goes left, with the missing-value rule and default
//! direction packed into each split's `decision_type`.
use super::forest::{Forest, Missing, Negative, Node, Transform, Trees};
use std::collections::HashMap;

fn values<T: std::str::FromStr>(
    map: &HashMap<&str, &str>,
    key: &str,
    tree: usize,
) -> Result<Vec<T>, String> {
    let raw = map
        .get(key)
        .ok_or_else(|| format!("Tree={tree}: '{key}' is missing"))?;
    raw.split_whitespace()
        .map(|v| {
            v.parse()
                .map_err(|_| format!("Tree={tree}: {key} value '{v}' does not parse"))
        })
        .collect()
}

/// A tree's nodes, its categorical splits' sets added to `sets`.
fn tree(
    map: &HashMap<&str, &str>,
    t: usize,
    sets: &mut Vec<Vec<u32>>,
) -> Result<Vec<Node>, String> {
    let num_leaves: usize = values(map, "num_leaves", t)?.first().copied().unwrap_or(0);
    let leaf_value: Vec<f64> = values(map, "leaf_value", t)?;
    if leaf_value.len() != num_leaves || num_leaves == 0 {
        return Err(format!(
            "Tree={t}: {} leaf values for {num_leaves} leaves",
            leaf_value.len()
        ));
    }
    if num_leaves == 1 {
        return Ok(vec![Node::leaf(leaf_value[0])]);
    }
    let num_cat = values::<usize>(map, "num_cat", t)?
        .first()
        .copied()
        .unwrap_or(0);
    // Categorical split k's set: cat_threshold[cat_boundaries[k]..cat_boundaries[k + 1]].
    let first_set = sets.len() as u32;
    if num_cat > 0 {
        let bounds: Vec<usize> = values(map, "cat_boundaries", t)?;
        let words: Vec<u32> = values(map, "cat_threshold", t)?;
        if bounds.len() != num_cat + 1 {
            return Err(format!(
                "Tree={t}: cat_boundaries has {} entries for num_cat={num_cat}",
                bounds.len()
            ));
        }
        for k in 0..num_cat {
            let set = words
                .get(bounds[k]..bounds[k + 1])
                .ok_or_else(|| format!("Tree={t}: cat_boundaries points past cat_threshold"))?;
            sets.push(set.to_vec());
        }
    }
    let inner = num_leaves - 1;
    let feature: Vec<u32> = values(map, "split_feature", t)?;
    let threshold: Vec<f64> = values(map, "threshold", t)?;
    let decision: Vec<u8> = values(map, "decision_type", t)?;
    let left: Vec<i64> = values(map, "left_child", t)?;
    let right: Vec<i64> = values(map, "right_child", t)?;
    if [
        feature.len(),
        threshold.len(),
        decision.len(),
        left.len(),
        right.len(),
    ]
    .iter()
    .any(|&l| l != inner)
    {
        return Err(format!(
            "Tree={t}: split arrays do not have {inner} entries"
        ));
    }
    // Leaves follow the splits: child -k-1 is leaf k, node inner + k.
    let child = |c: i64| {
        if c < 0 {
            (inner as i64 - c - 1) as u32
        } else {
            c as u32
        }
    };
    let mut nodes: Vec<Node> = (0..inner)
        .map(|i| {
            // decision_type bit 0: categorical; `threshold` is then its set's index.
            let categories = if decision[i] & 1 != 0 {
                let k = threshold[i] as usize;
                if k >= num_cat {
                    return Err(format!(
                        "Tree={t}: split {i} names category set {k} of {num_cat}"
                    ));
                }
                Some((first_set + k as u32, Negative::TruncatedBelowZero))
            } else {
                None
            };
            Ok(Node {
                threshold: threshold[i],
                feature: feature[i],
                left: child(left[i]),
                right: child(right[i]),
                // A categorical split sends NaN right.
                default_left: categories.is_none() && decision[i] & 2 != 0,
                missing: match (decision[i] >> 2) & 3 {
                    1 => Missing::Zero,
                    2 => Missing::Nan,
                    _ => Missing::None,
                },
                categories,
            })
        })
        .collect::<Result<_, String>>()?;
    nodes.extend(leaf_value.iter().map(|&v| Node::leaf(v)));
    Ok(nodes)
}

/// Parses a LightGBM text model.
pub fn parse(text: &str) -> Result<Forest, String> {
    let mut header: HashMap<&str, &str> = HashMap::new();
    let mut flags: Vec<&str> = Vec::new();
    let mut sections: Vec<HashMap<&str, &str>> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line == "end of trees" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        match line.split_once('=') {
            Some(("Tree", _)) => sections.push(HashMap::new()),
            Some((k, v)) => match sections.last_mut() {
                Some(s) => {
                    s.insert(k, v);
                }
                None => {
                    header.insert(k, v);
                }
            },
            None if sections.is_empty() => flags.push(line),
            None => {}
        }
    }
    if !flags.contains(&"tree") && !header.contains_key("version") {
        return Err("not a LightGBM text model (no 'tree' / 'version=' header)".into());
    }
    let get = |k: &str| -> Result<usize, String> {
        header
            .get(k)
            .ok_or_else(|| format!("header '{k}' is missing"))?
            .trim()
            .parse()
            .map_err(|_| format!("header '{k}' is not a number"))
    };
    let num_groups = get("num_tree_per_iteration")?.max(1);
    let num_features = get("max_feature_idx")? + 1;
    let objective = header.get("objective").copied().unwrap_or("regression");
    let name = objective.split_whitespace().next().unwrap_or("regression");
    let option = |key: &str| {
        objective
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let transform = match name {
        "regression" | "regression_l2" | "regression_l1" | "huber" | "fair" | "quantile"
        | "mape" | "l2" | "l1" | "mean_squared_error" | "mse" | "mae" => Transform::Identity,
        "binary" => Transform::Sigmoid(option("sigmoid").unwrap_or(1.0)),
        "multiclassova" => Transform::Sigmoid(option("sigmoid").unwrap_or(1.0)),
        "cross_entropy" | "xentropy" => Transform::Sigmoid(1.0),
        "multiclass" | "softmax" => Transform::Softmax,
        "poisson" | "gamma" | "tweedie" => Transform::Exp,
        other => return Err(format!("objective '{other}' is not supported")),
    };
    let mut category_sets = Vec::new();
    let trees = sections
        .iter()
        .enumerate()
        .map(|(t, s)| tree(s, t, &mut category_sets))
        .collect::<Result<Vec<_>, _>>()?;
    if trees.is_empty() {
        return Err("the model has no trees".into());
    }
    Trees {
        tree_group: (0..trees.len()).map(|t| t % num_groups).collect(),
        trees,
        num_groups,
        base_margin: vec![0.0; num_groups],
        num_features,
        transform,
        average: flags.contains(&"average_output"),
        category_sets,
    }
    .compile()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary model of two trees as LightGBM 4 writes it: a stump on
    /// feature 0 (`<= 1.5` left; decision_type 10 = default left, NaN missing)
    /// and one on feature 1 (decision_type 0 = NaN read as 0.0).
    const MODEL: &str = "tree
version=v4
num_class=1
num_tree_per_iteration=1
label_index=0
max_feature_idx=1
objective=binary sigmoid:1

Tree=0
num_leaves=2
num_cat=0
split_feature=0
threshold=1.5
decision_type=10
left_child=-1
right_child=-2
leaf_value=-0.5 0.5

Tree=1
num_leaves=2
num_cat=0
split_feature=1
threshold=-0.25
decision_type=0
left_child=-1
right_child=-2
leaf_value=0.125 -0.125

end of trees
";

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn at_most_goes_left_and_missing_follows_the_decision_type() {
        let f = parse(MODEL).unwrap();
        let rows = [
            1.5,
            -1.0, // <= 1.5: left; <= -0.25: left
            1.6,
            0.0, // right; 0 > -0.25: right
            f32::NAN,
            f32::NAN, // NaN on feature 0 goes to the default (left); read as 0.0 on feature 1: right
        ];
        let want = [-0.5 + 0.125, 0.5 - 0.125, -0.5 - 0.125];
        for (got, margin) in f.predict(&rows, 3).iter().zip(want) {
            assert!((got - sigmoid(margin)).abs() < 1e-12, "{got} vs {margin}");
        }
    }

    #[test]
    fn malformed_models_are_refused_by_name() {
        let e = parse(&MODEL.replace("leaf_value=-0.5 0.5", "leaf_value=-0.5")).unwrap_err();
        assert!(e.contains("Tree=0") && e.contains("leaf values"), "{e}");
        let e = parse(&MODEL.replace("num_cat=0\nsplit_feature=1", "num_cat=1\nsplit_feature=1"))
            .unwrap_err();
        assert!(e.contains("Tree=1") && e.contains("cat_boundaries"), "{e}");
        let e = parse(&MODEL.replace("threshold=1.5", "threshold=abc")).unwrap_err();
        assert!(e.contains("threshold") && e.contains("abc"), "{e}");
        let e = parse(&MODEL.replace("binary sigmoid:1", "lambdarank")).unwrap_err();
        assert!(e.contains("lambdarank"), "{e}");
        assert!(parse("hello").unwrap_err().contains("not a LightGBM"));
    }
}
