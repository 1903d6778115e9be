//! The engine loop end to end on a tiny random-weight model loaded through the
//! Hugging Face folder path (safetensors, tokenizer.json, tokenizer_config.json).
mod common;

use candle_core::Device;
use engine::llm::kv_cache::KvDtype;
use engine::llm::quant::Quantization;
use engine::llm::{
    load_model, ChatMessage, EngineConfig, FinishReason, GenerationEvent, GenerationRequest,
    KvCacheSize, LlmEngine, LlmError, SamplingParams, SpeculativeConfig,
};
use std::time::{Duration, Instant};

fn engine(config: EngineConfig) -> (LlmEngine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_checkpoint(dir.path());
    common::tiny_tokenizer(dir.path());
    (start(&dir, config), dir)
}

/// An engine over the checkpoint in `dir`.
fn start(dir: &tempfile::TempDir, config: EngineConfig) -> LlmEngine {
    let loaded = load_model(dir.path(), &Device::Cpu, Quantization::None).unwrap();
    LlmEngine::start("tiny", loaded, config)
}

fn config() -> EngineConfig {
    EngineConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 8,
        max_waiting: 8,
        max_model_len: 128,
        block_size: 4,
        kv_cache: KvCacheSize::Bytes(1 << 20),
        kv_cache_dtype: KvDtype::F16,
        enable_prefix_caching: true,
        embeddings: true,
        speculative: None,
    }
}

/// Bytes of `blocks` KV blocks of 4 tokens for the tiny model (2 layers,
/// 2 KV heads of 16, keys and values, f16).
fn blocks(n: u64) -> KvCacheSize {
    KvCacheSize::Bytes(n * 2 * 2 * 2 * 4 * 16 * 2)
}

/// Waits until the engine's pool has every block free again.
fn wait_all_free(e: &LlmEngine) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = e.stats();
        if s.free_blocks == s.total_blocks {
            return;
        }
        assert!(Instant::now() < deadline, "blocks never returned: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_tokens,
        min_tokens: 0,
        stop: vec![],
        ignore_eos: true,
        n: 1,
        constraint: None,
    }
}

/// Collects text, finish reason and completion tokens of one request.
fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>,
) -> (String, FinishReason, usize) {
    let mut text = String::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenerationEvent::Delta { text: t, .. } => text.push_str(&t),
            GenerationEvent::Finished {
                reason,
                completion_tokens,
                ..
            } => return (text, reason, completion_tokens),
            GenerationEvent::Failed(m) => panic!("generation failed: {m}"),
        }
    }
    panic!("the engine dropped the request")
}

