//! Decode attention over long contexts: Switchyard's paged kernel over f16
//! and int8 pools next to candle's dense attention (f32 `q·Kᵀ`, softmax,
//! `·V` on contiguous tensors) on the same shape, in one run. One call is one
//! layer of one decode step: each sequence's single new query against its
//! whole context. Candle's side reuses one layer's tensors (it is far
//! slower whether or not they are cached).
//!
//! cargo run --release -p benches --bin attention
use benches::{print_table, time};
use candle_core::{Device, Tensor};
use candle_nn::ops::softmax_last_dim;
use candle_transformers::utils::repeat_kv;
use clap::Parser;
use kernels::paged_attention::{
    paged_attention, KvDtype, KvLayout, LayerKv, Pool, Scoring, SeqQueries,
};
use kernels::quant::Isa;

#[derive(Parser)]
struct Args {
    /// Comma-separated context lengths (positions each query sees).
    #[arg(long, value_delimiter = ',', default_value = "128,4000,16000")]
    contexts: Vec<usize>,
    /// Comma-separated numbers of sequences decoding together.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch: Vec<usize>,
    /// Query heads, KV heads and head size (SmolLM2-135M's by default).
    #[arg(long, default_value_t = 9)]
    heads: usize,
    #[arg(long, default_value_t = 3)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Layers, each with its own pools, visited in turn as a decode step
    /// does (so that the KV cache is read from memory, not from a CPU cache
    /// that holds one layer's).
    #[arg(long, default_value_t = 30)]
    layers: usize,
    /// Timed calls per case (the median is reported).
    #[arg(long, default_value_t = 60)]
    calls: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let (heads, kv_heads, d) = (a.heads, a.kv_heads, a.head_dim);
    anyhow::ensure!(
        [a.block_size, a.layers, a.calls, d, kv_heads]
            .iter()
            .all(|&n| n > 0)
            && heads.is_multiple_of(kv_heads),
        "--block-size, --layers, --calls, --head-dim and --kv-heads must be at least 1, \
         and --heads a multiple of --kv-heads"
    );
    anyhow::ensure!(
        a.contexts.iter().chain(&a.batch).all(|&n| n > 0),
        "every --contexts and --batch value must be at least 1"
    );
    let dev = Device::Cpu;
    // Values in [-1, 1), as tensors for candle's side and as rows for ours.
    let random = |shape: &[usize]| -> anyhow::Result<(Tensor, Vec<f32>)> {
        let t = Tensor::rand(-1f32, 1f32, shape, &dev)?;
        let rows = t.flatten_all()?.to_vec1::<f32>()?;
        Ok((t, rows))
    };
    let layout = KvLayout {
        block_size: a.block_size,
        kv_heads,
        head_dim: d,
    };
    let isa = Isa::detect();
    let scoring = Scoring::scaled(1.0 / (d as f32).sqrt());
    println!(
        "decode attention, {heads} heads over {kv_heads} KV heads of {d}, blocks of {}, \
         {} layers, {isa:?} kernels, {} threads, median of {} calls\n",
        a.block_size,
        a.layers,
        rayon::current_num_threads(),
        a.calls
    );
    let dtypes = [KvDtype::F16, KvDtype::Int8];
    let mut table = Vec::new();
    for &ctx in &a.contexts {
        for &batch in &a.batch {
            let per_seq = ctx.div_ceil(a.block_size);
            let len = batch * per_seq * layout.block_len();
            let (kt, k) = random(&[batch, ctx, kv_heads, d])?;
            let (vt, v) = random(&[batch, ctx, kv_heads, d])?;
            let (qt, q) = random(&[batch, heads, 1, d])?;
            // Each sequence's blocks, interleaved with the others' as a
            // busy pool hands them out.
            let tables: Vec<Vec<u32>> = (0..batch)
                .map(|s| (0..per_seq).map(|i| (i * batch + s) as u32).collect())
                .collect();
            let seqs: Vec<SeqQueries> = tables
                .iter()
                .enumerate()
                .map(|(s, table)| SeqQueries {
                    offset: s,
                    len: 1,
                    start_pos: ctx - 1,
                    block_table: table,
                })
                .collect();
            let mut out = vec![0f32; q.len()];
            let mut row = vec![ctx.to_string(), batch.to_string()];
            let mut secs = Vec::new();
            for dtype in dtypes {
                let pool = |x: &[f32]| {
                    let mut p = Pool::zeros(dtype, layout, len);
                    let per = ctx * kv_heads * d;
                    for (s, table) in tables.iter().enumerate() {
                        layout.write(&mut p, table, 0, &x[s * per..][..per]);
                    }
                    p
                };
                let (kp, vp) = (pool(&k), pool(&v));
                let pools = vec![(kp, vp); a.layers];
                let mut layer = 0;
                let t = time(a.calls, || {
                    let (k, v) = &pools[layer % pools.len()];
                    layer += 1;
                    let kv = LayerKv { k, v, layout };
                    paged_attention(isa, &q, heads, &seqs, kv, scoring, &mut out)
                });
                secs.push(t);
                row.push(format!("{:.1}", t * 1e6));
            }
            // Candle's cache layout: `[batch, kv_heads, ctx, d]`.
            let cached = |t: Tensor| t.transpose(1, 2)?.contiguous();
            let (kt, vt) = (cached(kt)?, cached(vt)?);
            let scale = 1.0 / (d as f64).sqrt();
            let group = heads / kv_heads;
            candle_dense(&qt, &kt, &vt, group, scale)?;
            let t_candle = time(a.calls, || {
                candle_dense(&qt, &kt, &vt, group, scale).expect("ran above");
            });
            row.push(format!("{:.1}", t_candle * 1e6));
            row.push(format!("{:.2}", secs[0] / secs[1]));
            row.push(format!("{:.2}", t_candle / secs[0]));
            row.push(format!("{:.2}", t_candle / secs[1]));
            table.push(row);
        }
    }
    print_table(
        &[
            "context",
            "sequences",
            "f16 µs",
            "int8 µs",
            "candle f32 dense µs",
            "int8 speed ÷ f16",
            "f16 speed ÷ candle",
            "int8 speed ÷ candle",
        ],
        &table,
    );
    Ok(())
}

/// Candle's attention for one step as its models run it: the cached
/// `[batch, kv_heads, ctx, d]` keys and values repeated for their query heads,
/// `[batch, heads, 1, d]` queries against them.
fn candle_dense(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    group: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (k, v) = (repeat_kv(k.clone(), group)?, repeat_kv(v.clone(), group)?);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    softmax_last_dim(&scores)?.matmul(&v)
}
