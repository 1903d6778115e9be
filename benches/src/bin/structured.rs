//! What structured outputs cost: decode throughput of the engine with a JSON
//! schema's token mask on, next to the same requests without it, in one run,
//! one stream and 16 at once. Every request samples (temperature 1, seeded)
//! exactly `--tokens` tokens: the schemas never complete within them, so both
//! sides decode the same number of tokens after the same prompts.
//!
//! cargo run --release -p benches --bin structured -- --model PATH.gguf
use benches::{engine_throughput, median, print_table, EngineRun};
use candle_core::Device;
use clap::Parser;
use engine::llm::quant::Quantization;
use engine::llm::{
    load_model, ChatMessage, Constraint, EngineConfig, GenerationRequest, KvCacheSize, LlmEngine,
    SamplingParams,
};
use kernels::quant::Isa;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    run: EngineRun,
}

const PROMPTS: [&str; 4] = [
    "Write a long story about a lighthouse keeper, as JSON.",
    "List many inventory items for a hardware store as JSON.",
    "Describe a week of weather in detail, as JSON.",
    "Give a detailed JSON record of a library's books.",
];

/// Tokens/s of `streams` requests submitted at once, each decoding `tokens`.
fn throughput(
    e: &LlmEngine,
    prompts: &[Vec<u32>],
    constraint: &Option<Constraint>,
    streams: usize,
    tokens: usize,
) -> f64 {
    let requests = (0..streams)
        .map(|i| GenerationRequest {
            prompt: prompts[i % prompts.len()].clone(),
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(i as u64),
                ..Default::default()
            },
            max_tokens: tokens,
            min_tokens: 0,
            stop: vec![],
            ignore_eos: true,
            n: 1,
            constraint: constraint.clone(),
        })
        .collect();
    engine_throughput(e, requests)
}

fn main() {
    let a = Args::parse();
    let loaded = load_model(&a.run.model, &Device::Cpu, Quantization::None).expect("loading");
    let template = loaded.template.as_ref().expect("a chat template");
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| {
            let m = ChatMessage {
                role: "user".into(),
                content: p.to_string(),
            };
            loaded
                .tokenizer
                .encode(&template.render(&[m], true).unwrap())
                .unwrap()
        })
        .collect();
    let e = LlmEngine::start(
        "bench",
        loaded,
        EngineConfig {
            kv_cache: KvCacheSize::Bytes(256 << 20),
            ..Default::default()
        },
    );
    // A long string: one lexeme, cheap masks.
    let story = serde_json::json!({
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 4000}},
        "required": ["story"]
    });
    // Many small fields: the parser moves between keys, numbers, enums and
    // booleans every few tokens.
    let records = serde_json::json!({
        "type": "array",
        "minItems": 500,
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "kind": {"enum": ["bolt", "nut", "washer"]},
                "price": {"type": "number"},
                "ok": {"type": "boolean"}
            },
            "required": ["id", "kind", "price", "ok"],
            "additionalProperties": false
        }
    });
    let modes = [
        ("off", None),
        (
            "json schema: long string",
            Some(Constraint::JsonSchema(story)),
        ),
        (
            "json schema: records",
            Some(Constraint::JsonSchema(records)),
        ),
    ];
    // Warm-up: builds the vocabulary's trie for structured outputs.
    for (_, c) in &modes {
        throughput(&e, &prompts, c, 1, 8);
    }
    let mut rows = Vec::new();
    for streams in [1, 16] {
        let mut anchor = None;
        for (name, c) in &modes {
            let rates: Vec<f64> = (0..a.run.repeats)
                .map(|_| throughput(&e, &prompts, c, streams, a.run.tokens))
                .collect();
            let rate = median(&rates);
            let base = *anchor.get_or_insert(rate);
            rows.push(vec![
                name.to_string(),
                streams.to_string(),
                format!("{rate:.1}"),
                format!("{:.2}", rate / base),
            ]);
            eprintln!("{name} × {streams}: done");
        }
    }
    println!(
        "kernel path: {:?}; threads: {}; {} sampled tokens per request, median of {}",
        Isa::detect(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        a.run.tokens,
        a.run.repeats
    );
    print_table(&["constraint", "streams", "tokens/s", "÷ off"], &rows);
}
