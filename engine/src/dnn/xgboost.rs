//! Reads XGBoost's JSON model format (1.0 and later) into a `Forest`:
//! `fvalue < split_condition` goes left, NaN takes `default_left`, and the
//! base score enters as a margin through the objective's link function.
use super::forest::{category_bitset, Forest, Missing, Negative, Node, Transform, Trees, LEAF};
use serde_json::Value;

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// XGBoost writes base_score as "5E-1" or, since 3.0, "[5E-1]" / "[0E0,0E0,0E0]".
fn base_scores(v: &Value) -> Result<Vec<f64>, String> {
    let s = v
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string());
    s.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<f64>()
                .map_err(|_| format!("base_score '{s}' is not a number"))
        })
        .collect()
}

fn array<'a>(tree: &'a Value, key: &str, t: usize) -> Result<&'a Vec<Value>, String> {
    tree[key]
        .as_array()
        .ok_or_else(|| format!("trees[{t}].{key} is missing"))
}

/// A tree's nodes, its categorical splits' sets added to `sets`. XGBoost
/// sends the categories it lists right; the children of such a split are
/// swapped so that the set goes left, as the evaluator reads it.
fn tree_nodes(tree: &Value, t: usize, sets: &mut Vec<Vec<u32>>) -> Result<Vec<Node>, String> {
    let left = array(tree, "left_children", t)?;
    let right = array(tree, "right_children", t)?;
    let cond = array(tree, "split_conditions", t)?;
    let index = array(tree, "split_indices", t)?;
    let default_left = array(tree, "default_left", t)?;
    let n = left.len();
    if [right.len(), cond.len(), index.len(), default_left.len()]
        .iter()
        .any(|&l| l != n)
    {
        return Err(format!("trees[{t}]: node arrays differ in length"));
    }
    let leaf_vector = num(&tree["tree_param"]["size_leaf_vector"]).unwrap_or(1.0);
    if leaf_vector > 1.0 {
        return Err(format!(
            "trees[{t}]: vector leaves (multi_strategy multi_output_tree) are not supported; \
             train with multi_strategy one_output_per_tree"
        ));
    }
    let categorical: Vec<bool> = match tree["split_type"].as_array() {
        Some(types) => types.iter().map(|s| s.as_i64().unwrap_or(0) == 1).collect(),
        None => vec![false; n],
    };
    if categorical.len() != n {
        return Err(format!("trees[{t}]: split_type differs in length"));
    }
    // Node → its categories: categories[segment .. segment + size].
    let mut node_sets: std::collections::HashMap<usize, u32> = std::collections::HashMap::new();
    if categorical.iter().any(|&c| c) {
        let ints = |key: &str| -> Result<Vec<u64>, String> {
            array(tree, key, t)?
                .iter()
                .map(|v| {
                    v.as_u64()
                        .ok_or_else(|| format!("trees[{t}].{key}: {v} is not a count"))
                })
                .collect()
        };
        let (cats, nodes, segments, sizes) = (
            ints("categories")?,
            ints("categories_nodes")?,
            ints("categories_segments")?,
            ints("categories_sizes")?,
        );
        if nodes.len() != segments.len() || nodes.len() != sizes.len() {
            return Err(format!("trees[{t}]: categories_* arrays differ in length"));
        }
        for ((&node, &start), &size) in nodes.iter().zip(&segments).zip(&sizes) {
            let set = cats
                .get(start as usize..(start + size) as usize)
                .ok_or_else(|| format!("trees[{t}]: categories_segments points past categories"))?;
            if set.iter().any(|&c| c >= 1 << 24) {
                return Err(format!(
                    "trees[{t}]: a category of node {node} is past 2^24"
                ));
            }
            node_sets.insert(node as usize, sets.len() as u32);
            sets.push(category_bitset(set.iter().map(|&c| c as u32)));
        }
    }
    (0..n)
        .map(|i| {
            let l = left[i]
                .as_i64()
                .ok_or_else(|| format!("trees[{t}].left_children[{i}]"))?;
            let value =
                num(&cond[i]).ok_or_else(|| format!("trees[{t}].split_conditions[{i}]"))? as f32;
            if l < 0 {
                return Ok(Node::leaf(value as f64));
            }
            let r = right[i]
                .as_i64()
                .ok_or_else(|| format!("trees[{t}].right_children[{i}]"))?;
            let feature = index[i]
                .as_u64()
                .ok_or_else(|| format!("trees[{t}].split_indices[{i}]"))?;
            let dl = match &default_left[i] {
                Value::Bool(b) => *b,
                v => v.as_i64().unwrap_or(0) != 0,
            };
            if categorical[i] {
                // Not listed (nor a node without a list): every category goes left.
                let set = match node_sets.get(&i) {
                    Some(&s) => s,
                    None => {
                        sets.push(Vec::new());
                        sets.len() as u32 - 1
                    }
                };
                return Ok(Node {
                    threshold: 0.0,
                    feature: u32::try_from(feature).unwrap_or(LEAF - 1),
                    left: r as u32,
                    right: l as u32,
                    default_left: !dl,
                    missing: Missing::Nan,
                    categories: Some((set, Negative::BelowZero)),
                });
            }
            Ok(Node {
                // For f32 inputs, `x < t` is exactly `x <= the float just below t`.
                threshold: value.next_down() as f64,
                feature: u32::try_from(feature).unwrap_or(LEAF - 1),
                left: l as u32,
                right: r as u32,
                default_left: dl,
                missing: Missing::Nan,
                categories: None,
            })
        })
        .collect()
}