#[test]
fn folder_loads_with_tokenizer_and_template() {
    let (e, _dir) = engine(config());
    let ids = e.tokenizer().encode("w5 w6").unwrap();
    assert_eq!(
        ids,
        vec![1, 5, 6],
        "bos from tokenizer_config.json, words from tokenizer.json"
    );
    assert!(e.tokenizer().is_eos(2));
    let text = e
        .template()
        .unwrap()
        .render(
            &[ChatMessage {
                role: "user".into(),
                content: "w7".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(text, "user w7 w3");
}

/// 16 prompts of mixed lengths, some sharing a prefix.
fn sixteen_prompts() -> Vec<Vec<u32>> {
    let shared: Vec<u32> = (10..30).collect();
    (0..16u32)
        .map(|i| match i % 4 {
            0 => [shared.as_slice(), &[40 + i, 41]].concat(),
            1 => vec![1, 40 + i],
            2 => (50..61 + i).collect(),
            _ => (60..76 + i / 2).rev().collect(),
        })
        .collect()
}

/// Runs every prompt alone, then all at once under `config`; the greedy
/// outputs must be the same. Returns the engine used for the concurrent run.
fn concurrent_equals_alone(concurrent: EngineConfig) -> LlmEngine {
    concurrent_equals_alone_on(concurrent, start)
}

/// [`concurrent_equals_alone`], the concurrent engine started by `starter`.
fn concurrent_equals_alone_on(
    concurrent: EngineConfig,
    starter: impl Fn(&tempfile::TempDir, EngineConfig) -> LlmEngine,
) -> LlmEngine {
    let (alone_engine, dir) = engine(EngineConfig {
        enable_prefix_caching: false,
        ..config()
    });
    let prompts = sixteen_prompts();
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| collect(alone_engine.submit(request(p.clone(), 12)).unwrap()))
        .collect();
    let e = starter(&dir, concurrent);
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(request(p.clone(), 12)).unwrap())
        .collect();
    let together: Vec<_> = receivers.into_iter().map(collect).collect();
    assert_eq!(together, alone);
    for (text, reason, n) in &alone {
        assert_eq!((*reason, *n), (FinishReason::Length, 12));
        assert!(!text.is_empty());
    }
    wait_all_free(&e);
    e
}

/// Prompts longer than the 8-token budget are prefilled in chunks while the
/// others decode, prefixes are shared through the cache, and each output
/// equals the output the request gets alone.
#[test]
fn sixteen_concurrent_greedy_outputs_equal_one_at_a_time() {
    let e = concurrent_equals_alone(EngineConfig {
        max_num_seqs: 16,
        max_waiting: 16,
        ..config()
    });
    let s = e.stats();
    assert_eq!(s.preemptions, 0);
    assert!(
        s.prefix_hit > 0,
        "the shared 20-token prefix is reused: {s:?}"
    );
}

/// With a pool too small for all of them, sequences are preempted and
/// recomputed, and the outputs still do not change.
#[test]
fn preemption_under_a_small_pool_keeps_outputs() {
    let e = concurrent_equals_alone(EngineConfig {
        max_num_seqs: 16,
        max_waiting: 16,
        max_num_batched_tokens: 32,
        kv_cache: blocks(40),
        ..config()
    });
    let s = e.stats();
    assert_eq!(s.total_blocks, 40);
    assert!(s.preemptions > 0, "{s:?}");
}

/// A request whose prompt starts with a cached prefix prefills only the rest.
#[test]
fn a_cached_prefix_is_not_prefilled_again() {
    let (e, _dir) = engine(config());
    let prompt: Vec<u32> = (3..30).collect(); // 27 tokens: 6 full blocks of 4
    let first = collect(e.submit(request(prompt.clone(), 5)).unwrap());
    let before = e.stats();
    assert_eq!(before.prefix_hit, 0);
    let again = collect(e.submit(request(prompt.clone(), 5)).unwrap());
    assert_eq!(again, first);
    let s = e.stats();
    assert_eq!(s.prefix_queried - before.prefix_queried, 27);
    assert_eq!(s.prefix_hit, 24, "6 cached blocks; 3 tokens prefilled");
}

/// `n` samples of one prompt: greedy ones all equal the single answer; seeded
/// ones differ from each other and repeat with the same seed.
#[test]
fn parallel_samples_share_the_prompt() {
    let (e, _dir) = engine(config());
    let collect_n = |req: GenerationRequest| {
        let n = req.n;
        let mut rx = e.submit(req).unwrap();
        let mut texts = vec![String::new(); n];
        let mut finished = 0;
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                GenerationEvent::Delta { index, text, .. } => texts[index].push_str(&text),
                GenerationEvent::Finished { index, .. } => {
                    assert!(index < n);
                    finished += 1;
                }
                GenerationEvent::Failed(m) => panic!("{m}"),
            }
        }
        assert_eq!(finished, n);
        texts
    };
    let prompt: Vec<u32> = (3..21).collect();
    let (one, _, _) = collect(e.submit(request(prompt.clone(), 8)).unwrap());
    let greedy = collect_n(GenerationRequest {
        n: 3,
        ..request(prompt.clone(), 8)
    });
    assert_eq!(greedy, vec![one.clone(), one.clone(), one]);
    let seeded = || GenerationRequest {
        n: 3,
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(11),
            ..Default::default()
        },
        ..request(prompt.clone(), 8)
    };
    let a = collect_n(seeded());
    assert_ne!(a[0], a[1]);
    assert_ne!(a[1], a[2]);
    assert_eq!(a, collect_n(seeded()));
    wait_all_free(&e);
    let too_many = e
        .submit(GenerationRequest {
            n: 5,
            ..request(prompt, 8)
        })
        .unwrap_err();
    assert!(
        too_many.to_string().contains("max_num_seqs (4)"),
        "{too_many}"
    );
}

