//! `switchyard export`, `switchyard quantize` and `switchyard eval`: model
//! files converted, quantized and measured from the command line, each long
//! step behind a progress bar on stderr.
use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use engine::llm::eval::{perplexity, DEFAULT_CONTEXT, DEFAULT_STRIDE};
use engine::llm::quant::awq::{self, Method, Options};
use engine::llm::quant::Quantization;
use engine::llm::{export, load_model};
use gateway::config::Config;
use indicatif::{ProgressBar, ProgressStyle};
use std::cell::RefCell;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, ValueEnum)]
pub enum Dtype {
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum QuantMethod {
    /// Activation-aware scales searched on calibration text (Lin et al.).
    Awq,
    /// Round-to-nearest per group: the same bits without AWQ's scaling.
    Rtn,
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity of a model on a text, with a sliding window.
    Perplexity {
        /// A GGUF file, a Hugging Face folder, an AWQ folder, or a model name from the config.
        #[arg(long)]
        model: String,
        /// The text to score (UTF-8).
        #[arg(long)]
        text: PathBuf,
        /// Tokens per window.
        #[arg(long, default_value_t = DEFAULT_CONTEXT)]
        context: usize,
        /// Tokens between window starts; each token is scored once.
        #[arg(long, default_value_t = DEFAULT_STRIDE)]
        stride: usize,
        /// `int8`: quantize a dense folder at load, as `engine.quantization` does.
        #[arg(long, default_value = "none")]
        quantization: Quantization,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// A progress bar per stage, replaced when the stage changes.
struct Bars(RefCell<Option<(String, ProgressBar)>>);

impl Bars {
    fn new() -> Self {
        Self(RefCell::new(None))
    }

    fn update(&self, stage: &str, done: usize, total: usize) {
        let mut current = self.0.borrow_mut();
        if current.as_ref().is_none_or(|(s, _)| s != stage) {
            if let Some((_, bar)) = current.take() {
                bar.finish();
            }
            let bar = ProgressBar::new(total as u64).with_message(stage.to_string());
            bar.set_style(
                ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({elapsed})")
                    .expect("a valid template"),
            );
            *current = Some((stage.to_string(), bar));
        }
        if let Some((_, bar)) = current.as_ref() {
            bar.set_position(done as u64);
        }
    }

    fn finish(&self) {
        if let Some((_, bar)) = self.0.borrow_mut().take() {
            bar.finish();
        }
    }
}

/// A model argument: an existing path, or the name of a model in the
/// configuration (fetched and verified as `serve` would).
pub fn model_path(arg: &str, config: &Config) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match config.models.iter().find(|m| m.name == arg) {
        Some(m) => gateway::models::resolve(&m.source)
            .with_context(|| format!("fetching model `{}`", m.name)),
        None => {
            let known: Vec<_> = config.models.iter().map(|m| m.name.as_str()).collect();
            bail!(
                "`{arg}` is neither a file or folder nor a configured model (known: {})",
                known.join(", ")
            )
        }
    }
}

pub fn export(model: &Path, out: &Path, dtype: Dtype) -> Result<()> {
    let dtype = match dtype {
        Dtype::F32 => candle_core::DType::F32,
        Dtype::F16 => candle_core::DType::F16,
    };
    let bars = Bars::new();
    export::export(model, out, dtype, &|done, total| {
        bars.update("exporting tensors", done, total)
    })
    .with_context(|| format!("exporting {}", model.display()))?;
    bars.finish();
    println!("{}", out.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct QuantizeArgs {
    #[arg(long, value_enum, default_value = "awq")]
    method: QuantMethod,
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Input values sharing one scale and zero point (a multiple of 32
    /// dividing every projection's inputs).
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Calibration text (AWQ).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// AWQ: skip the search for each group's clipping range.
    #[arg(long)]
    no_clip: bool,
    #[arg(long)]
    out: PathBuf,
}

pub fn quantize(model: &Path, a: QuantizeArgs) -> Result<()> {
    if a.bits != 4 {
        bail!("--bits {}: quantize writes 4-bit AWQ checkpoints (for 8 bits, serve the dense folder with `engine: {{quantization: int8}}`)", a.bits);
    }
    let method = match a.method {
        QuantMethod::Awq => Method::Awq,
        QuantMethod::Rtn => Method::Rtn,
    };
    let text = match (&a.calib, method) {
        (Some(p), _) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        (None, Method::Awq) => bail!(
            "--method awq needs --calib FILE: text the model reads to find each channel's scale"
        ),
        (None, Method::Rtn) => None,
    };
    let opts = Options {
        method,
        group_size: a.group_size,
        samples: a.samples,
        seq_len: a.seq_len,
        clip: !a.no_clip,
    };
    let bars = Bars::new();
    let report = awq::quantize(
        model,
        &a.out,
        text.as_deref(),
        &opts,
        &|stage, done, total| bars.update(stage, done, total),
    )?;
    bars.finish();
    if !report.is_empty() {
        let (err, rtn): (f64, f64) = report
            .iter()
            .fold((0.0, 0.0), |(e, r), g| (e + g.error, r + g.rtn_error));
        let mean_alpha = report.iter().map(|g| g.alpha as f64).sum::<f64>() / report.len() as f64;
        eprintln!(
            "AWQ: {} projection groups, mean α {mean_alpha:.2}, output error {:.3}× round-to-nearest's on the calibration rows",
            report.len(),
            err / rtn
        );
    }
    println!("{}", a.out.display());
    Ok(())
}

pub fn eval(
    command: EvalCommand,
    load_config: impl Fn(Option<&PathBuf>) -> Result<Config>,
) -> Result<()> {
    let EvalCommand::Perplexity {
        model,
        text,
        context,
        stride,
        quantization,
        config,
    } = command;
    let path = model_path(&model, &load_config(config.as_ref())?)?;
    let loaded = load_model(&path, &candle_core::Device::Cpu, quantization)
        .with_context(|| format!("loading {}", path.display()))?;
    let text =
        std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
    let tokens = loaded.tokenizer.encode(&text)?;
    let bars = Bars::new();
    let p = perplexity(&loaded.model, &tokens, context, stride, &|done, total| {
        bars.update("scoring tokens", done, total)
    })?;
    bars.finish();
    println!("tokens\tmean_nll\tperplexity");
    println!("{}\t{:.4}\t{:.3}", p.tokens, p.mean_nll, p.perplexity());
    Ok(())
}
