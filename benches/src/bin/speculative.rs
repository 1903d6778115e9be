//! What n-gram speculation buys: greedy decode throughput of the engine with
//! prompt-lookup proposals, next to the same requests without them, in one
//! run, one stream and 16 at once. The prompts are grounded in a passage
//! (list, repeat, extract from, correct it), where the output copies its input;
//! greedy outputs are the same either way, so both sides decode the same
//! tokens. Prints the acceptance rate by position in the proposal.
//!
//! cargo run --release -p benches --bin speculative -- --model PATH.gguf
use benches::{engine_throughput, median, print_table, EngineRun};
use candle_core::Device;
use clap::Parser;
use engine::llm::quant::Quantization;
use engine::llm::{
    load_model, ChatMessage, EngineConfig, GenerationRequest, KvCacheSize, LlmEngine,
    SamplingParams, SpeculativeConfig,
};
use kernels::quant::Isa;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    run: EngineRun,
    #[arg(long, default_value_t = 4)]
    num_speculative_tokens: usize,
    #[arg(long, default_value_t = 4)]
    prompt_lookup_max: usize,
    /// No proposals while more sequences than this run.
    #[arg(long)]
    disable_by_batch_size: Option<usize>,
    /// A draft model (same vocabulary) to compare as a third mode.
    #[arg(long)]
    draft: Option<PathBuf>,
}

const PASSAGE: &str = "Alice Smith (alice@example.com) met Bob Jones (bob.jones@example.org) \
in Paris on 3 March 2021. They discussed the Q3 budget of 45,000 euros with Carol White \
(carol@white.net), who joined from the Lyon office, and agreed to meet again on 17 June 2021.";

fn tasks() -> [String; 4] {
    [
        format!("List every email address in this text, one per line.\n\n{PASSAGE}"),
        format!("Repeat this text exactly, then say 'done'.\n\n{PASSAGE}"),
        format!(
            "Extract every person's name and email from this text as a JSON list of objects \
             with keys name and email.\n\n{PASSAGE}"
        ),
        format!("Correct any grammar mistakes in this text and return it.\n\n{PASSAGE}"),
    ]
}

/// Output tokens/s of `streams` greedy requests submitted at once.
fn throughput(e: &LlmEngine, prompts: &[Vec<u32>], streams: usize, tokens: usize) -> f64 {
    let requests = (0..streams)
        .map(|i| GenerationRequest {
            prompt: prompts[i % prompts.len()].clone(),
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            max_tokens: tokens,
            min_tokens: 0,
            stop: vec![],
            ignore_eos: false,
            n: 1,
            constraint: None,
        })
        .collect();
    engine_throughput(e, requests)
}

fn main() {
    let a = Args::parse();
    let engine = |speculative, draft: Option<&PathBuf>| {
        let loaded = load_model(&a.run.model, &Device::Cpu, Quantization::None).expect("loading");
        let template = loaded.template.as_ref().expect("a chat template");
        let prompts: Vec<Vec<u32>> = tasks()
            .iter()
            .map(|p| {
                let m = ChatMessage {
                    role: "user".into(),
                    content: p.clone(),
                };
                let text = template.render(&[m], true).unwrap();
                loaded.tokenizer.encode(&text).unwrap()
            })
            .collect();
        let config = EngineConfig {
            kv_cache: KvCacheSize::Bytes(256 << 20),
            enable_prefix_caching: false,
            speculative,
            ..Default::default()
        };
        let e = match draft {
            None => LlmEngine::start("bench", loaded, config),
            Some(path) => {
                let d =
                    load_model(path, &Device::Cpu, Quantization::None).expect("loading the draft");
                LlmEngine::start_with_draft("bench", loaded, d, config).expect("a usable draft")
            }
        };
        (e, prompts)
    };
    let spec = SpeculativeConfig {
        num_speculative_tokens: a.num_speculative_tokens,
        prompt_lookup_min: 1,
        prompt_lookup_max: a.prompt_lookup_max,
        disable_by_batch_size: a.disable_by_batch_size,
    };
    let mut modes = vec![("off", None, None), ("ngram", Some(spec), None)];
    if let Some(d) = &a.draft {
        modes.push(("draft model", Some(spec), Some(d)));
    }
    let engines: Vec<_> = modes.iter().map(|(_, s, d)| engine(*s, *d)).collect();
    let mut rows = Vec::new();
    for streams in [1, 2, 4, 16] {
        // The modes take turns within each repeat, so that the machine's
        // drift falls on both alike.
        let mut rates = vec![Vec::new(); engines.len()];
        let before: Vec<_> = engines.iter().map(|(e, _)| e.stats()).collect();
        for _ in 0..a.run.repeats {
            for ((e, prompts), r) in engines.iter().zip(&mut rates) {
                r.push(throughput(e, prompts, streams, a.run.tokens));
            }
        }
        let base = median(&rates[0]);
        for (((name, _, _), (e, _)), (r, before)) in
            modes.iter().zip(&engines).zip(rates.iter().zip(&before))
        {
            let (rate, after) = (median(r), e.stats());
            let drafted = after.draft_tokens - before.draft_tokens;
            let accepted = after.accepted_tokens - before.accepted_tokens;
            rows.push(vec![
                name.to_string(),
                streams.to_string(),
                format!("{rate:.1}"),
                format!("{:.2}", rate / base),
                if drafted == 0 {
                    "—".into()
                } else {
                    format!("{:.2}", accepted as f64 / drafted as f64)
                },
            ]);
        }
        eprintln!("{streams} streams: done");
    }
    println!(
        "\nGreedy decode, {} tokens per request at most, {} repeats (median), path {:?}, \
         k = {}, lookup 1..={}, off above {:?} sequences\n",
        a.run.tokens,
        a.run.repeats,
        Isa::detect(),
        a.num_speculative_tokens,
        a.prompt_lookup_max,
        a.disable_by_batch_size
    );
    print_table(
        &[
            "speculation",
            "streams",
            "tok/s",
            "÷ off",
            "accepted ÷ proposed",
        ],
        &rows,
    );
    for ((name, _, _), (e, _)) in modes.iter().zip(&engines).skip(1) {
        let s = e.stats();
        println!(
            "\n{name}: {} proposals of {:.2} tokens on average; share of proposals whose token \
             at each position was accepted:",
            s.drafts,
            s.draft_tokens as f64 / s.drafts.max(1) as f64
        );
        for (pos, n) in s.accepted_at.iter().enumerate() {
            println!(
                "  position {pos}: {:.2}",
                *n as f64 / s.drafts.max(1) as f64
            );
        }
    }
}