#[test]
fn seeded_sampling_repeats_and_stop_strings_cut() {
    let (e, _dir) = engine(config());
    let seeded = |seed| GenerationRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        },
        ..request(vec![1, 9, 10], 16)
    };
    let a = collect(e.submit(seeded(3)).unwrap());
    assert_eq!(a, collect(e.submit(seeded(3)).unwrap()));
    // Stop at the third word of the greedy output: the text before it remains.
    let (full, _, _) = collect(e.submit(request(vec![1, 9, 10], 16)).unwrap());
    let words: Vec<&str> = full.split_whitespace().collect();
    let stop = format!(" {}", words[2]);
    let cut = full.find(&stop).unwrap();
    let (text, reason, _) = collect(
        e.submit(GenerationRequest {
            stop: vec![stop],
            ..request(vec![1, 9, 10], 16)
        })
        .unwrap(),
    );
    assert_eq!((text.as_str(), reason), (&full[..cut], FinishReason::Stop));
}

#[test]
fn a_dropped_receiver_cancels_and_a_full_queue_refuses() {
    let (e, _dir) = engine(config());
    let mut rx = e.submit(request(vec![1, 5], 100)).unwrap();
    assert!(matches!(
        rx.blocking_recv(),
        Some(GenerationEvent::Delta { .. })
    ));
    drop(rx);
    // The engine keeps serving after the cancellation.
    assert_eq!(collect(e.submit(request(vec![1, 6], 4)).unwrap()).2, 4);
    let mut kept = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        match e.submit(request(vec![1, 3 + i], 100)) {
            Ok(rx) => kept.push(rx),
            Err(LlmError::QueueFull { capacity }) => {
                assert_eq!(capacity, 8);
                refused += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(
        refused >= 8,
        "4 running + 8 waiting fit; {refused} of 20 refused"
    );
    let too_long = e.submit(request(vec![1; 100], 100)).unwrap_err();
    assert!(too_long.to_string().contains("128"), "{too_long}");
    let unknown = e.submit(request(vec![1, 97], 4)).unwrap_err();
    assert!(unknown.to_string().contains("97"), "{unknown}");
    // Cancel everything mid-stream: every block returns to the pool.
    for rx in kept.iter_mut().take(2) {
        let _ = rx.blocking_recv();
    }
    drop(kept);
    wait_all_free(&e);
}

#[test]
fn teacher_forced_scores_equal_the_logprobs_of_generation() {
    let (e, _dir) = engine(config());
    let prompt = vec![5, 9, 2, 31, 7, 7, 12];
    let mut req = request(prompt.clone(), 12);
    req.sampling.logprobs = Some(0);
    let mut rx = e.submit(req).unwrap();
    let (mut ids, mut lps) = (vec![], vec![]);
    while let Some(ev) = rx.blocking_recv() {
        if let GenerationEvent::Delta {
            logprob: Some(l), ..
        } = ev
        {
            ids.push(l.id);
            lps.push(l.logprob);
        }
    }
    assert_eq!(ids.len(), 12);
    let tokens: Vec<u32> = prompt.iter().chain(&ids).copied().collect();
    let scored = e
        .score(tokens.clone(), prompt.len(), 3)
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert_eq!(scored.len(), ids.len());
    for (i, (s, b)) in scored.iter().zip(&lps).enumerate() {
        let a = s.logprob;
        assert!((a - b).abs() < 1e-3, "token {i}: scored {a}, generated {b}");
        // Greedy generation took the most likely token, first in `top`.
        assert_eq!(s.top.len(), 3);
        assert_eq!(s.top[0], (ids[i], a), "token {i}");
        assert!(s.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    // A token the model did not pick scores lower than the greedy one.
    let mut other = tokens.clone();
    let first = prompt.len();
    other[first] = (other[first] + 1) % 64;
    let worse = e
        .score(other, first, 0)
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    let (w, s) = (worse[0].logprob, scored[0].logprob);
    assert!(w < s, "{w} vs {s}");
    assert!(matches!(
        e.score(tokens.clone(), 0, 0),
        Err(LlmError::InvalidRequest(_))
    ));
    assert!(matches!(
        e.score(vec![1, 100_000], 1, 0),
        Err(LlmError::InvalidRequest(_))
    ));
}

/// Embeddings: unit vectors of the hidden width, the same for the same
/// tokens however often and whatever runs beside them; refused where the
/// model is not configured for them.
#[test]
fn embeddings_are_unit_vectors_of_the_tokens() {
    let (e, dir) = engine(config());
    let embed = |e: &LlmEngine, t: Vec<u32>| e.embed(t).unwrap().blocking_recv().unwrap().unwrap();
    let a = embed(&e, vec![5, 9, 2, 31]);
    assert_eq!(a.len(), 64);
    assert!((a.iter().map(|v| v * v).sum::<f32>().sqrt() - 1.0).abs() < 1e-4);
    let _busy = e.submit(request(vec![1, 2, 3], 20)).unwrap();
    assert_eq!(embed(&e, vec![5, 9, 2, 31]), a);
    assert_ne!(embed(&e, vec![5, 9, 2, 30]), a);
    assert!(matches!(e.embed(vec![]), Err(LlmError::InvalidRequest(_))));
    assert!(matches!(
        e.embed(vec![1, 100_000]),
        Err(LlmError::InvalidRequest(_))
    ));
    let plain = start(
        &dir,
        EngineConfig {
            embeddings: false,
            ..config()
        },
    );
    let err = plain.embed(vec![5, 9]).unwrap_err();
    assert!(err.to_string().contains("embeddings: true"), "{err}");
}

fn speculative() -> Option<SpeculativeConfig> {
    Some(SpeculativeConfig {
        num_speculative_tokens: 3,
        prompt_lookup_min: 1,
        prompt_lookup_max: 3,
        disable_by_batch_size: None,
    })
}

/// Speculating engines: 16 sequences with prefix caching, then in a pool
/// small enough to preempt.
fn speculating_configs() -> [EngineConfig; 2] {
    let sixteen = EngineConfig {
        max_num_seqs: 16,
        max_waiting: 16,
        speculative: speculative(),
        ..config()
    };
    [
        EngineConfig {
            max_num_batched_tokens: 64,
            ..sixteen.clone()
        },
        EngineConfig {
            max_num_batched_tokens: 32,
            kv_cache: blocks(40),
            ..sixteen
        },
    ]
}

/// With n-gram speculation, greedy outputs equal plain one-at-a-time
/// decoding: 16 at once with prefix caching, and again under a pool small
/// enough to preempt; proposals were made and some accepted.
#[test]
fn speculative_greedy_outputs_equal_plain_decoding() {
    for concurrent in speculating_configs() {
        let e = concurrent_equals_alone(concurrent);
        let s = e.stats();
        assert!(s.accepted_tokens > 0, "{s:?}");
        assert!(
            s.draft_tokens > s.accepted_tokens,
            "some proposals miss: {s:?}"
        );
    }
}

/// The ids of a seeded, sampled request's tokens.
fn sampled_ids(e: &LlmEngine, prompt: &[u32], seed: u64, tokens: usize) -> Vec<u32> {
    let mut req = request(prompt.to_vec(), tokens);
    req.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        logprobs: Some(0),
        // The prompt's tokens made likely, so that proposals (what followed
        // them in the prompt) are made and often, not always, accepted.
        logit_bias: prompt.iter().map(|&t| (t, 3.0)).collect(),
        ..Default::default()
    };
    let mut rx = e.submit(req).unwrap();
    let mut ids = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenerationEvent::Delta { logprob, .. } => ids.push(logprob.unwrap().id),
            GenerationEvent::Finished { .. } => return ids,
            GenerationEvent::Failed(m) => panic!("generation failed: {m}"),
        }
    }
    panic!("the engine dropped the request")
}

/// Two-sample χ² over categories (those with fewer than 10 draws in both
/// pooled into one) and its 0.1% critical value (Wilson–Hilferty).
fn homogeneous(a: &[u64], b: &[u64]) -> (f64, f64) {
    let (mut cats, mut rare) = (Vec::new(), (0u64, 0u64));
    for (&x, &y) in a.iter().zip(b) {
        if x + y >= 10 {
            cats.push((x, y));
        } else {
            rare = (rare.0 + x, rare.1 + y);
        }
    }
    if rare.0 + rare.1 > 0 {
        cats.push(rare);
    }
    let (na, nb) = (a.iter().sum::<u64>() as f64, b.iter().sum::<u64>() as f64);
    let stat: f64 = cats
        .iter()
        .map(|&(x, y)| {
            let p = (x + y) as f64 / (na + nb);
            (x as f64 - p * na).powi(2) / (p * na) + (y as f64 - p * nb).powi(2) / (p * nb)
        })
        .sum();
    let df = (cats.len() - 1) as f64;
    let z = 3.09;
    let critical = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
    (stat, critical)
}

/// Sampled with speculation, the second and third tokens of a repetitive
/// prompt's continuation follow the distribution they follow without it (the
/// first comes from the prompt's pass either way), over 1,500 seeded
/// requests each; proposals were judged along the way, accepted and refused.
#[test]
fn speculative_sampling_keeps_the_distribution() {
    let (plain, dir) = engine(config());
    let spec = start(
        &dir,
        EngineConfig {
            speculative: speculative(),
            ..config()
        },
    );
    let prompt = [5, 9, 2, 5, 9, 2, 5, 9, 2, 5];
    let mut counts = [[[0u64; 97]; 2]; 2];
    for (which, e) in [&plain, &spec].into_iter().enumerate() {
        for seed in 0..1500 {
            let ids = sampled_ids(e, &prompt, seed, 3);
            for (pos, &id) in ids[1..].iter().enumerate() {
                counts[which][pos][id as usize] += 1;
            }
        }
    }
    for (pos, (plain, spec)) in counts[0].iter().zip(&counts[1]).enumerate() {
        let (stat, critical) = homogeneous(plain, spec);
        assert!(
            stat < critical,
            "token {}: χ² {stat:.1} ≥ {critical:.1}",
            pos + 2
        );
    }
    let s = spec.stats();
    assert!(
        s.accepted_tokens > 300 && s.draft_tokens > s.accepted_tokens + 100,
        "{s:?}"
    );
}

/// The tiny model drafting for itself: every proposal is the target's own
/// greedy choice, so every proposed token is accepted, and the outputs are
/// plain decoding's, 16 at once and under preemption.
#[test]
fn a_draft_model_proposes_and_outputs_stay_the_same() {
    let with_draft = |dir: &tempfile::TempDir, config: EngineConfig| {
        let load = || load_model(dir.path(), &Device::Cpu, Quantization::None).unwrap();
        LlmEngine::start_with_draft("tiny", load(), load(), config).unwrap()
    };
    for concurrent in speculating_configs() {
        let e = concurrent_equals_alone_on(concurrent, with_draft);
        let s = e.stats();
        assert!(s.draft_tokens > 50, "{s:?}");
        assert_eq!(s.accepted_tokens, s.draft_tokens, "{s:?}");
    }
}

/// A draft with another vocabulary is refused, naming what differs.
#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&dir, &other] {
        common::tiny_checkpoint(d.path());
        common::tiny_tokenizer(d.path());
    }
    let json = other.path().join("tokenizer.json");
    let text = std::fs::read_to_string(&json)
        .unwrap()
        .replace("\"w50\"", "\"x50\"");
    std::fs::write(&json, text).unwrap();
    let load =
        |d: &tempfile::TempDir| load_model(d.path(), &Device::Cpu, Quantization::None).unwrap();
    let speculating = || EngineConfig {
        speculative: speculative(),
        ..config()
    };
    let err = LlmEngine::start_with_draft("tiny", load(&dir), load(&other), speculating())
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("first difference at id 50"),
        "{err}"
    );
    // A draft that cannot reach the positions the model serves.
    let mut short = load(&dir);
    short.model.config.max_position_embeddings = 64;
    let err = LlmEngine::start_with_draft("tiny", load(&dir), short, speculating())
        .err()
        .expect("refused");
    let want = "context (64 positions) is shorter than the 128";
    assert!(err.to_string().contains(want), "{err}");
}
