//! Single-stream prefill and decode speed of Switchyard's forward pass next to
//! candle-transformers' `quantized_llama` on the same GGUF, measured in one run;
//! with `--batch N`, also N sequences decoding together, next to the prefill
//! rate of the same run.
//!
//! cargo run --release -p benches --bin single_stream -- --model PATH.gguf
use benches::{median, print_table};
use candle_core::{Device, Tensor, D};
use candle_transformers::models::quantized_llama::ModelWeights;
use clap::Parser;
use engine::llm::kv_cache::{KvCache, KvDtype, SeqId};
use engine::llm::load_model;
use engine::llm::model::ForwardBatch;
use engine::llm::quant::Quantization;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// The GGUF file (`switchyard models fetch` prints the default model's path).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Runs Switchyard alone (for profiling), without the candle anchor.
    #[arg(long)]
    skip_reference: bool,
    /// Also decodes this many sequences in one batch per step (each after
    /// its own prompt) and compares the batch's tokens/s with prefill's.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    batch: u64,
    /// How the KV pool stores keys and values (the server's
    /// `kv_cache_dtype`): f16, f32 or int8.
    #[arg(long, default_value = "f16")]
    kv_cache_dtype: KvDtype,
}

/// One implementation under test: runs `tokens` from position `pos`, returns last logits.
trait Runner {
    fn reset(&mut self);
    fn step(&mut self, tokens: &[u32], pos: usize) -> Tensor;
}

struct Ours {
    model: engine::llm::model::LlamaModel,
    cache: KvCache,
    capacity: usize,
}

impl Ours {
    /// Decode tokens/s of `seqs` sequences stepping together, each after its
    /// own copy of `prompt` (median of `repeats`).
    fn batched(&mut self, prompt: &[u32], seqs: usize, decode: usize, repeats: usize) -> f64 {
        let ids: Vec<SeqId> = (1..=seqs as u64).map(SeqId).collect();
        let mut rates = Vec::new();
        for _ in 0..repeats {
            let mut next = Vec::new();
            for &id in &ids {
                self.cache.blocks.free(id);
                self.cache.allocate(id, self.capacity).unwrap();
                let mut b = ForwardBatch::default();
                b.push(id, prompt, 0);
                next.push(greedy(&self.model.forward(&b, &mut self.cache).unwrap()));
            }
            let t = Instant::now();
            for i in 0..decode {
                let mut b = ForwardBatch::default();
                for (&id, &tok) in ids.iter().zip(&next) {
                    b.push(id, &[tok], prompt.len() + i);
                }
                let logits = self.model.forward(&b, &mut self.cache).unwrap();
                next = (0..seqs).map(|r| greedy(&logits.get(r).unwrap())).collect();
            }
            rates.push((seqs * decode) as f64 / t.elapsed().as_secs_f64());
        }
        median(&rates)
    }
}

impl Runner for Ours {
    fn reset(&mut self) {
        self.cache.blocks.free(SeqId(0));
        self.cache.allocate(SeqId(0), self.capacity).unwrap();
    }
    fn step(&mut self, tokens: &[u32], pos: usize) -> Tensor {
        let mut b = ForwardBatch::default();
        b.push(SeqId(0), tokens, pos);
        self.model.forward(&b, &mut self.cache).unwrap()
    }
}

struct Reference {
    path: PathBuf,
    model: ModelWeights,
}

fn load_reference(path: &PathBuf) -> ModelWeights {
    let mut f = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap()
}

impl Runner for Reference {
    fn reset(&mut self) {
        self.model = load_reference(&self.path);
    }
    fn step(&mut self, tokens: &[u32], pos: usize) -> Tensor {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        self.model.forward(&x, pos).unwrap()
    }
}

/// The most likely next token.
fn greedy(logits: &Tensor) -> u32 {
    logits
        .flatten_all()
        .unwrap()
        .argmax(D::Minus1)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

/// Median prefill and decode tokens/s over `repeats` runs.
fn measure(r: &mut dyn Runner, prompt: &[u32], decode: usize, repeats: usize) -> (f64, f64) {
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        r.reset();
        let t = Instant::now();
        let logits = r.step(prompt, 0);
        pre.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let mut next = greedy(&logits);
        let t = Instant::now();
        for i in 0..decode {
            let l = r.step(&[next], prompt.len() + i);
            next = greedy(&l);
        }
        dec.push(decode as f64 / t.elapsed().as_secs_f64());
    }
    (median(&pre), median(&dec))
}

fn main() {
    let a = Args::parse();
    let loaded = load_model(&a.model, &Device::Cpu, Quantization::None).expect("loading the model");
    // About 14 tokens a sentence: enough sentences for the prompt asked for.
    let sentences = (a.prompt_tokens / 8).max(64);
    let text =
        "The history of the city begins with a small settlement by the river. ".repeat(sentences);
    let prompt: Vec<u32> = loaded
        .tokenizer
        .encode(&text)
        .unwrap()
        .into_iter()
        .take(a.prompt_tokens)
        .collect();
    let capacity = prompt.len() + a.decode_tokens;
    let cache = KvCache::new(
        loaded.model.config.num_hidden_layers,
        loaded.model.kv_layout(16),
        a.kv_cache_dtype,
        (a.batch as usize + 1) * capacity.div_ceil(16),
        false,
    );
    let mut ours = Ours {
        model: loaded.model,
        cache,
        capacity,
    };
    let threads = candle_core::utils::get_num_threads();
    println!(
        "single stream, {} prompt tokens, {} decode tokens, median of {} runs, {threads} threads\n",
        prompt.len(),
        a.decode_tokens,
        a.repeats
    );
    let (op, od) = measure(&mut ours, &prompt, a.decode_tokens, a.repeats);
    println!(
        "switchyard ({:?} kernels, {:?} KV): prefill {op:.1} tok/s, decode {od:.1} tok/s",
        kernels::quant::Isa::detect(),
        a.kv_cache_dtype
    );
    if a.batch > 1 {
        let bd = ours.batched(&prompt, a.batch as usize, a.decode_tokens, a.repeats);
        println!(
            "switchyard: decode of {} sequences together {bd:.1} tok/s, {:.2}× prefill",
            a.batch,
            bd / op
        );
    }
    if a.skip_reference {
        return;
    }
    let mut reference = Reference {
        model: load_reference(&a.model),
        path: a.model.clone(),
    };
    let (rp, rd) = measure(&mut reference, &prompt, a.decode_tokens, a.repeats);
    print_table(
        &[
            "phase",
            "switchyard tok/s",
            "candle quantized_llama tok/s",
            "ratio (ours ÷ candle)",
        ],
        &[
            vec![
                "prefill".into(),
                format!("{op:.1}"),
                format!("{rp:.1}"),
                format!("{:.2}", op / rp),
            ],
            vec![
                "decode".into(),
                format!("{od:.1}"),
                format!("{rd:.1}"),
                format!("{:.2}", od / rd),
            ],
        ],
    );
}
