//! Quantized matmul speed per GGUF type: Switchyard's kernel next to candle's
//! `QMatMul` on the same blocks, in one run, for one row (decode) and a batch
//! of rows (batched decode, prefill chunks).
//!
//! cargo run --release -p benches --bin quant_matmul
use benches::{print_table, time};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use clap::Parser;
use kernels::quant::{QuantMatrix, QuantType};

#[derive(Parser)]
struct Args {
    /// Output features (weight rows).
    #[arg(long, default_value_t = 1536)]
    n: usize,
    /// Input features (a multiple of 256 for the K-quants).
    #[arg(long, default_value_t = 1536)]
    k: usize,
    /// Comma-separated activation row counts.
    #[arg(long, default_value = "1,16")]
    rows: String,
    /// Timed calls per side and row count (the median is reported).
    #[arg(long, default_value_t = 50)]
    calls: usize,
}

fn main() {
    let a = Args::parse();
    let (n, k) = (a.n, a.k);
    let dev = Device::Cpu;
    let types = [
        (QuantType::Q4_0, GgmlDType::Q4_0),
        (QuantType::Q4_1, GgmlDType::Q4_1),
        (QuantType::Q8_0, GgmlDType::Q8_0),
        (QuantType::Q4K, GgmlDType::Q4K),
        (QuantType::Q5K, GgmlDType::Q5K),
        (QuantType::Q6K, GgmlDType::Q6K),
    ];
    let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
    println!(
        "[{n}, {k}] weights, median of {} calls, {} threads\n",
        a.calls,
        candle_core::utils::get_num_threads()
    );
    let mut table = Vec::new();
    for (ours_ty, candle_ty) in types {
        if !k.is_multiple_of(ours_ty.block_values()) {
            continue;
        }
        let q = QTensor::quantize(&w, candle_ty).unwrap();
        let ours = QuantMatrix::new(ours_ty, &q.data().unwrap(), n, k);
        let theirs = QMatMul::from_qtensor(q).unwrap();
        for rows in a
            .rows
            .split(',')
            .map(|r| r.trim().parse::<usize>().unwrap())
        {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut y = vec![0f32; rows * n];
            let t_ours = time(a.calls, || ours.matmul(&xs, &mut y));
            let t_theirs = time(a.calls, || {
                theirs.forward(&x).unwrap();
            });
            let gops = |t: f64| 2.0 * (rows * n * k) as f64 / t / 1e9;
            table.push(vec![
                format!("{ours_ty:?}"),
                rows.to_string(),
                format!("{:.1}", t_ours * 1e6),
                format!("{:.1}", gops(t_ours)),
                format!("{:.1}", t_theirs * 1e6),
                format!("{:.1}", gops(t_theirs)),
                format!("{:.2}", t_theirs / t_ours),
            ]);
        }
    }
    print_table(
        &[
            "type",
            "rows",
            "switchyard µs",
            "switchyard GOP/s",
            "candle µs",
            "candle GOP/s",
            "speed (ours ÷ candle)",
        ],
        &table,
    );
}
