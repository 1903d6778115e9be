//! What weight quantization costs in quality and buys in speed: perplexity
//! and single-stream decode for the same model as f16 (computed in f32),
//! INT8 quantized at load, AWQ 4-bit, round-to-nearest 4-bit (the same bits
//! without AWQ's scales) and a GGUF, in one run; speed as a ratio to f16.
//!
//! cargo run --release -p benches --bin quantization -- \
//!   --model f16=DIR --model int8=DIR --model awq=DIR --model rtn=DIR \
//!   --model q4_1=FILE.gguf --text data/text/eval-hacker-folklore.txt
//!
//! A model named `int8` or `…+int8` is loaded with `quantization: int8` (on an
//! AWQ checkpoint: its dense LM head in INT8).
use benches::{median, print_table};
use candle_core::{Device, Tensor, D};
use clap::Parser;
use engine::llm::eval::{perplexity, DEFAULT_CONTEXT, DEFAULT_STRIDE};
use engine::llm::kv_cache::{KvCache, KvDtype, SeqId};
use engine::llm::load_model;
use engine::llm::model::ForwardBatch;
use engine::llm::quant::Quantization;
use kernels::quant::Isa;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// NAME=PATH, in table order; the first is the anchor of the speed ratio.
    #[arg(long, required = true)]
    model: Vec<String>,
    /// Text for perplexity, scored as `switchyard eval perplexity` scores it.
    #[arg(long)]
    text: PathBuf,
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Decode speed alone: perplexity is the same on every kernel path (they
    /// give the same bits), so a run with `SWITCHYARD_ISA` may skip it.
    #[arg(long)]
    skip_perplexity: bool,
}

fn greedy(logits: &Tensor) -> u32 {
    logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0]
}

/// Median tokens/s of greedy decode after a short prompt, one sequence.
fn decode_rate(
    model: &engine::llm::model::LlamaModel,
    prompt: &[u32],
    tokens: usize,
    repeats: usize,
) -> f64 {
    let c = &model.config;
    let capacity = prompt.len() + tokens + 1;
    let mut cache = KvCache::new(
        c.num_hidden_layers,
        model.kv_layout(16),
        KvDtype::default(),
        capacity.div_ceil(16),
        false,
    );
    let mut rates = Vec::new();
    for _ in 0..repeats {
        cache.blocks.free(SeqId(0));
        cache.allocate(SeqId(0), capacity).unwrap();
        let mut b = ForwardBatch::default();
        b.push(SeqId(0), prompt, 0);
        let mut next = greedy(&model.forward(&b, &mut cache).unwrap());
        let t = Instant::now();
        for i in 0..tokens {
            let mut b = ForwardBatch::default();
            b.push(SeqId(0), &[next], prompt.len() + i);
            next = greedy(&model.forward(&b, &mut cache).unwrap());
        }
        rates.push(tokens as f64 / t.elapsed().as_secs_f64());
    }
    median(&rates)
}

fn main() {
    let a = Args::parse();
    let text = std::fs::read_to_string(&a.text).expect("reading the text");
    let mut rows = Vec::new();
    let mut anchor = None;
    for spec in &a.model {
        let (name, path) = spec.split_once('=').expect("--model NAME=PATH");
        let q = if name == "int8" || name.ends_with("+int8") {
            Quantization::Int8
        } else {
            Quantization::None
        };
        let t = Instant::now();
        let loaded = load_model(path.as_ref(), &Device::Cpu, q).expect("loading the model");
        let load_s = t.elapsed().as_secs_f64();
        let tokens = loaded.tokenizer.encode(&text).unwrap();
        let ppl = if a.skip_perplexity {
            f64::NAN
        } else {
            perplexity(
                &loaded.model,
                &tokens,
                DEFAULT_CONTEXT,
                DEFAULT_STRIDE,
                &|_, _| (),
            )
            .unwrap()
            .perplexity()
        };
        let rate = decode_rate(&loaded.model, &tokens[..32], a.decode_tokens, a.repeats);
        let (base, base_ppl) = *anchor.get_or_insert((rate, ppl));
        let shown = |v: String| {
            if a.skip_perplexity {
                "–".to_string()
            } else {
                v
            }
        };
        rows.push(vec![
            name.to_string(),
            format!("{:.1}", load_s),
            shown(format!("{ppl:.3}")),
            shown(format!("{:+.1}%", (ppl / base_ppl - 1.0) * 100.0)),
            format!("{rate:.1}"),
            format!("{:.2}", rate / base),
        ]);
        eprintln!("{name}: done");
    }
    println!(
        "kernel path: {:?}; threads: {}; perplexity over {} (context {}, stride {})",
        Isa::detect(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        a.text.display(),
        DEFAULT_CONTEXT,
        DEFAULT_STRIDE
    );
    print_table(
        &[
            "model",
            "load s",
            "perplexity",
            "vs first",
            "decode tok/s",
            "speed ÷ first",
        ],
        &rows,
    );
}
