//! Reads LightGBM's text model format (`Booster.save_model`) into a `Forest`:
//! `value <= threshold` goes left, with the missing-value rule and default
//! direction packed into each split's `decision_type`.
use super::forest::{Forest, Missing, Node, Transform, Trees};
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

fn tree(map: &HashMap<&str, &str>, t: usize) -> Result<Vec<Node>, String> {
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
    if values::<usize>(map, "num_cat", t)?
        .first()
        .copied()
        .unwrap_or(0)
        > 0
    {
        return Err(format!("Tree={t}: categorical splits are not supported"));
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
        .map(|i| Node {
            threshold: threshold[i],
            feature: feature[i],
            left: child(left[i]),
            right: child(right[i]),
            default_left: decision[i] & 2 != 0,
            missing: match (decision[i] >> 2) & 3 {
                1 => Missing::Zero,
                2 => Missing::Nan,
                _ => Missing::None,
            },
        })
        .collect();
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
    let trees = sections
        .iter()
        .enumerate()
        .map(|(t, s)| tree(s, t))
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
        assert!(e.contains("Tree=1") && e.contains("categorical"), "{e}");
        let e = parse(&MODEL.replace("threshold=1.5", "threshold=abc")).unwrap_err();
        assert!(e.contains("threshold") && e.contains("abc"), "{e}");
        let e = parse(&MODEL.replace("binary sigmoid:1", "lambdarank")).unwrap_err();
        assert!(e.contains("lambdarank"), "{e}");
        assert!(parse("hello").unwrap_err().contains("not a LightGBM"));
    }
}