/// Parses an XGBoost JSON model (`Booster.save_model("x.json")`).
pub fn parse(json: &str) -> Result<Forest, String> {
    let root: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    from_value(&root)
}

/// Parses an XGBoost UBJSON model (`Booster.save_model("x.ubj")`, the
/// default format since XGBoost 2.1).
pub fn parse_ubjson(bytes: &[u8]) -> Result<Forest, String> {
    from_value(&super::ubjson::parse(bytes).map_err(|e| format!("not UBJSON: {e}"))?)
}

fn from_value(root: &Value) -> Result<Forest, String> {
    let learner = &root["learner"];
    let booster = &learner["gradient_booster"];
    let name = booster["name"].as_str().unwrap_or("");
    let model = match name {
        "gbtree" => &booster["model"],
        "dart" => &booster["gbtree"]["model"],
        other => return Err(format!("booster '{other}' is not supported (gbtree, dart)")),
    };
    let params = &learner["learner_model_param"];
    let num_feature =
        num(&params["num_feature"]).ok_or("learner_model_param.num_feature is missing")? as usize;
    let num_class = num(&params["num_class"]).unwrap_or(0.0) as usize;
    // Multi-target regression: one output per target, each tree adding to
    // the target its tree_info names.
    let num_target = num(&params["num_target"]).unwrap_or(1.0) as usize;
    let num_groups = num_class.max(num_target).max(1);
    let objective = learner["objective"]["name"].as_str().unwrap_or("");
    let base = base_scores(&params["base_score"])?;
    let (link, transform): (fn(f64) -> f64, Transform) = match objective {
        "reg:squarederror"
        | "reg:linear"
        | "reg:pseudohubererror"
        | "reg:absoluteerror"
        | "reg:quantileerror"
        | "reg:squaredlogerror" => (|p| p, Transform::Identity),
        "binary:logistic" | "reg:logistic" => {
            (|p: f64| -(1.0 / p - 1.0).ln(), Transform::Sigmoid(1.0))
        }
        "binary:logitraw" => (|p: f64| -(1.0 / p - 1.0).ln(), Transform::Identity),
        "binary:hinge" => (|p| p, Transform::Step),
        "multi:softprob" | "multi:softmax" => (|p| p, Transform::Softmax),
        "count:poisson" | "reg:gamma" | "reg:tweedie" => (|p: f64| p.ln(), Transform::Exp),
        other => return Err(format!("objective '{other}' is not supported")),
    };
    let base_margin = match base.len() {
        1 => vec![link(base[0]); num_groups],
        n if n == num_groups => base.iter().map(|&b| link(b)).collect(),
        n => {
            return Err(format!(
                "base_score has {n} values for {num_groups} outputs"
            ))
        }
    };
    let trees_json = model["trees"]
        .as_array()
        .ok_or("gradient_booster model has no trees")?;
    let mut category_sets = Vec::new();
    let trees = trees_json
        .iter()
        .enumerate()
        .map(|(t, tree)| tree_nodes(tree, t, &mut category_sets))
        .collect::<Result<Vec<_>, _>>()?;
    let tree_group = match model["tree_info"].as_array() {
        Some(info) => info
            .iter()
            .map(|g| g.as_u64().unwrap_or(0) as usize)
            .collect(),
        None => vec![0; trees.len()],
    };
    let mut trees = trees;
    if name == "dart" {
        let weights = booster["weight_drop"]
            .as_array()
            .ok_or("dart model has no weight_drop")?;
        for (tree, w) in trees.iter_mut().zip(weights) {
            let w = num(w).unwrap_or(1.0) as f32;
            for n in tree.iter_mut().filter(|n| n.feature == LEAF) {
                n.threshold = (n.threshold as f32 * w) as f64;
            }
        }
    }
    Trees {
        trees,
        tree_group,
        num_groups,
        base_margin,
        num_features: num_feature,
        transform,
        average: false,
        category_sets,
    }
    .compile()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Two trees, written as XGBoost 2.x writes them: a stump on feature 1
    /// (`x1 < 0.5` left, NaN left) and a constant; base_score 0.5 under
    /// `binary:logistic`, so the base margin is 0.
    fn model(objective: &str, base_score: &str) -> String {
        json!({"learner": {
        "learner_model_param": {"num_feature": "2", "num_class": "0", "base_score": base_score},
        "objective": {"name": objective},
        "gradient_booster": {"name": "gbtree", "model": {
            "tree_info": [0, 0],
            "trees": [
                {"left_children": [1, -1, -1], "right_children": [2, -1, -1],
                 "split_conditions": [0.5, -1.0, 1.0], "split_indices": [1, 0, 0],
                 "default_left": [1, 0, 0]},
                {"left_children": [-1], "right_children": [-1], "split_conditions": [0.25],
                 "split_indices": [0], "default_left": [0]}
            ]}}}})
        .to_string()
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn less_than_goes_left_nan_takes_the_default_and_the_base_score_is_a_margin() {
        let f = parse(&model("binary:logistic", "5E-1")).unwrap();
        assert_eq!(f.num_trees(), 2);
        // x1 = 0.2 < 0.5: left (-1.0); x1 = 0.5 is not below: right (+1.0); NaN: left.
        let rows = [0.0, 0.2, 0.0, 0.5, 9.0, f32::NAN];
        let p = f.predict(&rows, 3);
        for (got, margin) in p.iter().zip([-0.75, 1.25, -0.75]) {
            assert!((got - sigmoid(margin)).abs() < 1e-12, "{got} vs {margin}");
        }
        // base_score as XGBoost 3 writes it, and a raw-margin objective.
        let raw = parse(&model("binary:logitraw", "[7.5E-1]")).unwrap();
        let p = raw.predict(&[0.0, 0.2], 1);
        assert!((p[0] - (-0.75 + (3.0f64).ln())).abs() < 1e-6, "{}", p[0]);
    }

    #[test]
    fn malformed_models_are_refused_by_name() {
        let bad = |edit: &dyn Fn(&mut Value)| {
            let mut v: Value = serde_json::from_str(&model("binary:logistic", "5E-1")).unwrap();
            edit(&mut v);
            parse(&v.to_string()).unwrap_err()
        };
        fn tree(v: &mut Value) -> &mut Value {
            &mut v["learner"]["gradient_booster"]["model"]["trees"][0]
        }
        let e = bad(&|v| tree(v)["right_children"] = json!([2, -1]));
        assert!(e.contains("trees[0]") && e.contains("length"), "{e}");
        let e = bad(&|v| tree(v)["split_type"] = json!([1, 0, 0]));
        assert!(e.contains("trees[0].categories"), "{e}");
        let e = bad(&|v| v["learner"]["objective"]["name"] = json!("rank:ndcg"));
        assert!(e.contains("rank:ndcg"), "{e}");
        let e = bad(&|v| v["learner"]["learner_model_param"]["base_score"] = json!("[1E0,2E0]"));
        assert!(e.contains("base_score"), "{e}");
        assert!(parse("{not json").unwrap_err().contains("JSON"));
    }
}
