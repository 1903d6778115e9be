//! The engine loop end to end on a tiny random-weight model loaded through the
//! Hugging Face folder path (safetensors, tokenizer.json, tokenizer_config.json).
mod common;

use candle_core::Device;
use engine::llm::{
    load_model, ChatMessage, EngineConfig, FinishReason, GenerationEvent, GenerationRequest,
    LlmEngine, LlmError, SamplingParams,
};

fn engine(config: EngineConfig) -> (LlmEngine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_checkpoint(dir.path());
    common::tiny_tokenizer(dir.path());
    let loaded = load_model(dir.path(), &Device::Cpu).unwrap();
    (LlmEngine::start("tiny", loaded, config), dir)
}

fn config() -> EngineConfig {
    EngineConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 8,
        max_waiting: 8,
        max_model_len: 128,
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

/// Prompts longer than the 8-token budget are prefilled in chunks while the
/// others decode; each output equals the output the request gets alone.
#[test]
fn concurrent_greedy_outputs_equal_one_at_a_time() {
    let (e, _dir) = engine(config());
    let prompts: Vec<Vec<u32>> = vec![
        (3..23).collect(),
        vec![1, 40, 41],
        (50..61).collect(),
        vec![1, 7],
        (70..90).rev().collect(),
    ];
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| collect(e.submit(request(p.clone(), 12)).unwrap()))
        .collect();
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
}
